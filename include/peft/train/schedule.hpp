#pragma once

// Optimisation set-up that does not depend on any PEFT method: AdamW parameter groups built from a
// module's trainable parameters (no weight decay on biases and norms, learning rates per name
// pattern), the check that an optimizer holds exactly those parameters, and learning-rate
// schedules (linear warm-up, then linear or cosine decay) applied to every parameter group.
//
// The schedules follow Hugging Face transformers (get_linear_schedule_with_warmup,
// get_cosine_schedule_with_warmup, warm-up steps = ceil(ratio * total)), so a run ported from
// Python sees the same learning rate at every step.

#include <torch/arg.h>
#include <torch/nn/module.h>
#include <torch/optim/adamw.h>
#include <torch/optim/optimizer.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <peft/config.hpp>
#include <peft/core/enum_names.hpp>
#include <peft/core/error.hpp>
#include <peft/core/parameters.hpp>
#include <peft/train/adamw.hpp>

PEFT_NAMESPACE_BEGIN

// ---------------------------------------------------------------------------------------------
// Parameter groups

/// `{pattern, lr}` learning-rate overrides by parameter name.
using LrOverrides = std::vector<std::pair<std::string, double>>;

/// How named_param_groups() splits a module's trainable parameters.
struct ParamGroupOptions {
  /// Learning rate of every parameter no lr_for() pattern matches.
  TORCH_ARG(double, lr) = 1e-3;
  /// Decoupled weight decay of the parameters that take decay (see no_decay()).
  TORCH_ARG(double, weight_decay) = 0.0;
  /// `{pattern, lr}` pairs: a parameter whose dotted name contains `pattern` trains at `lr`. The
  /// first matching pair wins.
  TORCH_ARG(LrOverrides, lr_overrides) = {};

 public:
  /// Appends a learning-rate override: parameters whose name contains `pattern` train at `lr`,
  /// e.g. `.lr_for("classifier", 1e-3).lr_for("mask_scores", 1e-2)`.
  ParamGroupOptions& lr_for(std::string pattern, double lr) {
    lr_overrides_.emplace_back(std::move(pattern), lr);
    return *this;
  }
};

/// Whether the parameter called `name` is exempt from weight decay: biases (names ending in
/// "bias") and normalisation weights (names containing "norm" or "LayerNorm"), as in the
/// Hugging Face training scripts — decaying a LayerNorm gain towards 0 fights the normalisation —
/// and ProPETL's mask scores (names containing "mask_scores"), which are no weights: they only
/// rank the prototype's entries, and decay would pull every score towards the 0 the ranking
/// does not care about.
inline bool no_decay(std::string_view name) {
  const std::string_view bias = "bias";
  const bool is_bias = name.size() >= bias.size() && name.substr(name.size() - bias.size()) == bias;
  return is_bias || name.find("norm") != std::string_view::npos ||
         name.find("LayerNorm") != std::string_view::npos ||
         name.find("mask_scores") != std::string_view::npos;
}

/// One parameter group as named_param_groups() decided it, with the names of its tensors.
struct NamedParamGroup {
  std::vector<std::string> names;     ///< dotted names, in registration order
  std::vector<torch::Tensor> params;  ///< the tensors, in the same order
  double lr = 0.0;                    ///< learning rate of the group
  double weight_decay = 0.0;          ///< weight decay of the group (0 for no_decay() names)
};

/// Splits the trainable parameters of `module` (peft::named_trainable_parameters, nothing else)
/// into groups of equal learning rate and weight decay, in order of first appearance. Throws
/// peft::Error when the module has no trainable parameter or an option is out of range.
inline std::vector<NamedParamGroup> named_param_groups(const torch::nn::Module& module,
                                                       const ParamGroupOptions& options) {
  check(options.lr() > 0.0 && std::isfinite(options.lr()), "optim",
        "learning rate must be positive and finite, got {}", options.lr());
  check(options.weight_decay() >= 0.0 && std::isfinite(options.weight_decay()), "optim",
        "weight_decay must be >= 0, got {}", options.weight_decay());
  for (const auto& [pattern, lr] : options.lr_overrides()) {
    check(!pattern.empty(), "optim", "an lr_for() pattern is empty; it would match everything");
    check(lr > 0.0 && std::isfinite(lr), "optim",
          "lr_for(\"{}\") learning rate must be positive and finite, got {}", pattern, lr);
  }
  const auto named = named_trainable_parameters(module);
  check(!named.empty(), "optim",
        "the module has no trainable parameter; unfreeze or attach something to train");

  std::vector<NamedParamGroup> groups;
  std::vector<size_t> unmatched;
  std::vector<bool> used(options.lr_overrides().size(), false);
  for (const auto& [name, p] : named) {
    double lr = options.lr();
    for (size_t i = 0; i < options.lr_overrides().size(); ++i) {
      if (name.find(options.lr_overrides()[i].first) != std::string::npos) {
        lr = options.lr_overrides()[i].second;
        used[i] = true;
        break;
      }
    }
    const double decay = no_decay(name) ? 0.0 : options.weight_decay();
    auto it = std::find_if(groups.begin(), groups.end(), [&](const NamedParamGroup& g) {
      return g.lr == lr && g.weight_decay == decay;
    });
    if (it == groups.end()) {
      groups.push_back({{}, {}, lr, decay});
      it = std::prev(groups.end());
    }
    it->names.push_back(name);
    it->params.push_back(p);
  }
  for (size_t i = 0; i < used.size(); ++i) {
    check(used[i], "optim", "lr_for(\"{}\") matched no trainable parameter",
          options.lr_overrides()[i].first);
  }
  return groups;
}

/// An AdamW optimizer (peft::AdamW: fused kernels where LibTorch has them) over exactly the
/// trainable parameters of `module`, grouped by named_param_groups(). `adamw` supplies betas, eps
/// and amsgrad; its lr and weight_decay are replaced by each group's.
inline std::unique_ptr<torch::optim::AdamW> make_adamw(
    const torch::nn::Module& module, const ParamGroupOptions& options,
    torch::optim::AdamWOptions adamw = torch::optim::AdamWOptions()) {
  std::vector<torch::optim::OptimizerParamGroup> groups;
  for (const auto& g : named_param_groups(module, options)) {
    auto group_options = std::make_unique<torch::optim::AdamWOptions>(adamw);
    group_options->lr(g.lr).weight_decay(g.weight_decay);
    groups.emplace_back(g.params, std::move(group_options));
  }
  adamw.lr(options.lr()).weight_decay(options.weight_decay());
  return std::make_unique<peft::AdamW>(std::move(groups), adamw);
}

/// Throws peft::Error unless `optimizer` holds every trainable parameter of `module` exactly
/// once and nothing else: a frozen tensor, a tensor foreign to the module, a duplicate or a
/// missing trainable parameter is named in the message. This is what keeps frozen weights
/// frozen: an optimizer with weight decay moves a tensor even when it gets no gradient.
inline void check_optimizer_parameters(const torch::optim::Optimizer& optimizer,
                                       const torch::nn::Module& module) {
  std::unordered_map<const void*, std::string> all_names;
  for (const auto& item : module.named_parameters(/*recurse=*/true)) {
    all_names.emplace(item.value().unsafeGetTensorImpl(), item.key());
  }
  std::unordered_map<const void*, bool> trainable_seen;
  for (const auto& [name, p] : named_trainable_parameters(module)) {
    trainable_seen.emplace(p.unsafeGetTensorImpl(), false);
  }
  const auto& groups = optimizer.param_groups();
  for (size_t g = 0; g < groups.size(); ++g) {
    const auto& params = groups[g].params();
    for (size_t i = 0; i < params.size(); ++i) {
      const void* key = params[i].unsafeGetTensorImpl();
      auto name_it = all_names.find(key);
      const std::string where = fmt::format("group {} entry {}", g, i);
      if (name_it == all_names.end()) {
        fail("optim", "{}: a tensor of shape [{}] that is not a parameter of the module", where,
             fmt::join(params[i].sizes(), ", "));
      }
      auto seen_it = trainable_seen.find(key);
      if (seen_it == trainable_seen.end()) {
        fail("optim",
             "{}: parameter \"{}\" is frozen (requires_grad=false) but the optimizer "
             "would update it",
             where, name_it->second);
      }
      if (seen_it->second) {
        fail("optim", "{}: parameter \"{}\" appears twice in the optimizer", where,
             name_it->second);
      }
      seen_it->second = true;
    }
  }
  for (const auto& [name, p] : named_trainable_parameters(module)) {
    if (!trainable_seen.at(p.unsafeGetTensorImpl())) {
      fail("optim", "trainable parameter \"{}\" is missing from the optimizer", name);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Learning-rate schedules

/// What the learning rate does after warm-up.
enum class Schedule {
  constant,  ///< stays at the base rate
  linear,    ///< falls linearly to the floor at total_steps
  cosine,    ///< follows half a cosine down to the floor at total_steps
};

constexpr EnumTable<Schedule, 3> enum_table(Schedule) {
  return {"schedule",
          "schedule",
          {{{Schedule::constant, "constant"},
            {Schedule::linear, "linear"},
            {Schedule::cosine, "cosine"}}}};
}

/// Name of a Schedule ("constant", "linear", "cosine").
inline const char* schedule_name(Schedule s) {
  return enum_name(s);
}

/// Shape of a learning-rate schedule, as factors of each group's base rate.
struct ScheduleOptions {
  /// Optimizer steps of the whole run; the decay reaches the floor here.
  TORCH_ARG(int64_t, total_steps) = 0;
  /// Warm-up length in steps; when negative, warmup_ratio decides.
  TORCH_ARG(int64_t, warmup_steps) = -1;
  /// Warm-up length as a share of total_steps (rounded up), used when warmup_steps is negative.
  TORCH_ARG(double, warmup_ratio) = 0.0;
  /// What follows the warm-up.
  TORCH_ARG(Schedule, schedule) = Schedule::linear;
  /// Factor the decay ends at (0 = decay to nothing; 0.1 = a floor at 10% of the base rate).
  TORCH_ARG(double, min_lr_ratio) = 0.0;
};

/// A learning-rate schedule as a pure function of the step: factor(step) multiplies each base
/// rate for the optimizer step with 0-based index `step`. Warm-up rises linearly from 0
/// (factor(0) = 0 when there is warm-up, like Hugging Face); after total_steps the factor stays
/// at the floor.
class LRSchedule {
  // Python's math.pi; M_PI is not standard C++.
  static constexpr double kPi = 3.141592653589793;

 public:
  /// Validates `options`; throws peft::Error naming the bad value.
  explicit LRSchedule(ScheduleOptions options) : options_(std::move(options)) {
    const auto total = options_.total_steps();
    check(total > 0, "schedule", "total_steps must be positive, got {}", total);
    const double ratio = options_.warmup_ratio();
    check(ratio >= 0.0 && ratio <= 1.0, "schedule", "warmup_ratio must be in [0, 1], got {}",
          ratio);
    const double floor = options_.min_lr_ratio();
    check(floor >= 0.0 && floor <= 1.0, "schedule", "min_lr_ratio must be in [0, 1], got {}",
          floor);
    if (options_.warmup_steps() >= 0) {
      warmup_ = options_.warmup_steps();
    } else {
      warmup_ = static_cast<int64_t>(std::ceil(ratio * static_cast<double>(total)));
    }
    check(warmup_ <= total, "schedule", "{} warm-up steps exceed the {} total steps", warmup_,
          total);
  }

  /// Warm-up length in steps, after resolving warmup_ratio.
  int64_t warmup_steps() const { return warmup_; }
  /// Steps of the whole run.
  int64_t total_steps() const { return options_.total_steps(); }
  /// The options this schedule was built from.
  const ScheduleOptions& options() const { return options_; }

  /// Factor of the base learning rate at 0-based optimizer step `step`.
  double factor(int64_t step) const {
    check(step >= 0, "schedule", "step must be >= 0, got {}", step);
    if (step < warmup_) return static_cast<double>(step) / static_cast<double>(warmup_);
    const double floor = options_.min_lr_ratio();
    const double span = static_cast<double>(std::max<int64_t>(1, total_steps() - warmup_));
    const double progress = std::min(1.0, static_cast<double>(step - warmup_) / span);
    double decay = 1.0;
    switch (options_.schedule()) {
      case Schedule::constant:
        return 1.0;
      case Schedule::linear:
        decay = 1.0 - progress;
        break;
      case Schedule::cosine:
        decay = 0.5 * (1.0 + std::cos(kPi * progress));
        break;
    }
    return floor + (1.0 - floor) * decay;
  }

 private:
  ScheduleOptions options_;
  int64_t warmup_ = 0;
};

/// What an LRScheduler needs to continue where it stopped: the steps taken and the base rates.
struct SchedulerState {
  int64_t step = 0;              ///< optimizer steps taken so far
  std::vector<double> base_lrs;  ///< base learning rate of each parameter group
};

/// Applies an LRSchedule to every parameter group of an optimizer, each group scaled from its
/// own base rate (so per-group learning rates keep their ratios). Call step() after each
/// optimizer.step(). The optimizer must outlive the scheduler.
class LRScheduler {
 public:
  /// Takes each group's current learning rate as its base rate and sets the rates of step 0.
  LRScheduler(torch::optim::Optimizer& optimizer, LRSchedule schedule)
      : optimizer_(optimizer), schedule_(std::move(schedule)) {
    for (const auto& group : optimizer_.param_groups()) {
      base_lrs_.push_back(group.options().get_lr());
    }
    apply();
  }

  /// Advances one optimizer step and sets the learning rates for the next.
  void step() {
    ++step_;
    apply();
  }

  /// Optimizer steps taken so far (the 0-based index of the next step).
  int64_t steps() const { return step_; }
  /// The current factor of the base rates.
  double factor() const { return schedule_.factor(step_); }
  /// Base learning rate of each parameter group.
  const std::vector<double>& base_lrs() const { return base_lrs_; }
  /// The schedule being applied.
  const LRSchedule& schedule() const { return schedule_; }

  /// Current learning rate of each parameter group.
  std::vector<double> lrs() const {
    std::vector<double> out;
    for (const auto& group : optimizer_.param_groups()) out.push_back(group.options().get_lr());
    return out;
  }

  /// The step count and base rates, for a checkpoint.
  SchedulerState state() const { return {step_, base_lrs_}; }

  /// Restores a state() and sets the learning rates it implies. Throws peft::Error when the
  /// number of base rates differs from the optimizer's parameter groups or the step is negative.
  void load_state(const SchedulerState& state) {
    check(state.step >= 0, "schedule", "saved step must be >= 0, got {}", state.step);
    check(state.base_lrs.size() == optimizer_.param_groups().size(), "schedule",
          "saved state has {} base learning rates but the optimizer has {} parameter groups",
          state.base_lrs.size(), optimizer_.param_groups().size());
    step_ = state.step;
    base_lrs_ = state.base_lrs;
    apply();
  }

 private:
  void apply() {
    const double f = schedule_.factor(step_);
    auto& groups = optimizer_.param_groups();
    for (size_t i = 0; i < groups.size(); ++i) groups[i].options().set_lr(base_lrs_[i] * f);
  }

  torch::optim::Optimizer& optimizer_;
  LRSchedule schedule_;
  std::vector<double> base_lrs_;
  int64_t step_ = 0;
};

PEFT_NAMESPACE_END
