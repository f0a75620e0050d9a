// Built by the packaging tests against an installed peft and via add_subdirectory(). The
// installed package is checked through the umbrella header (every header installed and its
// dependencies found); add_subdirectory() uses the source tree, so a narrow header does there.
#ifdef PEFT_CONSUMER_NARROW
#include <peft/core/parameters.hpp>
#include <peft/version.hpp>
#else
#include <peft/peft.hpp>
#endif

#include <torch/nn/modules/linear.h>

#include <iostream>

int main() {
  torch::nn::Linear layer(10, 5);
  peft::freeze(*layer);
  layer->bias.set_requires_grad(true);
  std::cout << "peft " << PEFT_VERSION_STRING << " consumer: " << peft::trainable_report(*layer)
            << '\n';
  return peft::trainable_parameters(*layer).size() == 1 ? 0 : 1;
}
