#pragma once

// Attaching methods to a model, and the model-level controls: which adapters run, merging into
// the frozen weights, folding reparameterisations.

#include <torch/types.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <type_traits>
#include <unordered_set>
#include <utility>
#include <vector>

#include <peft/config.hpp>
#include <peft/core/error.hpp>
#include <peft/core/site.hpp>
#include <peft/core/targets.hpp>

PEFT_NAMESPACE_BEGIN

namespace detail {

inline void place_like(torch::nn::Module& method, const SiteImpl& site, torch::nn::Module& model) {
  torch::Tensor reference = site.frozen_weight();
  if (!reference.defined()) {
    auto params = model.parameters();
    if (!params.empty()) reference = params.front();
  }
  if (reference.defined() && reference.is_floating_point()) {
    method.to(reference.device(), reference.scalar_type());
  } else if (reference.defined()) {
    method.to(reference.device());
  }
}

// Hooks an options type may define (detected, not required):
//   using Impl = ...;                        the MethodImpl it creates (required)
//   Options prepared() const;                the options actually attached (e.g. with shared state
//                                            bound, so one attach() call shares it)
//   bool selects(const SiteImpl&) const;     which sites it takes (default: static fits())
//   void after_attach(torch::nn::Module&) const;   runs once the methods are in place
template <class O, class = void>
struct has_prepared : std::false_type {};
template <class O>
struct has_prepared<O, std::void_t<decltype(std::declval<const O&>().prepared())>>
    : std::true_type {};
template <class O, class = void>
struct has_selects : std::false_type {};
template <class O>
struct has_selects<
    O, std::void_t<decltype(std::declval<const O&>().selects(std::declval<const SiteImpl&>()))>>
    : std::true_type {};
template <class O, class = void>
struct has_after_attach : std::false_type {};
template <class O>
struct has_after_attach<O, std::void_t<decltype(std::declval<const O&>().after_attach(
                               std::declval<torch::nn::Module&>()))>> : std::true_type {};

template <class Options>
std::vector<std::string> attach_to(torch::nn::Module& model, const std::vector<SiteRef>& sites,
                                   const Options& options) {
  using Method = typename Options::Impl;
  // Build every method before touching the model, so a failure leaves it as it was.
  std::vector<std::shared_ptr<Method>> made;
  for (const auto& ref : sites) {
    for (const auto& existing : ref.site->methods()) {
      if (existing->method() == Options::method && existing->adapter() == options.adapter_name()) {
        fail(Options::method, "adapter \"{}\" is already attached at \"{}\"",
             options.adapter_name(), ref.path);
      }
    }
    auto method = std::make_shared<Method>(*ref.site, options);
    place_like(*method, *ref.site, model);
    method->train(model.is_training());
    made.push_back(std::move(method));
  }
  std::vector<std::string> paths;
  for (size_t i = 0; i < sites.size(); ++i) {
    sites[i].site->add(made[i]);
    paths.push_back(sites[i].path);
  }
  if constexpr (has_after_attach<Options>::value) options.after_attach(model);
  return paths;
}

}  // namespace detail

/// Attaches one method to every site of `model` its options select, and returns those sites'
/// paths. The frozen model stays frozen; the new parameters train. Throws (leaving the model
/// unchanged) on bad options, a target that matches nothing, or an adapter name already used.
///
///     peft::attach(*encoder, peft::LoRAOptions(8).alpha(16).targets({"query", "value"}));
template <class Options,
          std::enable_if_t<!std::is_convertible_v<const Options&, std::string>, int> = 0>
std::vector<std::string> attach(torch::nn::Module& model, const Options& options) {
  options.validate();
  Options bound = options;
  if constexpr (detail::has_prepared<Options>::value) bound = options.prepared();
  auto sites = select_sites(model, bound, Options::method, [&bound](const SiteImpl& site) {
    if constexpr (detail::has_selects<Options>::value) {
      return bound.selects(site);
    } else {
      return Options::fits(site);
    }
  });
  return detail::attach_to(model, sites, bound);
}

/// Attaches one method to one site directly (no target matching).
template <class Options>
void attach_site(SiteImpl& site, const Options& options) {
  options.validate();
  Options bound = options;
  if constexpr (detail::has_prepared<Options>::value) bound = options.prepared();
  bool fits = false;
  if constexpr (detail::has_selects<Options>::value) {
    fits = bound.selects(site);
  } else {
    fits = Options::fits(site);
  }
  check(fits, Options::method, "does not fit a {} site (\"{}\")", to_string(site.kind()),
        site.role());
  std::shared_ptr<SiteImpl> handle(std::shared_ptr<SiteImpl>{}, &site);
  detail::attach_to(site, {SiteRef{"", handle}}, bound);
}

/// Every method attached anywhere in `model`, with the path of its site.
inline std::vector<std::pair<std::string, std::shared_ptr<MethodImpl>>> attached_methods(
    torch::nn::Module& model) {
  std::vector<std::pair<std::string, std::shared_ptr<MethodImpl>>> out;
  for (auto& ref : find_sites(model)) {
    for (const auto& m : ref.site->methods()) out.emplace_back(ref.path, m);
  }
  return out;
}

/// The adapter names attached to `model`, in first-attached order.
inline std::vector<std::string> adapter_names(torch::nn::Module& model) {
  std::vector<std::string> names;
  for (auto& [path, m] : attached_methods(model)) {
    if (std::find(names.begin(), names.end(), m->adapter()) == names.end()) {
      names.push_back(m->adapter());
    }
  }
  return names;
}

/// Makes exactly the named adapters run. Throws on a name that is not attached.
inline void set_adapter(torch::nn::Module& model, const std::vector<std::string>& names) {
  auto known = adapter_names(model);
  for (const auto& name : names) {
    if (std::find(known.begin(), known.end(), name) == known.end()) {
      fail("set_adapter", "no adapter named \"{}\"; attached: {}", name,
           known.empty() ? std::string("(none)") : fmt::format("{}", fmt::join(known, ", ")));
    }
  }
  for (auto& [path, m] : attached_methods(model)) {
    const bool on = std::find(names.begin(), names.end(), m->adapter()) != names.end();
    check(on || !m->merged(), "set_adapter", "adapter \"{}\" is merged at \"{}\"; unmerge first",
          m->adapter(), path);
    set_method_state(*m, on, m->merged());
  }
}

/// Removes adapter `name` from `model`: every method of it leaves its site, with its parameters
/// (so they are no longer trained, counted or saved). Returns the paths of the sites it left.
/// Throws, leaving the model unchanged, on a name that is not attached or an adapter that is
/// merged anywhere (unmerge first). LayerNorms that BitFit's layer_norm(true) unfroze stay
/// trainable; an optimizer built before still holds the removed tensors.
inline std::vector<std::string> delete_adapter(torch::nn::Module& model, const std::string& name) {
  auto known = adapter_names(model);
  check(std::find(known.begin(), known.end(), name) != known.end(), "delete_adapter",
        "no adapter named \"{}\"; attached: {}", name,
        known.empty() ? std::string("(none)") : fmt::format("{}", fmt::join(known, ", ")));
  for (auto& [path, m] : attached_methods(model)) {
    check(m->adapter() != name || !m->merged(), "delete_adapter",
          "adapter \"{}\" is merged at \"{}\"; unmerge first", name, path);
  }
  std::vector<std::string> paths;
  for (auto& ref : find_sites(model)) {
    std::vector<std::string> kinds;
    for (const auto& m : ref.site->methods()) {
      if (m->adapter() == name) kinds.push_back(m->method());
    }
    for (const auto& kind : kinds) ref.site->remove(kind, name);
    if (!kinds.empty()) paths.push_back(ref.path);
  }
  return paths;
}

/// Runs the model as if no method were attached (merged methods excepted), until
/// enable_adapters(). Which adapters are active is remembered.
inline void disable_adapters(torch::nn::Module& model) {
  for (auto& ref : find_sites(model)) ref.site->set_enabled(false);
}

/// Undoes disable_adapters().
inline void enable_adapters(torch::nn::Module& model) {
  for (auto& ref : find_sites(model)) ref.site->set_enabled(true);
}

/// Disables the adapters of a model for the guard's lifetime, then gives each site back the
/// state it had (so guards nest: an inner one does not switch on what an outer one switched off).
class AdaptersDisabled {
 public:
  explicit AdaptersDisabled(torch::nn::Module& model) {
    for (auto& ref : find_sites(model)) {
      sites_.emplace_back(ref.site, ref.site->enabled());
      ref.site->set_enabled(false);
    }
  }
  ~AdaptersDisabled() {
    for (auto& [site, enabled] : sites_) site->set_enabled(enabled);
  }
  AdaptersDisabled(const AdaptersDisabled&) = delete;
  AdaptersDisabled& operator=(const AdaptersDisabled&) = delete;

 private:
  std::vector<std::pair<std::shared_ptr<SiteImpl>, bool>> sites_;
};

/// Adds every active, mergeable method into the frozen weights it sits on, so forward runs at the
/// frozen model's speed. Methods that cannot merge (adapters, prefixes, prompts) keep running.
/// Returns how many methods were merged.
inline int64_t merge(torch::nn::Module& model) {
  torch::NoGradGuard no_grad;
  int64_t merged = 0;
  for (auto& ref : find_sites(model)) {
    for (const auto& m : ref.site->methods()) {
      if (!m->active() || m->merged() || !m->can_merge()) continue;
      auto dw = m->delta_weight();
      auto db = m->delta_bias();
      if (dw.defined()) {
        auto& w = ref.site->frozen_weight();
        w.add_(dw.to(w.scalar_type()));
      }
      if (db.defined()) {
        auto& b = ref.site->frozen_bias();
        b.add_(db.to(b.scalar_type()));
      }
      set_method_state(*m, true, true);
      ++merged;
    }
  }
  return merged;
}

/// Subtracts every merged method from the frozen weights again (restoring them up to float
/// rounding) and lets the methods run in forward once more. Returns how many were unmerged.
inline int64_t unmerge(torch::nn::Module& model) {
  torch::NoGradGuard no_grad;
  int64_t unmerged = 0;
  for (auto& ref : find_sites(model)) {
    for (const auto& m : ref.site->methods()) {
      if (!m->merged()) continue;
      auto dw = m->delta_weight();
      auto db = m->delta_bias();
      if (dw.defined()) {
        auto& w = ref.site->frozen_weight();
        w.sub_(dw.to(w.scalar_type()));
      }
      if (db.defined()) {
        auto& b = ref.site->frozen_bias();
        b.sub_(db.to(b.scalar_type()));
      }
      set_method_state(*m, m->active(), false);
      ++unmerged;
    }
  }
  return unmerged;
}

/// Replaces training-time reparameterisations (prefix MLPs) by the parameters they produce.
inline void fold(torch::nn::Module& model) {
  for (auto& [path, m] : attached_methods(model)) m->fold();
}

/// Bytes the attached methods' parameters and buffers take, each tensor once (what an adapter
/// file stores, before metadata: a method's shared frozen matrices are buffers).
inline int64_t adapter_bytes(torch::nn::Module& model) {
  int64_t bytes = 0;
  std::unordered_set<const void*> seen;
  for (auto& [path, m] : attached_methods(model)) {
    for (const auto& list : {m->parameters(), m->buffers()}) {
      for (const auto& p : list) {
        if (!seen.insert(p.unsafeGetTensorImpl()).second) continue;
        bytes += p.numel() * static_cast<int64_t>(p.element_size());
      }
    }
  }
  return bytes;
}

PEFT_NAMESPACE_END
