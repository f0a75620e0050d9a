#pragma once

#include <torch/nn/functional/linear.h>
#include <torch/nn/modules/activation.h>
#include <torch/nn/pimpl.h>

#include <c10/core/GradMode.h>

#include <fmt/format.h>

#include <cstdint>
#include <utility>

#include <peft/config.hpp>
#include <peft/core/error.hpp>
#include <peft/core/parameters.hpp>
#include <peft/core/site.hpp>
#include <peft/detail/linear.hpp>
#include <peft/detail/shape.hpp>
#include <peft/functional/attention.hpp>

PEFT_NAMESPACE_BEGIN
namespace nn {

/// A frozen stock MultiheadAttention (sequence-first [L, N, E]) whose forward is run by peft,
/// with sites `query`, `key`, `value` (after the packed in-projection, before scaling), `out_proj`
/// and `prefix` (key/value rows put in front of the projected keys and values).
///
/// Returns the attention output only (the stock module also returns averaged weights).
///
/// With `batch_first` the inputs and the output are [N, L, E] instead (like PyTorch's
/// `batch_first=True`; LibTorch's C++ module has no such option). Same arithmetic; on the CPU it
/// is the faster layout, since the fused attention kernel works batch-first (see
/// functional::attention), and it is what models::Bert runs.
class MultiheadAttentionImpl : public torch::nn::Module {
 public:
  /// `own_base`: register the stock module as the child `base`. A wrapper that already registers
  /// the module's owner (e.g. the encoder layer) passes false so no tensor is registered twice.
  explicit MultiheadAttentionImpl(torch::nn::MultiheadAttention stock, bool own_base = true,
                                  bool batch_first = false)
      : torch::nn::Module("peft::nn::MultiheadAttention"),
        base(std::move(stock)),
        batch_first_(batch_first) {
    const auto& o = base->options;
    check(base->_qkv_same_embed_dim, "nn::MultiheadAttention",
          "kdim/vdim different from embed_dim ({}) are not supported", o.embed_dim());
    check(!o.add_bias_kv(), "nn::MultiheadAttention", "add_bias_kv is not supported");
    check(!o.add_zero_attn(), "nn::MultiheadAttention", "add_zero_attn is not supported");
    if (own_base) {
      register_module("base", base);
      freeze(*base);
    }
    const int64_t E = o.embed_dim();
    query = register_module("query", Site(SiteKind::Linear, "query", E, E));
    key = register_module("key", Site(SiteKind::Linear, "key", E, E));
    value = register_module("value", Site(SiteKind::Linear, "value", E, E));
    out_proj = register_module("out_proj", Site(SiteKind::Linear, "out_proj", E, E));
    prefix = register_module("prefix", Site(SiteKind::Attention, "prefix", E, E));
    const auto& w = base->in_proj_weight;
    const auto& b = base->in_proj_bias;
    Site* sites[] = {&query, &key, &value};
    for (int64_t i = 0; i < 3; ++i) {
      (*sites[i])->set_frozen(w.narrow(0, i * E, E),
                              b.defined() ? b.narrow(0, i * E, E) : torch::Tensor());
    }
    out_proj->set_frozen(base->out_proj->weight, base->out_proj->bias);
  }

  /// query [L, N, E], key and value [S, N, E]; key_padding_mask [N, S] (true = padding);
  /// attn_mask [L, S] (additive float, or bool with true = may not attend). With batch_first():
  /// query [N, L, E], key and value [N, S, E], and the output [N, L, E].
  torch::Tensor forward(const torch::Tensor& q_in, const torch::Tensor& k_in,
                        const torch::Tensor& v_in, const torch::Tensor& key_padding_mask = {},
                        const torch::Tensor& attn_mask = {}) {
    const int64_t E = base->options.embed_dim();
    const int64_t batch = batch_first_ ? 0 : 1;
    check(q_in.dim() == 3 && q_in.size(2) == E, "nn::MultiheadAttention",
          "query has shape {}, expected [{}, {}]", peft::detail::shape(q_in.sizes()),
          batch_first_ ? "N, L" : "L, N", E);
    check(k_in.dim() == 3 && k_in.size(2) == E && v_in.sizes() == k_in.sizes() &&
              k_in.size(batch) == q_in.size(batch),
          "nn::MultiheadAttention", "key {} and value {} must both be {}",
          peft::detail::shape(k_in.sizes()), peft::detail::shape(v_in.sizes()),
          batch_first_ ? fmt::format("[{}, S, {}]", q_in.size(0), E)
                       : fmt::format("[S, {}, {}]", q_in.size(1), E));
    const auto& w = base->in_proj_weight;
    const auto& b = base->in_proj_bias;
    auto slice = [&](int64_t from, int64_t count) {
      return std::make_pair(w.narrow(0, from, count),
                            b.defined() ? b.narrow(0, from, count) : torch::Tensor());
    };
    // With autograd recording and frozen projections, q, k and v come out as separate tensors
    // (frozen_split_linear): one a method replaces is freed, and the backward needs no
    // concatenation. Otherwise one packed product and views into it.
    const bool split =
        c10::GradMode::is_enabled() && !w.requires_grad() && !(b.defined() && b.requires_grad());
    auto project = [&](const torch::Tensor& x, int64_t from, int64_t chunks) {
      auto [wp, bp] = slice(from, chunks * E);
      return split ? peft::detail::frozen_split_linear(x, wp, bp, chunks)
                   : peft::detail::linear(x, wp, bp).chunk(chunks, -1);
    };
    torch::Tensor q, k, v;
    if (q_in.is_same(k_in) && k_in.is_same(v_in)) {
      auto qkv = project(q_in, 0, 3);
      q = qkv[0];
      k = qkv[1];
      v = qkv[2];
    } else {
      q = project(q_in, 0, 1)[0];
      if (k_in.is_same(v_in)) {
        auto kv = project(k_in, E, 2);
        k = kv[0];
        v = kv[1];
      } else {
        k = project(k_in, E, 1)[0];
        v = project(v_in, 2 * E, 1)[0];
      }
    }
    q = query->adapt(q_in, q);
    k = key->adapt(k_in, k);
    v = value->adapt(v_in, v);

    torch::Tensor kpm = key_padding_mask, mask = attn_mask;
    auto [pk, pv] = prefix->prefix_rows();
    if (pk.defined()) {
      const int64_t n = pk.size(0), N = q_in.size(batch), seq = 1 - batch;
      auto rows = [&](const torch::Tensor& p, const torch::Tensor& like) {
        return (batch_first_ ? p.unsqueeze(0).expand({N, n, E}) : p.unsqueeze(1).expand({n, N, E}))
            .to(like.scalar_type());
      };
      k = torch::cat({rows(pk, k), k}, seq);
      v = torch::cat({rows(pv, v), v}, seq);
      // Prefix rows are always visible.
      if (kpm.defined()) {
        kpm = torch::cat({torch::zeros({N, n}, kpm.options()), kpm}, 1);
      }
      if (mask.defined()) {
        mask = torch::cat({torch::zeros({mask.size(0), n}, mask.options()), mask}, 1);
      }
    }
    auto attended = functional::attention(q, k, v, base->options.num_heads(), mask, kpm,
                                          base->options.dropout(), is_training(), batch_first_);
    auto out = peft::detail::linear(attended, base->out_proj->weight, base->out_proj->bias);
    return out_proj->adapt(attended, out);
  }

  /// Whether forward() takes and returns [N, L, E] (see the class comment).
  bool batch_first() const { return batch_first_; }

  torch::nn::MultiheadAttention base;
  Site query{nullptr}, key{nullptr}, value{nullptr}, out_proj{nullptr}, prefix{nullptr};

 private:
  bool batch_first_ = false;
};
TORCH_MODULE(MultiheadAttention);

}  // namespace nn
PEFT_NAMESPACE_END
