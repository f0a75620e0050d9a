// The training loop itself: only trainable parameters change; progress output and the metrics log.

#include <peft/train/checkpoint.hpp>
#include <peft/train/precision.hpp>
#include <peft/train/progress.hpp>
#include <peft/train/schedule.hpp>
#include <peft/train/trainer.hpp>

#include <catch2/catch.hpp>
#include <torch/torch.h>

#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "train_helpers.hpp"

using Catch::Matchers::Contains;
using namespace train_testing;

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

TEST_CASE("TrainResult::eval_seconds counts the time fit() spent in the evaluation callback",
          "[trainer]") {
  const auto batches = make_batches(3);
  auto net = make_net();
  std::ostringstream sink;
  peft::Trainer<Batch> trainer(
      net, [&](const Batch& b) { return loss_of(net, b); },
      peft::TrainerOptions().epochs(2).progress_stream(&sink));
  // The callback waits 50 ms; it runs at each of the two epoch ends.
  int calls = 0;
  trainer.evaluate_with([&] {
    ++calls;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    return std::map<std::string, double>{{"accuracy", 0.5}};
  });
  const auto start = std::chrono::steady_clock::now();
  const auto result = trainer.fit(batches);
  const double total =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  CHECK(calls == 2);
  CHECK(result.eval_seconds >= 0.1);
  CHECK(result.eval_seconds <= total);
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
