#pragma once

// Fine-tuning a pretrained model on one's own labelled texts, in a few calls: the model and its
// tokenizer from a Hugging Face BERT folder or a decoder's GGUF file, any registered method by
// name with JSON options (or Ladder Side-Tuning, or every weight), batching, the trainer (AdamW,
// warm-up and decay, clipping, checkpoints and resuming, mixed precision, data parallel),
// evaluation on named splits, early exit and saving. This is the layer above the library's parts
// (models, text, data, methods, train): examples/custom_task.cpp uses it in under 80 lines, and
// peft-glue / peft-clue are a command line around it.
//
//     auto train = peft::data::read_table("train.csv");
//     peft::TextClassifier classifier(model_folder, train.num_labels(),
//                                     peft::TextClassifierOptions().method("lora").epochs(3));
//     classifier.fit(train.examples, dev.examples);
//     auto scores = classifier.evaluate(dev.examples);   // {"accuracy": ..., "f1": ...}
//     classifier.save("out/my-adapter");

#include <torch/arg.h>
#include <torch/nn/functional/loss.h>
#include <torch/optim/adamw.h>
#include <torch/types.h>
#include <torch/utils.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <ostream>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <peft/config.hpp>
#include <peft/core/attach.hpp>
#include <peft/core/error.hpp>
#include <peft/core/parameters.hpp>
#include <peft/core/registry.hpp>
#include <peft/data/example.hpp>
#include <peft/data/split.hpp>
#include <peft/io/adapter_format.hpp>
#include <peft/io/safetensors.hpp>
#include <peft/methods/ladder.hpp>
#include <peft/models/early_exit.hpp>
#include <peft/models/heads.hpp>
#include <peft/models/ladder_heads.hpp>
#include <peft/models/llama.hpp>
#include <peft/models/llama_ladder.hpp>
#include <peft/tasks/exit_sweep.hpp>
#include <peft/tasks/text_batches.hpp>
#include <peft/text/load.hpp>
#include <peft/train/accumulator.hpp>
#include <peft/train/collective.hpp>
#include <peft/train/metrics.hpp>
#include <peft/train/output_dir.hpp>
#include <peft/train/precision.hpp>
#include <peft/train/trainer.hpp>

PEFT_NAMESPACE_BEGIN

/// How a TextClassifier is built and trained. Defaults: the setting that trained best with the
/// default model in docs/RESULTS.md's search (LoRA as LoRA+ with the model's dropout off, mean
/// pooling, batch 16, three epochs).
struct TextClassifierOptions {
  /// The types of log and option_names (TORCH_ARG needs a single-token-safe type).
  using OstreamPtr = std::ostream*;
  using OptionNames = std::map<std::string, std::string>;

  // ---- the model and the method
  /// A registered method (peft::method_names()), "lst" (Ladder Side-Tuning: a side network beside
  /// the frozen model, options in `ladder`) or "full" (every weight trains).
  TORCH_ARG(std::string, method) = "lora";
  /// The method's options as JSON (its adapter_config.json keys); missing keys take defaults.
  TORCH_ARG(nlohmann::json, method_options) = nlohmann::json::object();
  /// BERT's classifier input: "mean" (the mean of the token states) or "cls" (BERT's pooler). A
  /// decoder classifies from its last real token whatever this says.
  TORCH_ARG(std::string, pooling) = "mean";
  /// Dropout of the pretrained model (embeddings, attention, residual and FFN outputs), the head
  /// and LST's side network (unless ladder().dropout() is set) during training; below 0: the
  /// config's. Unset: 0 for methods (better on every task
  /// measured), the config's for "full".
  TORCH_ARG(std::optional<double>, model_dropout) = std::nullopt;
  /// Also train BERT's pooler, saved with the head (pooling "cls" only).
  TORCH_ARG(bool, train_pooler) = false;
  /// Early exit: "none", or a classifier after every layer and a confidence predictor trained
  /// with the method, exiting by "entropy", "patience" or "learned" confidence (choose_exit()
  /// picks the threshold after training).
  TORCH_ARG(std::string, early_exit) = "none";
  /// With early_exit: an earlier run's saved folder whose method and head are loaded and kept
  /// frozen; only the other exits and the predictor train.
  TORCH_ARG(std::filesystem::path, exit_from) = {};
  /// Method "lst": the side network.
  TORCH_ARG(LadderOptions, ladder) = {};
  /// Method "lst": rank the pruned start's weights by their empirical Fisher information over
  /// this many batches of `batch_size` of `fisher_examples` (shuffled with `seed`, as fit()
  /// shuffles); 0: by weight magnitude (or ladder.init()).
  TORCH_ARG(int64_t, ladder_fisher_batches) = 0;
  TORCH_ARG(std::vector<data::Example>, fisher_examples) = {};

  // ---- training
  TORCH_ARG(int64_t, epochs) = 3;
  /// Stop after this many optimizer steps (0: run the epochs).
  TORCH_ARG(int64_t, max_steps) = 0;
  /// The global batch: with a collective, each rank takes batch_size / world of its rows.
  TORCH_ARG(int64_t, batch_size) = 16;
  TORCH_ARG(int64_t, eval_batch_size) = 64;
  TORCH_ARG(int64_t, max_len) = 128;
  /// 0: the method's registry default (5e-5 for "full").
  TORCH_ARG(double, lr) = 0;
  /// The head's rate. Unset: 3e-3 for methods, lr for "full"; 0: lr.
  TORCH_ARG(std::optional<double>, head_lr) = std::nullopt;
  /// LoRA+: LoRA's B matrices learn this many times faster (methods whose learning-rate rules read
  /// loraplus_lr_ratio, when method_options do not set it; 0: off).
  TORCH_ARG(double, lora_plus_ratio) = 8;
  TORCH_ARG(double, weight_decay) = 0.01;
  TORCH_ARG(double, warmup_ratio) = 0.06;
  TORCH_ARG(double, grad_clip) = 1.0;
  /// Evaluate every N steps (0: at each epoch end).
  TORCH_ARG(int64_t, eval_every) = 0;
  /// Also checkpoint every N steps into output_dir (0: only at evaluations).
  TORCH_ARG(int64_t, save_every) = 0;
  /// Fixes the new head's and the method's initial values (set at construction), the data order
  /// and dropout.
  TORCH_ARG(int64_t, seed) = 42;
  /// Batches of examples of similar length (length_grouped_batches), formed again each epoch,
  /// and evaluation in length order: less padding, the same metrics.
  TORCH_ARG(bool, group_by_length) = true;
  TORCH_ARG(torch::Device, device) = torch::kCPU;
  /// fp32, or autocast to bf16 / fp16 (parameters and optimizer state stay float32).
  TORCH_ARG(Precision, precision) = Precision::fp32;
  /// Data parallel: this process is one rank of the group (init_distributed()); every rank
  /// passes the same examples and trains on its share of each global batch.
  TORCH_ARG(std::shared_ptr<Collective>, collective) = nullptr;
  /// The metrics evaluate() and fit() report (peft::metrics names, the first ranking); empty:
  /// accuracy and F1 (two classes), accuracy and macro F1 (more), Pearson and Spearman (one).
  TORCH_ARG(std::vector<std::string>, metrics) = {};

  // ---- files and messages
  /// Checkpoints and metrics.jsonl go here during fit(); empty: nothing is written.
  TORCH_ARG(std::filesystem::path, output_dir) = {};
  /// Whether fit() may replace an earlier run's files in output_dir (prepare_output_dir: else
  /// an earlier run there is an error, so that two runs never mix in one log).
  TORCH_ARG(bool, overwrite) = false;
  /// Continue the run checkpointed in output_dir (from its beginning when there is none).
  TORCH_ARG(bool, resume) = false;
  /// What the error about an earlier run in output_dir suggests.
  TORCH_ARG(std::string, output_hint) = "set resume to continue it or overwrite to replace it";
  /// Where fit() describes the run (model, data, method, parameters, optimizer groups) and shows
  /// its progress; null: progress on stderr, no description.
  TORCH_ARG(OstreamPtr, log) = nullptr;
  /// How error messages name these options: a program passes its flags ({"train_pooler":
  /// "--train-pooler", ...}); an option not listed is named as here.
  TORCH_ARG(OptionNames, option_names) = {};
};

/// A classifier (or regressor, with one label) over a pretrained BERT-family model or decoder
/// with a method attached (or a ladder side network, or every weight trainable), its tokenizer,
/// and fit / evaluate / predict / choose_exit / save.
class TextClassifier {
 public:
  /// Named evaluation splits: ("dev", examples), ...
  using Splits = std::vector<std::pair<std::string, std::vector<data::Example>>>;

  /// Loads the model and tokenizer at `model_path` (a Hugging Face BERT folder: config.json,
  /// model.safetensors and the tokenizer's files; or a decoder's .gguf file) with a new head of
  /// `num_labels` outputs (1: regression), seeds LibTorch with options.seed() and attaches the
  /// method. Throws peft::Error on a missing file, an unknown method, bad options or options that
  /// do not go together.
  TextClassifier(const std::filesystem::path& model_path, int64_t num_labels,
                 TextClassifierOptions options = {})
      : options_(std::move(options)), num_labels_(num_labels) {
    check_options(model_path);
    tokenizer_ = text::load_tokenizer(model_path);
    // The seed fixes the new head's and the method's initial values, so resuming rebuilds the
    // same model before loading the checkpoint into it.
    torch::manual_seed(static_cast<uint64_t>(options_.seed()));
    decoder_ = is_decoder(model_path);
    if (decoder_) {
      build_decoder(model_path);
    } else if (options_.method() == "lst") {
      build_ladder(model_path);
    } else if (options_.early_exit() != "none") {
      build_early_exit(model_path);
    } else {
      auto model = models::BertForSequenceClassification::from_pretrained(
          model_path, num_labels_, models::pooling_from_string(options_.pooling()));
      set_dropout(*model->bert, model->dropout);
      sites_ = attach_method(*model->bert);
      if (options_.train_pooler()) unfreeze(*model->bert->pooler);
      root_ = model.ptr();
      logits_ = [model](const TextBatch& b) mutable {
        return model(b.input_ids, b.attention_mask, b.token_type_ids);
      };
      method_bytes_ = adapter_bytes(*model);
    }
    model_path_ = model_path;
  }

  /// Trains on `train`, evaluating on `eval` (as split "eval") at every epoch end when it is not
  /// empty. See the other overload.
  TrainResult fit(const std::vector<data::Example>& train,
                  const std::vector<data::Example>& eval = {}) {
    return eval.empty() ? fit(train, Splits{}) : fit(train, Splits{{"eval", eval}});
  }

  /// Trains on `train` (shuffled with the seed and tokenised once; with group_by_length the
  /// batches are formed again every epoch from examples of similar length, otherwise in the
  /// shuffled order with the batch order shuffled every epoch), evaluating every split of `evals`
  /// at each epoch end (and every eval_every steps). Metric names are the metrics' own with one
  /// split, "<split>.<metric>" with several. With output_dir, checkpoints and metrics.jsonl go
  /// there (an earlier run's files only with overwrite or resume). With a collective every rank
  /// calls fit() with the same examples.
  TrainResult fit(const std::vector<data::Example>& train, const Splits& evals) {
    check(!train.empty(), "text_classifier", "no training examples");
    const auto& group = options_.collective();
    const int world = group ? group->world_size() : 1;
    const int rank = group ? group->rank() : 0;
    // Rank 0 alone prepares (and may clear) output_dir; the others wait for it.
    if (rank == 0) {
      prepare_output_dir(options_.output_dir(), OutputDirOptions()
                                                    .resume(options_.resume())
                                                    .overwrite(options_.overwrite())
                                                    .hint(options_.output_hint()));
    }
    if (group) group->barrier("preparing the output folder");

    const auto encoded =
        std::make_shared<const EncodedExamples>(encode(train, shuffled_rows(train.size())));
    std::optional<BatchSource<TextBatch>> grouped;
    std::vector<TextBatch> ordered;
    if (options_.group_by_length()) {
      grouped =
          length_grouped_source(encoded, options_.batch_size(), options_.seed(), 50, world, rank);
    } else {
      std::vector<size_t> rows(encoded->size());
      for (size_t i = 0; i < rows.size(); ++i) rows[i] = i;
      if (group) rows = shard_for_rank(rows, world, rank);
      ordered = encoded->batches_of(rows, options_.batch_size() / world);
    }
    eval_batches_.clear();
    std::string eval_summary;
    for (const auto& [split, examples] : evals) {
      check(!examples.empty(), "text_classifier", "evaluation split {} has no examples", split);
      const auto e = encode(group ? shard_for_evaluation(examples, world, rank) : examples);
      eval_batches_.emplace_back(split, options_.group_by_length()
                                            ? length_sorted_batches(e, options_.eval_batch_size())
                                            : e.batches(options_.eval_batch_size()));
      eval_summary +=
          fmt::format("{}{} {}", eval_summary.empty() ? "" : ", ", split, examples.size());
    }
    const auto count = count_parameters(*root_);
    const double lr = learning_rate();
    if (auto* log = options_.log()) {
      *log << fmt::format("model {}; {} pooling{}\n", model_path_.string(),
                          is_decoder(model_path_) ? "last-token" : options_.pooling(),
                          dropout_note_.empty() ? "" : "; " + dropout_note_)
           << fmt::format(
                  "train {} examples in {} batches of up to {}; eval {}; max length {}\n",
                  train.size(),
                  grouped ? grouped->batches_per_epoch : static_cast<int64_t>(ordered.size()),
                  options_.batch_size(), eval_summary.empty() ? "none" : eval_summary,
                  options_.max_len())
           << fmt::format("method {}: {}{}{}\n", options_.method(), describe_method(),
                          sites_.empty() ? "" : fmt::format(" ({} sites)", sites_.size()),
                          options_.train_pooler() ? "; the pooler trains too" : "")
           << fmt::format("{}; method {} bytes, saved {} bytes; lr {}{}\n", trainable_report(count),
                          method_bytes_, saved_bytes(), lr,
                          head_lr() > 0 ? fmt::format(", head lr {}", head_lr()) : "");
    }

    const bool regression = num_labels_ == 1;
    auto loss = loss_;
    if (!loss) {
      loss = [logits = logits_, regression](const TextBatch& b) {
        return task_loss(logits(b), b.labels, regression);
      };
    }
    Trainer<TextBatch> trainer(root_, loss, trainer_options(lr));
    if (!eval_batches_.empty()) {
      trainer.evaluate_with([this] {
        std::map<std::string, double> out;
        for (const auto& [split, batches] : eval_batches_) {
          for (const auto& [metric, value] : score(batches)) {
            out[eval_batches_.size() > 1 ? split + "." + metric : metric] = value;
          }
        }
        return out;
      });
    }
    if (auto* log = options_.log()) {
      // What the optimizer really holds: a line per parameter group.
      for (const auto& g : trainer.optimizer().param_groups()) {
        const auto* adamw = dynamic_cast<const torch::optim::AdamWOptions*>(&g.options());
        *log << fmt::format("optimizer group: lr {}, weight decay {}, {} tensors\n",
                            g.options().get_lr(), adamw ? adamw->weight_decay() : 0.0,
                            g.params().size());
      }
      if (options_.precision() != Precision::fp32) {
        *log << fmt::format(
            "precision: {} autocast on {} (parameters and optimizer state float32{})\n",
            precision_name(options_.precision()), options_.device().str(),
            options_.precision() == Precision::fp16 ? ", dynamic loss scale" : "");
      }
      if (group) {
        *log << fmt::format(
            "data parallel: {} processes (Gloo), {} rows each per step; {} bytes of gradients "
            "averaged per step\n",
            world, options_.batch_size() / world, count.trainable_bytes);
      }
    }
    if (options_.resume()) {
      const bool resumed = trainer.resume();
      if (auto* log = options_.log()) {
        *log << (resumed ? fmt::format("resuming from step {} of {}\n", trainer.state().global_step,
                                       trainer.state().total_steps)
                         : fmt::format("no checkpoint in {}; starting from the beginning\n",
                                       options_.output_dir().string()));
      }
    }
    if (auto* log = options_.log()) log->flush();
    return grouped ? trainer.fit(*grouped) : trainer.fit(ordered);
  }

  /// Class indices (or scores, for regression) of `examples`, in their order, in eval mode.
  std::vector<float> predict(const std::vector<data::Example>& examples) {
    EvalMode eval_mode(*root_);
    std::vector<size_t> order;
    const auto encoded = encode(examples);
    const auto batches = options_.group_by_length()
                             ? length_sorted_batches(encoded, options_.eval_batch_size(), &order)
                             : encoded.batches(options_.eval_batch_size());
    std::vector<float> sorted;
    for (const auto& raw : batches) {
      auto logits = logits_(raw.to(options_.device()));
      auto values = num_labels_ == 1 ? logits.squeeze(-1) : logits.argmax(-1);
      values = values.to(torch::kCPU, torch::kFloat).contiguous();
      sorted.insert(sorted.end(), values.data_ptr<float>(),
                    values.data_ptr<float>() + values.numel());
    }
    if (order.empty()) return sorted;
    std::vector<float> out(sorted.size());
    for (size_t i = 0; i < order.size(); ++i) out[order[i]] = sorted[i];
    return out;
  }

  /// The metrics (options' `metrics`, or by the number of labels) of `examples`. With a
  /// collective every rank passes the same examples, scores its share, and gets the metrics of
  /// all of them.
  std::map<std::string, double> evaluate(const std::vector<data::Example>& examples) {
    check(!examples.empty(), "text_classifier", "no examples to evaluate");
    const auto& group = options_.collective();
    const auto encoded = encode(
        group ? shard_for_evaluation(examples, group->world_size(), group->rank()) : examples);
    // The metrics do not depend on the rows' order: length order pads least.
    return score(options_.group_by_length()
                     ? length_sorted_batches(encoded, options_.eval_batch_size())
                     : encoded.batches(options_.eval_batch_size()));
  }

  /// After training with early_exit: measures the full model and each threshold (default: a
  /// sweep per policy) on the first evaluation split of the last fit() (`timings` passes each,
  /// the fastest kept; with a collective each rank scores its share), logs the curve, and keeps
  /// on the model the fastest threshold within one point (0.01) of the full model's first
  /// metric, or the most cautious one when none is (saved by save()).
  ExitSweep choose_exit(const std::vector<double>& thresholds = {}, int timings = 3) {
    check(!early_exit_model_.is_empty(), "text_classifier",
          "choose_exit() needs a classifier built with early_exit");
    check(!eval_batches_.empty(), "text_classifier",
          "choose_exit() measures on the first evaluation split of fit(), and fit() had none");
    const auto& [split, batches] = eval_batches_.front();
    const auto policy = models::exit_policy_from_string(options_.early_exit());
    const auto metric = metric_names().front();
    auto* log = options_.log();
    const auto count = thresholds.empty()
                           ? default_exit_thresholds(policy, early_exit_model_->num_layers()).size()
                           : thresholds.size();
    if (log) {
      *log << fmt::format(
                  "early exit: timing the full model and {} threshold{} on {}, {} passes each...\n",
                  count, count == 1 ? "" : "s", split, timings)
           << std::flush;
    }
    auto sweep = sweep_exit_thresholds(*early_exit_model_, batches, metric, policy,
                                       ExitSweepOptions()
                                           .thresholds(thresholds)
                                           .timings(timings)
                                           .device(options_.device())
                                           .collective(options_.collective()));
    if (log) {
      const auto& full = sweep.full;
      *log << fmt::format(
          "early exit on {} ({} examples; time: the fastest of {} passes): full model {} {:.4f}, "
          "{} layers, {:.2f} s\n",
          split, sweep.examples, timings, metric, full.metric, early_exit_model_->num_layers(),
          full.seconds);
      for (const auto& p : sweep.points) {
        *log << fmt::format(
            "  {} {:<5g} {} {:.4f} ({:+.2f} points), mean layers {:.2f}, {:.2f} s, {:.2f}x "
            "faster\n",
            options_.early_exit(), p.threshold, metric, p.metric, 100 * (p.metric - full.metric),
            p.mean_layers, p.seconds, full.seconds / p.seconds);
      }
      *log << fmt::format("early exit kept: {} {:g} ({})\n", options_.early_exit(),
                          sweep.chosen().threshold,
                          sweep.within_tolerance ? "fastest within 1 point"
                                                 : "none within 1 point; the most cautious");
    }
    return sweep;
  }

  /// Saves what was trained to `dir`: the adapter and head as Hugging Face PEFT's
  /// adapter_config.json + adapter_model.safetensors (peft::save_adapter; with train_pooler the
  /// pooler too), or for a method without a file format ("full") every trained tensor, head
  /// included, in model.safetensors.
  void save(const std::filesystem::path& dir) {
    std::filesystem::create_directories(dir);
    if (!has_adapter_format(options_.method())) {
      io::save_safetensors(dir / "model.safetensors", named_trainable_parameters(*root_),
                           {{"format", "pt"}});
      return;
    }
    auto save = SaveAdapterOptions();
    if (options_.train_pooler()) {
      std::vector<std::string> heads{"classifier", "bert.pooler"};
      if (!early_exit_model_.is_empty()) heads.insert(heads.end(), {"exits", "predictor"});
      save.modules_to_save(heads);
    }
    save_adapter(*root_, dir, save);
  }

  /// The model's root module (what is counted, optimised, checkpointed and saved).
  torch::nn::Module& model() { return *root_; }
  std::shared_ptr<torch::nn::Module> model_ptr() const { return root_; }
  /// Logits [N, num_labels] of a batch (on the model's device).
  torch::Tensor logits(const TextBatch& batch) const { return logits_(batch); }
  const text::Tokenizer& tokenizer() const { return *tokenizer_; }
  const TextClassifierOptions& options() const { return options_; }
  int64_t num_labels() const { return num_labels_; }
  /// Where the method was attached (empty for "full" and "lst", which attach nothing).
  const std::vector<std::string>& sites() const { return sites_; }
  /// The metric names evaluate() reports, the first ranking.
  std::vector<std::string> metric_names() const {
    if (!options_.metrics().empty()) return options_.metrics();
    if (num_labels_ == 1) return {"pearson", "spearman"};
    if (num_labels_ == 2) return {"accuracy", "f1"};
    return {"accuracy", "macro_f1"};
  }
  /// Bytes of the method's own parameters (without the head).
  int64_t method_bytes() const { return method_bytes_; }
  /// Bytes save() stores: every trained tensor (the method's, the head's, the pooler's if
  /// trained; for "full" the whole model) and the frozen tensors a method stores with them
  /// (shared frozen matrices).
  int64_t saved_bytes() const {
    int64_t bytes = count_parameters(*root_).trainable_bytes;
    std::set<const void*> counted;
    for (auto& [path, m] : attached_methods(*root_)) {
      for (const auto& b : m->buffers()) {
        if (!counted.insert(b.unsafeGetTensorImpl()).second) continue;
        bytes += b.numel() * static_cast<int64_t>(b.element_size());
      }
    }
    return bytes;
  }
  /// One line on the method's settings: its registry summary and the options it was attached
  /// with (LST: the side network's shape).
  std::string describe_method() const {
    if (options_.method() == "full") return "every backbone parameter trains";
    if (options_.method() == "lst") {
      const auto l = ladder_options();
      std::vector<std::string> layers;
      for (auto i : l.layers()) layers.push_back(std::to_string(i));
      return fmt::format(
          "side network of width / {} fed by {} layers, {} blocks, {} init, dropout {}",
          l.reduction_factor(), layers.empty() ? std::string("all") : data::detail::join(layers),
          enum_name(decoder_ ? LadderBlock::Llama : l.block()),
          options_.ladder_fisher_batches() > 0 ? "fisher"
          : l.init() == LadderInit::Random     ? "random"
                                               : "magnitude",
          l.dropout() ? fmt::format("{:g}", *l.dropout())
          : decoder_  ? std::string("0")
                      : std::string("as the model's config"));
    }
    return fmt::format("{}; options {}", method_entry(options_.method()).summary,
                       options_.method_options().dump());
  }

  /// The rate `method` trains at when none is given: its registry entry's, 5e-5 for "full"
  /// (the added-parameter methods start from zero or small random values and need a larger step
  /// than full fine-tuning, which would wreck the pretrained weights at those rates).
  static double default_lr(const std::string& method) {
    return method == "full" ? 5e-5 : method_entry(method).default_lr;
  }

  /// The training loss of a batch's logits: mean squared error for regression (one output),
  /// cross-entropy otherwise.
  static torch::Tensor task_loss(const torch::Tensor& logits, const torch::Tensor& labels,
                                 bool regression) {
    // Under autocast the scores may be bfloat16 or float16; the error is taken in the labels'
    // type.
    if (regression) return torch::mse_loss(logits.squeeze(-1).to(labels.scalar_type()), labels);
    return torch::nn::functional::cross_entropy(logits, labels);
  }

 private:
  /// Puts a module in eval mode without gradients for a scope, restoring its mode after.
  struct EvalMode {
    explicit EvalMode(torch::nn::Module& m) : module(m), was_training(m.is_training()) {
      module.eval();
    }
    ~EvalMode() { module.train(was_training); }
    EvalMode(const EvalMode&) = delete;
    EvalMode& operator=(const EvalMode&) = delete;
    torch::nn::Module& module;
    bool was_training;
    torch::NoGradGuard no_grad;
  };

  static bool is_decoder(const std::filesystem::path& path) { return path.extension() == ".gguf"; }

  /// An option's name in messages (option_names, else its own).
  std::string name(const std::string& option) const {
    const auto it = options_.option_names().find(option);
    return it == options_.option_names().end() ? option : it->second;
  }

  /// Refuses options that do not go together, naming them as option_names says.
  void check_options(const std::filesystem::path& model_path) const {
    const auto& o = options_;
    check(num_labels_ >= 1, "text_classifier", "num_labels must be positive, got {}", num_labels_);
    const bool early_exit = o.early_exit() != "none";
    if (const auto& group = o.collective()) {
      check(o.batch_size() % group->world_size() == 0, "text_classifier",
            "{} {} (the global batch) must be a multiple of the {} processes", name("batch_size"),
            o.batch_size(), group->world_size());
      check(o.device().is_cpu(), "text_classifier",
            "{} {} with several processes needs NCCL, which peft does not support yet; "
            "data-parallel training runs on CPU (Gloo)",
            name("device"), o.device().str());
    }
    check(o.method_options().is_object(), "text_classifier",
          "method_options must be a JSON object, got {}", o.method_options().dump());
    check(o.method_options().empty() || (o.method() != "full" && o.method() != "lst"),
          "text_classifier", "{} {} takes no {}, got {}", name("method"), o.method(),
          name("method_options"), o.method_options().dump());
    check(!(o.train_pooler() && o.method() == "lst"), "text_classifier",
          "{} does not apply to {} lst (its head reads the side network, not BERT's pooler)",
          name("train_pooler"), name("method"));
    check(!(o.train_pooler() && o.pooling() == "mean"), "text_classifier",
          "{} does not apply to {} mean (the classifier reads the mean of the token states; "
          "BERT's pooler is not used)",
          name("train_pooler"), name("pooling"));
    if (early_exit) {
      models::exit_policy_from_string(o.early_exit());
      check(o.method() != "lst", "text_classifier",
            "{} does not apply to {} lst (its head reads the side network's last layer)",
            name("early_exit"), name("method"));
      check(num_labels_ >= 2, "text_classifier",
            "{} needs a classification task, not regression (one label)", name("early_exit"));
    } else {
      check(o.exit_from().empty(), "text_classifier", "{} needs {}", name("exit_from"),
            name("early_exit"));
    }
    check(o.ladder_fisher_batches() == 0 || o.method() == "lst", "text_classifier",
          "{} applies to {} lst only", name("ladder_fisher_batches"), name("method"));
    check(o.ladder_fisher_batches() == 0 || !o.fisher_examples().empty(), "text_classifier",
          "{} needs fisher_examples (the training examples)", name("ladder_fisher_batches"));
    if (is_decoder(model_path)) {
      for (auto [bad, what] :
           {std::pair{o.ladder_fisher_batches() > 0, name("ladder_fisher_batches") +
                                                         " (the decoder's side network starts "
                                                         "pruned by weight magnitude)"},
            std::pair{early_exit, name("early_exit")},
            std::pair{o.train_pooler(), name("train_pooler")},
            std::pair{o.method() == "bitfit", name("method") + " bitfit (no biases)"}}) {
        check(!bad, "text_classifier", "{} does not apply to a decoder model ({})", what,
              model_path.string());
      }
    }
  }

  /// Attaches the method through the registry, or for "full" unfreezes `backbone`.
  std::vector<std::string> attach_method(torch::nn::Module& backbone) {
    if (options_.method() != "full") {
      return attach(backbone, options_.method(), options_.method_options());
    }
    unfreeze(backbone);
    return {};
  }

  /// The dropout model_dropout asks for, or nullopt to keep the config's.
  std::optional<double> dropout() const {
    const auto p = options_.model_dropout().value_or(options_.method() == "full" ? -1.0 : 0.0);
    return p < 0 ? std::nullopt : std::optional<double>(p);
  }

  /// Sets BERT's dropout (embeddings, attention probabilities, attention and FFN outputs, as
  /// hidden_dropout_prob and attention_probs_dropout_prob do in a Hugging Face config) and the
  /// head's to model_dropout, before a method is attached (so that the method's own dropout
  /// keeps its value).
  void set_dropout(models::BertImpl& bert, torch::nn::Dropout& head) {
    const auto p = dropout();
    if (!p) return;
    const auto config = bert.config();
    bert.set_dropout(*p, *p);
    head->options.p(*p);
    dropout_note_ = fmt::format(
        "dropout {} in the model and the head (config: hidden {}, "
        "attention {})",
        *p, config.hidden_dropout_prob, config.attention_probs_dropout_prob);
  }

  void build_decoder(const std::filesystem::path& path) {
    // A decoder classifies from its last real token (Hugging Face's
    // LlamaForSequenceClassification); pooling and the pooler do not apply.
    auto model = models::LlamaForSequenceClassification::from_pretrained(path, num_labels_);
    if (options_.method() == "lst") {
      // The side network beside the decoder; the head reads the decoder's output plus the side
      // network's (zero until it trains).
      models::attach_ladder(*model->model, ladder_options());
    } else {
      sites_ = attach_method(*model->model);
    }
    head_ = "score";
    root_ = model.ptr();
    logits_ = [model](const TextBatch& b) mutable { return model(b.input_ids, b.attention_mask); };
    method_bytes_ = model->model->side ? count_parameters(*model->model->side).trainable_bytes
                                       : adapter_bytes(*model);
  }

  /// The ladder options with the side network's dropout resolved: the side network is what
  /// trains, and takes model_dropout (off unless asked for) unless the ladder options name their
  /// own rate (unset: the backbone config's; a decoder has none). Measured in docs/RESULTS.md
  /// (CLUE, LST's dropout).
  LadderOptions ladder_options() const {
    auto ladder = options_.ladder();
    if (!ladder.dropout()) {
      if (const auto p = dropout()) ladder.dropout(*p);
    }
    return ladder;
  }

  void build_ladder(const std::filesystem::path& path) {
    const auto pooling = models::pooling_from_string(options_.pooling());
    auto ladder = options_.ladder();
    if (options_.ladder_fisher_batches() > 0) {
      // The first batches fit() will see without grouping, through a throwaway classifier (the
      // same pretrained weights, a fresh head, dropout off) that is gone before training starts.
      const auto& examples = options_.fisher_examples();
      auto rows = shuffled_rows(examples.size());
      rows.resize(std::min(rows.size(), static_cast<size_t>(options_.ladder_fisher_batches() *
                                                            options_.batch_size())));
      const auto batches = encode(examples, rows).batches(options_.batch_size());
      const auto n =
          std::min<int64_t>(options_.ladder_fisher_batches(), static_cast<int64_t>(batches.size()));
      if (auto* log = options_.log()) {
        *log << fmt::format("LST init: Fisher information from {} training batch{}\n", n,
                            n == 1 ? "" : "es")
             << std::flush;
      }
      auto probe =
          models::BertForSequenceClassification::from_pretrained(path, num_labels_, pooling);
      probe->eval();
      const bool regression = num_labels_ == 1;
      ladder.importance(fisher_importance(
          *probe->bert->encoder,
          [&](int64_t i) {
            const auto& b = batches[static_cast<size_t>(i)];
            return task_loss(probe(b.input_ids, b.attention_mask, b.token_type_ids), b.labels,
                             regression);
          },
          n));
    }
    ladder.dropout(ladder_options().dropout());
    auto model = models::BertLadderForSequenceClassification::from_pretrained(path, num_labels_,
                                                                              ladder, pooling);
    options_.fisher_examples({});  // they served the start; fit() gets the training rows itself
    set_dropout(*model->bert, model->dropout);
    root_ = model.ptr();
    logits_ = [model](const TextBatch& b) mutable {
      return model(b.input_ids, b.attention_mask, b.token_type_ids);
    };
    method_bytes_ = count_parameters(*model->ladder).trainable_bytes;
  }

  void build_early_exit(const std::filesystem::path& path) {
    auto model = models::BertEarlyExitForSequenceClassification::from_pretrained(
        path, num_labels_, models::pooling_from_string(options_.pooling()));
    set_dropout(*model->bert, model->dropout);
    if (options_.exit_from().empty()) {
      sites_ = attach_method(*model->bert);
      if (options_.train_pooler()) unfreeze(*model->bert->pooler);
    } else {
      load_adapter(*model, options_.exit_from());
      freeze(*model->bert);
      freeze(*model->classifier);
      for (const auto& [site, m] : attached_methods(*model)) sites_.push_back(site);
      if (auto* log = options_.log()) {
        *log << fmt::format(
            "loaded {} (frozen): {} sites and the last layer's head; the other exits and the "
            "predictor train\n",
            options_.exit_from().string(), sites_.size());
      }
    }
    root_ = model.ptr();
    logits_ = [model](const TextBatch& b) mutable {
      return model(b.input_ids, b.attention_mask, b.token_type_ids);
    };
    loss_ = [model](const TextBatch& b) mutable {
      return model->loss(model->forward_exits(b.input_ids, b.attention_mask, b.token_type_ids),
                         b.labels);
    };
    method_bytes_ = adapter_bytes(*model);
    early_exit_model_ = model;
  }

  double learning_rate() const {
    return options_.lr() > 0 ? options_.lr() : default_lr(options_.method());
  }

  /// The head's own rate, or 0 when it trains at the base rate.
  double head_lr() const {
    return options_.head_lr().value_or(options_.method() == "full" ? 0.0 : 3e-3);
  }

  TrainerOptions trainer_options(double lr) const {
    auto t = TrainerOptions()
                 .epochs(options_.epochs())
                 .max_steps(options_.max_steps() > 0 ? options_.max_steps() : -1)
                 .lr(lr)
                 .weight_decay(options_.weight_decay())
                 .warmup_ratio(options_.warmup_ratio())
                 .grad_clip(options_.grad_clip())
                 .eval_every(options_.eval_every())
                 .save_every(options_.save_every())
                 .seed(options_.seed())
                 .device(options_.device())
                 .precision(options_.precision())
                 .output_dir(options_.output_dir())
                 .collective(options_.collective());
    if (auto* log = options_.log()) t.progress_stream(log);
    const bool loaded = !options_.exit_from().empty();
    if (head_lr() > 0) {
      // With exit_from the last layer's head is loaded and frozen.
      if (!loaded) t.lr_for(head_, head_lr());
      if (!early_exit_model_.is_empty())
        t.lr_for("exits", head_lr()).lr_for("predictor", head_lr());
    }
    // The method's own rates, from its registry entry: LoRA+'s B matrices, ProPETL's mask scores.
    if (options_.method() != "full" && !loaded) {
      if (const auto rules = method_entry(options_.method()).lr_rules) {
        auto settings = options_.method_options();
        if (!settings.contains("loraplus_lr_ratio") && options_.lora_plus_ratio() > 0) {
          settings["loraplus_lr_ratio"] = options_.lora_plus_ratio();
        }
        for (const auto& [pattern, rate] : rules(lr, settings)) t.lr_for(pattern, rate);
      }
    }
    return t;
  }

  /// The metrics of the model over `batches` (moved to the device first), in eval mode; with a
  /// collective over every rank's batches.
  std::map<std::string, double> score(const std::vector<TextBatch>& batches) {
    EvalMode eval_mode(*root_);
    metrics::Accumulator scores(num_labels_ == 1);
    for (const auto& raw : batches) scores.add(logits_(raw.to(options_.device())), raw.labels);
    if (const auto& group = options_.collective()) scores.gather(*group);
    return scores.compute(metric_names());
  }

  /// The order of `n` rows the seed fixes (so that batches mix classes even when a file is sorted
  /// by label).
  std::vector<size_t> shuffled_rows(size_t n) const {
    return data::shuffled_order(n, static_cast<uint64_t>(options_.seed()));
  }

  EncodedExamples encode(const std::vector<data::Example>& examples) const {
    const bool pair = !examples.empty() && examples.front().text_b.has_value();
    return encode_examples(examples, *tokenizer_, options_.max_len(), pair, num_labels_ == 1);
  }

  /// Examples `rows` of `examples`, in that order, without copying the texts.
  EncodedExamples encode(const std::vector<data::Example>& examples,
                         const std::vector<size_t>& rows) const {
    const bool pair = !rows.empty() && examples.at(rows.front()).text_b.has_value();
    return encode_examples(examples, rows, *tokenizer_, options_.max_len(), pair, num_labels_ == 1);
  }

  TextClassifierOptions options_;
  int64_t num_labels_ = 2;
  std::filesystem::path model_path_;
  std::shared_ptr<const text::Tokenizer> tokenizer_;
  std::shared_ptr<torch::nn::Module> root_;
  std::function<torch::Tensor(const TextBatch&)> logits_;
  /// The training loss when it is not the task loss of logits_ (early exit: every exit's and the
  /// confidence predictor's).
  std::function<torch::Tensor(const TextBatch&)> loss_;
  /// The head's module name: "classifier", or "score" on a decoder.
  std::string head_ = "classifier";
  /// Whether the model is a decoder (a .gguf file).
  bool decoder_ = false;
  std::vector<std::string> sites_;
  int64_t method_bytes_ = 0;
  std::string dropout_note_;
  models::BertEarlyExitForSequenceClassification early_exit_model_{nullptr};
  std::vector<std::pair<std::string, std::vector<TextBatch>>> eval_batches_;
};

PEFT_NAMESPACE_END
