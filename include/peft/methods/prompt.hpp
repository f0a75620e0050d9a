#pragma once

// Prompt tuning (Lester et al., 2021): n trainable vectors put in front of the input embeddings.
// The sequence grows by n positions, at the front; masks are extended by the wrapper that owns
// the prompt site (see nn::TransformerEncoder, nn::Embedding, models::Bert).

#include <torch/arg.h>
#include <torch/types.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include <peft/config.hpp>
#include <peft/core/attach.hpp>
#include <peft/core/error.hpp>
#include <peft/core/site.hpp>
#include <peft/core/registry.hpp>
#include <peft/core/targets.hpp>
#include <peft/detail/json.hpp>
#include <peft/nn/attention.hpp>
#include <peft/nn/tuned.hpp>
#include <peft/detail/shape.hpp>

PEFT_NAMESPACE_BEGIN

/// Where the prompt vectors start.
enum class PromptInit {
  Random,  ///< N(0, init_std^2)
  Vocab,   ///< copies of randomly sampled rows of the vocabulary table
  Tokens,  ///< copies of the rows of token_ids, repeated to fill n
};

class PromptImpl;

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
  using Impl = PromptImpl;
  static constexpr const char* method = "prompt";
  /// The kinds of site the method can sit at.
  static constexpr unsigned kinds = site_kinds(SiteKind::Input);
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

// ------------------------------------------------------------------------- options and format

namespace detail {

/// The number of attention heads the model's attentions have: from its HubModel, else the
/// first nn::MultiheadAttention found; 0 without attention.
inline int64_t attention_heads(const SaveContext& c) {
  if (c.attention_heads > 0) return c.attention_heads;
  for (const auto& m : c.model.modules(/*include_self=*/true)) {
    if (auto* mha = dynamic_cast<nn::MultiheadAttentionImpl*>(m.get())) {
      return mha->base->options.num_heads();
    }
  }
  return 0;
}

/// The fields PEFT's prompt-learning configs (prompt and prefix tuning) share.
inline void prompt_learning_config(const SaveContext& c, int64_t n, int64_t dim) {
  c.config["num_virtual_tokens"] = n;
  c.config["token_dim"] = dim;
  c.config["num_transformer_submodules"] = 1;
  c.config["num_attention_heads"] = attention_heads(c);
  c.config["num_layers"] = static_cast<int64_t>(attention_sites(c.model).size());
}

/// num_virtual_tokens of a prompt-learning config, checked; only encoder models are supported.
inline int64_t prompt_learning_tokens(const LoadContext& c) {
  const auto n = config_value<int64_t>(c.config, "num_virtual_tokens", c.config_file);
  check(n > 0, "load_adapter", "{}: num_virtual_tokens must be positive, got {}", c.config_file, n);
  check(config_value_or<int64_t>(c.config, "num_transformer_submodules", 1, c.config_file) == 1,
        "load_adapter", "{}: only encoder models (num_transformer_submodules 1) are supported",
        c.config_file);
  return n;
}

/// Saves the rows an adapter's prompt method produces now as PEFT's PROMPT_TUNING
/// (`prompt_embeddings` [n, dim]); P-tuning is saved the same way, as Hugging Face PEFT stores
/// a P-tuning model for inference.
inline void save_prompt_rows(SaveContext& c) {
  c.save_prefix = "base_model.";
  check(c.methods.size() == 1, "save_adapter",
        "prompt adapter \"{}\" sits at {} sites; the file format holds one prompt", c.adapter,
        c.methods.size());
  auto rows = c.methods.front().second->prompt();
  c.tensors.emplace_back("prompt_embeddings", rows);
  c.config["prompt_tuning_init"] = "RANDOM";
  c.config["prompt_tuning_init_text"] = nullptr;
  c.config["tokenizer_name_or_path"] = nullptr;
  prompt_learning_config(c, rows.size(0), rows.size(1));
}

inline LoadPlan load_prompt(const LoadContext& c) {
  LoadPlan plan;
  plan.save_prefix = "base_model.";
  const int64_t n = prompt_learning_tokens(c);
  // The outermost input site (a model's own prompt, e.g. models::Bert's).
  std::optional<SiteRef> target;
  for (auto& ref : find_sites(c.model)) {
    if (ref.site->kind() != SiteKind::Input) continue;
    if (!target || std::count(ref.path.begin(), ref.path.end(), '.') <
                       std::count(target->path.begin(), target->path.end(), '.')) {
      target = ref;
    }
  }
  check(target.has_value(), "load_adapter", "{}: the model has no prompt site", c.config_file);
  const std::string path = target->path;
  plan.slots.push_back({"prompt_embeddings", {n, target->site->out_features()}, [c, path] {
                          return c.method_at<PromptImpl>(path, "prompt")->prompt_embeddings;
                        }});
  auto options = PromptOptions(n);
  options.adapter_name(c.adapter);
  auto site = target->site;
  plan.apply = [site, options] { attach_site(*site, options); };
  return plan;
}

inline MethodEntry prompt_entry() {
  MethodEntry e;
  e.name = "prompt";
  e.summary = "prompt tuning: trainable rows in front of the input (Lester et al., 2021)";
  e.default_lr = 3e-2;
  e.option_keys = {"num_virtual_tokens", "prompt_tuning_init"};
  e.attach = [](torch::nn::Module& model, const nlohmann::json& json) {
    auto options = PromptOptions(
        config_value_or<int64_t>(json, "num_virtual_tokens", 20, "options", "prompt"));
    const auto init =
        config_value_or<std::string>(json, "prompt_tuning_init", "RANDOM", "options", "prompt");
    check(init == "VOCAB" || init == "RANDOM", "prompt",
          "prompt_tuning_init must be VOCAB or RANDOM, got \"{}\"", init);
    options.init(init == "RANDOM" ? PromptInit::Random : PromptInit::Vocab);
    return peft::attach(model, options);
  };
  e.format = AdapterFormat{"PROMPT_TUNING", true, save_prompt_rows, load_prompt};
  return e;
}

inline const bool prompt_registered = register_method(prompt_entry());

}  // namespace detail

/// Prompt tuning on a stock TransformerEncoder or Embedding.
template <class Stock>
using PromptTuning = Tuned<Stock, PromptOptions>;

PEFT_NAMESPACE_END
