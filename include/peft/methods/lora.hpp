#pragma once

// LoRA (Hu et al., 2021): a frozen projection W gets a trainable low-rank update,
// y = W x + b + (alpha / r) * B A dropout(x), with A [r, in] and B [out, r]; B starts at zero so a
// new adapter changes nothing. rsLoRA (Kalajdzievski, 2023) scales by alpha / sqrt(r) instead.

#include <torch/arg.h>
#include <torch/nn/functional/embedding.h>
#include <torch/nn/init.h>
#include <torch/nn/modules/dropout.h>
#include <torch/nn/modules/linear.h>

#include <cmath>
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include <peft/config.hpp>
#include <peft/core/attach.hpp>
#include <peft/core/error.hpp>
#include <peft/core/site.hpp>
#include <peft/core/registry.hpp>
#include <peft/core/targets.hpp>
#include <peft/detail/json.hpp>
#include <peft/nn/tuned.hpp>

PEFT_NAMESPACE_BEGIN

/// How LoRA's A matrix starts (B always starts at zero).
enum class LoRAInit {
  KaimingUniform,  ///< A ~ kaiming_uniform(a = sqrt(5)), as torch::nn::Linear and Hugging Face
  Gaussian,        ///< A ~ N(0, 1/r)
};

class LoRAImpl;

/// Options of LoRA. Default targets: the attention query and value projections.
struct LoRAOptions : TargetOptions<LoRAOptions> {
  explicit LoRAOptions(int64_t r = 8) : TargetOptions({"query", "value"}), r_(r) {}
  /// Rank of the update.
  TORCH_ARG(int64_t, r);
  /// Scale numerator: the update is multiplied by alpha / r (alpha / sqrt(r) with rslora).
  TORCH_ARG(double, alpha) = 8.0;
  /// Dropout on the input of A during training.
  TORCH_ARG(double, dropout) = 0.0;
  /// Rank-stabilised scaling alpha / sqrt(r).
  TORCH_ARG(bool, rslora) = false;
  TORCH_ARG(LoRAInit, init) = LoRAInit::KaimingUniform;

 public:
  using Impl = LoRAImpl;
  static constexpr const char* method = "lora";
  /// The kinds of site the method can sit at.
  static constexpr unsigned kinds = site_kinds(SiteKind::Linear, SiteKind::Embedding);
  static bool fits(const SiteImpl& site) {
    return site.kind() == SiteKind::Linear || site.kind() == SiteKind::Embedding;
  }
  void validate() const {
    check(r_ > 0, method, "rank must be positive, got r={}", r_);
    check(alpha_ > 0, method, "alpha must be positive, got alpha={}", alpha_);
    check(dropout_ >= 0 && dropout_ < 1, method, "dropout must be in [0, 1), got dropout={}",
          dropout_);
  }
  /// The factor the low-rank product is multiplied by.
  double scaling() const {
    return rslora_ ? alpha_ / std::sqrt(static_cast<double>(r_)) : alpha_ / static_cast<double>(r_);
  }
};

/// One LoRA update at one Linear or Embedding site. Parameter names follow Hugging Face PEFT:
/// `lora_A.weight` [r, in] and `lora_B.weight` [out, r] on projections; `lora_embedding_A`
/// [r, vocab] and `lora_embedding_B` [dim, r] on embeddings.
class LoRAImpl : public MethodImpl {
 public:
  LoRAImpl(const SiteImpl& site, const LoRAOptions& options)
      : MethodImpl("lora", options.adapter_name()),
        options_(options),
        embedding_(site.kind() == SiteKind::Embedding),
        scaling_(options.scaling()) {
    options.validate();
    const int64_t r = options.r(), in = site.in_features(), out = site.out_features();
    if (embedding_) {
      // Hugging Face's embedding convention: A starts at zero, B random.
      lora_embedding_A = register_parameter("lora_embedding_A", torch::zeros({r, in}));
      lora_embedding_B = register_parameter("lora_embedding_B", torch::randn({out, r}));
    } else {
      lora_A =
          register_module("lora_A", torch::nn::Linear(torch::nn::LinearOptions(in, r).bias(false)));
      lora_B = register_module("lora_B",
                               torch::nn::Linear(torch::nn::LinearOptions(r, out).bias(false)));
      torch::NoGradGuard no_grad;
      if (options.init() == LoRAInit::Gaussian) {
        lora_A->weight.normal_(0.0, 1.0 / static_cast<double>(r));
      }
      lora_B->weight.zero_();
    }
    if (options.dropout() > 0) {
      dropout = register_module("dropout", torch::nn::Dropout(options.dropout()));
    }
  }

  torch::Tensor apply(const torch::Tensor& input, const torch::Tensor& output) override {
    if (embedding_) {
      auto after_a = torch::nn::functional::embedding(input, lora_embedding_A.t());
      return output + torch::matmul(after_a, lora_embedding_B.t()) * scaling_;
    }
    auto x = dropout ? dropout->forward(input) : input;
    return output + lora_B->forward(lora_A->forward(x)) * scaling_;
  }

  bool can_merge() const override { return true; }

  torch::Tensor delta_weight() override {
    if (embedding_) return torch::matmul(lora_embedding_B, lora_embedding_A).t() * scaling_;
    return torch::matmul(lora_B->weight, lora_A->weight) * scaling_;
  }

  const LoRAOptions& options() const { return options_; }
  double scaling() const { return scaling_; }
  bool on_embedding() const { return embedding_; }
  /// The factors of a LoRA on a linear layer (none on an embedding, whose factors are laid out
  /// for a lookup).
  std::optional<LowRank> low_rank() const override {
    if (embedding_) return std::nullopt;
    return LowRank{lora_A->weight.detach(), lora_B->weight.detach(), scaling_};
  }

  torch::nn::Linear lora_A{nullptr}, lora_B{nullptr};
  torch::Tensor lora_embedding_A, lora_embedding_B;
  torch::nn::Dropout dropout{nullptr};

 private:
  LoRAOptions options_;
  bool embedding_;
  double scaling_;
};
// ------------------------------------------------------------------------- options and format

namespace detail {

/// LoRA options from JSON with Hugging Face's LoraConfig names: r, lora_alpha, lora_dropout,
/// use_rslora, target_modules, layers_to_transform (each optional). Throws naming `file` on a
/// setting peft does not support (bias other than "none", fan_in_fan_out, rank or alpha
/// patterns).
inline LoRAOptions lora_options_from_json(const nlohmann::json& config, const std::string& file,
                                          const char* where = "load_adapter") {
  const auto bias = config_value_or<std::string>(config, "bias", "none", file, where);
  check(bias == "none", where, "{}: LoRA bias \"{}\" is not supported (only \"none\")", file, bias);
  check(!config_value_or<bool>(config, "fan_in_fan_out", false, file, where), where,
        "{}: fan_in_fan_out is not supported", file);
  for (const char* key : {"rank_pattern", "alpha_pattern"}) {
    KeyLog::note(key);
    auto it = config.find(key);
    check(it == config.end() || it->is_null() || it->empty(), where,
          "{}: {} (per-module ranks or alphas) is not supported", file, key);
  }
  LoRAOptions options(config_value_or<int64_t>(config, "r", 8, file, where));
  options.alpha(config_value_or<double>(config, "lora_alpha", 8.0, file, where))
      .dropout(config_value_or<double>(config, "lora_dropout", 0.0, file, where))
      .rslora(config_value_or<bool>(config, "use_rslora", false, file, where));
  targets_from_json(config, options, file, where);
  validate_from_file(options, file);
  return options;
}

/// The settings one LoRA file holds (every site must share them).
inline void lora_config(const LoRAOptions& o, nlohmann::json& config) {
  config["r"] = o.r();
  config["lora_alpha"] = number(o.alpha());
  config["lora_dropout"] = o.dropout();
  config["use_rslora"] = o.rslora();
  config["bias"] = "none";
  config["fan_in_fan_out"] = false;
  config["init_lora_weights"] = true;
  config["rank_pattern"] = nlohmann::json::object();
  config["alpha_pattern"] = nlohmann::json::object();
  config["layers_to_transform"] = nullptr;
  config["layers_pattern"] = nullptr;
}

/// The settings one LoRA file (or a LoRA variant's) holds for all its sites (for shared_setting).
template <class Options>
std::string lora_setting(const Options& o) {
  return fmt::format("r={} alpha={} rslora={} dropout={}", o.r(), o.alpha(), o.rslora(),
                     o.dropout());
}

inline void save_lora(SaveContext& c) {
  c.save_prefix = "base_model.model.";
  const auto& first = shared_setting<LoRAImpl>(c.methods, lora_setting<LoRAOptions>);
  const auto targets = save_site_parameters(c);
  lora_config(first, c.config);
  c.config["target_modules"] = targets;
}

inline LoadPlan load_lora(const LoadContext& c) {
  LoadPlan plan;
  plan.save_prefix = "base_model.model.";
  auto options = lora_options_from_json(c.config, c.config_file);
  options.adapter_name(c.adapter);
  const int64_t r = options.r();
  // The file's keys say which projections carry LoRA.
  auto targets =
      file_sites(c, plan.save_prefix, {".lora_A.weight", ".lora_embedding_A"}, &LoRAOptions::fits);
  check(!targets.empty(), "load_adapter", "{}: no LoRA weights (keys ending in .lora_A.weight)",
        c.weights_file);
  auto sites = sites_by_path(c.model);
  for (const auto& path : targets) {
    auto site = sites[path];
    const std::string stem = plan.save_prefix + c.hub_path(path);
    const int64_t in = site->in_features(), out = site->out_features();
    auto part = [c, path](int which) {
      return [c, path, which] {
        auto lora = c.method_at<LoRAImpl>(path, "lora");
        switch (which) {
          case 0:
            return lora->lora_embedding_A;
          case 1:
            return lora->lora_embedding_B;
          case 2:
            return lora->lora_A->weight;
          default:
            return lora->lora_B->weight;
        }
      };
    };
    if (site->kind() == SiteKind::Embedding) {
      plan.slots.push_back({stem + ".lora_embedding_A", {r, in}, part(0)});
      plan.slots.push_back({stem + ".lora_embedding_B", {out, r}, part(1)});
    } else {
      plan.slots.push_back({stem + ".lora_A.weight", {r, in}, part(2)});
      plan.slots.push_back({stem + ".lora_B.weight", {out, r}, part(3)});
    }
  }
  options.targets(targets);
  auto& model = c.model;
  plan.apply = [&model, options] { attach(model, options); };
  return plan;
}

inline MethodEntry lora_entry() {
  MethodEntry e;
  e.name = "lora";
  e.summary = "LoRA: low-rank updates B A of projections (Hu et al., 2021)";
  e.default_lr = 1e-3;
  e.option_keys = {"r",
                   "lora_alpha",
                   "lora_dropout",
                   "use_rslora",
                   "target_modules",
                   "layers_to_transform",
                   "loraplus_lr_ratio",
                   "bias",
                   "fan_in_fan_out",
                   "rank_pattern",
                   "alpha_pattern"};
  e.attach = [](torch::nn::Module& model, const nlohmann::json& json) {
    return peft::attach(model, lora_options_from_json(json, "options", "lora"));
  };
  e.lr_rules = [](double lr, const nlohmann::json& json) {
    std::vector<std::pair<std::string, double>> rules;
    // LoRA+ (Hayou et al., 2024): B learns `loraplus_lr_ratio` times faster than A.
    const double ratio = config_value_or<double>(json, "loraplus_lr_ratio", 0.0, "options", "lora");
    if (ratio > 0) rules.emplace_back("lora_B", lr * ratio);
    return rules;
  };
  e.format = AdapterFormat{"LORA", true, save_lora, load_lora};
  return e;
}

inline const bool lora_registered = register_method(lora_entry());

}  // namespace detail

/// LoRA on a stock Linear, Embedding (directly), MultiheadAttention, TransformerEncoderLayer or
/// TransformerEncoder (at the options' targets).
template <class Stock>
using LoRA = Tuned<Stock, LoRAOptions>;

PEFT_NAMESPACE_END
