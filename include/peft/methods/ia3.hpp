#pragma once

// IA3 (Liu et al., 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
// In-Context Learning"): learned vectors that rescale activations. At an ordinary projection the
// output is scaled, y' = (W x + b) * l with l [out]; at a feed-forward projection the input is,
// y' = W (x * l) + b with l [in]. Every l starts at one, so a new adapter changes nothing.
// Hugging Face PEFT's defaults for BERT scale key and value outputs and the inputs of the two
// output projections (attention.output.dense and output.dense: our out_proj and linear2).

#include <torch/arg.h>
#include <torch/nn/functional/linear.h>
#include <torch/types.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <string>
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
#include <peft/nn/tuned.hpp>

PEFT_NAMESPACE_BEGIN

class IA3Impl;

/// Options of IA3. Default targets: key, value, out_proj and linear2, the last two scaling their
/// input (Hugging Face PEFT's BERT defaults).
struct IA3Options : TargetOptions<IA3Options> {
  IA3Options() : TargetOptions({"key", "value", "out_proj", "linear2"}) {}
  /// Roles of the targets whose input is scaled (the others' output is).
  TORCH_ARG(std::vector<std::string>, feedforward) = std::vector<std::string>{"out_proj",
                                                                              "linear2"};

 public:
  using Impl = IA3Impl;
  static constexpr const char* method = "ia3";
  /// The kinds of site the method can sit at.
  static constexpr unsigned kinds = site_kinds(SiteKind::Linear);
  static bool fits(const SiteImpl& site) { return site.kind() == SiteKind::Linear; }
  void validate() const {}
  /// Whether a site with this role has its input scaled: `feedforward` names the role or one of
  /// the names a target list may use for it (Hugging Face's "output.dense", "down_proj", ...).
  bool is_feedforward(const std::string& role) const {
    for (const auto& name : detail::site_aliases(role)) {
      if (std::find(feedforward_.begin(), feedforward_.end(), name) != feedforward_.end()) {
        return true;
      }
    }
    return false;
  }
};

/// The scaling vector at one projection: `ia3_l`, [out, 1] on the output or [1, in] on the input
/// (Hugging Face's name and shapes).
class IA3Impl : public MethodImpl {
 public:
  IA3Impl(const SiteImpl& site, const IA3Options& options)
      : MethodImpl(IA3Options::method, options.adapter_name()),
        feedforward_(options.is_feedforward(site.role())),
        site_(&site) {
    ia3_l = register_parameter("ia3_l", feedforward_ ? torch::ones({1, site.in_features()})
                                                     : torch::ones({site.out_features(), 1}));
  }

  torch::Tensor apply(const torch::Tensor& input, const torch::Tensor& output) override {
    if (!feedforward_) return output * ia3_l.flatten().to(output.scalar_type());
    const auto& w = site_->frozen_weight();
    const auto l = ia3_l.flatten().to(input.scalar_type());
    // Alone at the site (no active, unmerged method before this one), the site's output is the
    // frozen W x + b, so W (x * l) + b is computed as Hugging Face computes it. Adding W (x * (l -
    // 1)) to the output instead is the same in exact arithmetic but cancels when l is far from 1
    // (3e-2 on SmolLM2's logits with l near 0, against 0 this way); it serves only after another
    // method changed the output.
    bool first = true;
    for (const auto& m : site_->methods()) {
      if (m.get() == this) break;
      if (m->active() && !m->merged()) first = false;
    }
    if (first) return torch::nn::functional::linear(input * l, w, site_->frozen_bias());
    return output + torch::nn::functional::linear(input * (l - 1), w);
  }

  bool can_merge() const override { return true; }

  /// The change merge() adds to the frozen weight: W * l - W (rows scaled on the output, columns
  /// on the input). Remembered at merge so unmerge() subtracts exactly what was added.
  torch::Tensor delta_weight() override {
    if (merged()) return merged_weight_;
    const auto& w = site_->frozen_weight();
    merged_weight_ = (w * (ia3_l.to(w.scalar_type()) - 1)).detach();
    return merged_weight_;
  }

  /// On the output, the bias is scaled too.
  torch::Tensor delta_bias() override {
    if (merged()) return merged_bias_;
    const auto& b = site_->frozen_bias();
    if (feedforward_ || !b.defined()) return {};
    merged_bias_ = (b * (ia3_l.flatten().to(b.scalar_type()) - 1)).detach();
    return merged_bias_;
  }

  bool feedforward() const { return feedforward_; }

  torch::Tensor ia3_l;

 private:
  bool feedforward_;
  const SiteImpl* site_;
  torch::Tensor merged_weight_, merged_bias_;
};

// ------------------------------------------------------------------------- options and format

namespace detail {

inline IA3Options ia3_options_from_json(const nlohmann::json& config, const std::string& file,
                                        const char* where) {
  check(!config_value_or<bool>(config, "fan_in_fan_out", false, file, where), where,
        "{}: fan_in_fan_out is not supported", file);
  IA3Options options;
  targets_from_json(config, options, file, where);
  if (auto feedforward = module_list_from_json(config, "feedforward_modules", file, where)) {
    options.feedforward(std::move(*feedforward));
  }
  return options;
}

/// PEFT's IA3 layout: `base_model.model.<hub module path>.ia3_l`; the feed-forward modules listed
/// in the config.
inline void save_ia3(SaveContext& c) {
  c.save_prefix = "base_model.model.";
  const auto targets = save_site_parameters(c);
  std::vector<std::string> feedforward;
  for (size_t i = 0; i < c.methods.size(); ++i) {
    if (std::dynamic_pointer_cast<IA3Impl>(c.methods[i].second)->feedforward()) {
      feedforward.push_back(targets[i]);
    }
  }
  c.config["target_modules"] = targets;
  c.config["feedforward_modules"] = feedforward;
  c.config["fan_in_fan_out"] = false;
  c.config["init_ia3_weights"] = true;
}

inline LoadPlan load_ia3(const LoadContext& c) {
  const auto& cfg = c.config_file;
  check(!config_value_or<bool>(c.config, "fan_in_fan_out", false, cfg), "load_adapter",
        "{}: fan_in_fan_out is not supported", cfg);
  // Hugging Face: a module is feed-forward when its path ends with an entry of the list.
  const auto ff_names =
      config_value_or<std::vector<std::string>>(c.config, "feedforward_modules", {}, cfg);
  LoadPlan plan;
  plan.save_prefix = "base_model.model.";
  std::map<std::string, std::string> ours;  // hub module path -> our site path
  auto sites = sites_by_path(c.model);
  for (auto& [path, site] : sites) {
    if (IA3Options::fits(*site)) ours[c.hub_path(path)] = path;
  }
  const std::string suffix = ".ia3_l";
  std::vector<std::string> targets;
  std::map<std::string, bool> roles;  // role -> feed-forward
  for (const auto& key : c.keys) {
    if (key.compare(0, plan.save_prefix.size(), plan.save_prefix) != 0 ||
        key.size() <= plan.save_prefix.size() + suffix.size() ||
        key.compare(key.size() - suffix.size(), suffix.size(), suffix) != 0) {
      continue;
    }
    const std::string module =
        key.substr(plan.save_prefix.size(), key.size() - plan.save_prefix.size() - suffix.size());
    auto it = ours.find(module);
    check(it != ours.end(), "load_adapter",
          "{}: key \"{}\" names module \"{}\", which is no projection of this model",
          c.weights_file, key, module);
    const bool ff = std::any_of(ff_names.begin(), ff_names.end(), [&](const std::string& f) {
      return module.size() >= f.size() &&
             module.compare(module.size() - f.size(), f.size(), f) == 0;
    });
    auto site = sites[it->second];
    auto [role, inserted] = roles.emplace(site->role(), ff);
    check(inserted || role->second == ff, "load_adapter",
          "{}: \"{}\" is {}feed-forward but other {} projections are {}; peft decides it per "
          "projection role",
          cfg, module, ff ? "" : "not ", site->role(), ff ? "not" : "");
    targets.push_back(it->second);
    const std::string path = it->second;
    plan.slots.push_back({key,
                          ff ? std::vector<int64_t>{1, site->in_features()}
                             : std::vector<int64_t>{site->out_features(), 1},
                          [c, path] { return c.method_at<IA3Impl>(path, "ia3")->ia3_l; }});
  }
  check(!targets.empty(), "load_adapter", "{}: no IA3 weights (keys ending in .ia3_l)",
        c.weights_file);
  IA3Options options;
  std::vector<std::string> feedforward;
  for (auto& [role, ff] : roles) {
    if (ff) feedforward.push_back(role);
  }
  options.targets(targets).feedforward(feedforward);
  options.adapter_name(c.adapter);
  auto& model = c.model;
  plan.apply = [&model, options] { attach(model, options); };
  return plan;
}

inline MethodEntry ia3_entry() {
  MethodEntry e;
  e.name = "ia3";
  e.summary = "IA3: learned vectors rescaling projections (Liu et al., 2022)";
  e.default_lr = 3e-3;
  e.option_keys = {"target_modules", "feedforward_modules", "layers_to_transform",
                   "fan_in_fan_out"};
  e.attach = [](torch::nn::Module& model, const nlohmann::json& json) {
    return peft::attach(model, ia3_options_from_json(json, "options", "ia3"));
  };
  e.format = AdapterFormat{"IA3", true, save_ia3, load_ia3};
  return e;
}

inline const bool ia3_registered = register_method(ia3_entry());

}  // namespace detail

/// IA3 on a stock Linear, MultiheadAttention, TransformerEncoderLayer or TransformerEncoder.
template <class Stock>
using IA3 = Tuned<Stock, IA3Options>;

PEFT_NAMESPACE_END
