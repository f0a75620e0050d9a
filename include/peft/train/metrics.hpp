#pragma once

// Evaluation metrics of the GLUE and CLUE benchmarks over plain std::vector inputs: the same
// definitions as scikit-learn (accuracy_score, f1_score, matthews_corrcoef) and SciPy (pearsonr,
// spearmanr). Predictions for classification are class indices (take the argmax of the logits
// first); for regression they are scores.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <map>
#include <numeric>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include <peft/config.hpp>
#include <peft/core/error.hpp>
#include <peft/data/example.hpp>

PEFT_NAMESPACE_BEGIN
namespace metrics {
namespace detail {

template <class T, class U>
void check_sizes(std::string_view metric, const std::vector<T>& predictions,
                 const std::vector<U>& labels) {
  static_assert(std::is_arithmetic_v<T> && std::is_arithmetic_v<U>,
                "metrics take vectors of numbers");
  check(!predictions.empty() || !labels.empty(), "metrics", "{}: no examples to score", metric);
  check(predictions.size() == labels.size(), "metrics",
        "{}: {} predictions but {} labels; they must pair up one to one", metric,
        predictions.size(), labels.size());
}

// Class indices stored in floating point (as data::Example::label is) must be whole numbers.
template <class T>
std::vector<int64_t> classes(std::string_view metric, std::string_view what,
                             const std::vector<T>& values) {
  std::vector<int64_t> out(values.size());
  for (std::size_t i = 0; i < values.size(); ++i) {
    if constexpr (std::is_floating_point_v<T>) {
      const double v = static_cast<double>(values[i]);
      if (!std::isfinite(v) || v != std::round(v) || std::abs(v) > 9.0e15)
        fail("metrics", "{}: {}[{}] is {}, expected a class index", metric, what, i, v);
      out[i] = static_cast<int64_t>(v);
    } else {
      out[i] = static_cast<int64_t>(values[i]);
    }
  }
  return out;
}

template <class T>
std::vector<double> reals(std::string_view metric, std::string_view what,
                          const std::vector<T>& values) {
  std::vector<double> out(values.size());
  for (std::size_t i = 0; i < values.size(); ++i) {
    out[i] = static_cast<double>(values[i]);
    if (!std::isfinite(out[i]))
      fail("metrics", "{}: {}[{}] is {}, expected a finite number", metric, what, i, out[i]);
  }
  return out;
}

// F1 from counts, 0 when the class never occurs in either vector (scikit-learn's zero_division
// default).
inline double f1_from_counts(double tp, double fp, double fn) {
  const double denominator = 2 * tp + fp + fn;
  return denominator == 0 ? 0.0 : 2 * tp / denominator;
}

inline double pearson(const std::vector<double>& x, const std::vector<double>& y) {
  const double n = static_cast<double>(x.size());
  const double mx = std::accumulate(x.begin(), x.end(), 0.0) / n;
  const double my = std::accumulate(y.begin(), y.end(), 0.0) / n;
  double sxy = 0, sxx = 0, syy = 0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    const double dx = x[i] - mx, dy = y[i] - my;
    sxy += dx * dy;
    sxx += dx * dx;
    syy += dy * dy;
  }
  if (sxx == 0 || syy == 0) return std::numeric_limits<double>::quiet_NaN();
  // Rounding can push |r| a hair past 1 for perfectly (anti)correlated data.
  return std::clamp(sxy / std::sqrt(sxx * syy), -1.0, 1.0);
}

}  // namespace detail

/// Ranks 1..n, tied values sharing the average of the ranks they span (SciPy's
/// rankdata(method="average")).
inline std::vector<double> average_ranks(const std::vector<double>& values) {
  std::vector<std::size_t> order(values.size());
  std::iota(order.begin(), order.end(), std::size_t{0});
  std::stable_sort(order.begin(), order.end(),
                   [&](std::size_t a, std::size_t b) { return values[a] < values[b]; });
  std::vector<double> ranks(values.size());
  for (std::size_t start = 0; start < order.size();) {
    std::size_t end = start + 1;
    while (end < order.size() && values[order[end]] == values[order[start]]) ++end;
    // Positions start..end-1 hold ranks start+1..end; their mean:
    const double rank = (static_cast<double>(start + 1) + static_cast<double>(end)) / 2.0;
    for (std::size_t k = start; k < end; ++k) ranks[order[k]] = rank;
    start = end;
  }
  return ranks;
}

/// Fraction of predictions equal to their label. Throws on empty or mismatched inputs.
template <class P, class L>
double accuracy(const std::vector<P>& predictions, const std::vector<L>& labels) {
  detail::check_sizes("accuracy", predictions, labels);
  const auto p = detail::classes("accuracy", "predictions", predictions);
  const auto y = detail::classes("accuracy", "labels", labels);
  std::size_t correct = 0;
  for (std::size_t i = 0; i < p.size(); ++i) correct += p[i] == y[i] ? 1 : 0;
  return static_cast<double>(correct) / static_cast<double>(p.size());
}

/// Binary F1 of the positive class 1 (GLUE's MRPC and QQP metric). Every value must be 0 or 1;
/// 0 when neither vector contains a 1.
template <class P, class L>
double f1(const std::vector<P>& predictions, const std::vector<L>& labels) {
  detail::check_sizes("f1", predictions, labels);
  const auto p = detail::classes("f1", "predictions", predictions);
  const auto y = detail::classes("f1", "labels", labels);
  double tp = 0, fp = 0, fn = 0;
  for (std::size_t i = 0; i < p.size(); ++i) {
    if (p[i] != 0 && p[i] != 1)
      fail("metrics", "f1: predictions[{}] is {}; binary F1 needs 0 or 1", i, p[i]);
    if (y[i] != 0 && y[i] != 1)
      fail("metrics", "f1: labels[{}] is {}; binary F1 needs 0 or 1", i, y[i]);
    tp += (p[i] == 1 && y[i] == 1) ? 1 : 0;
    fp += (p[i] == 1 && y[i] == 0) ? 1 : 0;
    fn += (p[i] == 0 && y[i] == 1) ? 1 : 0;
  }
  return detail::f1_from_counts(tp, fp, fn);
}

/// Unweighted mean of the per-class F1 over every class that occurs in labels or predictions
/// (scikit-learn's f1_score(average="macro")).
template <class P, class L>
double macro_f1(const std::vector<P>& predictions, const std::vector<L>& labels) {
  detail::check_sizes("macro_f1", predictions, labels);
  const auto p = detail::classes("macro_f1", "predictions", predictions);
  const auto y = detail::classes("macro_f1", "labels", labels);
  struct Counts {
    double tp = 0, fp = 0, fn = 0;
  };
  std::map<int64_t, Counts> per_class;
  for (std::size_t i = 0; i < p.size(); ++i) {
    if (p[i] == y[i]) {
      per_class[p[i]].tp += 1;
    } else {
      per_class[p[i]].fp += 1;
      per_class[y[i]].fn += 1;
    }
  }
  double sum = 0;
  for (const auto& [cls, c] : per_class) sum += detail::f1_from_counts(c.tp, c.fp, c.fn);
  return sum / static_cast<double>(per_class.size());
}

/// Matthews correlation coefficient, in its multiclass form (Gorodkin's R_K, as scikit-learn),
/// which equals the usual binary formula for two classes (GLUE's CoLA metric). 0 when the
/// predictions or the labels are constant, where the coefficient is undefined.
template <class P, class L>
double matthews_corrcoef(const std::vector<P>& predictions, const std::vector<L>& labels) {
  detail::check_sizes("mcc", predictions, labels);
  const auto p = detail::classes("mcc", "predictions", predictions);
  const auto y = detail::classes("mcc", "labels", labels);
  std::map<int64_t, double> predicted, actual;
  double correct = 0;
  for (std::size_t i = 0; i < p.size(); ++i) {
    predicted[p[i]] += 1;
    actual[y[i]] += 1;
    correct += p[i] == y[i] ? 1 : 0;
  }
  const double n = static_cast<double>(p.size());
  double pt = 0, pp = 0, tt = 0;
  for (const auto& [cls, count] : predicted) {
    pp += count * count;
    auto it = actual.find(cls);
    if (it != actual.end()) pt += count * it->second;
  }
  for (const auto& [cls, count] : actual) tt += count * count;
  const double cov_py = correct * n - pt, cov_pp = n * n - pp, cov_yy = n * n - tt;
  if (cov_pp == 0 || cov_yy == 0) return 0.0;
  return std::clamp(cov_py / std::sqrt(cov_pp * cov_yy), -1.0, 1.0);
}

/// Pearson's correlation coefficient (GLUE's STS-B metric). NaN, not an error, when either
/// input is constant (as SciPy): an evaluation of a collapsed model should report, not abort.
/// Throws on empty, mismatched or non-finite inputs.
template <class P, class L>
double pearson(const std::vector<P>& predictions, const std::vector<L>& labels) {
  detail::check_sizes("pearson", predictions, labels);
  return detail::pearson(detail::reals("pearson", "predictions", predictions),
                         detail::reals("pearson", "labels", labels));
}

/// Spearman's rank correlation: Pearson's over average_ranks(), so ties share a rank. NaN when
/// either input is constant, like pearson().
template <class P, class L>
double spearman(const std::vector<P>& predictions, const std::vector<L>& labels) {
  detail::check_sizes("spearman", predictions, labels);
  return detail::pearson(average_ranks(detail::reals("spearman", "predictions", predictions)),
                         average_ranks(detail::reals("spearman", "labels", labels)));
}

/// Names evaluate() accepts.
inline std::vector<std::string> metric_names() {
  return {"accuracy", "f1", "macro_f1", "mcc", "pearson", "spearman"};
}

/// Computes each named metric ("accuracy", "f1", "macro_f1", "mcc" — alias
/// "matthews_correlation" —, "pearson", "spearman") and returns them by name.
template <class P, class L>
std::map<std::string, double> evaluate(const std::vector<std::string>& names,
                                       const std::vector<P>& predictions,
                                       const std::vector<L>& labels) {
  std::map<std::string, double> scores;
  for (const auto& name : names) {
    if (name == "accuracy") {
      scores[name] = accuracy(predictions, labels);
    } else if (name == "f1") {
      scores[name] = f1(predictions, labels);
    } else if (name == "macro_f1") {
      scores[name] = macro_f1(predictions, labels);
    } else if (name == "mcc" || name == "matthews_correlation") {
      scores[name] = matthews_corrcoef(predictions, labels);
    } else if (name == "pearson") {
      scores[name] = pearson(predictions, labels);
    } else if (name == "spearman") {
      scores[name] = spearman(predictions, labels);
    } else {
      fail("metrics", "unknown metric \"{}\"; known metrics: {}", name,
           data::detail::join(metric_names()));
    }
  }
  return scores;
}

/// Computes the task's own metric set (TaskInfo::metrics), e.g. f1 and accuracy for MRPC.
template <class P, class L>
std::map<std::string, double> evaluate(const data::TaskInfo& task,
                                       const std::vector<P>& predictions,
                                       const std::vector<L>& labels) {
  return evaluate(task.metrics, predictions, labels);
}

}  // namespace metrics
PEFT_NAMESPACE_END
