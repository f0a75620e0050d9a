#pragma once

// The tokenizer stored in a GGUF model file (tokenizer.ggml.* metadata).

#include <cstdint>
#include <string>
#include <vector>

#include <peft/config.hpp>
#include <peft/core/error.hpp>
#include <peft/io/gguf.hpp>
#include <peft/text/bpe.hpp>

PEFT_NAMESPACE_BEGIN
namespace text {

/// The byte-level BPE tokenizer of a GGUF file whose tokenizer.ggml.model is "gpt2" (Llama 3,
/// SmolLM2, Qwen2 and most recent models): tokens, merges, token types (3 = control, matched
/// whole and skipped by decode; 4 = user-defined, matched whole), special ids, add_bos and the
/// pre-tokenizer named by tokenizer.ggml.pre. Throws peft::Error naming the file for another
/// tokenizer model (SentencePiece "llama" files) or malformed metadata.
///
///     peft::io::GgufFile gguf("SmolLM2-135M-Instruct.Q4_1.gguf");
///     auto tok = peft::text::bpe_from_gguf(gguf);
///     auto ids = tok.encode_ids("Hello, world!");
inline BpeTokenizer bpe_from_gguf(const io::GgufFile& f) {
  const auto model = f.get_string("tokenizer.ggml.model");
  check(model == "gpt2", "text::bpe",
        "{}: tokenizer model \"{}\" is not byte-level BPE (\"gpt2\"); peft reads only that one "
        "from GGUF files",
        f.path(), model);
  BpeVocabulary v;
  v.source = f.path();
  v.tokens = f.get_strings("tokenizer.ggml.tokens");
  v.merges = BpeVocabulary::split_merges(f.get_strings("tokenizer.ggml.merges"), f.path());
  if (f.has("tokenizer.ggml.token_type")) {
    const auto types = f.get_ints("tokenizer.ggml.token_type");
    check(types.size() == v.tokens.size(), "text::bpe", "{}: {} token types for {} tokens",
          f.path(), types.size(), v.tokens.size());
    for (size_t i = 0; i < types.size(); ++i) {
      if (types[i] == 3) v.special_ids.push_back(static_cast<int64_t>(i));
      if (types[i] == 4) v.added_ids.push_back(static_cast<int64_t>(i));
    }
  }
  auto id = [&](const char* key) -> std::optional<int64_t> {
    if (!f.has(key)) return std::nullopt;
    const auto value = f.get_int(key);
    check(value >= 0 && value < static_cast<int64_t>(v.tokens.size()), "text::bpe",
          "{}: {} = {} is outside the vocabulary of {}", f.path(), key, value, v.tokens.size());
    return value;
  };
  v.bos_id = id("tokenizer.ggml.bos_token_id");
  v.eos_id = id("tokenizer.ggml.eos_token_id");
  v.pad_id = id("tokenizer.ggml.padding_token_id");
  v.unk_id = id("tokenizer.ggml.unknown_token_id");
  v.add_bos = f.get_bool("tokenizer.ggml.add_bos_token", false);
  v.pre_tokenizer = BpePreTokenizer::from_gguf(f.get_string("tokenizer.ggml.pre", "default"));
  return BpeTokenizer(std::move(v));
}

}  // namespace text
PEFT_NAMESPACE_END
