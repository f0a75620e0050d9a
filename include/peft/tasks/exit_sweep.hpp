#pragma once

// Choosing an early-exit threshold after training: the metric, the mean number of layers run and
// the inference time of the full model and of each threshold, measured on the same evaluation
// batches in one process, and the fastest threshold whose metric stays within a tolerance of the
// full model's set on the model.
//
//     auto sweep = peft::sweep_exit_thresholds(model, dev_batches, "accuracy",
//                                              peft::models::ExitPolicy::Entropy);
//     // model now exits at sweep.chosen().threshold; sweep.points holds the whole curve

#include <torch/types.h>
#include <torch/utils.h>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include <peft/config.hpp>
#include <peft/core/error.hpp>
#include <peft/detail/json.hpp>
#include <peft/models/early_exit.hpp>
#include <peft/train/accumulator.hpp>

PEFT_NAMESPACE_BEGIN

/// The thresholds sweep_exit_thresholds() tries when none are given, from cautious to eager:
/// entropy 0.05 .. 0.6 nats, patience layers - 2 .. 1, learned confidence 0.99 .. 0.7.
inline std::vector<double> default_exit_thresholds(models::ExitPolicy policy, int64_t layers) {
  using models::ExitPolicy;
  if (policy == ExitPolicy::Entropy) return {0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6};
  if (policy == ExitPolicy::Learned) return {0.99, 0.95, 0.9, 0.85, 0.8, 0.7};
  std::vector<double> out;
  for (int64_t t = layers - 2; t >= 1; --t) out.push_back(static_cast<double>(t));
  return out;
}

/// One setting of a sweep: its threshold (0 for the full model), the metric on the batches, the
/// mean number of encoder layers run per example, and the fastest pass's seconds.
struct ExitPoint {
  double threshold = 0, metric = 0, mean_layers = 0;
  double seconds = std::numeric_limits<double>::infinity();
};

/// What sweep_exit_thresholds() measured and chose.
struct ExitSweep {
  models::ExitPolicy policy = models::ExitPolicy::None;
  ExitPoint full;
  /// One per threshold, in the order given.
  std::vector<ExitPoint> points;
  /// Index into points of the threshold set on the model.
  size_t chosen_index = 0;
  /// Whether the chosen threshold is within the tolerance of the full model's metric (else it is
  /// the most cautious one: the most layers run).
  bool within_tolerance = false;
  /// Examples measured per setting (over every rank with a collective).
  int64_t examples = 0;

  const ExitPoint& chosen() const { return points.at(chosen_index); }
};

/// How sweep_exit_thresholds() measures and chooses.
struct ExitSweepOptions {
  /// Thresholds to measure; empty: default_exit_thresholds().
  TORCH_ARG(std::vector<double>, thresholds) = {};
  /// Timed passes over the batches per setting (after one warm-up pass); each setting's fastest
  /// is kept. Passes go round all settings in turn, so drift on a shared machine hits all alike.
  TORCH_ARG(int, timings) = 3;
  /// How far below the full model's metric a threshold may fall and still be chosen.
  TORCH_ARG(double, tolerance) = 0.01;
  /// Where the batches are moved before the model sees them.
  TORCH_ARG(torch::Device, device) = torch::kCPU;
  /// With the ranks of a data-parallel run (each passing its share of the batches): metrics and
  /// mean layers are over every rank's rows, a pass takes as long as its slowest rank, so every
  /// rank measures the same curve and sets the same threshold. Every rank must call the sweep.
  TORCH_ARG(std::shared_ptr<Collective>, collective) = nullptr;
};

/// Measures `model` (in eval mode, no gradients) on `batches` (each with input_ids,
/// attention_mask, token_type_ids and int64 labels, as TextBatch) with every layer and with each
/// threshold of `policy`, scoring `metric` (a metrics::evaluate name) with metrics::Accumulator.
/// Sets on the model the fastest threshold whose metric is at most `tolerance` below the full
/// model's, or the most cautious one when none is, and returns the whole curve. Throws
/// peft::Error on an invalid threshold, no batches or policy None.
template <class Batch>
ExitSweep sweep_exit_thresholds(models::BertEarlyExitForSequenceClassificationImpl& model,
                                const std::vector<Batch>& batches, const std::string& metric,
                                models::ExitPolicy policy, const ExitSweepOptions& options = {}) {
  using models::ExitPolicy;
  check(policy != ExitPolicy::None, "early_exit", "sweep_exit_thresholds needs an exit policy");
  // With a collective a rank may hold no rows (the others do; the metric checks the total).
  check(!batches.empty() || options.collective() != nullptr, "early_exit",
        "sweep_exit_thresholds needs evaluation batches");
  check(options.timings() >= 1, "early_exit", "timings must be at least 1, got {}",
        options.timings());
  auto thresholds = options.thresholds().empty()
                        ? default_exit_thresholds(policy, model.num_layers())
                        : options.thresholds();
  check(!thresholds.empty(), "early_exit",
        "no thresholds to measure (patience over {} layers has none by default)",
        model.num_layers());
  for (double t : thresholds) models::check_exit_threshold(policy, t, "sweep_exit_thresholds");
  model.eval();
  torch::NoGradGuard no_grad;
  // The full model first, then each threshold.
  std::vector<std::pair<ExitPolicy, double>> settings{{ExitPolicy::None, 0.0}};
  for (double t : thresholds) settings.emplace_back(policy, t);
  std::vector<ExitPoint> measured(settings.size());
  int64_t total_examples = 0;
  auto pass = [&](size_t i) {
    model.set_exit(settings[i].first, settings[i].second);
    metrics::Accumulator scores;
    int64_t layers = 0, examples = 0;
    const auto start = std::chrono::steady_clock::now();
    for (const auto& raw : batches) {
      const auto b = raw.to(options.device());
      auto r = model.early_exit(b.input_ids, b.attention_mask, b.token_type_ids);
      layers += r.layers.sum().template item<int64_t>();
      examples += r.layers.numel();
      scores.add(r.logits, raw.labels);
    }
    double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (const auto& group = options.collective()) {
      scores.gather(*group);
      std::vector<torch::Tensor> counts{torch::tensor({layers, examples}, torch::kLong)};
      group->all_reduce_sum(counts, "the early-exit sweep's layer counts");
      layers = counts[0][0].template item<int64_t>();
      examples = counts[0][1].template item<int64_t>();
      for (const auto& t : group->all_gather(torch::tensor({seconds}, torch::kDouble),
                                             "the early-exit sweep's timings")) {
        seconds = std::max(seconds, t[0].template item<double>());
      }
    }
    total_examples = examples;
    auto& p = measured[i];
    p.threshold = settings[i].second;
    p.metric = scores.compute({metric}).at(metric);
    p.mean_layers =
        static_cast<double>(layers) / static_cast<double>(std::max<int64_t>(examples, 1));
    p.seconds = std::min(p.seconds, seconds);
  };
  pass(0);  // warm-up, not timed
  measured[0].seconds = std::numeric_limits<double>::infinity();
  for (int round = 0; round < options.timings(); ++round) {
    for (size_t i = 0; i < settings.size(); ++i) pass(i);
  }
  ExitSweep out;
  out.policy = policy;
  out.full = measured[0];
  out.points.assign(measured.begin() + 1, measured.end());
  bool found = false;
  for (size_t i = 0; i < out.points.size(); ++i) {
    const auto& p = out.points[i];
    if (p.metric < out.full.metric - options.tolerance()) continue;
    if (!found || p.seconds < out.points[out.chosen_index].seconds) out.chosen_index = i;
    found = true;
  }
  if (!found) {
    for (size_t i = 0; i < out.points.size(); ++i) {
      if (out.points[i].mean_layers > out.points[out.chosen_index].mean_layers) {
        out.chosen_index = i;
      }
    }
  }
  out.within_tolerance = found;
  out.examples = total_examples;
  model.set_exit(policy, out.chosen().threshold);
  return out;
}

/// A sweep as JSON, for a run's report: the policy, the threshold kept, the full model's
/// `metric` and seconds, and the curve (each threshold's metric, mean layers, seconds and speed-up
/// over the full model). Times to the millisecond; a non-finite metric is null.
inline nlohmann::ordered_json exit_sweep_report(const ExitSweep& sweep, const std::string& metric) {
  using detail::json_number;
  using detail::round_to;
  nlohmann::ordered_json report;
  report["policy"] = models::to_string(sweep.policy);
  report["threshold"] = sweep.chosen().threshold;
  report["full_" + metric] = json_number(sweep.full.metric);
  report["full_seconds"] = round_to(sweep.full.seconds, 3);
  auto curve = nlohmann::ordered_json::array();
  for (const auto& p : sweep.points) {
    curve.push_back({{"threshold", p.threshold},
                     {metric, json_number(p.metric)},
                     {"mean_layers", round_to(p.mean_layers, 3)},
                     {"seconds", round_to(p.seconds, 3)},
                     {"speedup", round_to(sweep.full.seconds / p.seconds, 3)}});
  }
  report["curve"] = curve;
  return report;
}

PEFT_NAMESPACE_END
