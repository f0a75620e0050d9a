// Checkpoints: exact resume, the NaN policy's saves, early stopping, refusing mismatches, failed
// saves.

#include <peft/train/checkpoint.hpp>
#include <peft/train/output_dir.hpp>
#include <peft/train/precision.hpp>
#include <peft/train/progress.hpp>
#include <peft/train/schedule.hpp>
#include <peft/train/trainer.hpp>
#include <peft/train/distributed.hpp>

#include <catch2/catch.hpp>
#include <torch/torch.h>

#include <signal.h>
#include <sys/mount.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <map>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "train_helpers.hpp"

using Catch::Matchers::Contains;
using namespace train_testing;

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
  SECTION("a manifest number that is not a whole int64 is named, not converted") {
    // nlohmann would cast 1e300 to int64 unchecked (undefined behaviour); found by fuzzing.
    std::ifstream in(ck / "manifest.json");
    auto manifest = nlohmann::json::parse(in);
    in.close();
    for (const auto& [key, value, message] :
         std::vector<std::tuple<std::string, nlohmann::json, std::string>>{
             {"global_step", 1e300, "\"global_step\" is 1e+300, not a whole number"},
             {"epoch", 2.5, "\"epoch\" is 2.5, not a whole number"},
             {"seed", "7", "\"seed\" has the wrong type"},
             {"world_size", 18446744073709551615ULL, "\"world_size\" is 18446744073709551615"}}) {
      auto bad = manifest;
      bad["state"][key] = value;
      std::ofstream(ck / "manifest.json", std::ios::trunc) << bad.dump();
      CHECK_THROWS_WITH(peft::read_checkpoint_state(ck),
                        Contains((ck / "manifest.json").string()) && Contains(message));
    }
    auto bad = manifest;
    bad["version"] = 1e30;
    std::ofstream(ck / "manifest.json", std::ios::trunc) << bad.dump();
    CHECK_THROWS_WITH(peft::load_checkpoint(ck, *match, &match_opt),
                      Contains("\"version\" is 1e+30, not a whole number"));
    bad = manifest;
    bad["optimizer_group_sizes"] = {-3};
    std::ofstream(ck / "manifest.json", std::ios::trunc) << bad.dump();
    CHECK_THROWS_WITH(peft::load_checkpoint(ck, *match, &match_opt),
                      Contains("\"optimizer_group_sizes\" holds -3, not a count"));
  }
  SECTION("a damaged optimizer.pt is undone") {
    {
      std::ofstream damaged(ck / "optimizer.pt", std::ios::binary | std::ios::trunc);
      damaged << "PK not really a zip archive";
    }
    CHECK_THROWS_WITH(peft::load_checkpoint(ck, *match, &match_opt),
                      Contains("optimizer.pt does not fit the optimizer"));
  }
  // torch's Optimizer::load() takes any tensors the archive holds: moments of another shape or
  // with NaN are refused at load (naming the parameter), not at the next step.
  auto write_optimizer = [&](torch::optim::AdamW& o) {
    torch::serialize::OutputArchive archive;
    o.save(archive);
    archive.save_to((ck / "optimizer.pt").string());
  };
  const auto first = peft::trainable_parameters(*net).front();
  SECTION("an optimizer.pt whose moment has another shape is refused") {
    adam_state(opt, first).exp_avg(torch::zeros({3}));
    write_optimizer(opt);
    CHECK_THROWS_WITH(peft::load_checkpoint(ck, *match, &match_opt),
                      Contains("optimizer.pt does not fit the optimizer") &&
                          Contains("parameter 0 of group 0") && Contains("exp_avg is Float [3]"));
  }
  SECTION("an optimizer.pt whose moment holds NaN is refused") {
    adam_state(opt, first).exp_avg_sq().fill_(std::numeric_limits<float>::quiet_NaN());
    write_optimizer(opt);
    CHECK_THROWS_WITH(peft::load_checkpoint(ck, *match, &match_opt),
                      Contains("its exp_avg_sq holds NaN or infinity"));
  }
  SECTION("an optimizer.pt with a negative step is refused") {
    adam_state(opt, first).step(-5);
    write_optimizer(opt);
    CHECK_THROWS_WITH(peft::load_checkpoint(ck, *match, &match_opt),
                      Contains("step -5 is negative"));
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

namespace {

// Lowers this process's file-size limit (RLIMIT_FSIZE) to `bytes` while alive, with SIGXFSZ
// ignored, so a write past it fails with EFBIG as on a full disk; restores both after.
struct FileSizeLimit {
  rlimit previous{};
  struct sigaction previous_action {};
  explicit FileSizeLimit(rlim_t bytes) {
    REQUIRE(::getrlimit(RLIMIT_FSIZE, &previous) == 0);
    struct sigaction ignore {};
    ignore.sa_handler = SIG_IGN;
    REQUIRE(::sigaction(SIGXFSZ, &ignore, &previous_action) == 0);
    rlimit limited = previous;
    limited.rlim_cur = bytes;
    REQUIRE(::setrlimit(RLIMIT_FSIZE, &limited) == 0);
  }
  ~FileSizeLimit() {
    ::setrlimit(RLIMIT_FSIZE, &previous);
    ::sigaction(SIGXFSZ, &previous_action, nullptr);
  }
};

}  // namespace

namespace {

// A tmpfs of `bytes` mounted at `path` while alive (unmounted after, whatever it holds); empty()
// says why when the system refused (mounting needs root and CAP_SYS_ADMIN).
struct SmallFilesystem {
  fs::path path;
  std::string refused;
  SmallFilesystem(const fs::path& where, int64_t bytes) : path(where) {
    fs::create_directories(path);
    const std::string options = "size=" + std::to_string(bytes) + ",mode=0700";
    if (::geteuid() != 0) {
      refused = "not root";
    } else if (::mount("tmpfs", path.c_str(), "tmpfs", 0, options.c_str()) != 0) {
      refused = std::strerror(errno);
    }
  }
  ~SmallFilesystem() {
    if (refused.empty()) ::umount2(path.c_str(), MNT_DETACH);
  }
  SmallFilesystem(const SmallFilesystem&) = delete;
  SmallFilesystem& operator=(const SmallFilesystem&) = delete;
};

}  // namespace

namespace {

// What both full-disk tests do: a checkpoint (step 3) and a safetensors file saved in `dir`,
// then the parameters changed (step 4) for a save that must fail; intact() checks that nothing
// half-written is left beside `others` and that both earlier versions load unchanged.
struct FullDiskCase {
  fs::path dir, ck, tensors;
  Net net = make_net();
  std::map<std::string, torch::Tensor> saved = snapshot(*net);
  peft::TrainingState state;

  explicit FullDiskCase(const fs::path& folder)
      : dir(folder), ck(folder / "ck"), tensors(folder / "weights.safetensors") {
    state.global_step = 3;
    peft::save_checkpoint(ck, *net, nullptr, state);
    peft::io::save_safetensors(tensors, {{"w", torch::arange(4, torch::kFloat)}});
    torch::NoGradGuard no_grad;
    for (auto& p : peft::trainable_parameters(*net)) p.add_(1.0);
    state.global_step = 4;
  }

  void save_checkpoint() { peft::save_checkpoint(ck, *net, nullptr, state); }
  void save_tensors() {
    peft::io::save_safetensors(tensors, {{"w", torch::zeros({1000}, torch::kFloat)}});
  }

  void intact(std::vector<std::string> others) const {
    std::vector<std::string> names;
    for (const auto& entry : fs::directory_iterator(dir))
      names.push_back(entry.path().filename().string());
    std::sort(names.begin(), names.end());
    others.insert(others.end(), {"ck", "weights.safetensors"});
    std::sort(others.begin(), others.end());
    CHECK(names == others);
    CHECK(peft::read_checkpoint_state(ck).global_step == 3);
    auto fresh = make_net(8);
    peft::load_checkpoint(ck, *fresh, nullptr, false);
    for (const auto& [name, p] : peft::named_trainable_parameters(*fresh)) {
      CHECK(torch::equal(p, saved.at(name)));
    }
    CHECK(torch::equal(peft::io::load_safetensors(tensors).at(0).second,
                       torch::arange(4, torch::kFloat)));
  }
};

}  // namespace

TEST_CASE("a really full disk (ENOSPC on a small tmpfs): a clear error, nothing lost",
          "[checkpoint]") {
  TempDir dir;
  const SmallFilesystem small(dir.path / "small", 512 * 1024);
  if (!small.refused.empty()) {
    WARN("skipped: cannot mount a tmpfs here (" << small.refused
                                                << "); the RLIMIT_FSIZE test covers the writers");
    return;
  }
  FullDiskCase c(small.path);
  // Fill what is left, a page at a time, until the system says the device is full.
  {
    std::FILE* filler = std::fopen((small.path / "filler").c_str(), "wb");
    REQUIRE(filler != nullptr);
    const std::string page(4096, 'x');
    while (std::fwrite(page.data(), 1, page.size(), filler) == page.size() &&
           std::fflush(filler) == 0) {
    }
    std::fclose(filler);
  }
  CHECK_THROWS_WITH(c.save_checkpoint(),
                    Contains(c.ck.string()) && Contains("No space left on device"));
  CHECK_THROWS_WITH(c.save_tensors(),
                    Contains("weights.safetensors") && Contains("No space left on device"));
  c.intact({"filler"});
  // With room again, the same save goes through (the control).
  fs::remove(small.path / "filler");
  c.save_checkpoint();
  CHECK(peft::read_checkpoint_state(c.ck).global_step == 4);
}

TEST_CASE("a full disk while saving: a clear error, the previous checkpoint and file intact",
          "[checkpoint]") {
  TempDir dir;
  FullDiskCase c(dir.path);
  {
    // Smaller than the trainable tensors: the first file of the new checkpoint cannot be written.
    const FileSizeLimit limit(64);
    CHECK_THROWS_WITH(c.save_checkpoint(), Contains("cannot write") &&
                                               Contains("trainable.safetensors") &&
                                               Contains("File too large"));
    CHECK_THROWS_WITH(c.save_tensors(),
                      Contains("weights.safetensors") && Contains("File too large"));
  }
  c.intact({});
}

TEST_CASE("what a killed writer left is cleaned: temporaries removed, a moved-aside one restored",
          "[checkpoint]") {
  TempDir dir;
  const auto make = [&](const std::string& name) {
    fs::create_directories(dir.path / name);
    std::ofstream(dir.path / name / "manifest.json") << name;
  };
  make("checkpoint-8");
  make("checkpoint-10.tmp-0123456789abcdef");  // killed while being built
  make("checkpoint-6.old-00000000deadbeef");   // moved aside, its replacement never came
  make("checkpoint-8.old-fedcba9876543210");   // moved aside, replaced
  std::ofstream(dir.path / "adapter_model.safetensors.tmp-aaaaaaaaaaaaaaaa") << "half";
  std::ofstream(dir.path / "notes.tmp-draft") << "not ours";  // not 16 hex digits: kept
  std::ofstream(dir.path / "metrics.jsonl") << "{}";

  auto cleaned = peft::clean_interrupted_writes(dir.path);
  std::sort(cleaned.begin(), cleaned.end());
  CHECK(cleaned == std::vector<std::string>{"adapter_model.safetensors.tmp-aaaaaaaaaaaaaaaa",
                                            "checkpoint-10.tmp-0123456789abcdef",
                                            "checkpoint-6.old-00000000deadbeef -> checkpoint-6",
                                            "checkpoint-8.old-fedcba9876543210"});
  std::vector<std::string> names;
  for (const auto& entry : fs::directory_iterator(dir.path))
    names.push_back(entry.path().filename().string());
  std::sort(names.begin(), names.end());
  CHECK(names == std::vector<std::string>{"checkpoint-6", "checkpoint-8", "metrics.jsonl",
                                          "notes.tmp-draft"});
  // The restored folder is the one that was moved aside.
  std::ifstream restored(dir.path / "checkpoint-6" / "manifest.json");
  std::string content((std::istreambuf_iterator<char>(restored)), std::istreambuf_iterator<char>());
  CHECK(content == "checkpoint-6.old-00000000deadbeef");
  CHECK(peft::clean_interrupted_writes(dir.path).empty());
}

// ---- Data parallel: what needs no second process (the 2-process runs are in distributed_tool).

namespace {

// A "world" of two in one process: rank 0 is this process; rank 1's contributions to each
// reduction are given in advance, in order.
class ScriptedPeer : public peft::Collective {
 public:
  explicit ScriptedPeer(std::vector<torch::Tensor> peer) : peer_(std::move(peer)) {}
  int rank() const override { return 0; }
  int world_size() const override { return 2; }
  void all_reduce_sum(std::vector<torch::Tensor>& tensors, const std::string& what) override {
    count_reduced(tensors);
    for (auto& t : tensors) {
      REQUIRE(next_ < peer_.size());
      INFO(what);
      REQUIRE(peer_[next_].sizes() == t.sizes());
      t.add_(peer_[next_++].to(t.scalar_type()));
    }
  }
  void broadcast(std::vector<torch::Tensor>&, int, const std::string&) override {}
  std::vector<torch::Tensor> all_gather(const torch::Tensor& t, const std::string&) override {
    return {t, t};
  }
  void barrier(const std::string&) override {}
  size_t used() const { return next_; }

 private:
  std::vector<torch::Tensor> peer_;
  size_t next_ = 0;
};

}  // namespace

TEST_CASE("gradient averaging: means over ranks, a gradient nobody has stays absent",
          "[distributed]") {
  auto a = torch::zeros({2, 2}, torch::requires_grad());
  auto b = torch::zeros({3}, torch::requires_grad());  // no gradient on either rank
  auto c = torch::zeros({1}, torch::requires_grad());  // a gradient on the peer only
  a.mutable_grad() = torch::tensor({1.0f, 2.0f, 3.0f, 4.0f}).view({2, 2});
  // The peer: values {1 (non-finite loss flag), 0.5 (loss)}, then its has-gradient flags for a,
  // b, c; then its flat gradients of a, b, c packed in one float buffer.
  ScriptedPeer peer({torch::tensor({1.0, 0.5, 1.0, 0.0, 1.0}, torch::kDouble),
                     torch::tensor({3.0f, 2.0f, 1.0f, 0.0f, 0.0f, 0.0f, 0.0f, 8.0f})});
  peft::GradientAverager averager({a, b, c});
  CHECK(averager.buckets() == 1);
  CHECK(averager.bytes_per_step() == 8 * 4);
  const auto summed = averager.average(peer, {0.0, 1.5}, "step 1");
  CHECK(peer.used() == 2);
  CHECK(summed == std::vector<double>{1.0, 2.0});
  CHECK(torch::equal(a.grad(), torch::tensor({2.0f, 2.0f, 2.0f, 2.0f}).view({2, 2})));
  CHECK_FALSE(b.grad().defined());
  REQUIRE(c.grad().defined());
  CHECK(c.grad().item<float>() == 4.0f);
  CHECK(peer.reduced_bytes() == 5 * 8 + 8 * 4);
}

TEST_CASE("shards: every global batch split between the ranks, evaluation rows once",
          "[distributed]") {
  std::vector<int> rows(10);
  for (int i = 0; i < 10; ++i) rows[static_cast<size_t>(i)] = i;
  // Padded to 12 with the first rows, dealt out in turn.
  CHECK(peft::shard_for_rank(rows, 4, 0) == std::vector<int>{0, 4, 8});
  CHECK(peft::shard_for_rank(rows, 4, 2) == std::vector<int>{2, 6, 0});
  CHECK(peft::shard_for_rank(rows, 4, 3) == std::vector<int>{3, 7, 1});
  // Global batches of 4 over 2 ranks (2 rows each): local batch k on both ranks is global batch k.
  const auto r0 = peft::shard_for_rank(rows, 2, 0), r1 = peft::shard_for_rank(rows, 2, 1);
  REQUIRE(r0.size() == r1.size());
  for (size_t k = 0; k * 2 < r0.size(); ++k) {
    std::vector<int> together;
    for (size_t j = k * 2; j < std::min(r0.size(), k * 2 + 2); ++j) {
      together.push_back(r0[j]);
      together.push_back(r1[j]);
    }
    std::sort(together.begin(), together.end());
    std::vector<int> expected;
    for (int i = static_cast<int>(k) * 4; i < std::min(10, static_cast<int>(k) * 4 + 4); ++i) {
      expected.push_back(i);
    }
    CHECK(together == expected);
  }
  CHECK(peft::shard_for_evaluation(rows, 4, 2) == std::vector<int>{2, 6});
  CHECK(peft::shard_for_evaluation(rows, 4, 1) == std::vector<int>{1, 5, 9});
  CHECK_THROWS_WITH(peft::shard_for_rank(rows, 2, 2),
                    Contains("rank 2 is not within a world of 2 processes"));
}

TEST_CASE("a checkpoint of 2 processes is refused by 1, naming both counts", "[distributed]") {
  TempDir dir;
  auto net = make_net();
  torch::optim::AdamW opt(peft::trainable_parameters(*net));
  peft::TrainingState state;
  state.global_step = 3;
  state.world_size = 2;
  state.scheduler = {3, {5e-4}};
  peft::save_checkpoint(dir.path / "checkpoint-3", *net, &opt, state);
  CHECK(peft::read_checkpoint_state(dir.path / "checkpoint-3").world_size == 2);
  std::ostringstream sink;
  peft::Trainer<Batch> trainer(
      net, [&](const Batch& b) { return loss_of(net, b); },
      peft::TrainerOptions().output_dir(dir.path).progress_stream(&sink));
  CHECK_THROWS_WITH(trainer.resume(),
                    Contains("was saved by a run of 2 processes, this one has 1"));
  // A one-process checkpoint has no generator state for rank 1.
  state.world_size = 1;
  peft::save_checkpoint(dir.path / "single", *net, &opt, state);
  CHECK_THROWS_WITH(peft::load_checkpoint(dir.path / "single", *net, &opt, true, 1),
                    Contains("no generator state for rank 1"));
}

TEST_CASE("the launch environment is read and checked", "[distributed]") {
  struct Env {
    ~Env() {
      for (const char* k : {"WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"}) {
        ::unsetenv(k);
      }
    }
  } restore;
  CHECK_FALSE(peft::launch_env().from_env);
  CHECK(peft::launch_env().world_size == 1);
  ::setenv("WORLD_SIZE", "2", 1);
  ::setenv("RANK", "1", 1);
  ::setenv("MASTER_ADDR", "10.0.0.7", 1);
  ::setenv("MASTER_PORT", "29555", 1);
  const auto env = peft::launch_env();
  CHECK(env.from_env);
  CHECK(env.world_size == 2);
  CHECK(env.rank == 1);
  CHECK(env.local_rank == 1);
  CHECK(env.master_addr == "10.0.0.7");
  CHECK(env.master_port == 29555);
  ::setenv("RANK", "2", 1);
  CHECK_THROWS_WITH(peft::launch_env(),
                    Contains("environment variable RANK=\"2\" is not an integer in [0, 1]"));
  ::setenv("RANK", "0", 1);
  ::setenv("MASTER_PORT", "http", 1);
  CHECK_THROWS_WITH(peft::launch_env(), Contains("MASTER_PORT=\"http\""));
}

namespace {
void count_sigpipe(int) {}
}  // namespace

TEST_CASE("joining a run ignores SIGPIPE, so a write to a dead rank fails instead of killing",
          "[distributed]") {
  struct Restore {
    struct sigaction saved {};
    Restore() { ::sigaction(SIGPIPE, nullptr, &saved); }
    ~Restore() { ::sigaction(SIGPIPE, &saved, nullptr); }
  } restore;
  auto disposition = [] {
    struct sigaction now {};
    ::sigaction(SIGPIPE, nullptr, &now);
    return now.sa_handler;
  };
  ::signal(SIGPIPE, SIG_DFL);
  CHECK(peft::detail::ignore_sigpipe());
  CHECK(disposition() == SIG_IGN);
  // A write to a pipe nobody reads (as to the socket of a rank that died): EPIPE, not a signal.
  int fds[2];
  REQUIRE(::pipe(fds) == 0);
  ::close(fds[0]);
  const char byte = 'x';
  errno = 0;
  CHECK(::write(fds[1], &byte, 1) == -1);
  CHECK(errno == EPIPE);
  ::close(fds[1]);
  // A handler the program installed itself stays.
  ::signal(SIGPIPE, count_sigpipe);
  CHECK(peft::detail::ignore_sigpipe());
  CHECK(disposition() == &count_sigpipe);
}

TEST_CASE("prepare_output_dir refuses to mix runs, and overwrites only a run's own files",
          "[checkpoint]") {
  namespace fs = std::filesystem;
  TempDir dir;
  const auto out = dir.path / "run";
  // A folder that does not exist yet, and an empty path: nothing to do.
  CHECK(peft::prepare_output_dir(out).empty());
  CHECK(peft::prepare_output_dir({}).empty());
  fs::create_directories(out / "checkpoint-40");
  std::ofstream(out / "metrics.jsonl") << "{}\n";
  std::ofstream(out / "notes.txt") << "mine\n";
  fs::create_directories(out / "data");
  // An earlier run: refused, naming the folder and the first file found, and nothing removed.
  CHECK_THROWS_WITH(
      peft::prepare_output_dir(out, peft::OutputDirOptions().hint("pass --resume or --overwrite")),
      Catch::Contains("[peft::output_dir]") &&
          Catch::Contains(out.string() +
                          " holds an earlier run (checkpoint-40); pass --resume or --overwrite"));
  CHECK(fs::exists(out / "checkpoint-40"));
  // Resuming keeps everything.
  CHECK(peft::prepare_output_dir(out, peft::OutputDirOptions().resume(true)).empty());
  CHECK(fs::exists(out / "metrics.jsonl"));
  // Overwriting removes the run's files, and only those.
  const auto removed = peft::prepare_output_dir(out, peft::OutputDirOptions().overwrite(true));
  CHECK(removed == std::vector<fs::path>{out / "checkpoint-40", out / "metrics.jsonl"});
  CHECK_FALSE(fs::exists(out / "checkpoint-40"));
  CHECK_FALSE(fs::exists(out / "metrics.jsonl"));
  CHECK(fs::exists(out / "notes.txt"));
  CHECK(fs::exists(out / "data"));
  // A file where the folder should be.
  std::ofstream(dir.path / "file") << "x";
  CHECK_THROWS_WITH(peft::prepare_output_dir(dir.path / "file"),
                    Catch::Contains("is a file, expected a folder"));
  CHECK(peft::is_run_output("adapter_model.safetensors"));
  CHECK(peft::is_run_output("best"));
  CHECK_FALSE(peft::is_run_output("train.tsv"));
}
