#pragma once

// The tokenizer a model folder asks for, chosen from its files.

#include <filesystem>
#include <memory>
#include <string>

#include <peft/config.hpp>
#include <peft/core/error.hpp>
#include <peft/text/tokenizer.hpp>
#include <peft/text/unigram.hpp>
#include <peft/text/wordpiece.hpp>

PEFT_NAMESPACE_BEGIN
namespace text {

/// The tokenizer of a Hugging Face model folder: a tokenizer.json with a Unigram model gives a
/// UnigramTokenizer (XLM-R, multilingual-e5); otherwise vocab.txt gives a WordPieceTokenizer
/// (BERT). Throws peft::Error naming the folder when it has neither.
///
///     auto tok = peft::text::load_tokenizer(model_folder);
///     auto batch = tok->encode_batch({"Hello, world!", "你好，世界"});
inline std::shared_ptr<const Tokenizer> load_tokenizer(const std::filesystem::path& folder) {
  namespace fs = std::filesystem;
  check(fs::is_directory(folder), "text", "model folder {} does not exist", folder.string());
  const auto json = folder / "tokenizer.json";
  if (fs::exists(json) && !fs::exists(folder / "vocab.txt")) {
    return std::make_shared<UnigramTokenizer>(UnigramTokenizer::from_pretrained(folder));
  }
  if (fs::exists(folder / "vocab.txt")) {
    return std::make_shared<WordPieceTokenizer>(WordPieceTokenizer::from_pretrained(folder));
  }
  fail("text", "{} has neither vocab.txt (WordPiece) nor tokenizer.json (Unigram): no tokenizer",
       folder.string());
}

}  // namespace text
PEFT_NAMESPACE_END
