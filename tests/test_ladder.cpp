// Ladder Side-Tuning: no graph through the backbone, the ladder arithmetic, pruned
// initialisation, and learning.
#include <peft/methods/ladder.hpp>

#include "helpers.hpp"

using namespace testing;

TEST_CASE("LST keeps no autograd graph through the backbone", "[lst]") {
  auto stock = stock_encoder(0.1);
  peft::Ladder ladder(peft::nn::TransformerEncoder(stock),
                      peft::LadderOptions().reduction_factor(4).init(peft::LadderInit::Random));
  auto x = torch::randn({5, 3, kDim}, torch::requires_grad());
  auto states = [&] {
    torch::NoGradGuard no_grad;
    return ladder->backbone->hidden_states(x);
  }();
  for (const auto& s : states) CHECK_FALSE(s.grad_fn());
  auto out = ladder(x, torch::Tensor(), padding_mask(3, 5));
  CHECK(out.sizes() == torch::IntArrayRef({5, 3, kDim}));
  out.pow(2).mean().backward();
  // The backbone is frozen and outside the graph. The input still gets a gradient, through the
  // side network's own downsample of it (trainable input embeddings would train).
  for (const auto& p : stock->parameters()) CHECK_FALSE(p.grad().defined());
  CHECK(x.grad().defined());
  for (const auto& [name, p] : peft::named_trainable_parameters(*ladder)) {
    INFO(name);
    CHECK(name.rfind("backbone", 0) != 0);
    CHECK(p.grad().defined());
  }
  CHECK(ladder->gates.grad().abs().sum().item<double>() > 0);
}

TEST_CASE("LST computes the gated ladder the paper describes", "[lst]") {
  auto stock = stock_encoder();
  peft::Ladder ladder(
      peft::nn::TransformerEncoder(stock),
      peft::LadderOptions().reduction_factor(2).layers({1}).init(peft::LadderInit::Random));
  ladder->eval();
  stock->eval();
  CHECK(ladder->selected_layers() == std::vector<int64_t>{1});
  {
    torch::NoGradGuard no_grad;
    ladder->gates.fill_(0.05);  // mu = sigmoid(0.05 / 0.1)
  }
  auto x = torch::randn({4, 2, kDim});
  // By hand from stock pieces: backbone layer outputs, the two ladders, the side block.
  auto layer0 = stock->layers->at<torch::nn::TransformerEncoderLayerImpl>(0).forward(x);
  auto layer1 = stock->layers->at<torch::nn::TransformerEncoderLayerImpl>(1).forward(layer0);
  const double mu = 1.0 / (1.0 + std::exp(-0.5));
  auto h = mu * ladder->downsample->ptr<torch::nn::LinearImpl>(0)->forward(x) +
           (1 - mu) * ladder->downsample->ptr<torch::nn::LinearImpl>(1)->forward(layer1);
  h = ladder->side->ptr<torch::nn::TransformerEncoderLayerImpl>(0)->forward(h);
  auto expected = ladder->upsample(h);
  CHECK(max_diff(ladder(x), expected) <= 1e-5);

  CHECK_THROWS_WITH(
      peft::Ladder(peft::nn::TransformerEncoder(stock_encoder()),
                   peft::LadderOptions().reduction_factor(5)),
      Catch::Contains("[peft::lst] reduction_factor 5 must divide the model width 16"));
  CHECK_THROWS_WITH(peft::Ladder(peft::nn::TransformerEncoder(stock_encoder()),
                                 peft::LadderOptions().layers({3})),
                    Catch::Contains("layer 3 is outside the backbone's 2 layers"));
}

TEST_CASE("LST pruned initialisation keeps the highest-importance rows", "[lst]") {
  torch::manual_seed(9);
  auto stock = stock_layer();
  {
    // Make model units 3 and 11, attention rows 5 and 9 and FFN rows 2 and 30 the important ones.
    torch::NoGradGuard no_grad;
    for (auto* p : {&stock->self_attn->in_proj_weight, &stock->linear1->weight}) *p *= 0.01;
    stock->self_attn->in_proj_weight.select(1, 3).mul_(1000);
    stock->self_attn->in_proj_weight.select(1, 11).mul_(1000);
    for (int64_t part = 0; part < 3; ++part) {
      stock->self_attn->in_proj_weight[part * kDim + 5].mul_(50);
      stock->self_attn->in_proj_weight[part * kDim + 9].mul_(50);
    }
    stock->linear1->weight[2].mul_(50);
    stock->linear1->weight[30].mul_(50);
  }
  auto side = torch::nn::TransformerEncoderLayer(
      torch::nn::TransformerEncoderLayerOptions(2, 1).dim_feedforward(2));
  peft::detail::prune_into(*stock, *side);
  const auto units = torch::tensor({3, 11}, torch::kLong);
  const auto rows = torch::tensor({5, 9}, torch::kLong);
  const auto ffn = torch::tensor({2, 30}, torch::kLong);
  auto q = stock->self_attn->in_proj_weight.narrow(0, 0, kDim);
  auto v = stock->self_attn->in_proj_weight.narrow(0, 2 * kDim, kDim);
  CHECK(torch::equal(side->self_attn->in_proj_weight.narrow(0, 0, 2),
                     q.index_select(0, rows).index_select(1, units)));
  CHECK(torch::equal(side->self_attn->in_proj_weight.narrow(0, 4, 2),
                     v.index_select(0, rows).index_select(1, units)));
  CHECK(torch::equal(
      side->self_attn->out_proj->weight,
      stock->self_attn->out_proj->weight.index_select(0, units).index_select(1, rows)));
  CHECK(torch::equal(side->linear1->weight,
                     stock->linear1->weight.index_select(0, ffn).index_select(1, units)));
  CHECK(torch::equal(side->linear2->weight,
                     stock->linear2->weight.index_select(0, units).index_select(1, ffn)));
  CHECK(torch::equal(side->norm1->weight, stock->norm1->weight.index_select(0, units)));
}

TEST_CASE("LST learns the scale task, only the side network trains", "[lst]") {
  peft::Ladder ladder(peft::nn::TransformerEncoder(stock_encoder()),
                      peft::LadderOptions().reduction_factor(4));
  auto count = peft::count_parameters(*ladder);
  CHECK(count.trainable < count.total / 2);
  const double baseline = head_only_baseline();
  const double tuned = train_scale_task([&](const torch::Tensor& in) { return ladder(in); },
                                        peft::trainable_parameters(*ladder));
  INFO("head only " << baseline << ", lst " << tuned);
  CHECK(tuned <= 0.5 * baseline);
}
