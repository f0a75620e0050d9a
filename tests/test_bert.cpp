#include <peft/core/attach.hpp>
#include <peft/methods/lora.hpp>
#include <peft/methods/prompt.hpp>
#include <peft/io/safetensors.hpp>
#include <peft/models/bert.hpp>
#include <peft/models/heads.hpp>
#include "../examples/common/model_path.hpp"
#include <peft/train/precision.hpp>
#include <peft/core/site.hpp>
#include <peft/methods/adapter.hpp>
#include <peft/methods/ladder.hpp>
#include <peft/methods/propetl.hpp>
#include <peft/methods/ptuning.hpp>
#include <peft/models/early_exit.hpp>
#include <peft/train/schedule.hpp>

#include "model_helpers.hpp"

#include <catch2/catch.hpp>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace fs = std::filesystem;

namespace {

constexpr int64_t kH = 8, kLayers = 2, kHeads = 2, kFF = 16, kVocab = 30, kPositions = 24;

nlohmann::json tiny_config(const std::string& type = "bert") {
  return {{"model_type", type},
          {"hidden_size", kH},
          {"num_hidden_layers", kLayers},
          {"num_attention_heads", kHeads},
          {"intermediate_size", kFF},
          {"hidden_act", "gelu"},
          {"layer_norm_eps", 1e-12},
          {"vocab_size", kVocab},
          {"max_position_embeddings", kPositions},
          {"type_vocab_size", 2},
          {"pad_token_id", type == "roberta" ? 1 : 0}};
}

// Hugging Face's tensor names for the tiny model, written independently of BertImpl.
std::map<std::string, torch::Tensor> tiny_weights(const std::string& prefix = "bert.") {
  std::map<std::string, torch::Tensor> w;
  auto put = [&](const std::string& name, std::vector<int64_t> shape) {
    w[prefix + name] = torch::randn(shape) * 0.5;
  };
  put("embeddings.word_embeddings.weight", {kVocab, kH});
  put("embeddings.position_embeddings.weight", {kPositions, kH});
  put("embeddings.token_type_embeddings.weight", {2, kH});
  put("embeddings.LayerNorm.weight", {kH});
  put("embeddings.LayerNorm.bias", {kH});
  for (int i = 0; i < kLayers; ++i) {
    const std::string p = "encoder.layer." + std::to_string(i) + ".";
    for (const char* m : {"attention.self.query", "attention.self.key", "attention.self.value",
                          "attention.output.dense"}) {
      put(p + m + ".weight", {kH, kH});
      put(p + m + ".bias", {kH});
    }
    put(p + "attention.output.LayerNorm.weight", {kH});
    put(p + "attention.output.LayerNorm.bias", {kH});
    put(p + "intermediate.dense.weight", {kFF, kH});
    put(p + "intermediate.dense.bias", {kFF});
    put(p + "output.dense.weight", {kH, kFF});
    put(p + "output.dense.bias", {kH});
    put(p + "output.LayerNorm.weight", {kH});
    put(p + "output.LayerNorm.bias", {kH});
  }
  put("pooler.dense.weight", {kH, kH});
  put("pooler.dense.bias", {kH});
  w[prefix + "embeddings.position_ids"] = torch::arange(kPositions).unsqueeze(0);
  return w;
}

struct TempDir : testing::TempDir {
  TempDir() : testing::TempDir("peft_bert", /*create=*/true) {}
};

void write_folder(const fs::path& dir, const nlohmann::json& config,
                  const std::map<std::string, torch::Tensor>& weights) {
  std::ofstream(dir / "config.json") << config.dump(2);
  std::vector<std::pair<std::string, torch::Tensor>> list(weights.begin(), weights.end());
  peft::io::save_safetensors(dir / "model.safetensors", list);
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const peft::Error& e) {
    return e.what();
  }
  return "(no peft::Error)";
}

// BERT's embeddings and encoder computed with the stock modules only.
torch::Tensor stock_bert(peft::models::BertImpl& bert, const torch::Tensor& ids,
                         const torch::Tensor& mask, const torch::Tensor& types,
                         const torch::Tensor& positions) {
  auto x = bert.word_embeddings(ids) + bert.position_embeddings(positions) +
           bert.token_type_embeddings(types);
  x = bert.embeddings_norm(x);
  auto h = bert.encoder->base->forward(x.transpose(0, 1), {}, mask.eq(0));
  return h.transpose(0, 1);
}

}  // namespace

TEST_CASE("BertConfig reads config.json and rejects what it cannot build", "[bert]") {
  auto c = peft::models::BertConfig::from_json(tiny_config());
  CHECK(c.hidden_size == kH);
  CHECK(c.num_hidden_layers == kLayers);
  CHECK(c.layer_norm_eps == 1e-12);
  CHECK_FALSE(c.roberta());
  CHECK(peft::models::BertConfig::from_json(tiny_config("roberta")).roberta());

  auto bad = tiny_config();
  bad["hidden_act"] = "relu";
  CHECK_THAT(error_of([&] { peft::models::BertConfig::from_json(bad, "x/config.json"); }),
             Catch::Contains("x/config.json") && Catch::Contains("hidden_act \"relu\""));
  bad = tiny_config();
  bad["num_attention_heads"] = 3;
  CHECK_THAT(error_of([&] { peft::models::BertConfig::from_json(bad); }),
             Catch::Contains("not divisible by num_attention_heads 3"));
  bad = tiny_config();
  bad["hidden_size"] = "large";
  CHECK_THAT(error_of([&] { peft::models::BertConfig::from_json(bad); }),
             Catch::Contains("\"hidden_size\" has the wrong type"));
}

TEST_CASE("Bert::from_pretrained reports missing files, tensors and wrong shapes", "[bert]") {
  TempDir dir;
  CHECK_THAT(error_of([&] { peft::models::Bert::from_pretrained(dir.path / "nope"); }),
             Catch::Contains("does not exist"));
  CHECK_THAT(error_of([&] { peft::models::Bert::from_pretrained(dir.path); }),
             Catch::Contains("config.json not found"));
  std::ofstream(dir.path / "config.json") << tiny_config().dump();
  std::ofstream(dir.path / "pytorch_model.bin") << "pickle";
  CHECK_THAT(error_of([&] { peft::models::Bert::from_pretrained(dir.path); }),
             Catch::Contains("only pytorch_model.bin") && Catch::Contains("safetensors only"));
  fs::remove(dir.path / "pytorch_model.bin");

  auto weights = tiny_weights();
  weights["bert.encoder.layer.1.intermediate.dense.weight"] = torch::zeros({kFF, kH + 1});
  write_folder(dir.path, tiny_config(), weights);
  CHECK_THAT(error_of([&] { peft::models::Bert::from_pretrained(dir.path); }),
             Catch::Contains("\"bert.encoder.layer.1.intermediate.dense.weight\"") &&
                 Catch::Contains("has shape [16, 9], expected [16, 8]"));

  weights = tiny_weights();
  weights.erase("bert.encoder.layer.0.attention.self.value.bias");
  write_folder(dir.path, tiny_config(), weights);
  CHECK_THAT(error_of([&] { peft::models::Bert::from_pretrained(dir.path); }),
             Catch::Contains("missing tensor \"bert.encoder.layer.0.attention.self.value.bias\"") &&
                 Catch::Contains("[8]"));
}

TEST_CASE("A sharded checkpoint (model.safetensors.index.json) loads like one file", "[bert]") {
  TempDir whole, sharded;
  torch::manual_seed(3);
  const auto weights = tiny_weights();
  write_folder(whole.path, tiny_config(), weights);
  // What transformers' save_pretrained(max_shard_size=...) writes: the tensors split between
  // files, and an index naming each tensor's file.
  std::ofstream(sharded.path / "config.json") << tiny_config().dump(2);
  std::vector<std::pair<std::string, torch::Tensor>> first, second;
  nlohmann::json index = {{"metadata", {{"total_size", 0}}},
                          {"weight_map", nlohmann::json::object()}};
  size_t i = 0;
  for (const auto& [name, t] : weights) {
    const bool in_first = i++ % 2 == 0;
    (in_first ? first : second).emplace_back(name, t);
    index["weight_map"][name] =
        in_first ? "model-00001-of-00002.safetensors" : "model-00002-of-00002.safetensors";
  }
  peft::io::save_safetensors(sharded.path / "model-00001-of-00002.safetensors", first);
  peft::io::save_safetensors(sharded.path / "model-00002-of-00002.safetensors", second);
  auto write_index = [&](const nlohmann::json& j) {
    std::ofstream(sharded.path / "model.safetensors.index.json", std::ios::trunc) << j.dump(2);
  };
  write_index(index);

  auto expected = peft::models::Bert::from_pretrained(whole.path);
  auto model = peft::models::Bert::from_pretrained(sharded.path);
  auto want = expected->named_parameters();
  for (const auto& p : model->named_parameters()) {
    INFO(p.key());
    CHECK(torch::equal(p.value(), want[p.key()]));
  }

  // A bad index is refused, naming the index and the shard.
  const std::string index_file = (sharded.path / "model.safetensors.index.json").string();
  auto bad = index;
  bad["weight_map"]["bert.embeddings.LayerNorm.weight"] = "model-00003-of-00002.safetensors";
  write_index(bad);
  CHECK_THAT(error_of([&] { peft::models::Bert::from_pretrained(sharded.path); }),
             Catch::Contains(index_file) && Catch::Contains("model-00003-of-00002.safetensors") &&
                 Catch::Contains("not found"));
  bad = index;
  bad["weight_map"]["bert.embeddings.LayerNorm.weight"] = "../model-00001-of-00002.safetensors";
  write_index(bad);
  CHECK_THAT(error_of([&] { peft::models::Bert::from_pretrained(sharded.path); }),
             Catch::Contains("must be a file name in the index's folder"));
  bad = index;
  const std::string other =
      bad["weight_map"]["bert.embeddings.LayerNorm.weight"] == "model-00001-of-00002.safetensors"
          ? "model-00002-of-00002.safetensors"
          : "model-00001-of-00002.safetensors";
  bad["weight_map"]["bert.embeddings.LayerNorm.weight"] = other;
  write_index(bad);
  CHECK_THAT(error_of([&] { peft::models::Bert::from_pretrained(sharded.path); }),
             Catch::Contains("puts \"bert.embeddings.LayerNorm.weight\" in") &&
                 Catch::Contains("which does not hold it"));
  bad = index;
  bad["weight_map"].erase("bert.embeddings.LayerNorm.weight");
  write_index(bad);
  CHECK_THAT(error_of([&] { peft::models::Bert::from_pretrained(sharded.path); }),
             Catch::Contains(index_file) &&
                 Catch::Contains("missing tensor \"bert.embeddings.LayerNorm.weight\""));
  write_index(nlohmann::json{{"weight_map", {}}});
  CHECK_THAT(error_of([&] { peft::models::Bert::from_pretrained(sharded.path); }),
             Catch::Contains("non-empty \"weight_map\""));
  std::ofstream(sharded.path / "model.safetensors.index.json", std::ios::trunc) << "{not json";
  CHECK_THAT(error_of([&] { peft::models::Bert::from_pretrained(sharded.path); }),
             Catch::Contains(index_file) && Catch::Contains("is not valid JSON"));
}

TEST_CASE("from_pretrained's adjust edits the config before the model is built", "[bert]") {
  TempDir dir;
  write_folder(dir.path, tiny_config(), tiny_weights());
  // Dropout: the rates the model's modules and the head's dropout use.
  auto model = peft::models::BertForSequenceClassification::from_pretrained(
      dir.path, 2, peft::models::Pooling::Cls, [](peft::models::BertConfig& c) {
        c.hidden_dropout_prob = 0.25;
        c.attention_probs_dropout_prob = 0.125;
      });
  CHECK(model->bert->config().hidden_dropout_prob == 0.25);
  CHECK(model->bert->config().attention_probs_dropout_prob == 0.125);
  CHECK(model->bert->embeddings_dropout->options.p() == 0.25);
  CHECK(model->bert->encoder_layer(1)->dropout1->options.p() == 0.25);
  CHECK(model->bert->encoder_layer(1)->self_attn->options.dropout() == 0.125);
  CHECK(model->dropout->options.p() == 0.25);  // no classifier_dropout: hidden_dropout_prob

  // Fewer layers: the first layer of the checkpoint, the rest ignored. Expected: the full
  // model's embeddings and its stock layer 0, sequence-first.
  auto full = peft::models::Bert::from_pretrained(dir.path);
  auto one = peft::models::Bert::from_pretrained(
      dir.path, [](peft::models::BertConfig& c) { c.num_hidden_layers = 1; });
  REQUIRE(one->encoder->layers->size() == 1);
  full->eval();
  one->eval();
  auto ids = torch::tensor({5, 6, 7, 8, 2, 3, 0, 0}, torch::kLong).view({2, 4});
  auto mask = ids.ne(0).to(torch::kLong);
  auto types = torch::zeros_like(ids);
  torch::NoGradGuard no_grad;
  auto x = full->word_embeddings(ids) + full->position_embeddings(torch::arange(4).repeat({2, 1})) +
           full->token_type_embeddings(types);
  x = full->embeddings_norm(x);
  auto expected =
      full->encoder_layer(0)->forward(x.transpose(0, 1), {}, mask.eq(0)).transpose(0, 1);
  CHECK((one(ids, mask, types) - expected).abs().max().item<double>() <= 1e-5);

  // A config the checkpoint cannot fill, and one that is not valid, name what is wrong.
  CHECK_THAT(error_of([&] {
               peft::models::Bert::from_pretrained(
                   dir.path, [](peft::models::BertConfig& c) { c.intermediate_size = kFF + 1; });
             }),
             Catch::Contains("intermediate.dense.weight") && Catch::Contains("expected [17, 8]"));
  CHECK_THAT(error_of([&] {
               peft::models::Bert::from_pretrained(
                   dir.path, [](peft::models::BertConfig& c) { c.num_attention_heads = 3; });
             }),
             Catch::Contains("config.json as adjusted") &&
                 Catch::Contains("not divisible by num_attention_heads 3"));
}

TEST_CASE("Bert loads Hugging Face names into the stock modules", "[bert]") {
  TempDir dir;
  for (std::string prefix : {"bert.", ""}) {
    auto weights = tiny_weights(prefix);
    write_folder(dir.path, tiny_config(), weights);
    auto bert = peft::models::Bert::from_pretrained(dir.path);
    auto l1 = bert->encoder_layer(1);
    const std::string p = prefix + "encoder.layer.1.";
    CHECK(torch::equal(l1->self_attn->in_proj_weight.narrow(0, 0, kH),
                       weights[p + "attention.self.query.weight"]));
    CHECK(torch::equal(l1->self_attn->in_proj_weight.narrow(0, kH, kH),
                       weights[p + "attention.self.key.weight"]));
    CHECK(torch::equal(l1->self_attn->in_proj_bias.narrow(0, 2 * kH, kH),
                       weights[p + "attention.self.value.bias"]));
    CHECK(torch::equal(l1->self_attn->out_proj->weight,
                       weights[p + "attention.output.dense.weight"]));
    CHECK(torch::equal(l1->norm1->weight, weights[p + "attention.output.LayerNorm.weight"]));
    CHECK(torch::equal(l1->linear2->weight, weights[p + "output.dense.weight"]));
    CHECK(torch::equal(l1->norm2->bias, weights[p + "output.LayerNorm.bias"]));
    CHECK(torch::equal(bert->pooler->weight, weights[prefix + "pooler.dense.weight"]));
    // The stock layer's LayerNorms carry BERT's eps, in the typed member and the child alike.
    CHECK(l1->norm2->options.eps() == 1e-12);
    auto child = std::dynamic_pointer_cast<torch::nn::LayerNormImpl>(l1->named_children()["norm1"]);
    REQUIRE(child);
    CHECK(child.get() == l1->norm1.get());
    CHECK(peft::count_parameters(*bert).trainable == 0);
  }
}

TEST_CASE("Bert at identity equals the stock modules, with padding and token types", "[bert]") {
  for (std::string type : {"bert", "roberta"}) {
    TempDir dir;
    write_folder(dir.path, tiny_config(type), tiny_weights(type == "bert" ? "bert." : "roberta."));
    auto bert = peft::models::Bert::from_pretrained(dir.path);
    bert->eval();
    const int pad = type == "bert" ? 0 : 1;
    auto ids =
        torch::tensor({5, 6, 7, 8, 9, 10, 2, 3, 4, pad, pad, pad}, torch::kLong).view({2, 6});
    auto mask = ids.ne(pad).to(torch::kLong);
    auto types = torch::tensor({0, 0, 0, 1, 1, 1, 0, 0, 1, 0, 0, 0}, torch::kLong).view({2, 6});
    // Hand-computed: BERT counts from 0; RoBERTa from pad + 1, pads keep position pad.
    auto positions = type == "bert"
                         ? torch::arange(6).repeat({2, 1})
                         : torch::tensor({2, 3, 4, 5, 6, 7, 2, 3, 4, 1, 1, 1}).view({2, 6});
    torch::NoGradGuard no_grad;
    auto ours = bert(ids, mask, types);
    auto expected = stock_bert(*bert, ids, mask, types, positions);
    CHECK(ours.sizes() == torch::IntArrayRef{2, 6, kH});
    CHECK((ours - expected).abs().max().item<double>() <= 1e-5);
    // Without a mask every position is a token; without token types all are type 0.
    auto plain = bert(ids);
    auto plain_expected = stock_bert(*bert, ids, torch::ones_like(ids), torch::zeros_like(ids),
                                     type == "bert" ? torch::arange(6).repeat({2, 1}) : positions);
    CHECK((plain - plain_expected).abs().max().item<double>() <= 1e-5);
  }
}

TEST_CASE("Bert's sites: LoRA by Hugging Face names, one prompt site", "[bert]") {
  TempDir dir;
  write_folder(dir.path, tiny_config(), tiny_weights());
  auto bert = peft::models::Bert::from_pretrained(dir.path);
  auto paths = peft::attach(*bert, peft::LoRAOptions(8).targets({"query", "value"}));
  CHECK(paths.size() == 2 * kLayers);
  CHECK(paths[0] == "encoder.layers.0.self_attn.query");
  CHECK(paths[1] == "encoder.layers.0.self_attn.value");
  auto prompt_paths = peft::attach(*bert, peft::PromptOptions(3));
  CHECK(prompt_paths == std::vector<std::string>{"prompt"});
  // Only the new parameters train: 2 sites x (A [8, 8] + B [8, 8]) per layer, and 3 prompt rows.
  CHECK(peft::count_parameters(*bert).trainable == 2 * kLayers * 2 * 8 * kH + 3 * kH);
}

TEST_CASE("Bert's prompt rows act like extra word embeddings in front", "[bert]") {
  TempDir dir;
  write_folder(dir.path, tiny_config(), tiny_weights());
  auto bert = peft::models::Bert::from_pretrained(dir.path);
  bert->eval();
  const std::vector<int64_t> prompt_ids = {11, 12, 13};
  peft::attach(*bert, peft::PromptOptions(3).init(peft::PromptInit::Tokens).token_ids(prompt_ids));
  auto ids = torch::tensor({5, 6, 7, 8, 2, 3, 0, 0}, torch::kLong).view({2, 4});
  auto mask = ids.ne(0).to(torch::kLong);
  auto types = torch::tensor({0, 0, 1, 1, 0, 1, 0, 0}, torch::kLong).view({2, 4});
  torch::NoGradGuard no_grad;
  auto ours = bert(ids, mask, types);
  CHECK(bert->prompt_length() == 3);
  CHECK(ours.sizes() == torch::IntArrayRef{2, 7, kH});
  // The same model without the prompt, given the prompt's tokens as ordinary ids of type 0.
  auto front = torch::tensor(prompt_ids, torch::kLong).repeat({2, 1});
  auto longer_ids = torch::cat({front, ids}, 1);
  auto longer_mask = torch::cat({torch::ones({2, 3}, torch::kLong), mask}, 1);
  auto longer_types = torch::cat({torch::zeros({2, 3}, torch::kLong), types}, 1);
  torch::Tensor expected;
  {
    peft::AdaptersDisabled off(*bert);
    CHECK(bert->prompt_length() == 0);
    expected = bert(longer_ids, longer_mask, longer_types);
  }
  CHECK((ours - expected).abs().max().item<double>() <= 1e-5);
}

TEST_CASE("BertForSequenceClassification: trainable head on the pooled output", "[bert]") {
  TempDir dir;
  write_folder(dir.path, tiny_config(), tiny_weights());
  auto model = peft::models::BertForSequenceClassification::from_pretrained(dir.path, 3);
  model->eval();
  auto ids = torch::tensor({5, 6, 7, 2, 3, 0}, torch::kLong).view({2, 3});
  auto mask = ids.ne(0).to(torch::kLong);
  torch::NoGradGuard no_grad;
  auto logits = model(ids, mask);
  CHECK(logits.sizes() == torch::IntArrayRef{2, 3});
  auto hidden = model->bert(ids, mask);
  auto pooled = torch::tanh(torch::matmul(hidden.select(1, 0), model->bert->pooler->weight.t()) +
                            model->bert->pooler->bias);
  auto expected = torch::matmul(pooled, model->classifier->weight.t()) + model->classifier->bias;
  CHECK((logits - expected).abs().max().item<double>() <= 1e-6);
  auto trainable = peft::named_trainable_parameters(*model);
  REQUIRE(trainable.size() == 2);
  CHECK(trainable[0].first == "classifier.weight");
  CHECK(trainable[1].first == "classifier.bias");
  CHECK_THAT(error_of([&] { peft::models::BertForSequenceClassification(model->bert, 0); }),
             Catch::Contains("num_labels must be positive"));
}

TEST_CASE("BertForSequenceClassification: last layer for CLS alone, same logits and gradients",
          "[bert]") {
  TempDir dir;
  write_folder(dir.path, tiny_config(), tiny_weights());
  for (bool prompt : {false, true}) {
    INFO("prompt " << prompt);
    torch::manual_seed(5);
    auto model = peft::models::BertForSequenceClassification::from_pretrained(dir.path, 3);
    model->eval();
    peft::attach(*model, peft::LoRAOptions(4).targets({"query", "value"}));
    if (prompt) peft::attach(*model, peft::PromptOptions(2));
    {
      // LoRA's B starts at zero; random values make every trainable tensor matter.
      torch::NoGradGuard no_grad;
      for (auto& p : peft::trainable_parameters(*model)) p.copy_(torch::randn_like(p) * 0.3);
    }
    auto ids = torch::tensor({5, 6, 7, 8, 2, 3, 0, 0}, torch::kLong).view({2, 4});
    auto mask = ids.ne(0).to(torch::kLong);
    auto labels = torch::tensor({2, 0}, torch::kLong);
    auto run = [&](bool cls_only) {
      model->cls_only_last_layer = cls_only;
      for (auto& p : peft::trainable_parameters(*model)) p.mutable_grad() = torch::Tensor();
      auto logits = model(ids, mask);
      torch::nn::functional::cross_entropy(logits, labels).backward();
      std::vector<torch::Tensor> out{logits.detach()};
      for (auto& p : peft::trainable_parameters(*model)) out.push_back(p.grad().clone());
      return out;
    };
    CHECK(model->cls_only_last_layer);  // the default
    auto full = run(false), cls_only = run(true);
    REQUIRE(full.size() == cls_only.size());
    double largest = 0.0;
    for (size_t i = 0; i < full.size(); ++i) {
      INFO("tensor " << i);
      const double scale = full[i].abs().max().item<double>();
      CHECK(scale > 0.0);  // every tensor gets a gradient
      CHECK((full[i] - cls_only[i]).abs().max().item<double>() <= 1e-5);
      largest = std::max(largest, scale);
    }
    CHECK(largest > 1e-2);  // not a comparison of near-zeros
    // Bert::forward_first's row is the full forward's first position.
    torch::NoGradGuard no_grad;
    auto hidden = model->bert(ids, mask);
    auto first = model->bert->forward_first(ids, 1, mask);
    CHECK(first.sizes() == torch::IntArrayRef{2, 1, kH});
    CHECK((first.select(1, 0) - hidden.select(1, 0)).abs().max().item<double>() <= 1e-5);
  }
}

TEST_CASE(
    "BertForSequenceClassification under bf16 autocast: logits and LoRA gradients near float32",
    "[bert]") {
  TempDir dir;
  // Fixed weights: torch's default generator starts from a random seed in every process, and the
  // bounds below hold for these weights. Over fifteen random draws the hidden states' error was
  // 0.3-0.7 % of their size, once 2.4 % (a LayerNorm dividing by a small spread enlarges the
  // rounding of its input), which a fixed 2 % bound cannot promise for every draw.
  torch::manual_seed(1);
  write_folder(dir.path, tiny_config(), tiny_weights());
  for (auto pooling : {peft::models::Pooling::Cls, peft::models::Pooling::Mean}) {
    INFO("pooling " << peft::models::to_string(pooling));
    torch::manual_seed(6);
    auto model = peft::models::BertForSequenceClassification::from_pretrained(dir.path, 3, pooling);
    model->eval();
    peft::attach(*model, peft::LoRAOptions(4).targets({"query", "value"}));
    peft::attach(*model, peft::PromptOptions(2));
    {
      torch::NoGradGuard no_grad;
      for (auto& p : peft::trainable_parameters(*model)) p.copy_(torch::randn_like(p) * 0.3);
    }
    auto ids = torch::tensor({5, 6, 7, 8, 2, 3, 0, 0}, torch::kLong).view({2, 4});
    auto mask = ids.ne(0).to(torch::kLong);
    auto labels = torch::tensor({2, 0}, torch::kLong);
    auto run = [&](peft::Precision precision) {
      for (auto& p : peft::trainable_parameters(*model)) p.mutable_grad() = torch::Tensor();
      torch::Tensor logits, loss;
      {
        peft::AutocastGuard autocast(torch::kCPU, precision);
        logits = model(ids, mask);
        loss = torch::nn::functional::cross_entropy(logits, labels);
      }
      loss.backward();  // outside autocast, as with torch.autocast
      torch::Tensor hidden;
      {
        torch::NoGradGuard no_grad;
        peft::AutocastGuard autocast(torch::kCPU, precision);
        hidden = model->bert(ids, mask);
      }
      std::vector<torch::Tensor> out{logits.detach().to(torch::kFloat), hidden.to(torch::kFloat)};
      for (auto& p : peft::trainable_parameters(*model)) {
        CHECK(p.grad().scalar_type() == torch::kFloat);
        out.push_back(p.grad().clone());
      }
      return std::make_pair(logits.scalar_type(), out);
    };
    const auto [dtype32, fp32] = run(peft::Precision::fp32);
    const auto [dtype16, bf16] = run(peft::Precision::bf16);
    CHECK(dtype32 == torch::kFloat);
    CHECK(dtype16 == torch::kBFloat16);  // the head's product ran in bfloat16
    REQUIRE(fp32.size() == bf16.size());
    CHECK_FALSE(torch::equal(fp32[0], bf16[0]));
    // bfloat16 keeps 8 significant bits: a rounded value is off by up to 2^-9 of its size, so an
    // error is bounded by the size of what was summed, not by the size of the result (which
    // cancellation can make small). The last hidden states come out of a LayerNorm and are
    // compared with their own size; a logit with the largest sum of |weight| x |input| of the
    // head (its input: tanh, |.| <= 1, or a mean of hidden states); each gradient with the
    // largest gradient entry of the model (the backward pass carries the rounding as absolute
    // noise of the size of the gradients flowing through; some tensors' gradients here are
    // 1e-7, below that noise).
    const double h_scale = fp32[1].abs().max().item<double>();
    CHECK((fp32[1] - bf16[1]).abs().max().item<double>() <= 0.02 * h_scale);
    const auto& head = model->classifier;
    const double logit_scale =
        (head->weight.abs().sum(1) * std::max(1.0, h_scale) + head->bias.abs())
            .max()
            .item<double>();
    INFO("largest logit " << fp32[0].abs().max().item<double>() << ", bound scale " << logit_scale);
    CHECK((fp32[0] - bf16[0]).abs().max().item<double>() <= 0.02 * logit_scale);
    double grad_scale = 0.0, diff_sq = 0.0, norm_sq = 0.0;
    for (size_t i = 2; i < fp32.size(); ++i) {
      grad_scale = std::max(grad_scale, fp32[i].abs().max().item<double>());
      diff_sq += (fp32[i] - bf16[i]).pow(2).sum().item<double>();
      norm_sq += fp32[i].pow(2).sum().item<double>();
    }
    CHECK(grad_scale > 1e-2);
    for (size_t i = 2; i < fp32.size(); ++i) {
      INFO("gradient " << i - 1);
      CHECK((fp32[i] - bf16[i]).abs().max().item<double>() <= 0.02 * grad_scale);
    }
    CHECK(std::sqrt(diff_sq / norm_sq) <= 0.02);  // all gradients as one vector
  }
}

TEST_CASE("BertForSequenceClassification with mean pooling averages the real tokens only",
          "[bert]") {
  TempDir dir;
  write_folder(dir.path, tiny_config(), tiny_weights());
  using peft::models::Pooling;
  auto model =
      peft::models::BertForSequenceClassification::from_pretrained(dir.path, 2, Pooling::Mean);
  model->eval();
  CHECK(model->pooling == Pooling::Mean);
  auto ids = torch::tensor({5, 6, 7, 2, 3, 0}, torch::kLong).view({2, 3});
  auto mask = ids.ne(0).to(torch::kLong);
  torch::NoGradGuard no_grad;
  auto logits = model(ids, mask);
  auto hidden = model->bert(ids, mask);
  // Hand-written: the first sentence averages 3 states, the second its 2 real ones.
  auto first = (hidden[0][0] + hidden[0][1] + hidden[0][2]) / 3.0;
  auto second = (hidden[1][0] + hidden[1][1]) / 2.0;
  auto pooled = torch::stack({first, second});
  auto expected = torch::matmul(pooled, model->classifier->weight.t()) + model->classifier->bias;
  CHECK((logits - expected).abs().max().item<double>() <= 1e-6);
  // Padding does not change a sentence's logits: the second sentence alone, unpadded.
  auto alone = model(ids.slice(0, 1, 2).slice(1, 0, 2), mask.slice(0, 1, 2).slice(1, 0, 2));
  CHECK((alone - logits.slice(0, 1, 2)).abs().max().item<double>() <= 1e-5);
  // Names parse both ways; an unknown one is an error naming the accepted ones.
  CHECK(peft::models::pooling_from_string("mean") == Pooling::Mean);
  CHECK(std::string(peft::models::to_string(Pooling::Cls)) == "cls");
  CHECK_THAT(error_of([] { peft::models::pooling_from_string("max"); }),
             Catch::Contains("unknown pooling \"max\" (expected \"cls\" or \"mean\")"));
  // Prompt rows in front count as tokens: the mask is widened, not misaligned.
  auto wide = torch::randn({2, 5, kH});
  auto m = peft::models::masked_mean(wide, mask);
  CHECK((m[1] - wide[1].slice(0, 0, 4).mean(0)).abs().max().item<double>() <= 1e-6);
  CHECK_THAT(error_of([&] {
               peft::models::masked_mean(torch::randn({2, 2, kH}), mask);
             }),
             Catch::Contains("does not fit hidden states"));
}

TEST_CASE("default_model_dir: explicit path, PEFT_MODEL_DIR, clear errors", "[bert]") {
  TempDir dir;
  CHECK_THAT(error_of([&] { examples::default_model_dir(dir.path); }),
             Catch::Contains("is not a model folder"));
  std::ofstream(dir.path / "config.json") << tiny_config().dump();
  CHECK(examples::default_model_dir(dir.path) == dir.path);
  const char* old = std::getenv("PEFT_MODEL_DIR");
  const std::string saved = old ? old : "";
  ::setenv("PEFT_MODEL_DIR", dir.path.c_str(), 1);
  CHECK(examples::default_model_dir() == dir.path);
  ::setenv("PEFT_MODEL_DIR", (dir.path / "missing").c_str(), 1);
  CHECK_THAT(error_of([&] { examples::default_model_dir(); }), Catch::Contains("PEFT_MODEL_DIR="));
  if (old) {
    ::setenv("PEFT_MODEL_DIR", saved.c_str(), 1);
  } else {
    ::unsetenv("PEFT_MODEL_DIR");
  }
  // Names: "e5" is the converted multilingual-e5-small in $PEFT_E5_DIR; unknown names say which
  // names exist.
  const char* old_e5 = std::getenv("PEFT_E5_DIR");
  const std::string saved_e5 = old_e5 ? old_e5 : "";
  ::setenv("PEFT_E5_DIR", dir.path.c_str(), 1);
  CHECK(examples::default_model_dir("e5") == dir.path);
  CHECK(examples::default_model_dir("", "multilingual-e5-small") == dir.path);
  ::setenv("PEFT_E5_DIR", (dir.path / "missing").c_str(), 1);
  CHECK_THAT(error_of([&] { examples::default_model_dir("e5"); }),
             Catch::Contains("convert_e5.py"));
  CHECK_THAT(error_of([&] { examples::default_model_dir("bert-base-chinese"); }),
             Catch::Contains("nor a model name (minilm"));
  if (old_e5) {
    ::setenv("PEFT_E5_DIR", saved_e5.c_str(), 1);
  } else {
    ::unsetenv("PEFT_E5_DIR");
  }
}

TEST_CASE("Bert drops out where Hugging Face's BERT does, with the config's two rates", "[bert]") {
  TempDir dir;
  auto config = tiny_config();
  config["hidden_dropout_prob"] = 0.3;
  config["attention_probs_dropout_prob"] = 0.2;
  config["classifier_dropout"] = 0.05;
  write_folder(dir.path, config, tiny_weights());
  auto model = peft::models::BertForSequenceClassification::from_pretrained(dir.path, 2);
  auto& bert = *model->bert;
  CHECK(bert.embeddings_dropout->options.p() == 0.3);
  for (size_t i = 0; i < bert.encoder->layers->size(); ++i) {
    auto layer = bert.encoder_layer(i);
    CHECK(layer->dropout1->options.p() == 0.3);
    CHECK(layer->dropout2->options.p() == 0.3);
    CHECK(layer->self_attn->options.dropout() == 0.2);
    // The stock layer's dropout between the FFN's activation and its second Linear: BERT has none.
    CHECK(layer->dropout->options.p() == 0.0);
  }
  CHECK(model->dropout->options.p() == 0.05);
  config.erase("classifier_dropout");
  CHECK(peft::models::BertConfig::from_json(config).head_dropout() == 0.3);

  auto ids = torch::tensor({5, 6, 7, 2, 3, 0}, torch::kLong).view({2, 3});
  auto mask = ids.ne(0).to(torch::kLong);
  torch::NoGradGuard no_grad;
  model->eval();
  const auto reference = model->bert(ids, mask);
  // With both rates at 0 nothing is dropped in training mode: no third dropout inside the FFN
  // (the stock layer would draw one at the config's 0.3).
  bert.set_dropout(0.0, 0.0);
  model->train();
  CHECK(torch::equal(model->bert(ids, mask), reference));
  CHECK(bert.config().hidden_dropout_prob == 0.0);
  // Each rate acts on its own: attention dropout alone changes the training output.
  bert.set_dropout(0.0, 0.5);
  torch::manual_seed(3);
  CHECK_FALSE(torch::allclose(model->bert(ids, mask), reference));
  CHECK_THAT(error_of([&] { bert.set_dropout(1.0, 0.0); }),
             Catch::Contains("dropout probabilities must be in [0, 1)"));
}

namespace {
// Every name of E parses back to the value it names, and the names are distinct.
template <class E>
void check_round_trip(const std::vector<std::string>& expected) {
  CHECK(peft::enum_names<E>() == expected);
  for (const auto& name : expected) CHECK(peft::enum_name(peft::enum_from_name<E>(name)) == name);
}
}  // namespace

TEST_CASE("Enum names: one table per enum gives names, parsing and errors", "[bert][enum]") {
  // The names files and command lines have always used.
  check_round_trip<peft::SiteKind>({"linear", "embedding", "block", "attention", "input"});
  check_round_trip<peft::AdapterKind>({"houlsby", "pfeiffer", "parallel"});
  check_round_trip<peft::ProPETLBase>({"adapter", "lora", "prefix"});
  check_round_trip<peft::LadderBlock>({"transformer_encoder_layer", "t5", "llama"});
  check_round_trip<peft::LadderInit>({"pruned", "random"});
  check_round_trip<peft::PromptEncoderType>({"mlp", "lstm"});
  check_round_trip<peft::models::Pooling>({"cls", "mean"});
  check_round_trip<peft::models::ExitPolicy>({"none", "entropy", "patience", "learned"});
  check_round_trip<peft::Schedule>({"constant", "linear", "cosine"});
  // Extra spellings parse but are not names: a value is always written the same way.
  check_round_trip<peft::Precision>({"fp32", "bf16", "fp16"});
  CHECK(peft::enum_from_name<peft::Precision>("bfloat16") == peft::Precision::bf16);
  CHECK(peft::enum_from_name<peft::Precision>("half") == peft::Precision::fp16);
  CHECK(std::string(peft::enum_name(peft::Precision::fp16)) == "fp16");
  CHECK(peft::precision_name(peft::Precision::bf16) == "bf16");
  // The error names the component, the context, the value and every accepted name.
  CHECK_THAT(error_of([] { peft::enum_from_name<peft::Precision>("int8", "run.json"); }),
             Catch::Equals("[peft::precision] run.json: unknown precision \"int8\" (expected "
                           "\"fp32\", \"bf16\" or \"fp16\")"));
  CHECK_THAT(error_of([] { peft::enum_from_name<peft::AdapterKind>("Houlsby"); }),
             Catch::Equals("[peft::load_adapter] unknown adapter_kind \"Houlsby\" (expected "
                           "\"houlsby\", \"pfeiffer\" or \"parallel\")"));
  // A value outside the table (a cast) has no name rather than a wrong one.
  CHECK(std::string(peft::enum_name(static_cast<peft::SiteKind>(99))) == "?");
}
