#pragma once

// The one attention implementation every wrapper uses. It reproduces the arithmetic of LibTorch's
// F::multi_head_attention_forward (sequence-first [L, N, E], q scaled before q k^T, additive
// masks, -inf for padded keys) and, from LibTorch 2.0 on, runs the fused
// scaled_dot_product_attention kernel whenever no attention dropout has to be drawn.

#include <torch/nn/functional/activation.h>
#include <torch/nn/functional/dropout.h>
#include <torch/types.h>

#include <fmt/format.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include <peft/config.hpp>
#include <peft/core/error.hpp>
#include <peft/detail/shape.hpp>
#include <peft/detail/torch_compat.hpp>

PEFT_NAMESPACE_BEGIN
namespace functional {

namespace detail {
/// An attention mask as an additive float mask: bool masks mean "true = may not attend", as in
/// PyTorch's Python API (LibTorch's C++ MultiheadAttention adds a bool mask as 0/1 instead).
inline torch::Tensor additive_mask(const torch::Tensor& mask, torch::ScalarType dtype) {
  if (mask.scalar_type() == torch::kBool) {
    return torch::zeros(mask.sizes(), mask.options().dtype(dtype))
        .masked_fill(mask, -std::numeric_limits<float>::infinity());
  }
  return mask.to(dtype);
}
}  // namespace detail

/// Multi-head scaled dot-product attention over projected, unscaled inputs.
///
/// q: [L, N, E]; k, v: [S, N, E]; attn_mask: [L, S] (float additive or bool); key_padding_mask:
/// [N, S] (true = padding). Returns [L, N, E], before the output projection.
///
/// `batch_first`: q is [N, L, E], k and v [N, S, E], and the result [N, L, E]. This is the
/// layout the fused CPU kernel works in: its output and the gradients it returns for q, k and v
/// are then contiguous, where sequence-first tensors get them with batch-first strides and every
/// consumer has to copy them (docs/BENCHMARKS.md).
inline torch::Tensor attention(const torch::Tensor& q, const torch::Tensor& k,
                               const torch::Tensor& v, int64_t num_heads,
                               const torch::Tensor& attn_mask = {},
                               const torch::Tensor& key_padding_mask = {}, double dropout_p = 0.0,
                               bool training = false, bool batch_first = false) {
  check(q.dim() == 3, "attention", "queries have shape {}, expected {}",
        peft::detail::shape(q.sizes()), batch_first ? "[N, L, E]" : "[L, N, E]");
  const int64_t seq = batch_first ? 1 : 0, batch = 1 - seq;
  const int64_t L = q.size(seq), N = q.size(batch), E = q.size(2);
  const int64_t D = E / num_heads;
  check(D * num_heads == E, "attention", "embed_dim {} is not divisible by num_heads {}", E,
        num_heads);
  check(k.dim() == 3 && k.size(batch) == N && k.size(2) == E && v.sizes() == k.sizes(), "attention",
        "keys {} and values {} must both be {}", peft::detail::shape(k.sizes()),
        peft::detail::shape(v.sizes()),
        batch_first ? fmt::format("[{}, S, {}]", N, E) : fmt::format("[S, {}, {}]", N, E));
  const int64_t S = k.size(seq);
  if (attn_mask.defined()) {
    check(attn_mask.dim() == 2 && attn_mask.size(0) == L && attn_mask.size(1) == S, "attention",
          "attn_mask has shape {}, expected [{}, {}]", peft::detail::shape(attn_mask.sizes()), L,
          S);
  }
  torch::Tensor kpm;
  if (key_padding_mask.defined()) {
    check(key_padding_mask.dim() == 2 && key_padding_mask.size(0) == N &&
              key_padding_mask.size(1) == S,
          "attention", "key_padding_mask has shape {}, expected [{}, {}]",
          peft::detail::shape(key_padding_mask.sizes()), N, S);
    kpm = key_padding_mask.to(torch::kBool);
  }
  const auto dtype = q.scalar_type();

#if PEFT_HAS_SDPA
  if (!(training && dropout_p > 0.0)) {
    // [N, H, length, D] views of either layout.
    auto heads = [&](const torch::Tensor& t, int64_t length) {
      return batch_first ? t.view({N, length, num_heads, D}).transpose(1, 2)
                         : t.view({length, N, num_heads, D}).permute({1, 2, 0, 3});
    };
    auto qh = heads(q, L), kh = heads(k, S), vh = heads(v, S);
    torch::Tensor mask;
    if (attn_mask.defined()) mask = detail::additive_mask(attn_mask, dtype).view({1, 1, L, S});
    if (kpm.defined()) {
      auto pad = torch::zeros({N, 1, 1, S}, q.options())
                     .masked_fill(kpm.view({N, 1, 1, S}), -std::numeric_limits<float>::infinity());
      mask = mask.defined() ? mask + pad : pad;
    }
    // An undefined tensor inside the optional is an error: pass no mask at all instead.
    auto out = mask.defined() ? at::scaled_dot_product_attention(qh, kh, vh, mask, 0.0, false)
                              : at::scaled_dot_product_attention(qh, kh, vh);
    return batch_first ? out.transpose(1, 2).reshape({N, L, E})
                       : out.permute({2, 0, 1, 3}).reshape({L, N, E});
  }
#endif

  namespace F = torch::nn::functional;
  const double scaling = 1.0 / std::sqrt(static_cast<double>(D));
  // [N * H, length, D] of either layout.
  auto heads = [&](const torch::Tensor& t, int64_t length) {
    return batch_first ? t.reshape({N, length, num_heads, D})
                             .transpose(1, 2)
                             .reshape({N * num_heads, length, D})
                       : t.contiguous().view({length, N * num_heads, D}).transpose(0, 1);
  };
  auto qs = heads(q * scaling, L), ks = heads(k, S), vs = heads(v, S);
  auto weights = torch::bmm(qs, ks.transpose(1, 2));
  if (attn_mask.defined()) weights += detail::additive_mask(attn_mask, dtype).unsqueeze(0);
  if (kpm.defined()) {
    weights =
        weights.view({N, num_heads, L, S})
            .masked_fill(kpm.unsqueeze(1).unsqueeze(2), -std::numeric_limits<float>::infinity())
            .view({N * num_heads, L, S});
  }
  weights = F::softmax(weights, F::SoftmaxFuncOptions(-1));
  weights = F::dropout(weights, F::DropoutFuncOptions().p(dropout_p).training(training));
  auto out = torch::bmm(weights, vs);
  if (batch_first) return out.view({N, num_heads, L, D}).transpose(1, 2).reshape({N, L, E});
  return out.transpose(0, 1).contiguous().view({L, N, E});
}

}  // namespace functional
PEFT_NAMESPACE_END
