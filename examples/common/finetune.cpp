// The fine-tuning program shared by peft-glue and peft-clue, compiled once for both.
#include "finetune.hpp"

int finetune::run_program(const Benchmark& bench, int argc, char** argv) {
  return finetune::main(bench, argc, argv);
}
