#pragma once

// Freezing and the trainable-parameter view of a module tree: the only parameters a peft model
// ever hands to an optimizer are the ones trainable_parameters() returns.

#include <torch/nn/module.h>

#include <cstdint>
#include <iostream>
#include <string>
#include <unordered_set>
#include <utility>
#include <vector>

#include <fmt/format.h>

#include <peft/config.hpp>

PEFT_NAMESPACE_BEGIN

/// Turns off `requires_grad` on every parameter of `module` and its descendants.
/// Buffers are untouched (they never require grad).
inline void freeze(torch::nn::Module& module) {
  for (auto& p : module.parameters(/*recurse=*/true)) p.set_requires_grad(false);
}

/// Turns `requires_grad` back on for every parameter of `module` and its descendants.
inline void unfreeze(torch::nn::Module& module) {
  for (auto& p : module.parameters(/*recurse=*/true)) p.set_requires_grad(true);
}

/// Every distinct parameter of `module` that requires grad, with its dotted path, in registration
/// order. A tensor registered under two names (shared weights) appears once, under its first name.
inline std::vector<std::pair<std::string, torch::Tensor>> named_trainable_parameters(
    const torch::nn::Module& module) {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  std::unordered_set<const void*> seen;
  for (const auto& item : module.named_parameters(/*recurse=*/true)) {
    const auto& p = item.value();
    if (!p.requires_grad()) continue;
    if (!seen.insert(p.unsafeGetTensorImpl()).second) continue;
    out.emplace_back(item.key(), p);
  }
  return out;
}

/// The tensors of named_trainable_parameters(): what an optimizer should be given.
inline std::vector<torch::Tensor> trainable_parameters(const torch::nn::Module& module) {
  std::vector<torch::Tensor> out;
  for (auto& [name, p] : named_trainable_parameters(module)) out.push_back(p);
  return out;
}

/// Parameter counts of a module tree, each distinct tensor counted once.
struct ParameterCount {
  int64_t trainable = 0;        ///< elements in parameters that require grad
  int64_t total = 0;            ///< elements in all parameters
  int64_t trainable_bytes = 0;  ///< bytes those trainable elements take in their dtype

  /// Trainable share of the total, in percent (0 for an empty module).
  double percent() const {
    return total == 0 ? 0.0 : 100.0 * static_cast<double>(trainable) / static_cast<double>(total);
  }
};

/// Counts the distinct parameters of `module`.
inline ParameterCount count_parameters(const torch::nn::Module& module) {
  ParameterCount count;
  std::unordered_set<const void*> seen;
  for (const auto& p : module.parameters(/*recurse=*/true)) {
    if (!seen.insert(p.unsafeGetTensorImpl()).second) continue;
    count.total += p.numel();
    if (p.requires_grad()) {
      count.trainable += p.numel();
      count.trainable_bytes += p.numel() * static_cast<int64_t>(p.element_size());
    }
  }
  return count;
}

namespace detail {
/// 22713216 -> "22,713,216".
inline std::string group_thousands(int64_t value) {
  std::string digits = std::to_string(value < 0 ? -value : value);
  std::string out;
  for (size_t i = 0; i < digits.size(); ++i) {
    if (i > 0 && (digits.size() - i) % 3 == 0) out += ',';
    out += digits[i];
  }
  return value < 0 ? "-" + out : out;
}
}  // namespace detail

/// One line such as `trainable 147,456 / 22,713,216 (0.65%)`.
inline std::string trainable_report(const ParameterCount& count) {
  return fmt::format("trainable {} / {} ({:.2f}%)", detail::group_thousands(count.trainable),
                     detail::group_thousands(count.total), count.percent());
}

/// trainable_report() of a module.
inline std::string trainable_report(const torch::nn::Module& module) {
  return trainable_report(count_parameters(module));
}

/// Writes trainable_report(module) and a newline to `out`.
inline void print_trainable(const torch::nn::Module& module, std::ostream& out = std::cout) {
  out << trainable_report(module) << '\n';
}

PEFT_NAMESPACE_END
