#pragma once

// The method registry: one entry per method name ("lora", "adapter", ...) holding what the rest of
// the library needs to know about the method without including it: how to attach it from JSON
// options, its default learning rate and learning-rate rules, and its adapter file format (what
// save_adapter() writes and load_adapter() reads). Each method registers itself at the end of
// its own header (methods/<m>.hpp), so including a method is all it takes to make it known:
//
//     peft::attach(*bert, "lora", {{"r", 8}, {"lora_alpha", 16}});
//     for (const auto& name : peft::method_names()) ...
//
// core knows no method: the entries are filled from above.

#include <torch/nn/module.h>
#include <torch/types.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include <peft/config.hpp>
#include <peft/core/attach.hpp>
#include <peft/core/error.hpp>
#include <peft/core/hub.hpp>
#include <peft/core/site.hpp>
#include <peft/detail/json.hpp>
#include <peft/detail/shape.hpp>

PEFT_NAMESPACE_BEGIN

/// Tensors by dotted name, as adapter files hold them.
using NamedTensors = std::vector<std::pair<std::string, torch::Tensor>>;
/// The methods of one adapter, each with the path of its site.
using SiteMethods = std::vector<std::pair<std::string, std::shared_ptr<MethodImpl>>>;

/// One tensor an adapter file must hold: its key, the shape it must have, and where it goes.
struct Slot {
  using Convert = std::function<torch::Tensor(const torch::Tensor&, const std::string&)>;
  Slot(std::string key, std::vector<int64_t> shape, std::function<torch::Tensor()> target,
       c10::ScalarType dtype = c10::ScalarType::Undefined, Convert convert = nullptr)
      : key(std::move(key)),
        shape(std::move(shape)),
        target(std::move(target)),
        dtype(dtype),
        convert(std::move(convert)) {}

  std::string key;
  std::vector<int64_t> shape;
  /// The tensor the stored value is copied into; resolved after the method is attached.
  std::function<torch::Tensor()> target;
  /// The dtype the file must store; Undefined = any floating-point type.
  c10::ScalarType dtype;
  /// Turns the stored tensor (read from the named file) into what is copied to the target, e.g.
  /// unpacks a bit mask; runs before the model changes and may throw.
  Convert convert;
};

/// What load_adapter() does for one file: the tensors it expects, how it attaches the method
/// (run only after every key, shape and setting was checked) and what runs once the tensors
/// are copied. `save_prefix` is the prefix of the modules-to-save keys (PEFT nests the
/// transformers model one level deeper for LoRA-like methods than for prompt methods).
struct LoadPlan {
  std::vector<Slot> slots;
  std::function<void()> apply;
  std::function<void()> finish;
  std::string save_prefix;
};

/// What a format's save function gets: the adapter's methods, and the config and tensors it
/// fills. The frame (save_adapter) adds the modules to save and writes the files.
struct SaveContext {
  torch::nn::Module& model;
  std::string adapter;
  SiteMethods methods;
  nlohmann::json& config;
  NamedTensors& tensors;
  /// Set by the format: the prefix of the modules-to-save keys (see LoadPlan::save_prefix).
  std::string save_prefix;
  /// A site path of `model` as the hub names it (the model's HubModel; unchanged without one).
  std::function<std::string(const std::string&)> hub_path;
  /// From the model's HubModel, else the first attention found; 0 without attention.
  int64_t attention_heads = 0;
};

/// What a format's load function gets: the file's config and keys, and the model to load into.
struct LoadContext {
  torch::nn::Module& model;
  const nlohmann::json& config;
  /// The config file's path, for error messages.
  std::string config_file;
  /// The weights file's path and its keys.
  std::string weights_file;
  std::vector<std::string> keys;
  /// The name the adapter is attached under.
  std::string adapter;
  std::function<std::string(const std::string&)> hub_path;

  /// The `method` of this adapter at site `path`, as M; valid once the plan's apply() ran.
  template <class M>
  std::shared_ptr<M> method_at(const std::string& path, const std::string& method) const {
    for (auto& [p, m] : attached_methods(model)) {
      if (p == path && m->adapter() == adapter && m->method() == method) {
        if (auto typed = std::dynamic_pointer_cast<M>(m)) return typed;
      }
    }
    fail("load_adapter", "internal: no {} attached at \"{}\"", method, path);
  }
};

/// A method's adapter file format.
struct AdapterFormat {
  using Save = std::function<void(SaveContext&)>;
  using Load = std::function<LoadPlan(const LoadContext&)>;
  using Claims = std::function<bool(const nlohmann::json&)>;
  AdapterFormat(std::string peft_type, bool reads, Save save, Load load, Claims claims = nullptr)
      : peft_type(std::move(peft_type)),
        reads(reads),
        save(std::move(save)),
        load(std::move(load)),
        claims(std::move(claims)) {}

  /// The `peft_type` written into adapter_config.json (Hugging Face PEFT's name where PEFT has
  /// the method).
  std::string peft_type;
  /// Whether load_adapter() reads files of `peft_type` through this entry (P-tuning writes
  /// PROMPT_TUNING files, which load as prompt tuning).
  bool reads = true;
  Save save;
  Load load;
  /// When set, load_adapter() reads a `peft_type` file through this entry only if it returns
  /// true for the file's config, and prefers it to an entry without one (a LoRA variant claims
  /// the LORA files whose config sets its flag).
  Claims claims;
  /// Other peft_types load_adapter() reads through `load` (Hugging Face PEFT's P_TUNING files,
  /// which hold the prompt encoder's output rows as PROMPT_TUNING files do).
  std::vector<std::string> also_reads;
};

/// Everything the library knows about one method.
struct MethodEntry {
  /// The name --method options and MethodImpl::method() use: "lora", "prefix", ...
  std::string name;
  /// One line for --help and docs.
  std::string summary;
  /// The learning rate the method trains well at with the default model when none is given.
  double default_lr = 1e-3;
  /// Attaches the method to `model` with options given as JSON (the keys of the method's
  /// adapter_config.json where it has one) and returns the site paths.
  std::function<std::vector<std::string>(torch::nn::Module&, const nlohmann::json&)> attach;
  /// Learning rates for parameters whose name contains a pattern, given the base rate and the
  /// method's options (LoRA+'s lora_B, ProPETL's mask scores); may be empty.
  std::function<std::vector<std::pair<std::string, double>>(double, const nlohmann::json&)>
      lr_rules;
  /// Every key `attach` and `lr_rules` read. peft::attach() refuses options with any other key
  /// (a misspelt `"rank"` would otherwise train at the default rank); empty = not declared, no
  /// check.
  std::vector<std::string> option_keys;
  /// The adapter file format, if the method has one.
  std::optional<AdapterFormat> format;
  /// For a method that is a model rather than something attached at sites (Ladder
  /// Side-Tuning): whether `model` holds one, so save_adapter() saves it when the adapter name
  /// has no attached method.
  std::function<bool(torch::nn::Module&)> held_by;
  /// false for an entry that only writes and reads adapter files of a task model's heads (early
  /// exit), not a method to train with: method_names() leaves it out.
  bool trainable = true;
};

namespace detail {

struct Registry {
  std::mutex mutex;
  std::vector<MethodEntry> entries;
};

inline Registry& registry() {
  static Registry instance;
  return instance;
}

}  // namespace detail

/// Adds (or replaces) the entry of `entry.name`. Methods call it from their header; returns true
/// so it can initialise an inline variable.
inline bool register_method(MethodEntry entry) {
  auto& r = detail::registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  auto it = std::find_if(r.entries.begin(), r.entries.end(),
                         [&](const MethodEntry& e) { return e.name == entry.name; });
  if (it != r.entries.end()) {
    *it = std::move(entry);
  } else {
    r.entries.push_back(std::move(entry));
  }
  return true;
}

// Helpers the methods' file formats share.
namespace detail {

/// A shape as error messages print it: `[2, 3]`.
inline std::string shape_of(const std::vector<int64_t>& shape) {
  return detail::shape(shape);
}

/// The sites of `model` with their paths, by path.
inline std::map<std::string, std::shared_ptr<SiteImpl>> sites_by_path(torch::nn::Module& model) {
  std::map<std::string, std::shared_ptr<SiteImpl>> out;
  for (auto& ref : find_sites(model)) out[ref.path] = ref.site;
  return out;
}

/// Attention sites in layer order, as PEFT's prefix layout counts them.
inline std::vector<SiteRef> attention_sites(torch::nn::Module& model) {
  std::vector<SiteRef> out;
  for (auto& ref : find_sites(model)) {
    if (ref.site->kind() == SiteKind::Attention) out.push_back(ref);
  }
  return out;
}

/// The method `method` of adapter `adapter` at site `path`, as M (attached by load_adapter).
template <class M>
std::shared_ptr<M> method_of(torch::nn::Module& model, const std::string& path,
                             const std::string& method, const std::string& adapter) {
  for (auto& [p, m] : attached_methods(model)) {
    if (p == path && m->adapter() == adapter && m->method() == method) {
      if (auto typed = std::dynamic_pointer_cast<M>(m)) return typed;
    }
  }
  fail("load_adapter", "internal: no {} attached at \"{}\"", method, path);
}

/// The parameter `key` (a dotted path) of `module`.
inline torch::Tensor parameter(const torch::nn::Module& module, const std::string& key) {
  auto params = module.named_parameters(/*recurse=*/true);
  const auto* found = params.find(key);
  check(found != nullptr, "load_adapter", "internal: no parameter \"{}\" in {}", key,
        module.name());
  return *found;
}

/// Every parameter of the named modules that exist in `model`, by dotted path.
inline NamedTensors module_parameters(torch::nn::Module& model,
                                      const std::vector<std::string>& modules) {
  NamedTensors out;
  auto all = model.named_modules("", /*include_self=*/false);
  for (const auto& name : modules) {
    if (!all.contains(name)) continue;
    for (const auto& p : all[name]->named_parameters(/*recurse=*/true)) {
      out.emplace_back(name + "." + p.key(), p.value());
    }
  }
  return out;
}

/// Checks that every method of an adapter (all of class `Impl`) has the first one's setting, as
/// `describe(options)` writes it ("r=8 alpha=16"): one file holds one setting. Returns the first
/// method's options.
template <class Impl, class Describe>
const auto& shared_setting(const SiteMethods& methods, Describe describe) {
  const auto& first = std::dynamic_pointer_cast<Impl>(methods.front().second)->options();
  const std::string expected = describe(first);
  for (const auto& [path, m] : methods) {
    const std::string setting = describe(std::dynamic_pointer_cast<Impl>(m)->options());
    check(setting == expected, "save_adapter",
          "{} at \"{}\" has {}, unlike \"{}\" ({}); one file holds one setting", m->method(), path,
          setting, methods.front().first, expected);
  }
  return first;
}

/// Saves every parameter of each of the adapter's methods under its site's hub path,
/// `<save_prefix><hub module path>.<parameter name>` (the layout of Hugging Face PEFT's LoRA-like
/// files, whose parameter names the methods mirror), and returns those hub paths, the file's
/// `target_modules`.
inline std::vector<std::string> save_site_parameters(SaveContext& c) {
  std::vector<std::string> targets;
  for (auto& [path, m] : c.methods) {
    const std::string hub = c.hub_path(path);
    targets.push_back(hub);
    for (const auto& p : m->named_parameters(/*recurse=*/true)) {
      c.tensors.emplace_back(c.save_prefix + hub + "." + p.key(), p.value());
    }
  }
  return targets;
}

/// The sites (those `fits` accepts) whose keys the file holds, as our site paths: a key is
/// `<prefix><hub module path><one of suffixes>`, the layout of Hugging Face PEFT's LoRA-like
/// files. Throws on a key that names no such site of the model.
inline std::vector<std::string> file_sites(const LoadContext& c, const std::string& prefix,
                                           const std::vector<std::string>& suffixes,
                                           const std::function<bool(const SiteImpl&)>& fits) {
  std::map<std::string, std::string> ours;  // hub module path -> our site path
  for (auto& [path, site] : sites_by_path(c.model)) {
    if (fits(*site)) ours[c.hub_path(path)] = path;
  }
  std::vector<std::string> targets;
  for (const auto& key : c.keys) {
    if (key.compare(0, prefix.size(), prefix) != 0) continue;
    for (const auto& s : suffixes) {
      if (key.size() <= prefix.size() + s.size() ||
          key.compare(key.size() - s.size(), s.size(), s) != 0) {
        continue;
      }
      const std::string module = key.substr(prefix.size(), key.size() - prefix.size() - s.size());
      auto it = ours.find(module);
      check(it != ours.end(), "load_adapter",
            "{}: key \"{}\" names module \"{}\", which is no projection of this model",
            c.weights_file, key, module);
      targets.push_back(it->second);
    }
  }
  return targets;
}

/// A list of module names under `key` (target_modules, IA3's feedforward_modules): nothing
/// when the key is absent or null. Hugging Face also writes a regular expression or
/// "all-linear" there: refused when attaching from options, ignored (nothing) in a file being
/// loaded (`where` "load_adapter"), whose tensor keys name the modules.
inline std::optional<std::vector<std::string>> module_list_from_json(const nlohmann::json& config,
                                                                     const char* key,
                                                                     const std::string& file,
                                                                     const char* where) {
  KeyLog::note(key);
  const auto found = config.find(key);
  if (found == config.end() || found->is_null()) return std::nullopt;
  if (found->is_string() && std::string_view(where) == "load_adapter") return std::nullopt;
  check(found->is_array(), where,
        "{}: \"{}\" must be a list of module names, got {} (a regular expression or "
        "\"all-linear\" is not supported)",
        file, key, found->dump());
  return config_value<std::vector<std::string>>(config, key, file, where);
}

/// Sets the targets and layers of `options` from a config's `target_modules` (a list of module
/// names) and `layers_to_transform` (a list of layer indices, or one index); missing or null
/// leaves the defaults. `target_modules` as a string: see
/// module_list_from_json. Other mistyped values throw from `where`, naming `file`.
template <class Options>
void targets_from_json(const nlohmann::json& config, Options& options, const std::string& file,
                       const char* where) {
  KeyLog::note("layers_to_transform");
  if (auto targets = module_list_from_json(config, "target_modules", file, where)) {
    options.targets(std::move(*targets));
  }
  auto layers = config.find("layers_to_transform");
  if (layers != config.end() && !layers->is_null()) {
    if (layers->is_array()) {
      options.layers(
          config_value<std::vector<int64_t>>(config, "layers_to_transform", file, where));
    } else {
      options.layers({config_value<int64_t>(config, "layers_to_transform", file, where)});
    }
  }
}

/// options.validate(), with the config file named in the error.
template <class Options>
void validate_from_file(const Options& options, const std::string& cfg_name) {
  try {
    options.validate();
  } catch (const Error& e) {
    fail("load_adapter", "{}: {}", cfg_name, e.what());
  }
}

/// The number of single-character edits that turn `a` into `b` (Levenshtein distance).
inline size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diagonal = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      const size_t above = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diagonal + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diagonal = above;
    }
  }
  return row[b.size()];
}

/// `; did you mean "<c>"?` for the candidate c closest to `name` (fewest edits) among those
/// that resemble it: at most a third of its characters differ, or one ends with the other and
/// the shorter has four characters or more ("alpha" for "lora_alpha"). "" when none does.
inline std::string did_you_mean(const std::string& name,
                                const std::vector<std::string>& candidates) {
  auto ends_with = [](const std::string& s, const std::string& tail) {
    return tail.size() >= 4 && s.size() >= tail.size() &&
           s.compare(s.size() - tail.size(), tail.size(), tail) == 0;
  };
  std::string best;
  size_t best_distance = std::string::npos;
  for (const auto& c : candidates) {
    const size_t d = edit_distance(name, c);
    const bool close =
        d <= std::max<size_t>(1, name.size() / 3) || ends_with(c, name) || ends_with(name, c);
    if (close && d < best_distance) {
      best_distance = d;
      best = c;
    }
  }
  return best.empty() ? std::string() : fmt::format("; did you mean \"{}\"?", best);
}

/// The first module of type T inside `model` and its path ("" for the model itself), if any.
template <class T>
std::pair<std::string, T*> find_module(torch::nn::Module& model) {
  for (const auto& item : model.named_modules("", /*include_self=*/true)) {
    if (auto* found = dynamic_cast<T*>(item.value().get())) return {item.key(), found};
  }
  return {"", nullptr};
}

}  // namespace detail

/// Every registered method, in the order their headers were first included.
inline std::vector<MethodEntry> registered_methods() {
  auto& r = detail::registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  return r.entries;
}

/// The names of the registered methods one can train with (entries with `trainable` set).
inline std::vector<std::string> method_names() {
  std::vector<std::string> names;
  for (const auto& e : registered_methods()) {
    if (e.trainable) names.push_back(e.name);
  }
  return names;
}

/// The entry of method `name`, or nullopt.
inline std::optional<MethodEntry> find_method(const std::string& name) {
  for (auto& e : registered_methods()) {
    if (e.name == name) return e;
  }
  return std::nullopt;
}

/// The entry of method `name`; throws naming the registered methods when there is none.
inline MethodEntry method_entry(const std::string& name) {
  auto e = find_method(name);
  if (!e) {
    const auto names = method_names();
    fail("registry", "unknown method \"{}\"{}; registered: {}", name,
         detail::did_you_mean(name, names),
         names.empty() ? std::string("(none)") : fmt::format("{}", fmt::join(names, ", ")));
  }
  return *e;
}

/// Whether save_adapter() has a file format for `method`.
inline bool has_adapter_format(const std::string& method) {
  auto e = find_method(method);
  return e && e->format;
}

/// The registered methods with a file format, each with the `peft_type` it is stored under.
inline std::vector<std::pair<std::string, std::string>> adapter_formats() {
  std::vector<std::pair<std::string, std::string>> out;
  for (const auto& e : registered_methods()) {
    if (e.format) out.emplace_back(e.name, e.format->peft_type);
  }
  return out;
}

/// Attaches method `name` to `model` with `options` (JSON; see each method's header for its
/// keys, listed in its entry's `option_keys`; missing keys take the method's defaults) and
/// returns the site paths. Throws on an unknown name, a key the method does not read, or a bad
/// value, leaving the model unchanged.
///
///     peft::attach(*bert, "lora", {{"r", 16}, {"target_modules", {"query", "value"}}});
inline std::vector<std::string> attach(torch::nn::Module& model, const std::string& name,
                                       const nlohmann::json& options = nlohmann::json::object()) {
  const auto entry = method_entry(name);
  check(static_cast<bool>(entry.attach), name, "this method cannot be attached from options");
  check(options.is_object() || options.is_null(), name, "options must be a JSON object, got {}",
        options.dump());
  if (!entry.option_keys.empty() && options.is_object()) {
    const auto& keys = entry.option_keys;
    for (const auto& item : options.items()) {
      check(std::find(keys.begin(), keys.end(), item.key()) != keys.end(), name,
            "unknown option \"{}\"{}; {} reads: {}", item.key(),
            detail::did_you_mean(item.key(), keys), name, fmt::join(keys, ", "));
    }
  }
  return entry.attach(model, options.is_null() ? nlohmann::json::object() : options);
}

PEFT_NAMESPACE_END
