#pragma once

// Adapter files: `adapter_config.json` + `adapter_model.safetensors` in a folder, as Hugging Face
// PEFT writes them. LoRA, prefix tuning and prompt tuning use PEFT's own key names and config
// fields, so the folders load with `PeftModel.from_pretrained` and PEFT's folders load here;
// the methods PEFT does not have (bottleneck adapters, BitFit, ProPETL, Compacter, AdapterFusion,
// Ladder Side-Tuning) use the same two files with peft's own `peft_type` and module paths (see
// docs/ADAPTER_FORMAT.md).

#include <torch/arg.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/normalization.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include <peft/config.hpp>
#include <peft/core/attach.hpp>
#include <peft/core/error.hpp>
#include <peft/core/parameters.hpp>
#include <peft/core/site.hpp>
#include <peft/core/targets.hpp>
#include <peft/detail/shape.hpp>
#include <peft/io/hf_config.hpp>
#include <peft/io/safetensors.hpp>
#include <peft/methods/adapter.hpp>
#include <peft/methods/bitfit.hpp>
#include <peft/methods/compacter.hpp>
#include <peft/methods/fusion.hpp>
#include <peft/methods/ladder.hpp>
#include <peft/methods/lora.hpp>
#include <peft/methods/prefix.hpp>
#include <peft/methods/prompt.hpp>
#include <peft/methods/propetl.hpp>
#include <peft/models/bert.hpp>
#include <peft/models/ladder_heads.hpp>
#include <peft/nn/attention.hpp>

PEFT_NAMESPACE_BEGIN

/// How save_adapter() writes a folder.
struct SaveAdapterOptions {
  /// Which attached adapter to write.
  TORCH_ARG(std::string, adapter_name) = "default";
  /// Recorded as `base_model_name_or_path`; empty = the folder a models::Bert was loaded from.
  TORCH_ARG(std::string, base_model_name_or_path);
  /// Fully trained modules saved with the adapter (PEFT's modules_to_save); unset = "classifier"
  /// when the model has a child of that name.
  TORCH_ARG(std::optional<std::vector<std::string>>, modules_to_save);
};

/// The methods (MethodImpl::method(), plus "lst" for Ladder Side-Tuning) save_adapter() can
/// write, each as the `peft_type` it is stored under. P-tuning is stored as prompt tuning.
inline const std::vector<std::pair<std::string, std::string>>& adapter_formats() {
  static const std::vector<std::pair<std::string, std::string>> formats{
      {"lora", "LORA"},
      {"prompt", "PROMPT_TUNING"},
      {"ptuning", "PROMPT_TUNING"},
      {"prefix", "PREFIX_TUNING"},
      {"adapter", "BOTTLENECK_ADAPTER"},
      {"bitfit", "BITFIT"},
      {"propetl", "PROPETL"},
      {"compacter", "COMPACTER"},
      {"fusion", "ADAPTER_FUSION"},
      {"lst", "LADDER_SIDE_TUNING"}};
  return formats;
}

/// Whether save_adapter() has a file format for `method` ("lora", "propetl", "lst", ...).
inline bool has_adapter_format(const std::string& method) {
  const auto& formats = adapter_formats();
  return std::any_of(formats.begin(), formats.end(),
                     [&](const auto& f) { return f.first == method; });
}

namespace detail {

inline constexpr const char* kAdapterConfig = "adapter_config.json";
inline constexpr const char* kAdapterWeights = "adapter_model.safetensors";

/// The first module of type T inside `model` and its path ("" for the model itself), if any.
template <class T>
std::pair<std::string, T*> find_module(torch::nn::Module& model) {
  for (const auto& item : model.named_modules("", /*include_self=*/true)) {
    if (auto* found = dynamic_cast<T*>(item.value().get())) return {item.key(), found};
  }
  return {"", nullptr};
}

/// The models::Bert inside `model` and its path ("" for the model itself), if there is one.
inline std::pair<std::string, models::BertImpl*> find_bert(torch::nn::Module& model) {
  return find_module<models::BertImpl>(model);
}

/// Hugging Face's module path for one of our projection sites inside a Bert
/// ("bert.encoder.layers.3.self_attn.query" -> "bert.encoder.layer.3.attention.self.query"),
/// or the path unchanged when it has none.
inline std::string hf_module_path(const std::string& path, const std::string& bert_path,
                                  bool has_bert) {
  if (!has_bert) return path;
  const std::string prefix = bert_path.empty() ? "" : bert_path + ".";
  const std::string layers = prefix + "encoder.layers.";
  if (path.compare(0, layers.size(), layers) != 0) return path;
  const size_t dot = path.find('.', layers.size());
  if (dot == std::string::npos) return path;
  const std::string index = path.substr(layers.size(), dot - layers.size());
  const std::string rest = path.substr(dot + 1);
  static const std::map<std::string, std::string> names = {
      {"self_attn.query", "attention.self.query"}, {"self_attn.key", "attention.self.key"},
      {"self_attn.value", "attention.self.value"}, {"self_attn.out_proj", "attention.output.dense"},
      {"linear1", "intermediate.dense"},           {"linear2", "output.dense"}};
  auto it = names.find(rest);
  if (it == names.end()) return path;
  return prefix + "encoder.layer." + index + "." + it->second;
}

/// Every parameter of the named modules that exist in `model`, by dotted path.
inline std::vector<std::pair<std::string, torch::Tensor>> module_parameters(
    torch::nn::Module& model, const std::vector<std::string>& modules) {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  auto all = model.named_modules("", /*include_self=*/false);
  for (const auto& name : modules) {
    if (!all.contains(name)) continue;
    for (const auto& p : all[name]->named_parameters(/*recurse=*/true)) {
      out.emplace_back(name + "." + p.key(), p.value());
    }
  }
  return out;
}

inline bool has_module(torch::nn::Module& model, const std::string& name) {
  return model.named_modules("", /*include_self=*/false).contains(name);
}

/// Writes `text` to `path` through a temporary file renamed over it.
inline void write_text_atomically(const std::filesystem::path& path, const std::string& text) {
  const auto tmp = path.string() + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    check(static_cast<bool>(out), "save_adapter", "cannot write {}", tmp);
    out << text;
    out.flush();
    check(static_cast<bool>(out), "save_adapter", "error writing {}", tmp);
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) {
    std::filesystem::remove(tmp, ec);
    fail("save_adapter", "cannot rename {} to {}", tmp, path.string());
  }
}

/// The peft_types load_adapter() reads, for error messages.
inline std::string adapter_format_types() {
  std::vector<std::string> types;
  for (const auto& f : adapter_formats()) {
    if (std::find(types.begin(), types.end(), f.second) == types.end()) types.push_back(f.second);
  }
  return fmt::format("{}", fmt::join(types, ", "));
}

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
  std::function<torch::Tensor()> target;  ///< resolved after the methods are attached
  /// The dtype the file must store; Undefined = any floating-point type.
  c10::ScalarType dtype;
  /// Turns the stored tensor (read from the named file) into what is copied to the target, e.g.
  /// unpacks a bit mask; runs before the model changes and may throw.
  Convert convert;
};

inline std::string shape_of(const std::vector<int64_t>& shape) {
  return peft::detail::shape(shape);
}

/// Checks that `file` holds exactly the slots' keys with their shapes (throws before anything
/// changes otherwise).
inline void check_slots(const io::SafetensorsFile& file, const std::vector<Slot>& slots) {
  std::set<std::string> expected;
  for (const auto& slot : slots) {
    expected.insert(slot.key);
    check(file.contains(slot.key), "load_adapter", "{}: missing key \"{}\" (expected shape {})",
          file.path(), slot.key, shape_of(slot.shape));
    const auto found = file.shape(slot.key);
    check(found == slot.shape, "load_adapter", "{}: key \"{}\" has shape {}, expected {}",
          file.path(), slot.key, shape_of(found), shape_of(slot.shape));
    if (slot.dtype == c10::ScalarType::Undefined) {
      check(c10::isFloatingType(file.dtype(slot.key)), "load_adapter",
            "{}: key \"{}\" has dtype {}, expected a floating-point type", file.path(), slot.key,
            file.entry(slot.key).dtype_name);
    } else {
      check(file.dtype(slot.key) == slot.dtype, "load_adapter",
            "{}: key \"{}\" has dtype {}, expected {}", file.path(), slot.key,
            file.entry(slot.key).dtype_name, c10::toString(slot.dtype));
    }
  }
  for (const auto& name : file.names()) {
    check(expected.count(name) != 0, "load_adapter",
          "{}: unexpected key \"{}\" (shape {}): the model has no place for it", file.path(), name,
          shape_of(file.shape(name)));
  }
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

/// The number of attention heads of the model's attentions (0 when it has none).
inline int64_t attention_heads(torch::nn::Module& model) {
  for (const auto& m : model.modules(/*include_self=*/true)) {
    if (auto* mha = dynamic_cast<nn::MultiheadAttentionImpl*>(m.get())) {
      return mha->base->options.num_heads();
    }
  }
  return 0;
}

template <class T>
nlohmann::json number(T value) {
  if constexpr (std::is_floating_point_v<T>) {
    if (value == static_cast<double>(static_cast<int64_t>(value))) {
      return static_cast<int64_t>(value);
    }
  }
  return value;
}

/// The LayerNorms of `model` whose parameters train (BitFit's layer_norm option), by path.
inline std::vector<std::string> trainable_layer_norms(torch::nn::Module& model) {
  std::vector<std::string> out;
  for (const auto& item : model.named_modules("", /*include_self=*/false)) {
    if (!std::dynamic_pointer_cast<torch::nn::LayerNormImpl>(item.value())) continue;
    bool trains = false;
    for (const auto& p : item.value()->parameters()) trains = trains || p.requires_grad();
    if (trains) out.push_back(item.key());
  }
  return out;
}

template <class T>
T config_value(const nlohmann::json& config, const char* key, const std::string& file) {
  auto it = config.find(key);
  check(it != config.end() && !it->is_null(), "load_adapter", "{}: \"{}\" is missing", file, key);
  try {
    return it->get<T>();
  } catch (const nlohmann::json::exception&) {
    fail("load_adapter", "{}: \"{}\" has the wrong type ({})", file, key, it->dump());
  }
}

template <class T>
T config_value_or(const nlohmann::json& config, const char* key, T fallback,
                  const std::string& file) {
  auto it = config.find(key);
  if (it == config.end() || it->is_null()) return fallback;
  return config_value<T>(config, key, file);
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

/// AdapterKind from its name in a config.
inline AdapterKind adapter_kind_from(const std::string& name, const std::string& file) {
  if (name == "houlsby") return AdapterKind::Houlsby;
  if (name == "pfeiffer") return AdapterKind::Pfeiffer;
  if (name == "parallel") return AdapterKind::Parallel;
  fail("load_adapter", "{}: adapter_kind \"{}\" is unknown (houlsby, pfeiffer or parallel)", file,
       name);
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

/// The ladder classifier inside `model` and its path ("" for the model itself), if there is one.
inline std::pair<std::string, models::BertLadderForSequenceClassificationImpl*> find_ladder_model(
    torch::nn::Module& model) {
  return find_module<models::BertLadderForSequenceClassificationImpl>(model);
}

using NamedTensors = std::vector<std::pair<std::string, torch::Tensor>>;
using SiteMethods = std::vector<std::pair<std::string, std::shared_ptr<MethodImpl>>>;

/// What load_adapter() does for one peft_type: the tensors it expects, how it attaches the method
/// (after every check passed) and what it does once the tensors are copied.
struct LoadPlan {
  std::vector<Slot> slots;
  std::function<void()> apply;
  std::function<void()> finish;
};

// ------------------------------------------------------------------------------------ ProPETL

/// ProPETL: the shared prototype once (`prototype.<parameter>`) and, per site, each mask packed
/// one bit per entry (`<site>.mask_<weight>`, uint8); the float scores are not stored.
inline void save_propetl(const SiteMethods& methods, nlohmann::json& config,
                         NamedTensors& tensors) {
  auto first = std::dynamic_pointer_cast<ProPETLImpl>(methods.front().second);
  auto prototype = first->prototype();
  const auto& o = first->options();
  std::vector<std::string> targets;
  for (const auto& [path, m] : methods) {
    auto p = std::dynamic_pointer_cast<ProPETLImpl>(m);
    check(p->prototype().get() == prototype.get() && p->options().keep_ratio() == o.keep_ratio(),
          "save_adapter",
          "ProPETL at \"{}\" does not share the prototype and keep_ratio of \"{}\"; a file holds "
          "one prototype (give each attach() its own adapter_name)",
          path, methods.front().first);
    targets.push_back(path);
    const auto masks = p->masks();
    for (size_t i = 0; i < masks.size(); ++i) {
      tensors.emplace_back(path + ".mask_" + prototype->weight_names()[i], pack_mask(masks[i]));
    }
  }
  for (const auto& item : prototype->named_parameters()) {
    tensors.emplace_back("prototype." + item.key(), item.value());
  }
  nlohmann::json shapes = nlohmann::json::object();
  for (size_t i = 0; i < prototype->weights().size(); ++i) {
    shapes[prototype->weight_names()[i]] = prototype->weights()[i].sizes().vec();
  }
  config["peft_type"] = "PROPETL";
  config["base"] = to_string(prototype->base());
  config["keep_ratio"] = o.keep_ratio();
  switch (prototype->base()) {
    case ProPETLBase::Adapter:
      config["adapter_kind"] = to_string(o.adapter_kind());
      config["bottleneck"] = prototype->adapter_down->weight.size(0);
      config["activation"] = o.activation();
      config["scaling"] = o.scaling();
      break;
    case ProPETLBase::LoRA:
      config["r"] = prototype->lora_A->weight.size(0);
      config["lora_alpha"] = number(o.alpha());
      break;
    case ProPETLBase::Prefix:
      config["num_virtual_tokens"] = prototype->prefix_keys.size(0);
      break;
  }
  config["target_modules"] = targets;
  config["mask_shapes"] = shapes;
}

inline LoadPlan plan_propetl(torch::nn::Module& model, const nlohmann::json& config,
                             const std::string& cfg_name, const std::string& adapter_name) {
  const auto base_name = config_value<std::string>(config, "base", cfg_name);
  ProPETLBase base = ProPETLBase::Adapter;
  if (base_name == "lora") {
    base = ProPETLBase::LoRA;
  } else if (base_name == "prefix") {
    base = ProPETLBase::Prefix;
  } else {
    check(base_name == "adapter", "load_adapter",
          "{}: base \"{}\" is unknown (adapter, lora or prefix)", cfg_name, base_name);
  }
  const AdapterKind kind =
      base == ProPETLBase::Adapter
          ? adapter_kind_from(config_value<std::string>(config, "adapter_kind", cfg_name), cfg_name)
          : AdapterKind::Pfeiffer;
  ProPETLOptions options(base, kind);
  options.keep_ratio(config_value<double>(config, "keep_ratio", cfg_name));
  switch (base) {
    case ProPETLBase::Adapter:
      options.bottleneck(config_value<int64_t>(config, "bottleneck", cfg_name))
          .activation(config_value<std::string>(config, "activation", cfg_name))
          .scaling(config_value<double>(config, "scaling", cfg_name));
      check(options.bottleneck() > 0, "load_adapter", "{}: bottleneck must be positive, got {}",
            cfg_name, options.bottleneck());
      break;
    case ProPETLBase::LoRA:
      options.r(config_value<int64_t>(config, "r", cfg_name))
          .alpha(config_value<double>(config, "lora_alpha", cfg_name));
      break;
    case ProPETLBase::Prefix:
      options.num_virtual_tokens(config_value<int64_t>(config, "num_virtual_tokens", cfg_name));
      break;
  }
  const auto targets = config_value<std::vector<std::string>>(config, "target_modules", cfg_name);
  check(!targets.empty(), "load_adapter", "{}: target_modules is empty", cfg_name);
  options.adapter_name(adapter_name);
  options.targets(targets);
  detail::validate_from_file(options, cfg_name);
  auto sites = sites_by_path(model);
  std::shared_ptr<SiteImpl> first;
  for (const auto& path : targets) {
    auto it = sites.find(path);
    check(it != sites.end() && options.fits_base(*it->second), "load_adapter",
          "{}: target \"{}\" is no {} site of this model", cfg_name, path,
          to_string(propetl_site_kind(base)));
    if (!first) first = it->second;
    check(it->second->in_features() == first->in_features() &&
              it->second->out_features() == first->out_features(),
          "load_adapter", "{}: target \"{}\" has sizes {} -> {}, unlike \"{}\" ({} -> {})",
          cfg_name, path, it->second->in_features(), it->second->out_features(), targets.front(),
          first->in_features(), first->out_features());
  }
  // A prototype built from the settings, off the model, gives the expected keys and shapes.
  std::shared_ptr<ProPETLPrototypeImpl> probe;
  try {
    probe = std::make_shared<ProPETLPrototypeImpl>(options, first->in_features(),
                                                   first->out_features());
  } catch (const Error& e) {
    fail("load_adapter", "{}: {}", cfg_name, e.what());
  }
  const auto shapes =
      config_value<std::map<std::string, std::vector<int64_t>>>(config, "mask_shapes", cfg_name);
  check(shapes.size() == probe->weights().size(), "load_adapter",
        "{}: mask_shapes lists {} masks; a {} prototype has {} ({})", cfg_name, shapes.size(),
        base_name, probe->weights().size(),
        fmt::format("{}", fmt::join(probe->weight_names(), ", ")));
  for (size_t i = 0; i < probe->weights().size(); ++i) {
    const auto& name = probe->weight_names()[i];
    const auto expected = probe->weights()[i].sizes().vec();
    auto it = shapes.find(name);
    check(it != shapes.end(), "load_adapter", "{}: mask_shapes has no \"{}\"", cfg_name, name);
    check(it->second == expected, "load_adapter",
          "{}: mask_shapes \"{}\" is {}, but the prototype these settings build has {}", cfg_name,
          name, shape_of(it->second), shape_of(expected));
  }

  LoadPlan plan;
  const std::string head = targets.front();
  for (const auto& item : probe->named_parameters()) {
    const std::string key = item.key();
    plan.slots.push_back(
        {"prototype." + key, item.value().sizes().vec(), [&model, head, adapter_name, key] {
           auto p = method_of<ProPETLImpl>(model, head, "propetl", adapter_name);
           return parameter(*p->prototype(), key);
         }});
  }
  const double keep_ratio = options.keep_ratio();
  for (const auto& path : targets) {
    for (size_t i = 0; i < probe->weights().size(); ++i) {
      const auto shape = probe->weights()[i].sizes().vec();
      const int64_t numel = probe->weights()[i].numel();
      const int64_t keep =
          static_cast<int64_t>(std::llround(keep_ratio * static_cast<double>(numel)));
      const std::string key = path + ".mask_" + probe->weight_names()[i];
      Slot slot{key, {(numel + 7) / 8}, [&model, path, adapter_name, i] {
                  return method_of<ProPETLImpl>(model, path, "propetl", adapter_name)->scores()[i];
                }};
      slot.dtype = torch::kByte;
      // Scores equal to the 0/1 mask make top_k_mask() give that mask back, as long as it keeps
      // exactly as many entries as keep_ratio does.
      slot.convert = [cfg_name, key, shape, keep, numel, keep_ratio](const torch::Tensor& packed,
                                                                     const std::string& file) {
        auto mask = unpack_mask(packed, torch::IntArrayRef(shape));
        const auto ones = mask.sum().item<double>();
        check(ones == static_cast<double>(keep), "load_adapter",
              "{}: mask \"{}\" keeps {} of {} entries, but keep_ratio {} (in {}) keeps {}", file,
              key, static_cast<int64_t>(ones), numel, keep_ratio, cfg_name, keep);
        return mask;
      };
      plan.slots.push_back(std::move(slot));
    }
  }
  plan.apply = [&model, options] { attach(model, options); };
  plan.finish = [&model, targets, adapter_name] {
    for (const auto& path : targets) {
      method_of<ProPETLImpl>(model, path, "propetl", adapter_name)->freeze_masks();
    }
  };
  return plan;
}

// ---------------------------------------------------------------------------------- Compacter

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
  config["peft_type"] = "COMPACTER";
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
      CompacterOptions(
          adapter_kind_from(config_value<std::string>(config, "adapter_kind", cfg_name), cfg_name))
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

// ------------------------------------------------------------------------------ AdapterFusion

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
  config["peft_type"] = "ADAPTER_FUSION";
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

// ------------------------------------------------------------------------ Ladder Side-Tuning

/// Ladder Side-Tuning: the side network's parameters under `ladder.` (downsamples, gates, side
/// blocks, upsample) and what it takes to rebuild it beside the same backbone.
inline void save_ladder(const std::string& path,
                        const models::BertLadderForSequenceClassificationImpl& model,
                        nlohmann::json& config, NamedTensors& tensors) {
  const auto& ladder = *model.ladder;
  const int64_t E = ladder.upsample->weight.size(0), width = ladder.upsample->weight.size(1);
  config["peft_type"] = "LADDER_SIDE_TUNING";
  config["reduction_factor"] = E / width;
  config["layers"] = ladder.selected_layers();
  config["gate_temperature"] = ladder.options().gate_temperature();
  config["side_block"] = to_string(ladder.options().block());
  config["side_width"] = width;
  config["side_heads"] = ladder.side_heads();
  config["side_dim_feedforward"] = ladder.side_dim_feedforward();
  config["pooling"] = models::to_string(model.pooling);
  const std::string prefix = path.empty() ? "ladder." : path + ".ladder.";
  for (const auto& item : ladder.named_parameters()) {
    tensors.emplace_back(prefix + item.key(), item.value());
  }
}

inline LoadPlan plan_ladder(torch::nn::Module& model, const nlohmann::json& config,
                            const std::string& cfg_name) {
  auto [path, target] = find_ladder_model(model);
  check(target != nullptr, "load_adapter",
        "{}: LADDER_SIDE_TUNING loads into a models::BertLadderForSequenceClassification, which "
        "this model neither is nor contains",
        cfg_name);
  const auto block_name = config_value<std::string>(config, "side_block", cfg_name);
  LadderBlock block = LadderBlock::PostNorm;
  try {
    block = ladder_block_from_string(block_name);
  } catch (const Error& e) {
    fail("load_adapter", "{}: {}", cfg_name, e.what());
  }
  auto options = LadderOptions()
                     .block(block)
                     .reduction_factor(config_value<int64_t>(config, "reduction_factor", cfg_name))
                     .gate_temperature(config_value<double>(config, "gate_temperature", cfg_name))
                     .layers(config_value<std::vector<int64_t>>(config, "layers", cfg_name))
                     .side_heads(config_value<int64_t>(config, "side_heads", cfg_name))
                     // The stored weights replace any initialisation; skip the pruning.
                     .init(LadderInit::Random);
  models::Pooling pooling = models::Pooling::Cls;
  try {
    pooling = models::pooling_from_string(config_value<std::string>(config, "pooling", cfg_name));
  } catch (const Error& e) {
    fail("load_adapter", "{}: {}", cfg_name, e.what());
  }
  // The new side network is built beside the backbone but installed only by apply(). Building
  // it freezes the backbone, which must not change what trains there now.
  auto encoder = target->bert->encoder;
  struct RestoreGrads {
    std::vector<std::pair<torch::Tensor, bool>> saved;
    ~RestoreGrads() {
      for (auto& [t, g] : saved) t.set_requires_grad(g);
    }
  } restore;
  for (auto& p : encoder->parameters()) restore.saved.emplace_back(p, p.requires_grad());
  Ladder fresh{nullptr};
  try {
    fresh = Ladder(encoder, options);
  } catch (const Error& e) {
    fail("load_adapter", "{}: {}", cfg_name, e.what());
  }
  fresh->unregister_module("backbone");
  const auto width = config_value<int64_t>(config, "side_width", cfg_name);
  const auto ff = config_value<int64_t>(config, "side_dim_feedforward", cfg_name);
  check(fresh->side_width() == width && fresh->side_dim_feedforward() == ff, "load_adapter",
        "{}: side blocks of width {} and feed-forward size {}, but this backbone gives {} and {}",
        cfg_name, width, ff, fresh->side_width(), fresh->side_dim_feedforward());
  const auto& reference = target->ladder->upsample->weight;
  fresh->to(reference.device(), reference.scalar_type());
  fresh->train(target->is_training());

  LoadPlan plan;
  const std::string prefix = path.empty() ? "ladder." : path + ".ladder.";
  for (const auto& item : fresh->named_parameters()) {
    auto tensor = item.value();
    plan.slots.push_back({prefix + item.key(), tensor.sizes().vec(), [tensor] { return tensor; }});
  }
  auto* owner = target;
  plan.apply = [owner, fresh, pooling] {
    owner->ladder = Ladder(owner->replace_module("ladder", fresh));
    owner->pooling = pooling;
  };
  return plan;
}

}  // namespace detail

/// Writes the adapter `options.adapter_name()` of `model` to the folder `dir` (created if needed):
/// `adapter_config.json` and `adapter_model.safetensors`, each replaced atomically. The adapter
/// must consist of one method with a file format (see adapter_formats(); P-tuning is written as
/// the prompt rows its encoder produces, PEFT's PROMPT_TUNING, and loads back as prompt tuning;
/// an AdapterFusion file holds the fusion layers, each fused adapter is saved on its own); the
/// modules to save (by default a `classifier` head) are written with it. A
/// models::BertLadderForSequenceClassification without a method of that name is saved as its
/// ladder side network. The model is not changed.
///
///     peft::save_adapter(*model, "out/sst2-lora");
inline void save_adapter(torch::nn::Module& model, const std::filesystem::path& dir,
                         const SaveAdapterOptions& options = SaveAdapterOptions()) {
  namespace fs = std::filesystem;
  const std::string& name = options.adapter_name();
  std::vector<std::pair<std::string, std::shared_ptr<MethodImpl>>> methods;
  std::set<std::string> kinds;
  for (auto& [path, m] : attached_methods(model)) {
    if (m->adapter() != name) continue;
    methods.emplace_back(path, m);
    kinds.insert(m->method());
  }
  auto [ladder_path, ladder_model] = detail::find_ladder_model(model);
  if (methods.empty() && ladder_model == nullptr) {
    auto known = adapter_names(model);
    fail("save_adapter", "no adapter named \"{}\"; attached: {}", name,
         known.empty() ? std::string("(none)") : fmt::format("{}", fmt::join(known, ", ")));
  }
  check(kinds.size() <= 1, "save_adapter",
        "adapter \"{}\" combines {}; an adapter file holds one method (give each its own "
        "adapter_name)",
        name, fmt::format("{}", fmt::join(kinds, " and ")));
  // Ladder Side-Tuning is no attached method: the side network is saved when no method is.
  const std::string method = methods.empty() ? "lst" : *kinds.begin();

  auto [bert_path, bert] = detail::find_bert(model);
  std::vector<std::string> to_save;
  if (options.modules_to_save()) {
    to_save = *options.modules_to_save();
    for (const auto& m : to_save) {
      check(detail::has_module(model, m), "save_adapter",
            "modules_to_save: the model has no \"{}\"", m);
    }
  } else if (detail::has_module(model, "classifier")) {
    to_save = {"classifier"};
  }
  const bool classifier = std::find(to_save.begin(), to_save.end(), "classifier") != to_save.end();
  std::string base = options.base_model_name_or_path();
  if (base.empty() && bert != nullptr) base = bert->config().name_or_path;

  nlohmann::json config;
  config["base_model_name_or_path"] = base.empty() ? nlohmann::json() : nlohmann::json(base);
  config["task_type"] = classifier ? "SEQ_CLS" : "FEATURE_EXTRACTION";
  config["modules_to_save"] = to_save.empty() ? nlohmann::json() : nlohmann::json(to_save);
  config["inference_mode"] = true;
  config["revision"] = nullptr;
  config["peft_library"] = "peft-cpp";

  std::vector<std::pair<std::string, torch::Tensor>> tensors;
  torch::NoGradGuard no_grad;
  // PEFT nests the transformers model one level deeper for LoRA than for prompt methods.
  std::string save_prefix;

  if (method == "lora") {
    save_prefix = "base_model.model.";
    const auto& first = std::dynamic_pointer_cast<LoRAImpl>(methods.front().second)->options();
    std::vector<std::string> targets;
    for (auto& [path, m] : methods) {
      auto lora = std::dynamic_pointer_cast<LoRAImpl>(m);
      const auto& o = lora->options();
      check(o.r() == first.r() && o.alpha() == first.alpha() && o.rslora() == first.rslora() &&
                o.dropout() == first.dropout(),
            "save_adapter",
            "LoRA at \"{}\" has r={} alpha={} rslora={} dropout={}, unlike \"{}\"; one file holds "
            "one setting",
            path, o.r(), o.alpha(), o.rslora(), o.dropout(), methods.front().first);
      const std::string hf = detail::hf_module_path(path, bert_path, bert != nullptr);
      targets.push_back(hf);
      if (lora->on_embedding()) {
        tensors.emplace_back(save_prefix + hf + ".lora_embedding_A", lora->lora_embedding_A);
        tensors.emplace_back(save_prefix + hf + ".lora_embedding_B", lora->lora_embedding_B);
      } else {
        tensors.emplace_back(save_prefix + hf + ".lora_A.weight", lora->lora_A->weight);
        tensors.emplace_back(save_prefix + hf + ".lora_B.weight", lora->lora_B->weight);
      }
    }
    config["peft_type"] = "LORA";
    config["r"] = first.r();
    config["lora_alpha"] = detail::number(first.alpha());
    config["lora_dropout"] = first.dropout();
    config["use_rslora"] = first.rslora();
    config["target_modules"] = targets;
    config["bias"] = "none";
    config["fan_in_fan_out"] = false;
    config["use_dora"] = false;
    config["init_lora_weights"] = true;
    config["rank_pattern"] = nlohmann::json::object();
    config["alpha_pattern"] = nlohmann::json::object();
    config["layers_to_transform"] = nullptr;
    config["layers_pattern"] = nullptr;
  } else if (method == "prompt" || method == "ptuning" || method == "prefix") {
    save_prefix = "base_model.";
    const int64_t layers = static_cast<int64_t>(detail::attention_sites(model).size());
    const int64_t heads =
        bert != nullptr ? bert->config().num_attention_heads : detail::attention_heads(model);
    int64_t dim = 0, n = 0;
    if (method == "prompt" || method == "ptuning") {
      // P-tuning is saved as the virtual tokens its encoder produces now: plain prompt tuning,
      // which is how Hugging Face PEFT stores a P-tuning model for inference.
      check(methods.size() == 1, "save_adapter",
            "prompt adapter \"{}\" sits at {} sites; the file format holds one prompt", name,
            methods.size());
      auto rows = methods.front().second->prompt();
      tensors.emplace_back("prompt_embeddings", rows);
      n = rows.size(0);
      dim = rows.size(1);
      config["peft_type"] = "PROMPT_TUNING";
      config["prompt_tuning_init"] = "RANDOM";
      config["prompt_tuning_init_text"] = nullptr;
      config["tokenizer_name_or_path"] = nullptr;
    } else {
      // PEFT's layout: row t holds, layer after layer, that layer's key then value row.
      auto all = detail::attention_sites(model);
      check(methods.size() == all.size(), "save_adapter",
            "prefix adapter \"{}\" sits at {} of the model's {} attentions; the file format "
            "needs every layer",
            name, methods.size(), all.size());
      std::vector<torch::Tensor> columns;
      for (size_t i = 0; i < all.size(); ++i) {
        check(methods[i].first == all[i].path, "save_adapter",
              "prefix adapter \"{}\" is not at every attention in layer order (\"{}\" vs \"{}\")",
              name, methods[i].first, all[i].path);
        auto [k, v] = methods[i].second->prefix();
        if (!columns.empty()) {
          check(k.size(0) == columns.front().size(0), "save_adapter",
                "prefix at \"{}\" has {} rows, unlike the first layer's {}", methods[i].first,
                k.size(0), columns.front().size(0));
        }
        columns.push_back(k);
        columns.push_back(v);
      }
      auto rows = torch::cat(columns, 1);
      tensors.emplace_back("prompt_embeddings", rows);
      n = rows.size(0);
      dim = columns.front().size(1);
      config["peft_type"] = "PREFIX_TUNING";
      config["prefix_projection"] = false;
      config["encoder_hidden_size"] = dim;
    }
    config["num_virtual_tokens"] = n;
    config["token_dim"] = dim;
    config["num_transformer_submodules"] = 1;
    config["num_attention_heads"] = heads;
    config["num_layers"] = layers;
  } else if (method == "adapter") {
    auto first = std::dynamic_pointer_cast<AdapterImpl>(methods.front().second);
    const auto& o = first->options();
    std::vector<std::string> targets;
    for (auto& [path, m] : methods) {
      auto a = std::dynamic_pointer_cast<AdapterImpl>(m);
      check(a->options().kind() == o.kind() && a->options().activation() == o.activation() &&
                a->options().scaling() == o.scaling() &&
                a->adapter_down->weight.size(0) == first->adapter_down->weight.size(0),
            "save_adapter", "adapter at \"{}\" is set up unlike the one at \"{}\"", path,
            methods.front().first);
      targets.push_back(path);
      for (const auto& p : a->named_parameters())
        tensors.emplace_back(path + "." + p.key(), p.value());
    }
    config["peft_type"] = "BOTTLENECK_ADAPTER";
    config["adapter_kind"] = to_string(o.kind());
    config["bottleneck"] = first->adapter_down->weight.size(0);
    config["activation"] = o.activation();
    config["scaling"] = o.scaling();
    config["target_modules"] = targets;
  } else if (method == "bitfit") {
    std::vector<std::string> targets;
    for (auto& [path, m] : methods) {
      targets.push_back(path);
      tensors.emplace_back(path + ".bias", std::dynamic_pointer_cast<BitFitImpl>(m)->bias);
    }
    auto norms = detail::trainable_layer_norms(model);
    for (auto& p : detail::module_parameters(model, norms)) tensors.push_back(p);
    config["peft_type"] = "BITFIT";
    config["target_modules"] = targets;
    config["layer_norm_modules"] = norms;
  } else if (method == "propetl") {
    detail::save_propetl(methods, config, tensors);
  } else if (method == "compacter") {
    detail::save_compacter(methods, config, tensors);
  } else if (method == "fusion") {
    detail::save_fusion(methods, config, tensors);
  } else if (method == "lst") {
    detail::save_ladder(ladder_path, *ladder_model, config, tensors);
  } else {
    fail("save_adapter", "adapter \"{}\" is a {}, which has no file format (formats: {})", name,
         method, detail::adapter_format_types());
  }
  for (auto& [key, t] : detail::module_parameters(model, to_save)) {
    tensors.emplace_back(save_prefix + key, t);
  }
  for (auto& [key, t] : tensors) t = t.detach().to(torch::kCPU).contiguous();

  std::error_code ec;
  fs::create_directories(dir, ec);
  check(fs::is_directory(dir), "save_adapter", "cannot create folder {}", dir.string());
  io::save_safetensors(dir / detail::kAdapterWeights, tensors, {{"format", "pt"}});
  detail::write_text_atomically(dir / detail::kAdapterConfig, config.dump(2) + "\n");
}

/// Attaches the adapter in folder `dir` (written by save_adapter() or by Hugging Face PEFT's
/// save_pretrained) to `model` as `adapter_name`, with its weights, and loads its modules to save
/// into the model. Every key and shape is checked before the model is touched: a missing or
/// unexpected key, a shape mismatch or a setting peft does not support throws peft::Error naming
/// it, and leaves the model unchanged.
///
///     auto model = peft::models::BertForSequenceClassification::from_pretrained(base, 2);
///     peft::load_adapter(*model, "out/sst2-lora");
inline void load_adapter(torch::nn::Module& model, const std::filesystem::path& dir,
                         const std::string& adapter_name = "default") {
  namespace fs = std::filesystem;
  check(fs::is_directory(dir), "load_adapter", "adapter folder {} does not exist", dir.string());
  const auto config_path = dir / detail::kAdapterConfig;
  const auto weights_path = dir / detail::kAdapterWeights;
  check(fs::exists(config_path), "load_adapter", "{} not found", config_path.string());
  if (!fs::exists(weights_path)) {
    check(!fs::exists(dir / "adapter_model.bin"), "load_adapter",
          "{} has only adapter_model.bin; peft reads safetensors only", dir.string());
    fail("load_adapter", "{} not found", weights_path.string());
  }
  const std::string cfg_name = config_path.string();
  const auto config = io::read_json(config_path, "load_adapter");
  check(config.is_object(), "load_adapter", "{}: expected a JSON object", cfg_name);
  const auto peft_type = detail::config_value<std::string>(config, "peft_type", cfg_name);
  io::SafetensorsFile file(weights_path);

  auto [bert_path, bert] = detail::find_bert(model);
  auto sites = detail::sites_by_path(model);
  std::vector<detail::Slot> slots;
  // Each adapter type fills `slots`, `apply` (which attaches the method) and perhaps `finish`
  // (which runs once the tensors are in place).
  std::function<void()> apply;
  std::function<void()> finish;
  std::string save_prefix;

  // Methods created by apply(), by site path, to resolve slots' targets afterwards.
  auto method_at = [&model, adapter_name](
                       const std::string& path,
                       const std::string& method) -> std::shared_ptr<MethodImpl> {
    for (auto& [p, m] : attached_methods(model)) {
      if (p == path && m->adapter() == adapter_name && m->method() == method) return m;
    }
    fail("load_adapter", "internal: no {} attached at \"{}\"", method, path);
  };

  if (peft_type == "LORA") {
    save_prefix = "base_model.model.";
    const auto bias = detail::config_value_or<std::string>(config, "bias", "none", cfg_name);
    check(bias == "none", "load_adapter", "{}: LoRA bias \"{}\" is not supported (only \"none\")",
          cfg_name, bias);
    check(!detail::config_value_or<bool>(config, "use_dora", false, cfg_name), "load_adapter",
          "{}: DoRA (use_dora) is not supported", cfg_name);
    check(!detail::config_value_or<bool>(config, "fan_in_fan_out", false, cfg_name), "load_adapter",
          "{}: fan_in_fan_out is not supported", cfg_name);
    for (const char* key : {"rank_pattern", "alpha_pattern"}) {
      auto it = config.find(key);
      check(it == config.end() || it->is_null() || it->empty(), "load_adapter",
            "{}: {} (per-module ranks or alphas) is not supported", cfg_name, key);
    }
    const auto r = detail::config_value<int64_t>(config, "r", cfg_name);
    const auto alpha = detail::config_value<double>(config, "lora_alpha", cfg_name);
    const auto dropout = detail::config_value_or<double>(config, "lora_dropout", 0.0, cfg_name);
    const auto rslora = detail::config_value_or<bool>(config, "use_rslora", false, cfg_name);
    auto options = LoRAOptions(r).alpha(alpha).dropout(dropout).rslora(rslora);
    options.adapter_name(adapter_name);
    detail::validate_from_file(options, cfg_name);
    // The file's keys say which projections carry LoRA.
    std::map<std::string, std::string> ours;  // Hugging Face module path -> our site path
    for (auto& [path, site] : sites) {
      if (LoRAOptions::fits(*site))
        ours[detail::hf_module_path(path, bert_path, bert != nullptr)] = path;
    }
    std::vector<std::string> targets;
    for (const auto& key : file.names()) {
      if (key.compare(0, save_prefix.size(), save_prefix) != 0) continue;
      for (const char* suffix : {".lora_A.weight", ".lora_embedding_A"}) {
        const std::string s = suffix;
        if (key.size() <= save_prefix.size() + s.size() ||
            key.compare(key.size() - s.size(), s.size(), s) != 0) {
          continue;
        }
        const std::string module =
            key.substr(save_prefix.size(), key.size() - save_prefix.size() - s.size());
        auto it = ours.find(module);
        check(it != ours.end(), "load_adapter",
              "{}: key \"{}\" names module \"{}\", which is no projection of this model",
              file.path(), key, module);
        targets.push_back(it->second);
        auto site = sites[it->second];
        const bool embedding = site->kind() == SiteKind::Embedding;
        check(embedding == (s == ".lora_embedding_A"), "load_adapter",
              "{}: key \"{}\" does not fit the {} at \"{}\"", file.path(), key,
              to_string(site->kind()), it->second);
        const std::string stem = save_prefix + module;
        const std::string path = it->second;
        const int64_t in = site->in_features(), out = site->out_features();
        if (embedding) {
          slots.push_back({stem + ".lora_embedding_A", {r, in}, [&method_at, path] {
                             return std::dynamic_pointer_cast<LoRAImpl>(method_at(path, "lora"))
                                 ->lora_embedding_A;
                           }});
          slots.push_back({stem + ".lora_embedding_B", {out, r}, [&method_at, path] {
                             return std::dynamic_pointer_cast<LoRAImpl>(method_at(path, "lora"))
                                 ->lora_embedding_B;
                           }});
        } else {
          slots.push_back({stem + ".lora_A.weight", {r, in}, [&method_at, path] {
                             return std::dynamic_pointer_cast<LoRAImpl>(method_at(path, "lora"))
                                 ->lora_A->weight;
                           }});
          slots.push_back({stem + ".lora_B.weight", {out, r}, [&method_at, path] {
                             return std::dynamic_pointer_cast<LoRAImpl>(method_at(path, "lora"))
                                 ->lora_B->weight;
                           }});
        }
      }
    }
    check(!targets.empty(), "load_adapter", "{}: no LoRA weights (keys ending in .lora_A.weight)",
          file.path());
    options.targets(targets);
    apply = [&model, options] { attach(model, options); };
  } else if (peft_type == "PROMPT_TUNING" || peft_type == "PREFIX_TUNING") {
    save_prefix = "base_model.";
    const auto n = detail::config_value<int64_t>(config, "num_virtual_tokens", cfg_name);
    check(n > 0, "load_adapter", "{}: num_virtual_tokens must be positive, got {}", cfg_name, n);
    check(detail::config_value_or<int64_t>(config, "num_transformer_submodules", 1, cfg_name) == 1,
          "load_adapter", "{}: only encoder models (num_transformer_submodules 1) are supported",
          cfg_name);
    if (peft_type == "PROMPT_TUNING") {
      std::vector<SiteRef> inputs;
      for (auto& ref : find_sites(model)) {
        if (ref.site->kind() == SiteKind::Input) inputs.push_back(ref);
      }
      check(!inputs.empty(), "load_adapter", "{}: the model has no prompt site", cfg_name);
      SiteRef target = inputs.front();
      for (auto& ref : inputs) {
        if (ref.path == "prompt" || (bert != nullptr && ref.site.get() == bert->prompt.get())) {
          target = ref;
        }
      }
      const std::string path = target.path;
      slots.push_back({"prompt_embeddings", {n, target.site->out_features()}, [&method_at, path] {
                         return std::dynamic_pointer_cast<PromptImpl>(method_at(path, "prompt"))
                             ->prompt_embeddings;
                       }});
      auto options = PromptOptions(n);
      options.adapter_name(adapter_name);
      auto site = target.site;
      apply = [site, options] { attach_site(*site, options); };
    } else {
      check(!detail::config_value_or<bool>(config, "prefix_projection", false, cfg_name),
            "load_adapter",
            "{}: prefix_projection true is not supported (the file holds the MLP, not the rows)",
            cfg_name);
      auto all = detail::attention_sites(model);
      check(!all.empty(), "load_adapter", "{}: the model has no attention", cfg_name);
      const auto layers = detail::config_value<int64_t>(config, "num_layers", cfg_name);
      check(layers == static_cast<int64_t>(all.size()), "load_adapter",
            "{}: num_layers is {}, but the model has {} attentions", cfg_name, layers, all.size());
      const int64_t E = all.front().site->out_features();
      std::vector<std::string> paths;
      for (auto& ref : all) paths.push_back(ref.path);
      // The rows go to the prefixes after attaching; see the copy below.
      slots.push_back({"prompt_embeddings", {n, layers * 2 * E}, nullptr});
      auto options = PrefixOptions(n);
      options.adapter_name(adapter_name);
      options.targets(paths);
      apply = [&model, options] { attach(model, options); };
    }
  } else if (peft_type == "BOTTLENECK_ADAPTER") {
    const auto targets =
        detail::config_value<std::vector<std::string>>(config, "target_modules", cfg_name);
    const AdapterKind kind = detail::adapter_kind_from(
        detail::config_value<std::string>(config, "adapter_kind", cfg_name), cfg_name);
    auto options =
        AdapterOptions(kind)
            .bottleneck(detail::config_value<int64_t>(config, "bottleneck", cfg_name))
            .activation(detail::config_value<std::string>(config, "activation", cfg_name))
            .scaling(detail::config_value<double>(config, "scaling", cfg_name));
    options.adapter_name(adapter_name);
    options.targets(targets);
    detail::validate_from_file(options, cfg_name);
    const int64_t m = options.bottleneck();
    for (const auto& path : targets) {
      auto it = sites.find(path);
      check(it != sites.end() && AdapterOptions::fits(*it->second), "load_adapter",
            "{}: target \"{}\" is no block site of this model", cfg_name, path);
      const int64_t d = it->second->out_features();
      auto part = [&method_at, path](int which, bool weight) {
        return [&method_at, path, which, weight] {
          auto a = std::dynamic_pointer_cast<AdapterImpl>(method_at(path, "adapter"));
          auto& linear = which == 0 ? a->adapter_down : a->adapter_up;
          return weight ? linear->weight : linear->bias;
        };
      };
      slots.push_back({path + ".adapter_down.weight", {m, d}, part(0, true)});
      slots.push_back({path + ".adapter_down.bias", {m}, part(0, false)});
      slots.push_back({path + ".adapter_up.weight", {d, m}, part(1, true)});
      slots.push_back({path + ".adapter_up.bias", {d}, part(1, false)});
    }
    apply = [&model, options] { attach(model, options); };
  } else if (peft_type == "BITFIT") {
    const auto targets =
        detail::config_value<std::vector<std::string>>(config, "target_modules", cfg_name);
    const auto norms = detail::config_value_or<std::vector<std::string>>(
        config, "layer_norm_modules", {}, cfg_name);
    for (const auto& path : targets) {
      auto it = sites.find(path);
      check(it != sites.end() && BitFitOptions::fits(*it->second), "load_adapter",
            "{}: target \"{}\" is no projection site of this model", cfg_name, path);
      slots.push_back(
          {path + ".bias", {it->second->out_features()}, [&method_at, path] {
             return std::dynamic_pointer_cast<BitFitImpl>(method_at(path, "bitfit"))->bias;
           }});
    }
    auto modules = model.named_modules("", /*include_self=*/false);
    std::vector<torch::Tensor> norm_params;
    for (const auto& norm : norms) {
      check(modules.contains(norm) &&
                std::dynamic_pointer_cast<torch::nn::LayerNormImpl>(modules[norm]) != nullptr,
            "load_adapter",
            "{}: layer_norm_modules names \"{}\", which is no LayerNorm of this "
            "model",
            cfg_name, norm);
    }
    for (auto& [key, t] : detail::module_parameters(model, norms)) {
      auto tensor = t;
      slots.push_back({key, tensor.sizes().vec(), [tensor] { return tensor; }});
      norm_params.push_back(tensor);
    }
    auto options = BitFitOptions();
    options.adapter_name(adapter_name);
    options.targets(targets);
    apply = [&model, options, norm_params] {
      attach(model, options);
      for (auto t : norm_params) t.set_requires_grad(true);
    };
  } else if (peft_type == "PROPETL" || peft_type == "COMPACTER" || peft_type == "ADAPTER_FUSION" ||
             peft_type == "LADDER_SIDE_TUNING") {
    auto plan =
        peft_type == "PROPETL"     ? detail::plan_propetl(model, config, cfg_name, adapter_name)
        : peft_type == "COMPACTER" ? detail::plan_compacter(model, config, cfg_name, adapter_name)
        : peft_type == "ADAPTER_FUSION" ? detail::plan_fusion(model, config, cfg_name, adapter_name)
                                        : detail::plan_ladder(model, config, cfg_name);
    slots = std::move(plan.slots);
    apply = std::move(plan.apply);
    finish = std::move(plan.finish);
  } else {
    fail("load_adapter", "{}: peft_type \"{}\" is not supported ({})", cfg_name, peft_type,
         detail::adapter_format_types());
  }

  // Modules to save: every parameter of each listed module the model has.
  std::vector<std::string> to_save;
  if (auto it = config.find("modules_to_save"); it != config.end() && !it->is_null()) {
    to_save = detail::config_value<std::vector<std::string>>(config, "modules_to_save", cfg_name);
  }
  std::sort(to_save.begin(), to_save.end());
  to_save.erase(std::unique(to_save.begin(), to_save.end()), to_save.end());
  for (auto& [key, t] : detail::module_parameters(model, to_save)) {
    auto tensor = t;
    slots.push_back({save_prefix + key, tensor.sizes().vec(), [tensor] { return tensor; }});
  }

  detail::check_slots(file, slots);
  std::vector<torch::Tensor> values;
  for (const auto& slot : slots) {
    auto value = file.tensor(slot.key);
    values.push_back(slot.convert ? slot.convert(value, file.path()) : value);
  }

  apply();
  torch::NoGradGuard no_grad;
  for (size_t i = 0; i < slots.size(); ++i) {
    if (slots[i].target) {
      auto target = slots[i].target();
      target.copy_(values[i]);
      continue;
    }
    // Prefix rows: column block 2l holds layer l's keys, 2l + 1 its values.
    auto all = detail::attention_sites(model);
    const int64_t E = all.front().site->out_features();
    for (size_t l = 0; l < all.size(); ++l) {
      auto prefix = std::dynamic_pointer_cast<PrefixImpl>(method_at(all[l].path, "prefix"));
      prefix->prefix_keys.copy_(values[i].narrow(1, static_cast<int64_t>(2 * l) * E, E));
      prefix->prefix_values.copy_(values[i].narrow(1, static_cast<int64_t>(2 * l + 1) * E, E));
    }
  }
  if (finish) finish();
}

PEFT_NAMESPACE_END
