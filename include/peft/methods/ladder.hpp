#pragma once

// Ladder Side-Tuning (Sung et al., NeurIPS 2022): a narrow side network beside a frozen backbone.
// The backbone runs without autograd, so no graph and no activations are kept through it; the side
// network reads downsampled copies of the backbone's hidden states ("ladders"), mixes them into
// its own state with a learned gate mu = sigmoid(alpha / T) per side layer, runs its own small
// transformer blocks and is upsampled back to the model width for the task head.

#include <torch/arg.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/nn/functional/dropout.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/normalization.h>
#include <torch/nn/modules/transformerlayer.h>
#include <torch/nn/pimpl.h>
#include <torch/types.h>
#include <torch/utils.h>

#include <algorithm>
#include <optional>
#include <cmath>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include <peft/config.hpp>
#include <peft/core/enum_names.hpp>
#include <peft/core/error.hpp>
#include <peft/detail/linear.hpp>
#include <peft/detail/shape.hpp>
#include <peft/detail/torch_compat.hpp>
#include <peft/functional/attention.hpp>
#include <peft/nn/encoder.hpp>

PEFT_NAMESPACE_BEGIN

/// How the side blocks start.
enum class LadderInit {
  Random,  ///< fresh initialisation of every side weight
  Pruned,  ///< structured pruning of the backbone layer each side block sits beside
};

/// What the side network's blocks are.
enum class LadderBlock {
  /// The backbone's own kind: a stock post-norm TransformerEncoderLayer (attention + FFN, with
  /// biases and LayerNorms). Saved as side_block "transformer_encoder_layer".
  PostNorm,
  /// The LST paper's block (its side network is made of T5 blocks): pre-norm residual sub-layers
  /// x + attn(rms(x)), x + ffn(rms(x)) with T5's RMS norm (scale only), projections without
  /// biases, and one more RMS norm after the last block. Saved as side_block "t5". See T5SideBlock.
  T5,
  /// A Llama decoder layer at the side width (pre-norm RMSNorm, causal attention with rotary
  /// positions, SwiGLU, no biases): the side blocks beside a Llama decoder
  /// (models/llama_ladder.hpp), and only there. Saved as side_block "llama".
  Llama,
};

/// Per-weight importance scores of one backbone layer, shaped like its weights: what structured
/// pruning ranks rows and columns by. Weight magnitude |w| unless given (see fisher_importance()).
struct LayerImportance {
  torch::Tensor in_proj_weight;  ///< [3E, E], like self_attn.in_proj_weight
  torch::Tensor linear1_weight;  ///< [F, E], like linear1.weight
};

/// The name of a side block kind in adapter files and on command lines: "transformer_encoder_layer"
/// (PostNorm), "t5" or "llama".
constexpr EnumTable<LadderBlock, 3> enum_table(LadderBlock) {
  return {"side block",
          "lst",
          {{{LadderBlock::PostNorm, "transformer_encoder_layer"},
            {LadderBlock::T5, "t5"},
            {LadderBlock::Llama, "llama"}}}};
}

/// The name of a side network's start in adapter options and on command lines: "pruned" or
/// "random".
constexpr EnumTable<LadderInit, 2> enum_table(LadderInit) {
  return {"side network start",
          "lst",
          {{{LadderInit::Pruned, "pruned"}, {LadderInit::Random, "random"}}}};
}

inline std::string to_string(LadderBlock block) {
  return enum_name(block);
}

/// The LadderBlock called `name` (see to_string(LadderBlock)); throws peft::Error naming the
/// known names otherwise.
inline LadderBlock ladder_block_from_string(const std::string& name) {
  return enum_from_name<LadderBlock>(name);
}

/// Options of Ladder Side-Tuning.
struct LadderOptions {
  /// Side width = model width / reduction_factor.
  TORCH_ARG(int64_t, reduction_factor) = 8;
  /// Gate temperature T in mu = sigmoid(alpha / T); alpha starts at 0, so mu starts at 0.5.
  TORCH_ARG(double, gate_temperature) = 0.1;
  /// Backbone layers that feed the side network (layer dropping); empty = every layer.
  TORCH_ARG(std::vector<int64_t>, layers);
  /// Attention heads of each side block (0 = the largest of 1, 2, 4, 8 that divides the width,
  /// at most the backbone's head count).
  TORCH_ARG(int64_t, side_heads) = 0;
  TORCH_ARG(LadderInit, init) = LadderInit::Pruned;
  /// The side blocks' kind. Beside a Llama decoder they are Llama layers: PostNorm (the default:
  /// the backbone's own kind) and Llama give those there, T5 is refused; BERT refuses Llama.
  TORCH_ARG(LadderBlock, block) = LadderBlock::PostNorm;
  /// Dropout in the side network (each side block's attention probabilities and sub-layer
  /// outputs, and after the T5 blocks' final norm); nullopt = the backbone layers' rate.
  TORCH_ARG(std::optional<double>, dropout) = std::nullopt;
  /// Pruned init: per-weight importance of each backbone layer (one entry per backbone layer,
  /// e.g. from peft::fisher_importance()); empty = weight magnitude.
  TORCH_ARG(std::vector<LayerImportance>, importance);

 public:
  static constexpr const char* method = "lst";
  void validate() const {
    check(reduction_factor_ > 0, method, "reduction_factor must be positive, got {}",
          reduction_factor_);
    check(gate_temperature_ > 0, method, "gate_temperature must be positive, got {}",
          gate_temperature_);
    check(side_heads_ >= 0, method, "side_heads must not be negative, got {}", side_heads_);
    check(!dropout_ || (*dropout_ >= 0 && *dropout_ < 1), method,
          "dropout must be in [0, 1), got {}", dropout_.value_or(0));
  }
};

namespace detail {

/// Indices of the `count` largest entries of `importance` (1-D), in ascending index order so the
/// side network keeps the backbone's feature order.
inline torch::Tensor top_indices(const torch::Tensor& importance, int64_t count) {
  auto picked = std::get<1>(importance.topk(count));
  return std::get<0>(picked.sort());
}

/// The narrower copies of one stock layer's tensors that structured pruning keeps. Every score is
/// a sum of per-weight importances (`importance`, or |w| where it is undefined): model-width units
/// by the importance of the q/k/v and FFN-in columns that read them, attention rows by the summed
/// importance of their q, k and v rows (pruned together, so heads keep matching queries, keys and
/// values), FFN rows by theirs; every next matrix keeps the columns that follow the kept rows.
struct PrunedLayer {
  torch::Tensor in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias;
  torch::Tensor linear1_weight, linear1_bias, linear2_weight, linear2_bias;
  torch::Tensor norm1_weight, norm1_bias, norm2_weight, norm2_bias;
};

/// Prunes `from` to width `d` and feed-forward size `f` (see PrunedLayer).
inline PrunedLayer prune_layer(const torch::nn::TransformerEncoderLayerImpl& from, int64_t d,
                               int64_t f, const LayerImportance& importance = LayerImportance()) {
  torch::NoGradGuard no_grad;
  const int64_t D = from.options.d_model();
  const auto& w = from.self_attn->in_proj_weight;
  const auto& b = from.self_attn->in_proj_bias;
  auto score = [](const torch::Tensor& given, const torch::Tensor& weight, const char* name) {
    if (!given.defined()) return weight.abs();
    check(given.sizes() == weight.sizes(), LadderOptions::method,
          "importance of {} has shape {}, expected {}", name, detail::shape(given.sizes()),
          detail::shape(weight.sizes()));
    return given.to(weight.device(), weight.scalar_type());
  };
  auto s_in = score(importance.in_proj_weight, w, "in_proj_weight");
  auto s_ffn = score(importance.linear1_weight, from.linear1->weight, "linear1.weight");
  auto units = top_indices(s_in.sum(0) + s_ffn.sum(0), d);
  auto s_units = s_in.index_select(1, units).sum(1);  // [3D]
  auto qkv_rows = top_indices(
      s_units.narrow(0, 0, D) + s_units.narrow(0, D, D) + s_units.narrow(0, 2 * D, D), d);
  PrunedLayer out;
  std::vector<torch::Tensor> in_w, in_b;
  for (int64_t part = 0; part < 3; ++part) {
    in_w.push_back(w.narrow(0, part * D, D).index_select(0, qkv_rows).index_select(1, units));
    in_b.push_back(b.narrow(0, part * D, D).index_select(0, qkv_rows));
  }
  out.in_proj_weight = torch::cat(in_w, 0);
  out.in_proj_bias = torch::cat(in_b, 0);
  out.out_proj_weight =
      from.self_attn->out_proj->weight.index_select(0, units).index_select(1, qkv_rows);
  out.out_proj_bias = from.self_attn->out_proj->bias.index_select(0, units);
  auto ffn_rows = top_indices(s_ffn.index_select(1, units).sum(1), f);
  out.linear1_weight = from.linear1->weight.index_select(0, ffn_rows).index_select(1, units);
  out.linear1_bias = from.linear1->bias.index_select(0, ffn_rows);
  out.linear2_weight = from.linear2->weight.index_select(0, units).index_select(1, ffn_rows);
  out.linear2_bias = from.linear2->bias.index_select(0, units);
  out.norm1_weight = from.norm1->weight.index_select(0, units);
  out.norm1_bias = from.norm1->bias.index_select(0, units);
  out.norm2_weight = from.norm2->weight.index_select(0, units);
  out.norm2_bias = from.norm2->bias.index_select(0, units);
  return out;
}

/// Copies a pruned version of a stock layer into a narrower stock layer (see PrunedLayer).
inline void prune_into(const torch::nn::TransformerEncoderLayerImpl& from,
                       torch::nn::TransformerEncoderLayerImpl& to,
                       const LayerImportance& importance = LayerImportance()) {
  auto p = prune_layer(from, to.options.d_model(), to.options.dim_feedforward(), importance);
  torch::NoGradGuard no_grad;
  to.self_attn->in_proj_weight.copy_(p.in_proj_weight);
  to.self_attn->in_proj_bias.copy_(p.in_proj_bias);
  to.self_attn->out_proj->weight.copy_(p.out_proj_weight);
  to.self_attn->out_proj->bias.copy_(p.out_proj_bias);
  to.linear1->weight.copy_(p.linear1_weight);
  to.linear1->bias.copy_(p.linear1_bias);
  to.linear2->weight.copy_(p.linear2_weight);
  to.linear2->bias.copy_(p.linear2_bias);
  to.norm1->weight.copy_(p.norm1_weight);
  to.norm1->bias.copy_(p.norm1_bias);
  to.norm2->weight.copy_(p.norm2_weight);
  to.norm2->bias.copy_(p.norm2_bias);
}

/// T5's layer norm: x / sqrt(mean(x^2) + eps) * weight over the last dimension; no mean is
/// subtracted and there is no bias.
inline torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight,
                              double eps = 1e-6) {
  return x * torch::rsqrt(x.pow(2).mean(-1, /*keepdim=*/true) + eps) * weight;
}

}  // namespace detail

/// The LST paper's side block, T5-style (see LadderBlock::T5): for x [L, N, d],
///
///     x = x + dropout(out_proj(attention(in_proj(rms(x; norm1)))))
///     x = x + dropout(linear2(dropout(act(linear1(rms(x; norm2))))))
///
/// with bias-free projections, rms(x; w) = x / sqrt(mean(x^2) + 1e-6) * w, and peft's multi-head
/// attention (scores scaled by 1/sqrt(head size), as in the backbone whose pruned weights it may
/// start from; T5 folds that scale into its initialisation instead). T5's relative position bias
/// is left out: the side network reads downsampled backbone states that already carry the
/// backbone's positions. The activation is the backbone's (ReLU in T5 v1.0, GELU in BERT).
/// Parameters: `in_proj_weight` [3d, d] (q, k, v rows), `out_proj_weight` [d, d],
/// `linear1_weight` [f, d], `linear2_weight` [d, f], `norm1_weight`, `norm2_weight` [d].
class T5SideBlockImpl : public torch::nn::Module {
 public:
  T5SideBlockImpl(int64_t width, int64_t heads, int64_t dim_feedforward, double dropout,
                  const torch::nn::activation_t& activation)
      : torch::nn::Module("peft::T5SideBlock"), heads_(heads), dropout_(dropout) {
    check(width > 0 && heads > 0 && width % heads == 0 && dim_feedforward > 0,
          LadderOptions::method,
          "a side block needs a positive width divisible by its heads and a positive "
          "feed-forward size, got width {}, heads {}, feed-forward {}",
          width, heads, dim_feedforward);
    // Like torch::nn::Linear's default: uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    auto linear_init = [](int64_t out, int64_t in) {
      const double bound = 1.0 / std::sqrt(static_cast<double>(in));
      return torch::empty({out, in}).uniform_(-bound, bound);
    };
    in_proj_weight = register_parameter("in_proj_weight", linear_init(3 * width, width));
    out_proj_weight = register_parameter("out_proj_weight", linear_init(width, width));
    linear1_weight = register_parameter("linear1_weight", linear_init(dim_feedforward, width));
    linear2_weight = register_parameter("linear2_weight", linear_init(width, dim_feedforward));
    norm1_weight = register_parameter("norm1_weight", torch::ones({width}));
    norm2_weight = register_parameter("norm2_weight", torch::ones({width}));
    activation_ = detail::layer_activation(activation);
  }

  /// x [L, N, d] ([N, L, d] with batch_first); mask [L, L] (float additive or bool, true = may
  /// not attend); key_padding_mask [N, L] (true = padding). Returns x's layout.
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& mask = {},
                        const torch::Tensor& key_padding_mask = {}, bool batch_first = false) {
    namespace F = torch::nn::functional;
    auto drop = [&](const torch::Tensor& t) {
      return F::dropout(t, F::DropoutFuncOptions().p(dropout_).training(is_training()));
    };
    auto qkv = peft::detail::linear(detail::rms_norm(x, norm1_weight), in_proj_weight).chunk(3, -1);
    auto a = functional::attention(qkv[0], qkv[1], qkv[2], heads_, mask, key_padding_mask, dropout_,
                                   is_training(), batch_first);
    auto h = x + drop(peft::detail::linear(a, out_proj_weight));
    auto f =
        drop(activation_(peft::detail::linear(detail::rms_norm(h, norm2_weight), linear1_weight)));
    return h + drop(peft::detail::linear(f, linear2_weight));
  }

  /// Copies the weight matrices of a pruned backbone layer (biases and LayerNorm parameters have
  /// no place in this block; the RMS scales start at 1).
  void load_pruned(const detail::PrunedLayer& pruned) {
    torch::NoGradGuard no_grad;
    in_proj_weight.copy_(pruned.in_proj_weight);
    out_proj_weight.copy_(pruned.out_proj_weight);
    linear1_weight.copy_(pruned.linear1_weight);
    linear2_weight.copy_(pruned.linear2_weight);
    norm1_weight.fill_(1.0);
    norm2_weight.fill_(1.0);
  }

  int64_t heads() const { return heads_; }
  int64_t dim_feedforward() const { return linear1_weight.size(0); }

  torch::Tensor in_proj_weight, out_proj_weight, linear1_weight, linear2_weight;
  torch::Tensor norm1_weight, norm2_weight;

 private:
  int64_t heads_;
  double dropout_;
  std::function<torch::Tensor(const torch::Tensor&)> activation_;
};
TORCH_MODULE(T5SideBlock);

/// Empirical Fisher information of each backbone layer's in_proj_weight and linear1.weight, the
/// importance LST's pruned initialisation can rank by (LadderOptions::importance): the mean over
/// `batches` calls of the squared gradient of `loss(i)` (i = 0 .. batches-1), a scalar computed
/// through `backbone` (e.g. a task loss of a model built around it). The weights take gradients
/// only inside this call: their requires_grad flags and .grad are as before afterwards, also when
/// loss throws; no tensor's .grad is touched (loss() must not call backward itself).
///
///     auto importance = peft::fisher_importance(bert->encoder, [&](int64_t i) {
///       auto batch = batches[i];
///       return torch::nn::functional::cross_entropy(model(batch.ids, batch.mask), batch.labels);
///     }, 8);
///     peft::LadderOptions options = peft::LadderOptions().importance(importance);
inline std::vector<LayerImportance> fisher_importance(
    peft::nn::TransformerEncoderImpl& backbone, const std::function<torch::Tensor(int64_t)>& loss,
    int64_t batches) {
  check(batches > 0, LadderOptions::method, "fisher_importance needs at least one batch, got {}",
        batches);
  std::vector<torch::Tensor> weights;
  for (size_t i = 0; i < backbone.base->layers->size(); ++i) {
    auto& layer = backbone.base->layers->at<torch::nn::TransformerEncoderLayerImpl>(i);
    weights.push_back(layer.self_attn->in_proj_weight);
    weights.push_back(layer.linear1->weight);
  }
  // torch::autograd::grad leaves .grad alone; only the requires_grad flags need restoring.
  struct Restore {
    std::vector<torch::Tensor>& weights;
    std::vector<bool> before;
    ~Restore() {
      for (size_t i = 0; i < before.size(); ++i) weights[i].set_requires_grad(before[i]);
    }
  } restore{weights, {}};
  std::vector<torch::Tensor> sums;
  for (auto& w : weights) {
    restore.before.push_back(w.requires_grad());
    w.set_requires_grad(true);
    sums.push_back(torch::zeros_like(w));
  }
  for (int64_t b = 0; b < batches; ++b) {
    auto value = loss(b);
    check(value.defined() && value.numel() == 1, LadderOptions::method,
          "fisher_importance: loss({}) must return a scalar, got shape {}", b,
          value.defined() ? detail::shape(value.sizes()) : std::string("(undefined)"));
    check(std::isfinite(value.template item<double>()), LadderOptions::method,
          "fisher_importance: loss({}) is {}", b, value.template item<double>());
    auto grads = torch::autograd::grad({value}, weights, {}, false, false, /*allow_unused=*/true);
    torch::NoGradGuard no_grad;
    for (size_t i = 0; i < weights.size(); ++i) {
      if (grads[i].defined()) sums[i].add_(grads[i].square());
    }
  }
  std::vector<LayerImportance> out;
  for (size_t i = 0; i < sums.size(); i += 2) {
    out.push_back(
        {sums[i] / static_cast<double>(batches), sums[i + 1] / static_cast<double>(batches)});
  }
  return out;
}

namespace detail {

/// What a stock post-norm torch::nn::TransformerEncoderLayer computes (norm1(x + attention),
/// norm2(h + FFN), its dropouts in training mode), with the attention through the fused kernel of
/// functional::attention instead of the stock MultiheadAttention's separate matmuls, softmax and
/// masking: the same parameters, the same result up to float rounding (the LST tests compare with
/// the stock forward), and less time (docs/RESULTS.md, LST on CLUE). x and the result are [N, L, d]
/// with batch_first, else [L, N, d].
inline torch::Tensor post_norm_block(torch::nn::TransformerEncoderLayerImpl& layer,
                                     const torch::Tensor& x, const torch::Tensor& mask,
                                     const torch::Tensor& key_padding_mask, bool batch_first) {
  auto& attn = *layer.self_attn;
  auto qkv = peft::detail::linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, -1);
  auto a = functional::attention(qkv[0], qkv[1], qkv[2], attn.options.num_heads(), mask,
                                 key_padding_mask, attn.options.dropout(), layer.is_training(),
                                 batch_first);
  auto h = layer.norm1(
      x + layer.dropout1(peft::detail::linear(a, attn.out_proj->weight, attn.out_proj->bias)));
  const auto activation = peft::detail::layer_activation(layer.options.activation());
  auto f = layer.dropout(activation(layer.linear1(h)));
  return layer.norm2(h + layer.dropout2(layer.linear2(f)));
}

}  // namespace detail

/// A frozen peft::nn::TransformerEncoder with a trainable ladder side network.
///
/// forward(src [L, N, E], src_mask, src_key_padding_mask) runs the backbone under NoGradGuard,
/// then the side network, and returns [L (+prompt), N, E]: the side state upsampled to E. With a
/// batch-first backbone (nn::TransformerEncoder's batch_first, as models::Bert's) src and the
/// result are [N, L, E] and [N, L (+prompt), E], and the side network runs batch-first too.
/// Submodules: `backbone` (frozen), `downsample.<i>` (Linear E -> E/r for the input and each
/// selected layer), `gates` (alpha, one per side block), `side.<i>` (width E/r: a stock
/// TransformerEncoderLayer, or a T5SideBlock with LadderBlock::T5, which adds `final_norm`),
/// `upsample` (Linear E/r -> E).
class LadderImpl : public torch::nn::Module {
 public:
  LadderImpl(peft::nn::TransformerEncoder backbone_, const LadderOptions& options)
      : torch::nn::Module("peft::Ladder"),
        backbone(register_module("backbone", std::move(backbone_))),
        options_(options) {
    options.validate();
    check(options.block() != LadderBlock::Llama, LadderOptions::method,
          "side_block llama is for Llama decoders (models::attach_ladder); beside an encoder the "
          "side blocks are transformer_encoder_layer or t5");
    freeze(*backbone);
    const auto& stock_layers = backbone->base->layers;
    const int64_t L = static_cast<int64_t>(stock_layers->size());
    check(L > 0, LadderOptions::method, "the backbone has no layers");
    const auto& first = stock_layers->at<torch::nn::TransformerEncoderLayerImpl>(0).options;
    const int64_t E = first.d_model(), F = first.dim_feedforward();
    const int64_t width = E / options.reduction_factor();
    check(width > 0 && width * options.reduction_factor() == E, LadderOptions::method,
          "reduction_factor {} must divide the model width {}", options.reduction_factor(), E);
    selected_ = options.layers();
    if (selected_.empty()) {
      for (int64_t i = 0; i < L; ++i) selected_.push_back(i);
    }
    for (size_t i = 0; i < selected_.size(); ++i) {
      check(selected_[i] >= 0 && selected_[i] < L, LadderOptions::method,
            "layer {} is outside the backbone's {} layers", selected_[i], L);
      check(i == 0 || selected_[i] > selected_[i - 1], LadderOptions::method,
            "layers must be increasing, got {} after {}", selected_[i], selected_[i - 1]);
    }
    check(options.importance().empty() || static_cast<int64_t>(options.importance().size()) == L,
          LadderOptions::method, "importance has {} entries, expected one per backbone layer ({})",
          options.importance().size(), L);
    int64_t heads = options.side_heads();
    if (heads == 0) {
      heads = 1;
      for (int64_t h : {2, 4, 8}) {
        if (width % h == 0 && h <= first.nhead()) heads = h;
      }
    }
    check(width % heads == 0, LadderOptions::method, "side_heads {} must divide the side width {}",
          heads, width);
    downsample = register_module("downsample", torch::nn::ModuleList());
    side = register_module("side", torch::nn::ModuleList());
    for (size_t i = 0; i <= selected_.size(); ++i)
      downsample->push_back(torch::nn::Linear(E, width));
    heads_ = heads;
    dim_feedforward_ = std::max<int64_t>(1, F / options.reduction_factor());
    dropout_ = options.dropout().value_or(first.dropout());
    for (size_t i = 0; i < selected_.size(); ++i) {
      const auto layer = static_cast<size_t>(selected_[i]);
      const auto& importance =
          options.importance().empty() ? LayerImportance() : options.importance()[layer];
      if (options.block() == LadderBlock::T5) {
        T5SideBlock block(width, heads, dim_feedforward_, dropout_, first.activation());
        if (options.init() == LadderInit::Pruned) {
          block->load_pruned(
              detail::prune_layer(stock_layers->at<torch::nn::TransformerEncoderLayerImpl>(layer),
                                  width, dim_feedforward_, importance));
        }
        side->push_back(block);
        continue;
      }
      auto block_options = torch::nn::TransformerEncoderLayerOptions(width, heads)
                               .dim_feedforward(dim_feedforward_)
                               .dropout(dropout_)
                               .activation(first.activation());
      torch::nn::TransformerEncoderLayer block(block_options);
      if (options.init() == LadderInit::Pruned) {
        detail::prune_into(stock_layers->at<torch::nn::TransformerEncoderLayerImpl>(layer), *block,
                           importance);
      }
      side->push_back(block);
    }
    if (options.block() == LadderBlock::T5) {
      final_norm = register_parameter("final_norm", torch::ones({width}));
    }
    // The importance scores served the initialisation; keeping them would hold two backbone-sized
    // tensors per layer for the ladder's lifetime.
    options_.importance({});
    gates = register_parameter("gates", torch::zeros({static_cast<int64_t>(selected_.size())}));
    upsample = register_module("upsample", torch::nn::Linear(width, E));
  }

  torch::Tensor forward(const torch::Tensor& src, const torch::Tensor& src_mask = {},
                        const torch::Tensor& src_key_padding_mask = {}) {
    std::vector<torch::Tensor> states;
    {
      // No graph through the backbone: its activations are freed as it goes.
      torch::NoGradGuard no_grad;
      states = backbone->hidden_states(src, src_mask, src_key_padding_mask);
    }
    // Prompts in the backbone lengthen the sequence; extend the padding mask the same way.
    torch::Tensor kpm = src_key_padding_mask, mask = src_mask;
    const bool batch_first = backbone->batch_first();
    const int64_t seq = batch_first ? 1 : 0;
    const int64_t extra = states[0].size(seq) - src.size(seq);
    if (extra > 0 && kpm.defined()) {
      kpm = torch::cat({torch::zeros({kpm.size(0), extra}, kpm.options()), kpm}, 1);
    }
    check(extra == 0 || !mask.defined(), LadderOptions::method,
          "a src_mask together with prompts in the backbone is not supported");
    // The side network runs in the backbone's layout (batch-first: the fused attention kernel's
    // own, where its outputs and gradients come out contiguous).
    auto down = [&](size_t i, const torch::Tensor& x) {
      const auto& m = *downsample->ptr<torch::nn::LinearImpl>(i);
      return peft::detail::linear(x, m.weight, m.bias);
    };
    auto h = down(0, states[0]);
    for (size_t i = 0; i < selected_.size(); ++i) {
      auto mu = torch::sigmoid(gates[static_cast<int64_t>(i)] / options_.gate_temperature());
      auto ladder = down(i + 1, states[static_cast<size_t>(selected_[i]) + 1]);
      h = mu * h + (1 - mu) * ladder;
      if (options_.block() == LadderBlock::T5) {
        h = side->ptr<T5SideBlockImpl>(i)->forward(h, mask, kpm, batch_first);
      } else {
        h = detail::post_norm_block(*side->ptr<torch::nn::TransformerEncoderLayerImpl>(i), h, mask,
                                    kpm, batch_first);
      }
    }
    if (final_norm.defined()) {
      namespace F = torch::nn::functional;
      h = F::dropout(detail::rms_norm(h, final_norm),
                     F::DropoutFuncOptions().p(dropout_).training(is_training()));
    }
    return peft::detail::linear(h, upsample);
  }

  /// The backbone layers that feed the side network.
  const std::vector<int64_t>& selected_layers() const { return selected_; }
  /// The options the ladder was built with (without importance(), which is released once the
  /// side blocks are initialised).
  const LadderOptions& options() const { return options_; }
  /// Width of the side network (model width / reduction_factor).
  int64_t side_width() const { return upsample->weight.size(1); }
  /// Attention heads of each side block.
  int64_t side_heads() const { return heads_; }
  /// Feed-forward size of each side block.
  int64_t side_dim_feedforward() const { return dim_feedforward_; }
  /// Dropout rate of the side network (options().dropout(), or the backbone layers' rate).
  double side_dropout() const { return dropout_; }

  peft::nn::TransformerEncoder backbone;
  torch::nn::ModuleList downsample{nullptr}, side{nullptr};
  torch::Tensor gates;
  /// RMS scale after the last side block (LadderBlock::T5 only; undefined otherwise).
  torch::Tensor final_norm;
  torch::nn::Linear upsample{nullptr};

 private:
  LadderOptions options_;
  std::vector<int64_t> selected_;
  int64_t heads_ = 0, dim_feedforward_ = 0;
  double dropout_ = 0;
};
TORCH_MODULE(Ladder);

PEFT_NAMESPACE_END
