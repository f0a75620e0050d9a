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
#include <peft/methods/adapter.hpp>

PEFT_NAMESPACE_BEGIN

namespace detail {

/// The rules one attach() call shares: created and registered by the first site's method.
struct CompacterShared {
  torch::Tensor phm_rule;
  bool registered = false;
};

}  // namespace detail

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
  static constexpr const char* method = "compacter";
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

template <>
struct method_for<CompacterOptions> {
  using type = CompacterImpl;
};

/// Attaches Compacter adapters; with shared_phm_rule (the default) all of them use one set of
/// rules. Returns the sites' paths; throws, leaving the model unchanged, like peft::attach.
inline std::vector<std::string> attach(torch::nn::Module& model, const CompacterOptions& options) {
  options.validate();
  CompacterOptions bound = options;
  bound.shared(std::make_shared<detail::CompacterShared>());
  auto sites = select_sites(model, bound, CompacterOptions::method, &CompacterOptions::fits);
  return detail::attach_to(model, sites, bound);
}

PEFT_NAMESPACE_END
