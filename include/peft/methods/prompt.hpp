#pragma once

// Prompt tuning (Lester et al., 2021): n trainable vectors put in front of the input embeddings.
// The sequence grows by n positions, at the front; masks are extended by the wrapper that owns
// the prompt site (see nn::TransformerEncoder, nn::Embedding, models::Bert).

#include <torch/arg.h>
#include <torch/types.h>

#include <cstdint>
#include <vector>

#include <peft/config.hpp>
#include <peft/core/error.hpp>
#include <peft/core/site.hpp>
#include <peft/core/targets.hpp>
#include <peft/detail/shape.hpp>

PEFT_NAMESPACE_BEGIN

/// Where the prompt vectors start.
enum class PromptInit {
  Random,  ///< N(0, init_std^2)
  Vocab,   ///< copies of randomly sampled rows of the vocabulary table
  Tokens,  ///< copies of the rows of token_ids, repeated to fill n
};

/// Options of prompt tuning. Default targets: the model's `prompt` site.
struct PromptOptions : TargetOptions<PromptOptions> {
  explicit PromptOptions(int64_t num_virtual_tokens = 20)
      : TargetOptions({"prompt"}), num_virtual_tokens_(num_virtual_tokens) {}
  /// n: prompt vectors.
  TORCH_ARG(int64_t, num_virtual_tokens);
  TORCH_ARG(PromptInit, init) = PromptInit::Random;
  TORCH_ARG(double, init_std) = 0.02;
  /// Token ids for PromptInit::Tokens (e.g. the tokenised task description).
  TORCH_ARG(std::vector<int64_t>, token_ids);
  /// Vocabulary table [V, dim] for Vocab/Tokens init, when the site knows none (models::Bert's and
  /// nn::Embedding's prompt sites know their word embeddings).
  TORCH_ARG(torch::Tensor, vocabulary);

 public:
  static constexpr const char* method = "prompt";
  static bool fits(const SiteImpl& site) { return site.kind() == SiteKind::Input; }
  void validate() const {
    check(num_virtual_tokens_ > 0, method, "num_virtual_tokens must be positive, got {}",
          num_virtual_tokens_);
    check(init_ != PromptInit::Tokens || !token_ids_.empty(), method,
          "init Tokens needs token_ids, got none");
  }
};

/// The prompt vectors of one Input site: `prompt_embeddings` [n, dim] (Hugging Face's name).
class PromptImpl : public MethodImpl {
 public:
  PromptImpl(const SiteImpl& site, const PromptOptions& options)
      : MethodImpl("prompt", options.adapter_name()) {
    options.validate();
    const int64_t n = options.num_virtual_tokens(), dim = site.out_features();
    torch::Tensor rows;
    if (options.init() == PromptInit::Random) {
      rows = torch::randn({n, dim}) * options.init_std();
    } else {
      auto table = options.vocabulary().defined() ? options.vocabulary() : site.vocabulary();
      check(table.defined(), PromptOptions::method,
            "init from the vocabulary needs a vocabulary table: the site has none, pass "
            "PromptOptions::vocabulary");
      check(table.dim() == 2 && table.size(1) == dim, PromptOptions::method,
            "vocabulary has shape {}, expected [V, {}]", peft::detail::shape(table.sizes()), dim);
      torch::Tensor ids;
      if (options.init() == PromptInit::Vocab) {
        ids = torch::randint(table.size(0), {n}, torch::kLong);
      } else {
        std::vector<int64_t> filled;
        for (int64_t i = 0; i < n; ++i) {
          const int64_t id = options.token_ids()[i % options.token_ids().size()];
          check(id >= 0 && id < table.size(0), PromptOptions::method,
                "token id {} is outside the vocabulary of {}", id, table.size(0));
          filled.push_back(id);
        }
        ids = torch::tensor(filled, torch::kLong);
      }
      torch::NoGradGuard no_grad;
      rows = table.detach().index_select(0, ids.to(table.device())).to(torch::kFloat).cpu().clone();
    }
    prompt_embeddings = register_parameter("prompt_embeddings", rows);
  }

  torch::Tensor prompt() override { return prompt_embeddings; }

  torch::Tensor prompt_embeddings;
};

PEFT_NAMESPACE_END
