#pragma once

#include <torch/nn/modules/transformer.h>
#include <torch/nn/modules/transformerlayer.h>
#include <torch/nn/pimpl.h>

#include <functional>

#include <peft/config.hpp>
#include <peft/core/parameters.hpp>
#include <peft/core/site.hpp>
#include <peft/detail/linear.hpp>
#include <peft/detail/torch_compat.hpp>
#include <peft/nn/attention.hpp>

PEFT_NAMESPACE_BEGIN
namespace nn {

/// A frozen stock TransformerEncoderLayer (post-norm, sequence-first) run by peft. Sites:
/// `self_attn.{query,key,value,out_proj,prefix}`, `linear1` (FFN in), `linear2` (FFN out),
/// `attn_block` and `ffn_block` (each sub-layer's output after its dropout, before the residual
/// and LayerNorm — where bottleneck adapters go).
class TransformerEncoderLayerImpl : public torch::nn::Module {
 public:
  /// `own_base`: register the stock layer as the child `base` (false when an encoder wrapper
  /// already registers it).
  explicit TransformerEncoderLayerImpl(torch::nn::TransformerEncoderLayer stock,
                                       bool own_base = true)
      : torch::nn::Module("peft::nn::TransformerEncoderLayer"), base(std::move(stock)) {
    if (own_base) {
      register_module("base", base);
      freeze(*base);
    }
    self_attn = register_module("self_attn", MultiheadAttention(base->self_attn, false));
    const int64_t E = base->options.d_model(), F = base->options.dim_feedforward();
    linear1 = register_module("linear1", Site(SiteKind::Linear, "linear1", E, F));
    linear2 = register_module("linear2", Site(SiteKind::Linear, "linear2", F, E));
    attn_block = register_module("attn_block", Site(SiteKind::Block, "attn_block", E, E));
    ffn_block = register_module("ffn_block", Site(SiteKind::Block, "ffn_block", E, E));
    linear1->set_frozen(base->linear1->weight, base->linear1->bias);
    linear2->set_frozen(base->linear2->weight, base->linear2->bias);
    activation_ = detail::layer_activation(base->options.activation());
  }

  /// src [L, N, E]; src_mask [L, L]; src_key_padding_mask [N, L] (true = padding).
  ///
  /// A non-contiguous src (e.g. a transposed batch-first tensor) is copied to contiguous memory
  /// first: LibTorch's linear folds a contiguous 3-D input into one addmm with the bias fused,
  /// but falls back to matmul plus a separate bias add otherwise, in every projection.
  torch::Tensor forward(const torch::Tensor& input, const torch::Tensor& src_mask = {},
                        const torch::Tensor& src_key_padding_mask = {}) {
    const auto src = input.contiguous();
    auto a = self_attn->forward(src, src, src, src_key_padding_mask, src_mask);
    a = attn_block->adapt(src, base->dropout1(a));
    auto x = base->norm1(src + a);
    auto h = linear1->adapt(x, peft::detail::linear(x, base->linear1));
    h = base->dropout(activation_(h));
    auto f = linear2->adapt(h, peft::detail::linear(h, base->linear2));
    f = ffn_block->adapt(x, base->dropout2(f));
    return base->norm2(x + f);
  }

  torch::nn::TransformerEncoderLayer base;
  MultiheadAttention self_attn{nullptr};
  Site linear1{nullptr}, linear2{nullptr}, attn_block{nullptr}, ffn_block{nullptr};

 private:
  std::function<torch::Tensor(const torch::Tensor&)> activation_;
};
TORCH_MODULE(TransformerEncoderLayer);

}  // namespace nn
PEFT_NAMESPACE_END
