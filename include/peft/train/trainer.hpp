#pragma once

// A training loop that works for any torch::nn::Module: it trains exactly the module's trainable
// parameters (peft::trainable_parameters) with AdamW, a warm-up + decay schedule, gradient
// clipping and accumulation, evaluates every N steps and at each epoch end, keeps the best
// checkpoint, stops early, survives NaN losses by policy, and resumes an interrupted run so that
// it ends with the same parameters, bit for bit, as one that was never interrupted (on CPU).
//
// The loop knows nothing about the data: a batch is whatever type the caller's loss function
// takes, and the batches of an epoch come from a vector (shuffled by the trainer from the seed)
// or from a BatchSource that hands out batch i of epoch e on demand.

#include <ATen/CPUGeneratorImpl.h>
#include <torch/arg.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>
#include <torch/nn/utils/clip_grad.h>
#include <torch/optim/adamw.h>
#include <torch/optim/optimizer.h>
#include <torch/types.h>
#include <torch/utils.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <iostream>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include <peft/config.hpp>
#include <peft/core/error.hpp>
#include <peft/core/parameters.hpp>
#include <peft/train/checkpoint.hpp>
#include <peft/train/collective.hpp>
#include <peft/train/precision.hpp>
#include <peft/train/progress.hpp>
#include <peft/train/schedule.hpp>

PEFT_NAMESPACE_BEGIN

/// What the trainer does with a step whose loss or gradient norm is NaN or infinite.
enum class NanPolicy {
  stop,  ///< save the last good state as a checkpoint, then throw peft::Error naming the step
  skip,  ///< drop the step's gradients (no update), count it, go on
};

/// Settings of a Trainer, with chained setters like torch's own options.
struct TrainerOptions {
  /// The stream type of progress_stream (TORCH_ARG needs a single-token-safe type).
  using OstreamPtr = std::ostream*;

  /// Passes over the training batches (ignored when max_steps is positive).
  TORCH_ARG(int64_t, epochs) = 1;
  /// Optimizer steps to run; when positive it decides the run's length instead of epochs.
  TORCH_ARG(int64_t, max_steps) = -1;
  /// Base learning rate.
  TORCH_ARG(double, lr) = 5e-4;
  /// AdamW's decoupled weight decay (never applied to biases and norms, see peft::no_decay).
  TORCH_ARG(double, weight_decay) = 0.0;
  /// AdamW's beta1.
  TORCH_ARG(double, adam_beta1) = 0.9;
  /// AdamW's beta2.
  TORCH_ARG(double, adam_beta2) = 0.999;
  /// AdamW's epsilon.
  TORCH_ARG(double, adam_epsilon) = 1e-8;
  /// `{pattern, lr}` learning-rate overrides by parameter name (see lr_for()).
  TORCH_ARG(LrOverrides, lr_overrides) = {};
  /// Warm-up length in optimizer steps; when negative, warmup_ratio decides.
  TORCH_ARG(int64_t, warmup_steps) = -1;
  /// Warm-up length as a share of the run's steps (rounded up).
  TORCH_ARG(double, warmup_ratio) = 0.0;
  /// Decay after warm-up: Schedule::linear (default), Schedule::cosine or Schedule::constant.
  TORCH_ARG(Schedule, schedule) = Schedule::linear;
  /// The factor of the base rate the decay ends at.
  TORCH_ARG(double, min_lr_ratio) = 0.0;
  /// Maximum global L2 norm of the gradients; 0 turns clipping off.
  TORCH_ARG(double, grad_clip) = 1.0;
  /// Batches whose gradients are summed (as a mean) into one optimizer step.
  TORCH_ARG(int64_t, grad_accumulation) = 1;
  /// Evaluate every this many optimizer steps (0: only at the end of each epoch).
  TORCH_ARG(int64_t, eval_every) = 0;
  /// Write a training record to the metrics log every this many steps (0: never).
  TORCH_ARG(int64_t, log_every) = 10;
  /// Save a checkpoint every this many steps (0: only at the end of each epoch and of the run).
  TORCH_ARG(int64_t, save_every) = 0;
  /// Periodic checkpoints to keep (the newest ones); 0 keeps all. The best one is kept apart.
  TORCH_ARG(int64_t, keep_checkpoints) = 2;
  /// Seed of the run: torch's generator (dropout, ...) and the batch order.
  TORCH_ARG(int64_t, seed) = 42;
  /// Shuffle a vector of batches at every epoch (from the seed and the epoch number).
  TORCH_ARG(bool, shuffle) = true;
  /// Where checkpoints and metrics.jsonl go; empty: nothing is written.
  TORCH_ARG(std::filesystem::path, output_dir) = {};
  /// Evaluation metric that picks the best checkpoint and drives early stopping (empty: none).
  TORCH_ARG(std::string, metric) = {};
  /// Whether a larger metric is better (accuracy) or a smaller one (loss).
  TORCH_ARG(bool, greater_is_better) = true;
  /// Stop after this many evaluations without improvement of metric (0: never stop early).
  TORCH_ARG(int64_t, patience) = 0;
  /// What a NaN or infinite loss does.
  TORCH_ARG(NanPolicy, nan_policy) = NanPolicy::stop;
  /// Device the model and the batches are moved to.
  TORCH_ARG(torch::Device, device) = torch::kCPU;
  /// Precision of the loss function's and the evaluation's forward passes: Precision::fp32, or
  /// autocast to bf16 / fp16 on the device (parameters, gradients and optimizer state stay
  /// float32). fp16 scales the loss dynamically (loss_scale); a step whose gradients overflow
  /// is skipped, logged and counted in TrainResult::overflow_steps, not treated as a NaN.
  TORCH_ARG(Precision, precision) = Precision::fp32;
  /// The dynamic loss scale of Precision::fp16.
  TORCH_ARG(LossScaleOptions, loss_scale) = {};
  /// Show progress (a bar on a terminal, plain lines otherwise).
  TORCH_ARG(bool, progress) = true;
  /// Stream the progress goes to; must outlive fit().
  TORCH_ARG(OstreamPtr, progress_stream) = &std::cerr;
  /// Fine control of the progress display.
  TORCH_ARG(ProgressOptions, progress_options) = {};
  /// The processes this one trains with, data parallel (peft::init_distributed()), or null for
  /// one process. Every rank runs fit() on its own shard of batches (the same count on every
  /// rank, see peft::shard_for_rank); the trainer starts them from rank 0's trainable state,
  /// averages the gradients before clipping, reduces the logged loss, takes rank 0's evaluation
  /// metrics for every decision, and lets rank 0 alone write logs, progress and checkpoints.
  TORCH_ARG(std::shared_ptr<Collective>, collective) = nullptr;

 public:
  /// Trains parameters whose dotted name contains `pattern` at `lr` (first match wins), e.g.
  /// `.lr_for("classifier", 1e-3)`.
  TrainerOptions& lr_for(std::string pattern, double lr) {
    lr_overrides_.emplace_back(std::move(pattern), lr);
    return *this;
  }
};

/// The batches of a run handed out on demand: `batch(epoch, i)` for i in [0, batches_per_epoch).
/// It must return the same batch for the same arguments, which is what lets a resumed run see
/// the data an uninterrupted one would have.
template <class Batch>
struct BatchSource {
  int64_t batches_per_epoch = 0;                             ///< batches in every epoch
  std::function<Batch(int64_t epoch, int64_t index)> batch;  ///< batch `index` of `epoch`
};

/// How a fit() ended.
struct TrainResult {
  int64_t steps = 0;           ///< global step reached
  int64_t skipped_steps = 0;   ///< steps skipped by NanPolicy::skip
  int64_t overflow_steps = 0;  ///< fp16 steps skipped because the scaled gradients overflowed
  double loss_scale = 0.0;     ///< fp16's loss scale at the end (0 for fp32 and bf16)
  double last_loss = std::numeric_limits<double>::quiet_NaN();  ///< mean loss of the last step
  std::optional<double> best_metric;                            ///< best value of options.metric
  int64_t best_step = -1;                                       ///< step of best_metric
  std::map<std::string, double> last_metrics;                   ///< latest evaluation
  double seconds = 0.0;        ///< wall seconds of this fit(), evaluations included
  double eval_seconds = 0.0;   ///< wall seconds this fit() spent in the evaluation callback
  bool stopped_early = false;  ///< patience ran out
  std::filesystem::path best_checkpoint;  ///< `<output_dir>/best`, when written
  std::filesystem::path last_checkpoint;  ///< final `checkpoint-<step>`, when written
};

namespace detail {

// The batch order of an epoch: a Fisher-Yates shuffle driven by mt19937_64, whose output the
// standard fixes (std::shuffle and the std distributions differ between standard libraries).
inline std::vector<int64_t> epoch_order(int64_t n, int64_t seed, int64_t epoch, bool shuffle) {
  std::vector<int64_t> order(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) order[static_cast<size_t>(i)] = i;
  if (!shuffle) return order;
  std::mt19937_64 rng(static_cast<uint64_t>(seed) * 0x9E3779B97F4A7C15ULL +
                      static_cast<uint64_t>(epoch));
  for (int64_t i = n - 1; i > 0; --i) {
    const auto bound = static_cast<uint64_t>(i) + 1;
    const uint64_t limit =
        std::numeric_limits<uint64_t>::max() - std::numeric_limits<uint64_t>::max() % bound;
    uint64_t r = rng();
    while (r >= limit) r = rng();
    std::swap(order[static_cast<size_t>(i)], order[static_cast<size_t>(r % bound)]);
  }
  return order;
}

template <class B, class = void>
struct has_to_device : std::false_type {};
template <class B>
struct has_to_device<B,
                     std::void_t<decltype(std::declval<const B&>().to(torch::Device(torch::kCPU)))>>
    : std::is_convertible<decltype(std::declval<const B&>().to(torch::Device(torch::kCPU))), B> {};

// Moves the batch types the trainer knows: anything with `.to(device)` (a tensor, a struct with
// such a method), vectors and string maps of tensors. Returns nothing for other types.
template <class B>
std::optional<B> move_known_batch(const B& batch, const torch::Device& device) {
  if constexpr (has_to_device<B>::value) {
    return batch.to(device);
  } else if constexpr (std::is_same_v<B, std::vector<torch::Tensor>>) {
    B out;
    for (const auto& t : batch) out.push_back(t.to(device));
    return out;
  } else if constexpr (std::is_same_v<B, std::map<std::string, torch::Tensor>>) {
    B out;
    for (const auto& [k, t] : batch) out.emplace(k, t.to(device));
    return out;
  } else {
    (void)batch;
    (void)device;
    return std::nullopt;
  }
}

template <class B>
constexpr bool batch_is_movable() {
  return has_to_device<B>::value || std::is_same_v<B, std::vector<torch::Tensor>> ||
         std::is_same_v<B, std::map<std::string, torch::Tensor>>;
}

}  // namespace detail

/// Trains the trainable parameters of a module on batches of type `Batch`.
///
/// ```cpp
/// peft::Trainer<Batch> trainer(model, [&](const Batch& b) { return loss_of(model, b); },
///                              peft::TrainerOptions().epochs(3).warmup_ratio(0.06)
///                                  .output_dir("out").metric("accuracy").patience(3));
/// trainer.evaluate_with([&] { return peft::metrics::evaluate(...); });
/// trainer.resume();               // continue from out/checkpoint-<latest>, if there is one
/// auto result = trainer.fit(train_batches);
/// ```
///
/// The loss function runs the forward pass and returns a scalar loss; the trainer does the
/// backward pass, clipping, the optimizer and scheduler steps, evaluation, checkpoints and logs.
template <class Batch>
class Trainer {
 public:
  /// Returns the scalar loss of one batch (the forward pass, with grad enabled).
  using LossFn = std::function<torch::Tensor(const Batch&)>;
  /// Returns evaluation metrics by name; runs with the model in eval mode and no grad.
  using EvalFn = std::function<std::map<std::string, double>()>;
  /// Moves a batch to a device, for batch types the trainer cannot move by itself.
  using MoveFn = std::function<Batch(const Batch&, const torch::Device&)>;

  /// Moves `model` to options.device() and builds AdamW over exactly its trainable parameters
  /// (grouped by peft::named_param_groups). Throws peft::Error on invalid options or a module
  /// with nothing to train.
  Trainer(std::shared_ptr<torch::nn::Module> model, LossFn loss, TrainerOptions options = {})
      : model_(std::move(model)), loss_(std::move(loss)), options_(std::move(options)) {
    check(model_ != nullptr, "trainer", "the model is null");
    check(static_cast<bool>(loss_), "trainer", "the loss function is empty");
    validate_options();
    model_->to(options_.device());
    auto groups = ParamGroupOptions()
                      .lr(options_.lr())
                      .weight_decay(options_.weight_decay())
                      .lr_overrides(options_.lr_overrides());
    optimizer_ = make_adamw(*model_, groups,
                            torch::optim::AdamWOptions()
                                .betas({options_.adam_beta1(), options_.adam_beta2()})
                                .eps(options_.adam_epsilon()));
    check_optimizer_parameters(*optimizer_, *model_);
  }

  /// Same, from a module holder such as `torch::nn::Linear` or a TORCH_MODULE of the caller.
  template <class Impl>
  Trainer(torch::nn::ModuleHolder<Impl> model, LossFn loss, TrainerOptions options = {})
      : Trainer(std::static_pointer_cast<torch::nn::Module>(model.ptr()), std::move(loss),
                std::move(options)) {}

  Trainer(const Trainer&) = delete;
  Trainer& operator=(const Trainer&) = delete;

  /// Sets the evaluation callback (required for metric, patience and the best checkpoint).
  Trainer& evaluate_with(EvalFn eval) {
    eval_ = std::move(eval);
    return *this;
  }

  /// Sets how batches reach options.device(); needed only for a non-CPU device and a batch
  /// type without a `.to(device)` method.
  Trainer& move_batch_with(MoveFn move) {
    move_ = std::move(move);
    return *this;
  }

  /// Replaces the built-in AdamW by `optimizer`, whose groups' current learning rates become
  /// the schedule's base rates. Throws peft::Error unless it holds exactly the model's trainable
  /// parameters, each once; call before resume() and fit().
  Trainer& use_optimizer(std::shared_ptr<torch::optim::Optimizer> optimizer) {
    check(optimizer != nullptr, "trainer", "use_optimizer() got a null optimizer");
    check(!resumed_ && !fitted_, "trainer", "use_optimizer() must come before resume() and fit()");
    check_optimizer_parameters(*optimizer, *model_);
    optimizer_ = std::move(optimizer);
    return *this;
  }

  /// The optimizer being used.
  torch::optim::Optimizer& optimizer() { return *optimizer_; }
  /// The model being trained.
  torch::nn::Module& model() { return *model_; }
  /// Where the run stands.
  const TrainingState& state() const { return state_; }
  /// The options of this trainer.
  const TrainerOptions& options() const { return options_; }

  /// Loads the newest `checkpoint-<step>` under options.output_dir() (parameters, optimizer,
  /// RNG and position) so that fit() continues that run. Returns false, changing nothing, when
  /// there is none. Throws peft::Error when the checkpoint does not fit the model. First cleans
  /// what a killed run left in the folder (clean_interrupted_writes()).
  bool resume() {
    check(!options_.output_dir().empty(), "trainer", "resume() needs options.output_dir()");
    // What a run killed while writing left behind: half-written temporaries, or (where folders
    // cannot be swapped in one step) the previous checkpoint moved aside.
    if (!group() || group()->is_main()) clean_interrupted_writes(options_.output_dir());
    if (group()) group()->barrier("cleaning the output folder before resuming");
    auto latest = latest_checkpoint(options_.output_dir());
    if (!latest) return false;
    resume_from(*latest);
    return true;
  }

  /// Loads the checkpoint in folder `dir` (see resume()).
  void resume_from(const std::filesystem::path& dir) {
    check(!fitted_, "trainer", "resume after fit() is not supported; create a new Trainer");
    const auto peek = read_checkpoint_state(dir);
    check(peek.scheduler.base_lrs.size() == optimizer_->param_groups().size(), "trainer",
          "{}: the checkpoint has {} learning-rate groups, the optimizer {}", dir.string(),
          peek.scheduler.base_lrs.size(), optimizer_->param_groups().size());
    const int world = group() ? group()->world_size() : 1;
    check(peek.world_size == world, "trainer",
          "{} was saved by a run of {} process{}, this one has {}; resume with as many",
          dir.string(), peek.world_size, peek.world_size == 1 ? "" : "es", world);
    state_ = load_checkpoint(dir, *model_, optimizer_.get(), /*restore_rng=*/true,
                             group() ? group()->rank() : 0);
    resumed_ = true;
    resumed_from_ = dir;
  }

  /// Trains on `batches`, shuffled at every epoch when options.shuffle() is on.
  TrainResult fit(const std::vector<Batch>& batches) {
    const bool shuffle = options_.shuffle();
    std::vector<int64_t> order;
    int64_t order_epoch = -1;
    BatchSource<Batch> source;
    source.batches_per_epoch = static_cast<int64_t>(batches.size());
    source.batch = [&, shuffle](int64_t epoch, int64_t index) -> Batch {
      if (epoch != order_epoch) {
        order =
            detail::epoch_order(static_cast<int64_t>(batches.size()), state_.seed, epoch, shuffle);
        order_epoch = epoch;
      }
      return batches[static_cast<size_t>(order[static_cast<size_t>(index)])];
    };
    return fit(source);
  }

  /// Trains on the batches `source` hands out. Returns how the run ended; throws peft::Error
  /// for a NaN/Inf step under NanPolicy::stop, a loss that is not a scalar requiring grad, or a
  /// resumed checkpoint planned for a different run length.
  TrainResult fit(const BatchSource<Batch>& source) {
    const auto started = std::chrono::steady_clock::now();
    check(!fitted_, "trainer", "fit() already ran on this Trainer; create a new one");
    fitted_ = true;
    const int64_t n = source.batches_per_epoch;
    check(n > 0 && static_cast<bool>(source.batch), "trainer",
          "the batch source is empty ({} batches per epoch)", n);
    if (!detail::batch_is_movable<Batch>() && !move_ && !options_.device().is_cpu()) {
      fail("trainer", "device {} needs move_batch_with(): the batch type has no .to(device)",
           options_.device().str());
    }
    check(options_.metric().empty() || static_cast<bool>(eval_), "trainer",
          "metric \"{}\" is set but there is no evaluate_with() callback", options_.metric());
    const int64_t accum = options_.grad_accumulation();
    const int64_t steps_per_epoch = (n + accum - 1) / accum;
    const int64_t total =
        options_.max_steps() > 0 ? options_.max_steps() : options_.epochs() * steps_per_epoch;

    LRScheduler scheduler(*optimizer_, LRSchedule(ScheduleOptions()
                                                      .total_steps(total)
                                                      .warmup_steps(options_.warmup_steps())
                                                      .warmup_ratio(options_.warmup_ratio())
                                                      .schedule(options_.schedule())
                                                      .min_lr_ratio(options_.min_lr_ratio())));
    if (resumed_) {
      check(state_.total_steps == total, "trainer",
            "{} was saved by a run of {} steps, these options and data make {}; resuming would "
            "change the learning-rate schedule",
            resumed_from_.string(), state_.total_steps, total);
      check(state_.batches_per_epoch == n, "trainer",
            "{} was saved with {} batches per epoch, the data now has {}", resumed_from_.string(),
            state_.batches_per_epoch, n);
      scheduler.load_state(state_.scheduler);
    } else {
      // Each rank its own random stream (dropout), all of them from the run's seed.
      torch::manual_seed(static_cast<uint64_t>(options_.seed() + (group() ? group()->rank() : 0)));
      state_ = TrainingState();
      state_.seed = options_.seed();
      state_.total_steps = total;
      state_.batches_per_epoch = n;
      state_.scheduler = scheduler.state();
      state_.world_size = group() ? group()->world_size() : 1;
      if (group()) broadcast_module_state(*group(), *model_);
    }
    // A data-parallel run checks that every rank plans the same run before the first step.
    if (group()) {
      const auto plan = all_reduce_sum(*group(), {static_cast<double>(n), 1.0}, "the run's plan");
      check(plan[0] == static_cast<double>(n) * plan[1], "trainer",
            "rank {} has {} batches per epoch, but not every rank has as many (the {} ranks have "
            "{} in all); shard the rows with peft::shard_for_rank",
            group()->rank(), n, group()->world_size(), plan[0]);
    }
    const bool fp16 = options_.precision() == Precision::fp16;
    // A resumed fp16 run goes on with its saved scale; any other start begins at the initial one.
    if (!fp16) {
      state_.loss_scale = 0.0;
    } else if (!(state_.loss_scale > 0.0)) {
      state_.loss_scale = options_.loss_scale().initial;
      state_.loss_scale_good_steps = 0;
    }
    const auto& out_dir = options_.output_dir();
    const bool main_rank = !group() || group()->is_main();
    std::optional<MetricsLog> log;
    if (!out_dir.empty() && main_rank) log.emplace(out_dir / "metrics.jsonl");
    std::optional<Progress> progress;
    if (options_.progress() && options_.progress_stream() != nullptr && main_rank) {
      progress.emplace(*options_.progress_stream(), total, options_.progress_options(),
                       state_.global_step);
    }
    log_ = log ? &*log : nullptr;
    progress_ = progress ? &*progress : nullptr;

    TrainResult result;
    const auto params = trainable_parameters(*model_);
    std::optional<GradientAverager> averager;
    if (group()) averager.emplace(params);
    model_->train();
    bool done = state_.finished || state_.global_step >= total;
    double window_loss_sum = 0.0;
    int64_t window_loss_count = 0;

    for (int64_t epoch = state_.epoch;
         !done && (options_.max_steps() > 0 || epoch < options_.epochs()); ++epoch) {
      int64_t b = epoch == state_.epoch ? state_.batch_in_epoch : 0;
      while (b < n && !done) {
        const int64_t window_start = b;
        const int64_t window = std::min(accum, n - b);
        const int64_t step = state_.global_step + 1;
        std::string bad;
        double loss_sum = 0.0;
        const double scale = fp16 ? state_.loss_scale : 1.0;
        for (int64_t i = 0; i < window; ++i, ++b) {
          // After a non-finite loss the window's other batches are not needed, except with a
          // group: a loss function may itself call collectives (mean_over_ranks), which every
          // rank must make in the same order, so each batch's loss is still computed (without
          // backward) and the step is skipped on every rank after the gradients' reduction.
          if (!bad.empty() && !averager) continue;
          const auto loss = compute_loss(source.batch(epoch, b), step, epoch, b);
          if (!bad.empty()) continue;
          const double value = loss.template item<double>();
          if (!std::isfinite(value)) {
            bad = fmt::format("the loss is {}", value);
            continue;
          }
          if (fp16) {
            (loss * (scale / static_cast<double>(window))).backward();
          } else {
            (loss / static_cast<double>(window)).backward();
          }
          loss_sum += value;
        }
        if (averager) {
          // The step's loss and whether any rank saw a non-finite one travel with the gradients.
          const auto summed = averager->average(*group(), {bad.empty() ? 0.0 : 1.0, loss_sum},
                                                fmt::format("step {}", step));
          if (bad.empty() && summed[0] > 0) bad = "the loss is not finite on another rank";
          loss_sum = summed[1] / static_cast<double>(group()->world_size());
        }
        double norm = std::numeric_limits<double>::quiet_NaN();
        bool overflow = false;
        if (bad.empty()) {
          if (fp16) unscale_gradients(params, scale);
          const double max_norm = options_.grad_clip() > 0
                                      ? options_.grad_clip()
                                      : std::numeric_limits<double>::infinity();
          norm = torch::nn::utils::clip_grad_norm_(params, max_norm);
          // With a loss scale above 1 an infinite gradient is the scale's overflow, which the
          // next step's smaller scale fixes; at 1 or below it is the model's own.
          if (!std::isfinite(norm)) {
            if (fp16 && scale > 1.0) {
              overflow = true;
            } else {
              bad = fmt::format("the gradient norm is {}", norm);
            }
          }
        }
        if (overflow) {
          clear_grads(params);
          state_.loss_scale = scale * options_.loss_scale().backoff;
          state_.loss_scale_good_steps = 0;
          ++state_.overflow_steps;
          write_log({{"type", "overflow"},
                     {"step", step},
                     {"grad_norm", norm},
                     {"loss_scale", state_.loss_scale}});
        } else if (!bad.empty()) {
          clear_grads(params);
          if (options_.nan_policy() == NanPolicy::stop) {
            stop_on_nan(step, epoch, window_start, bad);
          }
          ++state_.skipped_steps;
          write_log({{"type", "skip"}, {"step", step}, {"reason", bad}});
          if (progress_) progress_->message(fmt::format("step {}: {}; step skipped", step, bad));
        } else {
          optimizer_->step();
          clear_grads(params);
          if (fp16 && ++state_.loss_scale_good_steps >= options_.loss_scale().growth_interval) {
            state_.loss_scale *= options_.loss_scale().growth;
            state_.loss_scale_good_steps = 0;
          }
          result.last_loss = loss_sum / static_cast<double>(window);
          window_loss_sum += result.last_loss;
          ++window_loss_count;
        }
        const double lr = optimizer_->param_groups().front().options().get_lr();
        scheduler.step();
        state_.global_step = step;
        state_.epoch = epoch;
        state_.batch_in_epoch = b;
        state_.scheduler = scheduler.state();

        if (options_.log_every() > 0 && step % options_.log_every() == 0) {
          write_log({{"type", "train"},
                     {"step", step},
                     {"epoch", static_cast<double>(epoch) + static_cast<double>(b) / n},
                     {"loss", window_loss_count > 0 ? window_loss_sum / window_loss_count
                                                    : std::numeric_limits<double>::quiet_NaN()},
                     {"lr", lr},
                     {"grad_norm", norm},
                     {"skipped_steps", state_.skipped_steps}});
          window_loss_sum = 0.0;
          window_loss_count = 0;
        }
        if (progress_) progress_->update(step, {{"loss", result.last_loss}, {"lr", lr}});
        if (options_.eval_every() > 0 && step % options_.eval_every() == 0) {
          done = evaluate(result) || done;
        }
        if (options_.save_every() > 0 && step % options_.save_every() == 0) save_periodic();
        if (step >= total) done = true;
      }
      if (b >= n && !result.stopped_early) {
        if (state_.last_eval_step != state_.global_step) done = evaluate(result) || done;
        state_.epoch = epoch + 1;
        state_.batch_in_epoch = 0;
        if (last_save_step_ != state_.global_step) save_periodic();
      }
    }

    // The final parameters get evaluated once, so best_metric and the best checkpoint cover them.
    if (!result.stopped_early && state_.last_eval_step != state_.global_step) evaluate(result);
    state_.finished = true;
    if (!out_dir.empty()) result.last_checkpoint = save_periodic();
    if (progress_) progress_->finish();
    log_ = nullptr;
    progress_ = nullptr;

    result.steps = state_.global_step;
    result.skipped_steps = state_.skipped_steps;
    result.overflow_steps = state_.overflow_steps;
    result.loss_scale = state_.loss_scale;
    result.best_metric = state_.best_metric;
    result.best_step = state_.best_step;
    result.last_metrics = state_.last_metrics;
    if (!out_dir.empty() && std::filesystem::is_directory(out_dir / "best")) {
      result.best_checkpoint = out_dir / "best";
    }
    result.seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
    return result;
  }

 private:
  void validate_options() const {
    const auto& o = options_;
    check(o.epochs() > 0 || o.max_steps() > 0, "trainer",
          "epochs must be positive (got {}) unless max_steps is", o.epochs());
    check(o.grad_accumulation() > 0, "trainer", "grad_accumulation must be positive, got {}",
          o.grad_accumulation());
    check(o.grad_clip() >= 0 && std::isfinite(o.grad_clip()), "trainer",
          "grad_clip must be >= 0 (0 = off), got {}", o.grad_clip());
    check(o.eval_every() >= 0 && o.log_every() >= 0 && o.save_every() >= 0, "trainer",
          "eval_every, log_every and save_every must be >= 0, got {}, {}, {}", o.eval_every(),
          o.log_every(), o.save_every());
    check(o.keep_checkpoints() >= 0, "trainer", "keep_checkpoints must be >= 0, got {}",
          o.keep_checkpoints());
    check(o.patience() >= 0, "trainer", "patience must be >= 0, got {}", o.patience());
    check(o.patience() == 0 || !o.metric().empty(), "trainer",
          "patience {} needs metric() to say what should improve", o.patience());
    check_precision(o.precision(), o.device());
    const auto& ls = o.loss_scale();
    check(std::isfinite(ls.initial) && ls.initial > 0 && std::isfinite(ls.growth) &&
              ls.growth >= 1 && ls.backoff > 0 && ls.backoff < 1 && ls.growth_interval > 0,
          "trainer",
          "loss_scale needs initial > 0, growth >= 1, 0 < backoff < 1 and growth_interval > 0, "
          "got {}, {}, {}, {}",
          ls.initial, ls.growth, ls.backoff, ls.growth_interval);
  }

  torch::Tensor compute_loss(const Batch& raw, int64_t step, int64_t epoch, int64_t index) {
    torch::Tensor loss;
    {
      AutocastGuard autocast(options_.device(), options_.precision());
      if (move_) {
        loss = loss_(move_(raw, options_.device()));
      } else if (auto moved = detail::move_known_batch(raw, options_.device())) {
        loss = loss_(*moved);
      } else {
        loss = loss_(raw);
      }
    }
    const auto where = fmt::format("step {} (epoch {}, batch {})", step, epoch, index);
    check(loss.defined(), "trainer", "{}: the loss function returned an undefined tensor", where);
    check(loss.numel() == 1 && loss.is_floating_point(), "trainer",
          "{}: the loss must be a floating-point scalar, got shape [{}] of {}", where,
          fmt::join(loss.sizes(), ", "), c10::toString(loss.scalar_type()));
    check(loss.requires_grad(), "trainer",
          "{}: the loss does not require grad; no trainable parameter contributes to it", where);
    return loss.reshape(at::IntArrayRef{});
  }

  static void clear_grads(const std::vector<torch::Tensor>& params) {
    for (const auto& p : params) p.mutable_grad().reset();
  }

  [[noreturn]] void stop_on_nan(int64_t step, int64_t epoch, int64_t batch,
                                const std::string& what) {
    std::string saved = "no output_dir is set, so no checkpoint was written";
    if (!options_.output_dir().empty()) {
      // The state is the one after the previous step: exactly what the checkpoint should hold.
      state_.epoch = epoch;
      state_.batch_in_epoch = batch;
      const auto dir = save_periodic();
      saved = fmt::format("the last good state (after step {}) is saved in {}", state_.global_step,
                          dir.string());
    }
    if (progress_) progress_->finish();
    write_log({{"type", "stop"}, {"step", step}, {"reason", what}});
    fail("trainer", "step {} (epoch {}, batch {}): {}; stopping (nan_policy stop); {}", step, epoch,
         batch, what, saved);
  }

  // Runs the evaluation callback; returns true when early stopping says the run is over.
  bool evaluate(TrainResult& result) {
    if (!eval_) return false;
    std::map<std::string, double> metrics;
    model_->eval();
    const auto start = std::chrono::steady_clock::now();
    {
      torch::NoGradGuard no_grad;
      AutocastGuard autocast(options_.device(), options_.precision());
      metrics = eval_();
    }
    result.eval_seconds +=
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    model_->train();
    // Rank 0's metrics decide for every rank (best checkpoint, early stopping).
    if (group()) {
      metrics = broadcast_metrics(*group(), metrics, 0,
                                  fmt::format("the evaluation of step {}", state_.global_step));
    }
    state_.last_eval_step = state_.global_step;
    state_.last_metrics = metrics;
    nlohmann::json values = nlohmann::json::object();
    std::string shown;
    for (const auto& [k, v] : metrics) {
      values[k] = v;
      shown += fmt::format(" {} {:.4f}", k, v);
    }
    write_log({{"type", "eval"}, {"step", state_.global_step}, {"metrics", values}});
    if (progress_) progress_->message(fmt::format("eval step {}:{}", state_.global_step, shown));

    const auto& name = options_.metric();
    if (name.empty()) return false;
    auto it = metrics.find(name);
    if (it == metrics.end()) {
      std::vector<std::string> keys;
      for (const auto& [k, v] : metrics) keys.push_back(k);
      fail("trainer", "metric \"{}\" is not among the evaluation's metrics: {}", name,
           fmt::join(keys, ", "));
    }
    const double v = it->second;
    const bool improved =
        !std::isnan(v) &&
        (!state_.best_metric ||
         (options_.greater_is_better() ? v > *state_.best_metric : v < *state_.best_metric));
    if (improved) {
      state_.best_metric = v;
      state_.best_step = state_.global_step;
      state_.evals_without_improvement = 0;
      if (!options_.output_dir().empty()) save_to(options_.output_dir() / "best");
    } else {
      ++state_.evals_without_improvement;
    }
    if (options_.patience() > 0 && state_.evals_without_improvement >= options_.patience()) {
      result.stopped_early = true;
      if (progress_) {
        progress_->message(fmt::format(
            "early stop at step {}: {} did not improve for {} "
            "evaluations (best {:.4f} at step {})",
            state_.global_step, name, options_.patience(), *state_.best_metric, state_.best_step));
      }
      return true;
    }
    return false;
  }

  // Saves `checkpoint-<global_step>` and prunes the oldest beyond keep_checkpoints.
  std::filesystem::path save_periodic() {
    namespace fs = std::filesystem;
    const auto& out = options_.output_dir();
    if (out.empty()) return {};
    const auto dir = out / fmt::format("checkpoint-{}", state_.global_step);
    save_to(dir);
    last_save_step_ = state_.global_step;
    if (options_.keep_checkpoints() > 0 && (!group() || group()->is_main())) {
      std::vector<std::pair<int64_t, fs::path>> found;
      std::error_code ec;
      for (const auto& entry : fs::directory_iterator(out, ec)) {
        const auto name = entry.path().filename().string();
        const std::string prefix = "checkpoint-";
        if (name.rfind(prefix, 0) != 0) continue;
        const auto digits = name.substr(prefix.size());
        if (digits.empty() || digits.size() > 18 ||
            digits.find_first_not_of("0123456789") != std::string::npos) {
          continue;
        }
        found.emplace_back(std::stoll(digits), entry.path());
      }
      std::sort(found.begin(), found.end());
      const auto keep = static_cast<size_t>(options_.keep_checkpoints());
      for (size_t i = 0; i + keep < found.size(); ++i) {
        if (found[i].second != dir) fs::remove_all(found[i].second, ec);
      }
    }
    return dir;
  }

  // Saves a checkpoint: in a run of several processes every rank's generator state is gathered
  // and rank 0 alone writes.
  void save_to(const std::filesystem::path& dir) {
    if (!group()) {
      save_checkpoint(dir, *model_, optimizer_.get(), state_);
      return;
    }
    at::Tensor rng;
    {
      auto gen = at::detail::getDefaultCPUGenerator();
      std::lock_guard<std::mutex> lock(gen.mutex());
      rng = gen.get_state();
    }
    const auto rngs = group()->all_gather(
        rng, fmt::format("the generator states of checkpoint {}", dir.filename().string()));
    if (group()->is_main()) save_checkpoint(dir, *model_, optimizer_.get(), state_, rngs);
  }

  // The group of a data-parallel run, or null for a single process (or a group of one).
  Collective* group() const {
    const auto& c = options_.collective();
    return c && c->world_size() > 1 ? c.get() : nullptr;
  }

  void write_log(const nlohmann::json& record) {
    if (log_ != nullptr) log_->write(record);
  }

  std::shared_ptr<torch::nn::Module> model_;
  LossFn loss_;
  TrainerOptions options_;
  EvalFn eval_;
  MoveFn move_;
  std::shared_ptr<torch::optim::Optimizer> optimizer_;
  TrainingState state_;
  bool resumed_ = false;
  bool fitted_ = false;
  std::filesystem::path resumed_from_;
  int64_t last_save_step_ = -1;
  MetricsLog* log_ = nullptr;
  Progress* progress_ = nullptr;
};

PEFT_NAMESPACE_END
