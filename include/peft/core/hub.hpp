#pragma once

// The interface through which a model family tells the rest of the library how the Hugging Face
// hub names its modules, so that io/ and the methods' file formats need not know any model.

#include <cstdint>
#include <string>

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

PEFT_NAMESPACE_END
