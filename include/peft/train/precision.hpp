#pragma once

// Mixed precision for training and evaluation: autocast (matrix products in bfloat16 or float16,
// parameters and optimizer state kept in float32) and the dynamic loss scale float16 needs so
// that small gradients do not flush to zero.
//
// The trainer uses these through TrainerOptions::precision(); they are public so that code that
// runs a model outside the trainer (inference, an evaluation loop) can use the same rules.

#include <ATen/autocast_mode.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include <string>
#include <string_view>
#include <vector>

#include <peft/config.hpp>
#include <peft/core/enum_names.hpp>
#include <peft/core/error.hpp>
#include <peft/detail/torch_compat.hpp>

PEFT_NAMESPACE_BEGIN

/// The precision the forward pass computes in.
enum class Precision {
  fp32,  ///< everything in float32 (no autocast)
  bf16,  ///< autocast to bfloat16: float32's range, no loss scale needed
  fp16,  ///< autocast to float16 with a dynamic loss scale
};

constexpr EnumTable<Precision, 7> enum_table(Precision) {
  return {"precision",
          "precision",
          {{{Precision::fp32, "fp32"},
            {Precision::bf16, "bf16"},
            {Precision::fp16, "fp16"},
            {Precision::fp32, "float32"},
            {Precision::bf16, "bfloat16"},
            {Precision::fp16, "float16"},
            {Precision::fp16, "half"}}}};
}

/// "fp32", "bf16" or "fp16".
inline std::string_view precision_name(Precision p) {
  return enum_name(p);
}

/// Parses "fp32" (or "float32"), "bf16" ("bfloat16") or "fp16" ("float16", "half"); throws
/// peft::Error naming the accepted values otherwise.
inline Precision parse_precision(std::string_view text) {
  return enum_from_name<Precision>(text);
}

/// The scalar type autocast computes in for `p` (float32 for Precision::fp32).
inline c10::ScalarType precision_dtype(Precision p) {
  switch (p) {
    case Precision::bf16:
      return c10::kBFloat16;
    case Precision::fp16:
      return c10::kHalf;
    case Precision::fp32:
    default:
      return c10::kFloat;
  }
}

/// Throws peft::Error when this LibTorch cannot autocast to `p` on `device`: autocast exists for
/// CPU and CUDA only, and the CPU's takes float16 only in recent LibTorch (we require 2.5; 1.13
/// to 2.1 certainly refuse it, with an error from inside LibTorch).
inline void check_precision(Precision p, const c10::Device& device) {
  if (p == Precision::fp32) return;
  check(device.is_cpu() || device.is_cuda(), "precision",
        "{} autocast needs a CPU or CUDA device, got {}", precision_name(p), device.str());
#if PEFT_TORCH_VERSION < 205
  check(!(device.is_cpu() && p == Precision::fp16), "precision",
        "fp16 on the CPU needs LibTorch 2.5 or later (this is {}.{}); use bf16",
        TORCH_VERSION_MAJOR, TORCH_VERSION_MINOR);
#endif
}

namespace detail {

#if PEFT_TORCH_VERSION >= 204
inline bool autocast_enabled(c10::DeviceType type) {
  return at::autocast::is_autocast_enabled(type);
}
inline void set_autocast(c10::DeviceType type, bool on) {
  at::autocast::set_autocast_enabled(type, on);
}
inline c10::ScalarType autocast_dtype(c10::DeviceType type) {
  return at::autocast::get_autocast_dtype(type);
}
inline void set_autocast_dtype(c10::DeviceType type, c10::ScalarType dtype) {
  at::autocast::set_autocast_dtype(type, dtype);
}
#else
// Before 2.4 the switches are per device: set_enabled is CUDA's, set_cpu_enabled the CPU's.
inline bool autocast_enabled(c10::DeviceType type) {
  return type == c10::DeviceType::CUDA ? at::autocast::is_enabled()
                                       : at::autocast::is_cpu_enabled();
}
inline void set_autocast(c10::DeviceType type, bool on) {
  if (type == c10::DeviceType::CUDA) {
    at::autocast::set_enabled(on);
  } else {
    at::autocast::set_cpu_enabled(on);
  }
}
inline c10::ScalarType autocast_dtype(c10::DeviceType type) {
  return type == c10::DeviceType::CUDA ? at::autocast::get_autocast_gpu_dtype()
                                       : at::autocast::get_autocast_cpu_dtype();
}
inline void set_autocast_dtype(c10::DeviceType type, c10::ScalarType dtype) {
  if (type == c10::DeviceType::CUDA) {
    at::autocast::set_autocast_gpu_dtype(dtype);
  } else {
    at::autocast::set_autocast_cpu_dtype(dtype);
  }
}
#endif

}  // namespace detail

/// Autocast on `device`'s type to `precision` for the guard's lifetime, like Python's
/// `torch.autocast(device_type, dtype)`: what was set before comes back at scope exit, and the
/// cache of casted weights is dropped when the outermost guard ends. Precision::fp32 leaves
/// everything as it is (unlike `torch.autocast(enabled=False)`, it does not switch off an
/// autocast the caller has on).
class AutocastGuard {
 public:
  /// Throws peft::Error where check_precision() does.
  AutocastGuard(const c10::Device& device, Precision precision)
      : active_(precision != Precision::fp32), type_(device.type()) {
    if (!active_) return;
    check_precision(precision, device);
    was_enabled_ = detail::autocast_enabled(type_);
    was_dtype_ = detail::autocast_dtype(type_);
    detail::set_autocast_dtype(type_, precision_dtype(precision));
    detail::set_autocast(type_, true);
    at::autocast::increment_nesting();
  }
  ~AutocastGuard() {
    if (!active_) return;
    if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
    detail::set_autocast(type_, was_enabled_);
    detail::set_autocast_dtype(type_, was_dtype_);
  }
  AutocastGuard(const AutocastGuard&) = delete;
  AutocastGuard& operator=(const AutocastGuard&) = delete;

 private:
  bool active_;
  c10::DeviceType type_;
  bool was_enabled_ = false;
  c10::ScalarType was_dtype_ = c10::kFloat;
};

/// Settings of the dynamic loss scale used with Precision::fp16 (the rules of PyTorch's
/// GradScaler): the loss is multiplied by the scale before backward and the gradients divided
/// by it after; a step whose gradients overflow is skipped and the scale multiplied by
/// `backoff`; after `growth_interval` steps in a row without overflow it is multiplied by
/// `growth`.
struct LossScaleOptions {
  double initial = 65536.0;        ///< the scale of the first step (2^16)
  double growth = 2.0;             ///< factor after growth_interval good steps
  double backoff = 0.5;            ///< factor after an overflow
  int64_t growth_interval = 2000;  ///< good steps in a row before growing
};

/// Divides the gradient of every tensor in `params` that has one by `scale`, the loss scale its
/// backward pass was multiplied by (what GradScaler's unscale_ does). With a power-of-two scale
/// this is exact; infinities and NaNs stay as they are for the caller's overflow check.
inline void unscale_gradients(const std::vector<at::Tensor>& params, double scale) {
  at::NoGradGuard no_grad;
  for (const auto& p : params) {
    if (p.grad().defined()) p.mutable_grad().mul_(1.0 / scale);
  }
}

PEFT_NAMESPACE_END
