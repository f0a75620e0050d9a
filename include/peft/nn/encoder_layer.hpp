#pragma once

#include <torch/nn/modules/transformer.h>
#include <torch/nn/modules/transformerlayer.h>
#include <torch/nn/pimpl.h>

#include <functional>

#include <peft/config.hpp>
#include <peft/core/error.hpp>
#include <peft/core/parameters.hpp>
#include <peft/core/site.hpp>
#include <peft/detail/linear.hpp>
#include <peft/detail/shape.hpp>
#include <peft/detail/torch_compat.hpp>
#include <peft/nn/attention.hpp>

PEFT_NAMESPACE_BEGIN
namespace nn {

/// A frozen stock TransformerEncoderLayer (post-norm, sequence-first) run by peft. Sites:
/// `self_attn.{query,key,value,out_proj,prefix}`, `linear1` (FFN in), `linear2` (FFN out),
/// `attn_block` and `ffn_block` (each sub-layer's output after its dropout, before the residual
/// and LayerNorm — where bottleneck adapters go).
///
/// `batch_first`: inputs and outputs are [N, L, E] instead of [L, N, E] (see
/// nn::MultiheadAttention; the faster layout on the CPU).
class TransformerEncoderLayerImpl : public torch::nn::Module {
 public:
  /// `own_base`: register the stock layer as the child `base` (false when an encoder wrapper
  /// already registers it).
  explicit TransformerEncoderLayerImpl(torch::nn::TransformerEncoderLayer stock,
                                       bool own_base = true, bool batch_first = false)
      : torch::nn::Module("peft::nn::TransformerEncoderLayer"), base(std::move(stock)) {
    if (own_base) {
      register_module("base", base);
      freeze(*base);
    }
    self_attn =
        register_module("self_attn", MultiheadAttention(base->self_attn, false, batch_first));
    const int64_t E = base->options.d_model(), F = base->options.dim_feedforward();
    linear1 = register_module("linear1", Site(SiteKind::Linear, "linear1", E, F));
    linear2 = register_module("linear2", Site(SiteKind::Linear, "linear2", F, E));
    attn_block = register_module("attn_block", Site(SiteKind::Block, "attn_block", E, E));
    ffn_block = register_module("ffn_block", Site(SiteKind::Block, "ffn_block", E, E));
    linear1->set_frozen(base->linear1->weight, base->linear1->bias);
    linear2->set_frozen(base->linear2->weight, base->linear2->bias);
    activation_ = detail::layer_activation(base->options.activation());
  }

  /// src [L, N, E] ([N, L, E] with batch_first()); src_mask [L, L]; src_key_padding_mask [N, L]
  /// (true = padding).
  ///
  /// A non-contiguous src (e.g. a transposed tensor of the other layout) is copied to contiguous
  /// memory first: LibTorch's linear folds a contiguous 3-D input into one addmm with the bias
  /// fused, but falls back to matmul plus a separate bias add otherwise, in every projection.
  torch::Tensor forward(const torch::Tensor& input, const torch::Tensor& src_mask = {},
                        const torch::Tensor& src_key_padding_mask = {}) {
    const auto src = input.contiguous();
    return feed_forward(src, self_attn->forward(src, src, src, src_key_padding_mask, src_mask));
  }

  /// forward()'s first `rows` output positions only, [rows, N, E] ([N, rows, E] with
  /// batch_first()). Every position is still a key
  /// and a value, but queries, the attention output, the FFN and both LayerNorms run for those
  /// rows alone, so a caller that reads only the first position of the last layer (BERT's [CLS]
  /// pooler) skips most of that layer's work. Equal to forward().narrow(0, 0, rows) up to float
  /// rounding (the query projection is computed apart from the key/value one); in training mode
  /// dropout draws masks for these rows only. src_mask is the full [L, L] mask.
  torch::Tensor forward_first(const torch::Tensor& input, int64_t rows,
                              const torch::Tensor& src_mask = {},
                              const torch::Tensor& src_key_padding_mask = {}) {
    const int64_t seq = batch_first() ? 1 : 0;
    check(input.dim() == 3 && rows > 0 && rows <= input.size(seq), "nn::TransformerEncoderLayer",
          "forward_first: {} rows asked of an input of shape {} (expected [{}, E], 0 < rows <= "
          "L)",
          rows, peft::detail::shape(input.sizes()), batch_first() ? "N, L" : "L, N");
    const auto src = input.contiguous();
    // Contiguous so the query projection folds into one product (a copy of `rows` positions).
    const auto first = src.narrow(seq, 0, rows).contiguous();
    const auto mask = src_mask.defined() ? src_mask.narrow(0, 0, rows) : src_mask;
    return feed_forward(first, self_attn->forward(first, src, src, src_key_padding_mask, mask));
  }

  /// Whether forward() takes and returns [N, L, E].
  bool batch_first() const { return self_attn->batch_first(); }

  torch::nn::TransformerEncoderLayer base;
  MultiheadAttention self_attn{nullptr};
  Site linear1{nullptr}, linear2{nullptr}, attn_block{nullptr}, ffn_block{nullptr};

 private:
  /// The rest of the layer after self-attention: `src` the rows attended from ([R, N, E], or
  /// [N, R, E] batch-first), `a` their attention output.
  torch::Tensor feed_forward(const torch::Tensor& src, torch::Tensor a) {
    a = attn_block->adapt(src, base->dropout1(a));
    auto x = base->norm1(src + a);
    auto h = linear1->adapt(x, peft::detail::linear(x, base->linear1));
    h = base->dropout(activation_(h));
    auto f = linear2->adapt(h, peft::detail::linear(h, base->linear2));
    f = ffn_block->adapt(x, base->dropout2(f));
    return base->norm2(x + f);
  }

  std::function<torch::Tensor(const torch::Tensor&)> activation_;
};
TORCH_MODULE(TransformerEncoderLayer);

}  // namespace nn
PEFT_NAMESPACE_END
