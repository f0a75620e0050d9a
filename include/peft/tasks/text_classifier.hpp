#pragma once

// Fine-tuning a pretrained BERT-family model on one's own labelled texts, in a few calls: the
// model and its tokenizer from a Hugging Face folder, any registered method by name with JSON
// options, batching, the trainer (AdamW, warm-up and decay, clipping, checkpoints), evaluation
// and saving. This is the layer above the library's parts (models, text, data, methods, train);
// examples/custom_task.cpp uses it end to end.
//
//     auto train = peft::data::read_table("train.csv");
//     peft::TextClassifier classifier(model_folder, train.num_labels(),
//                                     peft::TextClassifierOptions().method("lora").epochs(3));
//     classifier.fit(train.examples, dev.examples);
//     auto scores = classifier.evaluate(dev.examples);   // {"accuracy": ..., "f1": ...}
//     classifier.save("out/my-adapter");

#include <torch/arg.h>
#include <torch/nn/functional/loss.h>
#include <torch/types.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include <peft/config.hpp>
#include <peft/core/attach.hpp>
#include <peft/core/error.hpp>
#include <peft/core/parameters.hpp>
#include <peft/core/registry.hpp>
#include <peft/data/example.hpp>
#include <peft/data/split.hpp>
#include <peft/io/adapter_format.hpp>
#include <peft/io/safetensors.hpp>
#include <peft/models/heads.hpp>
#include <peft/text/load.hpp>
#include <peft/train/accumulator.hpp>
#include <peft/train/metrics.hpp>
#include <peft/train/output_dir.hpp>
#include <peft/train/trainer.hpp>

PEFT_NAMESPACE_BEGIN

/// Tokenised, padded texts of a few examples and their labels (int64 classes, or float scores
/// for regression).
struct TextBatch {
  torch::Tensor input_ids, token_type_ids, attention_mask, labels;

  /// The same batch on `device` (the trainer moves batches with this).
  TextBatch to(const torch::Device& device) const {
    return {input_ids.to(device), token_type_ids.to(device), attention_mask.to(device),
            labels.to(device)};
  }
};

/// Examples tokenised once, kept as unpadded encodings with their labels, so that batches can be
/// formed again each epoch (length_grouped_batches) without tokenising again.
struct EncodedExamples {
  std::vector<text::Encoding> encodings;
  std::vector<float> labels;
  bool regression = false;  ///< labels are float scores (else int64 classes)
  int64_t pad_id = 0;       ///< the tokenizer's padding id

  size_t size() const { return encodings.size(); }
  /// The tokens of example `i`, special tokens included.
  size_t length(size_t i) const { return encodings[i].input_ids.size(); }

  /// Examples `rows`, in that order, padded on the right to the longest of them.
  TextBatch collate(const std::vector<size_t>& rows) const {
    check(!rows.empty(), "batching", "a batch needs at least one example");
    size_t length = 0;
    for (auto r : rows) {
      check(r < encodings.size(), "batching", "row {} is beyond the {} examples", r,
            encodings.size());
      length = std::max(length, encodings[r].input_ids.size());
    }
    auto enc = text::pad_encodings(
        rows.size(), [&](size_t i) -> const text::Encoding& { return encodings[rows[i]]; }, length,
        pad_id);
    std::vector<float> values;
    values.reserve(rows.size());
    for (auto r : rows) values.push_back(labels[r]);
    auto y = torch::tensor(values, torch::kFloat);
    if (!regression) y = y.to(torch::kLong);
    return {enc.input_ids, enc.token_type_ids, enc.attention_mask, y};
  }

  /// Every example in order, in chunks of `batch_size` (the last may be smaller).
  std::vector<TextBatch> batches(int64_t batch_size) const {
    std::vector<size_t> rows(size());
    for (size_t i = 0; i < rows.size(); ++i) rows[i] = i;
    return batches_of(rows, batch_size);
  }

  /// Examples `rows`, in that order, in chunks of `batch_size` (the last may be smaller).
  std::vector<TextBatch> batches_of(const std::vector<size_t>& rows, int64_t batch_size) const {
    check(batch_size > 0, "batching", "batch_size must be positive, got {}", batch_size);
    std::vector<TextBatch> out;
    for (size_t start = 0; start < rows.size(); start += static_cast<size_t>(batch_size)) {
      const size_t end = std::min(rows.size(), start + static_cast<size_t>(batch_size));
      out.push_back(collate(std::vector<size_t>(rows.begin() + static_cast<std::ptrdiff_t>(start),
                                                rows.begin() + static_cast<std::ptrdiff_t>(end))));
    }
    return out;
  }
};

/// Tokenises `examples` once (at most `max_len` tokens each; sentence pairs when `pair`).
inline EncodedExamples encode_examples(const std::vector<data::Example>& examples,
                                       const text::Tokenizer& tokenizer, int64_t max_len, bool pair,
                                       bool regression) {
  const auto options = text::EncodeOptions().max_length(max_len);
  EncodedExamples out;
  out.regression = regression;
  out.pad_id = tokenizer.pad_id();
  out.encodings.reserve(examples.size());
  out.labels.reserve(examples.size());
  for (const auto& e : examples) {
    out.encodings.push_back(pair ? tokenizer.encode(e.text_a, e.text_b.value_or(""), options)
                                 : tokenizer.encode(e.text_a, options));
    out.labels.push_back(e.label);
  }
  return out;
}

/// Tokenises `examples` once, in their order, in chunks of `batch_size` padded to the longest
/// encoding of the chunk (at most `max_len` tokens); sentence pairs when `pair`.
inline std::vector<TextBatch> make_text_batches(const std::vector<data::Example>& examples,
                                                const text::Tokenizer& tokenizer,
                                                int64_t batch_size, int64_t max_len, bool pair,
                                                bool regression) {
  check(batch_size > 0, "batching", "batch_size must be positive, got {}", batch_size);
  return encode_examples(examples, tokenizer, max_len, pair, regression).batches(batch_size);
}

/// The batches (lists of row indices) of one epoch with examples of similar length together,
/// so that little of each batch is padding: the rows are shuffled (from `seed` and `epoch`), cut
/// into groups of `group` batches' worth, each group is sorted by length and cut into batches
/// of `batch_size` (the last may be smaller), and the batches' order is shuffled. Every row is
/// in exactly one batch; the same arguments give the same batches on every platform.
inline std::vector<std::vector<size_t>> length_grouped_batches(const std::vector<size_t>& lengths,
                                                               int64_t batch_size, int64_t seed,
                                                               int64_t epoch, int64_t group = 50) {
  check(batch_size > 0, "batching", "batch_size must be positive, got {}", batch_size);
  check(group > 0, "batching", "the group must hold at least one batch, got {}", group);
  const auto n = static_cast<int64_t>(lengths.size());
  const auto order = detail::epoch_order(n, seed, epoch, /*shuffle=*/true);
  const auto span = static_cast<size_t>(batch_size * group);
  std::vector<std::vector<size_t>> batches;
  for (size_t start = 0; start < order.size(); start += span) {
    const size_t end = std::min(order.size(), start + span);
    std::vector<size_t> rows(order.begin() + static_cast<std::ptrdiff_t>(start),
                             order.begin() + static_cast<std::ptrdiff_t>(end));
    // Stable, so ties keep the shuffled order.
    std::stable_sort(rows.begin(), rows.end(),
                     [&](size_t a, size_t b) { return lengths[a] > lengths[b]; });
    for (size_t i = 0; i < rows.size(); i += static_cast<size_t>(batch_size)) {
      batches.emplace_back(rows.begin() + static_cast<std::ptrdiff_t>(i),
                           rows.begin() + static_cast<std::ptrdiff_t>(std::min(
                                              rows.size(), i + static_cast<size_t>(batch_size))));
    }
  }
  // A different stream from the rows' shuffle: the epoch number offset past any real epoch.
  const auto shuffled = detail::epoch_order(static_cast<int64_t>(batches.size()), seed,
                                            epoch + (int64_t{1} << 40), /*shuffle=*/true);
  std::vector<std::vector<size_t>> out;
  out.reserve(batches.size());
  for (auto i : shuffled) out.push_back(std::move(batches[static_cast<size_t>(i)]));
  return out;
}

/// A BatchSource for Trainer::fit over `examples`, re-forming length-grouped batches
/// (length_grouped_batches of `batch_size` rows) every epoch; ceil(n / batch_size) batches in
/// each (only the last of a group can be smaller).
///
/// Data parallel: every rank passes all the examples (the same on every rank), the global batch
/// size, its `rank` and the `world` size, and gets its share of each global batch: the rows at
/// positions rank, rank + world, ... after the batch is padded with its first rows to a multiple
/// of `world` (shard_for_rank's rule, so every rank has rows). The ranks' batches k together are
/// then batch k of one process, and the averaged gradient is its gradient.
inline BatchSource<TextBatch> length_grouped_source(std::shared_ptr<const EncodedExamples> examples,
                                                    int64_t batch_size, int64_t seed,
                                                    int64_t group = 50, int world = 1,
                                                    int rank = 0) {
  check(examples && examples->size() > 0, "batching", "no examples to batch");
  check(batch_size > 0, "batching", "batch_size must be positive, got {}", batch_size);
  check(world >= 1 && rank >= 0 && rank < world, "batching",
        "rank {} is not within a world of {} processes", rank, world);
  std::vector<size_t> lengths(examples->size());
  for (size_t i = 0; i < lengths.size(); ++i) lengths[i] = examples->length(i);
  struct Cache {
    int64_t epoch = -1;
    std::vector<std::vector<size_t>> batches;
  };
  auto cache = std::make_shared<Cache>();
  BatchSource<TextBatch> source;
  // Every group but the last is a whole number of batches: ceil(n / batch_size) in all.
  source.batches_per_epoch = (static_cast<int64_t>(lengths.size()) + batch_size - 1) / batch_size;
  source.batch = [examples, lengths = std::move(lengths), batch_size, seed, group, world, rank,
                  cache](int64_t epoch, int64_t index) {
    if (epoch != cache->epoch) {
      cache->batches = length_grouped_batches(lengths, batch_size, seed, epoch, group);
      cache->epoch = epoch;
    }
    check(index >= 0 && index < static_cast<int64_t>(cache->batches.size()), "batching",
          "batch {} of an epoch of {}", index, cache->batches.size());
    const auto& global = cache->batches[static_cast<size_t>(index)];
    return examples->collate(world == 1 ? global : shard_for_rank(global, world, rank));
  };
  return source;
}

/// Evaluation batches of `examples` sorted by length (longest first) so that padding is minimal;
/// `order`, when given, receives the example index of each row in batch order (to put
/// predictions back in the examples' order). Metrics that do not depend on the order of the
/// rows (all of peft::metrics) can be computed on these batches directly.
inline std::vector<TextBatch> length_sorted_batches(const EncodedExamples& examples,
                                                    int64_t batch_size,
                                                    std::vector<size_t>* order = nullptr) {
  check(batch_size > 0, "batching", "batch_size must be positive, got {}", batch_size);
  std::vector<size_t> rows(examples.size());
  for (size_t i = 0; i < rows.size(); ++i) rows[i] = i;
  std::stable_sort(rows.begin(), rows.end(),
                   [&](size_t a, size_t b) { return examples.length(a) > examples.length(b); });
  auto out = examples.batches_of(rows, batch_size);
  if (order != nullptr) *order = std::move(rows);
  return out;
}

/// How a TextClassifier is built and trained. Defaults: the setting that trained best with the
/// default model in docs/RESULTS.md's search (LoRA as LoRA+ with the model's dropout off, mean
/// pooling, batch 16, three epochs).
struct TextClassifierOptions {
  /// A registered method (peft::method_names()) or "full" (every weight trains).
  TORCH_ARG(std::string, method) = "lora";
  /// The method's options as JSON (its adapter_config.json keys); missing keys take defaults.
  TORCH_ARG(nlohmann::json, method_options) = nlohmann::json::object();
  /// "mean" (the mean of the token states) or "cls" (BERT's pooler).
  TORCH_ARG(std::string, pooling) = "mean";
  TORCH_ARG(int64_t, epochs) = 3;
  TORCH_ARG(int64_t, batch_size) = 16;
  TORCH_ARG(int64_t, max_len) = 128;
  /// 0: the method's default rate (5e-5 for "full").
  TORCH_ARG(double, lr) = 0;
  /// The head's rate; 0: 3e-3 for methods, lr for "full".
  TORCH_ARG(double, head_lr) = 0;
  /// LoRA+: LoRA's B matrices learn this many times faster (methods whose learning-rate rules read
  /// loraplus_lr_ratio; 0: off).
  TORCH_ARG(double, lora_plus_ratio) = 8;
  TORCH_ARG(double, weight_decay) = 0.01;
  TORCH_ARG(double, warmup_ratio) = 0.06;
  /// Dropout in the model and head during training; below 0: the config's. Default 0 for
  /// methods (better on every task measured), the config's for "full".
  TORCH_ARG(double, model_dropout) = 0;
  TORCH_ARG(int64_t, seed) = 42;
  /// Batches of examples of similar length (length_grouped_batches), formed again each epoch,
  /// and evaluation in length order: less padding, the same metrics.
  TORCH_ARG(bool, group_by_length) = true;
  /// Checkpoints and metrics.jsonl go here during fit(); empty: nothing is written.
  TORCH_ARG(std::filesystem::path, output_dir) = {};
  /// Whether fit() may replace an earlier run's files in output_dir (prepare_output_dir: else
  /// an earlier run there is an error, so that two runs never mix in one log).
  TORCH_ARG(bool, overwrite) = false;
};

/// A BERT-family classifier (or regressor, with one label) with a method attached, its
/// tokenizer, and fit / evaluate / predict / save.
class TextClassifier {
 public:
  /// Loads the model and tokenizer in `model_folder` (config.json, model.safetensors,
  /// vocab.txt) with a new head of `num_labels` outputs (1: regression) and attaches the method.
  /// Throws peft::Error on a missing file, an unknown method or bad options.
  TextClassifier(const std::filesystem::path& model_folder, int64_t num_labels,
                 TextClassifierOptions options = {})
      : options_(std::move(options)),
        tokenizer_(text::load_tokenizer(model_folder)),
        model_(models::BertForSequenceClassification::from_pretrained(
            model_folder, num_labels, models::pooling_from_string(options_.pooling()),
            dropout_adjust(options_))) {
    if (options_.method() == "full") {
      unfreeze(*model_);
    } else {
      sites_ = attach(*model_->bert, options_.method(), options_.method_options());
    }
  }

  /// Trains on `train` (tokenised once; with group_by_length the batches are formed again every
  /// epoch from examples of similar length, otherwise the examples are shuffled once with the
  /// seed and batched, and the batch order is shuffled every epoch), evaluating on `eval` at
  /// every epoch end when it is not empty.
  TrainResult fit(const std::vector<data::Example>& train,
                  const std::vector<data::Example>& eval = {}) {
    check(!train.empty(), "text_classifier", "no training examples");
    prepare_output_dir(options_.output_dir(), OutputDirOptions().overwrite(options_.overwrite()));
    std::vector<data::Example> shuffled;
    for (auto i : data::shuffled_order(train.size(), static_cast<uint64_t>(options_.seed()))) {
      shuffled.push_back(train[i]);
    }
    const auto encoded = std::make_shared<const EncodedExamples>(encode(shuffled));
    const bool full = options_.method() == "full";
    const double lr = options_.lr() > 0
                          ? options_.lr()
                          : (full ? 5e-5 : method_entry(options_.method()).default_lr);
    auto trainer_options = TrainerOptions()
                               .epochs(options_.epochs())
                               .lr(lr)
                               .weight_decay(options_.weight_decay())
                               .warmup_ratio(options_.warmup_ratio())
                               .seed(options_.seed())
                               .output_dir(options_.output_dir());
    trainer_options.lr_for("classifier",
                           options_.head_lr() > 0 ? options_.head_lr() : (full ? lr : 3e-3));
    if (!full) {
      auto rules = method_entry(options_.method()).lr_rules;
      nlohmann::json settings = options_.method_options();
      if (!settings.contains("loraplus_lr_ratio")) {
        settings["loraplus_lr_ratio"] = options_.lora_plus_ratio();
      }
      if (rules) {
        for (auto& [pattern, rate] : rules(lr, settings)) trainer_options.lr_for(pattern, rate);
      }
    }
    const bool regression = model_->num_labels() == 1;
    auto model = model_;
    Trainer<TextBatch> trainer(
        model,
        [model, regression](const TextBatch& b) mutable {
          auto logits = model(b.input_ids, b.attention_mask, b.token_type_ids);
          if (regression) return torch::mse_loss(logits.squeeze(-1), b.labels);
          return torch::nn::functional::cross_entropy(logits, b.labels);
        },
        trainer_options);
    if (!eval.empty()) trainer.evaluate_with([this, &eval] { return evaluate(eval); });
    if (options_.group_by_length()) {
      return trainer.fit(length_grouped_source(encoded, options_.batch_size(), options_.seed()));
    }
    return trainer.fit(encoded->batches(options_.batch_size()));
  }

  /// Class indices (or scores, for regression) of `examples`, in eval mode.
  std::vector<float> predict(const std::vector<data::Example>& examples) {
    const bool was_training = model_->is_training();
    model_->eval();
    torch::NoGradGuard no_grad;
    std::vector<size_t> order;
    const auto encoded = encode(examples);
    const auto batches = options_.group_by_length() ? length_sorted_batches(encoded, 64, &order)
                                                    : encoded.batches(64);
    std::vector<float> sorted;
    for (const auto& b : batches) {
      auto logits = model_(b.input_ids, b.attention_mask, b.token_type_ids);
      auto values = model_->num_labels() == 1 ? logits.squeeze(-1) : logits.argmax(-1);
      values = values.to(torch::kFloat).contiguous();
      sorted.insert(sorted.end(), values.data_ptr<float>(),
                    values.data_ptr<float>() + values.numel());
    }
    model_->train(was_training);
    if (order.empty()) return sorted;
    std::vector<float> out(sorted.size());
    for (size_t i = 0; i < order.size(); ++i) out[order[i]] = sorted[i];
    return out;
  }

  /// Accuracy and F1 (two classes) or macro F1 (more), or Pearson and Spearman for regression.
  std::map<std::string, double> evaluate(const std::vector<data::Example>& examples) {
    check(!examples.empty(), "text_classifier", "no examples to evaluate");
    const bool was_training = model_->is_training();
    model_->eval();
    torch::NoGradGuard no_grad;
    const auto encoded = encode(examples);
    const int64_t n = model_->num_labels();
    metrics::Accumulator scores(n == 1);
    // The metrics do not depend on the rows' order: length order pads least.
    for (const auto& b :
         options_.group_by_length() ? length_sorted_batches(encoded, 64) : encoded.batches(64)) {
      scores.add(model_(b.input_ids, b.attention_mask, b.token_type_ids), b.labels);
    }
    model_->train(was_training);
    return scores.compute(n == 1   ? std::vector<std::string>{"pearson", "spearman"}
                          : n == 2 ? std::vector<std::string>{"accuracy", "f1"}
                                   : std::vector<std::string>{"accuracy", "macro_f1"});
  }

  /// Saves what was trained to `dir`: the adapter and head as Hugging Face PEFT's
  /// adapter_config.json + adapter_model.safetensors (peft::save_adapter), or for "full" every
  /// parameter of the model in model.safetensors.
  void save(const std::filesystem::path& dir) {
    if (options_.method() != "full") {
      save_adapter(*model_, dir);
      return;
    }
    std::filesystem::create_directories(dir);
    std::vector<std::pair<std::string, torch::Tensor>> tensors;
    for (const auto& p : model_->named_parameters()) tensors.emplace_back(p.key(), p.value());
    io::save_safetensors(dir / "model.safetensors", tensors, {{"format", "pt"}});
  }

  models::BertForSequenceClassification& model() { return model_; }
  const text::Tokenizer& tokenizer() const { return *tokenizer_; }
  /// Where the method was attached (empty for "full").
  const std::vector<std::string>& sites() const { return sites_; }

 private:
  /// model_dropout as a config adjustment: every dropout of the model and the head (none below
  /// 0, or for "full" at the default 0, which keeps the config's).
  static models::ConfigAdjust dropout_adjust(const TextClassifierOptions& o) {
    const double p = o.method() == "full" && o.model_dropout() == 0 ? -1 : o.model_dropout();
    if (p < 0) return nullptr;
    return [p](models::BertConfig& c) {
      c.hidden_dropout_prob = p;
      c.attention_probs_dropout_prob = p;
      c.classifier_dropout = p;
    };
  }

  EncodedExamples encode(const std::vector<data::Example>& examples) const {
    const bool pair = !examples.empty() && examples.front().text_b.has_value();
    return encode_examples(examples, *tokenizer_, options_.max_len(), pair,
                           model_->num_labels() == 1);
  }

  TextClassifierOptions options_;
  std::shared_ptr<const text::Tokenizer> tokenizer_;
  models::BertForSequenceClassification model_;
  std::vector<std::string> sites_;
};

PEFT_NAMESPACE_END
