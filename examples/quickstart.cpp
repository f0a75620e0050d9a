// Quickstart: wrap a frozen stock TransformerEncoder, attach LoRA to its query and value
// projections, train on a toy task, merge the update into the frozen weights and check that the
// merged model computes the same thing.
//
//   peft_quickstart [--steps N]
#include <peft/peft.hpp>

#include <torch/torch.h>

#include <cstdlib>
#include <iostream>
#include <string>

int main(int argc, char** argv) {
  int steps = 100;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--steps" && i + 1 < argc) {
      steps = std::atoi(argv[++i]);
    } else {
      std::cerr << "usage: peft_quickstart [--steps N]\n";
      return 2;
    }
  }
  torch::manual_seed(0);
  const int64_t dim = 32;
  auto layer = torch::nn::TransformerEncoderLayer(
      torch::nn::TransformerEncoderLayerOptions(dim, 4).dim_feedforward(64).dropout(0.0));
  torch::nn::TransformerEncoder stock(torch::nn::TransformerEncoderOptions(layer, 2));

  // The wrapper freezes the stock encoder and runs its forward through peft's sites.
  peft::nn::TransformerEncoder encoder(stock);
  auto sites = peft::attach(*encoder, peft::LoRAOptions(4).alpha(8).targets({"query", "value"}));
  std::cout << "LoRA attached at " << sites.size() << " sites\n";
  torch::nn::Linear head(dim, 2);

  auto params = peft::trainable_parameters(*encoder);
  for (auto& p : head->parameters()) params.push_back(p);
  torch::optim::AdamW opt(params, torch::optim::AdamWOptions(1e-2));

  // Toy task: is the input's scale large or small? LayerNorm hides scale from a head on the
  // frozen encoder; LoRA inside attention can carry it through.
  auto big = torch::rand({128}) < 0.5;
  auto scale = torch::where(big, torch::full({128}, 2.0), torch::full({128}, 0.5));
  auto x = torch::randn({8, 128, dim}) * scale.view({1, 128, 1});
  auto y = big.to(torch::kLong);
  for (int step = 1; step <= steps; ++step) {
    auto loss = torch::nn::functional::cross_entropy(head(encoder(x).mean(0)), y);
    opt.zero_grad();
    loss.backward();
    opt.step();
    if (step % 50 == 0 || step == steps) {
      std::cout << "step " << step << " loss " << loss.item<float>() << '\n';
    }
  }
  encoder->eval();
  auto before = encoder(x);
  const auto merged = peft::merge(*encoder);
  torch::NoGradGuard no_grad;
  const double diff = (encoder(x) - before).abs().max().item<double>();
  const double stock_diff = (stock(x) - before).abs().max().item<double>();
  std::cout << "merged " << merged << " LoRA updates; max |merged - unmerged| = " << diff
            << ", stock encoder now matches to " << stock_diff << '\n';
  std::cout << "encoder " << peft::trainable_report(*encoder) << ", adapter "
            << peft::adapter_bytes(*encoder) << " bytes\n";
  return diff <= 1e-4 && stock_diff <= 1e-4 ? 0 : 1;
}
