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
#include <string>
#include <utility>

#include <peft/config.hpp>
#include <peft/core/enum_names.hpp>
#include <peft/core/error.hpp>
#include <peft/detail/shape.hpp>
#include <peft/models/bert.hpp>

PEFT_NAMESPACE_BEGIN
namespace models {

/// How a sequence classifier turns the last hidden state [N, L, H] into one vector per example.
enum class Pooling {
  /// BERT's pooler: tanh(dense(hidden[:, 0])) (Hugging Face's BertForSequenceClassification).
  Cls,
  /// The mean of the hidden states of the real (unmasked) tokens. Sentence-transformers models
  /// such as all-MiniLM-L6-v2 were trained to be read this way; their [CLS] pooler was not.
  Mean,
};

constexpr EnumTable<Pooling, 2> enum_table(Pooling) {
  return {"pooling", "models::bert", {{{Pooling::Cls, "cls"}, {Pooling::Mean, "mean"}}}};
}

/// "cls" or "mean".
inline const char* to_string(Pooling pooling) {
  return enum_name(pooling);
}

/// Parses "cls" or "mean"; anything else is an error naming the accepted values.
inline Pooling pooling_from_string(const std::string& name) {
  return enum_from_name<Pooling>(name);
}

/// Mean of `hidden` [N, n + L, H] over the positions where `attention_mask` [N, L] is nonzero
/// (all positions when the mask is undefined). The first n positions (virtual prompt tokens put
/// in front of the input) always count.
inline torch::Tensor masked_mean(const torch::Tensor& hidden, const torch::Tensor& attention_mask) {
  if (!attention_mask.defined()) return hidden.mean(1);
  auto mask = attention_mask.to(hidden.scalar_type());
  const int64_t extra = hidden.size(1) - mask.size(1);
  check(extra >= 0 && mask.size(0) == hidden.size(0), "models::bert",
        "attention_mask of shape {} does not fit hidden states of shape {}",
        peft::detail::shape(mask.sizes()), peft::detail::shape(hidden.sizes()));
  if (extra > 0) mask = torch::cat({torch::ones({mask.size(0), extra}, mask.options()), mask}, 1);
  const auto weights = mask.unsqueeze(-1);
  return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0);
}

/// A new head Linear(hidden, num_labels), initialised as Hugging Face initialises one: N(0, 0.02)
/// weights, zero bias. num_labels must be positive.
inline torch::nn::Linear new_head(int64_t hidden, int64_t num_labels) {
  check(num_labels > 0, "models::bert", "num_labels must be positive, got {}", num_labels);
  torch::nn::Linear head(hidden, num_labels);
  torch::NoGradGuard no_grad;
  head->weight.normal_(0.0, 0.02);
  head->bias.zero_();
  return head;
}

/// Hugging Face's BertForSequenceClassification: dropout and a Linear(H, num_labels) on the
/// pooled output (BERT's [CLS] pooler by default, or the mean of the token states). Children
/// `bert` (frozen) and `classifier` (trainable). num_labels 1 means regression (one score per
/// example).
class BertForSequenceClassificationImpl : public torch::nn::Module {
 public:
  BertForSequenceClassificationImpl(Bert backbone, int64_t num_labels,
                                    Pooling pooling = Pooling::Cls)
      : torch::nn::Module("peft::models::BertForSequenceClassification"),
        bert(register_module("bert", std::move(backbone))),
        pooling(pooling) {
    dropout = register_module("dropout", torch::nn::Dropout(bert->config().head_dropout()));
    classifier = register_module("classifier", new_head(bert->config().hidden_size, num_labels));
  }

  /// A frozen backbone from a Hugging Face folder (its config edited by `adjust` if given; the
  /// head's dropout follows the adjusted classifier_dropout or hidden_dropout_prob) with a new
  /// head.
  static std::shared_ptr<BertForSequenceClassificationImpl> from_pretrained(
      const std::filesystem::path& folder, int64_t num_labels, Pooling pooling = Pooling::Cls,
      const ConfigAdjust& adjust = nullptr) {
    return std::make_shared<BertForSequenceClassificationImpl>(
        Bert::from_pretrained(folder, adjust), num_labels, pooling);
  }

  /// Logits [N, num_labels] (see BertImpl::forward for the inputs). With Pooling::Cls and
  /// cls_only_last_layer, the last encoder layer runs for the [CLS] position alone
  /// (BertImpl::forward_first).
  torch::Tensor forward(const torch::Tensor& input_ids, const torch::Tensor& attention_mask = {},
                        const torch::Tensor& token_type_ids = {}) {
    torch::Tensor pooled;
    if (pooling == Pooling::Mean) {
      pooled =
          masked_mean(bert->forward(input_ids, attention_mask, token_type_ids), attention_mask);
    } else if (cls_only_last_layer) {
      pooled = bert->pool(bert->forward_first(input_ids, 1, attention_mask, token_type_ids));
    } else {
      pooled = bert->pool(bert->forward(input_ids, attention_mask, token_type_ids));
    }
    return classifier(dropout(pooled));
  }

  int64_t num_labels() const { return classifier->options.out_features(); }

  Bert bert{nullptr};
  torch::nn::Dropout dropout{nullptr};
  torch::nn::Linear classifier{nullptr};
  /// How hidden states become the classifier's input.
  Pooling pooling = Pooling::Cls;
  /// With Pooling::Cls: run the last encoder layer for the [CLS] position only, the one position
  /// the pooler reads (true, the default), or for every position as Hugging Face's
  /// BertForSequenceClassification does (false). The logits and gradients are the same up to
  /// float rounding; in training mode the last layer's dropout draws masks for [CLS] alone, so a
  /// seeded run with dropout differs between the two settings.
  bool cls_only_last_layer = true;
};

/// Module holder of BertForSequenceClassificationImpl, with from_pretrained().
class BertForSequenceClassification
    : public torch::nn::ModuleHolder<BertForSequenceClassificationImpl> {
 public:
  using torch::nn::ModuleHolder<BertForSequenceClassificationImpl>::ModuleHolder;
  using torch::nn::ModuleHolder<BertForSequenceClassificationImpl>::get;

  /// A frozen backbone from a Hugging Face folder (its config edited by `adjust` if given) with a
  /// new head of `num_labels` outputs.
  static BertForSequenceClassification from_pretrained(const std::filesystem::path& folder,
                                                       int64_t num_labels,
                                                       Pooling pooling = Pooling::Cls,
                                                       const ConfigAdjust& adjust = nullptr) {
    return BertForSequenceClassification(
        BertForSequenceClassificationImpl::from_pretrained(folder, num_labels, pooling, adjust));
  }
};

}  // namespace models
PEFT_NAMESPACE_END
