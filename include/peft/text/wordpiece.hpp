#pragma once

// BERT's tokenizer: basic tokenization (cleaning, CJK splitting, lower-casing, accent stripping,
// punctuation splitting) followed by greedy longest-match-first WordPiece, and the encoding of
// single sentences and sentence pairs into model inputs. Token ids match Hugging Face's
// BertTokenizer for the same vocab.txt and tokenizer_config.json.

#include <torch/arg.h>
#include <torch/types.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include <peft/config.hpp>
#include <peft/core/error.hpp>
#include <peft/text/tokenizer.hpp>
#include <peft/text/unicode.hpp>

PEFT_NAMESPACE_BEGIN
namespace text {

/// How text is split into tokens. The defaults are those of uncased BERT.
struct WordPieceOptions {
  /// Lower-case the text (and, unless strip_accents says otherwise, strip accents).
  TORCH_ARG(bool, do_lower_case) = true;
  /// Strip accents (NFD, then drop nonspacing marks). Unset: do so exactly when lower-casing,
  /// as the original BERT does.
  TORCH_ARG(std::optional<bool>, strip_accents) = std::nullopt;
  /// Put spaces around CJK ideographs so that each becomes its own word.
  TORCH_ARG(bool, tokenize_chinese_chars) = true;
  /// Words longer than this many code points become the unknown token.
  TORCH_ARG(int64_t, max_input_chars_per_word) = 100;
  /// Length that encode() truncates to when EncodeOptions::max_length is unset; unset means no
  /// limit.
  TORCH_ARG(std::optional<int64_t>, model_max_length) = std::nullopt;
  /// The special tokens; all but mask_token must be in the vocabulary.
  TORCH_ARG(std::string, unk_token) = "[UNK]";
  TORCH_ARG(std::string, cls_token) = "[CLS]";
  TORCH_ARG(std::string, sep_token) = "[SEP]";
  TORCH_ARG(std::string, pad_token) = "[PAD]";
  TORCH_ARG(std::string, mask_token) = "[MASK]";
};

/// BERT's tokenizer. Immutable after construction, so one instance may be shared across threads.
///
///     auto tok = peft::text::WordPieceTokenizer::from_pretrained("models/all-MiniLM-L6-v2");
///     auto batch = tok.encode_batch({"Hello, world!", "Crème brûlée"});
///     // batch.input_ids: [[101, 7592, 1010, 2088, 999, 102, 0],
///     //                   [101, 13675, 21382, 7987, 9307, 2063, 102]]
class WordPieceTokenizer final : public Tokenizer {
 public:
  /// Loads `folder/vocab.txt` and, if present, `folder/tokenizer_config.json` (do_lower_case,
  /// strip_accents, tokenize_chinese_chars, model_max_length and the special tokens).
  static WordPieceTokenizer from_pretrained(const std::filesystem::path& folder) {
    namespace fs = std::filesystem;
    check(fs::is_directory(folder), "wordpiece", "model folder {} does not exist", folder.string());
    WordPieceOptions options;
    auto config = folder / "tokenizer_config.json";
    if (fs::exists(config)) options = read_config(config);
    auto vocab = folder / "vocab.txt";
    return WordPieceTokenizer(read_vocab(vocab), std::move(options), vocab.string());
  }

  /// Reads a vocab.txt: one token per line, the id of a token is its zero-based line number.
  /// Lines may end in "\n", "\r\n" or "\r"; a token listed twice keeps its last id, as in the
  /// reference.
  static std::vector<std::string> read_vocab(const std::filesystem::path& file) {
    std::ifstream in(file, std::ios::binary);
    check(static_cast<bool>(in), "wordpiece", "cannot open vocabulary file {}", file.string());
    std::string content((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    check(!in.bad(), "wordpiece", "error reading vocabulary file {}", file.string());
    std::vector<std::string> tokens;
    size_t at = 0;
    while (at < content.size()) {
      size_t end = std::min(content.find_first_of("\r\n", at), content.size());
      tokens.push_back(content.substr(at, end - at));
      if (end == content.size()) break;
      at = end + 1;
      if (content[end] == '\r' && at < content.size() && content[at] == '\n') ++at;
    }
    for (size_t i = 0; i < tokens.size(); ++i) {
      unicode::decode_utf8(tokens[i], fmt::format("{} line {}", file.string(), i + 1));
    }
    return tokens;
  }

  /// Reads the options in a Hugging Face tokenizer_config.json; absent keys keep their defaults.
  static WordPieceOptions read_config(const std::filesystem::path& file) {
    std::ifstream in(file, std::ios::binary);
    check(static_cast<bool>(in), "wordpiece", "cannot open {}", file.string());
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(in);
    } catch (const nlohmann::json::exception& e) {
      fail("wordpiece", "{} is not valid JSON: {}", file.string(), e.what());
    }
    check(j.is_object(), "wordpiece", "{} must hold a JSON object", file.string());
    WordPieceOptions options;
    auto flag = [&](const char* key) -> std::optional<bool> {
      auto it = j.find(key);
      if (it == j.end() || it->is_null()) return std::nullopt;
      check(it->is_boolean(), "wordpiece", "{}: \"{}\" must be true, false or null, got {}",
            file.string(), key, it->dump());
      return it->get<bool>();
    };
    auto token = [&](const char* key, std::string& out) {
      auto it = j.find(key);
      if (it == j.end() || it->is_null()) return;
      // Either a plain string or a serialized AddedToken {"content": "[CLS]", ...}.
      const nlohmann::json* value = &*it;
      if (it->is_object() && it->contains("content")) value = &(*it)["content"];
      check(value->is_string(), "wordpiece", "{}: \"{}\" must be a string, got {}", file.string(),
            key, it->dump());
      out = value->get<std::string>();
    };
    if (auto v = flag("do_lower_case")) options.do_lower_case(*v);
    options.strip_accents(flag("strip_accents"));
    if (auto v = flag("tokenize_chinese_chars")) options.tokenize_chinese_chars(*v);
    options.model_max_length(config_max_length(j, file.string(), "wordpiece"));
    token("unk_token", options.unk_token());
    token("cls_token", options.cls_token());
    token("sep_token", options.sep_token());
    token("pad_token", options.pad_token());
    token("mask_token", options.mask_token());
    return options;
  }

  /// A tokenizer over `vocab` (token i has id i). `source` names the vocabulary in errors.
  explicit WordPieceTokenizer(std::vector<std::string> vocab, WordPieceOptions options = {},
                              std::string source = "the vocabulary")
      : options_(std::move(options)), id_to_token_(std::move(vocab)) {
    check(!id_to_token_.empty(), "wordpiece", "{} is empty", source);
    check(options_.max_input_chars_per_word() > 0, "wordpiece",
          "max_input_chars_per_word must be positive, got {}", options_.max_input_chars_per_word());
    token_to_id_.reserve(id_to_token_.size());
    for (size_t i = 0; i < id_to_token_.size(); ++i) {
      token_to_id_[id_to_token_[i]] = static_cast<int64_t>(i);
    }
    auto require = [&](const std::string& token, const char* role) {
      auto it = token_to_id_.find(token);
      check(it != token_to_id_.end(), "wordpiece", "{} has no {} token \"{}\"", source, role,
            token);
      return it->second;
    };
    const int64_t unk = require(options_.unk_token(), "unknown");
    const int64_t cls = require(options_.cls_token(), "classifier");
    const int64_t sep = require(options_.sep_token(), "separator");
    const int64_t pad = require(options_.pad_token(), "padding");
    std::vector<std::string> specials;
    for (const auto* special : {&options_.unk_token(), &options_.cls_token(), &options_.sep_token(),
                                &options_.pad_token(), &options_.mask_token()}) {
      if (special->empty()) continue;
      if (std::find(specials.begin(), specials.end(), *special) == specials.end()) {
        specials.push_back(*special);
      }
    }
    set_specials(unk, cls, sep, pad, std::move(specials), options_.model_max_length());
  }

  /// The options in effect.
  const WordPieceOptions& options() const { return options_; }
  const char* kind() const override { return "wordpiece"; }
  /// Number of ids (lines of vocab.txt).
  int64_t vocab_size() const override { return static_cast<int64_t>(id_to_token_.size()); }

  /// Basic tokenization only: the words and punctuation marks WordPiece then splits further.
  /// Special tokens written in the text (e.g. "[SEP]") are kept whole.
  std::vector<std::string> basic_tokenize(std::string_view text) const {
    std::vector<std::string> words;
    for_each_chunk(text, [&](std::string_view chunk, size_t offset, bool special) {
      if (special) {
        words.emplace_back(chunk);
      } else {
        basic_tokenize_chunk(chunk, offset, words);
      }
    });
    return words;
  }

  /// The WordPiece tokens of `text`, e.g. "unaffable" -> {"un", "##aff", "##able"}.
  std::vector<std::string> tokenize(std::string_view text) const override {
    std::vector<std::string> tokens;
    std::vector<std::string> words;
    for_each_chunk(text, [&](std::string_view chunk, size_t offset, bool special) {
      if (special) {
        tokens.emplace_back(chunk);
        return;
      }
      words.clear();
      basic_tokenize_chunk(chunk, offset, words);
      for (const auto& word : words) wordpiece(word, tokens);
    });
    return tokens;
  }

  /// The id of `token`, or the unknown token's id if it is not in the vocabulary.
  int64_t token_to_id(const std::string& token) const override {
    auto it = token_to_id_.find(token);
    return it == token_to_id_.end() ? unk_id() : it->second;
  }

  /// The token with id `id`; an id outside [0, vocab_size) is a peft::Error.
  const std::string& id_to_token(int64_t id) const override {
    check(id >= 0 && id < vocab_size(), "wordpiece",
          "token id {} is outside the vocabulary [0, {})", id, vocab_size());
    return id_to_token_[static_cast<size_t>(id)];
  }

  /// Ids of `text` without special tokens.
  std::vector<int64_t> encode_ids(std::string_view text) const override {
    return convert_tokens_to_ids(tokenize(text));
  }

  /// Text back from ids: WordPiece continuations are glued on and spaces before punctuation
  /// removed, as Hugging Face's decode() does. Lossy: case, accents and spacing are not restored.
  std::string decode(const std::vector<int64_t>& ids,
                     bool skip_special_tokens = true) const override {
    std::string joined;
    for (auto id : ids) {
      const auto& token = id_to_token(id);
      if (skip_special_tokens && is_special_id(id)) continue;
      if (!joined.empty()) joined += ' ';
      joined += token;
    }
    std::string text = replace_all(joined, " ##", "");
    auto first = text.find_first_not_of(' ');
    if (first == std::string::npos) return {};
    text = text.substr(first, text.find_last_not_of(' ') - first + 1);
    for (const auto& [from, to] :
         std::initializer_list<std::pair<const char*, const char*>>{{" .", "."},
                                                                    {" ?", "?"},
                                                                    {" !", "!"},
                                                                    {" ,", ","},
                                                                    {" ' ", "'"},
                                                                    {" n't", "n't"},
                                                                    {" 'm", "'m"},
                                                                    {" 's", "'s"},
                                                                    {" 've", "'ve"},
                                                                    {" 're", "'re"}}) {
      text = replace_all(text, from, to);
    }
    return text;
  }

 private:
  static std::string replace_all(const std::string& s, std::string_view from, std::string_view to) {
    std::string out;
    size_t at = 0;
    for (size_t hit; (hit = s.find(from, at)) != std::string::npos; at = hit + from.size()) {
      out.append(s, at, hit - at);
      out.append(to);
    }
    out.append(s, at, std::string::npos);
    return out;
  }

  void basic_tokenize_chunk(std::string_view chunk, size_t offset,
                            std::vector<std::string>& words) const {
    namespace u = unicode;
    std::u32string cleaned;
    cleaned.reserve(chunk.size());
    for (char32_t cp : u::decode_utf8(chunk, "text", offset)) {
      if (cp == 0 || cp == 0xFFFD || u::is_control(cp)) continue;
      if (u::is_bert_whitespace(cp)) {
        cleaned.push_back(U' ');
      } else if (options_.tokenize_chinese_chars() && u::is_cjk_ideograph(cp)) {
        cleaned.push_back(U' ');
        cleaned.push_back(cp);
        cleaned.push_back(U' ');
      } else {
        cleaned.push_back(cp);
      }
    }
    // The reference composes first so that one character written two ways tokenizes one way.
    std::u32string text = u::nfc(cleaned);
    bool strip = options_.strip_accents().value_or(options_.do_lower_case());
    size_t at = 0;
    while (at < text.size()) {
      while (at < text.size() && u::is_split_space(text[at])) ++at;
      size_t end = at;
      while (end < text.size() && !u::is_split_space(text[end])) ++end;
      if (end == at) break;
      std::u32string word = text.substr(at, end - at);
      at = end;
      std::string utf8 = u::encode_utf8(word);
      if (is_special(utf8)) {
        words.push_back(std::move(utf8));
        continue;
      }
      if (options_.do_lower_case()) word = u::lower(word);
      if (strip) word = u::strip_accents(word);
      std::u32string piece;
      for (char32_t cp : word) {
        if (u::is_punctuation(cp)) {
          if (!piece.empty()) words.push_back(u::encode_utf8(piece));
          piece.clear();
          words.push_back(u::encode_utf8(std::u32string(1, cp)));
        } else {
          piece.push_back(cp);
        }
      }
      if (!piece.empty()) words.push_back(u::encode_utf8(piece));
    }
  }

  // Greedy longest-match-first; a word with any unmatched remainder becomes one unknown token.
  void wordpiece(const std::string& word, std::vector<std::string>& out) const {
    std::vector<size_t> offsets;  // byte offset of each code point, plus the end
    for (size_t i = 0; i < word.size(); ++i) {
      if ((static_cast<unsigned char>(word[i]) & 0xC0) != 0x80) offsets.push_back(i);
    }
    offsets.push_back(word.size());
    size_t chars = offsets.size() - 1;
    if (chars > static_cast<size_t>(options_.max_input_chars_per_word())) {
      out.push_back(options_.unk_token());
      return;
    }
    std::vector<std::string> pieces;
    std::string candidate;
    size_t start = 0;
    while (start < chars) {
      size_t end = chars;
      bool found = false;
      for (; end > start; --end) {
        candidate.assign(start > 0 ? "##" : "");
        candidate.append(word, offsets[start], offsets[end] - offsets[start]);
        if (token_to_id_.count(candidate) > 0) {
          found = true;
          break;
        }
      }
      if (!found) {
        out.push_back(options_.unk_token());
        return;
      }
      pieces.push_back(candidate);
      start = end;
    }
    for (auto& p : pieces) out.push_back(std::move(p));
  }

  WordPieceOptions options_;
  std::vector<std::string> id_to_token_;
  std::unordered_map<std::string, int64_t> token_to_id_;
};

}  // namespace text
PEFT_NAMESPACE_END
