// Quickstart: freeze a stock encoder, train a small head on top, and report what trained.
#include <peft/peft.hpp>

#include <torch/torch.h>

#include <cstdlib>
#include <iostream>
#include <string>

int main(int argc, char** argv) {
  int steps = 100;
  for (int i = 1; i < argc; ++i) {
    if (std::string(argv[i]) == "--steps" && i + 1 < argc) steps = std::atoi(argv[++i]);
  }
  torch::manual_seed(0);
  auto layer = torch::nn::TransformerEncoderLayer(
      torch::nn::TransformerEncoderLayerOptions(32, 4).dim_feedforward(64).dropout(0.0));
  torch::nn::TransformerEncoder encoder(torch::nn::TransformerEncoderOptions(layer, 2));
  peft::freeze(*encoder);
  torch::nn::Linear head(32, 2);

  torch::optim::AdamW opt(peft::trainable_parameters(*head), torch::optim::AdamWOptions(1e-2));
  auto x = torch::randn({8, 16, 32});
  auto y = (x.sum(torch::IntArrayRef{0, 2}) > 0).to(torch::kLong);
  for (int step = 1; step <= steps; ++step) {
    auto logits = head(encoder(x).mean(0));
    auto loss = torch::nn::functional::cross_entropy(logits, y);
    opt.zero_grad();
    loss.backward();
    opt.step();
    if (step % 10 == 0 || step == steps) {
      std::cout << "step " << step << " loss " << loss.item<float>() << '\n';
    }
  }
  std::cout << "encoder " << peft::trainable_report(*encoder) << '\n';
  std::cout << "head    " << peft::trainable_report(*head) << '\n';
}
