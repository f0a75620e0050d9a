// Learning-rate schedules and AdamW: hand-computed factors, torch's AdamW step for step, groups.

#include <peft/train/checkpoint.hpp>
#include <peft/train/precision.hpp>
#include <peft/train/progress.hpp>
#include <peft/train/schedule.hpp>
#include <peft/train/trainer.hpp>

#include <catch2/catch.hpp>
#include <torch/torch.h>

#include <unistd.h>

#include <atomic>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "train_helpers.hpp"

using Catch::Matchers::Contains;
using namespace train_testing;

TEST_CASE("schedules match hand-computed factors", "[trainer]") {
  using peft::Schedule;
  // total 10, warm-up 2: warm-up 0, 1/2, then decay over the remaining 8 steps.
  peft::LRSchedule linear(peft::ScheduleOptions().total_steps(10).warmup_steps(2));
  CHECK(linear.factor(0) == 0.0);
  CHECK(linear.factor(1) == 0.5);
  CHECK(linear.factor(2) == 1.0);
  CHECK(linear.factor(3) == Approx(7.0 / 8.0).epsilon(1e-15));
  CHECK(linear.factor(6) == Approx(0.5).epsilon(1e-15));
  CHECK(linear.factor(10) == 0.0);
  CHECK(linear.factor(13) == 0.0);

  // warmup_ratio 0.15 of 10 steps rounds up to 2 steps, as transformers does.
  peft::LRSchedule ratio(peft::ScheduleOptions().total_steps(10).warmup_ratio(0.15));
  CHECK(ratio.warmup_steps() == 2);
  CHECK(ratio.factor(1) == 0.5);

  peft::LRSchedule cosine(
      peft::ScheduleOptions().total_steps(10).warmup_steps(2).schedule(Schedule::cosine));
  CHECK(cosine.factor(1) == 0.5);
  CHECK(cosine.factor(2) == 1.0);
  // progress 2/8: (1 + cos(pi/4)) / 2
  CHECK(cosine.factor(4) == Approx(0.8535533905932737).epsilon(1e-14));
  CHECK(cosine.factor(6) == Approx(0.5).epsilon(1e-14));
  CHECK(cosine.factor(9) == Approx(0.03806023374435663).epsilon(1e-12));
  CHECK(cosine.factor(10) == Approx(0.0).margin(1e-16));
  CHECK(cosine.factor(12) == Approx(0.0).margin(1e-16));  // stays at the floor

  peft::LRSchedule floored(peft::ScheduleOptions()
                               .total_steps(10)
                               .warmup_steps(2)
                               .schedule(Schedule::cosine)
                               .min_lr_ratio(0.1));
  CHECK(floored.factor(6) == Approx(0.1 + 0.9 * 0.5).epsilon(1e-14));
  CHECK(floored.factor(10) == Approx(0.1).epsilon(1e-14));
  CHECK(floored.factor(0) == 0.0);  // the floor does not apply to warm-up

  peft::LRSchedule constant(
      peft::ScheduleOptions().total_steps(4).warmup_steps(1).schedule(Schedule::constant));
  CHECK(constant.factor(0) == 0.0);
  CHECK(constant.factor(3) == 1.0);

  CHECK_THROWS_WITH(peft::LRSchedule(peft::ScheduleOptions().total_steps(0)),
                    Contains("total_steps must be positive"));
  CHECK_THROWS_WITH(peft::LRSchedule(peft::ScheduleOptions().total_steps(3).warmup_steps(5)),
                    Contains("5 warm-up steps exceed the 3 total steps"));

  // The scheduler scales each group from its own base rate and can be saved and restored.
  auto net = make_net();
  auto opt = peft::make_adamw(*net, peft::ParamGroupOptions().lr(1e-3).lr_for("head", 1e-2));
  REQUIRE(opt->param_groups().size() == 2);
  peft::LRScheduler scheduler(*opt, linear);
  CHECK(scheduler.lrs() == std::vector<double>{0.0, 0.0});
  scheduler.step();
  CHECK(scheduler.lrs() == std::vector<double>{0.5e-3, 0.5e-2});
  scheduler.step();
  scheduler.step();
  CHECK(scheduler.lrs()[0] == Approx(0.875e-3).epsilon(1e-15));
  CHECK(scheduler.lrs()[1] == Approx(0.875e-2).epsilon(1e-15));
  const auto saved = scheduler.state();
  CHECK(saved.step == 3);

  auto opt2 = peft::make_adamw(*net, peft::ParamGroupOptions().lr(1e-3).lr_for("head", 1e-2));
  peft::LRScheduler restored(*opt2, linear);
  restored.load_state(saved);
  CHECK(restored.steps() == 3);
  CHECK(restored.lrs() == scheduler.lrs());
  CHECK_THROWS_WITH(restored.load_state({1, {1e-3}}),
                    Contains("1 base learning rates but the optimizer has 2 parameter groups"));
}

TEST_CASE("peft::AdamW follows torch::optim::AdamW step for step and shares its state",
          "[trainer]") {
  for (const bool amsgrad : {false, true}) {
    INFO("amsgrad " << amsgrad);
    auto ours_net = make_net(3), stock_net = make_net(3);
    auto groups = [&](Net& net) {
      std::vector<torch::optim::OptimizerParamGroup> out;
      auto decayed = std::make_unique<torch::optim::AdamWOptions>(
          torch::optim::AdamWOptions(3e-2).weight_decay(0.1).amsgrad(amsgrad));
      auto plain = std::make_unique<torch::optim::AdamWOptions>(
          torch::optim::AdamWOptions(1e-2).weight_decay(0.0).betas({0.8, 0.99}).amsgrad(amsgrad));
      out.emplace_back(std::vector<torch::Tensor>{net->hidden->weight, net->head->weight},
                       std::move(decayed));
      out.emplace_back(std::vector<torch::Tensor>{net->hidden->bias, net->head->bias},
                       std::move(plain));
      return out;
    };
    ours_net->eval();  // no dropout: both nets see the same function
    stock_net->eval();
    peft::AdamW ours(groups(ours_net));
    torch::optim::AdamW stock(groups(stock_net));
    const auto x = torch::randn({4, 6});
    const auto y = torch::tensor({0, 2, 1, 1}, torch::kLong);
    auto step = [&](Net& net, torch::optim::Optimizer& opt, bool head_bias_grad) {
      opt.zero_grad();
      loss_of(net, {x, y}).backward();
      // A tensor without a gradient is skipped (no decay, no state).
      if (!head_bias_grad) net->head->bias.mutable_grad().reset();
      opt.step();
    };
    auto trained = [](Net& net) {
      return std::vector<torch::Tensor>{net->hidden->weight, net->head->weight, net->hidden->bias,
                                        net->head->bias};
    };
    auto same = [&](Net& a, Net& b) {
      const auto ta = trained(a), tb = trained(b);
      for (size_t i = 0; i < ta.size(); ++i) {
        INFO("tensor " << i);
        CHECK(torch::allclose(ta[i], tb[i], 1e-5, 1e-7));
      }
    };
    const auto start = trained(ours_net);
    std::vector<torch::Tensor> before;
    for (const auto& t : start) before.push_back(t.detach().clone());
    for (int i = 0; i < 6; ++i) {
      step(ours_net, ours, i != 2);
      step(stock_net, stock, i != 2);
    }
    CHECK(ours.fusable() == (PEFT_HAS_FUSED_ADAMW == 1));
    same(ours_net, stock_net);
    for (size_t i = 0; i < before.size(); ++i) {
      CHECK((trained(ours_net)[i] - before[i]).abs().max().item<double>() > 1e-3);  // it moved
    }
    // The state is LibTorch's: what peft::AdamW saves loads into torch::optim::AdamW.
    torch::serialize::OutputArchive out;
    ours.save(out);
    std::stringstream bytes;
    out.save_to(bytes);
    auto resumed_net = make_net(3);
    resumed_net->eval();
    {
      torch::NoGradGuard no_grad;
      const auto from = trained(ours_net), to = trained(resumed_net);
      for (size_t i = 0; i < from.size(); ++i) to[i].copy_(from[i]);
    }
    torch::optim::AdamW resumed(groups(resumed_net));
    torch::serialize::InputArchive in;
    in.load_from(bytes);
    resumed.load(in);
    step(ours_net, ours, true);
    step(resumed_net, resumed, true);
    same(ours_net, resumed_net);
  }
  // A non-contiguous parameter takes LibTorch's own path.
  auto t = torch::randn({3, 4}).t().set_requires_grad(true);
  peft::AdamW odd(std::vector<torch::Tensor>{t});
  t.sum().backward();
  CHECK_FALSE(odd.fusable());
  CHECK_NOTHROW(odd.step());
}

TEST_CASE("AdamW groups exclude biases and norms from decay, the optimizer check is strict",
          "[trainer]") {
  auto net = make_net();
  net->register_module("LayerNorm", torch::nn::LayerNorm(torch::nn::LayerNormOptions({12})));
  const auto groups = peft::named_param_groups(
      *net, peft::ParamGroupOptions().lr(1e-3).weight_decay(0.01).lr_for("head", 1e-2));
  REQUIRE(groups.size() == 4);
  CHECK(groups[0].names == std::vector<std::string>{"hidden.weight"});
  CHECK(groups[0].lr == 1e-3);
  CHECK(groups[0].weight_decay == 0.01);
  CHECK(groups[1].names == std::vector<std::string>{"hidden.bias", "norm.weight", "norm.bias",
                                                    "LayerNorm.weight", "LayerNorm.bias"});
  CHECK(groups[1].lr == 1e-3);
  CHECK(groups[1].weight_decay == 0.0);
  CHECK(groups[2].names == std::vector<std::string>{"head.weight"});
  CHECK(groups[2].lr == 1e-2);
  CHECK(groups[2].weight_decay == 0.01);
  CHECK(groups[3].names == std::vector<std::string>{"head.bias"});
  CHECK(groups[3].weight_decay == 0.0);
  // ProPETL's mask scores only rank weights (decay would shrink them all alike); no decay either.
  CHECK(peft::no_decay("encoder.layers.0.ffn_block.propetl.mask_scores_down"));
  CHECK_FALSE(peft::no_decay("encoder.layers.0.ffn_block.propetl.prototype.down"));

  auto opt = peft::make_adamw(
      *net, peft::ParamGroupOptions().lr(1e-3).weight_decay(0.01).lr_for("head", 1e-2));
  REQUIRE(opt->param_groups().size() == 4);
  for (size_t i = 0; i < groups.size(); ++i) {
    const auto& o =
        static_cast<const torch::optim::AdamWOptions&>(opt->param_groups()[i].options());
    CHECK(o.lr() == groups[i].lr);
    CHECK(o.weight_decay() == groups[i].weight_decay);
    CHECK(opt->param_groups()[i].params().size() == groups[i].params.size());
  }
  CHECK_NOTHROW(peft::check_optimizer_parameters(*opt, *net));

  CHECK_THROWS_WITH(
      peft::named_param_groups(*net, peft::ParamGroupOptions().lr_for("classifier", 1e-2)),
      Contains("lr_for(\"classifier\") matched no trainable parameter"));

  auto trainable = peft::trainable_parameters(*net);
  SECTION("a frozen tensor is refused") {
    auto with_frozen = trainable;
    with_frozen.push_back(net->body->weight);
    torch::optim::AdamW bad(with_frozen);
    CHECK_THROWS_WITH(peft::check_optimizer_parameters(bad, *net),
                      Contains("\"body.weight\" is frozen"));
  }
  SECTION("a duplicate is refused") {
    auto twice = trainable;
    twice.push_back(net->hidden->weight);
    torch::optim::AdamW bad(twice);
    CHECK_THROWS_WITH(peft::check_optimizer_parameters(bad, *net),
                      Contains("\"hidden.weight\" appears twice"));
  }
  SECTION("a missing trainable parameter is refused") {
    auto missing = trainable;
    missing.pop_back();
    torch::optim::AdamW bad(missing);
    CHECK_THROWS_WITH(peft::check_optimizer_parameters(bad, *net),
                      Contains("\"LayerNorm.bias\" is missing from the optimizer"));
  }
  SECTION("a foreign tensor is refused") {
    auto foreign = trainable;
    foreign.push_back(torch::zeros({2, 5}, torch::requires_grad()));
    torch::optim::AdamW bad(foreign);
    CHECK_THROWS_WITH(peft::check_optimizer_parameters(bad, *net),
                      Contains("shape [2, 5] that is not a parameter of the module"));
  }
}
