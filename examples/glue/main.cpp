// peft-glue: fine-tunes a pretrained BERT on one GLUE task with a chosen PEFT method.
//
//   peft-glue --task sst2 --data-dir glue_data/SST-2 --method lora --lora-r 8
//             --lora-alpha 16 --epochs 1 --max-train-samples 10000 --max-len 64
//             --output out/sst2-lora
//
// --data-dir is the task's folder of the official distribution (train.tsv, dev.tsv) or the
// glue_data folder holding it. MNLI is evaluated on dev_matched and dev_mismatched.
#include "../common/benchmark.hpp"

#include <peft/data/glue.hpp>

int main(int argc, char** argv) {
  namespace glue = peft::data::glue;
  finetune::Benchmark bench;
  bench.program = "peft-glue";
  bench.description = "Fine-tune a pretrained BERT on a GLUE task with a PEFT method";
  bench.tasks = glue::task_names();
  bench.task_info = [](const std::string& task) { return glue::task_info(task); };
  bench.folder = [](const std::string& task) { return glue::folder_name(task); };
  bench.eval_splits = [](const std::string& task) {
    return glue::task_info(task).name == "mnli"
               ? std::vector<std::string>{"dev_matched", "dev_mismatched"}
               : std::vector<std::string>{"dev"};
  };
  bench.has_split = [](const std::string&, const std::filesystem::path& dir,
                       const std::string& split) {
    std::error_code ec;
    return std::filesystem::exists(dir / (split + ".tsv"), ec);
  };
  bench.read = [](const std::string& task, const std::filesystem::path& dir,
                  const std::string& split, const peft::data::ReadOptions& options) {
    return glue::read(task, dir, split, options);
  };
  return finetune::run_program(bench, argc, argv);
}
