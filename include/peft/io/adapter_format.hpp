#pragma once

// Adapter files: `adapter_config.json` + `adapter_model.safetensors` in a folder, as Hugging Face
// PEFT writes them. This is the frame: which adapter, which method, the modules saved with it,
// checking every key and shape before the model changes, and writing both files atomically. What
// a method stores comes from its registry entry (core/registry.hpp), next to the method in
// methods/<m>.hpp: LoRA, prefix tuning and prompt tuning use PEFT's own key names and config
// fields, so the folders load with `PeftModel.from_pretrained` and PEFT's folders load here; the
// methods PEFT does not have use the same two files with peft's own `peft_type` and module paths
// (see docs/ADAPTER_FORMAT.md). Module paths go through the model's HubModel (models/bert.hpp
// gives Hugging Face BERT's names), so io knows no model.

#include <torch/arg.h>
#include <torch/nn/module.h>
#include <torch/types.h>

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include <peft/config.hpp>
#include <peft/core/attach.hpp>
#include <peft/core/error.hpp>
#include <peft/core/registry.hpp>
#include <peft/core/site.hpp>
#include <peft/detail/json.hpp>
#include <peft/io/hf_config.hpp>
#include <peft/io/safetensors.hpp>

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

namespace detail {

inline constexpr const char* kAdapterConfig = "adapter_config.json";
inline constexpr const char* kAdapterWeights = "adapter_model.safetensors";

/// The model's HubModel (it or the first module inside that is one) and its path.
inline std::pair<std::string, const HubModel*> find_hub_model(torch::nn::Module& model) {
  for (const auto& item : model.named_modules("", /*include_self=*/true)) {
    if (auto* hub = dynamic_cast<const HubModel*>(item.value().get())) return {item.key(), hub};
  }
  return {"", nullptr};
}

/// Maps a site path of `model` to the hub's module path through the model's HubModel: the part
/// below the HubModel is renamed, the part above kept ("bert.encoder.layers.3.self_attn.query"
/// -> "bert.encoder.layer.3.attention.self.query"). Without a HubModel paths stay as they are.
inline std::function<std::string(const std::string&)> hub_path_mapper(torch::nn::Module& model) {
  auto [base, hub] = find_hub_model(model);
  if (hub == nullptr) return [](const std::string& path) { return path; };
  return [base = base, hub = hub](const std::string& path) {
    if (base.empty()) return hub->hub_module_path(path);
    const std::string prefix = base + ".";
    if (path.compare(0, prefix.size(), prefix) != 0) return path;
    return prefix + hub->hub_module_path(path.substr(prefix.size()));
  };
}

inline bool has_module(torch::nn::Module& model, const std::string& name) {
  return model.named_modules("", /*include_self=*/false).contains(name);
}

/// The peft_types load_adapter() reads, for error messages.
inline std::string adapter_format_types() {
  std::vector<std::string> types;
  for (const auto& e : registered_methods()) {
    if (e.format && e.format->reads) types.push_back(e.format->peft_type);
    if (e.format) {
      for (const auto& t : e.format->also_reads) types.push_back(t);
    }
  }
  return fmt::format("supported: {}", fmt::join(types, ", "));
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

}  // namespace detail

/// Writes the adapter `options.adapter_name()` of `model` to the folder `dir` (created if needed):
/// `adapter_config.json` and `adapter_model.safetensors`, each replaced atomically. The adapter
/// must consist of one method with a file format (see adapter_formats(); P-tuning is written as
/// the prompt rows its encoder produces, PEFT's PROMPT_TUNING, and loads back as prompt tuning;
/// an AdapterFusion file holds the fusion layers, each fused adapter is saved on its own); the
/// modules to save (by default a TaskModel's task_modules(), else a `classifier` head) are
/// written with it, and a TaskModel's settings go into adapter_config.json as "task_settings". A
/// model-level method (a models::BertLadderForSequenceClassification's ladder) is saved when no
/// attached method has that adapter name. The model is not changed.
///
///     peft::save_adapter(*model, "out/sst2-lora");
inline void save_adapter(torch::nn::Module& model, const std::filesystem::path& dir,
                         const SaveAdapterOptions& options = SaveAdapterOptions()) {
  namespace fs = std::filesystem;
  const std::string& name = options.adapter_name();
  SiteMethods methods;
  std::set<std::string> kinds;
  for (auto& [path, m] : attached_methods(model)) {
    if (m->adapter() != name) continue;
    methods.emplace_back(path, m);
    kinds.insert(m->method());
  }
  check(kinds.size() <= 1, "save_adapter",
        "adapter \"{}\" combines {}; an adapter file holds one method (give each its own "
        "adapter_name)",
        name, fmt::format("{}", fmt::join(kinds, " and ")));
  std::optional<MethodEntry> entry;
  if (!kinds.empty()) {
    entry = find_method(*kinds.begin());
  } else {
    for (auto& e : registered_methods()) {
      if (e.held_by && e.held_by(model)) {
        entry = e;
        break;
      }
    }
    if (!entry) {
      auto known = adapter_names(model);
      fail("save_adapter", "no adapter named \"{}\"; attached: {}", name,
           known.empty() ? std::string("(none)") : fmt::format("{}", fmt::join(known, ", ")));
    }
  }
  const std::string method = kinds.empty() ? entry->name : *kinds.begin();
  if (!entry || !entry->format) {
    fail("save_adapter", "adapter \"{}\" is a {}, which has no file format ({})", name, method,
         detail::adapter_format_types());
  }

  auto [hub_base, hub] = detail::find_hub_model(model);
  auto [task_path, task] = detail::find_module<TaskModel>(model);
  std::vector<std::string> to_save;
  if (options.modules_to_save()) {
    to_save = *options.modules_to_save();
    for (const auto& m : to_save) {
      check(detail::has_module(model, m), "save_adapter",
            "modules_to_save: the model has no \"{}\"", m);
    }
  } else if (task != nullptr) {
    for (const auto& m : task->task_modules())
      to_save.push_back(task_path.empty() ? m : task_path + "." + m);
  } else if (detail::has_module(model, "classifier")) {
    to_save = {"classifier"};
  }
  const bool classifier =
      task != nullptr || std::find(to_save.begin(), to_save.end(), "classifier") != to_save.end();
  std::string base = options.base_model_name_or_path();
  if (base.empty() && hub != nullptr) base = hub->hub_name_or_path();

  nlohmann::json config;
  config["base_model_name_or_path"] = base.empty() ? nlohmann::json() : nlohmann::json(base);
  config["task_type"] = classifier ? "SEQ_CLS" : "FEATURE_EXTRACTION";
  config["modules_to_save"] = to_save.empty() ? nlohmann::json() : nlohmann::json(to_save);
  config["inference_mode"] = true;
  config["revision"] = nullptr;
  config["peft_library"] = "peft-cpp";
  config["peft_type"] = entry->format->peft_type;
  if (task != nullptr) {
    if (auto settings = task->task_settings(); !settings.is_null())
      config["task_settings"] = settings;
  }

  NamedTensors tensors;
  torch::NoGradGuard no_grad;
  SaveContext context{model,
                      name,
                      methods,
                      config,
                      tensors,
                      "",
                      detail::hub_path_mapper(model),
                      hub != nullptr ? hub->hub_attention_heads() : 0};
  entry->format->save(context);
  for (auto& [key, t] : detail::module_parameters(model, to_save)) {
    tensors.emplace_back(context.save_prefix + key, t);
  }
  for (auto& [key, t] : tensors) t = t.detach().to(torch::kCPU).contiguous();

  std::error_code ec;
  fs::create_directories(dir, ec);
  check(fs::is_directory(dir), "save_adapter", "cannot create folder {}", dir.string());
  io::save_safetensors(dir / detail::kAdapterWeights, tensors, {{"format", "pt"}});
  const std::string text = config.dump(2) + "\n";
  io::write_file_atomically(dir / detail::kAdapterConfig, {text}, "save_adapter");
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

  std::optional<MethodEntry> entry;
  for (auto& e : registered_methods()) {
    if (!e.format) continue;
    const auto& also = e.format->also_reads;
    if (!(e.format->reads && e.format->peft_type == peft_type) &&
        std::find(also.begin(), also.end(), peft_type) == also.end()) {
      continue;
    }
    if (e.format->claims) {
      if (e.format->claims(config)) {
        entry = e;
        break;
      }
    } else if (!entry) {
      entry = e;
    }
  }
  if (!entry) {
    fail("load_adapter", "{}: peft_type \"{}\" is not supported ({})", cfg_name, peft_type,
         detail::adapter_format_types());
  }
  LoadContext context{model,
                      config,
                      cfg_name,
                      file.path(),
                      file.names(),
                      adapter_name,
                      detail::hub_path_mapper(model)};
  LoadPlan plan = entry->format->load(context);

  // Modules to save: every parameter of each listed module the model has.
  std::vector<std::string> to_save;
  if (auto it = config.find("modules_to_save"); it != config.end() && !it->is_null()) {
    to_save = detail::config_value<std::vector<std::string>>(config, "modules_to_save", cfg_name);
  }
  std::sort(to_save.begin(), to_save.end());
  to_save.erase(std::unique(to_save.begin(), to_save.end()), to_save.end());
  for (auto& [key, t] : detail::module_parameters(model, to_save)) {
    auto tensor = t;
    plan.slots.push_back(
        {plan.save_prefix + key, tensor.sizes().vec(), [tensor] { return tensor; }});
  }

  // The task model's own settings (an early-exit policy), checked before anything changes.
  std::function<void()> apply_settings;
  if (auto it = config.find("task_settings"); it != config.end() && !it->is_null()) {
    auto [task_path, task] = detail::find_module<TaskModel>(model);
    check(task != nullptr, "load_adapter",
          "{}: the adapter has task_settings for a task model (a peft::TaskModel), which this "
          "model neither is nor contains",
          cfg_name);
    apply_settings = task->plan_task_settings(*it, cfg_name);
  }
  detail::check_slots(file, plan.slots);
  std::vector<torch::Tensor> values;
  for (const auto& slot : plan.slots) {
    auto value = file.tensor(slot.key);
    values.push_back(slot.convert ? slot.convert(value, file.path()) : value);
  }

  plan.apply();
  torch::NoGradGuard no_grad;
  for (size_t i = 0; i < plan.slots.size(); ++i) {
    auto target = plan.slots[i].target();
    target.copy_(values[i]);
  }
  if (plan.finish) plan.finish();
  if (apply_settings) apply_settings();
}

PEFT_NAMESPACE_END
