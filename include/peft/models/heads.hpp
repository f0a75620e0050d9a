#pragma once

// Task heads on top of models::Bert. The backbone stays frozen; a head trains in full (it is
// what Hugging Face PEFT calls a module to save).

#include <torch/nn/modules/dropout.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>
#include <torch/types.h>

#include <cstdint>
#include <filesystem>
#include <memory>
#include <utility>

#include <peft/config.hpp>
#include <peft/core/error.hpp>
#include <peft/models/bert.hpp>

PEFT_NAMESPACE_BEGIN
namespace models {

/// Hugging Face's BertForSequenceClassification: dropout and a Linear(H, num_labels) on the
/// pooled output. Children `bert` (frozen) and `classifier` (trainable). num_labels 1 means
/// regression (one score per example).
class BertForSequenceClassificationImpl : public torch::nn::Module {
 public:
  BertForSequenceClassificationImpl(Bert backbone, int64_t num_labels)
      : torch::nn::Module("peft::models::BertForSequenceClassification"),
        bert(register_module("bert", std::move(backbone))) {
    check(num_labels > 0, "models::bert", "num_labels must be positive, got {}", num_labels);
    const int64_t H = bert->config().hidden_size;
    dropout = register_module("dropout", torch::nn::Dropout(bert->config().hidden_dropout_prob));
    classifier = register_module("classifier", torch::nn::Linear(H, num_labels));
    // Hugging Face's initialisation of a new head: N(0, 0.02) weights, zero bias.
    torch::NoGradGuard no_grad;
    classifier->weight.normal_(0.0, 0.02);
    classifier->bias.zero_();
  }

  /// A frozen backbone from a Hugging Face folder with a new head.
  static std::shared_ptr<BertForSequenceClassificationImpl> from_pretrained(
      const std::filesystem::path& folder, int64_t num_labels) {
    return std::make_shared<BertForSequenceClassificationImpl>(Bert::from_pretrained(folder),
                                                               num_labels);
  }

  /// Logits [N, num_labels] (see BertImpl::forward for the inputs).
  torch::Tensor forward(const torch::Tensor& input_ids, const torch::Tensor& attention_mask = {},
                        const torch::Tensor& token_type_ids = {}) {
    auto hidden = bert->forward(input_ids, attention_mask, token_type_ids);
    return classifier(dropout(bert->pool(hidden)));
  }

  int64_t num_labels() const { return classifier->options.out_features(); }

  Bert bert{nullptr};
  torch::nn::Dropout dropout{nullptr};
  torch::nn::Linear classifier{nullptr};
};

/// Module holder of BertForSequenceClassificationImpl, with from_pretrained().
class BertForSequenceClassification
    : public torch::nn::ModuleHolder<BertForSequenceClassificationImpl> {
 public:
  using torch::nn::ModuleHolder<BertForSequenceClassificationImpl>::ModuleHolder;
  using torch::nn::ModuleHolder<BertForSequenceClassificationImpl>::get;

  /// A frozen backbone from a Hugging Face folder with a new head of `num_labels` outputs.
  static BertForSequenceClassification from_pretrained(const std::filesystem::path& folder,
                                                       int64_t num_labels) {
    return BertForSequenceClassification(
        BertForSequenceClassificationImpl::from_pretrained(folder, num_labels));
  }
};

}  // namespace models
PEFT_NAMESPACE_END
