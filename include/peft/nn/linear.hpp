#pragma once

#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>

#include <string>
#include <utility>

#include <peft/config.hpp>
#include <peft/core/parameters.hpp>
#include <peft/core/site.hpp>
#include <peft/detail/linear.hpp>

PEFT_NAMESPACE_BEGIN
namespace nn {

/// A frozen stock Linear whose output passes through a site: `site(x, base(x))`.
/// The stock module is registered as `base`; methods attach to this module itself. `role` is
/// what the projection is in its layer ("query", "out_proj", ...; see SiteImpl::role), which
/// target aliases and role-dependent options (a method treating FFN layers differently) read.
class LinearImpl : public SiteImpl {
 public:
  explicit LinearImpl(torch::nn::Linear stock, std::string role = "linear")
      : SiteImpl(SiteKind::Linear, std::move(role), stock->options.in_features(),
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
