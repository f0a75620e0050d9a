#pragma once

// Reading typed values out of JSON configs with errors that name the file and the key, and
// writing numbers the way Python's json module does (16.0 as 16).

#include <cmath>
#include <cstdint>
#include <limits>
#include <set>
#include <string>
#include <type_traits>

#include <nlohmann/json.hpp>

#include <peft/config.hpp>
#include <peft/core/error.hpp>

PEFT_NAMESPACE_BEGIN
namespace detail {

/// While a KeyLog lives, every key the readers below (and the methods' own look-ups) ask a
/// config for on this thread is added to it, whether the config has it or not. The tests use it
/// to check that the option keys a method declares are exactly the keys it reads.
class KeyLog {
 public:
  KeyLog() : previous_(current()) { current() = this; }
  ~KeyLog() { current() = previous_; }
  KeyLog(const KeyLog&) = delete;
  KeyLog& operator=(const KeyLog&) = delete;

  const std::set<std::string>& keys() const { return keys_; }
  /// Adds `key` to the innermost live log, if any.
  static void note(const std::string& key) {
    if (auto* log = current()) log->keys_.insert(key);
  }

 private:
  static KeyLog*& current() {
    thread_local KeyLog* log = nullptr;
    return log;
  }
  KeyLog* previous_;
  std::set<std::string> keys_;
};

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
  KeyLog::note(key);
  auto it = config.find(key);
  check(it != config.end() && !it->is_null(), where, "{}: \"{}\" is missing", file, key);
  if constexpr (std::is_integral_v<T> && !std::is_same_v<T, bool>) {
    // nlohmann converts a float or an out-of-range integer to T unchecked (a float beyond T's
    // range is undefined behaviour): only whole numbers within T's range are accepted.
    bool fits = false;
    if (it->is_number_float()) {
      const double v = it->get<double>();
      // T's range is [lowest, 2^digits): both bounds are exact in a double.
      fits = std::isfinite(v) && v == std::floor(v) &&
             v >= static_cast<double>(std::numeric_limits<T>::lowest()) &&
             v < std::ldexp(1.0, std::numeric_limits<T>::digits);
    } else if (it->is_number_unsigned()) {
      fits = it->get<uint64_t>() <= static_cast<uint64_t>(std::numeric_limits<T>::max());
    } else if (it->is_number_integer()) {
      const int64_t v = it->get<int64_t>();
      fits = std::is_signed_v<T>
                 ? (v >= static_cast<int64_t>(std::numeric_limits<T>::lowest()) &&
                    v <= static_cast<int64_t>(std::numeric_limits<T>::max()))
                 : (v >= 0 && static_cast<uint64_t>(v) <=
                                  static_cast<uint64_t>(std::numeric_limits<T>::max()));
    } else {
      fail(where, "{}: \"{}\" has the wrong type ({}), expected a whole number", file, key,
           it->dump());
    }
    check(fits, where, "{}: \"{}\" is {}, not a whole number in [{}, {}]", file, key, it->dump(),
          std::numeric_limits<T>::lowest(), std::numeric_limits<T>::max());
    if (it->is_number_float()) return static_cast<T>(it->get<double>());
    if (it->is_number_unsigned()) return static_cast<T>(it->get<uint64_t>());
    return static_cast<T>(it->get<int64_t>());
  }
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
  KeyLog::note(key);
  auto it = config.find(key);
  if (it == config.end() || it->is_null()) return fallback;
  return config_value<T>(config, key, file, where);
}

/// Sets `out` to config[key] when the key is present and not null; a mistyped value throws (from
/// `where`, naming `file`). For configs whose fields all have defaults (config.json).
template <class T>
void config_read(const nlohmann::json& config, const char* key, T& out, const std::string& file,
                 const char* where) {
  KeyLog::note(key);
  auto it = config.find(key);
  if (it != config.end() && !it->is_null()) out = config_value<T>(config, key, file, where);
}

/// `value` rounded to `digits` decimals, for reports. Dividing by the power of ten (not
/// multiplying by 0.1) gives the double that prints as the short decimal.
inline double round_to(double value, int digits) {
  const double scale = std::pow(10.0, digits);
  return std::round(value * scale) / scale;
}

/// A number for a JSON report: JSON has no NaN, so a non-finite value becomes null.
inline nlohmann::ordered_json json_number(double value) {
  return std::isfinite(value) ? nlohmann::ordered_json(value) : nlohmann::ordered_json(nullptr);
}

}  // namespace detail
PEFT_NAMESPACE_END
