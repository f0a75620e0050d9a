#pragma once

// Which sites of a model a method attaches to: Hugging Face-like target names matched against
// module paths, an optional regular expression, and an optional set of layer indices.

#include <torch/nn/module.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <regex>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <peft/config.hpp>
#include <peft/core/error.hpp>
#include <peft/core/site.hpp>

PEFT_NAMESPACE_BEGIN

/// Target selection shared by every method's options (CRTP so setters chain on the derived type).
template <class Derived>
class TargetOptions {
 public:
  /// Names matched against module paths: a target matches a site when it equals the site's path,
  /// is a dotted suffix of it ("self_attn.query", "query"), or is one of the site's aliases
  /// (Hugging Face names such as "intermediate.dense", or "dense" for every dense projection).
  Derived& targets(std::vector<std::string> names) {
    targets_ = std::move(names);
    return self();
  }
  const std::vector<std::string>& targets() const { return targets_; }

  /// A regular expression that must match a site's whole path (replaces targets()).
  Derived& target_regex(std::string pattern) {
    target_regex_ = std::move(pattern);
    return self();
  }
  const std::string& target_regex() const { return target_regex_; }

  /// Only sites in these layers (the index after a `layers` or `layer` path component).
  Derived& layers(std::vector<int64_t> indices) {
    layers_ = std::move(indices);
    return self();
  }
  const std::vector<int64_t>& layers() const { return layers_; }

  /// The adapter name the attached methods belong to.
  Derived& adapter_name(std::string name) {
    adapter_name_ = std::move(name);
    return self();
  }
  const std::string& adapter_name() const { return adapter_name_; }

 protected:
  explicit TargetOptions(std::vector<std::string> default_targets)
      : targets_(std::move(default_targets)) {}

 private:
  Derived& self() { return static_cast<Derived&>(*this); }
  std::vector<std::string> targets_;
  std::string target_regex_;
  std::vector<int64_t> layers_;
  std::string adapter_name_ = "default";
};

/// A site of a model with its dotted path.
struct SiteRef {
  std::string path;
  std::shared_ptr<SiteImpl> site;
};

/// Every site in `model` (the model itself included), in registration order.
inline std::vector<SiteRef> find_sites(torch::nn::Module& model) {
  std::vector<SiteRef> out;
  for (const auto& item : model.named_modules("", /*include_self=*/true)) {
    if (auto site = std::dynamic_pointer_cast<SiteImpl>(item.value())) {
      out.push_back({item.key(), site});
    }
  }
  return out;
}

namespace detail {

/// Other names a site answers to, so Hugging Face target lists work unchanged.
inline std::vector<std::string> site_aliases(const std::string& role) {
  if (role == "query") return {"query", "q_proj", "q"};
  if (role == "key") return {"key", "k_proj", "k"};
  if (role == "value") return {"value", "v_proj", "v"};
  if (role == "out_proj") return {"out_proj", "attention.output.dense", "o_proj", "dense"};
  if (role == "linear1") return {"linear1", "intermediate.dense", "fc1", "dense", "up_proj"};
  if (role == "linear2") return {"linear2", "output.dense", "fc2", "dense", "down_proj"};
  return {role};
}

inline bool ends_with_component(const std::string& path, const std::string& target) {
  if (path == target) return true;
  return path.size() > target.size() &&
         path.compare(path.size() - target.size(), target.size(), target) == 0 &&
         path[path.size() - target.size() - 1] == '.';
}

/// The layer index in a path ("layers.3.self_attn.query" -> 3), or -1.
inline int64_t layer_index(const std::string& path) {
  size_t start = 0;
  std::string previous;
  while (start <= path.size()) {
    size_t dot = path.find('.', start);
    std::string part =
        path.substr(start, dot == std::string::npos ? std::string::npos : dot - start);
    if ((previous == "layers" || previous == "layer") && !part.empty() &&
        std::all_of(part.begin(), part.end(), [](char c) { return c >= '0' && c <= '9'; })) {
      return std::stoll(part);
    }
    previous = part;
    if (dot == std::string::npos) break;
    start = dot + 1;
  }
  return -1;
}

}  // namespace detail

/// The sites of `model` that `options` selects among those `fits` accepts. Throws when a target
/// (or the regex) matches nothing, listing the names that would have matched something.
template <class Options, class Fits>
std::vector<SiteRef> select_sites(torch::nn::Module& model, const Options& options,
                                  const std::string& method, Fits fits) {
  std::vector<SiteRef> candidates;
  for (auto& ref : find_sites(model)) {
    if (!fits(*ref.site)) continue;
    const int64_t layer = detail::layer_index(ref.path);
    if (!options.layers().empty() && layer >= 0 &&
        std::find(options.layers().begin(), options.layers().end(), layer) ==
            options.layers().end()) {
      continue;
    }
    candidates.push_back(ref);
  }
  auto candidate_names = [&] {
    std::set<std::string> names;
    for (const auto& ref : candidates) names.insert(ref.site->role());
    return names.empty() ? std::string("(none: the model has no site this method fits)")
                         : fmt::format("{}", fmt::join(names, ", "));
  };

  std::vector<SiteRef> out;
  if (!options.target_regex().empty()) {
    std::regex pattern;
    try {
      pattern = std::regex(options.target_regex());
    } catch (const std::regex_error& e) {
      fail(method, "target_regex \"{}\" is not a valid regular expression: {}",
           options.target_regex(), e.what());
    }
    for (const auto& ref : candidates) {
      if (std::regex_match(ref.path, pattern)) out.push_back(ref);
    }
    if (out.empty()) {
      fail(method, "target_regex \"{}\" matched no module; candidates: {}", options.target_regex(),
           candidate_names());
    }
    return out;
  }

  std::vector<bool> taken(candidates.size(), false);
  for (const auto& target : options.targets()) {
    bool matched = false;
    for (size_t i = 0; i < candidates.size(); ++i) {
      const auto& ref = candidates[i];
      bool hit = detail::ends_with_component(ref.path, target);
      for (const auto& alias : detail::site_aliases(ref.site->role())) hit = hit || alias == target;
      if (!hit) continue;
      matched = true;
      taken[i] = true;
    }
    if (!matched) {
      fail(method, "target \"{}\" matched no module; candidates: {}", target, candidate_names());
    }
  }
  for (size_t i = 0; i < candidates.size(); ++i) {
    if (taken[i]) out.push_back(candidates[i]);
  }
  return out;
}

PEFT_NAMESPACE_END
