#pragma once

// Reading typed values out of JSON configs with errors that name the file and the key, and
// writing numbers the way Python's json module does (16.0 as 16).

#include <cstdint>
#include <string>
#include <type_traits>

#include <nlohmann/json.hpp>

#include <peft/config.hpp>
#include <peft/core/error.hpp>

PEFT_NAMESPACE_BEGIN
namespace detail {

/// `value` as JSON; a float holding a whole number is written as an integer.
template <class T>
nlohmann::json number(T value) {
  if constexpr (std::is_floating_point_v<T>) {
    if (value == static_cast<double>(static_cast<int64_t>(value))) {
      return static_cast<int64_t>(value);
    }
  }
  return value;
}

/// config[key] as T; throws (from `where`, naming `file`) when it is missing, null or mistyped.
template <class T>
T config_value(const nlohmann::json& config, const char* key, const std::string& file,
               const char* where = "load_adapter") {
  auto it = config.find(key);
  check(it != config.end() && !it->is_null(), where, "{}: \"{}\" is missing", file, key);
  try {
    return it->get<T>();
  } catch (const nlohmann::json::exception&) {
    fail(where, "{}: \"{}\" has the wrong type ({})", file, key, it->dump());
  }
}

/// config[key] as T, or `fallback` when it is missing or null.
template <class T>
T config_value_or(const nlohmann::json& config, const char* key, T fallback,
                  const std::string& file, const char* where = "load_adapter") {
  auto it = config.find(key);
  if (it == config.end() || it->is_null()) return fallback;
  return config_value<T>(config, key, file, where);
}

/// Sets `out` to config[key] when the key is present and not null; a mistyped value throws (from
/// `where`, naming `file`). For configs whose fields all have defaults (config.json).
template <class T>
void config_read(const nlohmann::json& config, const char* key, T& out, const std::string& file,
                 const char* where) {
  auto it = config.find(key);
  if (it != config.end() && !it->is_null()) out = config_value<T>(config, key, file, where);
}

}  // namespace detail
PEFT_NAMESPACE_END
