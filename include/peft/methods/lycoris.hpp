#pragma once

// What LoHa and LoKr (the LyCORIS methods Hugging Face PEFT has) share in their adapter files:
// the options read from a config (r, alpha, targets; the settings peft does not implement must be
// off), the config fields written, and the check that every site of an adapter has the same r
// and alpha. Registers no method: each of the two includes it.

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include <peft/config.hpp>
#include <peft/core/error.hpp>
#include <peft/core/registry.hpp>
#include <peft/detail/json.hpp>

PEFT_NAMESPACE_BEGIN
namespace detail {

/// LyCORIS-style options from JSON (Hugging Face's LoHaConfig/LoKrConfig names): r, alpha,
/// target_modules, layers_to_transform; the dropouts and convolution settings peft does not
/// implement must be off.
template <class Options>
Options lycoris_options_from_json(const nlohmann::json& config, const std::string& file,
                                  const char* where) {
  for (const char* key : {"rank_dropout", "module_dropout"}) {
    check(config_value_or<double>(config, key, 0.0, file, where) == 0.0, where,
          "{}: {} is not supported (only 0)", file, key);
  }
  for (const char* key : {"rank_pattern", "alpha_pattern"}) {
    KeyLog::note(key);
    auto it = config.find(key);
    check(it == config.end() || it->is_null() || it->empty(), where,
          "{}: {} (per-module ranks or alphas) is not supported", file, key);
  }
  Options options(config_value_or<int64_t>(config, "r", 8, file, where));
  options.alpha(config_value_or<double>(config, "alpha", 8.0, file, where));
  targets_from_json(config, options, file, where);
  validate_from_file(options, file);
  return options;
}

/// The config fields LoHa and LoKr files share.
inline void lycoris_config(int64_t r, double alpha, const std::vector<std::string>& targets,
                           nlohmann::json& config) {
  config["r"] = r;
  config["alpha"] = number(alpha);
  config["rank_dropout"] = 0.0;
  config["module_dropout"] = 0.0;
  config["use_effective_conv2d"] = false;
  config["init_weights"] = true;
  config["rank_pattern"] = nlohmann::json::object();
  config["alpha_pattern"] = nlohmann::json::object();
  config["target_modules"] = targets;
}

/// The settings one LoHa or LoKr file holds for all its sites (for shared_setting).
template <class Options>
std::string rank_alpha_setting(const Options& o) {
  return fmt::format("r={} alpha={}", o.r(), o.alpha());
}

/// The option keys LoHa and LoKr read (lycoris_options_from_json); LoKr adds its own.
inline std::vector<std::string> lycoris_option_keys() {
  return {"r",
          "alpha",
          "target_modules",
          "layers_to_transform",
          "rank_dropout",
          "module_dropout",
          "rank_pattern",
          "alpha_pattern"};
}

}  // namespace detail
PEFT_NAMESPACE_END
