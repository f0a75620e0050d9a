#pragma once

// Carving a validation split out of training data, for tasks whose official dev split is withheld
// (GLUE's CoLA, RTE and STS-B dev sets are not distributed with every copy) or must stay untouched
// while settings are chosen. No LibTorch here.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <random>
#include <utility>
#include <vector>

#include <peft/config.hpp>
#include <peft/core/error.hpp>
#include <peft/data/example.hpp>

PEFT_NAMESPACE_BEGIN
namespace data {

/// The rows a holdout of `fraction` takes from `rows` examples: round(fraction * rows), at most
/// `cap` (0: no cap), and always leaving at least one row to train on.
inline std::size_t holdout_size(std::size_t rows, double fraction, std::size_t cap = 0) {
  check(fraction > 0.0 && fraction < 1.0, "data", "holdout fraction must be in (0, 1), got {}",
        fraction);
  auto n = static_cast<std::size_t>(std::llround(fraction * static_cast<double>(rows)));
  if (cap > 0) n = std::min(n, cap);
  return rows == 0 ? 0 : std::clamp<std::size_t>(n, 1, rows - 1);
}

/// 0 .. n-1 in the order a Fisher-Yates shuffle driven by mt19937_64 from `seed` gives them (the
/// standard fixes mt19937_64's output, unlike std::shuffle's, so every platform agrees).
inline std::vector<std::size_t> shuffled_order(std::size_t n, uint64_t seed) {
  std::vector<std::size_t> order(n);
  for (std::size_t i = 0; i < n; ++i) order[i] = i;
  std::mt19937_64 rng(seed);
  for (std::size_t i = n; i > 1; --i) std::swap(order[i - 1], order[rng() % i]);
  return order;
}

/// Splits `examples` into {train, holdout}: `count` examples drawn without replacement by a
/// Fisher-Yates shuffle driven by mt19937_64 from `seed` (whose output the standard fixes, so every
/// platform carves the same rows), the rest kept in file order. The holdout is returned in file
/// order too. `count` must leave at least one example to train on.
///
///     auto rows = peft::data::glue::read("rte", dir, "train");
///     auto [train, validation] = peft::data::split_holdout(rows, 373);
inline std::pair<std::vector<Example>, std::vector<Example>> split_holdout(
    const std::vector<Example>& examples, std::size_t count, uint64_t seed = 0) {
  check(count > 0 && count < examples.size(), "data",
        "a holdout of {} examples needs more than {} examples in the file", count, examples.size());
  const auto order = shuffled_order(examples.size(), seed);
  std::vector<bool> held(examples.size(), false);
  for (std::size_t i = 0; i < count; ++i) held[order[i]] = true;
  std::pair<std::vector<Example>, std::vector<Example>> out;
  out.first.reserve(examples.size() - count);
  out.second.reserve(count);
  for (std::size_t i = 0; i < examples.size(); ++i) {
    (held[i] ? out.second : out.first).push_back(examples[i]);
  }
  return out;
}

}  // namespace data
PEFT_NAMESPACE_END
