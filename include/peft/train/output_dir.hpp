#pragma once

// The output-folder policy of a training run. A run appends to metrics.jsonl and --resume picks
// up the newest checkpoint, so a fresh run must not mix into what an earlier run left in the same
// folder: it is refused unless the caller resumes (keep everything) or overwrites (remove what an
// earlier run wrote, and only that: other files in the folder stay).
//
//     peft::prepare_output_dir("out/sst2", peft::OutputDirOptions().overwrite(true));

#include <torch/arg.h>

#include <algorithm>
#include <filesystem>
#include <string>
#include <system_error>
#include <vector>

#include <peft/config.hpp>
#include <peft/core/error.hpp>

PEFT_NAMESPACE_BEGIN

/// Whether a file or folder named `name` is something a training run writes into its output
/// folder: checkpoint-<step>, best, metrics.jsonl, result.json and the saved adapter or model
/// (adapter_config.json, adapter_model.safetensors, model.safetensors).
inline bool is_run_output(const std::string& name) {
  for (const char* f : {"best", "metrics.jsonl", "result.json", "adapter_config.json",
                        "adapter_model.safetensors", "model.safetensors"}) {
    if (name == f) return true;
  }
  return name.rfind("checkpoint-", 0) == 0;
}

/// How prepare_output_dir() treats an earlier run in the folder.
struct OutputDirOptions {
  /// The run continues the one in the folder: everything stays.
  TORCH_ARG(bool, resume) = false;
  /// Remove what an earlier run wrote (is_run_output) before starting.
  TORCH_ARG(bool, overwrite) = false;
  /// Who is asking, in error messages ("[peft::<where>] ...").
  TORCH_ARG(std::string, where) = "output_dir";
  /// What the error suggests when an earlier run is found.
  TORCH_ARG(std::string, hint) = "resume it or overwrite it";
};

/// Checks and prepares `dir` for a run: nothing to do for an empty path, a missing folder or a
/// resumed run; an error when `dir` is a file, or holds an earlier run (is_run_output) and
/// neither resume nor overwrite is set; with overwrite, the earlier run's files are removed.
/// Returns the paths removed.
inline std::vector<std::filesystem::path> prepare_output_dir(const std::filesystem::path& dir,
                                                             const OutputDirOptions& options = {}) {
  namespace fs = std::filesystem;
  if (dir.empty()) return {};
  std::error_code ec;
  check(!fs::exists(dir, ec) || fs::is_directory(dir, ec), options.where(),
        "{} is a file, expected a folder", dir.string());
  if (options.resume() || !fs::is_directory(dir, ec)) return {};
  std::vector<fs::path> earlier;
  for (const auto& entry : fs::directory_iterator(dir, ec)) {
    if (is_run_output(entry.path().filename().string())) earlier.push_back(entry.path());
  }
  check(!ec, options.where(), "cannot list {}: {}", dir.string(), ec.message());
  if (earlier.empty()) return {};
  std::sort(earlier.begin(), earlier.end());
  check(options.overwrite(), options.where(), "{} holds an earlier run ({}); {}", dir.string(),
        earlier.front().filename().string(), options.hint());
  for (const auto& p : earlier) {
    fs::remove_all(p, ec);
    check(!ec, options.where(), "cannot remove {}: {}", p.string(), ec.message());
  }
  return earlier;
}

PEFT_NAMESPACE_END
