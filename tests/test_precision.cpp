// Mixed precision: bf16 autocast and fp16's dynamic loss scale.

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

namespace {

// A frozen layer and a trained head.
struct MlpImpl : torch::nn::Module {
  MlpImpl() {
    body = register_module("body", torch::nn::Linear(6, 12));
    head = register_module("head", torch::nn::Linear(12, 3));
    peft::freeze(*body);
  }
  torch::Tensor forward(const torch::Tensor& x) { return head(torch::gelu(body(x))); }
  torch::nn::Linear body{nullptr}, head{nullptr};
};
TORCH_MODULE(Mlp);

}  // namespace

TEST_CASE("precision: bf16 autocasts the loss and the evaluation, parameters stay float32",
          "[trainer]") {
  CHECK(peft::parse_precision("bf16") == peft::Precision::bf16);
  CHECK(peft::parse_precision("half") == peft::Precision::fp16);
  CHECK(peft::precision_name(peft::Precision::fp32) == "fp32");
  CHECK_THROWS_WITH(peft::parse_precision("int8"), Contains("unknown precision \"int8\""));

  const auto batches = make_batches(6);
  const auto device = test_device();
  const auto probe = batches[0].x.to(device);
  std::ostringstream sink;
  struct Run {
    std::vector<c10::ScalarType> train_dtypes, eval_dtypes;
    std::vector<double> losses;
    std::map<std::string, torch::Tensor> before, after;
  };
  auto run = [&](peft::Precision precision) {
    Run r;
    // No LayerNorm fed by a Linear: LibTorch 1.13's CPU autocast does not cast LayerNorm's input
    // and fails there (docs/TRAINER.md).
    torch::manual_seed(4);
    auto net = Mlp();
    r.before = snapshot(*net);
    peft::Trainer<Batch> trainer(
        net,
        [&](const Batch& b) {
          auto logits = net->forward(b.x);
          r.train_dtypes.push_back(logits.scalar_type());
          auto loss = torch::nn::functional::cross_entropy(logits, b.y);
          r.losses.push_back(loss.item<double>());
          return loss;
        },
        peft::TrainerOptions()
            .max_steps(6)
            .lr(1e-2)
            .shuffle(false)
            .precision(precision)
            .device(device)
            .progress_stream(&sink));
    trainer.evaluate_with([&] {
      r.eval_dtypes.push_back(net->forward(probe).scalar_type());
      return std::map<std::string, double>{{"zero", 0.0}};
    });
    trainer.fit(batches);
    // Outside fit() autocast is off again.
    CHECK(net->forward(probe).scalar_type() == torch::kFloat);
    r.after = snapshot(*net);
    return r;
  };
  const auto fp32 = run(peft::Precision::fp32);
  const auto bf16 = run(peft::Precision::bf16);
  CHECK(fp32.train_dtypes == std::vector<c10::ScalarType>(6, torch::kFloat));
  CHECK(bf16.train_dtypes == std::vector<c10::ScalarType>(6, torch::kBFloat16));
  REQUIRE(bf16.eval_dtypes.size() == 1);  // the final evaluation
  CHECK(bf16.eval_dtypes.front() == torch::kBFloat16);
  // The same first batch and initial weights: the loss agrees to bfloat16's precision (8 bits
  // of mantissa) and is not computed in float32.
  const double d = std::abs(bf16.losses.front() - fp32.losses.front());
  CHECK(d > 0.0);
  CHECK(d <= 1e-2 * std::abs(fp32.losses.front()));
  for (const auto& [name, p] : bf16.after) {
    INFO(name);
    CHECK(p.scalar_type() == torch::kFloat);
    const bool frozen = name.rfind("body.", 0) == 0;
    CHECK(torch::equal(p, bf16.before.at(name)) == frozen);
  }

  // A loss function that throws leaves autocast as it found it.
  auto net = Mlp();
  peft::Trainer<Batch> trainer(
      net, [&](const Batch&) -> torch::Tensor { throw Crash(); },
      peft::TrainerOptions().precision(peft::Precision::bf16).progress_stream(&sink));
  CHECK_THROWS_AS(trainer.fit(batches), Crash);
  CHECK(torch::mm(batches[0].x, batches[0].x.t()).scalar_type() == torch::kFloat);
  // Nested guards: the inner one's end restores the outer one's state, the outer one's end
  // switches autocast off; fp32 leaves an enclosing autocast on.
  const auto& x = batches[0].x;
  {
    peft::AutocastGuard outer(torch::kCPU, peft::Precision::bf16);
    { peft::AutocastGuard inner(torch::kCPU, peft::Precision::bf16); }
    CHECK(torch::mm(x, x.t()).scalar_type() == torch::kBFloat16);
    {
      peft::AutocastGuard inner(torch::kCPU, peft::Precision::fp32);
      CHECK(torch::mm(x, x.t()).scalar_type() == torch::kBFloat16);
    }
  }
  CHECK(torch::mm(x, x.t()).scalar_type() == torch::kFloat);
  // unscale_gradients divides each gradient there is by the scale, exactly for a power of two,
  // keeps infinities for the overflow check and skips tensors without a gradient.
  {
    auto a = torch::tensor({3.0f, -0.75f, std::numeric_limits<float>::infinity()}).requires_grad_();
    auto b = torch::ones({2}).requires_grad_();
    a.mutable_grad() = torch::tensor({1024.0f, 3.0f, -std::numeric_limits<float>::infinity()});
    peft::unscale_gradients({a, b}, 1024.0);
    CHECK(torch::equal(a.grad().slice(0, 0, 2), torch::tensor({1.0f, 3.0f / 1024.0f})));
    CHECK(std::isinf(a.grad()[2].item<float>()));
    CHECK(a.grad()[2].item<float>() < 0);
    CHECK_FALSE(b.grad().defined());
  }
#if PEFT_TORCH_VERSION >= 205
  {
    peft::AutocastGuard outer(torch::kCPU, peft::Precision::fp16);
    {
      peft::AutocastGuard inner(torch::kCPU, peft::Precision::bf16);
      CHECK(torch::mm(x, x.t()).scalar_type() == torch::kBFloat16);
    }
    CHECK(torch::mm(x, x.t()).scalar_type() == torch::kHalf);  // the outer dtype is back
  }
  CHECK(torch::mm(x, x.t()).scalar_type() == torch::kFloat);
#endif
}

namespace {

// A model autocast leaves in float32 (elementwise products and sums only): an fp16 run takes the
// very steps of an fp32 run, as long as the loss scale is applied and removed exactly.
struct DotImpl : torch::nn::Module {
  DotImpl() { w = register_parameter("w", torch::linspace(-1.0, 1.0, 6)); }
  torch::Tensor forward(const torch::Tensor& x) { return (x * w).sum(1); }
  torch::Tensor w;
};
TORCH_MODULE(Dot);

torch::Tensor dot_loss(Dot& dot, const Batch& b) {
  return (dot->forward(b.x) - b.y.to(torch::kFloat)).pow(2).mean();
}

// Zero, with an infinite gradient: d sqrt(s - s') / ds at s = s'.
[[maybe_unused]] torch::Tensor infinite_gradient(Dot& dot) {
  auto s = dot->w.sum();
  return torch::sqrt(s - s.detach());
}

}  // namespace

TEST_CASE("precision: fp16's loss scale grows, backs off on overflow, and changes no step",
          "[trainer][checkpoint]") {
  const auto batches = make_batches(8);
  std::ostringstream sink;
  auto scale = peft::LossScaleOptions();
  scale.initial = 1024;
  scale.growth_interval = 3;
  const auto device = test_device();
  auto base =
      peft::TrainerOptions().max_steps(8).lr(1e-2).shuffle(false).device(device).progress_stream(
          &sink);
#if PEFT_TORCH_VERSION >= 205
  SECTION("no overflow: the same parameters as float32, bit for bit") {
    // The gradient norms each step logs (after unscaling, before clipping) must agree too: a
    // missing or doubled unscale would show there even where AdamW hides the gradient's size.
    auto run = [&](peft::Precision precision) {
      TempDir dir;
      auto dot = Dot();
      peft::Trainer<Batch> trainer(
          dot, [&](const Batch& b) { return dot_loss(dot, b); },
          peft::TrainerOptions(base).precision(precision).loss_scale(scale).log_every(1).output_dir(
              dir.path));
      const auto result = trainer.fit(batches);
      std::vector<double> norms;
      for (const auto& r : read_json_lines(dir.path / "metrics.jsonl")) {
        if (r.at("type") == "train") norms.push_back(r.at("grad_norm").get<double>());
      }
      return std::make_tuple(host_copy(dot->w), result, norms);
    };
    const auto [w32, r32, norms32] = run(peft::Precision::fp32);
    const auto [w16, r16, norms16] = run(peft::Precision::fp16);
    CHECK(norms32.size() == 8);
    CHECK(norms16 == norms32);
    CHECK(torch::equal(w32, w16));
    CHECK_FALSE(torch::equal(w16, torch::linspace(-1.0, 1.0, 6)));
    CHECK(r32.loss_scale == 0.0);
    CHECK(r16.overflow_steps == 0);
    CHECK(r16.loss_scale == 1024.0 * 2 * 2);  // grew after steps 3 and 6
  }

  SECTION("an overflow skips its step and halves the scale; the checkpoint keeps the scale") {
    TempDir dir;
    auto dot = Dot();
    std::vector<torch::Tensor> seen;  // w as each step's loss function found it
    peft::Trainer<Batch> trainer(
        dot,
        [&](const Batch& b) {
          seen.push_back(host_copy(dot->w));
          auto loss = dot_loss(dot, b);
          return seen.size() == 2 ? loss + infinite_gradient(dot) : loss;
        },
        peft::TrainerOptions(base)
            .precision(peft::Precision::fp16)
            .loss_scale(scale)
            .output_dir(dir.path));
    const auto result = trainer.fit(batches);
    REQUIRE(seen.size() == 8);
    CHECK(result.steps == 8);
    CHECK(result.overflow_steps == 1);
    CHECK(result.skipped_steps == 0);
    CHECK_FALSE(torch::equal(seen[1], seen[0]));  // step 1 updated w
    CHECK(torch::equal(seen[2], seen[1]));        // step 2 did not
    CHECK_FALSE(torch::equal(seen[3], seen[2]));
    // 1024, halved by step 2's overflow, doubled after steps 5 and 8 (three good steps each).
    CHECK(result.loss_scale == 2048.0);
    int overflows = 0;
    for (const auto& r : read_json_lines(dir.path / "metrics.jsonl")) {
      if (r.at("type") != "overflow") continue;
      ++overflows;
      CHECK(r.at("step") == 2);
      CHECK(r.at("loss_scale") == 512.0);
    }
    CHECK(overflows == 1);
    const auto state = peft::read_checkpoint_state(result.last_checkpoint);
    CHECK(state.loss_scale == 2048.0);
    CHECK(state.overflow_steps == 1);
    CHECK(state.loss_scale_good_steps == 0);
  }

  SECTION("a resumed fp16 run goes on with the saved scale and ends as an uninterrupted one") {
    // Step 2 (batch 1, no shuffling) overflows; the interrupted run stops in step 6.
    auto run = [&](const fs::path& out, bool crash, bool resume) {
      auto dot = Dot();
      peft::Trainer<Batch> trainer(
          dot,
          [&](const Batch& b) {
            if (crash && torch::equal(b.x.cpu(), batches[5].x)) throw Crash();
            auto loss = dot_loss(dot, b);
            return torch::equal(b.x.cpu(), batches[1].x) ? loss + infinite_gradient(dot) : loss;
          },
          peft::TrainerOptions(base)
              .precision(peft::Precision::fp16)
              .loss_scale(scale)
              .save_every(1)
              .keep_checkpoints(0)
              .output_dir(out));
      if (resume) REQUIRE(trainer.resume());
      const auto result = trainer.fit(batches);
      return std::make_pair(host_copy(dot->w), result);
    };
    TempDir whole, parts;
    const auto [w_whole, r_whole] = run(whole.path, false, false);
    CHECK_THROWS_AS(run(parts.path, true, false), Crash);
    CHECK(peft::read_checkpoint_state(parts.path / "checkpoint-5").loss_scale == 1024.0);
    const auto [w_parts, r_parts] = run(parts.path, false, true);
    CHECK(torch::equal(w_parts, w_whole));
    CHECK(r_parts.loss_scale == r_whole.loss_scale);
    CHECK(r_parts.loss_scale == 2048.0);
    CHECK(r_parts.overflow_steps == 1);
  }

  SECTION("under fp16 the loss function computes in float16") {
    torch::manual_seed(4);
    auto net = Mlp();
    std::vector<c10::ScalarType> seen;
    peft::Trainer<Batch> trainer(
        net,
        [&](const Batch& b) {
          auto logits = net->forward(b.x);
          seen.push_back(logits.scalar_type());
          return torch::nn::functional::cross_entropy(logits, b.y);
        },
        peft::TrainerOptions(base).precision(peft::Precision::fp16));
    const auto result = trainer.fit(batches);
    CHECK(seen == std::vector<c10::ScalarType>(8, torch::kHalf));
    CHECK(result.loss_scale > 0.0);
    for (const auto& p : net->parameters()) CHECK(p.scalar_type() == torch::kFloat);
  }

  SECTION("an infinite gradient at scale 1 is the model's: the NaN policy applies") {
    auto dot = Dot();
    scale.initial = 1;
    peft::Trainer<Batch> trainer(
        dot, [&](const Batch& b) { return dot_loss(dot, b) + infinite_gradient(dot); },
        peft::TrainerOptions(base).precision(peft::Precision::fp16).loss_scale(scale));
    CHECK_THROWS_WITH(trainer.fit(batches),
                      Contains("step 1 (epoch 0, batch 0): the gradient norm is"));
  }
#else
  SECTION("LibTorch before 2.5 autocasts the CPU to bfloat16 only here, and says so") {
    auto dot = Dot();
    CHECK_THROWS_WITH(peft::Trainer<Batch>(
                          dot, [&](const Batch& b) { return dot_loss(dot, b); },
                          peft::TrainerOptions(base).precision(peft::Precision::fp16)),
                      Contains("fp16 on the CPU needs LibTorch 2.5 or later"));
  }
#endif
  SECTION("bad loss scale settings are refused") {
    auto dot = Dot();
    scale.backoff = 1.0;
    CHECK_THROWS_WITH(peft::Trainer<Batch>(
                          dot, [&](const Batch& b) { return dot_loss(dot, b); },
                          peft::TrainerOptions(base).loss_scale(scale)),
                      Contains("0 < backoff < 1"));
  }
}
