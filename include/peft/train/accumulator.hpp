#pragma once

// Metrics over a whole evaluation split, batch by batch: a model's outputs and the labels go in as
// they are computed, the named metrics (peft::metrics::evaluate) come out at the end. In a
// data-parallel run each rank adds the rows it scored and gather() collects every rank's rows
// before the metrics are taken.
//
//     peft::metrics::Accumulator scores(/*regression=*/false);
//     for (const auto& b : batches) scores.add(model(b.input_ids, b.attention_mask), b.labels);
//     auto result = scores.compute({"accuracy", "f1"});

#include <torch/types.h>

#include <cstddef>
#include <map>
#include <string>
#include <vector>

#include <peft/config.hpp>
#include <peft/core/error.hpp>
#include <peft/detail/shape.hpp>
#include <peft/train/collective.hpp>
#include <peft/train/metrics.hpp>

PEFT_NAMESPACE_BEGIN
namespace metrics {

/// Predictions and labels of an evaluation, collected a batch at a time. A classifier's
/// prediction is the argmax of its logits [N, C]; a regressor's is its score (outputs [N] or
/// [N, 1]). Metrics do not depend on the order of the rows, so batches may come in any order
/// (length-sorted, one rank's share).
class Accumulator {
 public:
  explicit Accumulator(bool regression = false) : regression_(regression) {}

  /// Adds one batch: `outputs` [N, C] logits (or [N] / [N, 1] scores for regression) and its N
  /// `labels` (class indices, or scores). Any device and floating type; copied to the CPU.
  /// Throws peft::Error when the shapes do not match.
  void add(const torch::Tensor& outputs, const torch::Tensor& labels) {
    check(outputs.defined() && labels.defined(), "metrics", "add() needs outputs and labels");
    check(labels.dim() == 1, "metrics", "labels must be one value per row, got shape {}",
          peft::detail::shape(labels.sizes()));
    torch::Tensor predicted;
    if (regression_) {
      check(outputs.dim() == 1 || (outputs.dim() == 2 && outputs.size(1) == 1), "metrics",
            "a regression's outputs must be [N] or [N, 1], got {}",
            peft::detail::shape(outputs.sizes()));
      predicted = outputs.reshape({-1});
    } else {
      check(outputs.dim() == 2, "metrics", "a classifier's logits must be [N, C], got {}",
            peft::detail::shape(outputs.sizes()));
      predicted = outputs.argmax(-1);
    }
    check(predicted.size(0) == labels.size(0), "metrics", "{} outputs for {} labels",
          predicted.size(0), labels.size(0));
    append(predictions_, predicted);
    append(labels_, labels);
  }

  /// Replaces this rank's rows by every rank's, in rank order (a no-op with one process). Every
  /// rank must call it.
  void gather(Collective& group) {
    predictions_ = gather_values(group, predictions_, "the evaluation's predictions");
    labels_ = gather_values(group, labels_, "the evaluation's labels");
  }

  /// The named metrics (metrics::evaluate's names) over every row added. Throws peft::Error when
  /// no row was added or a name is unknown.
  std::map<std::string, double> compute(const std::vector<std::string>& names) const {
    check(!predictions_.empty(), "metrics", "no rows to evaluate");
    return evaluate(names, predictions_, labels_);
  }

  /// The predictions (class indices as doubles, or scores) and labels, in the order added.
  const std::vector<double>& predictions() const { return predictions_; }
  const std::vector<double>& labels() const { return labels_; }
  size_t size() const { return predictions_.size(); }
  bool regression() const { return regression_; }

 private:
  static void append(std::vector<double>& out, const torch::Tensor& values) {
    const auto v = values.detach().to(torch::kCPU, torch::kDouble).contiguous();
    out.insert(out.end(), v.data_ptr<double>(), v.data_ptr<double>() + v.numel());
  }

  bool regression_;
  std::vector<double> predictions_, labels_;
};

}  // namespace metrics
PEFT_NAMESPACE_END
