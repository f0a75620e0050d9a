// Built by the packaging tests against an installed peft and via add_subdirectory().
#include <peft/peft.hpp>

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
