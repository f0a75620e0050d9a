#pragma once

// The interface through which a model family tells the rest of the library how the Hugging Face
// hub names its modules, so that io/ and the methods' file formats need not know any model.

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include <peft/config.hpp>

PEFT_NAMESPACE_BEGIN

/// How a model family names its modules on the Hugging Face hub. A model (models::Bert, ...)
/// implements it so that adapter files use the hub's module paths, which Python's PEFT expects,
/// without io/ knowing any model.
class HubModel {
 public:
  virtual ~HubModel() = default;
  /// The hub's path for one of this model's modules, given by its path below the model
  /// ("encoder.layers.3.self_attn.query" -> "encoder.layer.3.attention.self.query"); a path
  /// the hub has no other name for comes back unchanged.
  virtual std::string hub_module_path(const std::string& path) const { return path; }
  /// The folder or hub name the model was loaded from ("" when unknown).
  virtual std::string hub_name_or_path() const { return {}; }
  /// The number of attention heads (0 when the model has no attention).
  virtual int64_t hub_attention_heads() const { return 0; }
};

/// A task model whose trained head is more than one `classifier` child, or which has inference
/// settings of its own (models::BertEarlyExitForSequenceClassification: a head per layer, a
/// confidence predictor, an exit policy). save_adapter() writes its task_modules() with the
/// adapter when SaveAdapterOptions names no modules to save, and its task_settings() into
/// adapter_config.json; load_adapter() gives them back.
class TaskModel {
 public:
  virtual ~TaskModel() = default;
  /// Paths (below this model) of the trained modules stored with an adapter.
  virtual std::vector<std::string> task_modules() const = 0;
  /// Settings stored under "task_settings" in adapter_config.json; null for none.
  virtual nlohmann::json task_settings() const { return nullptr; }
  /// Checks `settings` read from `file` and returns what applies them; throws peft::Error naming
  /// the file and the setting before anything changes.
  virtual std::function<void()> plan_task_settings(const nlohmann::json& settings,
                                                   const std::string& file) {
    (void)settings;
    (void)file;
    return [] {};
  }
};

PEFT_NAMESPACE_END
