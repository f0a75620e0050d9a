// peft-lm-bench: the C++ side of bench/lm_vs_hf.sh on a Llama-family decoder (SmolLM2-135M from
// GGUF). One process measures one thing and prints one JSON line:
//
//   peft-lm-bench --mode lora --model F.gguf --inputs in.safetensors --adapter DIR
//       training step with the LoRA of DIR (a PEFT adapter): forward, causal-LM loss over every
//       position, backward, AdamW over the trainable parameters
//   peft-lm-bench --mode full --model F.gguf --inputs in.safetensors
//       the same step with every weight trained (full fine-tuning)
//   peft-lm-bench --mode lst --model F.gguf --inputs in.safetensors
//       the same step with a ladder side network beside the decoder (LadderOptions' defaults:
//       reduction 8, every layer, pruned start), the decoder without autograd
//   peft-lm-bench --mode generate --model F.gguf --inputs in.safetensors --new-tokens K
//       greedy generation of K tokens from the first row of input_ids, with the key/value cache
//
// Memory is the process's RSS: before the first step and the peak (ru_maxrss) at the end.

#include <peft/core/attach.hpp>
#include <peft/core/parameters.hpp>
#include <peft/io/adapter_format.hpp>
#include <peft/io/safetensors.hpp>
#include <peft/methods/lora.hpp>
#include <peft/models/llama.hpp>
#include <peft/models/llama_ladder.hpp>

#include <CLI/CLI.hpp>
#include <torch/optim/adamw.h>

#include <algorithm>
#include <chrono>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "measure.hpp"

using bench::current_rss_mb;
using bench::median;
using bench::peak_rss_mb;

int main(int argc, char** argv) {
  CLI::App app{"peft-lm-bench: a decoder's training step or generation, one JSON line"};
  std::string mode = "lora", model_path, inputs, adapter;
  int64_t steps = 5, warmup = 1, threads = 2, new_tokens = 32;
  double lr = 1e-4;
  app.add_option("--mode", mode)->check(CLI::IsMember({"lora", "full", "lst", "generate"}));
  app.add_option("--model", model_path, "GGUF file")->required();
  app.add_option("--inputs", inputs, "safetensors with input_ids [N, L]")->required();
  app.add_option("--adapter", adapter, "PEFT LoRA adapter folder (--mode lora)");
  app.add_option("--steps", steps)->check(CLI::PositiveNumber);
  app.add_option("--warmup", warmup)->check(CLI::NonNegativeNumber);
  app.add_option("--threads", threads);
  app.add_option("--lr", lr);
  app.add_option("--new-tokens", new_tokens)->check(CLI::PositiveNumber);
  CLI11_PARSE(app, argc, argv);
  try {
    if (threads > 0) torch::set_num_threads(static_cast<int>(threads));
    auto model = peft::models::Llama::from_pretrained(model_path);
    model->eval();  // no dropout in Llama; eval keeps both sides' steps deterministic
    auto ids = peft::io::SafetensorsFile(inputs).tensor("input_ids").clone();
    nlohmann::ordered_json out = {{"side", "cpp"}, {"mode", mode}};
    if (mode == "generate") {
      auto row = ids[0].contiguous();
      std::vector<int64_t> prompt(row.data_ptr<int64_t>(), row.data_ptr<int64_t>() + row.numel());
      // A stop token that cannot occur, so both sides generate exactly new_tokens tokens.
      auto options = peft::models::GenerateOptions().max_new_tokens(new_tokens).stop_tokens({-1});
      peft::models::generate(*model, prompt, options.max_new_tokens(2));  // warm-up
      const double before = current_rss_mb();
      const auto t0 = std::chrono::steady_clock::now();
      auto tokens = peft::models::generate(*model, prompt, options.max_new_tokens(new_tokens));
      const double ms =
          std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
      out["prompt_tokens"] = prompt.size();
      out["new_tokens"] = tokens.size();
      out["ms_per_token"] = ms / static_cast<double>(tokens.size());
      out["before_mb"] = before;
      out["peak_mb"] = peak_rss_mb();
      out["tokens"] = tokens;
      std::cout << out.dump() << std::endl;
      return 0;
    }
    if (mode == "lora") {
      peft::check(!adapter.empty(), "peft-lm-bench", "--mode lora needs --adapter");
      peft::load_adapter(*model, adapter);
    } else if (mode == "lst") {
      peft::models::attach_ladder(*model);
    } else {
      peft::unfreeze(*model);
    }
    auto params = peft::trainable_parameters(*model);
    torch::optim::AdamW optimizer(params, torch::optim::AdamWOptions(lr).weight_decay(0.0));
    const auto mask = torch::ones_like(ids);
    std::vector<double> times;
    double first_loss = 0;
    const double before = current_rss_mb();
    for (int64_t step = 0; step < warmup + steps; ++step) {
      const auto t0 = std::chrono::steady_clock::now();
      optimizer.zero_grad();
      auto loss = peft::models::causal_lm_loss(model->logits(model->forward(ids, mask)), ids);
      loss.backward();
      optimizer.step();
      const double ms =
          std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
      if (step == 0) first_loss = loss.item<double>();
      if (step >= warmup) times.push_back(ms);
    }
    out["batch"] = ids.size(0);
    out["seq"] = ids.size(1);
    out["step_ms"] = median(times);
    out["before_mb"] = before;
    out["peak_mb"] = peak_rss_mb();
    out["trainable"] = peft::count_parameters(*model).trainable;
    out["first_loss"] = first_loss;
    std::cout << out.dump() << std::endl;
    return 0;
  } catch (const std::exception& e) {
    std::cerr << e.what() << "\n";
    return 1;
  }
}
