#pragma once

// The fine-tuning program behind peft-glue and peft-clue: a pretrained BERT (all-MiniLM-L6-v2 by
// default) with a new classification or regression head, one PEFT method attached (or a ladder
// side network beside it, or the whole model unfrozen as the baseline), trained with peft::Trainer
// on one task of a benchmark, then evaluated; the adapter, the metrics log and the result go to
// --output. The two programs differ only in the Benchmark they pass: how tasks are named, described
// and read.

#include "benchmark.hpp"

#include <peft/peft.hpp>
#include <peft/io/adapter_format.hpp>
#include <peft/models/bert.hpp>
#include <peft/models/early_exit.hpp>
#include <peft/models/heads.hpp>
#include <peft/models/ladder_heads.hpp>
#include <peft/models/recipes.hpp>
#include <peft/tasks/exit_sweep.hpp>
#include <peft/tasks/text_classifier.hpp>
#include "model_path.hpp"
#include <peft/data/split.hpp>
#include <peft/train/accumulator.hpp>
#include <peft/train/distributed.hpp>
#include <peft/train/output_dir.hpp>
#include <peft/train/launch.hpp>

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

/// Tokenised, padded inputs of a few examples and their labels (the library's TextBatch).
using Batch = peft::TextBatch;

/// The model a run trains, whichever class it is: its root module (what is counted, optimised,
/// checkpointed and saved) and its forward pass from a batch to logits.
struct Classifier {
  std::shared_ptr<torch::nn::Module> root;
  std::function<torch::Tensor(const Batch&)> logits;
  /// The trained head's module name (lr_for() takes it): "classifier", or "score" on a decoder.
  std::string head = "classifier";
  /// Where the method was attached (empty for full fine-tuning and LST, which attach nothing).
  std::vector<std::string> sites;
  /// Bytes of the method's own parameters (without the head).
  int64_t method_bytes = 0;
  /// What --model-dropout changed, for the report ("" when it was not given).
  std::string dropout_note;
  /// The training loss of a batch when it is not the task loss of `logits` (early exit: every
  /// layer's exit and the confidence predictor).
  std::function<torch::Tensor(const Batch&)> loss;
  /// With --early-exit: the model, for the threshold sweep after training.
  peft::models::BertEarlyExitForSequenceClassification early_exit{nullptr};
};

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

/// The learning rate a method trains well at on this model when --lr is not given (the
/// method's registry entry): the added-parameter methods start from zero or small random values
/// and need a larger step than full fine-tuning, which would wreck the pretrained weights at
/// those rates.
inline double default_lr(const std::string& method) {
  return method == "full" ? 5e-5 : peft::method_entry(method).default_lr;
}

/// "lora 0.001, ..., full 5e-05": every trainable method's default rate (its registry entry), for
/// --help.
inline std::string default_lrs() {
  std::string out;
  for (const auto& m : available_methods()) {
    out += fmt::format("{}{} {:g}", out.empty() ? "" : ", ", m, default_lr(m));
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

/// The examples in an order fixed by the seed, so that batches mix classes even when a file is
/// sorted by label; mt19937_64's output is fixed by the standard, unlike std::shuffle's.
inline void shuffle(std::vector<peft::data::Example>& examples, int64_t seed) {
  std::vector<peft::data::Example> out;
  out.reserve(examples.size());
  for (auto i : peft::data::shuffled_order(examples.size(), static_cast<uint64_t>(seed))) {
    out.push_back(std::move(examples[i]));
  }
  examples = std::move(out);
}

/// Peak resident memory of this process so far, in MiB (Linux reports ru_maxrss in KiB).
inline double peak_rss_mb() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return static_cast<double>(usage.ru_maxrss) / 1024.0;
}

/// `value` rounded to `digits` decimals. Dividing by the power of ten (not multiplying by 0.1)
/// gives the double that prints as the short decimal.
inline double round_to(double value, int digits) {
  const double scale = std::pow(10.0, digits);
  return std::round(value * scale) / scale;
}

/// A number for the result line: JSON has no NaN, so a non-finite metric becomes null.
inline nlohmann::ordered_json number(double value) {
  return std::isfinite(value) ? nlohmann::ordered_json(value) : nlohmann::ordered_json(nullptr);
}

/// Attaches the chosen method through the registry and returns the paths it went to (empty for
/// full fine-tuning, where the whole backbone trains: the baseline every method is compared with).
inline std::vector<std::string> attach_method(const Options& o, torch::nn::Module& bert) {
  if (o.method != "full") return peft::attach(bert, o.method, method_options(o));
  peft::unfreeze(bert);
  return {};
}

/// Trains BERT's pooler with the head (Hugging Face PEFT: modules_to_save=["classifier",
/// "pooler"]). On SST-2 with the default model it did not help (docs/RESULTS.md); --pooling mean
/// is the other way around the untrained [CLS] pooler of a sentence-transformers model.
inline void unfreeze_pooler(const Options& o, peft::models::BertImpl& bert) {
  if (o.train_pooler) peft::unfreeze(*bert.pooler);
}

/// The training loss of a batch's logits: mean squared error for regression (one output),
/// cross-entropy otherwise.
inline torch::Tensor task_loss(const torch::Tensor& logits, const Batch& b, bool regression) {
  // Under autocast the scores may be bfloat16 or float16; the error is taken in the labels' type.
  if (regression) return torch::mse_loss(logits.squeeze(-1).to(b.labels.scalar_type()), b.labels);
  return torch::nn::functional::cross_entropy(logits, b.labels);
}

/// LST's options from the command line. With --lst-init fisher the pruned start ranks weights by
/// their empirical Fisher information: the squared gradients of the task loss over the first
/// --lst-fisher-batches training batches, through a throwaway classifier (the same pretrained
/// weights, a fresh head, dropout off) that is gone before training starts.
inline peft::LadderOptions ladder_options(const Options& o, const fs::path& model_dir,
                                          int64_t num_labels, peft::models::Pooling pooling,
                                          const std::vector<Batch>& train_batches,
                                          bool regression) {
  auto options = peft::LadderOptions()
                     .reduction_factor(o.lst_reduction)
                     .layers(o.lst_layers)
                     .block(peft::ladder_block_from_string(o.lst_block));
  if (o.lst_init == "random") options.init(peft::LadderInit::Random);
  if (o.lst_init != "fisher") return options;
  const auto batches =
      std::min<int64_t>(o.lst_fisher_batches, static_cast<int64_t>(train_batches.size()));
  std::cout << fmt::format("LST init: Fisher information from {} training batch{}\n", batches,
                           batches == 1 ? "" : "es")
            << std::flush;
  auto probe =
      peft::models::BertForSequenceClassification::from_pretrained(model_dir, num_labels, pooling);
  probe->eval();
  options.importance(peft::fisher_importance(
      *probe->bert->encoder,
      [&](int64_t i) {
        const auto& b = train_batches[static_cast<size_t>(i)];
        return task_loss(probe(b.input_ids, b.attention_mask, b.token_type_ids), b, regression);
      },
      batches));
  return options;
}

/// Sets the pretrained model's dropout (models::BertImpl::set_dropout: embeddings, attention
/// probabilities, attention and FFN outputs, as hidden_dropout_prob and
/// attention_probs_dropout_prob do in a Hugging Face config) and the head's `head_dropout` to
/// `p`. Called before a method is attached, so the method's own dropout (--lora-dropout) keeps
/// its value. Returns the report's note.
inline std::string set_model_dropout(peft::models::BertImpl& bert, torch::nn::Dropout& head_dropout,
                                     double p) {
  const auto config = bert.config();
  bert.set_dropout(p, p);
  head_dropout->options.p(p);
  return fmt::format("dropout {} in the model and the head (config: hidden {}, attention {})", p,
                     config.hidden_dropout_prob, config.attention_probs_dropout_prob);
}

/// The early-exit classifier of --early-exit: a head after every layer and the confidence
/// predictor, trained with the method (or, with --exit-from, over the method and head loaded from
/// an earlier run's adapter, which stay frozen: only the exits and the predictor train).
inline Classifier build_early_exit(const Options& o, const fs::path& model_dir, int64_t num_labels,
                                   peft::models::Pooling pooling) {
  Classifier c;
  auto model = peft::models::BertEarlyExitForSequenceClassification::from_pretrained(
      model_dir, num_labels, pooling);
  if (o.model_dropout >= 0) {
    c.dropout_note = set_model_dropout(*model->bert, model->dropout, o.model_dropout);
  }
  if (o.exit_from.empty()) {
    c.sites = attach_method(o, *model->bert);
    unfreeze_pooler(o, *model->bert);
  } else {
    peft::load_adapter(*model, o.exit_from);
    peft::freeze(*model->bert);
    peft::freeze(*model->classifier);
    for (const auto& [path, m] : peft::attached_methods(*model)) c.sites.push_back(path);
    std::cout << fmt::format(
        "loaded {} (frozen): {} sites and the last layer's head; the other "
        "exits and the predictor train\n",
        o.exit_from, c.sites.size());
  }
  c.root = model.ptr();
  c.logits = [model](const Batch& b) mutable {
    return model(b.input_ids, b.attention_mask, b.token_type_ids);
  };
  c.loss = [model](const Batch& b) mutable {
    return model->loss(model->forward_exits(b.input_ids, b.attention_mask, b.token_type_ids),
                       b.labels);
  };
  c.method_bytes = peft::adapter_bytes(*model);
  c.early_exit = model;
  return c;
}

/// Whether `model` is a decoder's GGUF file (models::Llama) rather than a BERT folder.
inline bool is_decoder(const fs::path& model) {
  return model.extension() == ".gguf";
}

/// The model of the run with its method: BertForSequenceClassification with the method attached,
/// or for LST BertLadderForSequenceClassification (`train_batches` and `regression` serve
/// --lst-init fisher).
inline Classifier build_classifier(const Options& o, const fs::path& model_dir, int64_t num_labels,
                                   const std::vector<Batch>& train_batches, bool regression) {
  const auto pooling = peft::models::pooling_from_string(o.pooling);
  Classifier c;
  if (o.method == "lst") {
    auto model = peft::models::BertLadderForSequenceClassification::from_pretrained(
        model_dir, num_labels,
        ladder_options(o, model_dir, num_labels, pooling, train_batches, regression), pooling);
    if (o.model_dropout >= 0) {
      c.dropout_note = set_model_dropout(*model->bert, model->dropout, o.model_dropout);
    }
    c.root = model.ptr();
    c.logits = [model](const Batch& b) mutable {
      return model(b.input_ids, b.attention_mask, b.token_type_ids);
    };
    c.method_bytes = peft::count_parameters(*model->ladder).trainable_bytes;
    return c;
  }
  if (is_decoder(model_dir)) {
    // A decoder classifies from its last real token (Hugging Face's
    // LlamaForSequenceClassification); the recipes' pooling and pooler settings do not apply.
    auto model =
        peft::models::LlamaForSequenceClassification::from_pretrained(model_dir, num_labels);
    c.sites = attach_method(o, *model->model);
    c.head = "score";
    c.root = model.ptr();
    c.logits = [model](const Batch& b) mutable { return model(b.input_ids, b.attention_mask); };
    c.method_bytes = peft::adapter_bytes(*model);
    return c;
  }
  if (o.early_exit != "none") return build_early_exit(o, model_dir, num_labels, pooling);
  auto model =
      peft::models::BertForSequenceClassification::from_pretrained(model_dir, num_labels, pooling);
  if (o.model_dropout >= 0) {
    c.dropout_note = set_model_dropout(*model->bert, model->dropout, o.model_dropout);
  }
  c.sites = attach_method(o, *model->bert);
  unfreeze_pooler(o, *model->bert);
  c.root = model.ptr();
  c.logits = [model](const Batch& b) mutable {
    return model(b.input_ids, b.attention_mask, b.token_type_ids);
  };
  c.method_bytes = peft::adapter_bytes(*model);
  return c;
}

/// One line describing the method's settings for the report: its registry summary and the
/// options it was attached with.
inline std::string describe_method(const Options& o) {
  if (o.method == "lst") {
    std::vector<std::string> layers;
    for (auto l : o.lst_layers) layers.push_back(std::to_string(l));
    return fmt::format("side network of width / {} fed by {} layers, {} blocks, {} init",
                       o.lst_reduction, layers.empty() ? std::string("all") : join(layers),
                       o.lst_block, o.lst_init);
  }
  if (o.method == "full") return "every backbone parameter trains";
  return fmt::format("{}; options {}", peft::method_entry(o.method).summary,
                     method_options(o).dump());
}

/// Writes the trained parameters to --output: the adapter folder save_adapter() writes, or for a
/// method without a file format (peft::has_adapter_format; full fine-tuning) every trained
/// tensor, head included.
inline void save_result(const Options& o, const Classifier& model, const std::string& line) {
  if (o.output.empty()) return;
  const fs::path out(o.output);
  fs::create_directories(out);
  if (!peft::has_adapter_format(o.method)) {
    peft::io::save_safetensors(out / "model.safetensors",
                               peft::named_trainable_parameters(*model.root), {{"format", "pt"}});
  } else {
    auto save = peft::SaveAdapterOptions();
    if (o.train_pooler) {
      std::vector<std::string> heads{"classifier", "bert.pooler"};
      if (model.early_exit) heads.insert(heads.end(), {"exits", "predictor"});
      save.modules_to_save(heads);
    }
    peft::save_adapter(*model.root, out, save);
  }
  std::ofstream(out / "result.json") << line << '\n';
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

/// The task's metrics of `logits_of` over one split's batches (moved to `device` first); in a
/// data-parallel run over every rank's share of the split.
inline std::map<std::string, double> split_metrics(
    const peft::data::TaskInfo& task, const std::vector<Batch>& batches, torch::Device device,
    const std::function<torch::Tensor(const Batch&)>& logits_of,
    peft::Collective* group = nullptr) {
  peft::metrics::Accumulator scores(task.is_regression());
  for (const auto& raw : batches) scores.add(logits_of(raw.to(device)), raw.labels);
  if (group != nullptr) scores.gather(*group);
  return scores.compute(task.metrics);
}

/// Passes over the evaluation split per exit setting; the fastest is reported.
inline constexpr int kExitTimings = 3;

/// After an --early-exit run: peft::sweep_exit_thresholds over the first split's batches (the
/// full model and each threshold; with several processes each scores its share), printed; the model
/// keeps the fastest threshold within one point (0.01) of the full model's metric, which --output
/// saves. Returns the report for the result line.
inline nlohmann::ordered_json exit_sweep(const Options& o, const peft::data::TaskInfo& task,
                                         const std::string& split,
                                         const std::vector<Batch>& batches, torch::Device device,
                                         peft::models::BertEarlyExitForSequenceClassification model,
                                         const std::shared_ptr<peft::Collective>& group) {
  const auto policy = peft::models::exit_policy_from_string(o.early_exit);
  const auto thresholds = o.exit_thresholds.empty()
                              ? peft::default_exit_thresholds(policy, model->num_layers())
                              : o.exit_thresholds;
  const std::string metric = task.metrics.front();
  std::cout << fmt::format(
                   "early exit: timing the full model and {} threshold{} on {}, {} passes "
                   "each...\n",
                   thresholds.size(), thresholds.size() == 1 ? "" : "s", split, kExitTimings)
            << std::flush;
  const auto sweep = peft::sweep_exit_thresholds(*model, batches, metric, policy,
                                                 peft::ExitSweepOptions()
                                                     .thresholds(thresholds)
                                                     .timings(kExitTimings)
                                                     .device(device)
                                                     .collective(group));
  const auto& full = sweep.full;
  const int64_t examples = sweep.examples;
  std::cout << fmt::format(
      "early exit on {} ({} examples; time: the fastest of {} passes): full model {} {:.4f}, {} "
      "layers, {:.2f} s\n",
      split, examples, kExitTimings, metric, full.metric, model->num_layers(), full.seconds);
  for (const auto& p : sweep.points) {
    std::cout << fmt::format(
        "  {} {:<5g} {} {:.4f} ({:+.2f} points), mean layers {:.2f}, {:.2f} s, {:.2f}x faster\n",
        o.early_exit, p.threshold, metric, p.metric, 100 * (p.metric - full.metric), p.mean_layers,
        p.seconds, full.seconds / p.seconds);
  }
  const auto& chosen = sweep.chosen();
  std::cout << fmt::format(
      "early exit kept: {} {:g} ({}){}\n", o.early_exit, chosen.threshold,
      sweep.within_tolerance ? "fastest within 1 point" : "none within 1 point; the most cautious",
      o.output.empty() ? "" : ", saved with the adapter");
  nlohmann::ordered_json report;
  report["policy"] = o.early_exit;
  report["threshold"] = chosen.threshold;
  report["full_" + metric] = number(full.metric);
  report["full_seconds"] = round_to(full.seconds, 3);
  nlohmann::ordered_json curve = nlohmann::ordered_json::array();
  for (const auto& p : sweep.points) {
    curve.push_back({{"threshold", p.threshold},
                     {metric, number(p.metric)},
                     {"mean_layers", round_to(p.mean_layers, 3)},
                     {"seconds", round_to(p.seconds, 3)},
                     {"speedup", round_to(full.seconds / p.seconds, 3)}});
  }
  report["curve"] = curve;
  return report;
}

inline int run(const Benchmark& bench, const Options& o) {
  const auto task = bench.task_info(o.task);
  if (o.resume && o.output.empty()) {
    fail(bench.program, "--resume needs --output (the folder the run was saved in)");
  }
  if (o.save_every > 0 && o.output.empty()) {
    fail(bench.program, "--save-every needs --output (the folder checkpoints are written to)");
  }
  if (o.train_pooler && o.method == "lst") {
    fail(bench.program,
         "--train-pooler does not apply to --method lst (its head reads the side network, not "
         "BERT's pooler)");
  }
  if (o.train_pooler && o.pooling == "mean") {
    fail(bench.program,
         "--train-pooler does not apply to --pooling mean (the classifier reads the mean of the "
         "token states; BERT's pooler is not used)");
  }
  const bool early_exit = o.early_exit != "none";
  if (early_exit) {
    if (o.method == "lst") {
      fail(bench.program,
           "--early-exit does not apply to --method lst (its head reads the side "
           "network's last layer)");
    }
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
  if (is_decoder(examples::default_model_dir(o.model, bench.default_model))) {
    for (auto [bad, what] :
         {std::pair{o.method == "lst", "--method lst"}, std::pair{early_exit, "--early-exit"},
          std::pair{o.train_pooler, "--train-pooler"},
          std::pair{o.method == "bitfit", "--method bitfit (no biases)"}}) {
      if (bad) fail(bench.program, "{} does not apply to a decoder model ({})", what, o.model);
    }
  }
  // Data parallel: this process is one rank of the run the environment describes (--nproc set
  // it, or torchrun-style variables on several machines); nothing for a single process.
  const auto group = peft::init_distributed();
  const int world = group ? group->world_size() : 1;
  const int rank = group ? group->rank() : 0;
  if (group) {
    if (o.device != "cpu") {
      fail(bench.program,
           "--device {} with several processes needs NCCL, which peft does not support yet; "
           "data-parallel training runs on CPU (Gloo)",
           o.device);
    }
    if (o.batch_size % world != 0) {
      fail(bench.program,
           "--batch-size {} (the global batch) must be a multiple of the {} processes",
           o.batch_size, world);
    }
  }
  torch::Device device(torch::kCPU);
  if (o.device != "cpu") {
    if (!torch::cuda::is_available()) {
      fail(bench.program, "--device {}: this LibTorch has no CUDA or no GPU is visible", o.device);
    }
    device = torch::Device(o.device);
  }
  const auto precision = peft::parse_precision(o.precision);
  peft::check_precision(precision, device);
  if (o.threads > 0) torch::set_num_threads(static_cast<int>(o.threads));
  const double lr = o.lr > 0 ? o.lr : default_lr(o.method);

  // --data-dir may name the task's folder or the benchmark's root holding it.
  fs::path dir(o.data_dir);
  std::error_code ec;
  if (fs::is_directory(dir / bench.folder(task.name), ec)) dir /= bench.folder(task.name);
  const auto model_dir = examples::default_model_dir(o.model, bench.default_model);

  // Without an official dev file (CoLA, RTE and STS-B are often distributed without one), or
  // with --eval-split holdout, the validation rows are carved from train, always the same ones
  // (seed 0, before --max-train-samples) so every run of a task is measured on one split.
  auto eval_splits = o.eval_splits;
  if (eval_splits.empty()) {
    eval_splits = bench.eval_splits(task.name);
    for (auto& split : eval_splits) {
      if (split == o.train_split || !bench.has_split(task.name, dir, split)) split = "holdout";
    }
    // MNLI without either dev file: one holdout, not two.
    eval_splits.erase(std::unique(eval_splits.begin(), eval_splits.end()), eval_splits.end());
  }
  const bool holdout =
      std::find(eval_splits.begin(), eval_splits.end(), "holdout") != eval_splits.end();
  auto train = bench.read(task.name, dir, o.train_split,
                          peft::data::ReadOptions().max_samples(
                              holdout ? 0 : static_cast<size_t>(o.max_train_samples)));
  if (train.empty()) fail(bench.program, "{}: no training examples", dir.string());
  std::vector<peft::data::Example> held;
  if (holdout) {
    const auto rows = train.size();
    std::tie(train, held) = peft::data::split_holdout(
        train, peft::data::holdout_size(rows, o.holdout, kHoldoutCap), kHoldoutSeed);
    if (o.max_train_samples > 0 && train.size() > static_cast<size_t>(o.max_train_samples)) {
      train.resize(static_cast<size_t>(o.max_train_samples));
    }
    std::cout << fmt::format(
        "validation: holdout of {} of the {} {} rows ({:g} %, at most {}, seed {}){}\n",
        held.size(), rows, o.train_split, 100 * o.holdout, kHoldoutCap, kHoldoutSeed,
        o.eval_splits.empty() ? "; the default evaluation split is missing or trained on" : "");
  }
  std::vector<std::pair<std::string, std::vector<peft::data::Example>>> evals;
  for (const auto& split : eval_splits) {
    if (split == "holdout") {
      evals.emplace_back(split, held);
      if (o.max_eval_samples > 0 && held.size() > static_cast<size_t>(o.max_eval_samples)) {
        evals.back().second.resize(static_cast<size_t>(o.max_eval_samples));
      }
      continue;
    }
    evals.emplace_back(
        split,
        bench.read(task.name, dir, split,
                   peft::data::ReadOptions().max_samples(static_cast<size_t>(o.max_eval_samples))));
    if (evals.back().second.empty())
      fail(bench.program, "{}: split {} has no examples", dir.string(), split);
  }

  const auto tokenizer_ptr = peft::text::load_tokenizer(model_dir);
  const auto& tokenizer = *tokenizer_ptr;
  detail::shuffle(train, o.seed);
  const size_t global_train_rows = train.size();
  // Tokenised once; with --group-by-length the trainer gets batches formed again every epoch
  // from examples of similar length, and evaluation runs in length order. Each rank trains on
  // its share of every global batch, and scores its share of each split.
  const auto train_encoded = std::make_shared<const peft::EncodedExamples>(
      peft::encode_examples(train, tokenizer, o.max_len, task.is_pair, task.is_regression()));
  std::vector<size_t> train_rows(train.size());
  for (size_t i = 0; i < train_rows.size(); ++i) train_rows[i] = i;
  if (group) train_rows = peft::shard_for_rank(train_rows, world, rank);
  const auto grouped_source = o.group_by_length
                                  ? std::optional(peft::length_grouped_source(
                                        train_encoded, o.batch_size, o.seed, 50, world, rank))
                                  : std::nullopt;
  // The batches in order: what the trainer gets without grouping; with it, only the first few
  // that LST's Fisher initialisation reads (build_classifier), not a padded copy of everything.
  if (grouped_source) {
    const auto keep =
        static_cast<size_t>(std::max<int64_t>(o.lst_fisher_batches, 1) * (o.batch_size / world));
    train_rows.resize(std::min(train_rows.size(), keep));
  }
  const auto train_batches = train_encoded->batches_of(train_rows, o.batch_size / world);
  const auto batches_per_epoch = grouped_source ? grouped_source->batches_per_epoch
                                                : static_cast<int64_t>(train_batches.size());
  std::vector<std::pair<std::string, std::vector<Batch>>> eval_batches;
  std::string eval_summary;
  for (const auto& [split, examples] : evals) {
    const auto encoded =
        peft::encode_examples(group ? peft::shard_for_evaluation(examples, world, rank) : examples,
                              tokenizer, o.max_len, task.is_pair, task.is_regression());
    eval_batches.emplace_back(split, o.group_by_length
                                         ? peft::length_sorted_batches(encoded, o.eval_batch_size)
                                         : encoded.batches(o.eval_batch_size));
    eval_summary +=
        fmt::format("{}{} {}", eval_summary.empty() ? "" : ", ", split, examples.size());
  }

  // The seed fixes the new head's and the method's initial values, so --resume rebuilds the
  // same model before loading the checkpoint into it.
  torch::manual_seed(static_cast<uint64_t>(o.seed));
  const auto model =
      build_classifier(o, model_dir, task.num_labels, train_batches, task.is_regression());
  const auto& sites = model.sites;

  const std::string labels =
      task.is_regression() ? "regression" : fmt::format("{} classes", task.num_labels);
  std::cout << fmt::format("{}: task {} ({}), data {}\n", bench.program, task.name, labels,
                           dir.string())
            << fmt::format("model {}; {} pooling{}\n", model_dir.string(),
                           is_decoder(model_dir) ? "last-token" : o.pooling,
                           model.dropout_note.empty() ? "" : "; " + model.dropout_note)
            << fmt::format("train {} examples in {} batches of up to {}; eval {}; max length {}\n",
                           global_train_rows, batches_per_epoch, o.batch_size, eval_summary,
                           o.max_len)
            << fmt::format("method {}: {}{}{}\n", o.method, describe_method(o),
                           sites.empty() ? "" : fmt::format(" ({} sites)", sites.size()),
                           o.train_pooler ? "; the pooler trains too" : "");
  const auto count = peft::count_parameters(*model.root);
  // What --output stores: every trained tensor (the method's, the head's, the pooler's if
  // trained; for full fine-tuning the whole model), and the frozen tensors a method stores with
  // them (shared frozen matrices).
  int64_t frozen_method_bytes = 0;
  std::set<const void*> counted;
  for (auto& [path, m] : peft::attached_methods(*model.root)) {
    for (const auto& b : m->buffers()) {
      if (!counted.insert(b.unsafeGetTensorImpl()).second) continue;
      frozen_method_bytes += b.numel() * static_cast<int64_t>(b.element_size());
    }
  }
  const int64_t adapter_bytes = count.trainable_bytes + frozen_method_bytes;
  std::cout << fmt::format("{}; method {} bytes, saved {} bytes; lr {}{}\n",
                           peft::trainable_report(count), model.method_bytes, adapter_bytes, lr,
                           o.head_lr > 0 ? fmt::format(", head lr {}", o.head_lr) : "");
  if (o.method == "propetl") {
    const auto storage = peft::propetl_storage(*model.root);
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
  std::cout << std::flush;

  const bool regression = task.is_regression();
  auto loss_fn = [&](const Batch& b) {
    return model.loss ? model.loss(b) : task_loss(model.logits(b), b, regression);
  };
  auto options = peft::TrainerOptions()
                     .epochs(o.epochs)
                     .max_steps(o.max_steps > 0 ? o.max_steps : -1)
                     .lr(lr)
                     .weight_decay(o.weight_decay)
                     .warmup_ratio(o.warmup_ratio)
                     .grad_clip(o.grad_clip)
                     .eval_every(o.eval_every)
                     .save_every(o.save_every)
                     .seed(o.seed)
                     .device(device)
                     .precision(precision)
                     .output_dir(o.output)
                     .progress_stream(&std::cout)
                     .collective(group);
  if (o.head_lr > 0) {
    // With --exit-from the last layer's head is loaded and frozen.
    if (o.exit_from.empty()) options.lr_for(model.head, o.head_lr);
    if (early_exit) options.lr_for("exits", o.head_lr).lr_for("predictor", o.head_lr);
  }
  // The method's own rates, from its registry entry: LoRA+'s B matrices, ProPETL's
  // mask scores.
  if (o.method != "full" && o.exit_from.empty()) {
    const auto settings = method_options(o);
    if (const auto rules = peft::method_entry(o.method).lr_rules) {
      for (const auto& [pattern, rate] : rules(lr, settings)) options.lr_for(pattern, rate);
    }
  }
  peft::Trainer<Batch> trainer(model.root, loss_fn, options);
  // What the optimizer really holds: a line per parameter group.
  for (const auto& group : trainer.optimizer().param_groups()) {
    const auto* adamw = dynamic_cast<const torch::optim::AdamWOptions*>(&group.options());
    std::cout << fmt::format("optimizer group: lr {}, weight decay {}, {} tensors\n",
                             group.options().get_lr(), adamw ? adamw->weight_decay() : 0.0,
                             group.params().size());
  }
  if (precision != peft::Precision::fp32) {
    std::cout << fmt::format(
        "precision: {} autocast on {} (parameters and optimizer state float32{})\n",
        peft::precision_name(precision), device.str(),
        precision == peft::Precision::fp16 ? ", dynamic loss scale" : "");
  }

  // Metric names get the split in front when there are several (MNLI's two dev sets).
  auto metric_name = [&](const std::string& split, const std::string& metric) {
    return eval_batches.size() > 1 ? split + "." + metric : metric;
  };
  trainer.evaluate_with([&] {
    std::map<std::string, double> out;
    for (const auto& [split, batches] : eval_batches) {
      for (const auto& [name, value] :
           split_metrics(task, batches, device, model.logits, group.get())) {
        out[metric_name(split, name)] = value;
      }
    }
    return out;
  });

  if (group) {
    std::cout << fmt::format(
        "data parallel: {} processes (Gloo), {} rows each per step; {} bytes of gradients "
        "averaged per step\n",
        world, o.batch_size / world, count.trainable_bytes);
  }
  // Rank 0 alone prepares (and may clear) --output; the others wait for it.
  if (rank == 0) {
    peft::prepare_output_dir(
        o.output, peft::OutputDirOptions()
                      .resume(o.resume)
                      .overwrite(o.overwrite)
                      .hint("pass --resume to continue it or --overwrite to replace it"));
  }
  if (group) group->barrier("preparing --output");
  if (o.resume) {
    if (trainer.resume()) {
      std::cout << fmt::format("resuming from step {} of {}\n", trainer.state().global_step,
                               trainer.state().total_steps);
    } else {
      std::cout << fmt::format("no checkpoint in {}; starting from the beginning\n", o.output);
    }
  }

  const auto start = std::chrono::steady_clock::now();
  const auto result = grouped_source ? trainer.fit(*grouped_source) : trainer.fit(train_batches);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();

  const auto key = metric_name(eval_splits.front(), task.metrics.front());
  const auto found = result.last_metrics.find(key);
  if (found == result.last_metrics.end()) {
    fail(bench.program, "the run ended without an evaluation of {}", key);
  }
  std::cout << fmt::format("trained {} steps in {:.1f} s ({:.1f} s of it evaluating); {} {:.4f}\n",
                           result.steps, seconds, result.eval_seconds, key, found->second);
  if (group) {
    // Measured on this rank: what the reductions carried and how long they took (including
    // waits for the other ranks), the ceiling on what overlapping them with backward could save.
    std::cout << fmt::format(
        "data parallel: {} bytes reduced per step ({} in all), {:.2f} s of {:.1f} s in "
        "reductions ({:.1f} %)\n",
        group->reduced_bytes() / std::max<int64_t>(result.steps, 1), group->reduced_bytes(),
        group->reduce_seconds(), seconds,
        100.0 * group->reduce_seconds() / std::max(seconds, 1e-9));
  }
  nlohmann::ordered_json line;
  line["task"] = task.name;
  line["method"] = o.method;
  line["metric"] = key;
  line["value"] = number(found->second);
  line["trainable_params"] = count.trainable;
  line["total_params"] = count.total;
  line["adapter_bytes"] = adapter_bytes;
  line["train_seconds"] = round_to(seconds, 2);
  // Of train_seconds, the evaluations at epoch ends (and every --eval-every steps).
  line["eval_seconds"] = round_to(result.eval_seconds, 2);
  line["peak_rss_mb"] = round_to(peak_rss_mb(), 1);
  if (early_exit) {
    line["early_exit"] = exit_sweep(o, task, eval_splits.front(), eval_batches.front().second,
                                    device, model.early_exit, group);
  }
  const auto text = line.dump();
  if (rank == 0) save_result(o, model, text);
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
                 "and FFN (default: the recipe's, else the config's hidden_dropout_prob and "
                 "attention_probs_dropout_prob)")
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
                 "(the LST paper's pre-norm T5 block)")
      ->check(CLI::IsMember(peft::enum_names<peft::LadderBlock>()));
  app.add_option("--lst-init", o.lst_init,
                 "side network start: magnitude (prune the backbone by |w|), fisher (prune by "
                 "Fisher information from training batches) or random")
      ->check(CLI::IsMember({"magnitude", "fisher", "random"}));
  app.add_option("--lst-fisher-batches", o.lst_fisher_batches,
                 "training batches --lst-init fisher estimates the Fisher information from")
      ->check(CLI::PositiveNumber);

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
