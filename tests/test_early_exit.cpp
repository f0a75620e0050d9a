#include <peft/core/attach.hpp>
#include <peft/core/site.hpp>
#include <peft/io/adapter_format.hpp>
#include <peft/methods/lora.hpp>
#include <peft/models/bert.hpp>
#include <peft/models/early_exit.hpp>
#include <peft/models/heads.hpp>
#include <peft/tasks/exit_sweep.hpp>
#include <peft/tasks/text_classifier.hpp>

#include "model_helpers.hpp"

#include <catch2/catch.hpp>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace fs = std::filesystem;
using peft::models::BertEarlyExitForSequenceClassification;
using peft::models::BertForSequenceClassification;
using peft::models::ExitPolicy;
using peft::models::Pooling;

namespace {

constexpr int64_t kLayers = 3, kLabels = 3;

peft::models::BertConfig exit_config() {
  return testing::tiny_bert_config(kLayers);
}

// The same random backbone every call (seed 11), exits and predictor drawn after it.
BertEarlyExitForSequenceClassification exit_model(Pooling pooling) {
  torch::manual_seed(11);
  auto bert = peft::models::Bert(exit_config());
  auto model = BertEarlyExitForSequenceClassification(bert, kLabels, pooling);
  model->eval();
  return model;
}

// Sentences of different lengths, padded.
struct Inputs {
  torch::Tensor ids, mask, types;
};
Inputs inputs() {
  auto ids = torch::tensor({5, 6, 7, 8, 9, 2, 3, 4, 0, 0, 11, 12, 13, 14, 0, 21, 22, 0, 0, 0},
                           torch::kLong)
                 .view({4, 5});
  auto types = torch::zeros_like(ids);
  types.index_put_({0, torch::indexing::Slice(3)}, 1);
  return {ids, ids.ne(0).to(torch::kLong), types};
}

void randomize_trainable(torch::nn::Module& model) {
  torch::NoGradGuard no_grad;
  for (auto& p : peft::trainable_parameters(model)) p.normal_(0.0, 0.5);
}

// Records the batch size (dimension 0: BERT runs its encoder batch-first) each call of a site
// sees, and changes nothing.
class Counter : public peft::MethodImpl {
 public:
  Counter() : peft::MethodImpl("counter", "default") {}
  torch::Tensor apply(const torch::Tensor& input, const torch::Tensor& output) override {
    seen.push_back(input.size(0));
    return output;
  }
  std::vector<int64_t> seen;
};

}  // namespace

TEST_CASE("Early exit with a threshold that never exits equals the full classifier",
          "[early_exit]") {
  for (auto pooling : {Pooling::Cls, Pooling::Mean}) {
    auto model = exit_model(pooling);
    peft::attach(*model->bert, peft::LoRAOptions(2).targets({"query", "value"}));
    randomize_trainable(*model);
    // The stock classifier over the same backbone and method, with the last exit's weights.
    torch::manual_seed(11);
    auto full = BertForSequenceClassification(peft::models::Bert(exit_config()), kLabels, pooling);
    full->cls_only_last_layer = false;
    peft::attach(*full->bert, peft::LoRAOptions(2).targets({"query", "value"}));
    {
      torch::NoGradGuard no_grad;
      auto source = model->named_parameters();
      for (auto& item : full->named_parameters()) item.value().copy_(source[item.key()]);
    }
    full->eval();
    const auto in = inputs();
    torch::NoGradGuard no_grad;
    const auto expected = full(in.ids, in.mask, in.types);
    CHECK(torch::equal(model(in.ids, in.mask, in.types), expected));
    for (auto [policy, threshold] :
         {std::pair{ExitPolicy::Entropy, 0.0}, std::pair{ExitPolicy::Patience, double(kLayers)},
          std::pair{ExitPolicy::Learned, 1.0}}) {
      model->set_exit(policy, threshold);
      auto result = model->early_exit(in.ids, in.mask, in.types);
      CHECK(torch::equal(result.logits, expected));
      CHECK(torch::equal(result.layers, torch::full({4}, kLayers, torch::kLong)));
      CHECK(torch::equal(model(in.ids, in.mask, in.types), expected));
    }
    // The last exit of forward_exits is the same answer too.
    auto exits = model->forward_exits(in.ids, in.mask, in.types);
    REQUIRE(exits.logits.size() == static_cast<size_t>(kLayers));
    CHECK(torch::equal(exits.logits.back(), expected));
  }
}

TEST_CASE("An example that exits at layer k never runs layer k+1, also inside a batch",
          "[early_exit]") {
  auto model = exit_model(Pooling::Mean);
  randomize_trainable(*model);
  const auto in = inputs();
  torch::NoGradGuard no_grad;
  const auto exits = model->forward_exits(in.ids, in.mask, in.types);
  // Entropies after the first layer; a threshold between the lowest and the others lets exactly
  // the most certain example leave there.
  auto logp = torch::log_softmax(exits.logits[0], -1);
  auto entropy = -(logp.exp() * logp).sum(-1);
  auto sorted = std::get<0>(entropy.sort());
  REQUIRE(sorted[0].item<double>() < sorted[1].item<double>());
  const double threshold = (sorted[0].item<double>() + sorted[1].item<double>()) / 2;
  const int64_t leaver = entropy.argmin().item<int64_t>();

  std::vector<std::shared_ptr<Counter>> counters;
  for (int64_t i = 0; i < kLayers; ++i) {
    counters.push_back(std::make_shared<Counter>());
    model->bert->encoder->layer(static_cast<size_t>(i))->linear1->add(counters.back());
  }
  model->set_exit(ExitPolicy::Entropy, threshold);
  auto result = model->early_exit(in.ids, in.mask, in.types);
  // Layer 1 saw the whole batch, layer 2 every example but the one that left.
  REQUIRE(counters[0]->seen == std::vector<int64_t>{4});
  REQUIRE(counters[1]->seen.size() == 1);
  CHECK(counters[1]->seen[0] == 3);
  CHECK(result.layers[leaver].item<int64_t>() == 1);
  CHECK(torch::allclose(result.logits[leaver], exits.logits[0][leaver], 1e-6, 1e-6));
  // Every example is counted where it left: the calls of each layer equal the examples that had
  // not left before it.
  for (int64_t i = 0; i < kLayers; ++i) {
    const int64_t still_in = result.layers.ge(i + 1).sum().item<int64_t>();
    const int64_t ran = counters[static_cast<size_t>(i)]->seen.empty()
                            ? 0
                            : counters[static_cast<size_t>(i)]->seen[0];
    CHECK(ran == still_in);
  }
  // The others carry the answer of the exit they took.
  for (int64_t n = 0; n < 4; ++n) {
    const auto layer = result.layers[n].item<int64_t>();
    CHECK(torch::allclose(result.logits[n], exits.logits[static_cast<size_t>(layer - 1)][n], 1e-5,
                          1e-5));
  }

  // A threshold every first-layer answer passes: layers 2 and 3 never run.
  for (auto& c : counters) c->seen.clear();
  model->set_exit(ExitPolicy::Entropy, 100.0);
  result = model->early_exit(in.ids, in.mask, in.types);
  CHECK(counters[0]->seen == std::vector<int64_t>{4});
  CHECK(counters[1]->seen.empty());
  CHECK(counters[2]->seen.empty());
  CHECK(torch::equal(result.layers, torch::ones({4}, torch::kLong)));

  // Patience 1: leave at layer 2 when it agrees with layer 1, so nobody leaves at layer 1.
  for (auto& c : counters) c->seen.clear();
  model->set_exit(ExitPolicy::Patience, 1);
  result = model->early_exit(in.ids, in.mask, in.types);
  auto agree = exits.logits[0].argmax(-1).eq(exits.logits[1].argmax(-1));
  CHECK(torch::equal(result.layers, torch::where(agree, torch::full({4}, 2, torch::kLong),
                                                 torch::full({4}, 3, torch::kLong))));
  CHECK(counters[1]->seen == std::vector<int64_t>{4});
  const int64_t stayed = agree.logical_not().sum().item<int64_t>();
  CHECK(counters[2]->seen == (stayed == 0 ? std::vector<int64_t>{} : std::vector<int64_t>{stayed}));
}

TEST_CASE("The learned policy exits where the predictor's confidence reaches the threshold",
          "[early_exit]") {
  auto model = exit_model(Pooling::Cls);
  randomize_trainable(*model);
  const auto in = inputs();
  torch::NoGradGuard no_grad;
  const auto exits = model->forward_exits(in.ids, in.mask, in.types);
  const auto first = torch::sigmoid(exits.confidence[0]);
  const double threshold = first.median().item<double>();
  model->set_exit(ExitPolicy::Learned, threshold);
  auto result = model->early_exit(in.ids, in.mask, in.types);
  CHECK(torch::equal(result.layers.eq(1), first.ge(threshold)));
}

TEST_CASE("The early-exit loss weights layer i by i and adds the predictor's cross-entropy",
          "[early_exit]") {
  auto model = exit_model(Pooling::Mean);
  peft::models::ExitOutputs outputs;
  // Layer 1: uniform over 2 classes (cross-entropy ln 2); layer 2: p(class 0) = 3/4 (ln 4/3).
  outputs.logits = {torch::tensor({{0.0f, 0.0f}}), torch::tensor({{std::log(3.0f), 0.0f}})};
  // Confidence logit 0: binary cross-entropy ln 2 whatever the target.
  outputs.confidence = {torch::zeros({1}), torch::zeros({1})};
  const auto labels = torch::tensor({0}, torch::kLong);
  const double expected = (std::log(2.0) + 2 * std::log(4.0 / 3.0)) / 3 + std::log(2.0);
  CHECK(model->loss(outputs, labels).item<double>() == Approx(expected).epsilon(1e-6));
  // Both exits answer class 0 (layer 1's tie goes to the first class), the label: a predictor
  // that says "right" with logit 20 costs about nothing.
  outputs.confidence = {torch::full({1}, 20.0f), torch::full({1}, 20.0f)};
  CHECK(model->loss(outputs, labels).item<double>() ==
        Approx((std::log(2.0) + 2 * std::log(4.0 / 3.0)) / 3).epsilon(1e-6));
}

TEST_CASE("Training the exits lowers the early-exit loss and leaves the backbone frozen",
          "[early_exit]") {
  auto model = exit_model(Pooling::Mean);
  model->train();
  // Dropout off: the tiny model's 8 features would be too noisy to fit four examples quickly.
  model->bert->set_dropout(0, 0);
  model->dropout->options.p(0);
  const auto in = inputs();
  const auto labels = torch::tensor({0, 1, 2, 1}, torch::kLong);
  const auto before = model->bert->word_embeddings->weight.clone();
  auto params = peft::trainable_parameters(*model);
  // The heads and the predictor: (L-1) exits + classifier, weight and bias each, + predictor.
  CHECK(params.size() == static_cast<size_t>(2 * kLayers + 2));
  torch::optim::AdamW opt(params, torch::optim::AdamWOptions(5e-2));
  double first = 0, last = 0;
  for (int step = 0; step < 100; ++step) {
    opt.zero_grad();
    auto loss = model->loss(model->forward_exits(in.ids, in.mask, in.types), labels);
    loss.backward();
    opt.step();
    (step == 0 ? first : last) = loss.item<double>();
  }
  CHECK(last < first);
  CHECK(torch::equal(model->bert->word_embeddings->weight, before));
  // The four training examples are learned: the last layer's answer is each one's label.
  model->eval();
  torch::NoGradGuard no_grad;
  CHECK(torch::equal(model(in.ids, in.mask, in.types).argmax(-1), labels));
}

TEST_CASE("Exit heads, predictor and policy round-trip through the adapter files", "[early_exit]") {
  const auto in = inputs();
  SECTION("with LoRA") {
    auto model = exit_model(Pooling::Mean);
    peft::attach(*model->bert, peft::LoRAOptions(2).targets({"query", "value"}));
    randomize_trainable(*model);
    model->set_exit(ExitPolicy::Learned, 0.55);
    testing::TempDir dir("peft_early_exit");
    peft::save_adapter(*model, dir.path);
    const auto config = nlohmann::json::parse(std::ifstream(dir.path / "adapter_config.json"));
    CHECK(config["peft_type"] == "LORA");
    CHECK(config["modules_to_save"] == nlohmann::json::array({"classifier", "exits", "predictor"}));
    CHECK(config["task_settings"]["early_exit"]["policy"] == "learned");

    auto fresh = exit_model(Pooling::Cls);
    peft::load_adapter(*fresh, dir.path);
    CHECK(fresh->policy() == ExitPolicy::Learned);
    CHECK(fresh->threshold() == 0.55);
    CHECK(fresh->pooling == Pooling::Mean);
    torch::NoGradGuard no_grad;
    auto a = model->early_exit(in.ids, in.mask, in.types);
    auto b = fresh->early_exit(in.ids, in.mask, in.types);
    CHECK(torch::equal(a.logits, b.logits));
    CHECK(torch::equal(a.layers, b.layers));
    auto ea = model->forward_exits(in.ids, in.mask, in.types);
    auto eb = fresh->forward_exits(in.ids, in.mask, in.types);
    for (size_t i = 0; i < ea.logits.size(); ++i) {
      CHECK(torch::equal(ea.logits[i], eb.logits[i]));
      CHECK(torch::equal(ea.confidence[i], eb.confidence[i]));
    }
  }
  SECTION("heads alone, over a frozen model") {
    auto model = exit_model(Pooling::Cls);
    randomize_trainable(*model);
    model->set_exit(ExitPolicy::Patience, 2);
    testing::TempDir dir("peft_early_exit");
    peft::save_adapter(*model, dir.path);
    const auto config = nlohmann::json::parse(std::ifstream(dir.path / "adapter_config.json"));
    CHECK(config["peft_type"] == "EARLY_EXIT");
    auto fresh = exit_model(Pooling::Cls);
    peft::load_adapter(*fresh, dir.path);
    CHECK(fresh->policy() == ExitPolicy::Patience);
    torch::NoGradGuard no_grad;
    auto a = model->early_exit(in.ids, in.mask, in.types);
    auto b = fresh->early_exit(in.ids, in.mask, in.types);
    CHECK(torch::equal(a.logits, b.logits));
    CHECK(torch::equal(a.layers, b.layers));

    // Into a model without exits: a clear error, and the model is unchanged.
    torch::manual_seed(11);
    auto plain = BertForSequenceClassification(peft::models::Bert(exit_config()), kLabels);
    const auto head = plain->classifier->weight.clone();
    CHECK_THROWS_WITH(peft::load_adapter(*plain, dir.path),
                      Catch::Contains("adapter_config.json") &&
                          Catch::Contains("BertEarlyExitForSequenceClassification"));
    CHECK(torch::equal(plain->classifier->weight, head));

    // Settings that do not fit: named, and nothing changes.
    auto edited = nlohmann::json::parse(std::ifstream(dir.path / "adapter_config.json"));
    edited["task_settings"]["early_exit"]["threshold"] = 1.5;
    std::ofstream(dir.path / "adapter_config.json") << edited.dump();
    auto other = exit_model(Pooling::Cls);
    const auto classifier = other->classifier->weight.clone();
    CHECK_THROWS_WITH(
        peft::load_adapter(*other, dir.path),
        Catch::Contains("a patience is a whole number") && Catch::Contains("adapter_config.json"));
    CHECK(other->policy() == ExitPolicy::None);
    CHECK(torch::equal(other->classifier->weight, classifier));
    edited["task_settings"]["early_exit"]["threshold"] = 2;
    edited["task_settings"]["early_exit"]["layers"] = 12;
    std::ofstream(dir.path / "adapter_config.json") << edited.dump();
    CHECK_THROWS_WITH(peft::load_adapter(*other, dir.path),
                      Catch::Contains("over 12 layers") && Catch::Contains("3 layers"));
  }
}

TEST_CASE("Early exit rejects regression, unknown policies and thresholds out of range",
          "[early_exit]") {
  torch::manual_seed(11);
  CHECK_THROWS_WITH(BertEarlyExitForSequenceClassification(peft::models::Bert(exit_config()), 1),
                    Catch::Contains("num_labels >= 2"));
  CHECK_THROWS_WITH(
      peft::models::exit_policy_from_string("confident"),
      Catch::Contains("unknown exit policy \"confident\"") && Catch::Contains("patience"));
  auto model = exit_model(Pooling::Mean);
  CHECK_THROWS_WITH(model->set_exit(ExitPolicy::Entropy, -0.1), Catch::Contains("nats >= 0"));
  CHECK_THROWS_WITH(model->set_exit(ExitPolicy::Patience, 1.5), Catch::Contains("whole number"));
  CHECK_THROWS_WITH(model->set_exit(ExitPolicy::Learned, 1.2), Catch::Contains("[0, 1]"));
  CHECK_THROWS_WITH(model->set_exit(ExitPolicy::Learned, std::nan("")), Catch::Contains("[0, 1]"));
  CHECK(model->policy() == ExitPolicy::None);
  CHECK(std::string(peft::models::to_string(ExitPolicy::Patience)) == "patience");
  // The registry reads and writes EARLY_EXIT files but does not offer early exit as a method.
  const auto names = peft::method_names();
  CHECK(std::find(names.begin(), names.end(), "early_exit") == names.end());
  REQUIRE(peft::find_method("early_exit").has_value());
  CHECK(peft::find_method("early_exit")->format->peft_type == "EARLY_EXIT");
}

TEST_CASE("sweep_exit_thresholds measures every setting and keeps the chosen one on the model",
          "[early_exit]") {
  auto model = exit_model(Pooling::Mean);
  randomize_trainable(*model);
  const auto in = inputs();
  // Two batches of two rows; labels 0, 1, 2, 0.
  const auto labels = torch::tensor({0, 1, 2, 0}, torch::kLong);
  std::vector<peft::TextBatch> batches;
  for (int64_t start : {0, 2}) {
    batches.push_back({in.ids.narrow(0, start, 2), in.types.narrow(0, start, 2),
                       in.mask.narrow(0, start, 2), labels.narrow(0, start, 2)});
  }
  // Expected, directly: accuracy and mean layers of one setting over all four rows.
  auto direct = [&](ExitPolicy policy, double threshold) {
    model->set_exit(policy, threshold);
    torch::NoGradGuard no_grad;
    auto r = model->early_exit(in.ids, in.mask, in.types);
    return std::pair{r.logits.argmax(-1).eq(labels).to(torch::kDouble).mean().item<double>(),
                     r.layers.to(torch::kDouble).mean().item<double>()};
  };
  const auto [full_accuracy, full_layers] = direct(ExitPolicy::None, 0.0);
  // Entropy below 0 never happens (every layer runs); below 10 nats always (ln 3 at most).
  const auto [never_accuracy, never_layers] = direct(ExitPolicy::Entropy, 0.0);
  const auto [first_accuracy, first_layers] = direct(ExitPolicy::Entropy, 10.0);
  CHECK(full_layers == kLayers);
  CHECK(never_layers == kLayers);
  CHECK(first_layers == 1);

  // Nothing within a negative tolerance: the most cautious threshold is kept.
  auto sweep = peft::sweep_exit_thresholds(
      *model, batches, "accuracy", ExitPolicy::Entropy,
      peft::ExitSweepOptions().thresholds({10.0, 0.0}).timings(1).tolerance(-1.0));
  REQUIRE(sweep.points.size() == 2);
  CHECK(sweep.full.metric == full_accuracy);
  CHECK(sweep.full.mean_layers == kLayers);
  CHECK(sweep.points[0].threshold == 10.0);
  CHECK(sweep.points[0].metric == first_accuracy);
  CHECK(sweep.points[0].mean_layers == 1);
  CHECK(sweep.points[1].metric == never_accuracy);
  CHECK(sweep.points[1].mean_layers == kLayers);
  CHECK(std::isfinite(sweep.points[0].seconds));
  CHECK_FALSE(sweep.within_tolerance);
  CHECK(sweep.chosen().threshold == 0.0);
  CHECK(model->policy() == ExitPolicy::Entropy);
  CHECK(model->threshold() == 0.0);
  CHECK_FALSE(model->is_training());

  // Everything within: the faster of the two measured, set on the model.
  sweep = peft::sweep_exit_thresholds(
      *model, batches, "accuracy", ExitPolicy::Entropy,
      peft::ExitSweepOptions().thresholds({10.0, 0.0}).timings(1).tolerance(1.0));
  CHECK(sweep.within_tolerance);
  const auto& other = sweep.points[1 - sweep.chosen_index];
  CHECK(sweep.chosen().seconds <= other.seconds);
  CHECK(model->threshold() == sweep.chosen().threshold);

  // Defaults per policy, and what cannot be swept.
  CHECK(peft::default_exit_thresholds(ExitPolicy::Patience, 6) == std::vector<double>{4, 3, 2, 1});
  CHECK_THROWS_WITH(peft::sweep_exit_thresholds(*model, batches, "accuracy", ExitPolicy::Patience,
                                                peft::ExitSweepOptions().thresholds({0.5})),
                    Catch::Contains("patience"));
  CHECK_THROWS_WITH(peft::sweep_exit_thresholds(*model, batches, "accuracy", ExitPolicy::None),
                    Catch::Contains("needs an exit policy"));
  CHECK_THROWS_WITH(peft::sweep_exit_thresholds(*model, std::vector<peft::TextBatch>{}, "accuracy",
                                                ExitPolicy::Entropy),
                    Catch::Contains("needs evaluation batches"));
}
