#pragma once

// LoKr (Yeh et al., 2024, "Navigating Text-To-Image Customization: From LyCORIS Fine-Tuning to
// Model Evaluation"): the weight update is a Kronecker product, dW = (alpha / r) * W1 (x) W2,
// with out = a * b and in = c * d factored near their square roots, W1 [a, c] and W2 [b, d];
// W2 is itself a low-rank product W2a W2b when r is small against it (and W1 too with
// decompose_both). W1 starts at zero, so a new adapter changes nothing. Hugging Face PEFT's
// `LOKR` files: `lokr_w1` (or `lokr_w1_a`, `lokr_w1_b`) and `lokr_w2` (or `lokr_w2_a`,
// `lokr_w2_b`) per projection.

#include <torch/arg.h>
#include <torch/nn/functional/linear.h>
#include <torch/nn/init.h>
#include <torch/types.h>

#include <cmath>
#include <algorithm>
#include <cstdint>
#include <string>
#include <tuple>
#include <utility>
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

class LoKrImpl;

/// Options of LoKr. Default targets: the attention query and value projections.
struct LoKrOptions : TargetOptions<LoKrOptions> {
  explicit LoKrOptions(int64_t r = 8) : TargetOptions({"query", "value"}), r_(r) {}
  /// Rank of the decomposed factor(s).
  TORCH_ARG(int64_t, r);
  /// The update is multiplied by alpha / r.
  TORCH_ARG(double, alpha) = 8.0;
  /// Decompose W1 into a low-rank product too (when r is small against it).
  TORCH_ARG(bool, decompose_both) = false;
  /// Factor each size into this and the rest; -1 = near the square root.
  TORCH_ARG(int64_t, decompose_factor) = -1;

 public:
  using Impl = LoKrImpl;
  static constexpr const char* method = "lokr";
  /// The kinds of site the method can sit at.
  static constexpr unsigned kinds = site_kinds(SiteKind::Linear);
  static bool fits(const SiteImpl& site) { return site.kind() == SiteKind::Linear; }
  void validate() const {
    check(r_ > 0, method, "rank must be positive, got r={}", r_);
    check(alpha_ > 0, method, "alpha must be positive, got alpha={}", alpha_);
    check(decompose_factor_ == -1 || decompose_factor_ > 0, method,
          "decompose_factor must be positive or -1, got {}", decompose_factor_);
  }
};

/// `dimension` as m * n with m <= n: with factor > 0 dividing it, (factor, dimension / factor);
/// else the pair nearest the square root (no larger than `factor` when given). LyCORIS's and
/// Hugging Face PEFT's rule, so both sides build the same shapes.
inline std::pair<int64_t, int64_t> lokr_factorization(int64_t dimension, int64_t factor = -1) {
  if (factor > 0 && dimension % factor == 0) return {factor, dimension / factor};
  if (factor == -1) factor = dimension;
  int64_t m = 1, n = dimension;
  while (m < n) {
    int64_t next = m + 1;
    while (dimension % next != 0) ++next;
    const int64_t other = dimension / next;
    if (next + other > m + n || next > factor) break;
    m = next;
    n = other;
  }
  if (m > n) std::swap(m, n);
  return {m, n};
}

/// The shapes of LoKr's factors at one projection.
struct LoKrShapes {
  int64_t out_l, out_k, in_m, in_n;
  bool full_w1, full_w2;
};

inline LoKrShapes lokr_shapes(int64_t in, int64_t out, const LoKrOptions& options) {
  LoKrShapes s{};
  std::tie(s.in_m, s.in_n) = lokr_factorization(in, options.decompose_factor());
  std::tie(s.out_l, s.out_k) = lokr_factorization(out, options.decompose_factor());
  const auto r = static_cast<double>(options.r());
  s.full_w1 = !(options.decompose_both() && r < static_cast<double>(std::max(s.out_l, s.in_m)) / 2);
  s.full_w2 = !(r < static_cast<double>(std::max(s.out_k, s.in_n)) / 2);
  return s;
}

/// LoKr at one projection (Hugging Face's parameter names).
class LoKrImpl : public MethodImpl {
 public:
  LoKrImpl(const SiteImpl& site, const LoKrOptions& options)
      : MethodImpl(LoKrOptions::method, options.adapter_name()),
        options_(options),
        scaling_(options.alpha() / static_cast<double>(options.r())) {
    options.validate();
    const int64_t r = options.r();
    const auto s = lokr_shapes(site.in_features(), site.out_features(), options);
    torch::NoGradGuard no_grad;
    auto he = [](torch::Tensor t) { return torch::nn::init::kaiming_uniform_(t, std::sqrt(5.0)); };
    // W1 (or its first factor) starts at zero, the rest as Hugging Face PEFT.
    if (s.full_w1) {
      lokr_w1 = register_parameter("lokr_w1", torch::zeros({s.out_l, s.in_m}));
    } else {
      lokr_w1_a = register_parameter("lokr_w1_a", torch::zeros({s.out_l, r}));
      lokr_w1_b = register_parameter("lokr_w1_b", he(torch::empty({r, s.in_m})));
    }
    if (s.full_w2) {
      lokr_w2 = register_parameter("lokr_w2", he(torch::empty({s.out_k, s.in_n})));
    } else {
      lokr_w2_a = register_parameter("lokr_w2_a", he(torch::empty({s.out_k, r})));
      lokr_w2_b = register_parameter("lokr_w2_b", he(torch::empty({r, s.in_n})));
    }
  }

  torch::Tensor apply(const torch::Tensor& input, const torch::Tensor& output) override {
    return output + torch::nn::functional::linear(input, delta_weight().to(input.scalar_type()));
  }

  bool can_merge() const override { return true; }

  torch::Tensor delta_weight() override {
    auto w1 = lokr_w1.defined() ? lokr_w1 : torch::matmul(lokr_w1_a, lokr_w1_b);
    auto w2 = lokr_w2.defined() ? lokr_w2 : torch::matmul(lokr_w2_a, lokr_w2_b);
    return torch::kron(w1, w2) * scaling_;
  }

  const LoKrOptions& options() const { return options_; }

  /// Full factors, or undefined when decomposed into *_a and *_b.
  torch::Tensor lokr_w1, lokr_w2;
  torch::Tensor lokr_w1_a, lokr_w1_b, lokr_w2_a, lokr_w2_b;

 private:
  LoKrOptions options_;
  double scaling_;
};

// ------------------------------------------------------------------------- options and format

namespace detail {

inline LoKrOptions lokr_options_from_json(const nlohmann::json& config, const std::string& file,
                                          const char* where) {
  auto options = lycoris_options_from_json<LoKrOptions>(config, file, where);
  options.decompose_both(config_value_or<bool>(config, "decompose_both", false, file, where))
      .decompose_factor(config_value_or<int64_t>(config, "decompose_factor", -1, file, where));
  validate_from_file(options, file);
  return options;
}

inline void save_lokr(SaveContext& c) {
  c.save_prefix = "base_model.model.";
  const auto& first = shared_setting<LoKrImpl>(c.methods, [](const LoKrOptions& o) {
    return fmt::format("{} decompose_both={} decompose_factor={}", rank_alpha_setting(o),
                       o.decompose_both(), o.decompose_factor());
  });
  const auto targets = save_site_parameters(c);
  lycoris_config(first.r(), first.alpha(), targets, c.config);
  c.config["decompose_both"] = first.decompose_both();
  c.config["decompose_factor"] = first.decompose_factor();
  c.config["rank_dropout_scale"] = false;
}

inline LoadPlan load_lokr(const LoadContext& c) {
  LoadPlan plan;
  plan.save_prefix = "base_model.model.";
  auto options = lokr_options_from_json(c.config, c.config_file, "load_adapter");
  options.adapter_name(c.adapter);
  const int64_t r = options.r();
  auto targets = file_sites(c, plan.save_prefix, {".lokr_w1", ".lokr_w1_a"}, &LoKrOptions::fits);
  check(!targets.empty(), "load_adapter", "{}: no LoKr weights (keys ending in .lokr_w1)",
        c.weights_file);
  auto sites = sites_by_path(c.model);
  for (const auto& path : targets) {
    auto site = sites[path];
    const auto s = lokr_shapes(site->in_features(), site->out_features(), options);
    const std::string stem = plan.save_prefix + c.hub_path(path);
    std::vector<std::pair<std::string, std::vector<int64_t>>> parts;
    if (s.full_w1) {
      parts.push_back({"lokr_w1", {s.out_l, s.in_m}});
    } else {
      parts.push_back({"lokr_w1_a", {s.out_l, r}});
      parts.push_back({"lokr_w1_b", {r, s.in_m}});
    }
    if (s.full_w2) {
      parts.push_back({"lokr_w2", {s.out_k, s.in_n}});
    } else {
      parts.push_back({"lokr_w2_a", {s.out_k, r}});
      parts.push_back({"lokr_w2_b", {r, s.in_n}});
    }
    for (const auto& [name, shape] : parts) {
      plan.slots.push_back({stem + "." + name, shape, [c, path, name = name] {
                              return parameter(*c.method_at<LoKrImpl>(path, "lokr"), name);
                            }});
    }
  }
  options.targets(targets);
  auto& model = c.model;
  plan.apply = [&model, options] { attach(model, options); };
  return plan;
}

inline MethodEntry lokr_entry() {
  MethodEntry e;
  e.name = "lokr";
  e.summary = "LoKr: Kronecker-product updates (Yeh et al., 2024)";
  e.default_lr = 1e-3;
  e.option_keys = lycoris_option_keys();
  e.option_keys.insert(e.option_keys.end(), {"decompose_both", "decompose_factor"});
  e.attach = [](torch::nn::Module& model, const nlohmann::json& json) {
    return peft::attach(model, lokr_options_from_json(json, "options", "lokr"));
  };
  e.format = AdapterFormat{"LOKR", true, save_lokr, load_lokr};
  return e;
}

inline const bool lokr_registered = register_method(lokr_entry());

}  // namespace detail

/// LoKr on a stock Linear, MultiheadAttention, TransformerEncoderLayer or TransformerEncoder.
template <class Stock>
using LoKr = Tuned<Stock, LoKrOptions>;

PEFT_NAMESPACE_END
