#pragma once

// Byte-level BPE as GPT-2 introduced it and SmolLM2, Llama 3 and Qwen2 use it: split the text
// into pieces with regular expressions, spell each piece's bytes with GPT-2's printable
// characters, then merge adjacent symbols in the order the merges were learned. Ids match the
// Hugging Face `tokenizers` library for the tokenizer.json features listed on BpeTokenizer.
//
// The split patterns need Unicode classes (\p{L}, \p{N}) and lookahead, which std::regex lacks,
// so they run on PCRE2 (UTF + UCP, JIT-compiled where the library has a JIT).

#ifndef PCRE2_CODE_UNIT_WIDTH
#define PCRE2_CODE_UNIT_WIDTH 8
#endif
#include <pcre2.h>

#include <array>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <queue>
#include <string>
#include <string_view>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include <peft/config.hpp>
#include <peft/core/error.hpp>
#include <peft/io/hf_config.hpp>
#include <peft/text/tokenizer.hpp>
#include <peft/text/unicode.hpp>

PEFT_NAMESPACE_BEGIN
namespace text {

/// GPT-2's split pattern (the ByteLevel pre-tokenizer's with use_regex): contractions, letters,
/// numbers and other symbols each with one optional leading space, and whitespace runs that leave
/// their last space to the word after them.
inline constexpr const char* kGpt2SplitPattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

/// Llama 3's split pattern (also what Hugging Face writes for llama-bpe GGUF files).
inline constexpr const char* kLlama3SplitPattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

/// How text is cut into pieces before BPE: steps run in order, each on every piece the steps
/// before it left, like a Hugging Face `Sequence` pre-tokenizer. The last step is always the
/// byte-level one.
struct BpePreTokenizer {
  /// One step.
  struct Step {
    enum class Kind {
      digits,     ///< Hugging Face's Digits: numeric characters apart from the rest
      split,      ///< Hugging Face's Split with a Regex pattern
      byte_level  ///< Hugging Face's ByteLevel: optional prefix space, then GPT-2's pattern
    };
    Kind kind = Kind::byte_level;
    /// digits: each numeric character on its own (true) or runs of them together.
    bool individual_digits = true;
    /// split: the regular expression (PCRE2 syntax, which covers what tokenizer.json files use).
    std::string pattern;
    /// split: drop the matches and keep what is between them ("Removed") instead of keeping both
    /// ("Isolated").
    bool remove_matches = false;
    /// byte_level: a space before every piece that does not start with one.
    bool add_prefix_space = false;
    /// byte_level: split with GPT-2's pattern.
    bool use_regex = true;
  };
  std::vector<Step> steps;

  /// GPT-2: ByteLevel with its pattern.
  static BpePreTokenizer gpt2() { return {{Step{}}}; }

  /// SmolLM2: every numeric character apart, then GPT-2's pattern.
  static BpePreTokenizer smollm() {
    Step digits;
    digits.kind = Step::Kind::digits;
    return {{digits, Step{}}};
  }

  /// A split pattern (kept as pieces), then the byte-level spelling without GPT-2's pattern: how
  /// Llama 3, Qwen2 and most newer models write theirs.
  static BpePreTokenizer split(std::string pattern) {
    Step split;
    split.kind = Step::Kind::split;
    split.pattern = std::move(pattern);
    Step bytes;
    bytes.use_regex = false;
    return {{split, bytes}};
  }

  /// The pre-tokenizer a GGUF file names in `tokenizer.ggml.pre`: the Hugging Face pre-tokenizer
  /// of the model it was converted from (for smollm checked against both the tokenizers library
  /// and llama.cpp by tests/python/bpe_parity.py). Names not listed here are refused rather than
  /// guessed: a wrong split gives plausible but different ids.
  static BpePreTokenizer from_gguf(std::string_view name) {
    if (name == "default" || name == "gpt2" || name == "gpt-2") return gpt2();
    if (name == "smollm") return smollm();
    if (name == "llama3" || name == "llama-v3" || name == "llama-bpe" || name == "smaug-bpe" ||
        name == "dbrx" || name == "falcon3") {
      return split(kLlama3SplitPattern);
    }
    fail("text::bpe",
         "GGUF pre-tokenizer \"{}\" is not supported (default, gpt2, smollm, llama-bpe, llama3, "
         "llama-v3, smaug-bpe, dbrx and falcon3 are)",
         name);
  }
};

/// What a byte-level BPE tokenizer is made of, as plain data: what a GGUF file's tokenizer.ggml.*
/// keys hold and what BpeTokenizer::from_pretrained() reads from a tokenizer.json.
struct BpeVocabulary {
  /// Every token in id order, spelled in GPT-2's byte alphabet ("Ġthe" is " the").
  std::vector<std::string> tokens;
  /// Merges in the order they were learned (rank order): each pair of tokens merges into their
  /// concatenation, which must be a token too.
  std::vector<std::pair<std::string, std::string>> merges;
  /// Control tokens (GGUF token_type 3, Hugging Face added tokens with "special"): matched whole
  /// in the text and left out by decode(ids, true).
  std::vector<int64_t> special_ids;
  /// Other added tokens (GGUF token_type 4): matched whole in the text, kept by decode().
  std::vector<int64_t> added_ids;
  std::optional<int64_t> bos_id;  ///< beginning of sequence
  std::optional<int64_t> eos_id;  ///< end of sequence
  std::optional<int64_t> pad_id;  ///< padding (unset: eos, else unk, else 0)
  std::optional<int64_t> unk_id;  ///< unknown (unset: token_to_id() gives -1 for unknown tokens)
  /// encode() starts every encoding with bos_id (GGUF tokenizer.ggml.add_bos_token).
  bool add_bos = false;
  /// A piece that is a token as a whole is not merged (Hugging Face's "ignore_merges").
  bool ignore_merges = false;
  /// A byte without a token becomes unk_id (a Hugging Face BPE model with an "unk_token") instead
  /// of being left out (llama.cpp, and Hugging Face without one).
  bool unk_bytes = false;
  /// With unk_bytes, adjacent bytes without a token give one unk, not one each ("fuse_unk").
  bool fuse_unk = false;
  /// token_type_id of a pair's second sentence.
  int64_t second_type_id = 1;
  /// The pre-tokenizer (GGUF: BpePreTokenizer::from_gguf(tokenizer.ggml.pre)).
  BpePreTokenizer pre_tokenizer = BpePreTokenizer::gpt2();
  /// Length encode() truncates to (unset: no limit).
  std::optional<int64_t> model_max_length;
  /// Names the vocabulary's file in errors.
  std::string source = "BPE vocabulary";

  /// Merges written as "left right" (GGUF tokenizer.ggml.merges, older tokenizer.json files).
  static std::vector<std::pair<std::string, std::string>> split_merges(
      const std::vector<std::string>& merges, const std::string& source) {
    std::vector<std::pair<std::string, std::string>> out;
    out.reserve(merges.size());
    for (size_t i = 0; i < merges.size(); ++i) {
      const auto& m = merges[i];
      const auto space = m.find(' ');
      check(space != std::string::npos && space > 0 && space + 1 < m.size() &&
                m.find(' ', space + 1) == std::string::npos,
            "text::bpe", "{}: merge {} \"{}\" is not of the form \"left right\"", source, i, m);
      out.emplace_back(m.substr(0, space), m.substr(space + 1));
    }
    return out;
  }
};

namespace detail {

// GPT-2's bytes_to_unicode(): printable Latin-1 bytes stand for themselves, the other 68 bytes
// for U+0100.. in byte order, so that every byte is a visible character and no token holds a
// space or control character.
inline const std::array<char32_t, 256>& byte_chars() {
  static const std::array<char32_t, 256> table = [] {
    std::array<char32_t, 256> t{};
    char32_t next = 256;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
      t[static_cast<size_t>(b)] = printable ? static_cast<char32_t>(b) : next++;
    }
    return t;
  }();
  return table;
}

// The byte GPT-2's alphabet spells with `cp`, or -1.
inline int char_byte(char32_t cp) {
  static const std::array<int16_t, 324> table = [] {
    std::array<int16_t, 324> t{};
    t.fill(-1);
    for (int b = 0; b < 256; ++b) t[byte_chars()[static_cast<size_t>(b)]] = static_cast<int16_t>(b);
    return t;
  }();
  return cp < table.size() ? table[cp] : -1;
}

// Bytes to text the way Rust's String::from_utf8_lossy does (and so the `tokenizers` library's
// ByteLevel decoder): each maximal prefix of a valid sequence that cannot be completed, or each
// byte that starts none, becomes one U+FFFD.
inline std::string utf8_lossy(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size());
  const auto* s = reinterpret_cast<const unsigned char*>(bytes.data());
  const size_t n = bytes.size();
  size_t at = 0;
  while (at < n) {
    const unsigned char lead = s[at];
    size_t need = 0;
    unsigned char lo = 0x80, hi = 0xBF;  // range of the second byte (Unicode Table 3-7)
    if (lead < 0x80) {
      out += static_cast<char>(lead);
      ++at;
      continue;
    } else if (lead >= 0xC2 && lead <= 0xDF) {
      need = 1;
    } else if (lead >= 0xE0 && lead <= 0xEF) {
      need = 2;
      if (lead == 0xE0) lo = 0xA0;
      if (lead == 0xED) hi = 0x9F;
    } else if (lead >= 0xF0 && lead <= 0xF4) {
      need = 3;
      if (lead == 0xF0) lo = 0x90;
      if (lead == 0xF4) hi = 0x8F;
    }
    size_t got = 0;
    while (got < need && at + 1 + got < n) {
      const unsigned char c = s[at + 1 + got];
      const bool ok = got == 0 ? (c >= lo && c <= hi) : (c >= 0x80 && c <= 0xBF);
      if (!ok) break;
      ++got;
    }
    if (need > 0 && got == need) {
      out.append(bytes.substr(at, need + 1));
    } else {
      out += "\xEF\xBF\xBD";
    }
    at += 1 + got;
  }
  return out;
}

// A compiled PCRE2 pattern, shared by copies (PCRE2 code is read-only once compiled, so matching
// from several threads is safe; each match gets its own match data).
class Pcre2Pattern {
 public:
  Pcre2Pattern(const std::string& pattern, const std::string& source) {
    int error = 0;
    PCRE2_SIZE offset = 0;
    pcre2_code_8* code =
        pcre2_compile_8(reinterpret_cast<PCRE2_SPTR8>(pattern.data()), pattern.size(),
                        PCRE2_UTF | PCRE2_UCP, &error, &offset, nullptr);
    if (code == nullptr) {
      fail("text::bpe", "{}: split pattern \"{}\" does not compile at offset {}: {}", source,
           pattern, offset, message(error));
    }
    // Without a JIT (or where it cannot compile this pattern) PCRE2 interprets: same matches.
    pcre2_jit_compile_8(code, PCRE2_JIT_COMPLETE);
    code_.reset(code, pcre2_code_free_8);
  }

  // Calls f(begin, end) for each non-empty match in `text`, left to right. `text` must be valid
  // UTF-8 (the caller checked).
  template <class F>
  void for_each_match(std::string_view text, F&& f) const {
    std::unique_ptr<pcre2_match_data_8, void (*)(pcre2_match_data_8*)> data(
        pcre2_match_data_create_from_pattern_8(code_.get(), nullptr), pcre2_match_data_free_8);
    check(data != nullptr, "text::bpe", "out of memory for PCRE2 match data");
    const auto* subject = reinterpret_cast<PCRE2_SPTR8>(text.data());
    size_t at = 0;
    while (at < text.size()) {
      const int rc = pcre2_match_8(code_.get(), subject, text.size(), at, PCRE2_NO_UTF_CHECK,
                                   data.get(), nullptr);
      if (rc == PCRE2_ERROR_NOMATCH) return;
      check(rc >= 0, "text::bpe", "splitting a text of {} bytes failed: {}", text.size(),
            message(rc));
      const PCRE2_SIZE* ovector = pcre2_get_ovector_pointer_8(data.get());
      const size_t begin = ovector[0];
      const size_t end = ovector[1];
      if (end > begin) {
        f(begin, end);
        at = end;
      } else {
        // An empty match: step over one character so the search moves on.
        at = begin + 1;
        while (at < text.size() && (static_cast<unsigned char>(text[at]) & 0xC0) == 0x80) ++at;
      }
    }
  }

 private:
  static std::string message(int error) {
    PCRE2_UCHAR8 buffer[256];
    pcre2_get_error_message_8(error, buffer, sizeof(buffer));
    return reinterpret_cast<const char*>(buffer);
  }

  std::shared_ptr<pcre2_code_8> code_;
};

}  // namespace detail

/// A byte-level BPE tokenizer (GPT-2 style), from plain data (a GGUF file's vocabulary) or a
/// Hugging Face tokenizer.json.
///
/// Supported in a tokenizer.json: model `BPE` (no dropout, byte_fallback, continuing_subword_prefix
/// or end_of_word_suffix; merges as "a b" or ["a", "b"]; ignore_merges honoured); normalizer null;
/// pre_tokenizer `ByteLevel`, or a `Sequence` of `Digits` and `Split` (Regex pattern, Isolated or
/// Removed) ending in `ByteLevel`; decoder `ByteLevel` or null; post_processor `ByteLevel`, null,
/// or `TemplateProcessing` of the shape `[bos] $A` / `[bos] $A $B`; added tokens that are not
/// stripped or single-word. Anything else is refused with an error naming the file.
///
/// Text must be valid UTF-8 (the `tokenizers` library only takes strings); invalid UTF-8 is a
/// peft::Error with the byte offset. A byte the vocabulary has no token for (SmolLM2 lacks 0x04,
/// 0xF1 and a few more) is left out, as the library and llama.cpp both do, unless the model names
/// an unk_token. decode() turns token bytes back into text and, like the
/// library, writes U+FFFD for bytes that do not form UTF-8 (ids cut inside a character).
///
///     auto tok = peft::text::BpeTokenizer::from_pretrained(folder);  // has tokenizer.json
///     tok.tokenize("don't panic");  // {"don", "'t", "Ġpanic"}
class BpeTokenizer final : public Tokenizer {
 public:
  /// Reads `folder/tokenizer.json`, and model_max_length, pad_token and eos_token from
  /// `folder/tokenizer_config.json` when present.
  static BpeTokenizer from_pretrained(const std::filesystem::path& folder) {
    namespace fs = std::filesystem;
    check(fs::is_directory(folder), "text::bpe", "model folder {} does not exist", folder.string());
    const auto file = folder / "tokenizer.json";
    auto vocabulary = read_tokenizer_json(io::read_json(file, "text::bpe"), file.string());
    const auto config = folder / "tokenizer_config.json";
    if (fs::exists(config)) {
      apply_config(vocabulary, io::read_json(config, "text::bpe"), config.string());
    }
    return BpeTokenizer(std::move(vocabulary));
  }

  /// The vocabulary, merges and options of a parsed tokenizer.json; `source` names it in errors.
  static BpeVocabulary read_tokenizer_json(const nlohmann::json& j, const std::string& source) {
    Reader reader{source};
    return reader.read(j);
  }

  /// A tokenizer from plain data; errors name `vocabulary.source`.
  explicit BpeTokenizer(BpeVocabulary vocabulary) : source_(std::move(vocabulary.source)) {
    const auto n = static_cast<int64_t>(vocabulary.tokens.size());
    check(n > 0, "text::bpe", "{}: the vocabulary is empty", source_);
    tokens_ = std::move(vocabulary.tokens);
    index_.reserve(tokens_.size());
    bytes_.reserve(tokens_.size());
    for (size_t i = 0; i < tokens_.size(); ++i) {
      const auto& token = tokens_[i];
      check(!token.empty(), "text::bpe", "{}: token {} is empty", source_, i);
      const auto chars = unicode::decode_utf8(token, fmt::format("{} token {}", source_, i));
      auto [it, inserted] = index_.emplace(token, static_cast<int64_t>(i));
      check(inserted, "text::bpe", "{}: token \"{}\" appears twice (ids {} and {})", source_, token,
            it->second, i);
      // A token spelled in the byte alphabet decodes to its bytes; one that is not (an added
      // token such as "<|im_start|>" may use any character) decodes to itself.
      std::string raw;
      bool spelled = true;
      for (char32_t cp : chars) {
        const int b = detail::char_byte(cp);
        if (b < 0) {
          spelled = false;
          break;
        }
        raw += static_cast<char>(b);
      }
      bytes_.push_back(spelled ? std::move(raw) : token);
    }
    for (int b = 0; b < 256; ++b) {
      std::string spelled;
      unicode::append_utf8(detail::byte_chars()[static_cast<size_t>(b)], spelled);
      auto it = index_.find(spelled);
      byte_ids_[static_cast<size_t>(b)] = it == index_.end() ? -1 : it->second;
    }
    auto id_ok = [&](int64_t id) { return id >= 0 && id < n; };
    auto checked = [&](const std::optional<int64_t>& id, const char* what) {
      check(!id || id_ok(*id), "text::bpe", "{}: {} id {} is outside the vocabulary [0, {})",
            source_, what, id.value_or(0), n);
      return id;
    };
    const auto bos = checked(vocabulary.bos_id, "bos");
    const auto eos = checked(vocabulary.eos_id, "eos");
    const auto pad = checked(vocabulary.pad_id, "pad");
    const auto unk = checked(vocabulary.unk_id, "unk");
    check(!vocabulary.add_bos || bos.has_value(), "text::bpe",
          "{}: add_bos is set but there is no bos token", source_);
    check(!vocabulary.unk_bytes || unk.has_value(), "text::bpe",
          "{}: unk_bytes is set but there is no unk token", source_);
    unk_ = unk.value_or(-1);
    byte_unk_ = vocabulary.unk_bytes ? unk_ : -1;

    merges_.reserve(vocabulary.merges.size());
    for (size_t rank = 0; rank < vocabulary.merges.size(); ++rank) {
      const auto& [left, right] = vocabulary.merges[rank];
      auto id = [&](const std::string& token) {
        auto it = index_.find(token);
        check(it != index_.end(), "text::bpe",
              "{}: merge {} \"{} {}\" uses \"{}\", which is not a token", source_, rank, left,
              right, token);
        return it->second;
      };
      const int64_t l = id(left);
      const int64_t r = id(right);
      const int64_t merged = id(left + right);
      merges_.emplace(pair_key(l, r), Merge{static_cast<int64_t>(rank), merged});
    }
    ignore_merges_ = vocabulary.ignore_merges;
    fuse_unk_ = vocabulary.fuse_unk;

    std::vector<std::string> whole;  // matched whole in the text
    for (const auto* list : {&vocabulary.special_ids, &vocabulary.added_ids}) {
      for (int64_t id : *list) {
        check(id_ok(id), "text::bpe", "{}: added token id {} is outside the vocabulary [0, {})",
              source_, id, n);
        whole.push_back(tokens_[static_cast<size_t>(id)]);
      }
    }
    decode_skips_.insert(vocabulary.special_ids.begin(), vocabulary.special_ids.end());

    const auto& steps = vocabulary.pre_tokenizer.steps;
    check(!steps.empty() && steps.back().kind == BpePreTokenizer::Step::Kind::byte_level,
          "text::bpe", "{}: a byte-level BPE pre-tokenizer must end with its byte-level step",
          source_);
    for (const auto& step : steps) {
      Step compiled{step, std::nullopt};
      if (step.kind == BpePreTokenizer::Step::Kind::split) {
        compiled.pattern.emplace(step.pattern, source_);
      } else if (step.kind == BpePreTokenizer::Step::Kind::byte_level) {
        check(&step == &steps.back(), "text::bpe", "{}: the byte-level step must be the last",
              source_);
        if (step.use_regex) compiled.pattern.emplace(kGpt2SplitPattern, source_);
      }
      steps_.push_back(std::move(compiled));
    }
    PairLayout layout;
    layout.add_cls = vocabulary.add_bos;
    layout.add_sep = false;
    layout.second_type_id = vocabulary.second_type_id;
    layout.longer_keeps_odd = true;
    const int64_t pad_id = pad ? *pad : (eos ? *eos : (unk ? *unk : 0));
    set_specials(unk_, bos.value_or(-1), eos.value_or(-1), pad_id, std::move(whole),
                 vocabulary.model_max_length, layout);
  }

  const char* kind() const override { return "bpe"; }
  int64_t vocab_size() const override { return static_cast<int64_t>(tokens_.size()); }

  /// The id of `token`, or unk_id() (-1 when the vocabulary has no unknown token).
  int64_t token_to_id(const std::string& token) const override {
    auto it = index_.find(token);
    return it == index_.end() ? unk_ : it->second;
  }

  const std::string& id_to_token(int64_t id) const override {
    check(id >= 0 && id < vocab_size(), "text::bpe",
          "token id {} is outside the vocabulary [0, {})", id, vocab_size());
    return tokens_[static_cast<size_t>(id)];
  }

  std::vector<int64_t> encode_ids(std::string_view text) const override {
    unicode::decode_utf8(text, "text");
    std::vector<int64_t> ids;
    for_each_chunk(text, [&](std::string_view chunk, size_t, bool special) {
      if (special) {
        ids.push_back(index_.at(std::string(chunk)));
        return;
      }
      for (const auto& piece : pre_tokenize(chunk)) merge(piece, ids);
    });
    return ids;
  }

  /// The pieces BPE runs on, before their bytes are spelled (for tests and debugging).
  std::vector<std::string> pre_tokenize(std::string_view text) const {
    std::vector<std::string> pieces{std::string(text)};
    for (const auto& step : steps_) {
      std::vector<std::string> next;
      for (auto& piece : pieces) split(step, std::move(piece), next);
      pieces = std::move(next);
    }
    return pieces;
  }

  /// The bytes of the tokens (control tokens left out unless `skip_special_tokens` is false) as
  /// text; bytes that do not form UTF-8 become U+FFFD.
  std::string decode(const std::vector<int64_t>& ids,
                     bool skip_special_tokens = true) const override {
    std::string bytes;
    for (auto id : ids) {
      id_to_token(id);
      if (skip_special_tokens && decode_skips_.count(id) > 0) continue;
      bytes += bytes_[static_cast<size_t>(id)];
    }
    return detail::utf8_lossy(bytes);
  }

  /// The beginning-of-sequence id (cls_id()), -1 when there is none.
  int64_t bos_id() const { return cls_id(); }
  /// The end-of-sequence id (sep_id(), though encode() does not add it), -1 when there is none.
  int64_t eos_id() const { return sep_id(); }

 private:
  struct Merge {
    int64_t rank;
    int64_t id;
  };

  struct Step {
    BpePreTokenizer::Step spec;
    std::optional<detail::Pcre2Pattern> pattern;
  };

  // Turns a tokenizer.json into a BpeVocabulary; every error names the file.
  struct Reader {
    const std::string& source;

    const nlohmann::json& field(const nlohmann::json& j, const char* key, const char* where) const {
      check(j.is_object() && j.contains(key), "text::bpe", "{}: {} has no \"{}\"", source, where,
            key);
      return j.at(key);
    }

    std::string string_field(const nlohmann::json& j, const char* key, const char* where) const {
      const auto& v = field(j, key, where);
      check(v.is_string(), "text::bpe", "{}: \"{}\" of {} must be a string, got {}", source, key,
            where, v.dump());
      return v.get<std::string>();
    }

    bool flag(const nlohmann::json& j, const char* key, bool otherwise = false) const {
      auto it = j.find(key);
      if (it == j.end() || it->is_null()) return otherwise;
      check(it->is_boolean(), "text::bpe", "{}: \"{}\" must be true or false, got {}", source, key,
            it->dump());
      return it->get<bool>();
    }

    static bool set(const nlohmann::json& j, const char* key) {
      auto it = j.find(key);
      return it != j.end() && !it->is_null() &&
             !(it->is_string() && it->get<std::string>().empty());
    }

    BpeVocabulary read(const nlohmann::json& j) const {
      check(j.is_object(), "text::bpe", "{}: expected a JSON object", source);
      BpeVocabulary v;
      v.source = source;
      const auto& model = field(j, "model", "the file");
      const auto type = string_field(model, "type", "\"model\"");
      check(type == "BPE", "text::bpe", "{}: model type \"{}\" is not a BPE model", source, type);
      check(!set(model, "dropout"), "text::bpe", "{}: BPE dropout is not supported", source);
      check(!flag(model, "byte_fallback"), "text::bpe",
            "{}: BPE byte_fallback (SentencePiece-style BPE) is not supported", source);
      check(!set(model, "continuing_subword_prefix") && !set(model, "end_of_word_suffix"),
            "text::bpe", "{}: continuing_subword_prefix and end_of_word_suffix are not supported",
            source);
      v.ignore_merges = flag(model, "ignore_merges");
      v.fuse_unk = flag(model, "fuse_unk");
      read_vocab(model, j, v);
      read_merges(field(model, "merges", "\"model\""), v);
      if (set(model, "unk_token")) {
        const auto unk = string_field(model, "unk_token", "\"model\"");
        v.unk_id = id_of(v, unk, "model.unk_token");
        v.unk_bytes = true;
      }
      if (auto it = j.find("normalizer"); it != j.end() && !it->is_null()) {
        fail("text::bpe", "{}: normalizer {} is not supported (only null is)", source,
             it->dump().substr(0, 200));
      }
      read_pre_tokenizer(field(j, "pre_tokenizer", "the file"), v.pre_tokenizer);
      if (auto it = j.find("decoder"); it != j.end() && !it->is_null()) {
        const auto decoder = string_field(*it, "type", "\"decoder\"");
        check(decoder == "ByteLevel", "text::bpe",
              "{}: decoder \"{}\" is not supported (ByteLevel is)", source, decoder);
      }
      if (auto it = j.find("post_processor"); it != j.end() && !it->is_null()) {
        read_post_processor(*it, v);
      }
      return v;
    }

    int64_t id_of(const BpeVocabulary& v, const std::string& token, const char* what) const {
      for (size_t i = 0; i < v.tokens.size(); ++i) {
        if (v.tokens[i] == token) return static_cast<int64_t>(i);
      }
      fail("text::bpe", "{}: {} \"{}\" is not in the vocabulary", source, what, token);
    }

    void read_vocab(const nlohmann::json& model, const nlohmann::json& j, BpeVocabulary& v) const {
      const auto& vocab = field(model, "vocab", "\"model\"");
      check(vocab.is_object() && !vocab.empty(), "text::bpe",
            "{}: \"model.vocab\" must be a non-empty object of token: id", source);
      std::vector<std::optional<std::string>> by_id;
      auto place = [&](const std::string& token, const nlohmann::json& id, const char* where) {
        check(id.is_number_integer() && id.get<int64_t>() >= 0 && id.get<int64_t>() < (1 << 24),
              "text::bpe", "{}: {} \"{}\" has id {}, which is not a valid id", source, where, token,
              id.dump());
        const auto i = id.get<size_t>();
        if (i >= by_id.size()) by_id.resize(i + 1);
        check(!by_id[i] || *by_id[i] == token, "text::bpe",
              "{}: id {} is given to \"{}\" and \"{}\"", source, i, *by_id[i], token);
        by_id[i] = token;
      };
      for (const auto& [token, id] : vocab.items()) place(token, id, "model.vocab token");
      if (auto it = j.find("added_tokens"); it != j.end() && !it->is_null()) {
        check(it->is_array(), "text::bpe", "{}: \"added_tokens\" must be an array", source);
        for (const auto& t : *it) {
          const auto content = string_field(t, "content", "an added token");
          check(!content.empty(), "text::bpe", "{}: an added token is empty", source);
          for (const char* key : {"single_word", "lstrip", "rstrip"}) {
            check(!flag(t, key), "text::bpe",
                  "{}: added token \"{}\" has {}, which is not supported", source, content, key);
          }
          const auto& id = field(t, "id", "an added token");
          place(content, id, "added token");
          (flag(t, "special") ? v.special_ids : v.added_ids).push_back(id.get<int64_t>());
        }
      }
      v.tokens.reserve(by_id.size());
      for (size_t i = 0; i < by_id.size(); ++i) {
        check(by_id[i].has_value(), "text::bpe",
              "{}: no token has id {} (ids must run from 0 to {})", source, i, by_id.size() - 1);
        v.tokens.push_back(std::move(*by_id[i]));
      }
    }

    void read_merges(const nlohmann::json& merges, BpeVocabulary& v) const {
      check(merges.is_array(), "text::bpe", "{}: \"model.merges\" must be an array", source);
      std::vector<std::string> joined;
      for (size_t i = 0; i < merges.size(); ++i) {
        const auto& m = merges[i];
        if (m.is_string()) {
          joined.push_back(m.get<std::string>());
          continue;
        }
        check(m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string(), "text::bpe",
              "{}: model.merges[{}] must be \"a b\" or [\"a\", \"b\"], got {}", source, i,
              m.dump());
        check(joined.empty(), "text::bpe",
              "{}: model.merges mixes \"a b\" and [\"a\", \"b\"] forms", source);
        v.merges.emplace_back(m[0].get<std::string>(), m[1].get<std::string>());
      }
      if (!joined.empty()) {
        check(v.merges.empty(), "text::bpe",
              "{}: model.merges mixes \"a b\" and [\"a\", \"b\"] forms", source);
        v.merges = BpeVocabulary::split_merges(joined, source);
      }
    }

    void read_pre_tokenizer(const nlohmann::json& p, BpePreTokenizer& out) const {
      check(p.is_object(), "text::bpe", "{}: a byte-level BPE tokenizer needs a pre_tokenizer",
            source);
      out.steps.clear();
      const auto type = string_field(p, "type", "\"pre_tokenizer\"");
      if (type == "Sequence") {
        const auto& list = field(p, "pretokenizers", "the Sequence pre_tokenizer");
        check(list.is_array(), "text::bpe", "{}: \"pretokenizers\" must be an array", source);
        for (const auto& item : list) read_step(item, out);
      } else {
        read_step(p, out);
      }
      check(!out.steps.empty() && out.steps.back().kind == BpePreTokenizer::Step::Kind::byte_level,
            "text::bpe", "{}: the pre_tokenizer must end with ByteLevel (a byte-level BPE), got {}",
            source, p.dump().substr(0, 200));
    }

    void read_step(const nlohmann::json& p, BpePreTokenizer& out) const {
      using Kind = BpePreTokenizer::Step::Kind;
      const auto type = string_field(p, "type", "a pre_tokenizer");
      check(out.steps.empty() || out.steps.back().kind != Kind::byte_level, "text::bpe",
            "{}: pre_tokenizer \"{}\" after ByteLevel is not supported", source, type);
      BpePreTokenizer::Step step;
      if (type == "ByteLevel") {
        step.kind = Kind::byte_level;
        step.add_prefix_space = flag(p, "add_prefix_space");
        step.use_regex = flag(p, "use_regex", true);
      } else if (type == "Digits") {
        step.kind = Kind::digits;
        step.individual_digits = flag(p, "individual_digits");
      } else if (type == "Split") {
        step.kind = Kind::split;
        const auto& pattern = field(p, "pattern", "the Split pre_tokenizer");
        check(pattern.is_object() && pattern.contains("Regex"), "text::bpe",
              "{}: Split pattern {} is not supported (a Regex is)", source, pattern.dump());
        step.pattern = string_field(pattern, "Regex", "the Split pattern");
        const auto behavior = string_field(p, "behavior", "the Split pre_tokenizer");
        check(behavior == "Isolated" || behavior == "Removed", "text::bpe",
              "{}: Split behavior \"{}\" is not supported (Isolated and Removed are)", source,
              behavior);
        step.remove_matches = behavior == "Removed";
        check(!flag(p, "invert"), "text::bpe", "{}: an inverted Split is not supported", source);
      } else {
        fail("text::bpe",
             "{}: pre_tokenizer \"{}\" is not supported (ByteLevel, Digits, Split and Sequence "
             "are)",
             source, type);
      }
      out.steps.push_back(std::move(step));
    }

    void read_post_processor(const nlohmann::json& p, BpeVocabulary& v) const {
      const auto type = string_field(p, "type", "\"post_processor\"");
      if (type == "ByteLevel") return;
      check(type == "TemplateProcessing", "text::bpe",
            "{}: post_processor \"{}\" is not supported (ByteLevel and TemplateProcessing are)",
            source, type);
      // (is a sequence, token or sequence name, type id) of each template piece.
      struct Item {
        bool sequence;
        std::string id;
        int64_t type_id;
      };
      auto items = [&](const char* key) {
        std::vector<Item> out;
        for (const auto& piece : field(p, key, "the TemplateProcessing post_processor")) {
          const bool sequence = piece.contains("Sequence");
          const auto& body = sequence ? piece["Sequence"] : field(piece, "SpecialToken", "a piece");
          out.push_back({sequence, string_field(body, "id", "a template piece"),
                         body.value("type_id", int64_t{0})});
        }
        return out;
      };
      const auto single = items("single");
      const auto pair = items("pair");
      const bool bos = single.size() == 2 && !single[0].sequence;
      const size_t a = bos ? 1 : 0;
      const bool ok =
          single.size() == a + 1 && single[a].sequence && single[a].id == "A" &&
          pair.size() == a + 2 && (!bos || (!pair[0].sequence && pair[0].id == single[0].id)) &&
          pair[a].sequence && pair[a].id == "A" && pair[a + 1].sequence && pair[a + 1].id == "B" &&
          single[a].type_id == 0 && pair[a].type_id == 0 && (!bos || single[0].type_id == 0);
      check(ok, "text::bpe",
            "{}: TemplateProcessing {} is not of the supported shape `[bos] $A` / `[bos] $A $B`",
            source, p.dump().substr(0, 200));
      if (bos) {
        v.bos_id = id_of(v, single[0].id, "the post_processor's bos token");
        v.add_bos = true;
      }
      v.second_type_id = pair[a + 1].type_id;
    }
  };

  static void apply_config(BpeVocabulary& v, const nlohmann::json& config,
                           const std::string& file) {
    check(config.is_object(), "text::bpe", "{} must hold a JSON object", file);
    v.model_max_length = config_max_length(config, file, "text::bpe");
    auto token = [&](const char* key) -> std::optional<int64_t> {
      auto it = config.find(key);
      if (it == config.end() || it->is_null()) return std::nullopt;
      const nlohmann::json& value =
          it->is_object() && it->contains("content") ? (*it)["content"] : *it;
      check(value.is_string(), "text::bpe", "{}: {} must be a string, got {}", file, key,
            it->dump());
      for (size_t i = 0; i < v.tokens.size(); ++i) {
        if (v.tokens[i] == value.get<std::string>()) return static_cast<int64_t>(i);
      }
      fail("text::bpe", "{}: {} {} is not in the vocabulary", file, key, it->dump());
    };
    if (auto pad = token("pad_token")) v.pad_id = pad;
    if (auto eos = token("eos_token")) v.eos_id = eos;
    if (!v.bos_id) v.bos_id = token("bos_token");
    if (!v.unk_id) v.unk_id = token("unk_token");
  }

  static uint64_t pair_key(int64_t left, int64_t right) {
    return (static_cast<uint64_t>(left) << 32) | static_cast<uint64_t>(right);
  }

  static bool is_numeric(char32_t cp) {
    // Rust's char::is_numeric, which the Digits pre-tokenizer uses: categories Nd, Nl and No.
    const auto c = unicode::category(cp);
    return c == UTF8PROC_CATEGORY_ND || c == UTF8PROC_CATEGORY_NL || c == UTF8PROC_CATEGORY_NO;
  }

  void split(const Step& step, std::string piece, std::vector<std::string>& out) const {
    using Kind = BpePreTokenizer::Step::Kind;
    if (piece.empty()) return;
    switch (step.spec.kind) {
      case Kind::digits: {
        // Cuts before and after each numeric character (or run of them).
        const std::u32string chars = unicode::decode_utf8(piece);
        size_t start = 0;
        size_t at = 0;
        bool previous_numeric = false;
        for (char32_t cp : chars) {
          const bool numeric = is_numeric(cp);
          if (at > start &&
              (numeric != previous_numeric || (numeric && step.spec.individual_digits))) {
            out.push_back(piece.substr(start, at - start));
            start = at;
          }
          previous_numeric = numeric;
          at += cp < 0x80 ? 1 : cp < 0x800 ? 2 : cp < 0x10000 ? 3 : 4;
        }
        out.push_back(piece.substr(start));
        return;
      }
      case Kind::split: {
        size_t gap = 0;
        step.pattern->for_each_match(piece, [&](size_t begin, size_t end) {
          if (begin > gap) out.push_back(piece.substr(gap, begin - gap));
          if (!step.spec.remove_matches) out.push_back(piece.substr(begin, end - begin));
          gap = end;
        });
        if (gap < piece.size()) out.push_back(piece.substr(gap));
        return;
      }
      case Kind::byte_level: {
        if (step.spec.add_prefix_space && piece.front() != ' ') piece.insert(0, 1, ' ');
        if (!step.pattern) {
          out.push_back(std::move(piece));
          return;
        }
        size_t gap = 0;
        step.pattern->for_each_match(piece, [&](size_t begin, size_t end) {
          if (begin > gap) out.push_back(piece.substr(gap, begin - gap));
          out.push_back(piece.substr(begin, end - begin));
          gap = end;
        });
        if (gap < piece.size()) out.push_back(piece.substr(gap));
        return;
      }
    }
  }

  // BPE on one piece: start from one symbol per byte and merge, lowest rank first and leftmost
  // among equal ranks, until no adjacent pair has a merge. A heap keeps long pieces (a
  // 5,000-character run of one letter) at O(n log n).
  void merge(const std::string& piece, std::vector<int64_t>& ids) const {
    if (piece.empty()) return;
    if (ignore_merges_) {
      std::string spelled;
      for (unsigned char b : piece) unicode::append_utf8(detail::byte_chars()[b], spelled);
      if (auto it = index_.find(spelled); it != index_.end()) {
        ids.push_back(it->second);
        return;
      }
    }
    struct Symbol {
      int64_t id;
      int64_t prev;
      int64_t next;
      bool alive;
    };
    std::vector<Symbol> symbols;
    symbols.reserve(piece.size());
    bool after_unk = false;
    for (unsigned char b : piece) {
      int64_t id = byte_ids_[b];
      // A byte without a token (SmolLM2 has none for 0x04, 0xF1 and others) is left out, as
      // llama.cpp and the tokenizers library do, unless the model says it becomes unk; the
      // neighbours of one left out meet and may merge.
      if (id < 0) {
        if (byte_unk_ < 0 || (fuse_unk_ && after_unk)) continue;
        id = byte_unk_;
      }
      after_unk = byte_ids_[b] < 0;
      const auto i = static_cast<int64_t>(symbols.size());
      symbols.push_back({id, i - 1, i + 1, true});
    }
    if (symbols.empty()) return;
    symbols.back().next = -1;
    struct Candidate {
      int64_t rank;
      int64_t pos;
      int64_t left;
      int64_t right;
      bool operator>(const Candidate& o) const {
        return rank != o.rank ? rank > o.rank : pos > o.pos;
      }
    };
    std::priority_queue<Candidate, std::vector<Candidate>, std::greater<Candidate>> queue;
    auto consider = [&](int64_t pos) {
      if (pos < 0) return;
      const int64_t next = symbols[static_cast<size_t>(pos)].next;
      if (next < 0) return;
      const int64_t left = symbols[static_cast<size_t>(pos)].id;
      const int64_t right = symbols[static_cast<size_t>(next)].id;
      auto it = merges_.find(pair_key(left, right));
      if (it != merges_.end()) queue.push({it->second.rank, pos, left, right});
    };
    for (int64_t i = 0; i + 1 < static_cast<int64_t>(symbols.size()); ++i) consider(i);
    while (!queue.empty()) {
      const Candidate c = queue.top();
      queue.pop();
      auto& s = symbols[static_cast<size_t>(c.pos)];
      // Stale: one side was merged into something else since this pair was queued.
      if (!s.alive || s.id != c.left || s.next < 0) continue;
      auto& t = symbols[static_cast<size_t>(s.next)];
      if (t.id != c.right) continue;
      s.id = merges_.at(pair_key(c.left, c.right)).id;
      t.alive = false;
      s.next = t.next;
      if (s.next >= 0) symbols[static_cast<size_t>(s.next)].prev = c.pos;
      consider(s.prev);
      consider(c.pos);
    }
    for (const auto& s : symbols) {
      if (s.alive) ids.push_back(s.id);
    }
  }

  std::string source_;
  std::vector<std::string> tokens_;
  std::vector<std::string> bytes_;  // what each token decodes to
  std::unordered_map<std::string, int64_t> index_;
  std::array<int64_t, 256> byte_ids_{};
  std::unordered_map<uint64_t, Merge> merges_;
  std::unordered_set<int64_t> decode_skips_;
  std::vector<Step> steps_;
  bool ignore_merges_ = false;
  bool fuse_unk_ = false;
  int64_t unk_ = -1;
  int64_t byte_unk_ = -1;  // what a byte without a token becomes (-1: left out)
};

}  // namespace text
PEFT_NAMESPACE_END
