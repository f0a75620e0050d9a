#pragma once

#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>

#include <peft/config.hpp>
#include <peft/core/parameters.hpp>
#include <peft/core/site.hpp>
#include <peft/detail/linear.hpp>

PEFT_NAMESPACE_BEGIN
namespace nn {

/// A frozen stock Linear whose output passes through a site: `site(x, base(x))`.
/// The stock module is registered as `base`; methods attach to this module itself.
class LinearImpl : public SiteImpl {
 public:
  explicit LinearImpl(torch::nn::Linear stock)
      : SiteImpl(SiteKind::Linear, "linear", stock->options.in_features(),
                 stock->options.out_features()),
        base(register_module("base", std::move(stock))) {
    freeze(*base);
    set_frozen(base->weight, base->bias);
  }

  torch::Tensor forward(const torch::Tensor& x) { return adapt(x, peft::detail::linear(x, base)); }

  torch::nn::Linear base;
};
TORCH_MODULE(Linear);

}  // namespace nn
PEFT_NAMESPACE_END
