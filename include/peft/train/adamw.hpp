#pragma once

// AdamW with one fused kernel per tensor where LibTorch has it.

#include <torch/optim/adamw.h>
#include <torch/types.h>
#include <torch/utils.h>

#include <cmath>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <peft/config.hpp>
#include <peft/detail/torch_compat.hpp>

// ATen's fused AdamW (one vectorised pass over each tensor, CPU and CUDA) from LibTorch 2.4 on.
#if PEFT_TORCH_VERSION >= 204
#define PEFT_HAS_FUSED_ADAMW 1
#include <ATen/ops/_fused_adamw.h>
#else
#define PEFT_HAS_FUSED_ADAMW 0
#endif

PEFT_NAMESPACE_BEGIN

/// torch::optim::AdamW with the same options, state, serialisation and results (up to float
/// rounding), whose step() runs ATen's fused AdamW kernel — one pass over each tensor instead of
/// LibTorch's nine separate operations (weight decay, two moment updates, square root, division,
/// epsilon, update) — where LibTorch has it (2.4 and later) and every parameter allows it (dense
/// contiguous gradients, CPU or CUDA, a floating type; maximize off). Otherwise, and on older
/// LibTorch, it is exactly torch::optim::AdamW.
///
/// Its state is torch::optim::AdamWParamState, so checkpoints written by either class load into
/// the other. The trainer (peft::make_adamw) builds this one.
class AdamW : public torch::optim::AdamW {
 public:
  using torch::optim::AdamW::AdamW;

  torch::Tensor step(LossClosure closure = nullptr) override {
#if PEFT_HAS_FUSED_ADAMW
    if (fusable()) return fused_step(closure);
#endif
    return torch::optim::AdamW::step(closure);
  }

  /// Whether step() takes the fused kernel with the current parameters and options.
  bool fusable() const {
#if PEFT_HAS_FUSED_ADAMW
    for (const auto& group : param_groups_) {
      for (const auto& p : group.params()) {
        const auto& g = p.grad();
        if (!g.defined()) continue;
        if (g.is_sparse() || !p.is_contiguous() || !g.is_contiguous() ||
            g.scalar_type() != p.scalar_type() || !(p.is_cpu() || p.is_cuda()) ||
            !(p.scalar_type() == torch::kFloat || p.scalar_type() == torch::kHalf ||
              p.scalar_type() == torch::kBFloat16)) {
          return false;
        }
        auto it = state_.find(key(p));
        if (it != state_.end()) {
          const auto& s = static_cast<const torch::optim::AdamWParamState&>(*it->second);
          if (!s.exp_avg().is_contiguous() || !s.exp_avg_sq().is_contiguous()) return false;
        }
      }
    }
    return true;
#else
    return false;
#endif
  }

 private:
#if PEFT_HAS_FUSED_ADAMW
  // The key of a parameter's entry in the state map (LibTorch 1.x keyed it by a string).
  static void* key(const torch::Tensor& p) {
    return p.unsafeGetTensorImpl();
  }
  static_assert(
      std::is_same_v<std::decay_t<decltype(std::declval<torch::optim::AdamW&>().state())>::key_type,
                     void*>,
      "this LibTorch keys optimizer state differently");

  torch::Tensor fused_step(const LossClosure& closure) {
    torch::NoGradGuard no_grad;
    torch::Tensor loss;
    if (closure != nullptr) {
      at::AutoGradMode enable_grad(true);
      loss = closure();
    }
    for (auto& group : param_groups_) {
      auto& o = static_cast<torch::optim::AdamWOptions&>(group.options());
      // One kernel call per device and dtype, as Python's fused AdamW does.
      struct Lists {
        std::vector<torch::Tensor> params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps;
      };
      std::map<std::pair<std::string, int>, Lists> buckets;
      for (auto& p : group.params()) {
        if (!p.grad().defined()) continue;
        auto& slot = state_[key(p)];
        if (!slot) {
          auto s = std::make_unique<torch::optim::AdamWParamState>();
          s->step(0);
          s->exp_avg(torch::zeros_like(p, torch::MemoryFormat::Preserve));
          s->exp_avg_sq(torch::zeros_like(p, torch::MemoryFormat::Preserve));
          if (o.amsgrad()) s->max_exp_avg_sq(torch::zeros_like(p, torch::MemoryFormat::Preserve));
          slot = std::move(s);
        }
        auto& s = static_cast<torch::optim::AdamWParamState&>(*slot);
        s.step(s.step() + 1);
        auto& l = buckets[{p.device().str(), static_cast<int>(p.scalar_type())}];
        l.params.push_back(p);
        l.grads.push_back(p.grad());
        l.exp_avgs.push_back(s.exp_avg());
        l.exp_avg_sqs.push_back(s.exp_avg_sq());
        if (o.amsgrad()) l.max_exp_avg_sqs.push_back(s.max_exp_avg_sq());
        // The kernel reads the step count (already advanced) from a float tensor.
        l.steps.push_back(
            torch::scalar_tensor(static_cast<double>(s.step()),
                                 torch::TensorOptions().dtype(torch::kFloat).device(p.device())));
      }
      const auto [beta1, beta2] = o.betas();
      for (auto& [where, l] : buckets) {
        at::_fused_adamw_(l.params, l.grads, l.exp_avgs, l.exp_avg_sqs, l.max_exp_avg_sqs, l.steps,
                          o.lr(), beta1, beta2, o.weight_decay(), o.eps(), o.amsgrad(),
                          /*maximize=*/false);
      }
    }
    return loss;
  }
#endif
};

PEFT_NAMESPACE_END
