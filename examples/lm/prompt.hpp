#pragma once
// peft-lm prompt: prompt-based classification of a GLUE or CLUE task with the decoder's own
// language-model head (templates, verbalizers, LM-BFF demonstrations, PET), next to a
// classification head trained on the same few examples. See docs/PROMPTING.md.

#include <CLI/CLI.hpp>

#include <cstdint>
#include <string>

namespace lm {

struct PromptArgs {
  std::string task, data_dir, template_text, verbalizer, word_score = "sum", demos = "random";
  std::string method = "lora", options, out, mode = "prompt";
  int64_t shots = 16, seeds = 5, first_seed = 1, epochs = 10, batch_size = 8, eval_max = 0;
  int64_t unlabeled = 500, eval_batch = 16, max_length = 256;
  double lr = 1e-3, head_lr = 1e-3, pet_temperature = 2.0;
  bool calibrate = false;
};

/// Registers the options of `peft-lm prompt` on `cmd`.
void add_prompt_options(CLI::App* cmd, PromptArgs& a);

/// Runs `peft-lm prompt`; prints one JSON object and returns the exit code.
int run_prompt(const std::string& model, const PromptArgs& a);

}  // namespace lm
