#pragma once

// Composing bottleneck adapters.
//
// AdapterDrop (Rücklé et al., 2021): no adapters in the first k layers, in training and inference,
// so a forward pass (and, with the backbone frozen, the backward pass) skips them. Attach with
// `.layers(peft::layers_from(k, L))`, or drop already-attached adapters with
// peft::drop_adapters(model, k).
//
// AdapterFusion (Pfeiffer et al., 2021): several trained, frozen adapters at each Block site are
// combined by attention. With h the sub-layer's output and o_j the output of adapter j (h plus its
// change), the fusion computes q = Q h, k_j = K o_j, v_j = V o_j and returns
// sum_j softmax_j(q . k_j / T) v_j. V starts as the identity (bias 0), so at initialisation the
// fusion returns a convex combination of the adapters' outputs (exactly the output of a single
// fused adapter); only Q, K and V train.

#include <torch/arg.h>
#include <torch/nn/modules/linear.h>
#include <torch/types.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <peft/config.hpp>
#include <peft/core/attach.hpp>
#include <peft/core/error.hpp>
#include <peft/core/parameters.hpp>
#include <peft/core/site.hpp>
#include <peft/core/targets.hpp>
#include <peft/core/registry.hpp>
#include <peft/detail/json.hpp>

PEFT_NAMESPACE_BEGIN

// ------------------------------------------------------------------------------- AdapterDrop

/// The layer indices k, k+1, ..., num_layers-1: pass to `.layers()` of any options to leave the
/// first k layers without the method (AdapterDrop at attach time).
inline std::vector<int64_t> layers_from(int64_t k, int64_t num_layers) {
  check(k >= 0 && k <= num_layers, "adapter_drop", "k must be in [0, {}], got {}", num_layers, k);
  std::vector<int64_t> out;
  for (int64_t i = k; i < num_layers; ++i) out.push_back(i);
  return out;
}

/// AdapterDrop on a model that already has adapters: every method at a Block site of layers < k
/// (of `adapter` only, when given) is removed from its site (SiteImpl::remove), so those layers
/// run, train and save as if they never had one. Returns the paths of the affected sites. Throws,
/// leaving the model unchanged, on a merged method there (unmerge first) and on a method sharing
/// its weights across layers (ProPETL's prototype) (attach it with `.layers(layers_from(k, L))`
/// instead).
inline std::vector<std::string> drop_adapters(torch::nn::Module& model, int64_t k,
                                              const std::string& adapter = "") {
  check(k >= 0, "adapter_drop", "k must not be negative, got {}", k);
  std::vector<std::pair<SiteImpl*, std::shared_ptr<MethodImpl>>> doomed;
  std::vector<std::string> paths;
  for (auto& ref : find_sites(model)) {
    if (ref.site->kind() != SiteKind::Block) continue;
    const int64_t layer = detail::layer_index(ref.path);
    if (layer < 0 || layer >= k) continue;
    bool touched = false;
    for (const auto& m : ref.site->methods()) {
      if (!adapter.empty() && m->adapter() != adapter) continue;
      check(!m->merged(), "adapter_drop", "adapter \"{}\" is merged at \"{}\"; unmerge first",
            m->adapter(), ref.path);
      check(!m->shared_across_sites(), "adapter_drop",
            "adapter \"{}\" at \"{}\" is a {}, which shares its weights with the adapter's other "
            "layers; attach it with .layers(peft::layers_from(k, L)) instead",
            m->adapter(), ref.path, m->method());
      doomed.emplace_back(ref.site.get(), m);
      touched = true;
    }
    if (touched) paths.push_back(ref.path);
  }
  for (auto& [site, m] : doomed) site->remove(m->method(), m->adapter());
  return paths;
}

// ----------------------------------------------------------------------------- AdapterFusion

/// Options of AdapterFusion.
struct FusionOptions {
  /// The name the fusion layers are attached under.
  TORCH_ARG(std::string, adapter_name) = "fusion";
  /// Softmax temperature T.
  TORCH_ARG(double, temperature) = 1.0;
  /// Standard deviation of the initial query and key weights.
  TORCH_ARG(double, init_std) = 0.02;

 public:
  static constexpr const char* method = "fusion";
  void validate() const {
    check(!adapter_name_.empty(), method, "adapter_name must not be empty");
    check(temperature_ > 0, method, "temperature must be positive, got {}", temperature_);
    check(init_std_ >= 0, method, "init_std must not be negative, got {}", init_std_);
  }
};

/// Fusion at one Block site: `query`, `key` and `value` Linear(d, d) over the outputs of the fused
/// methods, which stay registered (and frozen) under their own names.
class FusionImpl : public MethodImpl {
 public:
  FusionImpl(const SiteImpl& site, const FusionOptions& options,
             std::vector<std::shared_ptr<MethodImpl>> fused)
      : MethodImpl("fusion", options.adapter_name()), options_(options), fused_(std::move(fused)) {
    options.validate();
    const int64_t d = site.out_features();
    query = register_module("query", torch::nn::Linear(d, d));
    key = register_module("key", torch::nn::Linear(d, d));
    value = register_module("value", torch::nn::Linear(d, d));
    torch::NoGradGuard no_grad;
    for (auto* l : {&query, &key}) {
      (*l)->weight.normal_(0.0, options.init_std());
      (*l)->bias.zero_();
    }
    value->weight.copy_(torch::eye(d));
    value->bias.zero_();
  }

  /// The attention weights over the fused methods for a site's (input, output): [..., A].
  torch::Tensor weights(const torch::Tensor& output, const torch::Tensor& outs) {
    auto q = query->forward(output).unsqueeze(-2);  // [..., 1, d]
    auto k = key->forward(outs);                    // [..., A, d]
    return torch::softmax((q * k).sum(-1) / options_.temperature(), -1);
  }

  /// The fused methods' outputs stacked on a new second-to-last axis: [..., A, d].
  torch::Tensor fused_outputs(const torch::Tensor& input, const torch::Tensor& output) {
    std::vector<torch::Tensor> outs;
    for (const auto& m : fused_) outs.push_back(m->apply(input, output));
    return torch::stack(outs, -2);
  }

  torch::Tensor apply(const torch::Tensor& input, const torch::Tensor& output) override {
    auto outs = fused_outputs(input, output);
    auto w = weights(output, outs);
    return (w.unsqueeze(-1) * value->forward(outs)).sum(-2);
  }

  /// The fused methods, in the order of fuse()'s names.
  const std::vector<std::shared_ptr<MethodImpl>>& fused() const { return fused_; }
  const FusionOptions& options() const { return options_; }

  torch::nn::Linear query{nullptr}, key{nullptr}, value{nullptr};

 private:
  FusionOptions options_;
  std::vector<std::shared_ptr<MethodImpl>> fused_;
};

/// AdapterFusion: at every Block site that holds the named adapters, attaches a fusion layer over
/// them; the fused adapters are frozen and stop running on their own (the fusion runs them). Every
/// name must be attached, and at each site either all or none of them. Returns the sites' paths;
/// throws, leaving the model unchanged, on bad input.
inline std::vector<std::string> fuse(torch::nn::Module& model,
                                     const std::vector<std::string>& names,
                                     const FusionOptions& options = FusionOptions()) {
  options.validate();
  check(!names.empty(), FusionOptions::method, "no adapters to fuse");
  auto known = adapter_names(model);
  for (const auto& name : names) {
    check(std::count(names.begin(), names.end(), name) == 1, FusionOptions::method,
          "adapter \"{}\" is named twice", name);
    check(std::find(known.begin(), known.end(), name) != known.end(), FusionOptions::method,
          "no adapter named \"{}\"; attached: {}", name,
          known.empty() ? std::string("(none)") : fmt::format("{}", fmt::join(known, ", ")));
    check(name != options.adapter_name(), FusionOptions::method,
          "the fusion's adapter_name \"{}\" is also a fused adapter", name);
  }
  std::vector<std::pair<SiteRef, std::vector<std::shared_ptr<MethodImpl>>>> plan;
  for (auto& ref : find_sites(model)) {
    if (ref.site->kind() != SiteKind::Block) continue;
    std::vector<std::shared_ptr<MethodImpl>> found;
    std::vector<std::string> missing;
    for (const auto& name : names) {
      std::shared_ptr<MethodImpl> hit;
      for (const auto& m : ref.site->methods()) {
        if (m->adapter() == name) {
          check(!hit, FusionOptions::method, "adapter \"{}\" has two methods at \"{}\"", name,
                ref.path);
          hit = m;
        }
        check(m->adapter() != options.adapter_name(), FusionOptions::method,
              "adapter \"{}\" is already attached at \"{}\"", options.adapter_name(), ref.path);
      }
      if (hit) {
        check(!hit->merged(), FusionOptions::method,
              "adapter \"{}\" is merged at \"{}\"; unmerge first", name, ref.path);
        found.push_back(hit);
      } else {
        missing.push_back(name);
      }
    }
    if (found.empty()) continue;
    check(missing.empty(), FusionOptions::method, "\"{}\" has adapter(s) {} but not {}", ref.path,
          fmt::format("{}", fmt::join(names, ", ")), fmt::format("{}", fmt::join(missing, ", ")));
    plan.emplace_back(ref, std::move(found));
  }
  check(!plan.empty(), FusionOptions::method, "no block site holds the adapters {}",
        fmt::format("{}", fmt::join(names, ", ")));

  std::vector<std::shared_ptr<FusionImpl>> made;
  for (auto& [ref, found] : plan) {
    auto fusion = std::make_shared<FusionImpl>(*ref.site, options, found);
    detail::place_like(*fusion, *ref.site, model);
    fusion->train(model.is_training());
    made.push_back(std::move(fusion));
  }
  std::vector<std::string> paths;
  for (size_t i = 0; i < plan.size(); ++i) {
    for (const auto& m : plan[i].second) {
      set_method_state(*m, false, false);
      freeze(*m);
    }
    plan[i].first.site->add(made[i]);
    paths.push_back(plan[i].first.path);
  }
  return paths;
}

// ------------------------------------------------------------------------- options and format

namespace detail {

/// AdapterFusion: each site's `query`, `key` and `value` layers; the fused adapters are named in
/// the config and saved in their own folders.
inline void save_fusion(const SiteMethods& methods, nlohmann::json& config, NamedTensors& tensors) {
  auto first = std::dynamic_pointer_cast<FusionImpl>(methods.front().second);
  std::vector<std::string> names;
  for (const auto& m : first->fused()) names.push_back(m->adapter());
  std::vector<std::string> targets;
  for (const auto& [path, m] : methods) {
    auto f = std::dynamic_pointer_cast<FusionImpl>(m);
    std::vector<std::string> here;
    for (const auto& fused : f->fused()) here.push_back(fused->adapter());
    check(here == names && f->options().temperature() == first->options().temperature(),
          "save_adapter", "the fusion at \"{}\" fuses {} unlike the one at \"{}\" ({})", path,
          fmt::format("{}", fmt::join(here, ", ")), methods.front().first,
          fmt::format("{}", fmt::join(names, ", ")));
    targets.push_back(path);
    for (const auto& item : f->named_parameters()) {
      tensors.emplace_back(path + "." + item.key(), item.value());
    }
  }
  config["fused_adapters"] = names;
  config["temperature"] = first->options().temperature();
  config["target_modules"] = targets;
}

inline LoadPlan plan_fusion(torch::nn::Module& model, const nlohmann::json& config,
                            const std::string& cfg_name, const std::string& adapter_name) {
  const auto names = config_value<std::vector<std::string>>(config, "fused_adapters", cfg_name);
  check(!names.empty(), "load_adapter", "{}: fused_adapters is empty", cfg_name);
  const auto targets = config_value<std::vector<std::string>>(config, "target_modules", cfg_name);
  auto options = FusionOptions()
                     .adapter_name(adapter_name)
                     .temperature(config_value<double>(config, "temperature", cfg_name));
  detail::validate_from_file(options, cfg_name);
  const auto known = adapter_names(model);
  for (const auto& name : names) {
    check(std::find(known.begin(), known.end(), name) != known.end(), "load_adapter",
          "{}: the fusion combines adapter \"{}\", which is not attached; load each fused adapter "
          "from its own folder first (attached: {})",
          cfg_name, name,
          known.empty() ? std::string("(none)") : fmt::format("{}", fmt::join(known, ", ")));
  }
  // fuse() fuses every block site holding the adapters: those must be the file's sites.
  std::set<std::string> holding;
  std::map<std::string, int64_t> widths;
  for (auto& ref : find_sites(model)) {
    if (ref.site->kind() != SiteKind::Block) continue;
    widths[ref.path] = ref.site->out_features();
    for (const auto& m : ref.site->methods()) {
      if (std::find(names.begin(), names.end(), m->adapter()) != names.end()) {
        holding.insert(ref.path);
      }
    }
  }
  const std::set<std::string> wanted(targets.begin(), targets.end());
  check(holding == wanted, "load_adapter",
        "{}: the fusion sits at {}, but the adapters {} sit at {} in this model", cfg_name,
        fmt::format("{}", fmt::join(wanted, ", ")), fmt::format("{}", fmt::join(names, ", ")),
        fmt::format("{}", fmt::join(holding, ", ")));
  LoadPlan plan;
  for (const auto& path : targets) {
    const int64_t d = widths[path];
    for (const char* layer : {"query", "key", "value"}) {
      for (const char* part : {"weight", "bias"}) {
        const std::string key = std::string(layer) + "." + part;
        std::vector<int64_t> shape = {d, d};
        if (std::string(part) == "bias") shape = {d};
        plan.slots.push_back(
            {path + "." + key, shape, [&model, path, adapter_name, key] {
               return parameter(*method_of<FusionImpl>(model, path, "fusion", adapter_name), key);
             }});
      }
    }
  }
  plan.apply = [&model, names, options] { fuse(model, names, options); };
  return plan;
}

inline MethodEntry fusion_entry() {
  MethodEntry e;
  e.name = "fusion";
  e.summary = "AdapterFusion: attention over trained adapters (Pfeiffer et al., 2021)";
  e.default_lr = 1e-3;
  e.option_keys = {"fused_adapters", "temperature"};
  e.attach = [](torch::nn::Module& model, const nlohmann::json& json) {
    return fuse(model,
                config_value<std::vector<std::string>>(json, "fused_adapters", "options", "fusion"),
                FusionOptions().temperature(
                    config_value_or<double>(json, "temperature", 1.0, "options", "fusion")));
  };
  e.format = AdapterFormat{"ADAPTER_FUSION", true,
                           [](SaveContext& c) { save_fusion(c.methods, c.config, c.tensors); },
                           [](const LoadContext& c) {
                             return plan_fusion(c.model, c.config, c.config_file, c.adapter);
                           }};
  return e;
}

inline const bool fusion_registered = register_method(fusion_entry());

}  // namespace detail

PEFT_NAMESPACE_END
