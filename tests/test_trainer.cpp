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

namespace fs = std::filesystem;
using Catch::Matchers::Contains;

namespace {

// A small classifier with a frozen first layer, dropout (so the RNG matters for resuming), a
// LayerNorm (excluded from weight decay) and a head.
struct NetImpl : torch::nn::Module {
  explicit NetImpl(int64_t classes = 3) {
    body = register_module("body", torch::nn::Linear(6, 12));
    drop = register_module("drop", torch::nn::Dropout(0.3));
    hidden = register_module("hidden", torch::nn::Linear(12, 12));
    norm = register_module("norm", torch::nn::LayerNorm(torch::nn::LayerNormOptions({12})));
    head = register_module("head", torch::nn::Linear(12, classes));
    peft::freeze(*body);
  }
  torch::Tensor forward(torch::Tensor x) {
    x = drop(torch::relu(body(x)));
    return head(norm(torch::gelu(hidden(x))));
  }
  torch::nn::Linear body{nullptr}, hidden{nullptr}, head{nullptr};
  torch::nn::Dropout drop{nullptr};
  torch::nn::LayerNorm norm{nullptr};
};
TORCH_MODULE(Net);

Net make_net(uint64_t seed = 1, int64_t classes = 3) {
  torch::manual_seed(seed);
  return Net(classes);
}

struct Batch {
  torch::Tensor x, y;
  Batch to(const torch::Device& device) const { return {x.to(device), y.to(device)}; }
};

std::vector<Batch> make_batches(int64_t count, uint64_t seed = 123) {
  torch::manual_seed(seed);
  std::vector<Batch> out;
  for (int64_t i = 0; i < count; ++i) {
    auto x = torch::randn({4, 6});
    out.push_back({x, (x.sum(1) > 0).to(torch::kLong) + (x.select(1, 0) > 1).to(torch::kLong)});
  }
  return out;
}

torch::Tensor loss_of(Net& net, const Batch& b) {
  return torch::nn::functional::cross_entropy(net->forward(b.x), b.y);
}

// A fresh folder under the temp directory, removed with everything in it at scope exit.
struct TempDir {
  TempDir() {
    static std::atomic<int> counter{0};
    path = fs::temp_directory_path() /
           ("peft_trainer_test_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  fs::path path;
};

std::map<std::string, torch::Tensor> snapshot(const torch::nn::Module& m) {
  std::map<std::string, torch::Tensor> out;
  for (const auto& item : m.named_parameters()) out[item.key()] = item.value().detach().clone();
  return out;
}

bool same_as(const torch::nn::Module& m, const std::map<std::string, torch::Tensor>& saved) {
  for (const auto& item : m.named_parameters()) {
    if (!torch::equal(item.value(), saved.at(item.key()))) return false;
  }
  return true;
}

std::vector<nlohmann::json> read_json_lines(const fs::path& path) {
  std::ifstream in(path);
  std::vector<nlohmann::json> out;
  std::string line;
  while (std::getline(in, line)) out.push_back(nlohmann::json::parse(line));
  return out;
}

struct Crash : std::runtime_error {
  Crash() : std::runtime_error("simulated crash") {}
};

}  // namespace

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

TEST_CASE("a resumed run ends bit-identical to an uninterrupted one", "[trainer][checkpoint]") {
  const auto batches = make_batches(10);
  torch::manual_seed(99);
  const Batch dev{torch::randn({8, 6}), torch::randint(0, 3, {8})};
  std::ostringstream sink;
  auto options = [&](const fs::path& dir) {
    return peft::TrainerOptions()
        .epochs(3)
        .lr(1e-2)
        .weight_decay(0.01)
        .grad_accumulation(2)
        .warmup_ratio(0.2)
        .schedule(peft::Schedule::cosine)
        .grad_clip(0.5)
        .eval_every(4)
        .save_every(3)
        .log_every(2)
        .seed(7)
        .metric("loss")
        .greater_is_better(false)
        .output_dir(dir)
        .progress_stream(&sink);
  };
  auto eval_of = [&](Net& net) {
    return [&net, &dev]() -> std::map<std::string, double> {
      return {{"loss", loss_of(net, dev).item<double>()}};
    };
  };

  TempDir a_dir, b_dir;
  auto a = make_net();
  const auto initial = snapshot(*a);
  peft::TrainResult a_result;
  {
    peft::Trainer<Batch> trainer(
        a, [&](const Batch& b) { return loss_of(a, b); }, options(a_dir.path));
    trainer.evaluate_with(eval_of(a));
    a_result = trainer.fit(batches);
  }
  CHECK(a_result.steps == 15);  // 3 epochs of ceil(10 / 2) steps

  {
    auto b = make_net();
    int calls = 0;
    peft::Trainer<Batch> trainer(
        b,
        [&](const Batch& batch) {
          // Batches 17 and 18 make step 9; crash in the middle of its accumulation.
          if (++calls == 18) throw Crash();
          return loss_of(b, batch);
        },
        options(b_dir.path));
    trainer.evaluate_with(eval_of(b));
    CHECK_THROWS_AS(trainer.fit(batches), Crash);
  }
  // The latest checkpoint is from step 6 (saved every 3; the epoch-end one at 5 was pruned to
  // keep two), and nothing of the interrupted step is on disk.
  auto latest = peft::latest_checkpoint(b_dir.path);
  REQUIRE(latest);
  CHECK(latest->filename() == "checkpoint-6");
  CHECK(fs::exists(b_dir.path / "checkpoint-5"));
  CHECK_FALSE(fs::exists(b_dir.path / "checkpoint-3"));

  TempDir kept;
  fs::copy(b_dir.path / "checkpoint-6", kept.path / "checkpoint-6");

  // A different process would start with a different generator state.
  torch::manual_seed(2024);
  auto c = make_net();
  {
    peft::Trainer<Batch> trainer(
        c, [&](const Batch& b) { return loss_of(c, b); }, options(b_dir.path));
    trainer.evaluate_with(eval_of(c));
    REQUIRE(trainer.resume());
    CHECK(trainer.state().global_step == 6);
    CHECK(trainer.state().epoch == 1);
    CHECK(trainer.state().batch_in_epoch == 2);
    const auto c_result = trainer.fit(batches);
    CHECK(c_result.steps == 15);
    CHECK(c_result.best_step == a_result.best_step);
    REQUIRE(c_result.best_metric);
    CHECK(*c_result.best_metric == *a_result.best_metric);
  }
  for (const auto& [name, p] : peft::named_trainable_parameters(*a)) {
    INFO(name);
    CHECK(torch::equal(p, c->named_parameters()[name]));
    CHECK_FALSE(torch::equal(p, initial.at(name)));
  }
  CHECK(torch::equal(a->body->weight, initial.at("body.weight")));

  // Without the generator state the dropout masks differ, and so do the parameters: the
  // equality above is not an accident of a model that ignores randomness.
  TempDir d_dir;
  auto d = make_net();
  {
    peft::Trainer<Batch> trainer(
        d, [&](const Batch& b) { return loss_of(d, b); }, options(d_dir.path));
    trainer.evaluate_with(eval_of(d));
    trainer.resume_from(kept.path / "checkpoint-6");
    torch::manual_seed(5);  // what a resume that forgot the generator would amount to
    trainer.fit(batches);
  }
  CHECK_FALSE(torch::equal(a->hidden->weight, d->hidden->weight));

  // The metrics log is JSON lines.
  const auto records = read_json_lines(a_dir.path / "metrics.jsonl");
  int train = 0, eval = 0;
  for (const auto& r : records) {
    train += r.at("type") == "train";
    eval += r.at("type") == "eval";
  }
  CHECK(train == 7);  // every 2 of 15 steps
  CHECK(eval == 6);   // steps 4, 8, 12 and the epoch ends 5, 10, 15
}

TEST_CASE("NaN loss: stop saves the last good state and names the step, skip skips",
          "[trainer][checkpoint]") {
  const auto batches = make_batches(6);
  std::ostringstream sink;
  TempDir dir;
  auto base =
      peft::TrainerOptions().epochs(2).lr(1e-2).seed(3).output_dir(dir.path).progress_stream(&sink);

  SECTION("stop") {
    auto net = make_net();
    int calls = 0;
    peft::Trainer<Batch> trainer(
        net,
        [&](const Batch& b) {
          auto loss = loss_of(net, b);
          return ++calls == 9 ? loss * std::numeric_limits<double>::quiet_NaN() : loss;
        },
        base);
    std::string message;
    try {
      trainer.fit(batches);
    } catch (const peft::Error& e) {
      message = e.what();
    }
    CHECK_THAT(message, Contains("[peft::trainer] step 9 (epoch 1, batch 2)"));
    CHECK_THAT(message, Contains("the loss is nan"));
    CHECK_THAT(message, Contains("checkpoint-8"));
    const auto after = snapshot(*net);
    auto latest = peft::latest_checkpoint(dir.path);
    REQUIRE(latest);
    CHECK(latest->filename() == "checkpoint-8");  // written by the stop, not by a schedule
    auto fresh = make_net(77);
    torch::optim::AdamW opt(peft::trainable_parameters(*fresh));
    const auto state = peft::load_checkpoint(*latest, *fresh, &opt);
    CHECK(state.global_step == 8);
    CHECK(state.epoch == 1);
    CHECK(state.batch_in_epoch == 2);
    for (const auto& [name, p] : peft::named_trainable_parameters(*fresh)) {
      INFO(name);
      CHECK(torch::equal(p, after.at(name)));
    }
  }

  SECTION("skip") {
    auto net = make_net();
    int calls = 0;
    peft::Trainer<Batch> trainer(
        net,
        [&](const Batch& b) {
          auto loss = loss_of(net, b);
          return ++calls == 4 ? loss * std::numeric_limits<double>::infinity() : loss;
        },
        peft::TrainerOptions(base).nan_policy(peft::NanPolicy::skip));
    const auto result = trainer.fit(batches);
    CHECK(result.steps == 12);
    CHECK(result.skipped_steps == 1);
    for (const auto& p : net->parameters()) CHECK(torch::isfinite(p).all().item<bool>());
    int skips = 0;
    for (const auto& r : read_json_lines(dir.path / "metrics.jsonl")) {
      if (r.at("type") == "skip") {
        ++skips;
        CHECK(r.at("step") == 4);
      }
    }
    CHECK(skips == 1);
  }

  SECTION("skip never updates: an always-NaN run leaves every parameter as it was") {
    auto net = make_net();
    const auto before = snapshot(*net);
    peft::Trainer<Batch> trainer(
        net, [&](const Batch& b) { return loss_of(net, b) * std::nan(""); },
        peft::TrainerOptions(base).nan_policy(peft::NanPolicy::skip).weight_decay(0.5));
    const auto result = trainer.fit(batches);
    CHECK(result.skipped_steps == 12);
    CHECK(same_as(*net, before));
  }
}

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
            .progress_stream(&sink));
    trainer.evaluate_with([&] {
      r.eval_dtypes.push_back(net->forward(batches[0].x).scalar_type());
      return std::map<std::string, double>{{"zero", 0.0}};
    });
    trainer.fit(batches);
    // Outside fit() autocast is off again.
    CHECK(net->forward(batches[0].x).scalar_type() == torch::kFloat);
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
  auto base = peft::TrainerOptions().max_steps(8).lr(1e-2).shuffle(false).progress_stream(&sink);
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
      return std::make_tuple(dot->w.detach().clone(), result, norms);
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
          seen.push_back(dot->w.detach().clone());
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
            if (crash && torch::equal(b.x, batches[5].x)) throw Crash();
            auto loss = dot_loss(dot, b);
            return torch::equal(b.x, batches[1].x) ? loss + infinite_gradient(dot) : loss;
          },
          peft::TrainerOptions(base)
              .precision(peft::Precision::fp16)
              .loss_scale(scale)
              .save_every(1)
              .keep_checkpoints(0)
              .output_dir(out));
      if (resume) REQUIRE(trainer.resume());
      const auto result = trainer.fit(batches);
      return std::make_pair(dot->w.detach().clone(), result);
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

TEST_CASE("training changes only the trainable parameters", "[trainer]") {
  const auto batches = make_batches(5);
  auto net = make_net();
  const auto before = snapshot(*net);
  std::ostringstream sink;
  peft::Trainer<Batch> trainer(
      net, [&](const Batch& b) { return loss_of(net, b); },
      peft::TrainerOptions().epochs(2).lr(1e-2).weight_decay(0.1).progress_stream(&sink));
  const auto result = trainer.fit(batches);
  CHECK(result.steps == 10);
  CHECK(std::isfinite(result.last_loss));
  for (const auto& item : net->named_parameters()) {
    INFO(item.key());
    const bool frozen = item.key().rfind("body.", 0) == 0;
    CHECK(torch::equal(item.value(), before.at(item.key())) == frozen);
    CHECK_FALSE(item.value().grad().defined());
  }
}

TEST_CASE("early stopping keeps the best checkpoint", "[trainer][checkpoint]") {
  const auto batches = make_batches(4);
  TempDir dir;
  std::ostringstream sink;
  auto net = make_net();
  const std::vector<double> scores = {0.5, 0.6, 0.55, 0.58, 0.9};
  size_t evals = 0;
  std::map<std::string, torch::Tensor> at_best;
  peft::Trainer<Batch> trainer(
      net, [&](const Batch& b) { return loss_of(net, b); },
      peft::TrainerOptions()
          .epochs(5)
          .eval_every(1)
          .metric("accuracy")
          .patience(2)
          .output_dir(dir.path)
          .progress_stream(&sink));
  trainer.evaluate_with([&]() -> std::map<std::string, double> {
    const double s = scores.at(evals++);
    if (evals == 2) at_best = snapshot(*net);
    return {{"accuracy", s}};
  });
  const auto result = trainer.fit(batches);
  CHECK(result.stopped_early);
  CHECK(result.steps == 4);  // no improvement at steps 3 and 4
  CHECK(result.best_step == 2);
  REQUIRE(result.best_metric);
  CHECK(*result.best_metric == 0.6);
  REQUIRE(result.best_checkpoint == dir.path / "best");
  CHECK(peft::read_checkpoint_state(result.best_checkpoint).global_step == 2);
  auto fresh = make_net(5);
  peft::load_checkpoint(result.best_checkpoint, *fresh, nullptr, /*restore_rng=*/false);
  for (const auto& [name, p] : peft::named_trainable_parameters(*fresh)) {
    CHECK(torch::equal(p, at_best.at(name)));
  }
  CHECK_THAT(sink.str(), Contains("early stop at step 4"));
}

TEST_CASE("checkpoint loading refuses mismatches and changes nothing", "[checkpoint]") {
  TempDir dir;
  const auto ck = dir.path / "ck";
  auto net = make_net();
  torch::optim::AdamW opt(peft::trainable_parameters(*net));
  loss_of(net, {torch::randn({2, 6}), torch::tensor({1, 2}, torch::kLong)}).backward();
  opt.step();
  peft::TrainingState state;
  state.global_step = 12;
  state.last_metrics = {{"pearson", std::numeric_limits<double>::quiet_NaN()}, {"f1", 0.75}};
  state.scheduler = {12, {1e-3}};
  peft::save_checkpoint(ck, *net, &opt, state);

  const auto back = peft::read_checkpoint_state(ck);
  CHECK(back.global_step == 12);
  CHECK(back.last_metrics.at("f1") == 0.75);
  CHECK(std::isnan(back.last_metrics.at("pearson")));
  CHECK(back.scheduler.base_lrs == std::vector<double>{1e-3});

  // Models to load into, each with an optimizer that has taken a step, and a generator
  // somewhere else. None of them may change.
  auto other = make_net(9, /*classes=*/4);  // a wider head
  auto match = make_net(10);                // fits the checkpoint
  auto extra = make_net(11);                // one trainable parameter more
  extra->register_parameter("scale", torch::ones({1, 12}));
  torch::optim::AdamW other_opt(peft::trainable_parameters(*other));
  torch::optim::AdamW match_opt(peft::trainable_parameters(*match));
  for (auto* pair : {&other, &match}) {
    loss_of(*pair, {torch::randn({2, 6}), torch::tensor({0, 2}, torch::kLong)}).backward();
  }
  other_opt.step();
  match_opt.step();
  auto grouped = peft::make_adamw(*match, peft::ParamGroupOptions().lr_for("head", 1e-2));
  auto adam_state = [](auto& o, const torch::Tensor& p) -> torch::optim::AdamWParamState& {
    // LibTorch 1.13 keys the state by the address as a string, 2.x by the address itself.
    using Key = typename std::decay_t<decltype(o.state())>::key_type;
    Key key;
    if constexpr (std::is_same_v<Key, std::string>) {
      std::ostringstream address;
      address << static_cast<const void*>(p.unsafeGetTensorImpl());
      key = address.str();
    } else {
      key = p.unsafeGetTensorImpl();
    }
    return static_cast<torch::optim::AdamWParamState&>(*o.state().at(key));
  };
  // Everything an AdamW step reads, in parameter order: each group's lr, each parameter's step
  // and moments. (Not the serialized bytes: LibTorch writes the state in its hash map's order,
  // which depends on the tensors' addresses and on the order entries were put back in.)
  auto optimizer_state = [&](torch::optim::AdamW& o) {
    std::vector<torch::Tensor> out;
    for (auto& group : o.param_groups()) {
      const double lr = static_cast<torch::optim::AdamWOptions&>(group.options()).lr();
      out.push_back(torch::tensor(lr, torch::kDouble));
      for (const auto& p : group.params()) {
        auto& st = adam_state(o, p);
        out.push_back(torch::tensor(st.step(), torch::kLong));
        out.push_back(st.exp_avg().clone());
        out.push_back(st.exp_avg_sq().clone());
      }
    }
    return out;
  };
  auto same_state = [](const std::vector<torch::Tensor>& a, const std::vector<torch::Tensor>& b) {
    if (a.size() != b.size()) return false;
    for (size_t i = 0; i < a.size(); ++i) {
      if (!torch::equal(a[i], b[i])) return false;
    }
    return true;
  };
  const auto other_before = snapshot(*other);
  const auto match_before = snapshot(*match);
  const auto extra_before = snapshot(*extra);
  const auto other_opt_before = optimizer_state(other_opt);
  const auto match_opt_before = optimizer_state(match_opt);
  const auto rng_before = at::detail::getDefaultCPUGenerator().get_state();

  SECTION("shape") {
    CHECK_THROWS_WITH(peft::load_checkpoint(ck, *other, &other_opt),
                      Contains("parameter \"head.weight\": the model expects shape [4, 12], the "
                               "checkpoint has [3, 12]"));
  }
  SECTION("a name the model lacks") {
    peft::freeze(*other->head);
    CHECK_THROWS_WITH(peft::load_checkpoint(ck, *other, nullptr),
                      Contains("holds \"head.weight\" (shape [3, 12]), which is not a trainable "
                               "parameter"));
  }
  SECTION("a name the checkpoint lacks") {
    CHECK_THROWS_WITH(peft::load_checkpoint(ck, *extra, nullptr),
                      Contains("trainable parameter \"scale\" (shape [1, 12]) is missing"));
  }
  SECTION("an optimizer of another shape") {
    CHECK_THROWS_WITH(peft::load_checkpoint(ck, *match, grouped.get()),
                      Contains("parameter groups of sizes [4, 2], the checkpoint [6]"));
  }
  SECTION("a damaged optimizer.pt is undone") {
    {
      std::ofstream damaged(ck / "optimizer.pt", std::ios::binary | std::ios::trunc);
      damaged << "PK not really a zip archive";
    }
    CHECK_THROWS_WITH(peft::load_checkpoint(ck, *match, &match_opt),
                      Contains("optimizer.pt does not fit the optimizer"));
  }
  SECTION("a fitting checkpoint loads (the control)") {
    peft::load_checkpoint(ck, *match, &match_opt, /*restore_rng=*/false);
    for (const auto& [name, p] : peft::named_trainable_parameters(*match)) {
      CHECK(torch::equal(p, net->named_parameters()[name]));
    }
    for (const auto& [name, p] : peft::named_trainable_parameters(*match)) {
      CHECK(torch::equal(adam_state(match_opt, p).exp_avg(),
                         adam_state(opt, net->named_parameters()[name]).exp_avg()));
    }
    CHECK_FALSE(same_state(optimizer_state(match_opt), match_opt_before));  // it did change
    return;
  }
  CHECK(same_as(*other, other_before));
  CHECK(same_as(*match, match_before));
  CHECK(same_as(*extra, extra_before));
  const bool other_opt_same = same_state(optimizer_state(other_opt), other_opt_before);
  const bool match_opt_same = same_state(optimizer_state(match_opt), match_opt_before);
  CHECK(other_opt_same);
  CHECK(match_opt_same);
  CHECK(torch::equal(at::detail::getDefaultCPUGenerator().get_state(), rng_before));
}

TEST_CASE("a failed save leaves the previous checkpoint whole", "[checkpoint]") {
  TempDir dir;
  const auto ck = dir.path / "ck";
  auto net = make_net();
  const auto saved = snapshot(*net);
  peft::TrainingState state;
  state.global_step = 3;
  peft::save_checkpoint(ck, *net, nullptr, state);

  // safetensors cannot store complex numbers: the second save fails after its folder was begun.
  struct ComplexImpl : torch::nn::Module {
    ComplexImpl() { register_parameter("z", torch::ones({2}, torch::kComplexFloat)); }
  };
  ComplexImpl complex;
  state.global_step = 4;
  CHECK_THROWS_WITH(peft::save_checkpoint(ck, complex, nullptr, state),
                    Contains("cannot be stored"));
  for (const auto& entry : fs::directory_iterator(dir.path)) {
    CHECK(entry.path().filename() == "ck");
  }
  CHECK(peft::read_checkpoint_state(ck).global_step == 3);
  auto fresh = make_net(8);
  peft::load_checkpoint(ck, *fresh, nullptr, false);
  for (const auto& [name, p] : peft::named_trainable_parameters(*fresh)) {
    CHECK(torch::equal(p, saved.at(name)));
  }

  // A successful save replaces it.
  state.global_step = 5;
  {
    torch::NoGradGuard no_grad;
    net->head->bias.fill_(0.25);
  }
  peft::save_checkpoint(ck, *net, nullptr, state);
  CHECK(peft::read_checkpoint_state(ck).global_step == 5);
  peft::load_checkpoint(ck, *fresh, nullptr, false);
  CHECK(torch::equal(fresh->head->bias, torch::full({3}, 0.25)));
  CHECK(std::distance(fs::directory_iterator(dir.path), fs::directory_iterator()) == 1);

  CHECK_THROWS_WITH(peft::load_checkpoint(dir.path / "missing", *fresh, nullptr),
                    Contains("no manifest.json"));
}

TEST_CASE("progress prints plain lines off a terminal, the metrics log is JSON lines",
          "[trainer]") {
  std::ostringstream out;
  peft::ProgressOptions po;
  po.every_steps = 2;
  po.every_seconds = 0;
  {
    peft::Progress progress(out, 5, po);
    CHECK_FALSE(progress.tty());
    for (int64_t step = 1; step <= 5; ++step) {
      progress.update(step, {{"loss", 1.0 / static_cast<double>(step)}, {"lr", 5e-4}});
    }
    progress.message("eval step 5: accuracy 0.5000");
    progress.finish();
  }
  std::vector<std::string> lines;
  {
    std::istringstream in(out.str());
    std::string line;
    while (std::getline(in, line)) lines.push_back(line);
  }
  REQUIRE(lines.size() == 4);
  CHECK_THAT(lines[0], Contains("step 2/5 loss 0.5000 lr 5.000e-04"));
  CHECK_THAT(lines[1], Contains("step 4/5 loss 0.2500"));
  CHECK_THAT(lines[2], Contains("step 5/5 loss 0.2000"));
  CHECK_THAT(lines[2], Contains("steps/s ETA "));
  CHECK(lines[3] == "eval step 5: accuracy 0.5000");
  CHECK(out.str().find('\r') == std::string::npos);

  // Forced terminal mode redraws one line.
  std::ostringstream tty_out;
  po.tty = true;
  po.redraw_seconds = 0;
  {
    peft::Progress progress(tty_out, 3, po);
    for (int64_t step = 1; step <= 3; ++step) progress.update(step, {{"loss", 0.5}});
    progress.finish();
  }
  const auto text = tty_out.str();
  CHECK(std::count(text.begin(), text.end(), '\r') == 3);
  CHECK(std::count(text.begin(), text.end(), '\n') == 1);
  CHECK_THAT(text, Contains("[########################] step 3/3"));

  CHECK(peft::format_duration(3723) == "1:02:03");

  TempDir dir;
  {
    peft::MetricsLog log(dir.path / "sub" / "log.jsonl");
    log.write({{"step", 1}, {"loss", 0.5}});
    log.write({{"step", 2}, {"loss", std::numeric_limits<double>::quiet_NaN()}});
    CHECK_THROWS_WITH(log.write(nlohmann::json::array()), Contains("must be a JSON object"));
  }
  {
    peft::MetricsLog log(dir.path / "sub" / "log.jsonl");  // appends
    log.write({{"step", 3}, {"eval", {{"f1", 0.8}}}});
  }
  const auto records = read_json_lines(dir.path / "sub" / "log.jsonl");
  REQUIRE(records.size() == 3);
  CHECK(records[0].at("loss") == 0.5);
  CHECK(records[1].at("loss").is_null());
  CHECK(records[2].at("eval").at("f1") == 0.8);
}
