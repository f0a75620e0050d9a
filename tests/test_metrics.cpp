#include <peft/train/accumulator.hpp>
#include <peft/train/metrics.hpp>

#include <catch2/catch.hpp>
#include <torch/torch.h>

#include <cmath>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace metrics = peft::metrics;
using Catch::Matchers::Contains;

namespace {

// Binary example: tp = 4 (i = 0, 3, 5, 8), fn = 2 (2, 9), fp = 1 (6), tn = 3 (1, 4, 7).
const std::vector<int64_t> kBinaryLabels{1, 0, 1, 1, 0, 1, 0, 0, 1, 1};
const std::vector<int64_t> kBinaryPreds{1, 0, 0, 1, 0, 1, 1, 0, 1, 0};

// Three classes; confusion matrix (rows = label, columns = prediction):
//   [[3, 0, 0], [0, 2, 1], [1, 1, 2]]
const std::vector<int64_t> kLabels3{0, 1, 2, 0, 1, 2, 0, 1, 2, 2};
const std::vector<int64_t> kPreds3{0, 2, 2, 0, 1, 1, 0, 1, 2, 0};

std::string message_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const peft::Error& e) {
    return e.what();
  }
  return "(no peft::Error thrown)";
}

}  // namespace

TEST_CASE("accuracy and binary F1 match hand counts", "[metrics]") {
  CHECK(metrics::accuracy(kBinaryPreds, kBinaryLabels) == Approx(0.7));
  // F1 = 2tp / (2tp + fp + fn) = 8 / 11
  CHECK(metrics::f1(kBinaryPreds, kBinaryLabels) == Approx(8.0 / 11.0).epsilon(1e-12));
  // Swapping predictions and labels swaps fp and fn: F1 is symmetric.
  CHECK(metrics::f1(kBinaryLabels, kBinaryPreds) == Approx(8.0 / 11.0).epsilon(1e-12));
  // Labels stored as float (data::Example::label) are accepted.
  const std::vector<float> float_labels(kBinaryLabels.begin(), kBinaryLabels.end());
  CHECK(metrics::accuracy(kBinaryPreds, float_labels) == Approx(0.7));
  // No positives anywhere: 0, as scikit-learn's zero_division default.
  CHECK(metrics::f1(std::vector<int>{0, 0}, std::vector<int>{0, 0}) == 0.0);
  CHECK(metrics::f1(std::vector<int>{1, 1}, std::vector<int>{1, 1}) == 1.0);
  CHECK(message_of([] {
          metrics::f1(std::vector<int>{0, 2}, std::vector<int>{0, 1});
        }) == "[peft::metrics] f1: predictions[1] is 2; binary F1 needs 0 or 1");
}

TEST_CASE("macro F1 averages per-class F1 over the classes present", "[metrics]") {
  // Per class 2*C[k,k] / (row_k + col_k): 6/7, 4/6, 4/7; mean = 0.6984126984126983
  // (numpy: np.mean([2*C[k,k]/(t[k]+p[k]) for k in range(3)])).
  CHECK(metrics::macro_f1(kPreds3, kLabels3) == Approx(0.6984126984126983).epsilon(1e-12));
  // For binary data macro F1 is the mean of both classes' F1: (8/11 + 6/9) / 2.
  CHECK(metrics::macro_f1(kBinaryPreds, kBinaryLabels) ==
        Approx((8.0 / 11.0 + 6.0 / 9.0) / 2).epsilon(1e-12));
}

TEST_CASE("Matthews correlation: binary formula, multiclass form, degenerate cases", "[metrics]") {
  // (tp*tn - fp*fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn)) = (12 - 2) / sqrt(5*6*4*5)
  CHECK(metrics::matthews_corrcoef(kBinaryPreds, kBinaryLabels) ==
        Approx(10.0 / std::sqrt(600.0)).epsilon(1e-12));
  // Multiclass (scikit-learn's formula): t = [3,3,4], p = [4,3,3], c = 7, s = 10:
  // (c*s - t.p) / sqrt((s^2 - p.p)(s^2 - t.t)) = (70 - 33) / sqrt(66 * 66) = 37/66.
  CHECK(metrics::matthews_corrcoef(kPreds3, kLabels3) == Approx(37.0 / 66.0).epsilon(1e-12));
  // Perfect and inverted predictions.
  CHECK(metrics::matthews_corrcoef(kBinaryLabels, kBinaryLabels) == Approx(1.0));
  std::vector<int64_t> inverted;
  for (auto y : kBinaryLabels) inverted.push_back(1 - y);
  CHECK(metrics::matthews_corrcoef(inverted, kBinaryLabels) == Approx(-1.0));
  // Constant predictions (a collapsed classifier): undefined, reported as 0 like scikit-learn.
  CHECK(metrics::matthews_corrcoef(std::vector<int64_t>(10, 1), kBinaryLabels) == 0.0);
  CHECK(metrics::matthews_corrcoef(kBinaryPreds, std::vector<int64_t>(10, 0)) == 0.0);
}

TEST_CASE("Pearson and Spearman match SciPy, ties get average ranks", "[metrics]") {
  const std::vector<double> x{1.0, 2.5, 2.5, 4.0, 3.0, 6.5};
  const std::vector<double> y{0.5, 2.0, 3.0, 3.0, 1.0, 7.0};
  // scipy 1.17: pearsonr(x, y)[0] = 0.9197514776607829, spearmanr(x, y)[0] = 0.75
  CHECK(metrics::pearson(x, y) == Approx(0.9197514776607829).epsilon(1e-12));
  CHECK(metrics::spearman(x, y) == Approx(0.75).epsilon(1e-12));
  // scipy rankdata(x) = [1, 2.5, 2.5, 5, 4, 6]; rankdata(y) = [1, 3, 4.5, 4.5, 2, 6]
  CHECK(metrics::average_ranks(x) == std::vector<double>{1, 2.5, 2.5, 5, 4, 6});
  CHECK(metrics::average_ranks(y) == std::vector<double>{1, 3, 4.5, 4.5, 2, 6});
  // Heavy ties: spearmanr([1,1,1,2,2,3], [3,2,1,1,2,3])[0] = 0.19364916731037088,
  //             pearsonr(...)[0] = 0.27386127875258304
  const std::vector<int> a{1, 1, 1, 2, 2, 3}, b{3, 2, 1, 1, 2, 3};
  CHECK(metrics::spearman(a, b) == Approx(0.19364916731037088).epsilon(1e-12));
  CHECK(metrics::pearson(a, b) == Approx(0.27386127875258304).epsilon(1e-12));
  // Exactly linear data stays within [-1, 1].
  const std::vector<double> line{0.1, 0.2, 0.3, 0.7}, neg{-0.3, -0.6, -0.9, -2.1};
  CHECK(metrics::pearson(line, neg) == Approx(-1.0));
  CHECK(metrics::pearson(line, neg) >= -1.0);
  // Constant input: NaN, as SciPy (documented choice; not an error).
  CHECK(std::isnan(metrics::pearson(std::vector<double>{2, 2, 2}, std::vector<double>{1, 2, 3})));
  CHECK(std::isnan(metrics::spearman(std::vector<double>{1, 2, 3}, std::vector<double>{5, 5, 5})));
  CHECK(message_of([] {
          metrics::pearson(std::vector<double>{1, NAN}, std::vector<double>{1, 2});
        }) == "[peft::metrics] pearson: predictions[1] is nan, expected a finite number");
}

TEST_CASE("metrics reject empty and mismatched inputs", "[metrics]") {
  const std::vector<int64_t> empty;
  CHECK(message_of([&] { metrics::accuracy(empty, empty); }) ==
        "[peft::metrics] accuracy: no examples to score");
  CHECK(message_of([&] { metrics::pearson(std::vector<double>{}, std::vector<double>{}); }) ==
        "[peft::metrics] pearson: no examples to score");
  CHECK(message_of([&] { metrics::matthews_corrcoef(kBinaryPreds, empty); }) ==
        "[peft::metrics] mcc: 10 predictions but 0 labels; they must pair up one to one");
  CHECK(message_of([&] {
          metrics::f1(std::vector<int64_t>{1, 0, 1}, std::vector<int64_t>{1, 0});
        }) == "[peft::metrics] f1: 3 predictions but 2 labels; they must pair up one to one");
  CHECK(message_of([&] { metrics::accuracy(std::vector<float>{0.5f}, std::vector<int64_t>{1}); }) ==
        "[peft::metrics] accuracy: predictions[0] is 0.5, expected a class index");
}

TEST_CASE("evaluate computes a task's metric set by name", "[metrics]") {
  peft::data::TaskInfo mrpc{"mrpc", 2, {"not_equivalent", "equivalent"}, {"f1", "accuracy"}, true};
  auto scores = metrics::evaluate(mrpc, kBinaryPreds, kBinaryLabels);
  REQUIRE(scores.size() == 2);
  CHECK(scores.at("f1") == Approx(8.0 / 11.0));
  CHECK(scores.at("accuracy") == Approx(0.7));

  const std::vector<float> x{1.0f, 2.5f, 2.5f, 4.0f, 3.0f, 6.5f};
  const std::vector<float> y{0.5f, 2.0f, 3.0f, 3.0f, 1.0f, 7.0f};
  auto sts = metrics::evaluate(std::vector<std::string>{"pearson", "spearman"}, x, y);
  CHECK(sts.at("pearson") == Approx(0.9197514776607829).epsilon(1e-6));
  CHECK(sts.at("spearman") == Approx(0.75).epsilon(1e-12));

  auto cola = metrics::evaluate(std::vector<std::string>{"mcc", "matthews_correlation", "macro_f1"},
                                kPreds3, kLabels3);
  CHECK(cola.at("mcc") == Approx(37.0 / 66.0));
  CHECK(cola.at("matthews_correlation") == cola.at("mcc"));
  CHECK(cola.at("macro_f1") == Approx(0.6984126984126983));

  CHECK(message_of([] {
          metrics::evaluate(std::vector<std::string>{"acc"}, kBinaryPreds, kBinaryLabels);
        }) ==
        "[peft::metrics] unknown metric \"acc\"; known metrics: accuracy, f1, macro_f1, mcc, "
        "pearson, spearman");
}

TEST_CASE("Accumulator scores logits batch by batch like the metrics on the whole split",
          "[metrics]") {
  // kBinaryPreds as the argmax of logits, in batches of 4, 4 and 2; labels as int64 tensors.
  metrics::Accumulator acc;
  for (size_t start = 0; start < kBinaryPreds.size(); start += 4) {
    const size_t end = std::min(kBinaryPreds.size(), start + 4);
    std::vector<float> logits;
    std::vector<int64_t> labels;
    for (size_t i = start; i < end; ++i) {
      // Class 1 wins by 0.5 when predicted, else class 0 does.
      logits.push_back(kBinaryPreds[i] == 1 ? -0.25F : 0.25F);
      logits.push_back(kBinaryPreds[i] == 1 ? 0.25F : -0.25F);
      labels.push_back(kBinaryLabels[i]);
    }
    const auto n = static_cast<int64_t>(end - start);
    acc.add(torch::tensor(logits).view({n, 2}), torch::tensor(labels, torch::kLong));
  }
  CHECK(acc.size() == 10);
  const auto scores = acc.compute({"accuracy", "f1"});
  CHECK(scores.at("accuracy") == Approx(0.7));                  // hand count, as above
  CHECK(scores.at("f1") == Approx(8.0 / 11.0).epsilon(1e-12));  // 2tp / (2tp + fp + fn)

  // Regression: [N, 1] and [N] outputs, float labels; Pearson of (1, 2, 3) and (1, 2, 4) =
  // 0.9819805060619657 (scipy.stats.pearsonr).
  metrics::Accumulator reg(/*regression=*/true);
  reg.add(torch::tensor({1.0F, 2.0F}).view({2, 1}), torch::tensor({1.0F, 2.0F}));
  reg.add(torch::tensor({3.0F}), torch::tensor({4.0F}));
  CHECK(reg.predictions() == std::vector<double>{1, 2, 3});
  CHECK(reg.compute({"pearson"}).at("pearson") == Approx(0.9819805060619657).epsilon(1e-12));

  CHECK_THAT(message_of([] { metrics::Accumulator().compute({"accuracy"}); }),
             Contains("no rows to evaluate"));
  CHECK_THAT(message_of([] {
               metrics::Accumulator().add(torch::zeros({3, 2}), torch::zeros({2}, torch::kLong));
             }),
             Contains("3 outputs for 2 labels"));
  CHECK_THAT(message_of([] {
               metrics::Accumulator(true).add(torch::zeros({3, 2}), torch::zeros({3}));
             }),
             Contains("must be [N] or [N, 1], got [3, 2]"));
  CHECK_THAT(message_of([] {
               metrics::Accumulator().add(torch::zeros({3}), torch::zeros({3}, torch::kLong));
             }),
             Contains("logits must be [N, C], got [3]"));
}
