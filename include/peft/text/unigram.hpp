#pragma once

// SentencePiece's unigram tokenizer as Hugging Face `tokenizers` runs it from a tokenizer.json
// (XLM-RoBERTa, multilingual-e5, T5-style vocabularies): normalise, turn spaces into the
// metaspace "▁", split into words, and cut each word into the pieces whose scores sum highest
// (Viterbi). Ids match the `tokenizers` library for the tokenizer.json features listed on
// UnigramTokenizer; anything else in the file is refused with an error naming it.

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <limits>
#include <optional>
#include <regex>
#include <string>
#include <string_view>
#include <unordered_map>
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

/// A SentencePiece unigram tokenizer read from a Hugging Face tokenizer.json.
///
/// Supported there: model `Unigram` (byte_fallback false); normalizer null, `Replace` (String or
/// Regex pattern; a Regex is matched on the UTF-8 bytes, so it must only use ASCII) or a
/// `Sequence` of them; pre_tokenizer `Metaspace` (prepend_scheme always/first/never, split or
/// not; the older add_prefix_space form too); post_processor `TemplateProcessing` of the shape
/// `cls $A sep` / `cls $A sep... $B sep`, `RobertaProcessing` or `BertProcessing`; added tokens
/// that are not normalised (lstrip/rstrip honoured). Unknown characters become one unknown
/// token per run, as the library's fuse_unk does.
///
///     auto tok = peft::text::UnigramTokenizer::from_pretrained(folder);  // has tokenizer.json
///     tok.tokenize("我爱自然语言处理");  // {"▁我", "爱", "自然", "语言", "处理"}
class UnigramTokenizer final : public Tokenizer {
 public:
  /// Reads `folder/tokenizer.json`, and model_max_length and pad_token from
  /// `folder/tokenizer_config.json` when present.
  static UnigramTokenizer from_pretrained(const std::filesystem::path& folder) {
    namespace fs = std::filesystem;
    check(fs::is_directory(folder), "unigram", "model folder {} does not exist", folder.string());
    const auto file = folder / "tokenizer.json";
    UnigramTokenizer tok(io::read_json(file, "unigram"), file.string());
    const auto config = folder / "tokenizer_config.json";
    if (fs::exists(config)) tok.apply_config(io::read_json(config, "unigram"), config.string());
    return tok;
  }

  /// A tokenizer from the parsed content of a tokenizer.json; `source` names it in errors.
  explicit UnigramTokenizer(const nlohmann::json& j, std::string source = "tokenizer.json")
      : source_(std::move(source)) {
    check(j.is_object(), "unigram", "{}: expected a JSON object", source_);
    read_model(field(j, "model", "the file"));
    read_added_tokens(j);
    if (auto it = j.find("normalizer"); it != j.end() && !it->is_null()) read_normalizer(*it);
    read_pre_tokenizer(j.contains("pre_tokenizer") ? j["pre_tokenizer"] : nlohmann::json());
    read_post_processor(j.contains("post_processor") ? j["post_processor"] : nlohmann::json());
    install_specials(std::nullopt);
  }

  const char* kind() const override { return "unigram"; }
  int64_t vocab_size() const override { return static_cast<int64_t>(pieces_.size()); }

  int64_t token_to_id(const std::string& token) const override {
    auto it = index_.find(token);
    return it == index_.end() ? unk_ : it->second;
  }

  const std::string& id_to_token(int64_t id) const override {
    check(id >= 0 && id < vocab_size(), "unigram", "token id {} is outside the vocabulary [0, {})",
          id, vocab_size());
    return pieces_[static_cast<size_t>(id)];
  }

  std::vector<int64_t> encode_ids(std::string_view text) const override {
    std::vector<int64_t> ids;
    struct Chunk {
      std::string_view text;
      size_t offset;
      bool special;
    };
    std::vector<Chunk> chunks;
    for_each_chunk(text, [&](std::string_view chunk, size_t offset, bool special) {
      chunks.push_back({chunk, offset, special});
    });
    for (size_t c = 0; c < chunks.size(); ++c) {
      auto [chunk, offset, special] = chunks[c];
      if (special) {
        ids.push_back(index_.at(std::string(chunk)));
        continue;
      }
      // Added tokens with lstrip/rstrip swallow the whitespace beside them.
      if (c + 1 < chunks.size() && chunks[c + 1].special && strips(chunks[c + 1].text, true)) {
        chunk = trim_right(chunk);
      }
      if (c > 0 && chunks[c - 1].special && strips(chunks[c - 1].text, false)) {
        chunk = trim_left(chunk);
      }
      if (chunk.empty()) continue;
      // prepend_scheme "first" marks only the text at the very start of the input.
      segment(chunk, offset == 0, ids);
    }
    return ids;
  }

  /// Pieces joined, the metaspace turned back into spaces, the prepended one removed.
  std::string decode(const std::vector<int64_t>& ids,
                     bool skip_special_tokens = true) const override {
    std::string joined;
    for (auto id : ids) {
      if (skip_special_tokens && is_special_id(id)) continue;
      joined += id_to_token(id);
    }
    std::string out;
    for (size_t at = 0; at < joined.size();) {
      if (joined.compare(at, replacement_.size(), replacement_) == 0) {
        out += ' ';
        at += replacement_.size();
      } else {
        out += joined[at++];
      }
    }
    if (prepend_ != Prepend::never && !out.empty() && out.front() == ' ') out.erase(0, 1);
    return out;
  }

  /// The text after the normalizer, before the metaspace (for tests and debugging).
  std::string normalize(std::string_view text) const {
    return unicode::encode_utf8(normalized(unicode::decode_utf8(text, source_)));
  }

 private:
  enum class Prepend { always, first, never };

  struct Step {
    enum class Kind { map, literal, regex } kind = Kind::map;
    std::unordered_map<char32_t, std::u32string> map;  // one code point to its replacement
    std::u32string from, to;                           // literal replacement
    std::regex regex;                                  // on UTF-8 bytes
    std::string regex_to;
  };

  struct AddedToken {
    std::string content;
    bool lstrip = false;
    bool rstrip = false;
  };

  const nlohmann::json& field(const nlohmann::json& j, const char* key, const char* where) const {
    check(j.is_object() && j.contains(key), "unigram", "{}: {} has no \"{}\"", source_, where, key);
    return j.at(key);
  }

  std::string string_field(const nlohmann::json& j, const char* key, const char* where) const {
    const auto& v = field(j, key, where);
    check(v.is_string(), "unigram", "{}: \"{}\" of {} must be a string, got {}", source_, key,
          where, v.dump());
    return v.get<std::string>();
  }

  void read_model(const nlohmann::json& model) {
    const auto type = string_field(model, "type", "\"model\"");
    check(type == "Unigram", "unigram", "{}: model type \"{}\" is not a Unigram model", source_,
          type);
    if (auto it = model.find("byte_fallback"); it != model.end() && it->is_boolean()) {
      check(!it->get<bool>(), "unigram", "{}: Unigram models with byte_fallback are not supported",
            source_);
    }
    const auto& vocab = field(model, "vocab", "\"model\"");
    check(vocab.is_array() && !vocab.empty(), "unigram",
          "{}: \"model.vocab\" must be a non-empty array of [piece, score]", source_);
    pieces_.reserve(vocab.size());
    scores_.reserve(vocab.size());
    index_.reserve(vocab.size());
    for (size_t i = 0; i < vocab.size(); ++i) {
      const auto& e = vocab[i];
      check(e.is_array() && e.size() == 2 && e[0].is_string() && e[1].is_number(), "unigram",
            "{}: model.vocab[{}] must be [piece, score], got {}", source_, i, e.dump());
      auto piece = e[0].get<std::string>();
      check(!piece.empty(), "unigram", "{}: model.vocab[{}] is an empty piece", source_, i);
      unicode::decode_utf8(piece, fmt::format("{} model.vocab[{}]", source_, i));
      index_.emplace(piece, static_cast<int64_t>(i));
      max_piece_bytes_ = std::max(max_piece_bytes_, piece.size());
      pieces_.push_back(std::move(piece));
      scores_.push_back(e[1].get<double>());
    }
    const auto& unk = field(model, "unk_id", "\"model\"");
    check(unk.is_number_integer() && unk.get<int64_t>() >= 0 &&
              unk.get<int64_t>() < static_cast<int64_t>(pieces_.size()),
          "unigram", "{}: model.unk_id must be an id in the vocabulary, got {}", source_,
          unk.dump());
    unk_ = unk.get<int64_t>();
    double min_score = *std::min_element(scores_.begin(), scores_.end());
    unk_score_ = min_score - 10.0;  // SentencePiece's penalty for an unknown character
  }

  void read_added_tokens(const nlohmann::json& j) {
    auto it = j.find("added_tokens");
    if (it == j.end() || it->is_null()) return;
    check(it->is_array(), "unigram", "{}: \"added_tokens\" must be an array", source_);
    for (const auto& t : *it) {
      AddedToken added;
      added.content = string_field(t, "content", "an added token");
      auto flag = [&](const char* key) {
        auto f = t.find(key);
        return f != t.end() && f->is_boolean() && f->get<bool>();
      };
      check(!flag("single_word"), "unigram",
            "{}: added token \"{}\" has single_word, which is not supported", source_,
            added.content);
      check(!flag("normalized"), "unigram",
            "{}: added token \"{}\" is matched on normalised text, which is not supported", source_,
            added.content);
      added.lstrip = flag("lstrip");
      added.rstrip = flag("rstrip");
      auto id = field(t, "id", "an added token");
      check(id.is_number_integer() && id.get<int64_t>() >= 0 &&
                id.get<int64_t>() < static_cast<int64_t>(pieces_.size()) &&
                pieces_[id.get<size_t>()] == added.content,
            "unigram", "{}: added token \"{}\" has id {}, which is not its id in the vocabulary",
            source_, added.content, id.dump());
      added_.push_back(std::move(added));
    }
  }

  void read_normalizer(const nlohmann::json& n) {
    const auto type = string_field(n, "type", "\"normalizer\"");
    if (type == "Sequence") {
      const auto& list = field(n, "normalizers", "the Sequence normalizer");
      check(list.is_array(), "unigram", "{}: \"normalizers\" must be an array", source_);
      for (const auto& item : list) read_normalizer(item);
      return;
    }
    check(type == "Replace", "unigram",
          "{}: normalizer \"{}\" is not supported (Replace and Sequence are)", source_, type);
    const auto& pattern = field(n, "pattern", "the Replace normalizer");
    const auto content = string_field(n, "content", "the Replace normalizer");
    if (pattern.contains("Regex")) {
      const auto re = string_field(pattern, "Regex", "a Replace pattern");
      for (unsigned char ch : re) {
        check(ch < 0x80, "unigram",
              "{}: Replace regex \"{}\" uses non-ASCII characters, which are not supported",
              source_, re);
      }
      Step step;
      step.kind = Step::Kind::regex;
      try {
        step.regex = std::regex(re, std::regex::ECMAScript | std::regex::optimize);
      } catch (const std::regex_error& e) {
        fail("unigram", "{}: Replace regex \"{}\" is not valid: {}", source_, re, e.what());
      }
      step.regex_to = content;
      steps_.push_back(std::move(step));
      return;
    }
    const auto from =
        unicode::decode_utf8(string_field(pattern, "String", "a Replace pattern"), source_);
    const auto to = unicode::decode_utf8(content, source_);
    check(!from.empty(), "unigram", "{}: a Replace normalizer has an empty pattern", source_);
    // Consecutive one-code-point replacements fuse into one table lookup, which is exactly the
    // same as running them in turn as long as no replacement is rewritten by a later rule.
    if (from.size() == 1 && !steps_.empty() && steps_.back().kind == Step::Kind::map) {
      auto& map = steps_.back().map;
      bool safe = map.count(from[0]) == 0;
      for (const auto& [key, out] : map) safe = safe && out.find(from[0]) == std::u32string::npos;
      if (safe) {
        map.emplace(from[0], to);
        return;
      }
    }
    Step step;
    if (from.size() == 1) {
      step.kind = Step::Kind::map;
      step.map.emplace(from[0], to);
    } else {
      step.kind = Step::Kind::literal;
      step.from = from;
      step.to = to;
    }
    steps_.push_back(std::move(step));
  }

  void read_pre_tokenizer(const nlohmann::json& p) {
    check(p.is_object(), "unigram", "{}: a Unigram tokenizer needs a Metaspace pre_tokenizer",
          source_);
    const auto type = string_field(p, "type", "\"pre_tokenizer\"");
    check(type == "Metaspace", "unigram",
          "{}: pre_tokenizer \"{}\" is not supported (Metaspace is)", source_, type);
    replacement_ = string_field(p, "replacement", "the Metaspace pre_tokenizer");
    check(unicode::decode_utf8(replacement_, source_).size() == 1, "unigram",
          "{}: the Metaspace replacement must be one character", source_);
    if (auto it = p.find("prepend_scheme"); it != p.end() && it->is_string()) {
      const auto scheme = it->get<std::string>();
      if (scheme == "always") {
        prepend_ = Prepend::always;
      } else if (scheme == "first") {
        prepend_ = Prepend::first;
      } else if (scheme == "never") {
        prepend_ = Prepend::never;
      } else {
        fail("unigram", "{}: Metaspace prepend_scheme \"{}\" is unknown", source_, scheme);
      }
    } else if (auto add = p.find("add_prefix_space"); add != p.end() && add->is_boolean()) {
      prepend_ = add->get<bool>() ? Prepend::always : Prepend::never;
    }
    if (auto it = p.find("split"); it != p.end() && it->is_boolean()) split_ = it->get<bool>();
  }

  int64_t special_id(const nlohmann::json& value, const char* what) const {
    // RobertaProcessing/BertProcessing write [token, id]; TemplateProcessing names the token.
    std::string token = value.is_array() && !value.empty() && value[0].is_string()
                            ? value[0].get<std::string>()
                            : (value.is_string() ? value.get<std::string>() : std::string());
    auto it = index_.find(token);
    check(it != index_.end(), "unigram",
          "{}: the post_processor's {} token {} is not in the "
          "vocabulary",
          source_, what, value.dump());
    return it->second;
  }

  void read_post_processor(const nlohmann::json& p) {
    check(p.is_object(), "unigram",
          "{}: no post_processor: the special tokens around a sentence are unknown", source_);
    const auto type = string_field(p, "type", "\"post_processor\"");
    if (type == "RobertaProcessing" || type == "BertProcessing") {
      cls_ = special_id(field(p, "cls", "the post_processor"), "cls");
      sep_ = special_id(field(p, "sep", "the post_processor"), "sep");
      pair_ = type == "RobertaProcessing" ? PairLayout{2, 0, true} : PairLayout{1, 1, true};
      return;
    }
    check(type == "TemplateProcessing", "unigram",
          "{}: post_processor \"{}\" is not supported (TemplateProcessing, RobertaProcessing and "
          "BertProcessing are)",
          source_, type);
    // Flattens a template into (is_sequence, token or sequence id, type id).
    struct Item {
      bool sequence;
      std::string id;
      int64_t type_id;
    };
    auto items = [&](const char* key) {
      std::vector<Item> out;
      for (const auto& piece : field(p, key, "the TemplateProcessing post_processor")) {
        bool sequence = piece.contains("Sequence");
        const auto& body = sequence ? piece["Sequence"] : field(piece, "SpecialToken", "a piece");
        out.push_back({sequence, string_field(body, "id", "a template piece"),
                       body.value("type_id", int64_t{0})});
      }
      return out;
    };
    const auto single = items("single");
    const auto pair = items("pair");
    auto unsupported = [&]() {
      fail("unigram",
           "{}: TemplateProcessing {} is not of the supported shape `cls $A sep` / "
           "`cls $A sep... $B sep`",
           source_, p.dump().substr(0, 200));
    };
    if (single.size() != 3 || single[0].sequence || !single[1].sequence || single[2].sequence ||
        single[0].type_id != 0 || single[1].type_id != 0 || single[2].type_id != 0) {
      unsupported();
    }
    cls_ = special_id(single[0].id, "cls");
    sep_ = special_id(single[2].id, "sep");
    // pair: cls $A sep{k} $B sep, $A and what precedes it type 0, $B and the last sep type t.
    if (pair.size() < 5 || pair[0].sequence || pair[0].id != single[0].id || !pair[1].sequence ||
        pair[1].id != "A" || !pair[pair.size() - 2].sequence || pair[pair.size() - 2].id != "B" ||
        pair.back().sequence || pair.back().id != single[2].id) {
      unsupported();
    }
    const size_t between = pair.size() - 4;
    for (size_t i = 2; i < 2 + between; ++i) {
      if (pair[i].sequence || pair[i].id != single[2].id || pair[i].type_id != 0) unsupported();
    }
    const int64_t second = pair[pair.size() - 2].type_id;
    if (pair[0].type_id != 0 || pair[1].type_id != 0 || pair.back().type_id != second) {
      unsupported();
    }
    pair_ = PairLayout{static_cast<int64_t>(between), second, true};
  }

  void apply_config(const nlohmann::json& config, const std::string& file) {
    check(config.is_object(), "unigram", "{} must hold a JSON object", file);
    const auto max_length = config_max_length(config, file, "unigram");
    if (auto it = config.find("pad_token"); it != config.end() && !it->is_null()) {
      const nlohmann::json& value =
          it->is_object() && it->contains("content") ? (*it)["content"] : *it;
      check(value.is_string() && index_.count(value.get<std::string>()) > 0, "unigram",
            "{}: pad_token {} is not in the vocabulary", file, it->dump());
      pad_ = index_.at(value.get<std::string>());
    }
    install_specials(max_length);
  }

  void install_specials(std::optional<int64_t> max_length) {
    if (pad_ < 0) {
      auto it = index_.find("<pad>");
      pad_ = it == index_.end() ? unk_ : it->second;
    }
    std::vector<std::string> specials;
    for (const auto& a : added_) specials.push_back(a.content);
    set_specials(unk_, cls_, sep_, pad_, std::move(specials), max_length, pair_);
  }

  bool strips(std::string_view special, bool left) const {
    for (const auto& a : added_) {
      if (a.content == special) return left ? a.lstrip : a.rstrip;
    }
    return false;
  }

  static bool is_space(char ch) {
    return ch == ' ' || ch == '\t' || ch == '\n' || ch == '\r' || ch == '\f' || ch == '\v';
  }
  static std::string_view trim_right(std::string_view s) {
    while (!s.empty() && is_space(s.back())) s.remove_suffix(1);
    return s;
  }
  static std::string_view trim_left(std::string_view s) {
    while (!s.empty() && is_space(s.front())) s.remove_prefix(1);
    return s;
  }

  std::u32string normalized(std::u32string text) const {
    for (const auto& step : steps_) {
      switch (step.kind) {
        case Step::Kind::map: {
          std::u32string out;
          out.reserve(text.size());
          for (char32_t cp : text) {
            auto it = step.map.find(cp);
            if (it == step.map.end()) {
              out.push_back(cp);
            } else {
              out += it->second;
            }
          }
          text = std::move(out);
          break;
        }
        case Step::Kind::literal: {
          std::u32string out;
          size_t at = 0;
          for (size_t hit; (hit = text.find(step.from, at)) != std::u32string::npos;
               at = hit + step.from.size()) {
            out.append(text, at, hit - at);
            out += step.to;
          }
          out.append(text, at, std::u32string::npos);
          text = std::move(out);
          break;
        }
        case Step::Kind::regex: {
          auto utf8 = unicode::encode_utf8(text);
          text = unicode::decode_utf8(std::regex_replace(utf8, step.regex, step.regex_to), source_);
          break;
        }
      }
    }
    return text;
  }

  // Normalises one stretch of text between added tokens and appends its pieces' ids.
  void segment(std::string_view chunk, bool at_start, std::vector<int64_t>& ids) const {
    const std::u32string text = normalized(unicode::decode_utf8(chunk, "text"));
    if (text.empty()) return;
    const char32_t meta = unicode::decode_utf8(replacement_, source_)[0];
    std::u32string spaced;
    spaced.reserve(text.size() + 1);
    const bool prepend = prepend_ == Prepend::always || (prepend_ == Prepend::first && at_start);
    if (prepend && text.front() != meta && text.front() != U' ') spaced.push_back(meta);
    for (char32_t cp : text) spaced.push_back(cp == U' ' ? meta : cp);
    if (!split_) {
      viterbi(unicode::encode_utf8(spaced), ids);
      return;
    }
    // Each word starts at a metaspace (Hugging Face's MergedWithNext split).
    size_t start = 0;
    for (size_t i = 1; i <= spaced.size(); ++i) {
      if (i == spaced.size() || spaced[i] == meta) {
        viterbi(unicode::encode_utf8(std::u32string_view(spaced).substr(start, i - start)), ids);
        start = i;
      }
    }
  }

  // The highest-scoring cut of `word` into pieces; a character no piece covers is unknown, and a
  // run of unknown characters gives one unknown id.
  void viterbi(const std::string& word, std::vector<int64_t>& ids) const {
    std::vector<size_t> starts;  // byte offset of each character, plus the end
    for (size_t i = 0; i < word.size(); ++i) {
      if ((static_cast<unsigned char>(word[i]) & 0xC0) != 0x80) starts.push_back(i);
    }
    starts.push_back(word.size());
    const size_t n = starts.size() - 1;
    constexpr double kNone = -std::numeric_limits<double>::infinity();
    std::vector<double> best(n + 1, kNone);
    std::vector<int64_t> piece(n + 1, -1);
    std::vector<size_t> from(n + 1, 0);
    best[0] = 0;
    const std::string_view view(word);
    for (size_t i = 0; i < n; ++i) {
      if (best[i] == kNone) continue;
      bool single = false;
      for (size_t e = i + 1; e <= n && starts[e] - starts[i] <= max_piece_bytes_; ++e) {
        auto it = index_.find(std::string(view.substr(starts[i], starts[e] - starts[i])));
        if (it == index_.end()) continue;
        if (e == i + 1) single = true;
        const double score = best[i] + scores_[static_cast<size_t>(it->second)];
        if (best[e] == kNone || score > best[e]) {
          best[e] = score;
          piece[e] = it->second;
          from[e] = i;
        }
      }
      if (!single) {
        const double score = best[i] + unk_score_;
        if (best[i + 1] == kNone || score > best[i + 1]) {
          best[i + 1] = score;
          piece[i + 1] = unk_;
          from[i + 1] = i;
        }
      }
    }
    std::vector<int64_t> path;
    for (size_t e = n; e > 0; e = from[e]) path.push_back(piece[e]);
    for (size_t i = path.size(); i-- > 0;) {
      if (path[i] == unk_ && i + 1 < path.size() && path[i + 1] == unk_) continue;
      ids.push_back(path[i]);
    }
  }

  std::string source_;
  std::vector<std::string> pieces_;
  std::vector<double> scores_;
  std::unordered_map<std::string, int64_t> index_;
  size_t max_piece_bytes_ = 0;
  int64_t unk_ = 0;
  double unk_score_ = 0;
  std::vector<AddedToken> added_;
  std::vector<Step> steps_;
  std::string replacement_ = "\u2581";
  Prepend prepend_ = Prepend::always;
  bool split_ = true;
  int64_t cls_ = 0;
  int64_t sep_ = 0;
  int64_t pad_ = -1;
  PairLayout pair_;
};

}  // namespace text
PEFT_NAMESPACE_END
