#pragma once

// Prompt-based classification with a causal language model's own head (LM-BFF, PET).
//
// A *template* turns an input's named fields into a text with one blank ("{sentence} It was
// {mask}."); a *verbalizer* names one or more words per label ("terrible" / "great"). The
// label's score is what the language-model head says about its words at the blank; no new head
// is trained, so a handful of labelled examples (or none) is enough.
//
// A causal model reads left to right, so the words are scored on the text *before* the blank;
// text after it is kept for filled-in demonstrations (fill()) but does not change a score.
//
// Scores, and why:
// - A word of several tokens scores the **sum** of its tokens' log-probabilities: that is the
//   log-probability the model gives the word, so words of different lengths compete fairly as
//   the model's own alternatives. WordScore::mean (the average per token) is offered for
//   verbalizers whose long words would otherwise lose for their length alone.
// - A label with several words scores the log of the summed probabilities of its words
//   (logsumexp): the chance that the model says any of them.
// - Label probabilities are those scores renormalised over the labels (softmax), as LM-BFF and
//   PET do; the training loss is cross-entropy on them.
// - Regression (STS-B) follows LM-BFF: two words are the poles of the range [low, high]; the
//   prediction is low + (high - low) * P(high word), and the loss is cross-entropy against the
//   soft target ((high - y) / (high - low), (y - low) / (high - low)).
//
//     auto spec = peft::prompting::builtin_prompts("sst2").front();
//     auto clf = peft::prompting::PromptClassifier::from_pretrained(gguf_file, spec);
//     auto probs = clf.predict_proba({{{"sentence", "A gorgeous, witty film."}}});  // [1, 2]
//     peft::attach(*clf.model(), "lora", {{"r", 8}});   // then train on clf.loss(...)
//     clf.save("out/sst2-prompt");   // adapter + prompt_config.json
//     auto again = peft::prompting::PromptClassifier::load(gguf_file, "out/sst2-prompt");

#include <torch/nn/functional/loss.h>
#include <torch/types.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include <peft/config.hpp>
#include <peft/core/attach.hpp>
#include <peft/core/enum_names.hpp>
#include <peft/core/error.hpp>
#include <peft/data/example.hpp>
#include <peft/io/adapter_format.hpp>
#include <peft/io/hf_config.hpp>
#include <peft/io/safetensors.hpp>
#include <peft/models/llama.hpp>
#include <peft/text/load.hpp>
#include <peft/text/tokenizer.hpp>

PEFT_NAMESPACE_BEGIN

namespace prompting {

/// An input's named texts ("sentence", "sentence1", "sentence2", ...).
using Fields = std::map<std::string, std::string>;

/// The file save() writes next to the adapter.
inline constexpr const char* kPromptConfig = "prompt_config.json";

/// A text with named fields `{name}` (letters, digits, '_') and exactly one blank `{mask}`;
/// `{{` and `}}` stand for literal braces.
class Template {
 public:
  Template() = default;
  /// Parses `text`; a stray brace, an empty or malformed name, or a blank count other than one
  /// is a peft::Error that quotes the template and the position.
  explicit Template(std::string text) : text_(std::move(text)) { parse(); }

  const std::string& text() const { return text_; }
  /// Field names, each once, in order of first use.
  const std::vector<std::string>& fields() const { return fields_; }

  /// Throws unless every field of the template is in `known` (the fields the task's inputs
  /// have); `where` names the caller in the message.
  void check_fields(const std::vector<std::string>& known, std::string_view where) const {
    for (const auto& f : fields_) {
      if (std::find(known.begin(), known.end(), f) == known.end()) {
        fail("prompting",
             "{}: template \"{}\" uses the field {{{}}}, which the inputs do not have "
             "(they have: {})",
             where, text_, f, data::detail::join(known));
      }
    }
  }

  /// The text before the blank, fields filled from `f` (a field the template uses and `f`
  /// lacks is a peft::Error naming both).
  std::string before(const Fields& f) const { return render(before_, f); }
  /// The text after the blank.
  std::string after(const Fields& f) const { return render(after_, f); }
  /// The whole text with `word` in the blank (a filled-in demonstration).
  std::string fill(const Fields& f, const std::string& word) const {
    return render(before_, f) + word + render(after_, f);
  }

 private:
  struct Piece {
    bool field = false;
    std::string text;
  };

  void parse() {
    int blanks = 0;
    std::vector<Piece>* out = &before_;
    std::string literal;
    auto flush = [&] {
      if (!literal.empty()) out->push_back({false, literal});
      literal.clear();
    };
    for (size_t i = 0; i < text_.size(); ++i) {
      const char c = text_[i];
      if (c == '}') {
        check(i + 1 < text_.size() && text_[i + 1] == '}', "prompting",
              "template \"{}\": unmatched '}}' at character {} (write '}}}}' for a brace)", text_,
              i + 1);
        literal += '}';
        ++i;
        continue;
      }
      if (c != '{') {
        literal += c;
        continue;
      }
      if (i + 1 < text_.size() && text_[i + 1] == '{') {
        literal += '{';
        ++i;
        continue;
      }
      const auto close = text_.find('}', i);
      check(close != std::string::npos, "prompting",
            "template \"{}\": '{{' at character {} is never closed (write '{{{{' for a brace)",
            text_, i + 1);
      const std::string name = text_.substr(i + 1, close - i - 1);
      const bool valid = !name.empty() && std::all_of(name.begin(), name.end(), [](char ch) {
        return std::isalnum(static_cast<unsigned char>(ch)) != 0 || ch == '_';
      });
      check(valid, "prompting",
            "template \"{}\": \"{{{}}}\" at character {} is not a field name (letters, digits, "
            "'_')",
            text_, name, i + 1);
      flush();
      if (name == "mask") {
        ++blanks;
        out = &after_;
      } else {
        out->push_back({true, name});
        if (std::find(fields_.begin(), fields_.end(), name) == fields_.end())
          fields_.push_back(name);
      }
      i = close;
    }
    flush();
    check(blanks == 1, "prompting", "template \"{}\" has {} blanks {{mask}}; it needs exactly one",
          text_, blanks);
  }

  std::string render(const std::vector<Piece>& pieces, const Fields& f) const {
    std::string s;
    for (const auto& p : pieces) {
      if (!p.field) {
        s += p.text;
        continue;
      }
      auto it = f.find(p.text);
      if (it == f.end()) {
        std::vector<std::string> have;
        for (const auto& [k, v] : f) have.push_back(k);
        fail("prompting",
             "template \"{}\" uses the field {{{}}}, which this input does not have "
             "(it has: {})",
             text_, p.text, have.empty() ? std::string("none") : data::detail::join(have));
      }
      s += it->second;
    }
    return s;
  }

  std::string text_;
  std::vector<Piece> before_, after_;
  std::vector<std::string> fields_;
};

/// The words of each label, in class order.
struct Verbalizer {
  std::vector<std::string> labels;              ///< label names, class order
  std::vector<std::vector<std::string>> words;  ///< one or more words per label

  /// Checks that every label has at least one non-empty word.
  void validate(std::string_view where) const {
    check(!labels.empty() && labels.size() == words.size(), "prompting",
          "{}: a verbalizer needs words for each of its {} labels", where, labels.size());
    for (size_t c = 0; c < words.size(); ++c) {
      check(!words[c].empty(), "prompting", "{}: label \"{}\" has no words", where, labels[c]);
      for (const auto& w : words[c])
        check(!w.empty(), "prompting", "{}: label \"{}\" has an empty word", where, labels[c]);
    }
  }

  /// Parses "label=word|word,label=word" (labels by name, every one of `label_names`) or
  /// "word|word,word" (in class order).
  static Verbalizer parse(std::string_view spec, const std::vector<std::string>& label_names) {
    auto split = [](std::string_view s, char sep) {
      std::vector<std::string> out;
      size_t start = 0;
      while (true) {
        const auto end = s.find(sep, start);
        out.emplace_back(s.substr(start, end == std::string_view::npos ? s.npos : end - start));
        if (end == std::string_view::npos) break;
        start = end + 1;
      }
      return out;
    };
    Verbalizer v;
    v.labels = label_names;
    v.words.assign(label_names.size(), {});
    const auto items = split(spec, ',');
    check(items.size() == label_names.size(), "prompting",
          "verbalizer \"{}\" has {} entries; the task has {} labels ({})", spec, items.size(),
          label_names.size(), data::detail::join(label_names));
    for (size_t k = 0; k < items.size(); ++k) {
      std::string words = items[k];
      size_t c = k;
      if (const auto eq = items[k].find('='); eq != std::string::npos) {
        const auto name = items[k].substr(0, eq);
        const auto it = std::find(label_names.begin(), label_names.end(), name);
        check(it != label_names.end(), "prompting",
              "verbalizer \"{}\": unknown label \"{}\" (labels: {})", spec, name,
              data::detail::join(label_names));
        c = static_cast<size_t>(it - label_names.begin());
        check(v.words[c].empty(), "prompting", "verbalizer \"{}\": label \"{}\" given twice", spec,
              name);
        words = items[k].substr(eq + 1);
      }
      v.words[c] = split(words, '|');
    }
    v.validate(fmt::format("verbalizer \"{}\"", spec));
    return v;
  }

  nlohmann::ordered_json to_json() const {
    nlohmann::ordered_json j = nlohmann::ordered_json::object();
    for (size_t c = 0; c < labels.size(); ++c) j[labels[c]] = words[c];
    return j;
  }
};

/// How a word of several tokens is scored (see the header comment).
enum class WordScore { sum, mean };

constexpr EnumTable<WordScore, 2> enum_table(WordScore) {
  return {"word score", "prompting", {{{WordScore::sum, "sum"}, {WordScore::mean, "mean"}}}};
}
inline const char* to_string(WordScore s) {
  return enum_name(s);
}
inline WordScore word_score_from_string(const std::string& s) {
  return enum_from_name<WordScore>(s);
}

/// Where demonstrations come from (LM-BFF): none, a random labelled example of each class, or
/// one among the more similar half of each class to the input.
enum class DemoMode { none, random, similar };

constexpr EnumTable<DemoMode, 3> enum_table(DemoMode) {
  return {
      "demonstration mode",
      "prompting",
      {{{DemoMode::none, "none"}, {DemoMode::random, "random"}, {DemoMode::similar, "similar"}}}};
}
inline const char* to_string(DemoMode m) {
  return enum_name(m);
}
inline DemoMode demo_mode_from_string(const std::string& s) {
  return enum_from_name<DemoMode>(s);
}

/// A template and its verbalizer, and how to score and lay them out.
struct PromptSpec {
  Template pattern;
  Verbalizer verbalizer;
  WordScore word_score = WordScore::sum;
  /// For a regression task: the range [low, high] whose poles are the verbalizer's two labels.
  std::optional<std::array<double, 2>> regression;
  /// Between demonstrations, and between the last one and the input.
  std::string separator = "\n\n";
  /// Longest scored text in tokens; longer ones lose their oldest tokens (demonstrations first).
  int64_t max_length = 512;

  int64_t num_labels() const { return static_cast<int64_t>(verbalizer.labels.size()); }

  void validate(std::string_view where) const {
    verbalizer.validate(where);
    if (regression) {
      check(verbalizer.labels.size() == 2, "prompting",
            "{}: a regression verbalizer has two poles (low, high), not {}", where,
            verbalizer.labels.size());
      check((*regression)[0] < (*regression)[1], "prompting",
            "{}: regression range [{}, {}] is empty", where, (*regression)[0], (*regression)[1]);
    }
    check(max_length >= 8, "prompting", "{}: max_length {} is too small", where, max_length);
  }

  nlohmann::ordered_json to_json() const {
    nlohmann::ordered_json j;
    j["template"] = pattern.text();
    j["verbalizer"] = verbalizer.to_json();
    j["word_score"] = to_string(word_score);
    if (regression) j["regression_range"] = {(*regression)[0], (*regression)[1]};
    j["separator"] = separator;
    j["max_length"] = max_length;
    return j;
  }

  /// Reads to_json()'s object; `file` names the source in errors.
  static PromptSpec from_json(const nlohmann::json& j, const std::string& file) {
    check(j.is_object(), "prompting", "{}: expected a JSON object", file);
    auto get = [&](const char* key) -> const nlohmann::json& {
      auto it = j.find(key);
      check(it != j.end(), "prompting", "{}: missing \"{}\"", file, key);
      return *it;
    };
    PromptSpec s;
    try {
      s.pattern = Template(get("template").get<std::string>());
      const auto& v = get("verbalizer");
      check(v.is_object(), "prompting", "{}: \"verbalizer\" must map labels to word lists", file);
      for (auto it = v.begin(); it != v.end(); ++it) {
        s.verbalizer.labels.push_back(it.key());
        s.verbalizer.words.push_back(it.value().get<std::vector<std::string>>());
      }
      if (j.contains("word_score"))
        s.word_score = word_score_from_string(j["word_score"].get<std::string>());
      if (j.contains("regression_range")) {
        const auto r = j["regression_range"].get<std::vector<double>>();
        check(r.size() == 2, "prompting", "{}: \"regression_range\" needs [low, high]", file);
        s.regression = std::array<double, 2>{r[0], r[1]};
      }
      if (j.contains("separator")) s.separator = j["separator"].get<std::string>();
      if (j.contains("max_length")) s.max_length = j["max_length"].get<int64_t>();
    } catch (const nlohmann::json::exception& e) {
      fail("prompting", "{}: {}", file, e.what());
    }
    s.validate(file);
    return s;
  }
};

/// One input to score: its fields and the text put in front of it (demonstrations).
struct PromptInput {
  Fields fields;
  std::string context;
};

/// Labelled examples shown in front of inputs, one per class (LM-BFF). Regression pools are
/// split at their median into a low and a high class, whose demonstrations show the low and
/// the high word.
class Demonstrations {
 public:
  Demonstrations() = default;
  Demonstrations(DemoMode mode, std::vector<Fields> pool, std::vector<double> labels,
                 int64_t num_classes, std::optional<std::array<double, 2>> regression = {})
      : mode_(mode), pool_(std::move(pool)), labels_(std::move(labels)) {
    check(pool_.size() == labels_.size(), "prompting", "demonstrations: {} examples but {} labels",
          pool_.size(), labels_.size());
    by_class_.assign(static_cast<size_t>(num_classes), {});
    double median = 0;
    if (regression) {
      auto sorted = labels_;
      std::sort(sorted.begin(), sorted.end());
      median = sorted.empty() ? 0 : sorted[sorted.size() / 2];
    }
    for (size_t i = 0; i < labels_.size(); ++i) {
      const auto c = regression ? (labels_[i] >= median ? 1 : 0) : static_cast<int64_t>(labels_[i]);
      check(c >= 0 && c < num_classes, "prompting", "demonstrations: label {} out of range",
            labels_[i]);
      by_class_[static_cast<size_t>(c)].push_back(i);
    }
    if (mode_ != DemoMode::none) {
      for (size_t c = 0; c < by_class_.size(); ++c)
        check(!by_class_[c].empty(), "prompting",
              "demonstrations: the pool has no example of class {}", c);
    }
  }

  DemoMode mode() const { return mode_; }
  const std::vector<Fields>& pool() const { return pool_; }
  const std::vector<double>& labels() const { return labels_; }
  /// Pool embeddings [P, H] for DemoMode::similar (set_embeddings()).
  const torch::Tensor& embeddings() const { return embeddings_; }
  void set_embeddings(torch::Tensor e) {
    check(e.dim() == 2 && e.size(0) == static_cast<int64_t>(pool_.size()), "prompting",
          "demonstrations: embeddings of shape {} for a pool of {}", peft::detail::shape(e.sizes()),
          pool_.size());
    embeddings_ = torch::nn::functional::normalize(
        e.to(torch::kFloat), torch::nn::functional::NormalizeFuncOptions().dim(1));
  }

  /// The demonstrations for one input, filled by `spec` and joined by its separator (empty for
  /// DemoMode::none). `exclude` is the input's own index in the pool (-1 if it is not in it);
  /// `embedding` [H] is the input's embedding for DemoMode::similar. Classes come in a random
  /// order.
  std::string context(const PromptSpec& spec, std::mt19937_64& rng, int64_t exclude = -1,
                      const torch::Tensor& embedding = {}) const {
    if (mode_ == DemoMode::none) return {};
    std::vector<size_t> classes(by_class_.size());
    for (size_t c = 0; c < classes.size(); ++c) classes[c] = c;
    // Fisher-Yates with rng() % n: the standard fixes mt19937_64's output but not std::shuffle's,
    // so every platform picks the same demonstrations.
    for (size_t k = classes.size(); k > 1; --k) std::swap(classes[k - 1], classes[rng() % k]);
    std::string out;
    for (auto c : classes) {
      std::vector<size_t> candidates;
      for (auto i : by_class_[c])
        if (static_cast<int64_t>(i) != exclude) candidates.push_back(i);
      if (candidates.empty()) continue;
      if (mode_ == DemoMode::similar) {
        check(embeddings_.defined() && embedding.defined(), "prompting",
              "similar demonstrations need the pool's and the input's embeddings");
        auto idx = torch::tensor(std::vector<int64_t>(candidates.begin(), candidates.end()));
        auto sims = embeddings_.index_select(0, idx).matmul(
            torch::nn::functional::normalize(embedding.to(torch::kFloat).view({1, -1}),
                                             torch::nn::functional::NormalizeFuncOptions().dim(1))
                .view({-1}));
        auto order = sims.argsort(0, /*descending=*/true);
        const auto keep = std::max<size_t>(1, (candidates.size() + 1) / 2);
        std::vector<size_t> top;
        for (size_t k = 0; k < keep; ++k) top.push_back(candidates[order[k].item<int64_t>()]);
        candidates = top;
      }
      const auto pick = candidates[rng() % candidates.size()];
      const auto& words = spec.verbalizer.words[c];
      out += spec.pattern.fill(pool_[pick], words.front());
      out += spec.separator;
    }
    return out;
  }

  nlohmann::ordered_json to_json() const {
    nlohmann::ordered_json j;
    j["mode"] = to_string(mode_);
    j["pool"] = nlohmann::ordered_json::array();
    for (size_t i = 0; i < pool_.size(); ++i)
      j["pool"].push_back({{"fields", pool_[i]}, {"label", labels_[i]}});
    return j;
  }

 private:
  DemoMode mode_ = DemoMode::none;
  std::vector<Fields> pool_;
  std::vector<double> labels_;
  std::vector<std::vector<size_t>> by_class_;
  torch::Tensor embeddings_;
};

namespace detail {

// FNV-1a over the fields, so that an input's random demonstrations depend on it alone.
inline uint64_t fields_hash(const Fields& f) {
  uint64_t h = 1469598103934665603ULL;
  auto mix = [&](const std::string& s) {
    for (unsigned char ch : s) {
      h ^= ch;
      h *= 1099511628211ULL;
    }
    h ^= 0xff;
    h *= 1099511628211ULL;
  };
  for (const auto& [k, v] : f) {
    mix(k);
    mix(v);
  }
  return h;
}

}  // namespace detail

/// A causal language model, its tokenizer and a prompt: label probabilities from the model's
/// own head, a training loss on them, demonstrations, and saving with the adapter.
class PromptClassifier {
 public:
  PromptClassifier(models::Llama model, std::shared_ptr<const text::Tokenizer> tokenizer,
                   PromptSpec spec)
      : model_(std::move(model)), tokenizer_(std::move(tokenizer)), spec_(std::move(spec)) {
    check(!model_.is_empty() && tokenizer_ != nullptr, "prompting",
          "PromptClassifier needs a model and a tokenizer");
    spec_.validate("prompt");
    for (int space = 0; space < 2; ++space) {
      auto& ids = word_ids_[space];
      for (size_t c = 0; c < spec_.verbalizer.words.size(); ++c) {
        for (const auto& w : spec_.verbalizer.words[c]) {
          auto t = tokenizer_->encode_ids(space ? " " + w : w);
          check(!t.empty(), "prompting", "verbalizer word \"{}\" has no tokens", w);
          ids.push_back(std::move(t));
          word_label_.push_back(static_cast<int64_t>(c));
        }
      }
    }
    word_label_.resize(word_ids_[0].size());
  }

  /// A frozen model and tokenizer from a GGUF file or Hugging Face folder.
  static PromptClassifier from_pretrained(const std::filesystem::path& model_path,
                                          PromptSpec spec) {
    return PromptClassifier(models::Llama::from_pretrained(model_path),
                            text::load_tokenizer(model_path), std::move(spec));
  }

  /// The model saved by save() in `dir`: the base from `model_path`, the adapter (if the folder
  /// has one), the prompt and the demonstrations.
  static PromptClassifier load(const std::filesystem::path& model_path,
                               const std::filesystem::path& dir) {
    const auto file = dir / kPromptConfig;
    check(std::filesystem::exists(file), "prompting", "{} not found", file.string());
    const auto j = io::read_json(file, "prompting");
    check(j.is_object() && j.contains("prompt"), "prompting", "{}: missing \"prompt\"",
          file.string());
    auto clf = from_pretrained(model_path, PromptSpec::from_json(j["prompt"], file.string()));
    if (std::filesystem::exists(dir / "adapter_config.json")) load_adapter(*clf.model(), dir);
    if (auto it = j.find("demonstrations"); it != j.end()) {
      try {
        std::vector<Fields> pool;
        std::vector<double> labels;
        for (const auto& row : (*it)["pool"]) {
          pool.push_back(row["fields"].get<Fields>());
          labels.push_back(row["label"].get<double>());
        }
        clf.set_demonstrations(Demonstrations(demo_mode_from_string((*it)["mode"]), pool, labels,
                                              clf.spec().num_labels(), clf.spec().regression));
      } catch (const nlohmann::json::exception& e) {
        fail("prompting", "{}: demonstrations: {}", file.string(), e.what());
      }
    }
    if (auto it = j.find("calibration"); it != j.end()) {
      try {
        clf.set_calibration(torch::tensor(it->get<std::vector<double>>()));
      } catch (const nlohmann::json::exception& e) {
        fail("prompting", "{}: calibration: {}", file.string(), e.what());
      }
    }
    return clf;
  }

  /// Writes the attached adapter (if any, Hugging Face PEFT's files) and prompt_config.json
  /// (template, verbalizer, scoring, demonstrations, calibration) to `dir`. The prompt is a file
  /// of its own so that adapter_config.json stays one Hugging Face PEFT loads.
  void save(const std::filesystem::path& dir) const {
    std::filesystem::create_directories(dir);
    auto& model = *model_.ptr();
    if (!attached_methods(model).empty()) save_adapter(model, dir);
    nlohmann::ordered_json j;
    j["prompt"] = spec_.to_json();
    if (demos_.mode() != DemoMode::none) j["demonstrations"] = demos_.to_json();
    if (calibration_.defined()) {
      auto c = calibration_.to(torch::kDouble).contiguous();
      j["calibration"] =
          std::vector<double>(c.data_ptr<double>(), c.data_ptr<double>() + c.numel());
    }
    io::write_file_atomically(dir / kPromptConfig, {j.dump(2) + "\n"}, "prompting");
  }

  models::Llama& model() { return model_; }
  const text::Tokenizer& tokenizer() const { return *tokenizer_; }
  /// The tokenizer, shared (another PromptClassifier on the same model can use it).
  const std::shared_ptr<const text::Tokenizer>& tokenizer_ptr() const { return tokenizer_; }
  const PromptSpec& spec() const { return spec_; }
  const Demonstrations& demonstrations() const { return demos_; }

  /// Demonstrations put in front of every input by inputs(); for DemoMode::similar the pool's
  /// embeddings are computed here with the adapters switched off (the base model's view).
  void set_demonstrations(Demonstrations d) {
    demos_ = std::move(d);
    if (demos_.mode() == DemoMode::similar) demos_.set_embeddings(embed(demos_.pool()));
  }

  /// Mean of the base model's final hidden states over each input's tokens (its fields joined by
  /// newlines) [N, H], adapters switched off: the similarity of DemoMode::similar.
  torch::Tensor embed(const std::vector<Fields>& inputs, int64_t batch_size = 16) {
    torch::NoGradGuard no_grad;
    const bool was_training = model_->is_training();
    model_->eval();
    std::vector<torch::Tensor> out;
    {
      AdaptersDisabled base(*model_);
      for (size_t start = 0; start < inputs.size(); start += static_cast<size_t>(batch_size)) {
        const auto end = std::min(inputs.size(), start + static_cast<size_t>(batch_size));
        std::vector<std::vector<int64_t>> seqs;
        for (size_t i = start; i < end; ++i) {
          std::string text;
          for (const auto& [k, v] : inputs[i]) text += (text.empty() ? "" : "\n") + v;
          auto ids = tokenizer_->encode_ids(text);
          if (ids.empty()) ids.push_back(pad_id());
          if (static_cast<int64_t>(ids.size()) > spec_.max_length) ids.resize(spec_.max_length);
          seqs.push_back(std::move(ids));
        }
        auto [ids, mask] = pad(seqs);
        auto hidden = model_->forward(ids, mask);
        hidden = hidden.narrow(1, hidden.size(1) - ids.size(1), ids.size(1));
        auto m = mask.unsqueeze(-1).to(hidden.scalar_type());
        out.push_back((hidden * m).sum(1) / m.sum(1));
      }
    }
    model_->train(was_training);
    return torch::cat(out, 0);
  }

  /// `fields` as inputs, each with its demonstrations (chosen by a generator seeded from the
  /// input's text and `salt`, so the same input always gets the same ones for one salt; training
  /// passes the epoch to vary them). `exclude[i]` is input i's own index in the pool, if any.
  std::vector<PromptInput> inputs(const std::vector<Fields>& fields, uint64_t salt = 0,
                                  const std::vector<int64_t>& exclude = {}) {
    std::vector<PromptInput> out;
    torch::Tensor emb;
    if (demos_.mode() == DemoMode::similar) emb = embed(fields);
    for (size_t i = 0; i < fields.size(); ++i) {
      PromptInput in{fields[i], {}};
      if (demos_.mode() != DemoMode::none) {
        std::mt19937_64 rng(detail::fields_hash(fields[i]) ^ (salt * 0x9E3779B97F4A7C15ULL));
        in.context = demos_.context(spec_, rng, exclude.empty() ? -1 : exclude[i],
                                    emb.defined() ? emb[static_cast<int64_t>(i)] : torch::Tensor());
      }
      out.push_back(std::move(in));
    }
    return out;
  }

  /// Log-probabilities of the labels [N, C] (renormalised over the labels) for `batch`, with
  /// gradients when grad mode is on. One forward pass over every distinct scored text: the
  /// prefix, plus a word's leading tokens for words longer than one token.
  torch::Tensor label_log_probs(const std::vector<PromptInput>& batch) {
    check(!batch.empty(), "prompting", "label_log_probs: empty batch");
    const auto W = static_cast<int64_t>(word_label_.size());
    const auto N = static_cast<int64_t>(batch.size());
    std::vector<std::vector<int64_t>> seqs;
    std::vector<int64_t> need_seq, need_pos, need_token, need_word;
    std::vector<double> word_len(static_cast<size_t>(N * W), 1.0);
    for (int64_t i = 0; i < N; ++i) {
      std::string before = batch[static_cast<size_t>(i)].context +
                           spec_.pattern.before(batch[static_cast<size_t>(i)].fields);
      // "It was {mask}": the word follows a space, which a BPE vocabulary writes as part of the
      // word (" great"), so the space moves from the prefix to the words.
      int space = 0;
      while (!before.empty() && before.back() == ' ') {
        before.pop_back();
        space = 1;
      }
      auto prefix = tokenizer_->encode_ids(before);
      const auto& words = word_ids_[space];
      size_t longest = 1;
      for (const auto& w : words) longest = std::max(longest, w.size());
      const auto room = static_cast<size_t>(
          std::max<int64_t>(1, spec_.max_length - static_cast<int64_t>(longest) + 1));
      if (prefix.size() > room) {
        prefix.erase(prefix.begin(), prefix.end() - static_cast<std::ptrdiff_t>(room));
        ++truncated_;
      }
      check(!prefix.empty(), "prompting",
            "the text before the blank is empty for input {} (a causal model needs context to "
            "score the first word)",
            i);
      std::map<std::vector<int64_t>, int64_t> seq_of;
      for (int64_t w = 0; w < W; ++w) {
        const auto& ids = words[static_cast<size_t>(w)];
        std::vector<int64_t> lead(ids.begin(), ids.end() - 1);
        auto it = seq_of.find(lead);
        if (it == seq_of.end()) {
          auto s = prefix;
          s.insert(s.end(), lead.begin(), lead.end());
          seqs.push_back(std::move(s));
          it = seq_of.emplace(lead, static_cast<int64_t>(seqs.size()) - 1).first;
        }
        for (size_t j = 0; j < ids.size(); ++j) {
          need_seq.push_back(it->second);
          need_pos.push_back(static_cast<int64_t>(prefix.size() - 1 + j));
          need_token.push_back(ids[j]);
          need_word.push_back(i * W + w);
        }
        word_len[static_cast<size_t>(i * W + w)] = static_cast<double>(ids.size());
      }
    }
    auto [ids, mask] = pad(seqs);
    auto hidden = model_->forward(ids, mask);
    const int64_t offset = hidden.size(1) - ids.size(1);  // prompt-tuning rows in front
    auto seq_t = torch::tensor(need_seq);
    auto pos_t = torch::tensor(need_pos) + offset;
    auto h = hidden.index({seq_t, pos_t});  // [M, H]
    auto lp = torch::log_softmax(model_->logits(h).to(torch::kFloat), -1);
    auto tok_lp = lp.gather(1, torch::tensor(need_token).view({-1, 1})).view({-1});
    auto word_lp =
        torch::zeros({N * W}, tok_lp.options()).index_add(0, torch::tensor(need_word), tok_lp);
    if (spec_.word_score == WordScore::mean)
      word_lp = word_lp / torch::tensor(word_len, tok_lp.options());
    word_lp = word_lp.view({N, W});
    std::vector<torch::Tensor> per_label;
    for (int64_t c = 0; c < spec_.num_labels(); ++c) {
      std::vector<int64_t> idx;
      for (int64_t w = 0; w < W; ++w)
        if (word_label_[static_cast<size_t>(w)] == c) idx.push_back(w);
      per_label.push_back(torch::logsumexp(word_lp.index_select(1, torch::tensor(idx)), 1));
    }
    auto scores = torch::stack(per_label, 1);
    if (calibration_.defined()) scores = scores - calibration_.to(scores.dtype());
    return torch::log_softmax(scores, 1);
  }

  /// Contextual calibration (Zhao et al., 2021, "Calibrate before use"): the label
  /// log-probabilities the model gives content-free inputs (every field set to each of
  /// `content_free`, with the demonstrations), averaged as probabilities, are subtracted from
  /// every later score, so that a model that leans to one label whatever the input is evened
  /// out. Returns the calibration [C] (log-probabilities); uncalibrate() drops it.
  torch::Tensor calibrate(const std::vector<std::string>& content_free = {"N/A", "", "[MASK]"}) {
    check(!content_free.empty(), "prompting", "calibrate: no content-free inputs");
    calibration_ = torch::Tensor();
    std::vector<Fields> inputs_cf;
    for (const auto& text : content_free) {
      Fields f;
      for (const auto& name : spec_.pattern.fields()) f[name] = text;
      inputs_cf.push_back(std::move(f));
    }
    calibration_ = predict_proba(inputs_cf).mean(0).log();
    return calibration_;
  }
  /// Drops calibrate()'s correction.
  void uncalibrate() { calibration_ = torch::Tensor(); }
  /// calibrate()'s correction [C], undefined when there is none.
  const torch::Tensor& calibration() const { return calibration_; }
  /// Sets the correction (as loaded from a file).
  void set_calibration(torch::Tensor c) {
    check(c.dim() == 1 && c.size(0) == spec_.num_labels(), "prompting",
          "calibration of shape {} for {} labels", peft::detail::shape(c.sizes()),
          spec_.num_labels());
    calibration_ = c.to(torch::kFloat);
  }

  /// Cross-entropy on label_log_probs(): `targets` are classes [N] (int64), soft labels [N, C]
  /// (float) or, for a regression prompt, values [N] (float) in the range.
  torch::Tensor loss(const std::vector<PromptInput>& batch, const torch::Tensor& targets) {
    auto lp = label_log_probs(batch);
    return loss_from_log_probs(lp, targets);
  }

  /// The loss of loss() for log-probabilities computed already.
  torch::Tensor loss_from_log_probs(const torch::Tensor& lp, const torch::Tensor& targets) const {
    check(targets.size(0) == lp.size(0), "prompting", "{} targets for a batch of {}",
          targets.size(0), lp.size(0));
    if (targets.dim() == 2) return -(targets.to(lp.dtype()) * lp).sum(1).mean();
    if (spec_.regression) return -(soft_targets(targets).to(lp.dtype()) * lp).sum(1).mean();
    check(targets.dim() == 1 && !targets.is_floating_point(), "prompting",
          "class targets must be int64 [N]");
    return torch::nll_loss(lp, targets);
  }

  /// The two-pole soft target of regression values [N] -> [N, 2].
  torch::Tensor soft_targets(const torch::Tensor& values) const {
    check(spec_.regression.has_value(), "prompting", "soft_targets needs a regression prompt");
    const auto [lo, hi] = *spec_.regression;
    auto t = ((values.to(torch::kFloat) - lo) / (hi - lo)).clamp(0.0, 1.0);
    return torch::stack({1 - t, t}, 1);
  }

  /// Label probabilities [N, C] of `fields`, with their demonstrations, in batches, without
  /// gradients, in eval mode.
  torch::Tensor predict_proba(const std::vector<Fields>& fields, int64_t batch_size = 16) {
    torch::NoGradGuard no_grad;
    const bool was_training = model_->is_training();
    model_->eval();
    std::vector<torch::Tensor> out;
    for (size_t start = 0; start < fields.size(); start += static_cast<size_t>(batch_size)) {
      const auto end = std::min(fields.size(), start + static_cast<size_t>(batch_size));
      std::vector<Fields> chunk(fields.begin() + static_cast<std::ptrdiff_t>(start),
                                fields.begin() + static_cast<std::ptrdiff_t>(end));
      out.push_back(label_log_probs(inputs(chunk)).exp());
    }
    model_->train(was_training);
    return torch::cat(out, 0);
  }

  /// Predictions: the class of highest probability, or for a regression prompt
  /// low + (high - low) * P(high).
  std::vector<double> predict(const std::vector<Fields>& fields, int64_t batch_size = 16) {
    return values(predict_proba(fields, batch_size));
  }

  /// predict()'s values from probabilities [N, C].
  std::vector<double> values(const torch::Tensor& probs) const {
    std::vector<double> out;
    auto p = probs.to(torch::kDouble).contiguous();
    for (int64_t i = 0; i < p.size(0); ++i) {
      if (spec_.regression) {
        const auto [lo, hi] = *spec_.regression;
        out.push_back(lo + (hi - lo) * p[i][1].item<double>());
      } else {
        out.push_back(static_cast<double>(p[i].argmax().item<int64_t>()));
      }
    }
    return out;
  }

  /// Inputs cut to max_length so far.
  int64_t truncated() const { return truncated_; }

 private:
  int64_t pad_id() const { return tokenizer_->pad_id() >= 0 ? tokenizer_->pad_id() : 0; }

  std::pair<torch::Tensor, torch::Tensor> pad(const std::vector<std::vector<int64_t>>& seqs) const {
    size_t longest = 0;
    for (const auto& s : seqs) longest = std::max(longest, s.size());
    auto ids = torch::full({static_cast<int64_t>(seqs.size()), static_cast<int64_t>(longest)},
                           pad_id(), torch::kLong);
    auto mask = torch::zeros_like(ids);
    for (size_t i = 0; i < seqs.size(); ++i) {
      const auto n = static_cast<int64_t>(seqs[i].size());
      ids[static_cast<int64_t>(i)].narrow(0, 0, n).copy_(torch::tensor(seqs[i]));
      mask[static_cast<int64_t>(i)].narrow(0, 0, n).fill_(1);
    }
    return {ids, mask};
  }

  models::Llama model_;
  std::shared_ptr<const text::Tokenizer> tokenizer_;
  PromptSpec spec_;
  Demonstrations demos_;
  std::array<std::vector<std::vector<int64_t>>, 2> word_ids_;  // [no space, leading space]
  std::vector<int64_t> word_label_;
  int64_t truncated_ = 0;
  torch::Tensor calibration_;
};

/// PET's soft labels from an ensemble: softmax of the mean of each model's label
/// log-probabilities [N, C] divided by `temperature` (PET uses 2, which keeps the
/// ensemble's doubt in the labels).
inline torch::Tensor ensemble_soft_labels(const std::vector<torch::Tensor>& log_probs,
                                          double temperature = 2.0) {
  check(!log_probs.empty(), "prompting", "ensemble_soft_labels: no models");
  check(temperature > 0, "prompting", "ensemble_soft_labels: temperature {} must be positive",
        temperature);
  return torch::softmax(torch::stack(log_probs, 0).mean(0) / temperature, -1);
}

/// The field names of `task`'s inputs: "sentence" for one text; "sentence1"/"sentence2" for
/// pairs, except qnli ("question", "sentence"), qqp ("question1", "question2"), csl
/// ("keywords", "abstract") and cluewsc2020 ("text", "claim"). fields_of() fills them.
inline std::vector<std::string> task_fields(const std::string& task, bool is_pair) {
  if (task == "qnli") return {"question", "sentence"};
  if (task == "qqp") return {"question1", "question2"};
  if (task == "csl") return {"keywords", "abstract"};
  if (task == "cluewsc2020") return {"text", "claim"};
  if (is_pair) return {"sentence1", "sentence2"};
  return {"sentence"};
}

/// The fields of `e` under task_fields()' names.
inline Fields fields_of(const std::vector<std::string>& names, const data::Example& e) {
  Fields f{{names[0], e.text_a}};
  if (names.size() > 1) f[names[1]] = e.text_b.value_or("");
  return f;
}

/// Built-in prompts of a GLUE or CLUE task (the first is the default; the others are PET's
/// ensemble). `label_names` are the task's labels, class order.
inline std::vector<PromptSpec> builtin_prompts(const std::string& task,
                                               const std::vector<std::string>& label_names) {
  struct Raw {
    const char* pattern;
    std::vector<std::vector<std::string>> words;
  };
  std::vector<Raw> raw;
  std::optional<std::array<double, 2>> regression;
  std::vector<std::string> labels = label_names;
  const std::vector<std::vector<std::string>> yes_no{{"no"}, {"yes"}};
  if (task == "sst2") {
    raw = {{"Review: {sentence}\nSentiment: {mask}", {{"negative"}, {"positive"}}},
           {"{sentence} It was {mask}", {{"terrible"}, {"great"}}},
           {"{sentence} All in all, the movie was {mask}", {{"bad"}, {"good"}}}};
  } else if (task == "cola") {
    raw = {{"{sentence} This sentence is {mask}", {{"wrong"}, {"correct"}}},
           {"Sentence: {sentence}\nIs it grammatical? {mask}", yes_no},
           {"{sentence} The grammar here is {mask}", {{"bad"}, {"fine"}}}};
  } else if (task == "mrpc") {
    raw = {{"{sentence1}\n{sentence2}\nDo both sentences say the same thing? {mask}", yes_no},
           {"Sentence 1: {sentence1}\nSentence 2: {sentence2}\nSame meaning? {mask}", yes_no},
           {"\"{sentence1}\" and \"{sentence2}\" are {mask}", {{"different"}, {"equivalent"}}}};
  } else if (task == "qqp") {
    raw = {{"{question1}\n{question2}\nDo both questions ask the same thing? {mask}", yes_no},
           {"Question 1: {question1}\nQuestion 2: {question2}\nDuplicates? {mask}", yes_no}};
  } else if (task == "stsb") {
    labels = {"low", "high"};
    regression = std::array<double, 2>{0.0, 5.0};
    raw = {{"{sentence1}\n{sentence2}\nDo both sentences say the same thing? {mask}", yes_no},
           {"Sentence 1: {sentence1}\nSentence 2: {sentence2}\nSame meaning? {mask}", yes_no}};
  } else if (task == "mnli" || task == "cmnli" || task == "ocnli") {
    // Labels: contradiction, entailment, neutral.
    raw = {{"{sentence1}\nQuestion: {sentence2} Yes, no or maybe?\nAnswer: {mask}",
            {{"no"}, {"yes"}, {"maybe"}}},
           {"Premise: {sentence1}\nHypothesis: {sentence2}\nDoes the premise imply the "
            "hypothesis? {mask}",
            {{"no"}, {"yes"}, {"maybe"}}}};
  } else if (task == "rte") {
    // Labels: entailment, not_entailment.
    raw = {
        {"{sentence1}\nQuestion: {sentence2} True or false?\nAnswer: {mask}",
         {{"true"}, {"false"}}},
        {"Premise: {sentence1}\nHypothesis: {sentence2}\nDoes the premise imply the "
         "hypothesis? {mask}",
         {{"yes"}, {"no"}}},
        {"{sentence1}\nBased on that, is it true that \"{sentence2}\"? {mask}", {{"yes"}, {"no"}}}};
  } else if (task == "wnli") {
    // Labels: not_entailment, entailment.
    raw = {{"{sentence1}\nQuestion: {sentence2} True or false?\nAnswer: {mask}",
            {{"false"}, {"true"}}}};
  } else if (task == "qnli") {
    // Labels: entailment, not_entailment.
    raw = {
        {"Question: {question}\nSentence: {sentence}\nDoes the sentence answer the question? "
         "{mask}",
         {{"yes"}, {"no"}}}};
  } else if (task == "afqmc") {
    raw = {{"{sentence1}\n{sentence2}\n这两句话意思相同吗？{mask}", {{"不"}, {"是"}}},
           {"{sentence1}\n{sentence2}\nSame meaning? {mask}", yes_no}};
  } else if (task == "chnsenticorp") {
    raw = {{"{sentence}\n总之，这个评价是{mask}", {{"差评"}, {"好评"}}},
           {"Review: {sentence}\nSentiment: {mask}", {{"negative"}, {"positive"}}}};
  } else if (task == "csl") {
    raw = {{"摘要：{abstract}\n关键词：{keywords}\n这些关键词都对吗？{mask}", {{"不"}, {"对"}}}};
  } else if (task == "cluewsc2020") {
    raw = {{"{text}\n{claim}，对吗？{mask}", {{"错"}, {"对"}}},
           {"{text}\nClaim: {claim}\nTrue or false? {mask}", {{"false"}, {"true"}}}};
  } else {
    // tnews, iflytek and any task without a hand-written prompt: the label names are the words.
    std::vector<std::vector<std::string>> words;
    for (auto name : label_names) {
      if (name.rfind("news_", 0) == 0) name = name.substr(5);
      std::replace(name.begin(), name.end(), '_', ' ');
      words.push_back({name});
    }
    raw = {{"{sentence}\nTopic: {mask}", words}};
  }
  std::vector<PromptSpec> out;
  for (auto& r : raw) {
    PromptSpec s;
    s.pattern = Template(r.pattern);
    s.verbalizer = {labels, r.words};
    s.regression = regression;
    s.validate(fmt::format("built-in prompt of {}", task));
    out.push_back(std::move(s));
  }
  return out;
}

}  // namespace prompting

PEFT_NAMESPACE_END
