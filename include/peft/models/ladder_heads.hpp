#pragma once

// Ladder Side-Tuning over models::Bert for sequence classification: BERT's embeddings and
// encoder run frozen and without autograd, a peft::Ladder side network reads the encoder's
// hidden states, and a new head classifies from the side network's output.

#include <torch/nn/modules/dropout.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>
#include <torch/types.h>
#include <torch/utils.h>

#include <cstdint>
#include <filesystem>
#include <memory>
#include <utility>

#include <peft/config.hpp>
#include <peft/core/error.hpp>
#include <peft/detail/shape.hpp>
#include <peft/methods/ladder.hpp>
#include <peft/models/bert.hpp>
#include <peft/models/heads.hpp>

PEFT_NAMESPACE_BEGIN
namespace models {

/// A classifier on a ladder side network beside a frozen BERT. Children: `bert` (frozen; its
/// embeddings and encoder run under NoGradGuard), `ladder` (peft::Ladder over `bert.encoder`:
/// downsamples, gates, side blocks, upsample), `dropout` and `classifier` (Linear(H, num_labels)).
/// Only the ladder and the classifier train. num_labels 1 means regression.
///
/// The ladder's backbone is `bert.encoder` itself; it is listed once, under `bert`, so methods
/// and parameter names see one encoder.
class BertLadderForSequenceClassificationImpl : public torch::nn::Module {
 public:
  BertLadderForSequenceClassificationImpl(Bert backbone, int64_t num_labels,
                                          const LadderOptions& options = LadderOptions(),
                                          Pooling pooling = Pooling::Cls)
      : torch::nn::Module("peft::models::BertLadderForSequenceClassification"),
        bert(register_module("bert", std::move(backbone))),
        pooling(pooling) {
    check(num_labels > 0, "models::bert", "num_labels must be positive, got {}", num_labels);
    ladder = register_module("ladder", Ladder(bert->encoder, options));
    ladder->unregister_module("backbone");
    dropout = register_module("dropout", torch::nn::Dropout(bert->config().head_dropout()));
    // Initialised like BertForSequenceClassification's head.
    classifier = register_module("classifier", new_head(bert->config().hidden_size, num_labels));
  }

  /// A frozen backbone from a Hugging Face folder with a new side network and head.
  static std::shared_ptr<BertLadderForSequenceClassificationImpl> from_pretrained(
      const std::filesystem::path& folder, int64_t num_labels,
      const LadderOptions& options = LadderOptions(), Pooling pooling = Pooling::Cls) {
    return std::make_shared<BertLadderForSequenceClassificationImpl>(Bert::from_pretrained(folder),
                                                                     num_labels, options, pooling);
  }

  /// Logits [N, num_labels] from input_ids [N, L], attention_mask [N, L] (1 = token, 0 =
  /// padding; all ones if undefined) and token_type_ids [N, L] (zeros if undefined). Padding
  /// positions are masked in the backbone and in the side blocks, and mean pooling skips them,
  /// so a sentence gets the same logits alone or padded in a batch.
  torch::Tensor forward(const torch::Tensor& input_ids, const torch::Tensor& attention_mask = {},
                        const torch::Tensor& token_type_ids = {}) {
    check(!attention_mask.defined() || attention_mask.sizes() == input_ids.sizes(), "models::bert",
          "attention_mask has shape {}, expected {} like input_ids",
          peft::detail::shape(attention_mask.sizes()), peft::detail::shape(input_ids.sizes()));
    torch::Tensor x;
    {
      // The embeddings are frozen too: no graph through them either.
      torch::NoGradGuard no_grad;
      x = bert->embed(input_ids, token_type_ids);
    }
    const auto padding = BertImpl::key_padding_mask(attention_mask, x.size(1) - input_ids.size(1));
    auto side = ladder->forward(x.transpose(0, 1), torch::Tensor(), padding).transpose(0, 1);
    auto pooled = pooling == Pooling::Mean ? masked_mean(side, attention_mask) : side.select(1, 0);
    return classifier(dropout(pooled));
  }

  int64_t num_labels() const { return classifier->options.out_features(); }

  Bert bert{nullptr};
  Ladder ladder{nullptr};
  torch::nn::Dropout dropout{nullptr};
  torch::nn::Linear classifier{nullptr};
  /// How the side network's output [N, L, H] becomes the classifier's input: Cls reads the first
  /// position (no pooler: BERT's was trained on the backbone's states, not the side network's),
  /// Mean averages the real tokens.
  Pooling pooling = Pooling::Cls;
};

/// Module holder of BertLadderForSequenceClassificationImpl, with from_pretrained():
///
///     auto model = peft::models::BertLadderForSequenceClassification::from_pretrained(
///         peft::models::default_model_dir(), 2, peft::LadderOptions().reduction_factor(8));
///     torch::optim::AdamW opt(peft::trainable_parameters(*model), 1e-3);
class BertLadderForSequenceClassification
    : public torch::nn::ModuleHolder<BertLadderForSequenceClassificationImpl> {
 public:
  using torch::nn::ModuleHolder<BertLadderForSequenceClassificationImpl>::ModuleHolder;
  using torch::nn::ModuleHolder<BertLadderForSequenceClassificationImpl>::get;

  /// A frozen backbone from a Hugging Face folder with a new side network and a head of
  /// `num_labels` outputs.
  static BertLadderForSequenceClassification from_pretrained(
      const std::filesystem::path& folder, int64_t num_labels,
      const LadderOptions& options = LadderOptions(), Pooling pooling = Pooling::Cls) {
    return BertLadderForSequenceClassification(
        BertLadderForSequenceClassificationImpl::from_pretrained(folder, num_labels, options,
                                                                 pooling));
  }
};

}  // namespace models
PEFT_NAMESPACE_END
