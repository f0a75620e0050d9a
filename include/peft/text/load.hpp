#pragma once

// The tokenizer a model folder (or GGUF model file) asks for, chosen from its files.

#include <filesystem>
#include <memory>
#include <string>

#include <peft/config.hpp>
#include <peft/core/error.hpp>
#include <peft/io/hf_config.hpp>
#include <peft/text/bpe.hpp>
#include <peft/text/gguf_tokenizer.hpp>
#include <peft/text/tokenizer.hpp>
#include <peft/text/unigram.hpp>
#include <peft/text/wordpiece.hpp>

PEFT_NAMESPACE_BEGIN
namespace text {

/// The tokenizer of a Hugging Face model folder: a tokenizer.json with a BPE model gives a
/// BpeTokenizer (GPT-2, Llama 3, SmolLM2), one with a Unigram model a UnigramTokenizer (XLM-R,
/// multilingual-e5); otherwise vocab.txt gives a WordPieceTokenizer (BERT). Throws peft::Error
/// naming the folder when it has neither. A GGUF model file (`*.gguf`) gives the tokenizer stored
/// in its metadata (bpe_from_gguf).
///
///     auto tok = peft::text::load_tokenizer(model_folder);
///     auto batch = tok->encode_batch({"Hello, world!", "你好，世界"});
inline std::shared_ptr<const Tokenizer> load_tokenizer(const std::filesystem::path& folder) {
  namespace fs = std::filesystem;
  if (folder.extension() == ".gguf" && fs::is_regular_file(folder)) {
    return std::make_shared<BpeTokenizer>(bpe_from_gguf(io::GgufFile(folder)));
  }
  check(fs::is_directory(folder), "text", "model folder {} does not exist", folder.string());
  const auto json = folder / "tokenizer.json";
  if (fs::exists(json) && !fs::exists(folder / "vocab.txt")) {
    // Only the model type is looked at here; each tokenizer reads and checks the rest itself.
    const auto parsed = io::read_json(json, "text");
    const auto model = parsed.is_object() ? parsed.find("model") : parsed.end();
    if (model != parsed.end() && model->is_object() && model->value("type", "") == "BPE") {
      return std::make_shared<BpeTokenizer>(BpeTokenizer::from_pretrained(folder));
    }
    return std::make_shared<UnigramTokenizer>(UnigramTokenizer::from_pretrained(folder));
  }
  if (fs::exists(folder / "vocab.txt")) {
    return std::make_shared<WordPieceTokenizer>(WordPieceTokenizer::from_pretrained(folder));
  }
  fail("text",
       "{} has neither vocab.txt (WordPiece) nor tokenizer.json (Unigram, BPE): no tokenizer",
       folder.string());
}

}  // namespace text
PEFT_NAMESPACE_END
