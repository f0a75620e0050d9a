#pragma once

// Ladder Side-Tuning on Llama-family decoders: a narrow decoder beside the frozen one. The side
// network reads downsampled copies of the decoder's hidden states through gates, as on BERT
// (methods/ladder.hpp), but its blocks are small Llama layers (pre-norm RMSNorm, causal
// self-attention with rotary positions, SwiGLU), so it is causal like the decoder and keeps its
// own key/value cache for generation. Its output is upsampled and added to the decoder's final
// hidden state; the upsample starts at zero, so the model computes exactly what the decoder
// computes until the side network trains.
//
//     auto lm = peft::models::Llama::from_pretrained("SmolLM2-135M-Instruct.Q4_1.gguf");
//     peft::models::attach_ladder(*lm, peft::LadderOptions().reduction_factor(8));
//     // or by name: peft::attach(*lm, "lst", {{"reduction_factor", 8}});
//     torch::optim::AdamW opt(peft::trainable_parameters(*lm), 3e-3);

#include <torch/nn/functional/dropout.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>
#include <torch/types.h>

#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <peft/config.hpp>
#include <peft/core/error.hpp>
#include <peft/core/parameters.hpp>
#include <peft/detail/linear.hpp>
#include <peft/detail/torch_compat.hpp>
#include <peft/methods/ladder.hpp>
#include <peft/models/llama.hpp>

PEFT_NAMESPACE_BEGIN
namespace models {

/// One side block: a Llama decoder layer of width d with h heads (no grouping: each head has its
/// own keys and values), feed-forward size f and no biases,
///
///     x = x + dropout(o_proj(attention(rope(q_proj(a)), rope(k_proj(a)), v_proj(a))))
///     x = x + dropout(down_proj(silu(gate_proj(m)) * up_proj(m)))
///
/// with a = input_layernorm(x), m = post_attention_layernorm(x) (RMSNorm), causal attention
/// under the decoder's mask, and rotary angles of the decoder's base for head size d / h.
class LlamaSideBlockImpl : public torch::nn::Module {
 public:
  LlamaSideBlockImpl(int64_t width, int64_t heads, int64_t dim_feedforward, double eps,
                     double dropout)
      : torch::nn::Module("peft::models::LlamaSideBlock"), heads_(heads), dropout_(dropout) {
    check(width > 0 && heads > 0 && width % heads == 0 && (width / heads) % 2 == 0 &&
              dim_feedforward > 0,
          LadderOptions::method,
          "a decoder side block needs a width divisible by its heads into an even head size "
          "(rotary positions turn pairs) and a positive feed-forward size, got width {}, heads "
          "{}, feed-forward {}",
          width, heads, dim_feedforward);
    auto proj = [&](const char* name, int64_t in, int64_t out) {
      return register_module(name,
                             torch::nn::Linear(torch::nn::LinearOptions(in, out).bias(false)));
    };
    input_layernorm = register_module("input_layernorm", RMSNorm(width, eps));
    q_proj = proj("q_proj", width, width);
    k_proj = proj("k_proj", width, width);
    v_proj = proj("v_proj", width, width);
    o_proj = proj("o_proj", width, width);
    post_attention_layernorm = register_module("post_attention_layernorm", RMSNorm(width, eps));
    gate_proj = proj("gate_proj", width, dim_feedforward);
    up_proj = proj("up_proj", width, dim_feedforward);
    down_proj = proj("down_proj", dim_feedforward, width);
  }

  /// x [N, L, d]; cos, sin [N or 1, 1, L, d / h]; mask [N, 1, L, past + L] additive. Appends this
  /// step's keys and values to `*cache_k`/`*cache_v` when given.
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                        const torch::Tensor& mask, torch::Tensor* cache_k = nullptr,
                        torch::Tensor* cache_v = nullptr) {
    namespace F = torch::nn::functional;
    auto drop = [&](const torch::Tensor& t) {
      return F::dropout(t, F::DropoutFuncOptions().p(dropout_).training(is_training()));
    };
    const int64_t N = x.size(0), L = x.size(1), d = x.size(2), D = d / heads_;
    auto a = input_layernorm(x);
    auto heads = [&](const torch::Tensor& t) { return t.view({N, L, heads_, D}).transpose(1, 2); };
    auto q = heads(q_proj(a)), k = heads(k_proj(a)), v = heads(v_proj(a));
    q = q * cos + detail::rotate_half(q) * sin;
    k = k * cos + detail::rotate_half(k) * sin;
    if (cache_k != nullptr) {
      if (cache_k->defined()) {
        k = torch::cat({*cache_k, k}, 2);
        v = torch::cat({*cache_v, v}, 2);
      }
      *cache_k = k.detach();
      *cache_v = v.detach();
    }
    const double p = is_training() ? dropout_ : 0.0;
#if PEFT_HAS_SDPA
    auto out = at::scaled_dot_product_attention(q, k, v, mask, p);
#else
    auto scores = torch::matmul(q, k.transpose(-2, -1)) / std::sqrt(static_cast<double>(D));
    auto out = torch::matmul(drop(torch::softmax(scores + mask, -1)), v);
    (void)p;
#endif
    auto h = x + drop(o_proj(out.transpose(1, 2).reshape({N, L, d})));
    auto m = post_attention_layernorm(h);
    return h + drop(down_proj(torch::silu(gate_proj(m)) * up_proj(m)));
  }

  int64_t heads() const {
    return heads_;
  }
  int64_t dim_feedforward() const {
    return gate_proj->weight.size(0);
  }

  RMSNorm input_layernorm{nullptr}, post_attention_layernorm{nullptr};
  torch::nn::Linear q_proj{nullptr}, k_proj{nullptr}, v_proj{nullptr}, o_proj{nullptr};
  torch::nn::Linear gate_proj{nullptr}, up_proj{nullptr}, down_proj{nullptr};

 private:
  int64_t heads_;
  double dropout_;
};
TORCH_MODULE(LlamaSideBlock);

namespace detail {

/// Structured pruning of a decoder layer into a side block of width d, h heads and feed-forward
/// size f, by weight magnitude (LadderInit::Pruned). The d model-width units with the largest
/// summed |w| over the columns of q, k, v, gate and up that read them are kept (in order). The
/// attention keeps whole rotary pairs (rows t and t + D/2 of one query head, with the rows of the
/// key and value head that query head reads), the d/2 pairs of largest summed |w| over the kept
/// units, in (head, pair) order, d/(2h) to a side head; o_proj keeps the matching columns. The
/// feed-forward keeps the f rows of gate and up (and columns of down) of largest summed |w|. The
/// side block's rotary angles are those of its own head size: with d = H and h = the decoder's
/// heads (reduction 1), every unit, pair and row is kept in order and the side block computes the
/// decoder layer (grouped keys and values copied to each query head).
inline void prune_llama_layer(const LlamaDecoderLayerImpl& from, LlamaSideBlockImpl& to,
                              int64_t query_heads, int64_t kv_heads) {
  torch::NoGradGuard no_grad;
  const auto& Wq = from.self_attn->q_proj->base->weight;
  const auto& Wk = from.self_attn->k_proj->base->weight;
  const auto& Wv = from.self_attn->v_proj->base->weight;
  const auto& Wo = from.self_attn->o_proj->base->weight;
  const auto& Wg = from.mlp->gate_proj->base->weight;
  const auto& Wu = from.mlp->up_proj->base->weight;
  const auto& Wd = from.mlp->down_proj->base->weight;
  const int64_t d = to.q_proj->weight.size(0), h = to.heads(), f = to.dim_feedforward();
  const int64_t D = Wq.size(0) / query_heads, half = D / 2, side_half = d / h / 2;
  auto units = peft::detail::top_indices(
      Wq.abs().sum(0) + Wk.abs().sum(0) + Wv.abs().sum(0) + Wg.abs().sum(0) + Wu.abs().sum(0), d);
  // Score of each (query head, rotary pair): both rows of q, k and v over the kept units.
  auto pair_score = [&](const torch::Tensor& w, int64_t n_heads) {
    return w.index_select(1, units).abs().sum(1).view({n_heads, 2, half}).sum(1);
  };
  const int64_t group = query_heads / kv_heads;
  auto score = pair_score(Wq, query_heads) +
               (pair_score(Wk, kv_heads) + pair_score(Wv, kv_heads)).repeat_interleave(group, 0);
  auto pairs = peft::detail::top_indices(score.reshape({-1}), d / 2);  // ascending (head, pair)
  auto head_of = pairs.div(half, "floor"), t = pairs.remainder(half);
  auto kv_of = head_of.div(group, "floor");
  // Side head s: its pairs' first rows, then their second rows (rotate_half's layout).
  auto rows = [&](const torch::Tensor& base) {
    auto first = (base * D + t).view({h, side_half});
    return torch::cat({first, first + half}, 1).reshape({-1});
  };
  const auto q_rows = rows(head_of), kv_rows = rows(kv_of);
  auto ffn = peft::detail::top_indices(
      Wg.index_select(1, units).abs().sum(1) + Wu.index_select(1, units).abs().sum(1), f);
  to.q_proj->weight.copy_(Wq.index_select(0, q_rows).index_select(1, units));
  to.k_proj->weight.copy_(Wk.index_select(0, kv_rows).index_select(1, units));
  to.v_proj->weight.copy_(Wv.index_select(0, kv_rows).index_select(1, units));
  to.o_proj->weight.copy_(Wo.index_select(0, units).index_select(1, q_rows));
  to.gate_proj->weight.copy_(Wg.index_select(0, ffn).index_select(1, units));
  to.up_proj->weight.copy_(Wu.index_select(0, ffn).index_select(1, units));
  to.down_proj->weight.copy_(Wd.index_select(0, units).index_select(1, ffn));
  to.input_layernorm->weight.copy_(from.input_layernorm->weight.index_select(0, units));
  to.post_attention_layernorm->weight.copy_(
      from.post_attention_layernorm->weight.index_select(0, units));
}

}  // namespace detail

/// Ladder Side-Tuning's side network beside a Llama decoder (see the header comment). Children:
/// `downsample.<i>` (Linear H -> H/r for the embeddings and each selected layer), `gates` (alpha,
/// one per side block; mu = sigmoid(alpha / T) keeps the side state, 1 - mu takes the ladder),
/// `side.<i>` (LlamaSideBlock of width H/r), `final_norm` (RMSNorm) and `upsample` (Linear
/// H/r -> H, zero at the start).
class LlamaLadderImpl : public LlamaSideImpl {
 public:
  LlamaLadderImpl(LlamaImpl& decoder, const LadderOptions& options)
      : LlamaSideImpl("peft::models::LlamaLadder"), options_(options) {
    options.validate();
    const auto& c = decoder.config();
    const int64_t H = c.hidden_size, n_layers = c.num_hidden_layers;
    check(options.block() != LadderBlock::T5, LadderOptions::method,
          "side_block t5 is for encoders; a Llama decoder's side blocks are Llama layers "
          "(side_block llama)");
    check(options.importance().empty(), LadderOptions::method,
          "importance scores are for BERT layers; on a Llama decoder the pruned start ranks by "
          "weight magnitude");
    const int64_t width = H / options.reduction_factor();
    check(width > 0 && width * options.reduction_factor() == H, LadderOptions::method,
          "reduction_factor {} must divide the model width {}", options.reduction_factor(), H);
    selected_ = options.layers();
    if (selected_.empty()) {
      for (int64_t i = 0; i < n_layers; ++i) selected_.push_back(i);
    }
    for (size_t i = 0; i < selected_.size(); ++i) {
      check(selected_[i] >= 0 && selected_[i] < n_layers, LadderOptions::method,
            "layer {} is outside the decoder's {} layers", selected_[i], n_layers);
      check(i == 0 || selected_[i] > selected_[i - 1], LadderOptions::method,
            "layers must be increasing, got {} after {}", selected_[i], selected_[i - 1]);
    }
    heads_ = options.side_heads();
    if (heads_ == 0) {
      heads_ = 1;
      for (int64_t n : {2, 4, 8}) {
        if (width % n == 0 && (width / n) % 2 == 0 && n <= c.num_attention_heads) heads_ = n;
      }
    }
    check(width % heads_ == 0 && (width / heads_) % 2 == 0, LadderOptions::method,
          "side_heads {} must divide the side width {} into an even head size", heads_, width);
    dim_feedforward_ = std::max<int64_t>(1, c.intermediate_size / options.reduction_factor());
    dropout_ = options.dropout().value_or(0.0);
    downsample = register_module("downsample", torch::nn::ModuleList());
    side_blocks = register_module("side", torch::nn::ModuleList());
    for (size_t i = 0; i <= selected_.size(); ++i)
      downsample->push_back(torch::nn::Linear(H, width));
    for (auto layer : selected_) {
      LlamaSideBlock block(width, heads_, dim_feedforward_, c.rms_norm_eps, dropout_);
      if (options.init() == LadderInit::Pruned) {
        detail::prune_llama_layer(decoder.layer(static_cast<size_t>(layer)), *block,
                                  c.num_attention_heads, c.num_key_value_heads);
      }
      side_blocks->push_back(block);
    }
    gates = register_parameter("gates", torch::zeros({static_cast<int64_t>(selected_.size())}));
    final_norm = register_module("final_norm", RMSNorm(width, c.rms_norm_eps));
    upsample = register_module("upsample", torch::nn::Linear(width, H));
    {
      torch::NoGradGuard no_grad;
      upsample->weight.zero_();
      upsample->bias.zero_();
    }
    const int64_t D = width / heads_;
    inv_freq_ =
        1.0 / torch::pow(c.rope_theta, torch::arange(0, D, 2, torch::kLong).to(torch::kFloat) /
                                           static_cast<double>(D));
    if (c.rope_scaling_factor != 1.0) inv_freq_ = inv_freq_ / c.rope_scaling_factor;
  }

  const std::vector<int64_t>& layers() const override { return selected_; }

  torch::Tensor side(const LlamaSideInput& in) override {
    auto down = [&](size_t i, const torch::Tensor& x) {
      const auto& m = *downsample->ptr<torch::nn::LinearImpl>(i);
      return peft::detail::linear(x, m.weight, m.bias);
    };
    const auto dtype = in.states[0].scalar_type();
    auto freqs = in.positions.unsqueeze(-1) * inv_freq_.to(in.positions.device()).view({1, 1, -1});
    auto emb = torch::cat({freqs, freqs}, -1);
    auto cos = emb.cos().to(dtype).unsqueeze(1), sin = emb.sin().to(dtype).unsqueeze(1);
    if (in.cache != nullptr && in.cache->side_keys.empty()) {
      in.cache->side_keys.resize(selected_.size());
      in.cache->side_values.resize(selected_.size());
    }
    auto h = down(0, in.states[0]);
    for (size_t i = 0; i < selected_.size(); ++i) {
      auto mu = torch::sigmoid(gates[static_cast<int64_t>(i)] / options_.gate_temperature());
      h = mu * h + (1 - mu) * down(i + 1, in.states[static_cast<size_t>(selected_[i]) + 1]);
      auto& block = *side_blocks->ptr<LlamaSideBlockImpl>(i);
      h = in.cache != nullptr ? block.forward(h, cos, sin, in.mask, &in.cache->side_keys[i],
                                              &in.cache->side_values[i])
                              : block.forward(h, cos, sin, in.mask);
    }
    namespace F = torch::nn::functional;
    h = F::dropout(final_norm(h), F::DropoutFuncOptions().p(dropout_).training(is_training()));
    return peft::detail::linear(h, upsample->weight, upsample->bias);
  }

  /// The options the side network was built with.
  const LadderOptions& options() const { return options_; }
  int64_t side_width() const { return upsample->weight.size(1); }
  int64_t side_heads() const { return heads_; }
  int64_t side_dim_feedforward() const { return dim_feedforward_; }
  double side_dropout() const { return dropout_; }

  torch::nn::ModuleList downsample{nullptr}, side_blocks{nullptr};
  torch::Tensor gates;
  RMSNorm final_norm{nullptr};
  torch::nn::Linear upsample{nullptr};

 private:
  LadderOptions options_;
  std::vector<int64_t> selected_;
  int64_t heads_ = 0, dim_feedforward_ = 0;
  double dropout_ = 0;
  torch::Tensor inv_freq_;
};
TORCH_MODULE(LlamaLadder);

/// Builds a ladder side network beside `decoder` (child `ladder`) and returns it. The decoder
/// must have nothing trainable (it then runs without autograd; a method attached to it would not
/// train) and no ladder yet. LadderOptions apply as on BERT, except: the side blocks are Llama
/// layers (block() PostNorm, the default, or Llama; T5 is refused), the pruned start ranks by
/// weight magnitude (importance() must be empty), and dropout() unset means none (Llama has no
/// dropout).
inline LlamaLadder attach_ladder(LlamaImpl& decoder, const LadderOptions& options = {}) {
  check(!decoder.side, LadderOptions::method, "the decoder already has a ladder side network");
  const auto trainable = trainable_parameters(decoder);
  check(trainable.empty(), LadderOptions::method,
        "the decoder has {} trainable parameter tensors (a method attached?); Ladder Side-Tuning "
        "runs the decoder without autograd and trains its side network alone",
        trainable.size());
  LlamaLadder ladder(decoder, options);
  const auto& reference = decoder.embed_tokens->weight;
  ladder->to(reference.device(), reference.scalar_type());
  decoder.set_side(ladder.ptr());
  return ladder;
}

}  // namespace models
PEFT_NAMESPACE_END
