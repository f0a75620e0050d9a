#pragma once

// What peft-glue and peft-clue tell the shared fine-tuning program about their benchmark. This
// header is light (no LibTorch), so the two programs' own files compile in seconds and the heavy
// program (finetune.hpp) is compiled once, in finetune.cpp.

#include <peft/data/example.hpp>

#include <filesystem>
#include <functional>
#include <string>
#include <vector>

namespace finetune {

/// What a program needs to know about its benchmark.
struct Benchmark {
  /// The program's name, used in messages ("peft-glue").
  std::string program;
  /// One line for --help.
  std::string description;
  /// The model used without --model: "minilm" (all-MiniLM-L6-v2) or "e5" (multilingual-e5-small);
  /// see examples::default_model_dir.
  std::string default_model = "minilm";
  /// Canonical task names, for --help and the error on an unknown task.
  std::vector<std::string> tasks;
  /// Labels, metrics and pairing of a task (throws peft::Error on an unknown one).
  std::function<peft::data::TaskInfo(const std::string&)> task_info;
  /// The task's folder name under a benchmark root ("SST-2" for sst2), so --data-dir may name
  /// either the task's folder or its parent.
  std::function<std::string(const std::string&)> folder;
  /// The splits evaluated when --eval-split is not given (MNLI: both dev sets).
  std::function<std::vector<std::string>(const std::string&)> eval_splits;
  /// Whether the task's folder has a file for the split (CoLA, RTE and STS-B are often
  /// distributed without dev).
  std::function<bool(const std::string& task, const std::filesystem::path& dir,
                     const std::string& split)>
      has_split;
  /// Reads one split of a task from the task's folder.
  std::function<std::vector<peft::data::Example>(
      const std::string& task, const std::filesystem::path& dir, const std::string& split,
      const peft::data::ReadOptions&)>
      read;
};

/// Parses the command line and runs one fine-tuning job on `bench` (defined in finetune.cpp;
/// see finetune::main in finetune.hpp).
int run_program(const Benchmark& bench, int argc, char** argv);

}  // namespace finetune
