#pragma once

// DoRA (Liu et al., 2024, "Weight-Decomposed Low-Rank Adaptation"): the adapted weight
// W + s B A is split into a direction, normalised per output row, and a trained magnitude m:
// W' = m * (W + s B A) / ||W + s B A||, where the norm is taken row by row and, as in Hugging
// Face PEFT (`use_dora=True`), treated as a constant in the backward pass. m starts at ||W||
// and B at zero, so a new adapter changes nothing. Files are Hugging Face's LoRA files with
// `use_dora: true` and one `lora_magnitude_vector` [out] per projection.

#include <torch/arg.h>
#include <torch/nn/functional/linear.h>
#include <torch/nn/modules/dropout.h>
#include <torch/nn/modules/linear.h>
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
#include <peft/methods/lora.hpp>
#include <peft/nn/tuned.hpp>

PEFT_NAMESPACE_BEGIN

class DoRAImpl;

/// Options of DoRA: LoRA's (rank, alpha, dropout, rsLoRA scaling); projections only. Default
/// targets: the attention query and value projections.
struct DoRAOptions : TargetOptions<DoRAOptions> {
  explicit DoRAOptions(int64_t r = 8) : TargetOptions({"query", "value"}), r_(r) {}
  TORCH_ARG(int64_t, r);
  TORCH_ARG(double, alpha) = 8.0;
  TORCH_ARG(double, dropout) = 0.0;
  TORCH_ARG(bool, rslora) = false;

 public:
  using Impl = DoRAImpl;
  static constexpr const char* method = "dora";
  /// The kinds of site the method can sit at.
  static constexpr unsigned kinds = site_kinds(SiteKind::Linear);
  static bool fits(const SiteImpl& site) { return site.kind() == SiteKind::Linear; }
  void validate() const { as_lora().validate(); }
  /// The same settings as LoRA options (for the parts DoRA shares with LoRA).
  LoRAOptions as_lora() const {
    auto o = LoRAOptions(r_).alpha(alpha_).dropout(dropout_).rslora(rslora_);
    o.adapter_name(adapter_name());
    return o;
  }
  double scaling() const { return as_lora().scaling(); }
};

/// DoRA at one projection: `lora_A.weight` [r, in], `lora_B.weight` [out, r] and
/// `lora_magnitude_vector` [out] (Hugging Face's names).
class DoRAImpl : public MethodImpl {
 public:
  DoRAImpl(const SiteImpl& site, const DoRAOptions& options)
      : MethodImpl(DoRAOptions::method, options.adapter_name()),
        options_(options),
        scaling_(options.scaling()),
        site_(&site) {
    options.validate();
    const int64_t r = options.r(), in = site.in_features(), out = site.out_features();
    lora_A =
        register_module("lora_A", torch::nn::Linear(torch::nn::LinearOptions(in, r).bias(false)));
    lora_B =
        register_module("lora_B", torch::nn::Linear(torch::nn::LinearOptions(r, out).bias(false)));
    torch::NoGradGuard no_grad;
    lora_B->weight.zero_();
    lora_magnitude_vector = register_parameter(
        "lora_magnitude_vector", site.frozen_weight().detach().to(torch::kFloat).norm(2, {1}));
    if (options.dropout() > 0) {
      dropout = register_module("dropout", torch::nn::Dropout(options.dropout()));
    }
  }

  torch::Tensor apply(const torch::Tensor& input, const torch::Tensor& output) override {
    const auto& w = site_->frozen_weight();
    // m / ||W + s B A|| per output row, the norm held constant (no gradient through it).
    const auto scale = (lora_magnitude_vector / weight_norm()).to(output.scalar_type());
    const auto& b = site_->frozen_bias();
    const auto x = dropout ? dropout->forward(input) : input;
    // W x without the bias: from the site's output when no dropout changes x, as Hugging Face.
    const auto base = dropout && is_training() ? torch::nn::functional::linear(x, w)
                      : b.defined()            ? output - b
                                               : output;
    // Summed in Hugging Face's order, so the two agree to the last bit (measured: 0 on BERT and
    // SmolLM2), not only to rounding.
    const auto lora_result = lora_B->forward(lora_A->forward(x));
    return output + ((scale - 1) * base + scale * lora_result * scaling_);
  }

  bool can_merge() const override { return true; }

  /// m / ||W + s B A|| * (W + s B A) - W; remembered at merge so unmerge() subtracts exactly
  /// what was added.
  torch::Tensor delta_weight() override {
    if (merged()) return merged_delta_;
    torch::NoGradGuard no_grad;
    const auto& w = site_->frozen_weight();
    const auto adapted = w + lora_delta().to(w.scalar_type());
    const auto scale = (lora_magnitude_vector / weight_norm()).to(w.scalar_type());
    merged_delta_ = scale.unsqueeze(1) * adapted - w;
    return merged_delta_;
  }

  const DoRAOptions& options() const { return options_; }

  torch::nn::Linear lora_A{nullptr}, lora_B{nullptr};
  torch::Tensor lora_magnitude_vector;
  torch::nn::Dropout dropout{nullptr};

 private:
  torch::Tensor lora_delta() { return torch::matmul(lora_B->weight, lora_A->weight) * scaling_; }
  /// ||W + s B A|| per output row, detached.
  torch::Tensor weight_norm() {
    torch::NoGradGuard no_grad;
    const auto& w = site_->frozen_weight();
    return (w.to(torch::kFloat) + lora_delta().to(torch::kFloat)).norm(2, {1});
  }

  DoRAOptions options_;
  double scaling_;
  const SiteImpl* site_;
  torch::Tensor merged_delta_;
};

// ------------------------------------------------------------------------- options and format

namespace detail {

inline DoRAOptions dora_from_lora(const LoRAOptions& o) {
  auto d = DoRAOptions(o.r()).alpha(o.alpha()).dropout(o.dropout()).rslora(o.rslora());
  d.targets(o.targets()).layers(o.layers());
  d.adapter_name(o.adapter_name());
  return d;
}

/// Hugging Face's LoRA file with `use_dora: true`: per projection `lora_A.weight`,
/// `lora_B.weight` and `lora_magnitude_vector`.
inline void save_dora(SaveContext& c) {
  c.save_prefix = "base_model.model.";
  const auto& first = shared_setting<DoRAImpl>(c.methods, lora_setting<DoRAOptions>);
  const auto targets = save_site_parameters(c);
  lora_config(first.as_lora(), c.config);
  c.config["use_dora"] = true;
  c.config["target_modules"] = targets;
}

inline LoadPlan load_dora(const LoadContext& c) {
  LoadPlan plan;
  plan.save_prefix = "base_model.model.";
  auto options = dora_from_lora(lora_options_from_json(c.config, c.config_file));
  options.adapter_name(c.adapter);
  const int64_t r = options.r();
  auto targets = file_sites(c, plan.save_prefix, {".lora_A.weight"}, &DoRAOptions::fits);
  check(!targets.empty(), "load_adapter", "{}: no DoRA weights (keys ending in .lora_A.weight)",
        c.weights_file);
  auto sites = sites_by_path(c.model);
  for (const auto& path : targets) {
    auto site = sites[path];
    const std::string stem = plan.save_prefix + c.hub_path(path);
    const int64_t in = site->in_features(), out = site->out_features();
    auto part = [c, path](int which) {
      return [c, path, which] {
        auto dora = c.method_at<DoRAImpl>(path, "dora");
        return which == 0   ? dora->lora_A->weight
               : which == 1 ? dora->lora_B->weight
                            : dora->lora_magnitude_vector;
      };
    };
    plan.slots.push_back({stem + ".lora_A.weight", {r, in}, part(0)});
    plan.slots.push_back({stem + ".lora_B.weight", {out, r}, part(1)});
    plan.slots.push_back({stem + ".lora_magnitude_vector", {out}, part(2)});
  }
  options.targets(targets);
  auto& model = c.model;
  plan.apply = [&model, options] { attach(model, options); };
  return plan;
}

inline MethodEntry dora_entry() {
  MethodEntry e;
  e.name = "dora";
  e.summary = "DoRA: LoRA with a separately trained magnitude per output (Liu et al., 2024)";
  e.default_lr = 1e-3;
  e.option_keys = lora_entry().option_keys;  // LoRA's options, LoRA+ included
  e.attach = [](torch::nn::Module& model, const nlohmann::json& json) {
    return peft::attach(model, dora_from_lora(lora_options_from_json(json, "options", "dora")));
  };
  e.lr_rules = lora_entry().lr_rules;  // LoRA+ for the B matrices, as in LoRA
  // Of the LORA files, those with use_dora true.
  e.format = AdapterFormat{"LORA", true, save_dora, load_dora, [](const nlohmann::json& config) {
                             auto it = config.find("use_dora");
                             return it != config.end() && it->is_boolean() && it->get<bool>();
                           }};
  return e;
}

inline const bool dora_registered = register_method(dora_entry());

}  // namespace detail

/// DoRA on a stock Linear, MultiheadAttention, TransformerEncoderLayer or TransformerEncoder.
template <class Stock>
using DoRA = Tuned<Stock, DoRAOptions>;

PEFT_NAMESPACE_END
