#pragma once

#include <torch/nn/modules/embedding.h>
#include <torch/nn/pimpl.h>

#include <cstdint>

#include <peft/config.hpp>
#include <peft/core/error.hpp>
#include <peft/core/parameters.hpp>
#include <peft/core/site.hpp>

PEFT_NAMESPACE_BEGIN
namespace nn {

/// A frozen stock Embedding whose lookup passes through a site (LoRA on embeddings), followed by
/// a `prompt` site whose rows (prompt tuning) are put in front of the sequence.
///
/// `seq_dim` is the dimension of the ids that runs along the sequence: 1 for batch-first ids
/// [N, L] (the default), 0 for sequence-first ids [L, N]. With a prompt of n rows the output has
/// n more positions than the ids, at the front; prompt_length() says how many.
class EmbeddingImpl : public SiteImpl {
 public:
  explicit EmbeddingImpl(torch::nn::Embedding stock, int64_t seq_dim = 1)
      : SiteImpl(SiteKind::Embedding, "embedding", stock->options.num_embeddings(),
                 stock->options.embedding_dim()),
        base(register_module("base", std::move(stock))),
        prompt(
            register_module("prompt", Site(SiteKind::Input, "prompt", base->options.embedding_dim(),
                                           base->options.embedding_dim()))),
        seq_dim_(seq_dim) {
    check(seq_dim == 0 || seq_dim == 1, "nn::Embedding", "seq_dim must be 0 or 1, got {}", seq_dim);
    freeze(*base);
    set_frozen(base->weight, torch::Tensor());
    prompt->set_vocabulary(base->weight);
  }

  torch::Tensor forward(const torch::Tensor& ids) {
    auto out = adapt(ids, base->forward(ids));
    auto rows = prompt->prompt_rows();
    if (!rows.defined()) return out;
    check(ids.dim() == 2, "nn::Embedding", "prompt rows need ids of rank 2, got shape {}",
          peft::detail::shape(ids.sizes()));
    const int64_t n = rows.size(0), batch = ids.size(1 - seq_dim_), dim = rows.size(1);
    auto front = seq_dim_ == 1 ? rows.unsqueeze(0).expand({batch, n, dim})
                               : rows.unsqueeze(1).expand({n, batch, dim});
    return torch::cat({front.to(out.scalar_type()), out}, seq_dim_);
  }

  /// Rows the active prompts add in front of the sequence.
  int64_t prompt_length() {
    auto rows = prompt->prompt_rows();
    return rows.defined() ? rows.size(0) : 0;
  }

  torch::nn::Embedding base;
  Site prompt;

 private:
  int64_t seq_dim_;
};
TORCH_MODULE(Embedding);

}  // namespace nn
PEFT_NAMESPACE_END
