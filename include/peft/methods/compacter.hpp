#pragma once

// Compacter (Karimi Mahabadi et al., 2021): bottleneck adapters whose projections are
// parameterised hypercomplex multiplication (PHM) layers, W = sum_{i=1..n} A_i (x) B_i, a sum of
// Kronecker products. The n x n "rules" A_i are shared by every adapter of one attach() call
// (shared_phm_rule, the paper's Compacter) and each B_i = s_i t_i^T is low-rank (rank 1 by
// default), so a d -> m projection costs about rank * (d + m) parameters instead of d * m.
// The up-projection's t starts at zero, so a new Compacter is the identity.

#include <torch/arg.h>
#include <torch/nn/init.h>
#include <torch/types.h>

#include <cmath>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <peft/config.hpp>
#include <peft/core/attach.hpp>
#include <peft/core/error.hpp>
#include <peft/core/site.hpp>
#include <peft/core/targets.hpp>
#include <peft/core/registry.hpp>
#include <peft/detail/json.hpp>
#include <peft/methods/adapter.hpp>

PEFT_NAMESPACE_BEGIN

namespace detail {

/// The rules one attach() call shares: created and registered by the first site's method.
struct CompacterShared {
  torch::Tensor phm_rule;
  bool registered = false;
};

}  // namespace detail

class CompacterImpl;

/// Options of Compacter adapters; placement and default targets follow AdapterOptions.
struct CompacterOptions : TargetOptions<CompacterOptions> {
  explicit CompacterOptions(AdapterKind kind = AdapterKind::Houlsby)
      : TargetOptions(kind == AdapterKind::Houlsby
                          ? std::vector<std::string>{"attn_block", "ffn_block"}
                          : std::vector<std::string>{"ffn_block"}),
        kind_(kind) {}
  TORCH_ARG(AdapterKind, kind);
  /// Inner size = model dimension / reduction_factor (unless bottleneck() is set).
  TORCH_ARG(int64_t, reduction_factor) = 16;
  TORCH_ARG(int64_t, bottleneck) = 0;
  /// n: Kronecker factors per projection; must divide the model dimension and the inner size.
  TORCH_ARG(int64_t, phm_dim) = 4;
  /// Rank of each B_i.
  TORCH_ARG(int64_t, rank) = 1;
  /// Share the rules A_i between all adapters of the attach() call (false: each PHM layer has its
  /// own).
  TORCH_ARG(bool, shared_phm_rule) = true;
  TORCH_ARG(std::string, activation) = "relu";
  TORCH_ARG(double, scaling) = 1.0;

 public:
  using Impl = CompacterImpl;
  static constexpr const char* method = "compacter";
  /// The kinds of site the method can sit at.
  static constexpr unsigned kinds = site_kinds(SiteKind::Block);
  static bool fits(const SiteImpl& site) { return site.kind() == SiteKind::Block; }
  void validate() const {
    check(reduction_factor_ > 0, method, "reduction_factor must be positive, got {}",
          reduction_factor_);
    check(bottleneck_ >= 0, method, "bottleneck must not be negative, got {}", bottleneck_);
    check(phm_dim_ > 0, method, "phm_dim must be positive, got {}", phm_dim_);
    check(rank_ > 0, method, "rank must be positive, got {}", rank_);
    check(scaling_ > 0, method, "scaling must be positive, got {}", scaling_);
    AdapterOptions::activation_fn(activation_);
  }

  /// The rules these options share (set by peft::attach; without them each method owns its own).
  const std::shared_ptr<detail::CompacterShared>& shared() const { return shared_; }
  CompacterOptions& shared(std::shared_ptr<detail::CompacterShared> state) {
    shared_ = std::move(state);
    return *this;
  }
  /// These options with fresh shared state bound, so every site of one attach() call shares it.
  CompacterOptions prepared() const {
    CompacterOptions bound = *this;
    bound.shared(std::make_shared<detail::CompacterShared>());
    return bound;
  }

 private:
  std::shared_ptr<detail::CompacterShared> shared_;
};

/// The rules A [n, n, n], initialised N(0, 1/n) so that sum_i A_i (x) B_i keeps B's scale.
inline torch::Tensor make_phm_rule(int64_t n) {
  return torch::randn({n, n, n}) / std::sqrt(static_cast<double>(n));
}

/// sum_i kron(A_i, s_i t_i^T) for A [n, n, n], s [n, in/n, rank], t [n, out/n, rank]: [in, out].
inline torch::Tensor phm_weight(const torch::Tensor& rule, const torch::Tensor& left,
                                const torch::Tensor& right) {
  auto b = torch::matmul(left, right.transpose(1, 2));  // [n, in/n, out/n]
  // kron(A, B)[p * bi + q, r * bo + s] = A[p, r] * B[q, s].
  auto w = torch::einsum("ipr,iqs->pqrs", {rule, b});
  return w.reshape({rule.size(1) * b.size(1), rule.size(2) * b.size(2)});
}

/// One PHM projection in -> out: `W_left` [n, in/n, rank], `W_right` [n, out/n, rank], `b` [out]
/// and the rules `phm_rule` [n, n, n] (registered here only when not shared). y = x W + b.
class PHMLinearImpl : public torch::nn::Module {
 public:
  PHMLinearImpl(int64_t in, int64_t out, int64_t n, int64_t rank, torch::Tensor shared_rule,
                bool zero_right)
      : torch::nn::Module("peft::PHMLinear") {
    check(in % n == 0 && out % n == 0, CompacterOptions::method,
          "phm_dim {} must divide the projection's sizes, got {} -> {}", n, in, out);
    phm_rule =
        shared_rule.defined() ? shared_rule : register_parameter("phm_rule", make_phm_rule(n));
    // Glorot-style scale for each factor, so the product starts at a usual weight scale.
    const double std_left = std::sqrt(2.0 / static_cast<double>(in / n + rank));
    const double std_right = std::sqrt(2.0 / static_cast<double>(out / n + rank));
    W_left = register_parameter("W_left", torch::randn({n, in / n, rank}) * std_left);
    W_right =
        register_parameter("W_right", zero_right ? torch::zeros({n, out / n, rank})
                                                 : torch::randn({n, out / n, rank}) * std_right);
    b = register_parameter("b", torch::zeros({out}));
  }

  /// The full weight [in, out].
  torch::Tensor weight() const { return phm_weight(phm_rule, W_left, W_right); }

  torch::Tensor forward(const torch::Tensor& x) { return torch::matmul(x, weight()) + b; }

  torch::Tensor phm_rule, W_left, W_right, b;
};
TORCH_MODULE(PHMLinear);

/// One Compacter at one Block site: `adapter_down` and `adapter_up` PHM layers; the shared rules
/// are registered under the first site as `phm_rule`.
class CompacterImpl : public MethodImpl {
 public:
  CompacterImpl(const SiteImpl& site, const CompacterOptions& options)
      : MethodImpl("compacter", options.adapter_name()),
        options_(options),
        activation_(AdapterOptions::activation_fn(options.activation())) {
    options.validate();
    const int64_t d = site.out_features();
    const int64_t m =
        options.bottleneck() > 0 ? options.bottleneck() : d / options.reduction_factor();
    check(m > 0, CompacterOptions::method, "reduction_factor {} leaves no units of dimension {}",
          options.reduction_factor(), d);
    const int64_t n = options.phm_dim();
    check(d % n == 0 && m % n == 0, CompacterOptions::method,
          "phm_dim {} must divide the model dimension {} and the bottleneck {} (at \"{}\")", n, d,
          m, site.role());
    torch::Tensor rule;
    if (options.shared_phm_rule()) {
      auto shared =
          options.shared() ? options.shared() : std::make_shared<detail::CompacterShared>();
      if (!shared->phm_rule.defined()) shared->phm_rule = make_phm_rule(n);
      check(shared->phm_rule.size(0) == n, CompacterOptions::method,
            "shared phm_rule has phm_dim {}, expected {}", shared->phm_rule.size(0), n);
      rule = shared->phm_rule;
      if (!shared->registered) {
        rule = register_parameter("phm_rule", rule);
        shared->phm_rule = rule;
        shared->registered = true;
      }
    }
    adapter_down = register_module("adapter_down",
                                   PHMLinear(d, m, n, options.rank(), rule, /*zero_right=*/false));
    adapter_up = register_module("adapter_up",
                                 PHMLinear(m, d, n, options.rank(), rule, /*zero_right=*/true));
  }

  torch::Tensor apply(const torch::Tensor& input, const torch::Tensor& output) override {
    const auto& source = options_.kind() == AdapterKind::Parallel ? input : output;
    return output +
           adapter_up->forward(activation_(adapter_down->forward(source))) * options_.scaling();
  }

  const CompacterOptions& options() const { return options_; }

  PHMLinear adapter_down{nullptr}, adapter_up{nullptr};

 private:
  CompacterOptions options_;
  std::function<torch::Tensor(const torch::Tensor&)> activation_;
};

// ------------------------------------------------------------------------- options and format

namespace detail {

/// Compacter: each site's PHM parameters (`<site>.adapter_down.W_left`, ...) and the shared rules
/// once (`phm_rule`), or each layer's own rules (`<site>.adapter_down.phm_rule`) when not shared.
inline void save_compacter(const SiteMethods& methods, nlohmann::json& config,
                           NamedTensors& tensors) {
  auto first = std::dynamic_pointer_cast<CompacterImpl>(methods.front().second);
  const auto& o = first->options();
  const int64_t m = first->adapter_down->b.size(0);
  const int64_t rank = first->adapter_down->W_left.size(2);
  std::vector<std::string> targets;
  for (const auto& [path, method] : methods) {
    auto c = std::dynamic_pointer_cast<CompacterImpl>(method);
    const auto& co = c->options();
    check(co.kind() == o.kind() && co.phm_dim() == o.phm_dim() &&
              co.shared_phm_rule() == o.shared_phm_rule() && co.activation() == o.activation() &&
              co.scaling() == o.scaling() && c->adapter_down->b.size(0) == m &&
              c->adapter_down->W_left.size(2) == rank &&
              (!o.shared_phm_rule() ||
               c->adapter_down->phm_rule.is_same(first->adapter_down->phm_rule)),
          "save_adapter",
          "Compacter at \"{}\" is set up unlike the one at \"{}\" (or has other shared rules); one "
          "file holds one setting",
          path, methods.front().first);
    targets.push_back(path);
    for (const auto& item : c->named_parameters()) {
      if (o.shared_phm_rule() && item.key() == "phm_rule") continue;
      tensors.emplace_back(path + "." + item.key(), item.value());
    }
  }
  if (o.shared_phm_rule()) tensors.emplace_back("phm_rule", first->adapter_down->phm_rule);
  config["adapter_kind"] = to_string(o.kind());
  config["bottleneck"] = m;
  config["phm_dim"] = o.phm_dim();
  config["phm_rank"] = rank;
  config["shared_phm_rule"] = o.shared_phm_rule();
  config["activation"] = o.activation();
  config["scaling"] = o.scaling();
  config["target_modules"] = targets;
}

inline LoadPlan plan_compacter(torch::nn::Module& model, const nlohmann::json& config,
                               const std::string& cfg_name, const std::string& adapter_name) {
  const auto targets = config_value<std::vector<std::string>>(config, "target_modules", cfg_name);
  check(!targets.empty(), "load_adapter", "{}: target_modules is empty", cfg_name);
  auto options =
      CompacterOptions(enum_from_name<AdapterKind>(
                           config_value<std::string>(config, "adapter_kind", cfg_name), cfg_name))
          .bottleneck(config_value<int64_t>(config, "bottleneck", cfg_name))
          .phm_dim(config_value<int64_t>(config, "phm_dim", cfg_name))
          .rank(config_value<int64_t>(config, "phm_rank", cfg_name))
          .shared_phm_rule(config_value<bool>(config, "shared_phm_rule", cfg_name))
          .activation(config_value<std::string>(config, "activation", cfg_name))
          .scaling(config_value<double>(config, "scaling", cfg_name));
  options.adapter_name(adapter_name);
  options.targets(targets);
  detail::validate_from_file(options, cfg_name);
  check(options.bottleneck() > 0, "load_adapter", "{}: bottleneck must be positive, got {}",
        cfg_name, options.bottleneck());
  auto sites = sites_by_path(model);
  LoadPlan plan;
  const std::string head = targets.front();
  for (const auto& path : targets) {
    auto it = sites.find(path);
    check(it != sites.end() && CompacterOptions::fits(*it->second), "load_adapter",
          "{}: target \"{}\" is no block site of this model", cfg_name, path);
    // A Compacter built for the site, off the model, gives the expected keys and shapes.
    std::shared_ptr<CompacterImpl> probe;
    try {
      probe = std::make_shared<CompacterImpl>(*it->second, options);
    } catch (const Error& e) {
      fail("load_adapter", "{}: {}", cfg_name, e.what());
    }
    for (const auto& item : probe->named_parameters()) {
      const std::string key = item.key();
      if (options.shared_phm_rule() && key == "phm_rule") {
        if (path == head) {
          plan.slots.push_back(
              {"phm_rule", item.value().sizes().vec(), [&model, head, adapter_name] {
                 return method_of<CompacterImpl>(model, head, "compacter", adapter_name)
                     ->adapter_down->phm_rule;
               }});
        }
        continue;
      }
      plan.slots.push_back(
          {path + "." + key, item.value().sizes().vec(), [&model, path, adapter_name, key] {
             return parameter(*method_of<CompacterImpl>(model, path, "compacter", adapter_name),
                              key);
           }});
    }
  }
  plan.apply = [&model, options] { attach(model, options); };
  return plan;
}

inline MethodEntry compacter_entry() {
  MethodEntry e;
  e.name = "compacter";
  e.summary = "Compacter: adapters of Kronecker products with shared rules (Mahabadi et al., 2021)";
  e.default_lr = 1e-3;
  e.option_keys = {"adapter_kind", "reduction_factor", "phm_dim",
                   "phm_rank",     "shared_phm_rule",  "activation"};
  e.attach = [](torch::nn::Module& model, const nlohmann::json& json) {
    const char* w = "compacter";
    auto options =
        CompacterOptions(
            enum_from_name<AdapterKind>(
                config_value_or<std::string>(json, "adapter_kind", "houlsby", "options", w),
                "options"))
            .reduction_factor(config_value_or<int64_t>(json, "reduction_factor", 16, "options", w))
            .phm_dim(config_value_or<int64_t>(json, "phm_dim", 4, "options", w))
            .rank(config_value_or<int64_t>(json, "phm_rank", 1, "options", w))
            .shared_phm_rule(config_value_or<bool>(json, "shared_phm_rule", true, "options", w))
            .activation(config_value_or<std::string>(json, "activation", "relu", "options", w));
    return peft::attach(model, options);
  };
  e.format = AdapterFormat{"COMPACTER", true,
                           [](SaveContext& c) { save_compacter(c.methods, c.config, c.tensors); },
                           [](const LoadContext& c) {
                             return plan_compacter(c.model, c.config, c.config_file, c.adapter);
                           }};
  return e;
}

inline const bool compacter_registered = register_method(compacter_entry());

}  // namespace detail

PEFT_NAMESPACE_END
