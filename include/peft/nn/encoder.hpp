#pragma once

#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/transformercoder.h>
#include <torch/nn/pimpl.h>

#include <cstdint>
#include <limits>
#include <vector>

#include <peft/config.hpp>
#include <peft/core/error.hpp>
#include <peft/core/parameters.hpp>
#include <peft/core/site.hpp>
#include <peft/detail/shape.hpp>
#include <peft/nn/encoder_layer.hpp>

PEFT_NAMESPACE_BEGIN
namespace nn {

/// A frozen stock TransformerEncoder run by peft: a `prompt` site in front of the sequence, then
/// one TransformerEncoderLayer wrapper per stock layer (`layers.<i>`), then the stock final norm.
///
/// With prompt rows (prompt tuning), the input gets n extra positions at the front and so does
/// the output ([n + L, N, E]); prompt_length() says how many. Masks are extended to match:
/// prompt positions are never padding, every token may attend to them, and they attend only to
/// each other when a src_mask is given (so a causal mask stays causal).
///
/// `batch_first`: every input, output and hidden state is [N, L, E] instead of [L, N, E], like
/// PyTorch's `batch_first=True` (LibTorch's C++ modules have no such option). The same
/// arithmetic; on the CPU the faster layout (see nn::MultiheadAttention). models::Bert runs its
/// encoder this way.
class TransformerEncoderImpl : public torch::nn::Module {
 public:
  explicit TransformerEncoderImpl(torch::nn::TransformerEncoder stock, bool batch_first = false)
      : torch::nn::Module("peft::nn::TransformerEncoder"),
        base(register_module("base", std::move(stock))),
        batch_first_(batch_first) {
    freeze(*base);
    const auto& layer_options = base->options.encoder_layer()->options;
    const int64_t E = layer_options.d_model();
    prompt = register_module("prompt", Site(SiteKind::Input, "prompt", E, E));
    layers = register_module("layers", torch::nn::ModuleList());
    for (size_t i = 0; i < base->layers->size(); ++i) {
      auto stock_layer = base->layers->ptr<torch::nn::TransformerEncoderLayerImpl>(i);
      layers->push_back(TransformerEncoderLayer(torch::nn::TransformerEncoderLayer(stock_layer),
                                                /*own_base=*/false, batch_first));
    }
  }

  /// src [L, N, E] ([N, L, E] with batch_first()); src_mask [L, L]; src_key_padding_mask [N, L]
  /// (true = padding).
  torch::Tensor forward(const torch::Tensor& src, const torch::Tensor& src_mask = {},
                        const torch::Tensor& src_key_padding_mask = {}) {
    return run(src, src_mask, src_key_padding_mask, nullptr, 0);
  }

  /// forward()'s first `rows` output positions only, [rows, N, E] or batch-first [N, rows, E]
  /// (prompt positions, which come first, count): the last layer runs its queries, FFN and norms
  /// for those rows alone (see TransformerEncoderLayer::forward_first). For a reader of the first
  /// position only, such as BERT's [CLS] pooler. Equal to forward()'s first rows up to float
  /// rounding.
  torch::Tensor forward_first(const torch::Tensor& src, int64_t rows,
                              const torch::Tensor& src_mask = {},
                              const torch::Tensor& src_key_padding_mask = {}) {
    check(rows > 0, "nn::TransformerEncoder", "forward_first: rows must be positive, got {}", rows);
    return run(src, src_mask, src_key_padding_mask, nullptr, rows);
  }

  /// Like forward(), but returns every hidden state: the input (prompts included), then each
  /// layer's output; the last one has the final norm applied, as forward()'s result. Side
  /// networks (Ladder Side-Tuning) read these.
  std::vector<torch::Tensor> hidden_states(const torch::Tensor& src,
                                           const torch::Tensor& src_mask = {},
                                           const torch::Tensor& src_key_padding_mask = {}) {
    std::vector<torch::Tensor> states;
    auto out = run(src, src_mask, src_key_padding_mask, &states, 0);
    states.back() = out;
    return states;
  }

  /// Positions the active prompts add in front of the sequence.
  int64_t prompt_length() {
    auto rows = prompt->prompt_rows();
    return rows.defined() ? rows.size(0) : 0;
  }

  /// Whether inputs, outputs and hidden states are [N, L, E] (see the class comment).
  bool batch_first() const { return batch_first_; }

  /// The wrapper of layer i.
  TransformerEncoderLayer layer(size_t i) {
    return TransformerEncoderLayer(layers->ptr<TransformerEncoderLayerImpl>(i));
  }

  torch::nn::TransformerEncoder base;
  Site prompt{nullptr};
  torch::nn::ModuleList layers{nullptr};

 private:
  torch::Tensor run(const torch::Tensor& src, const torch::Tensor& src_mask,
                    const torch::Tensor& src_key_padding_mask, std::vector<torch::Tensor>* states,
                    int64_t first_rows) {
    auto x = src;
    auto mask = src_mask;
    auto kpm = src_key_padding_mask;
    auto rows = prompt->prompt_rows();
    const int64_t seq = batch_first_ ? 1 : 0;
    if (rows.defined()) {
      check(src.dim() == 3, "nn::TransformerEncoder", "src has shape {}, expected [{}, E]",
            peft::detail::shape(src.sizes()), batch_first_ ? "N, L" : "L, N");
      const int64_t n = rows.size(0), N = src.size(1 - seq), L = src.size(seq);
      const auto front = batch_first_ ? rows.unsqueeze(0).expand({N, n, rows.size(1)})
                                      : rows.unsqueeze(1).expand({n, N, rows.size(1)});
      x = torch::cat({front.to(src.scalar_type()), src}, seq);
      if (kpm.defined()) kpm = torch::cat({torch::zeros({N, n}, kpm.options()), kpm}, 1);
      if (mask.defined()) {
        auto m = functional::detail::additive_mask(mask, src.scalar_type());
        auto top =
            torch::cat({torch::zeros({n, n}, m.options()),
                        torch::full({n, L}, -std::numeric_limits<float>::infinity(), m.options())},
                       1);
        auto bottom = torch::cat({torch::zeros({L, n}, m.options()), m}, 1);
        mask = torch::cat({top, bottom}, 0);
      }
    }
    if (states) states->push_back(x);
    const size_t count = layers->size();
    for (size_t i = 0; i < count; ++i) {
      auto* layer = layers->ptr<TransformerEncoderLayerImpl>(i).get();
      x = first_rows > 0 && i + 1 == count ? layer->forward_first(x, first_rows, mask, kpm)
                                           : layer->forward(x, mask, kpm);
      if (states) states->push_back(x);
    }
    if (first_rows > 0 && count == 0) {
      check(first_rows <= x.size(seq), "nn::TransformerEncoder",
            "forward_first: {} rows asked of a sequence of {}", first_rows, x.size(seq));
      x = x.narrow(seq, 0, first_rows);
    }
    if (!base->norm.is_empty()) x = base->norm.forward<torch::Tensor>(x);
    return x;
  }

  bool batch_first_ = false;
};
TORCH_MODULE(TransformerEncoder);

}  // namespace nn
PEFT_NAMESPACE_END
