#pragma once

// What every tokenizer shares: model inputs built from token ids (special tokens around one
// sentence or a pair, longest-first truncation, padded batches) and special tokens written in the
// text kept whole. A tokenizer supplies the ids of plain text and its vocabulary; the model folder
// decides which one is used (text/load.hpp).

#include <torch/arg.h>
#include <torch/types.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_set>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include <peft/config.hpp>
#include <peft/core/error.hpp>

PEFT_NAMESPACE_BEGIN
namespace text {

/// How encode() and encode_batch() build model inputs.
struct EncodeOptions {
  /// Truncate so that each encoding, special tokens included, has at most max_length tokens.
  /// Pairs lose tokens from the longer sequence first (Hugging Face's "longest_first").
  TORCH_ARG(bool, truncation) = true;
  /// The length limit; unset uses the tokenizer's model_max_length.
  TORCH_ARG(std::optional<int64_t>, max_length) = std::nullopt;
  /// encode_batch() pads to max_length instead of to the longest encoding in the batch.
  TORCH_ARG(bool, pad_to_max_length) = false;
};

/// One encoded sentence or sentence pair, e.g. BERT's `[CLS] a [SEP]` / `[CLS] a [SEP] b [SEP]`
/// or XLM-R's `<s> a </s>` / `<s> a </s></s> b </s>`.
struct Encoding {
  std::vector<int64_t> input_ids;       ///< token ids, special tokens included
  std::vector<int64_t> token_type_ids;  ///< segment of each token (BERT: 1 for `b [SEP]`)
  std::vector<int64_t> attention_mask;  ///< 1 for every token (no padding in one encoding)
};

/// A padded batch; every tensor is int64 of shape [N, L] with L the longest encoding (or
/// max_length). Padding is on the right: input_ids = pad id, token_type_ids = 0, mask = 0.
struct BatchEncoding {
  torch::Tensor input_ids;
  torch::Tensor token_type_ids;
  torch::Tensor attention_mask;
};

/// `count` encodings, the i-th being `at(i)`, padded on the right to `length` tokens with
/// `pad_id` (token_type_ids and attention_mask 0) into [count, length] int64 tensors. Shared by
/// Tokenizer::pad and the batches formed from encodings kept between epochs
/// (peft::EncodedExamples).
template <class At>
BatchEncoding pad_encodings(size_t count, At&& at, size_t length, int64_t pad_id) {
  const auto n = static_cast<int64_t>(count);
  const auto l = static_cast<int64_t>(length);
  BatchEncoding out;
  out.input_ids = torch::full({n, l}, pad_id, torch::kLong);
  out.token_type_ids = torch::zeros({n, l}, torch::kLong);
  out.attention_mask = torch::zeros({n, l}, torch::kLong);
  auto* ids = out.input_ids.data_ptr<int64_t>();
  auto* types = out.token_type_ids.data_ptr<int64_t>();
  auto* mask = out.attention_mask.data_ptr<int64_t>();
  for (size_t i = 0; i < count; ++i) {
    const Encoding& e = at(i);
    std::copy(e.input_ids.begin(), e.input_ids.end(), ids + i * length);
    std::copy(e.token_type_ids.begin(), e.token_type_ids.end(), types + i * length);
    std::copy(e.attention_mask.begin(), e.attention_mask.end(), mask + i * length);
  }
  return out;
}

/// "model_max_length" of a parsed tokenizer_config.json: unset when absent, null or Hugging
/// Face's "no limit" sentinel (int(1e30)); an error naming `file` when not a positive number.
inline std::optional<int64_t> config_max_length(const nlohmann::json& config,
                                                const std::string& file, const char* kind) {
  auto it = config.find("model_max_length");
  if (it == config.end() || it->is_null()) return std::nullopt;
  check(it->is_number(), kind, "{}: \"model_max_length\" must be a number, got {}", file,
        it->dump());
  const double value = it->get<double>();
  check(value > 0, kind, "{}: \"model_max_length\" must be positive, got {}", file, it->dump());
  if (value >= 1e15) return std::nullopt;
  return static_cast<int64_t>(value);
}

/// How a sentence pair is laid out: `cls a sep [sep] b sep`.
struct PairLayout {
  /// Separators between the two sentences: 1 for BERT, 2 for (XLM-)RoBERTa.
  int64_t separators_between = 1;
  /// token_type_id of the second sentence and its final separator: 1 for BERT, 0 for RoBERTa.
  int64_t second_type_id = 1;
  /// Longest-first truncation of a pair can leave one token to give to either sentence once
  /// both are cut to half the room. false: the first keeps it (transformers' Python tokenizers,
  /// which cut the longer sentence token by token, the second when equal). true: the longer
  /// keeps it, the second when equal (the Rust `tokenizers` library, whose tokenizer.json files
  /// UnigramTokenizer reads).
  bool longer_keeps_odd = false;
  /// Whether an encoding starts with cls_id(). Decoders such as GPT-2 add nothing, or only a
  /// beginning-of-sequence token: cls_id() then plays its part.
  bool add_cls = true;
  /// Whether each sentence ends with sep_id() (and a pair has separators between its sentences).
  bool add_sep = true;
};

/// A tokenizer: text to ids, and ids to model inputs. Immutable after construction, so one
/// instance may be shared across threads. Subclasses: WordPieceTokenizer (BERT's vocab.txt),
/// UnigramTokenizer (SentencePiece unigram models in a Hugging Face tokenizer.json) and
/// BpeTokenizer (byte-level BPE: GPT-2, Llama 3, SmolLM2).
class Tokenizer {
 public:
  virtual ~Tokenizer() = default;

  /// Short name of the algorithm ("wordpiece", "unigram"); also the prefix of its errors.
  virtual const char* kind() const = 0;
  /// Number of ids.
  virtual int64_t vocab_size() const = 0;
  /// The ids of `text` without special tokens around it.
  virtual std::vector<int64_t> encode_ids(std::string_view text) const = 0;
  /// The tokens of `text` without special tokens around it (special tokens written in the text
  /// are kept whole): by default the tokens of encode_ids().
  virtual std::vector<std::string> tokenize(std::string_view text) const {
    std::vector<std::string> out;
    for (auto id : encode_ids(text)) out.push_back(id_to_token(id));
    return out;
  }
  /// The id of `token`, or unk_id() if it is not in the vocabulary.
  virtual int64_t token_to_id(const std::string& token) const = 0;
  /// The token with id `id`; an id outside [0, vocab_size) is a peft::Error.
  virtual const std::string& id_to_token(int64_t id) const = 0;
  /// Text back from ids (lossy: what normalisation removed is not restored).
  virtual std::string decode(const std::vector<int64_t>& ids,
                             bool skip_special_tokens = true) const = 0;

  int64_t unk_id() const { return unk_id_; }  ///< id of the unknown token
  int64_t cls_id() const { return cls_id_; }  ///< id of the token that starts an encoding
  int64_t sep_id() const { return sep_id_; }  ///< id of the separator token
  int64_t pad_id() const { return pad_id_; }  ///< id of the padding token
  /// Length encode() truncates to when EncodeOptions::max_length is unset (unset: no limit).
  std::optional<int64_t> model_max_length() const { return model_max_length_; }
  /// How sentence pairs are laid out.
  const PairLayout& pair_layout() const { return pair_; }
  /// Special tokens added by encode() to a sentence (2) or a pair (3 for BERT, 4 for XLM-R); 0 or
  /// 1 for decoders.
  int64_t special_tokens_added(bool pair) const {
    const int64_t seps = pair_.add_sep ? (pair ? 1 + pair_.separators_between : 1) : 0;
    return (pair_.add_cls ? 1 : 0) + seps;
  }

  /// Whether `token` is one of the special tokens.
  bool is_special(const std::string& token) const {
    return std::find(special_tokens_.begin(), special_tokens_.end(), token) !=
           special_tokens_.end();
  }
  /// Whether `id` is a special token's id.
  bool is_special_id(int64_t id) const { return special_ids_.count(id) > 0; }

  /// token_to_id() of each token.
  std::vector<int64_t> convert_tokens_to_ids(const std::vector<std::string>& tokens) const {
    std::vector<int64_t> ids;
    ids.reserve(tokens.size());
    for (const auto& t : tokens) ids.push_back(token_to_id(t));
    return ids;
  }

  /// id_to_token() of each id.
  std::vector<std::string> convert_ids_to_tokens(const std::vector<int64_t>& ids) const {
    std::vector<std::string> tokens;
    tokens.reserve(ids.size());
    for (auto id : ids) tokens.push_back(id_to_token(id));
    return tokens;
  }

  /// `cls text sep`, truncated as `options` says.
  Encoding encode(std::string_view text, const EncodeOptions& options = {}) const {
    return build(encode_ids(text), std::nullopt, options);
  }

  /// `cls text sep [sep] pair sep`, truncated longest-first as `options` says.
  Encoding encode(std::string_view text, std::string_view pair,
                  const EncodeOptions& options = {}) const {
    return build(encode_ids(text), encode_ids(pair), options);
  }

  /// Encodes each text and pads the batch on the right to its longest encoding.
  BatchEncoding encode_batch(const std::vector<std::string>& texts,
                             const EncodeOptions& options = {}) const {
    std::vector<Encoding> encodings;
    encodings.reserve(texts.size());
    for (const auto& t : texts) encodings.push_back(encode(t, options));
    return pad(encodings, options);
  }

  /// Encodes each (texts[i], pairs[i]) pair and pads the batch like encode_batch(texts).
  BatchEncoding encode_batch(const std::vector<std::string>& texts,
                             const std::vector<std::string>& pairs,
                             const EncodeOptions& options = {}) const {
    check(texts.size() == pairs.size(), kind(),
          "encode_batch got {} first sentences but {} second sentences", texts.size(),
          pairs.size());
    std::vector<Encoding> encodings;
    encodings.reserve(texts.size());
    for (size_t i = 0; i < texts.size(); ++i)
      encodings.push_back(encode(texts[i], pairs[i], options));
    return pad(encodings, options);
  }

  /// Pads encodings into [N, L] int64 tensors (L: the longest, or max_length when
  /// options.pad_to_max_length()).
  BatchEncoding pad(const std::vector<Encoding>& encodings,
                    const EncodeOptions& options = {}) const {
    size_t length = 0;
    for (const auto& e : encodings) length = std::max(length, e.input_ids.size());
    if (options.pad_to_max_length()) {
      auto limit = max_length(options);
      check(limit.has_value(), kind(), "pad_to_max_length needs max_length or a model_max_length");
      check(static_cast<size_t>(*limit) >= length, kind(),
            "an encoding has {} tokens, more than max_length {} to pad to (truncation is off)",
            length, *limit);
      length = static_cast<size_t>(*limit);
    }
    return pad_encodings(
        encodings.size(), [&](size_t i) -> const Encoding& { return encodings[i]; }, length,
        pad_id_);
  }

 protected:
  Tokenizer() = default;
  Tokenizer(const Tokenizer&) = default;
  Tokenizer(Tokenizer&&) = default;
  Tokenizer& operator=(const Tokenizer&) = default;
  Tokenizer& operator=(Tokenizer&&) = default;

  /// Sets the special ids, the special tokens kept whole in text, the length limit and the pair
  /// layout. Subclasses call it once their vocabulary is known.
  void set_specials(int64_t unk, int64_t cls, int64_t sep, int64_t pad,
                    std::vector<std::string> special_tokens, std::optional<int64_t> max_length,
                    PairLayout pair = {}) {
    unk_id_ = unk;
    cls_id_ = cls;
    sep_id_ = sep;
    pad_id_ = pad;
    special_tokens_ = std::move(special_tokens);
    special_ids_.clear();
    for (const auto& special : special_tokens_) special_ids_.insert(token_to_id(special));
    model_max_length_ = max_length;
    pair_ = pair;
    check(pair_.separators_between >= 1, kind(),
          "a sentence pair needs at least 1 separator between its sentences, got {}",
          pair_.separators_between);
    if (model_max_length_) {
      check(*model_max_length_ >= 2, kind(), "model_max_length must be at least 2, got {}",
            *model_max_length_);
    }
  }

  const std::vector<std::string>& special_tokens() const { return special_tokens_; }

  std::optional<int64_t> max_length(const EncodeOptions& options) const {
    return options.max_length() ? options.max_length() : model_max_length_;
  }

  // Calls f(piece, offset, is_special) on the text split around special tokens written in it; at
  // each position the longest special token starting there wins.
  template <class F>
  void for_each_chunk(std::string_view text, F&& f) const {
    size_t start = 0;
    size_t at = 0;
    while (at < text.size()) {
      size_t best = 0;
      for (const auto& special : special_tokens_) {
        if (special.size() > best && text.substr(at, special.size()) == special) {
          best = special.size();
        }
      }
      if (best == 0) {
        ++at;
        continue;
      }
      if (at > start) f(text.substr(start, at - start), start, false);
      f(text.substr(at, best), at, true);
      at += best;
      start = at;
    }
    if (start < text.size()) f(text.substr(start), start, false);
  }

 private:
  Encoding build(std::vector<int64_t> a, std::optional<std::vector<int64_t>> b,
                 const EncodeOptions& options) const {
    auto limit = max_length(options);
    const int64_t specials = special_tokens_added(b.has_value());
    if (options.truncation() && limit) {
      check(*limit >= specials, kind(), "max_length {} cannot hold the {} special tokens of a {}",
            *limit, specials, b ? "sentence pair" : "sentence");
      auto la = static_cast<int64_t>(a.size());
      auto lb = b ? static_cast<int64_t>(b->size()) : 0;
      int64_t remove = la + lb + specials - *limit;
      if (remove > 0 && !b) {
        a.resize(static_cast<size_t>(la - remove));
      } else if (remove > 0 && pair_.longer_keeps_odd) {
        // The shorter keeps all it has if that leaves the longer at least as much; otherwise
        // each gets half the room and the longer (the second when equal) the odd token.
        const int64_t room = *limit - specials;
        const bool first_longer = la > lb;
        int64_t shorter = first_longer ? lb : la;
        int64_t longer = room - shorter;
        if (shorter > longer) {
          shorter = room / 2;
          longer = room - shorter;
        }
        a.resize(static_cast<size_t>(first_longer ? longer : shorter));
        b->resize(static_cast<size_t>(first_longer ? shorter : longer));
      } else if (remove > 0) {
        // Take from the longer one until both are equal, then alternate starting with the second
        // sequence: the second loses the odd token (Hugging Face's longest_first).
        int64_t first = std::min(std::abs(la - lb), remove);
        int64_t rest = remove - first;
        int64_t from_a = rest / 2 + (la > lb ? first : 0);
        int64_t from_b = rest - rest / 2 + (la > lb ? 0 : first);
        a.resize(static_cast<size_t>(la - from_a));
        b->resize(static_cast<size_t>(lb - from_b));
      }
    }
    Encoding e;
    e.input_ids.reserve(a.size() + (b ? b->size() : 0) + static_cast<size_t>(specials));
    if (pair_.add_cls) e.input_ids.push_back(cls_id_);
    e.input_ids.insert(e.input_ids.end(), a.begin(), a.end());
    if (pair_.add_sep) e.input_ids.push_back(sep_id_);
    if (b && pair_.add_sep) {
      for (int64_t i = 1; i < pair_.separators_between; ++i) e.input_ids.push_back(sep_id_);
    }
    e.token_type_ids.assign(e.input_ids.size(), 0);
    if (b) {
      e.input_ids.insert(e.input_ids.end(), b->begin(), b->end());
      if (pair_.add_sep) e.input_ids.push_back(sep_id_);
      e.token_type_ids.resize(e.input_ids.size(), pair_.second_type_id);
    }
    e.attention_mask.assign(e.input_ids.size(), 1);
    return e;
  }

  std::vector<std::string> special_tokens_;
  std::unordered_set<int64_t> special_ids_;
  std::optional<int64_t> model_max_length_;
  PairLayout pair_;
  int64_t unk_id_ = 0;
  int64_t cls_id_ = 0;
  int64_t sep_id_ = 0;
  int64_t pad_id_ = 0;
};

}  // namespace text
PEFT_NAMESPACE_END
