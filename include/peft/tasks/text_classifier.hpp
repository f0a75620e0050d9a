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
#include <peft/train/metrics.hpp>
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

/// Tokenises `examples` once, in their order, in chunks of `batch_size` padded to the longest
/// encoding of the chunk (at most `max_len` tokens); sentence pairs when `pair`.
inline std::vector<TextBatch> make_text_batches(const std::vector<data::Example>& examples,
                                                const text::Tokenizer& tokenizer,
                                                int64_t batch_size, int64_t max_len, bool pair,
                                                bool regression) {
  check(batch_size > 0, "batching", "batch_size must be positive, got {}", batch_size);
  const auto encode = text::EncodeOptions().max_length(max_len);
  std::vector<TextBatch> batches;
  for (size_t start = 0; start < examples.size(); start += static_cast<size_t>(batch_size)) {
    const size_t end = std::min(examples.size(), start + static_cast<size_t>(batch_size));
    std::vector<std::string> a, b;
    std::vector<float> labels;
    for (size_t i = start; i < end; ++i) {
      a.push_back(examples[i].text_a);
      if (pair) b.push_back(examples[i].text_b.value_or(""));
      labels.push_back(examples[i].label);
    }
    auto enc = pair ? tokenizer.encode_batch(a, b, encode) : tokenizer.encode_batch(a, encode);
    auto y = torch::tensor(labels, torch::kFloat);
    if (!regression) y = y.to(torch::kLong);
    batches.push_back({enc.input_ids, enc.token_type_ids, enc.attention_mask, y});
  }
  return batches;
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
  /// LoRA+: LoRA's B matrices learn this many times faster (lora and dora; 0: off).
  TORCH_ARG(double, lora_plus_ratio) = 8;
  TORCH_ARG(double, weight_decay) = 0.01;
  TORCH_ARG(double, warmup_ratio) = 0.06;
  /// Dropout in the model and head during training; below 0: the config's. Default 0 for
  /// methods (better on every task measured), the config's for "full".
  TORCH_ARG(double, model_dropout) = 0;
  TORCH_ARG(int64_t, seed) = 42;
  /// Checkpoints and metrics.jsonl go here during fit(); empty: nothing is written.
  TORCH_ARG(std::filesystem::path, output_dir) = {};
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
            model_folder, num_labels, models::pooling_from_string(options_.pooling()))) {
    const bool full = options_.method() == "full";
    const double dropout = full && options_.model_dropout() == 0 ? -1 : options_.model_dropout();
    if (dropout >= 0) {
      model_->bert->set_dropout(dropout, dropout);
      model_->dropout->options.p(dropout);
    }
    if (full) {
      unfreeze(*model_);
    } else {
      sites_ = attach(*model_->bert, options_.method(), options_.method_options());
    }
  }

  /// Trains on `train` (shuffled once with the seed, then batched; the batch order is shuffled
  /// every epoch), evaluating on `eval` at every epoch end when it is not empty.
  TrainResult fit(const std::vector<data::Example>& train,
                  const std::vector<data::Example>& eval = {}) {
    check(!train.empty(), "text_classifier", "no training examples");
    std::vector<data::Example> shuffled;
    for (auto i : data::shuffled_order(train.size(), static_cast<uint64_t>(options_.seed()))) {
      shuffled.push_back(train[i]);
    }
    const auto batches = batch(shuffled, options_.batch_size());
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
    return trainer.fit(batches);
  }

  /// Class indices (or scores, for regression) of `examples`, in eval mode.
  std::vector<float> predict(const std::vector<data::Example>& examples) {
    const bool was_training = model_->is_training();
    model_->eval();
    torch::NoGradGuard no_grad;
    std::vector<float> out;
    for (const auto& b : batch(examples, 64)) {
      auto logits = model_(b.input_ids, b.attention_mask, b.token_type_ids);
      auto values = model_->num_labels() == 1 ? logits.squeeze(-1) : logits.argmax(-1);
      values = values.to(torch::kFloat).contiguous();
      out.insert(out.end(), values.data_ptr<float>(), values.data_ptr<float>() + values.numel());
    }
    model_->train(was_training);
    return out;
  }

  /// Accuracy and F1 (two classes) or macro F1 (more), or Pearson and Spearman for regression.
  std::map<std::string, double> evaluate(const std::vector<data::Example>& examples) {
    check(!examples.empty(), "text_classifier", "no examples to evaluate");
    const auto predictions = predict(examples);
    std::vector<float> gold;
    for (const auto& e : examples) gold.push_back(e.label);
    const int64_t n = model_->num_labels();
    const std::vector<std::string> names = n == 1 ? std::vector<std::string>{"pearson", "spearman"}
                                           : n == 2
                                               ? std::vector<std::string>{"accuracy", "f1"}
                                               : std::vector<std::string>{"accuracy", "macro_f1"};
    return metrics::evaluate(names, predictions, gold);
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
  std::vector<TextBatch> batch(const std::vector<data::Example>& examples, int64_t size) const {
    const bool pair = !examples.empty() && examples.front().text_b.has_value();
    return make_text_batches(examples, *tokenizer_, size, options_.max_len(), pair,
                             model_->num_labels() == 1);
  }

  TextClassifierOptions options_;
  std::shared_ptr<const text::Tokenizer> tokenizer_;
  models::BertForSequenceClassification model_;
  std::vector<std::string> sites_;
};

PEFT_NAMESPACE_END
