#pragma once

// LoHa (Hyeon-Woo et al., 2022, FedPara; LyCORIS): the weight update is the Hadamard product of
// two low-rank products, dW = (alpha / r) * (W1a W1b) * (W2a W2b), so rank r per factor reaches
// rank r^2. W2b starts at zero, so a new adapter changes nothing. Hugging Face PEFT's `LOHA`
// files: `hada_w1_a` [out, r], `hada_w1_b` [r, in], `hada_w2_a` [out, r], `hada_w2_b` [r, in]
// per projection.

#include <torch/arg.h>
#include <torch/nn/functional/linear.h>
#include <torch/nn/init.h>
#include <torch/types.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include <peft/config.hpp>
#include <peft/core/attach.hpp>
#include <peft/core/error.hpp>
#include <peft/core/registry.hpp>
#include <peft/core/site.hpp>
#include <peft/core/targets.hpp>
#include <peft/detail/json.hpp>
#include <peft/methods/lycoris.hpp>
#include <peft/nn/tuned.hpp>

PEFT_NAMESPACE_BEGIN

class LoHaImpl;

/// Options of LoHa. Default targets: the attention query and value projections.
struct LoHaOptions : TargetOptions<LoHaOptions> {
  explicit LoHaOptions(int64_t r = 8) : TargetOptions({"query", "value"}), r_(r) {}
  /// Rank of each of the two factors.
  TORCH_ARG(int64_t, r);
  /// The update is multiplied by alpha / r.
  TORCH_ARG(double, alpha) = 8.0;

 public:
  using Impl = LoHaImpl;
  static constexpr const char* method = "loha";
  /// The kinds of site the method can sit at.
  static constexpr unsigned kinds = site_kinds(SiteKind::Linear);
  static bool fits(const SiteImpl& site) { return site.kind() == SiteKind::Linear; }
  void validate() const {
    check(r_ > 0, method, "rank must be positive, got r={}", r_);
    check(alpha_ > 0, method, "alpha must be positive, got alpha={}", alpha_);
  }
};

/// LoHa at one projection (Hugging Face's parameter names).
class LoHaImpl : public MethodImpl {
 public:
  LoHaImpl(const SiteImpl& site, const LoHaOptions& options)
      : MethodImpl(LoHaOptions::method, options.adapter_name()),
        options_(options),
        scaling_(options.alpha() / static_cast<double>(options.r())) {
    options.validate();
    const int64_t r = options.r(), in = site.in_features(), out = site.out_features();
    hada_w1_a = register_parameter("hada_w1_a", torch::empty({out, r}));
    hada_w1_b = register_parameter("hada_w1_b", torch::empty({r, in}));
    hada_w2_a = register_parameter("hada_w2_a", torch::empty({out, r}));
    hada_w2_b = register_parameter("hada_w2_b", torch::zeros({r, in}));
    torch::NoGradGuard no_grad;
    // He initialisation as FedPara and Hugging Face PEFT; one zero factor keeps dW at zero.
    for (auto* t : {&hada_w1_a, &hada_w1_b, &hada_w2_a}) {
      torch::nn::init::kaiming_uniform_(*t, std::sqrt(5.0));
    }
  }

  torch::Tensor apply(const torch::Tensor& input, const torch::Tensor& output) override {
    return output + torch::nn::functional::linear(input, delta_weight().to(input.scalar_type()));
  }

  bool can_merge() const override { return true; }

  torch::Tensor delta_weight() override {
    return torch::matmul(hada_w1_a, hada_w1_b) * torch::matmul(hada_w2_a, hada_w2_b) * scaling_;
  }

  const LoHaOptions& options() const { return options_; }

  torch::Tensor hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b;

 private:
  LoHaOptions options_;
  double scaling_;
};

// ------------------------------------------------------------------------- options and format

namespace detail {

inline void save_loha(SaveContext& c) {
  c.save_prefix = "base_model.model.";
  const auto& first = shared_setting<LoHaImpl>(c.methods, rank_alpha_setting<LoHaOptions>);
  const auto targets = save_site_parameters(c);
  lycoris_config(first.r(), first.alpha(), targets, c.config);
}

inline LoadPlan load_loha(const LoadContext& c) {
  LoadPlan plan;
  plan.save_prefix = "base_model.model.";
  auto options = lycoris_options_from_json<LoHaOptions>(c.config, c.config_file, "load_adapter");
  options.adapter_name(c.adapter);
  const int64_t r = options.r();
  auto targets = file_sites(c, plan.save_prefix, {".hada_w1_a"}, &LoHaOptions::fits);
  check(!targets.empty(), "load_adapter", "{}: no LoHa weights (keys ending in .hada_w1_a)",
        c.weights_file);
  auto sites = sites_by_path(c.model);
  for (const auto& path : targets) {
    auto site = sites[path];
    const std::string stem = plan.save_prefix + c.hub_path(path);
    const int64_t in = site->in_features(), out = site->out_features();
    const std::vector<std::pair<std::string, std::vector<int64_t>>> parts = {
        {"hada_w1_a", {out, r}},
        {"hada_w1_b", {r, in}},
        {"hada_w2_a", {out, r}},
        {"hada_w2_b", {r, in}}};
    for (const auto& [name, shape] : parts) {
      plan.slots.push_back({stem + "." + name, shape, [c, path, name = name] {
                              return parameter(*c.method_at<LoHaImpl>(path, "loha"), name);
                            }});
    }
  }
  options.targets(targets);
  auto& model = c.model;
  plan.apply = [&model, options] { attach(model, options); };
  return plan;
}

inline MethodEntry loha_entry() {
  MethodEntry e;
  e.name = "loha";
  e.summary = "LoHa: Hadamard product of two low-rank updates (Hyeon-Woo et al., 2022)";
  e.default_lr = 1e-3;
  e.option_keys = lycoris_option_keys();
  e.attach = [](torch::nn::Module& model, const nlohmann::json& json) {
    return peft::attach(model, lycoris_options_from_json<LoHaOptions>(json, "options", "loha"));
  };
  e.format = AdapterFormat{"LOHA", true, save_loha, load_loha};
  return e;
}

inline const bool loha_registered = register_method(loha_entry());

}  // namespace detail

/// LoHa on a stock Linear, MultiheadAttention, TransformerEncoderLayer or TransformerEncoder.
template <class Stock>
using LoHa = Tuned<Stock, LoHaOptions>;

PEFT_NAMESPACE_END
