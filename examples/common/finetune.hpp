#pragma once

// The command line of peft-glue and peft-clue around the library's peft::TextClassifier, which
// does the work (model and method, batching, training, evaluation, early exit, saving): the flags
// and the task's recipe (models/recipes.hpp) become TextClassifierOptions, the benchmark's files
// give the training rows and the evaluation splits (a holdout carved from train when the dev file
// is missing), and the run ends with one JSON result line (also result.json in --output). --nproc
// relaunches the program as that many data-parallel ranks. The two programs differ only in the
// Benchmark they pass: how tasks are named, described and read.

#include "benchmark.hpp"

#include <peft/peft.hpp>
#include <peft/data/split.hpp>
#include <peft/models/recipes.hpp>
#include <peft/tasks/exit_sweep.hpp>
#include <peft/tasks/text_classifier.hpp>
#include <peft/train/distributed.hpp>
#include <peft/train/launch.hpp>
#include "model_path.hpp"

#include <torch/torch.h>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <exception>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace finetune {

namespace fs = std::filesystem;

/// Everything the command line sets.
struct Options {
  std::string task, data_dir, model, method = "lora", output, device = "cpu", pooling = "cls";
  std::string precision = "fp32", train_split = "train";
  std::vector<std::string> eval_splits;
  int64_t epochs = 1, max_steps = 0, batch_size = 32, eval_batch_size = 64, max_len = 128;
  bool group_by_length = true;
  int64_t max_train_samples = 0, max_eval_samples = 0, seed = 42, eval_every = 0, threads = 0;
  int64_t save_every = 0;
  double lr = 0, head_lr = 0, weight_decay = 0.01, warmup_ratio = 0.06, grad_clip = 1.0;
  /// --holdout: share of the training rows carved out for validation (--eval-split holdout).
  double holdout = 0.15;
  bool resume = false, overwrite = false, train_pooler = false;
  /// --nproc: processes on this machine, data parallel (1: this process alone).
  int64_t nproc = 1;
  /// --master-port: port of rank 0's store for --nproc (0: a free one).
  int64_t master_port = 0;
  /// --model-dropout: below 0, the config's dropout stays.
  double model_dropout = -1;
  // Early exit
  std::string early_exit = "none", exit_from;
  std::vector<double> exit_thresholds;
  // LoRA
  int64_t lora_r = 8;
  double lora_alpha = 16, lora_dropout = 0.0;
  std::vector<std::string> lora_targets{"query", "value"};
  bool lora_rslora = false;
  /// LoRA+: B matrices learn at lr times this (0: at lr, like A).
  double lora_plus_ratio = 0;
  /// --method-options: JSON options of the method (the keys its registry entry lists, named as in
  /// its adapter_config.json), e.g. {"r": 4, "lora_alpha": 8}; they win over the method's flags
  /// (method_flags()).
  std::string method_options = "{}";
  // Bottleneck adapters
  std::string adapter_kind = "houlsby", adapter_activation = "relu";
  int64_t adapter_reduction = 16;
  // BitFit
  bool bitfit_layer_norm = false;
  // Prefix tuning
  int64_t prefix_tokens = 20, prefix_hidden = 512;
  bool prefix_projection = false;
  // Prompt tuning
  int64_t prompt_tokens = 20;
  std::string prompt_init = "vocab";
  // P-tuning
  int64_t ptuning_tokens = 20, ptuning_hidden = 0;
  std::string ptuning_encoder = "mlp";
  // ProPETL
  std::string propetl_base = "adapter";
  double propetl_keep_ratio = 0.5, propetl_mask_lr = 1e-2;
  // Ladder side-tuning
  int64_t lst_reduction = 8;
  std::vector<int64_t> lst_layers;
  std::string lst_block = "transformer_encoder_layer", lst_init = "magnitude";
  int64_t lst_fisher_batches = 8;
  /// --lst-dropout: below 0, the side network takes --model-dropout's rate (or the config's).
  double lst_dropout = -1;
};

/// Methods this build can train: every registered method (peft::method_names()) but AdapterFusion,
/// which combines adapters trained before, and full fine-tuning.
inline const std::vector<std::string>& available_methods() {
  static const std::vector<std::string> methods = [] {
    std::vector<std::string> out;
    for (const auto& name : peft::method_names()) {
      if (name != "fusion") out.push_back(name);
    }
    out.push_back("full");
    return out;
  }();
  return methods;
}

/// "lora 0.001, ..., full 5e-05": every trainable method's default rate (its registry entry), for
/// --help.
inline std::string default_lrs() {
  std::string out;
  for (const auto& m : available_methods()) {
    out +=
        fmt::format("{}{} {:g}", out.empty() ? "" : ", ", m, peft::TextClassifier::default_lr(m));
  }
  return out;
}

/// One command-line flag of the methods' options: the key it sets in the JSON options of the
/// methods that read it (their adapter_config.json names, as the registry's attach takes them),
/// and its value, or null where it does not apply (ProPETL's rank with an adapter prototype).
/// Every method is attached through the registry with these options.
struct MethodFlag {
  const char* flag;
  const char* key;
  std::vector<std::string> methods;
  std::function<nlohmann::json(const Options&)> value;
};

/// Upper case: Hugging Face's enum values (prompt_tuning_init "VOCAB", "LSTM").
inline std::string upper(std::string s) {
  for (auto& c : s) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  return s;
}

/// The flags of method_flags(): which method reads which key.
inline const std::vector<MethodFlag>& method_flags() {
  using J = nlohmann::json;
  // The LoRA, adapter and prefix flags set ProPETL's prototype only when it is of that kind.
  auto lora_base = [](const Options& o) {
    return o.method != "propetl" || o.propetl_base == "lora";
  };
  auto adapter_base = [](const Options& o) {
    return o.method != "propetl" || o.propetl_base == "adapter";
  };
  auto prefix_base = [](const Options& o) {
    return o.method != "propetl" || o.propetl_base == "prefix";
  };
  // A flag whose value goes into the JSON as it is; the same where `applies` says so.
  auto member = [](auto Options::*field) {
    return [field](const Options& o) { return J(o.*field); };
  };
  auto member_if = [](auto applies, auto Options::*field) {
    return [applies, field](const Options& o) { return applies(o) ? J(o.*field) : J(); };
  };
  // clang-format off
  static const std::vector<MethodFlag> flags{
    {"--lora-r", "r", {"lora", "dora", "propetl"},
     member_if(lora_base, &Options::lora_r)},
    {"--lora-alpha", "lora_alpha", {"lora", "dora", "propetl"},
     member_if(lora_base, &Options::lora_alpha)},
    {"--lora-dropout", "lora_dropout", {"lora", "dora"}, member(&Options::lora_dropout)},
    {"--lora-rslora", "use_rslora", {"lora", "dora"}, member(&Options::lora_rslora)},
    {"--lora-targets", "target_modules", {"lora", "dora", "propetl"},
     member_if(lora_base, &Options::lora_targets)},
    {"--lora-plus-ratio", "loraplus_lr_ratio", {"lora", "dora"},
     [](const Options& o) { return o.lora_plus_ratio > 0 ? J(o.lora_plus_ratio) : J(); }},
    {"--adapter-kind", "adapter_kind", {"adapter"}, member(&Options::adapter_kind)},
    {"--adapter-reduction", "reduction_factor", {"adapter", "propetl"},
     member_if(adapter_base, &Options::adapter_reduction)},
    {"--adapter-activation", "activation", {"adapter", "propetl"},
     member_if(adapter_base, &Options::adapter_activation)},
    {"--bitfit-layer-norm", "layer_norm", {"bitfit"}, member(&Options::bitfit_layer_norm)},
    {"--prefix-tokens", "num_virtual_tokens", {"prefix", "propetl"},
     member_if(prefix_base, &Options::prefix_tokens)},
    {"--prefix-projection", "prefix_projection", {"prefix"}, member(&Options::prefix_projection)},
    {"--prefix-hidden", "encoder_hidden_size", {"prefix"}, member(&Options::prefix_hidden)},
    {"--prompt-tokens", "num_virtual_tokens", {"prompt"}, member(&Options::prompt_tokens)},
    {"--prompt-init", "prompt_tuning_init", {"prompt"},
     [](const Options& o) { return J(upper(o.prompt_init)); }},
    {"--ptuning-tokens", "num_virtual_tokens", {"ptuning"}, member(&Options::ptuning_tokens)},
    {"--ptuning-encoder", "encoder_reparameterization_type", {"ptuning"},
     [](const Options& o) { return J(upper(o.ptuning_encoder)); }},
    {"--ptuning-hidden", "encoder_hidden_size", {"ptuning"}, member(&Options::ptuning_hidden)},
    {"--propetl-base", "base", {"propetl"}, member(&Options::propetl_base)},
    {"--propetl-keep-ratio", "keep_ratio", {"propetl"}, member(&Options::propetl_keep_ratio)},
    {"--propetl-mask-lr", "mask_lr", {"propetl"}, member(&Options::propetl_mask_lr)},
  };
  // clang-format on
  // The table must agree with the registry: a key a listed method does not read would be refused
  // by its attach, for every run of that method, whether or not the flag was given.
  static const bool checked = [] {
    for (const auto& f : flags) {
      for (const auto& m : f.methods) {
        const auto keys = peft::method_entry(m).option_keys;
        peft::check(std::find(keys.begin(), keys.end(), f.key) != keys.end(), "method flags",
                    "{} sets option \"{}\", which method {} does not read (its keys: {})", f.flag,
                    f.key, m, fmt::join(keys, ", "));
      }
    }
    return true;
  }();
  (void)checked;
  return flags;
}

/// The JSON options the method is attached with (and its learning-rate rules read):
/// --method-options, with each of the method's flags (method_flags()) filling a key the JSON
/// leaves out.
inline nlohmann::json method_options(const Options& o) {
  nlohmann::json json;
  try {
    json = nlohmann::json::parse(o.method_options);
  } catch (const nlohmann::json::exception& e) {
    peft::fail("--method-options", "not JSON: {}", e.what());
  }
  peft::check(json.is_object(), "--method-options", "expected a JSON object, got {}", json.dump());
  for (const auto& f : method_flags()) {
    if (std::find(f.methods.begin(), f.methods.end(), o.method) == f.methods.end()) continue;
    if (json.contains(f.key)) continue;
    if (auto value = f.value(o); !value.is_null()) json[f.key] = std::move(value);
  }
  return json;
}

/// The largest holdout carved from train, and the seed that picks its rows (fixed, so that runs
/// with different --seed values are measured on the same rows).
inline constexpr size_t kHoldoutCap = 1000;
inline constexpr uint64_t kHoldoutSeed = 0;

/// Passes over the evaluation split per early-exit setting; the fastest is reported.
inline constexpr int kExitTimings = 3;

namespace detail {

/// Throws peft::Error with the message `[<program>] <formatted message>`, like the library's own
/// errors but naming the program.
template <class... Args>
[[noreturn]] void fail(const std::string& program, fmt::format_string<Args...> format,
                       Args&&... args) {
  throw peft::Error(
      fmt::format("[{}] {}", program, fmt::format(format, std::forward<Args>(args)...)));
}

inline std::string join(const std::vector<std::string>& items) {
  return peft::data::detail::join(items);
}

/// Peak resident memory of this process so far, in MiB (Linux reports ru_maxrss in KiB).
inline double peak_rss_mb() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return static_cast<double>(usage.ru_maxrss) / 1024.0;
}

/// Fills every recipe setting the command line left out with the task's and method's recipe,
/// and says which were taken. Without --method, the task's default_method().
inline void apply_recipe(const CLI::App& app, const Benchmark& bench, Options& o) {
  const auto task = bench.task_info(o.task).name;
  std::vector<std::string> taken;
  if (app.count("--method") == 0) {
    o.method = peft::models::default_method(task);
    taken.push_back("method " + o.method);
  }
  const auto r = peft::models::recipe(task, o.method);
  auto take = [&](const char* flag, auto& field, const auto& value, const std::string& shown) {
    if (app.count(flag) > 0) return;
    field = value;
    taken.push_back(fmt::format("{} {}", flag + 2, shown));
  };
  take("--pooling", o.pooling, r.pooling, r.pooling);
  take("--epochs", o.epochs, r.epochs, std::to_string(r.epochs));
  take("--batch-size", o.batch_size, r.batch_size, std::to_string(r.batch_size));
  take("--max-len", o.max_len, r.max_len, std::to_string(r.max_len));
  if (r.lr > 0) take("--lr", o.lr, r.lr, fmt::format("{:g}", r.lr));
  if (r.head_lr > 0) take("--head-lr", o.head_lr, r.head_lr, fmt::format("{:g}", r.head_lr));
  if (r.lora_plus_ratio > 0) {
    take("--lora-plus-ratio", o.lora_plus_ratio, r.lora_plus_ratio,
         fmt::format("{:g}", r.lora_plus_ratio));
  }
  if (r.model_dropout >= 0) {
    take("--model-dropout", o.model_dropout, r.model_dropout, fmt::format("{:g}", r.model_dropout));
  }
  if (r.max_train_samples > 0) {
    take("--max-train-samples", o.max_train_samples, r.max_train_samples,
         std::to_string(r.max_train_samples));
  }
  std::cout << fmt::format("defaults from the {}: {}\n", r.source,
                           taken.empty() ? std::string("none (every setting given)") : join(taken));
}

/// Refuses a method flag given on the command line for a method that does not read it (it would
/// be ignored without a word).
inline void check_method_flags(const CLI::App& app, const Benchmark& bench, const Options& o) {
  for (const auto& f : method_flags()) {
    if (app.count(f.flag) == 0) continue;
    if (std::find(f.methods.begin(), f.methods.end(), o.method) != f.methods.end()) continue;
    std::string methods = f.methods.front();
    for (size_t i = 1; i < f.methods.size(); ++i) {
      methods += (i + 1 == f.methods.size() ? " or " : ", ") + f.methods[i];
    }
    fail(bench.program, "{} applies to --method {}, not {}", f.flag, methods, o.method);
  }
}

/// The flags that set TextClassifierOptions, for its error messages.
inline std::map<std::string, std::string> option_flags() {
  return {{"method", "--method"},
          {"pooling", "--pooling"},
          {"train_pooler", "--train-pooler"},
          {"early_exit", "--early-exit"},
          {"exit_from", "--exit-from"},
          {"batch_size", "--batch-size"},
          {"device", "--device"},
          {"ladder_fisher_batches", "--lst-fisher-batches"},
          {"method_options", "--method-options"}};
}

/// The library's TextClassifierOptions from the command line.
inline peft::TextClassifierOptions classifier_options(const Benchmark& bench, const Options& o,
                                                      const peft::data::TaskInfo& task) {
  auto ladder = peft::LadderOptions()
                    .reduction_factor(o.lst_reduction)
                    .layers(o.lst_layers)
                    .block(peft::ladder_block_from_string(o.lst_block));
  if (o.lst_init == "random") ladder.init(peft::LadderInit::Random);
  if (o.lst_dropout >= 0) ladder.dropout(o.lst_dropout);
  torch::Device device(torch::kCPU);
  if (o.device != "cpu") {
    if (!torch::cuda::is_available()) {
      fail(bench.program, "--device {}: this LibTorch has no CUDA or no GPU is visible", o.device);
    }
    device = torch::Device(o.device);
  }
  const auto precision = peft::parse_precision(o.precision);
  peft::check_precision(precision, device);
  return peft::TextClassifierOptions()
      .method(o.method)
      .method_options(method_options(o))
      .pooling(o.pooling)
      .model_dropout(o.model_dropout)
      .train_pooler(o.train_pooler)
      .early_exit(o.early_exit)
      .exit_from(o.exit_from)
      .ladder(ladder)
      .ladder_fisher_batches(o.method == "lst" && o.lst_init == "fisher" ? o.lst_fisher_batches : 0)
      .epochs(o.epochs)
      .max_steps(o.max_steps)
      .batch_size(o.batch_size)
      .eval_batch_size(o.eval_batch_size)
      .max_len(o.max_len)
      .lr(o.lr)
      .head_lr(o.head_lr)
      .lora_plus_ratio(0)  // --lora-plus-ratio is in the method's options
      .weight_decay(o.weight_decay)
      .warmup_ratio(o.warmup_ratio)
      .grad_clip(o.grad_clip)
      .eval_every(o.eval_every)
      .save_every(o.save_every)
      .seed(o.seed)
      .group_by_length(o.group_by_length)
      .device(device)
      .precision(precision)
      .metrics(task.metrics)
      .output_dir(o.output)
      .overwrite(o.overwrite)
      .resume(o.resume)
      .output_hint("pass --resume to continue it or --overwrite to replace it")
      .log(&std::cout)
      .option_names(option_flags());
}

/// The splits to evaluate and the examples to train on. Without an official dev file (CoLA, RTE
/// and STS-B are often distributed without one), or with --eval-split holdout, the validation
/// rows are carved from train, always the same ones (seed 0, before --max-train-samples) so that
/// every run of a task is measured on one split.
inline std::pair<std::vector<peft::data::Example>, peft::TextClassifier::Splits> read_splits(
    const Benchmark& bench, const Options& o, const peft::data::TaskInfo& task,
    const fs::path& dir) {
  auto names = o.eval_splits;
  if (names.empty()) {
    names = bench.eval_splits(task.name);
    for (auto& split : names) {
      if (split == o.train_split || !bench.has_split(task.name, dir, split)) split = "holdout";
    }
    // MNLI without either dev file: one holdout, not two.
    names.erase(std::unique(names.begin(), names.end()), names.end());
  }
  const bool holdout = std::find(names.begin(), names.end(), "holdout") != names.end();
  const auto max_train = static_cast<size_t>(o.max_train_samples);
  const auto max_eval = static_cast<size_t>(o.max_eval_samples);
  auto train = bench.read(task.name, dir, o.train_split,
                          peft::data::ReadOptions().max_samples(holdout ? 0 : max_train));
  if (train.empty()) fail(bench.program, "{}: no training examples", dir.string());
  std::vector<peft::data::Example> held;
  if (holdout) {
    const auto rows = train.size();
    std::tie(train, held) = peft::data::split_holdout(
        train, peft::data::holdout_size(rows, o.holdout, kHoldoutCap), kHoldoutSeed);
    if (max_train > 0 && train.size() > max_train) train.resize(max_train);
    std::cout << fmt::format(
        "validation: holdout of {} of the {} {} rows ({:g} %, at most {}, seed {}){}\n",
        held.size(), rows, o.train_split, 100 * o.holdout, kHoldoutCap, kHoldoutSeed,
        o.eval_splits.empty() ? "; the default evaluation split is missing or trained on" : "");
    if (max_eval > 0 && held.size() > max_eval) held.resize(max_eval);
  }
  peft::TextClassifier::Splits evals;
  for (const auto& split : names) {
    if (split == "holdout") {
      evals.emplace_back(split, held);
      continue;
    }
    evals.emplace_back(
        split, bench.read(task.name, dir, split, peft::data::ReadOptions().max_samples(max_eval)));
    if (evals.back().second.empty()) {
      fail(bench.program, "{}: split {} has no examples", dir.string(), split);
    }
  }
  return {std::move(train), std::move(evals)};
}

inline int run(const Benchmark& bench, const Options& o) {
  const auto task = bench.task_info(o.task);
  if (o.resume && o.output.empty()) {
    fail(bench.program, "--resume needs --output (the folder the run was saved in)");
  }
  if (o.save_every > 0 && o.output.empty()) {
    fail(bench.program, "--save-every needs --output (the folder checkpoints are written to)");
  }
  const bool early_exit = o.early_exit != "none";
  if (early_exit) {
    if (task.is_regression()) {
      fail(bench.program, "--early-exit needs a classification task; {} is a regression task",
           task.name);
    }
    const auto policy = peft::models::exit_policy_from_string(o.early_exit);
    for (double t : o.exit_thresholds) {
      peft::models::check_exit_threshold(policy, t, "--exit-threshold");
    }
  } else if (!o.exit_thresholds.empty() || !o.exit_from.empty()) {
    fail(bench.program, "--exit-threshold and --exit-from need --early-exit POLICY");
  }
  if (o.threads > 0) torch::set_num_threads(static_cast<int>(o.threads));
  // Data parallel: this process is one rank of the run the environment describes (--nproc set
  // it, or torchrun-style variables on several machines); nothing for a single process.
  const auto group = peft::init_distributed();
  auto options = classifier_options(bench, o, task).collective(group);

  // --data-dir may name the task's folder or the benchmark's root holding it.
  fs::path dir(o.data_dir);
  std::error_code ec;
  if (fs::is_directory(dir / bench.folder(task.name), ec)) dir /= bench.folder(task.name);
  const auto model_dir = examples::default_model_dir(o.model, bench.default_model);
  const auto [train, evals] = read_splits(bench, o, task, dir);
  if (options.ladder_fisher_batches() > 0) options.fisher_examples(train);

  peft::TextClassifier classifier(model_dir, task.num_labels, std::move(options));
  std::cout << fmt::format(
      "{}: task {} ({}), data {}\n", bench.program, task.name,
      task.is_regression() ? "regression" : fmt::format("{} classes", task.num_labels),
      dir.string());
  if (o.method == "propetl") {
    const auto storage = peft::propetl_storage(classifier.model());
    std::cout << fmt::format(
        "propetl storage: prototype {} bytes + {} masks of {} bytes (1 bit per entry) = {} bytes, "
        "{:.4f} of the {} bytes of {} unshared copies\n",
        storage.prototype_bytes, storage.sites, storage.mask_bytes / storage.sites, storage.total(),
        storage.ratio(), storage.unshared_bytes, storage.sites);
  }
  if (!o.output.empty() && !peft::has_adapter_format(o.method)) {
    std::cout << fmt::format(
        "--output gets model.safetensors with every trained tensor{}\n",
        o.method == "full" ? ""
                           : fmt::format(" (save_adapter has no file format for {})", o.method));
  }

  const auto result = classifier.fit(train, evals);
  const auto key = (evals.size() > 1 ? evals.front().first + "." : "") + task.metrics.front();
  const auto found = result.last_metrics.find(key);
  if (found == result.last_metrics.end()) {
    fail(bench.program, "the run ended without an evaluation of {}", key);
  }
  std::cout << fmt::format("trained {} steps in {:.1f} s ({:.1f} s of it evaluating); {} {:.4f}\n",
                           result.steps, result.seconds, result.eval_seconds, key, found->second);
  if (group) {
    // Measured on this rank: what the reductions carried and how long they took (including
    // waits for the other ranks), the ceiling on what overlapping them with backward could save.
    std::cout << fmt::format(
        "data parallel: {} bytes reduced per step ({} in all), {:.2f} s of {:.1f} s in "
        "reductions ({:.1f} %)\n",
        group->reduced_bytes() / std::max<int64_t>(result.steps, 1), group->reduced_bytes(),
        group->reduce_seconds(), result.seconds,
        100.0 * group->reduce_seconds() / std::max(result.seconds, 1e-9));
  }
  const auto count = peft::count_parameters(classifier.model());
  nlohmann::ordered_json line;
  line["task"] = task.name;
  line["method"] = o.method;
  line["metric"] = key;
  line["value"] = peft::detail::json_number(found->second);
  line["trainable_params"] = count.trainable;
  line["total_params"] = count.total;
  line["adapter_bytes"] = classifier.saved_bytes();
  line["train_seconds"] = peft::detail::round_to(result.seconds, 2);
  // Of train_seconds, the evaluations at epoch ends (and every --eval-every steps).
  line["eval_seconds"] = peft::detail::round_to(result.eval_seconds, 2);
  line["peak_rss_mb"] = peft::detail::round_to(peak_rss_mb(), 1);
  if (early_exit) {
    // The kept threshold is saved with the adapter.
    line["early_exit"] = peft::exit_sweep_report(
        classifier.choose_exit(o.exit_thresholds, kExitTimings), task.metrics.front());
    if (!o.output.empty())
      std::cout << "early exit: the kept threshold is saved with the adapter\n";
  }
  const auto text = line.dump();
  if (!o.output.empty() && (!group || group->rank() == 0)) {
    classifier.save(o.output);
    std::ofstream(fs::path(o.output) / "result.json") << text << '\n';
  }
  std::cout << text << std::endl;
  return 0;
}
}  // namespace detail

/// Parses the command line and runs one fine-tuning job. Errors (bad options, missing files,
/// malformed rows, a method this build lacks) are printed as one message on stderr with a
/// non-zero exit status; the last line on stdout is the result as one JSON object.
inline int main(const Benchmark& bench, int argc, char** argv) {
  Options o;
  CLI::App app(bench.description, bench.program);
  app.option_defaults()->always_capture_default();
  app.add_option("--task", o.task, "task: " + detail::join(bench.tasks))->required();
  app.add_option("--data-dir", o.data_dir,
                 "the task's folder (train/dev files) or the benchmark folder holding it")
      ->required();
  app.add_option("--model", o.model,
                 fmt::format("Hugging Face BERT folder, a decoder's .gguf file, or a name: {} "
                             "(default: {})",
                             examples::model_names(), bench.default_model));
  app.add_option("--method", o.method,
                 "PEFT method: " + detail::join(available_methods()) +
                     " (lst: ladder side-tuning, a side network beside the frozen model); "
                     "default lora; full for cola, stsb and rte (docs/RESULTS.md)")
      ->check(CLI::IsMember(available_methods()))
      ->default_str("recipe");
  app.add_option("--method-options", o.method_options,
                 "JSON options of the method, e.g. '{\"r\": 4}': the keys its registry entry "
                 "lists (its adapter_config.json names; any other key is refused); they win "
                 "over the method's flags, which fill the keys left out (--lora-* for every "
                 "method that reads r, lora_alpha, ...)");
  app.add_option("--epochs", o.epochs, "passes over the training data")
      ->check(CLI::PositiveNumber)
      ->default_str("recipe");
  app.add_option("--max-steps", o.max_steps, "stop after this many steps (0: run the epochs)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--batch-size", o.batch_size, "training batch size")
      ->check(CLI::PositiveNumber)
      ->default_str("recipe");
  app.add_option("--eval-batch-size", o.eval_batch_size, "evaluation batch size")
      ->check(CLI::PositiveNumber);
  app.add_option(
         "--lr", o.lr,
         "learning rate (default: the task's recipe, else the method's own: " + default_lrs() + ")")
      ->check(CLI::PositiveNumber)
      ->default_str("recipe");
  app.add_option("--head-lr", o.head_lr,
                 "learning rate of the classifier head (default: the recipe's, else --lr)")
      ->check(CLI::PositiveNumber)
      ->default_str("recipe");
  app.add_option("--weight-decay", o.weight_decay, "AdamW weight decay")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--warmup-ratio", o.warmup_ratio, "share of the steps spent warming up")
      ->check(CLI::Range(0.0, 1.0));
  app.add_option("--grad-clip", o.grad_clip, "gradient norm limit (0: off)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--max-len", o.max_len, "tokens per example, special tokens included")
      ->check(CLI::Range(int64_t{3}, int64_t{512}))
      ->default_str("recipe");
  app.add_flag("--group-by-length,!--no-group-by-length", o.group_by_length,
               "batches of examples of similar length, formed again each epoch, and evaluation "
               "in length order: less padding, faster (docs/BENCHMARKS.md)")
      ->default_str("on");
  app.add_option("--max-train-samples", o.max_train_samples,
                 "read at most this many training examples (0: all)")
      ->check(CLI::NonNegativeNumber)
      ->default_str("recipe");
  app.add_option("--max-eval-samples", o.max_eval_samples,
                 "read at most this many examples of each evaluation split (0: all)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--eval-split", o.eval_splits,
                 "splits to evaluate, comma-separated: dev, test, ... or holdout (rows carved from "
                 "train, see --holdout); default dev (mnli: dev_matched, dev_mismatched), or "
                 "holdout when the task's folder has no dev file")
      ->delimiter(',');
  app.add_option("--train-split", o.train_split,
                 "split to train on (e.g. dev for AFQMC, whose train file is not always at hand; "
                 "then validate on a holdout of it)");
  app.add_option("--holdout", o.holdout,
                 "share of the training file held out for validation by --eval-split holdout "
                 "(at most 1000 rows, always the same rows: seed 0, before --max-train-samples)")
      ->check(CLI::Range(0.01, 0.5));
  app.add_option("--seed", o.seed, "seed of the initialisation, data order and dropout");
  app.add_option("--device", o.device, "cpu or cuda[:index]");
  app.add_option("--precision", o.precision,
                 "fp32, or autocast to bf16 or fp16 (fp16 with a dynamic loss scale); parameters "
                 "and optimizer state stay float32")
      ->check(CLI::IsMember(peft::enum_names<peft::Precision>()));
  app.add_option("--threads", o.threads, "CPU threads (0: LibTorch's default)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--output", o.output,
                 "folder for the adapter, metrics.jsonl, checkpoints and result.json");
  app.add_option("--pooling", o.pooling,
                 "classifier input: cls (BERT's pooler, as Hugging Face) or mean (average of the "
                 "token states, how sentence-transformers models such as the default were "
                 "trained)")
      ->check(CLI::IsMember(peft::enum_names<peft::models::Pooling>()))
      ->default_str("recipe");
  app.add_option("--model-dropout", o.model_dropout,
                 "dropout of the pretrained model and the head: embeddings, attention, residual "
                 "and FFN, and of LST's side network (default: the recipe's, else the config's "
                 "hidden_dropout_prob and attention_probs_dropout_prob)")
      ->check(CLI::Range(0.0, 0.99))
      ->default_str("recipe");
  app.add_flag("--train-pooler", o.train_pooler,
               "also train BERT's pooler (saved with the adapter, like the head)");
  app.add_flag("--resume", o.resume, "continue the run saved in --output");
  app.add_option("--nproc", o.nproc,
                 "train on this many processes of this machine, data parallel: each takes "
                 "--batch-size / N rows of every batch and cores / N threads (several machines: "
                 "start one process per rank with RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT "
                 "set, as torchrun does; see README)")
      ->check(CLI::PositiveNumber);
  app.add_option("--master-port", o.master_port,
                 "with --nproc: the port rank 0's store listens on (0: a free one)")
      ->check(CLI::Range(0, 65535));
  app.add_flag("--overwrite", o.overwrite, "replace an earlier run saved in --output");
  app.add_option("--eval-every", o.eval_every, "evaluate every N steps (0: at each epoch end)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--save-every", o.save_every,
                 "also write a checkpoint to --output every N steps, for --resume after a crash "
                 "(0: only at evaluations)")
      ->check(CLI::NonNegativeNumber);

  app.add_option("--early-exit", o.early_exit,
                 "train a classifier after every layer and a confidence predictor, then report the "
                 "metric, mean layers run and inference time of each --exit-threshold against "
                 "the full model: entropy (DeeBERT), patience (PABEE) or learned (BERxiT); none: "
                 "off")
      ->check(CLI::IsMember(peft::enum_names<peft::models::ExitPolicy>()));
  app.add_option("--exit-threshold", o.exit_thresholds,
                 "thresholds to measure, comma-separated: entropy in nats (exit below), patience "
                 "in layers, learned confidence in [0, 1] (exit at or above); the fastest within "
                 "one point of the full model is kept and saved (default: a sweep per policy)")
      ->delimiter(',');
  app.add_option("--exit-from", o.exit_from,
                 "with --early-exit: start from an earlier run's --output (its method and head, "
                 "kept frozen) and train only the other exits and the predictor; use that run's "
                 "--pooling");

  app.add_option("--lora-r", o.lora_r, "LoRA rank")->check(CLI::PositiveNumber);
  app.add_option("--lora-alpha", o.lora_alpha, "LoRA alpha (scale alpha / r)")
      ->check(CLI::PositiveNumber);
  app.add_option("--lora-dropout", o.lora_dropout, "dropout on LoRA's input")
      ->check(CLI::Range(0.0, 0.99));
  app.add_option("--lora-targets", o.lora_targets,
                 "projections, comma-separated: query, key, value, out_proj, linear1, linear2 "
                 "(or Hugging Face names)")
      ->delimiter(',');
  app.add_flag("--lora-rslora", o.lora_rslora, "scale by alpha / sqrt(r)");
  app.add_option("--lora-plus-ratio", o.lora_plus_ratio,
                 "LoRA+: the B matrices learn at --lr times this (0: off, B at --lr like A)")
      ->check(CLI::NonNegativeNumber)
      ->default_str("recipe");
  app.add_option("--adapter-kind", o.adapter_kind, "houlsby, pfeiffer or parallel")
      ->check(CLI::IsMember(peft::enum_names<peft::AdapterKind>()));
  app.add_option("--adapter-reduction", o.adapter_reduction, "bottleneck = hidden size / reduction")
      ->check(CLI::PositiveNumber);
  app.add_option("--adapter-activation", o.adapter_activation, "relu, gelu, tanh, silu or identity")
      ->check(CLI::IsMember({"relu", "gelu", "tanh", "silu", "identity"}));
  app.add_flag("--bitfit-layer-norm", o.bitfit_layer_norm, "BitFit also trains the LayerNorms");
  app.add_option("--prefix-tokens", o.prefix_tokens, "prefix key/value rows per layer")
      ->check(CLI::PositiveNumber);
  app.add_flag("--prefix-projection", o.prefix_projection,
               "train the prefix through an MLP (saved as the rows it produces)");
  app.add_option("--prefix-hidden", o.prefix_hidden, "hidden size of the prefix MLP")
      ->check(CLI::PositiveNumber);
  app.add_option("--prompt-tokens", o.prompt_tokens, "soft prompt vectors")
      ->check(CLI::PositiveNumber);
  app.add_option("--prompt-init", o.prompt_init, "vocab (sampled word embeddings) or random")
      ->check(CLI::IsMember({"vocab", "random"}));
  app.add_option("--ptuning-tokens", o.ptuning_tokens, "P-tuning virtual tokens")
      ->check(CLI::PositiveNumber);
  app.add_option("--ptuning-encoder", o.ptuning_encoder,
                 "P-tuning prompt encoder: mlp (Hugging Face's default) or lstm (the paper's)")
      ->check(CLI::IsMember(peft::enum_names<peft::PromptEncoderType>()));
  app.add_option("--ptuning-hidden", o.ptuning_hidden,
                 "hidden size of the prompt encoder (0: the model width)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--propetl-base", o.propetl_base,
                 "ProPETL prototype: adapter (one Pfeiffer adapter, sized by --adapter-reduction "
                 "and --adapter-activation), lora (--lora-r, --lora-alpha, --lora-targets) or "
                 "prefix (--prefix-tokens)")
      ->check(CLI::IsMember(peft::enum_names<peft::ProPETLBase>()));
  app.add_option("--propetl-keep-ratio", o.propetl_keep_ratio,
                 "share of the prototype's weights each site's mask keeps")
      ->check(CLI::Range(0.0, 1.0));
  app.add_option("--propetl-mask-lr", o.propetl_mask_lr,
                 "learning rate of the mask scores (the prototype and head use --lr)")
      ->check(CLI::PositiveNumber);
  app.add_option("--lst-reduction", o.lst_reduction, "side network width = hidden size / reduction")
      ->check(CLI::PositiveNumber);
  app.add_option("--lst-layers", o.lst_layers,
                 "backbone layers feeding the side network, comma-separated, increasing (default: "
                 "all)")
      ->delimiter(',');
  app.add_option("--lst-block", o.lst_block,
                 "side blocks: transformer_encoder_layer (the backbone's post-norm kind) or t5 "
                 "(the LST paper's pre-norm T5 block); beside a decoder (--model smollm2) they "
                 "are Llama layers (llama, or the default)")
      ->check(CLI::IsMember(peft::enum_names<peft::LadderBlock>()));
  app.add_option("--lst-init", o.lst_init,
                 "side network start: magnitude (prune the backbone by |w|), fisher (prune by "
                 "Fisher information from training batches) or random")
      ->check(CLI::IsMember({"magnitude", "fisher", "random"}));
  app.add_option("--lst-fisher-batches", o.lst_fisher_batches,
                 "training batches --lst-init fisher estimates the Fisher information from")
      ->check(CLI::PositiveNumber);
  app.add_option("--lst-dropout", o.lst_dropout,
                 "dropout in the side network (side blocks' attention and sub-layers) alone, "
                 "whatever the frozen model's is (default: --model-dropout's rate)")
      ->check(CLI::Range(0.0, 0.99))
      ->default_str("model dropout");

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  try {
    // In a data-parallel run rank 0 reports; the others stay quiet but for errors (stderr).
    if (const auto env = peft::launch_env(); env.world_size > 1 && env.rank != 0) {
      std::cout.setstate(std::ios::badbit);
    }
    detail::apply_recipe(app, bench, o);
    detail::check_method_flags(app, bench, o);
    // --nproc N: this process becomes the launcher of N ranks running the same command line.
    if (o.nproc > 1 && !peft::launch_env().from_env) {
      std::vector<std::string> args{"/proc/self/exe"};
      for (int i = 1; i < argc; ++i) args.emplace_back(argv[i]);
      return peft::launch_local(args, peft::LaunchOptions()
                                          .nproc(static_cast<int>(o.nproc))
                                          .master_port(static_cast<int>(o.master_port))
                                          .log(&std::cout));
    }
    return detail::run(bench, o);
  } catch (const peft::Error& e) {
    std::cerr << "error: " << e.what() << '\n';
  } catch (const c10::Error& e) {
    std::cerr << "error: " << e.what_without_backtrace() << '\n';
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << '\n';
  }
  return 1;
}

}  // namespace finetune
