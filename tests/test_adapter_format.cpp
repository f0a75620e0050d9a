#include <peft/core/attach.hpp>
#include <peft/io/adapter_format.hpp>
#include <peft/io/safetensors.hpp>
#include <peft/models/bert.hpp>
#include <peft/methods/ptuning.hpp>
#include <peft/models/heads.hpp>

#include <catch2/catch.hpp>
#include <torch/torch.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <string>

#include <nlohmann/json.hpp>

namespace fs = std::filesystem;
using peft::models::BertForSequenceClassification;

namespace {

constexpr int64_t kH = 8, kLayers = 2;

// The same random base every call (same seed), with a head of 3 labels.
BertForSequenceClassification tiny_model() {
  peft::models::BertConfig c;
  c.hidden_size = kH;
  c.num_hidden_layers = kLayers;
  c.num_attention_heads = 2;
  c.intermediate_size = 16;
  c.vocab_size = 30;
  c.max_position_embeddings = 32;
  c.name_or_path = "tiny-bert";
  torch::manual_seed(7);
  auto model = BertForSequenceClassification(peft::models::Bert(c), 3);
  model->eval();
  return model;
}

struct TempDir {
  fs::path path;
  TempDir() {
    static int counter = 0;
    path = fs::temp_directory_path() /
           ("peft_adapter_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    fs::remove_all(path);
  }
  ~TempDir() { fs::remove_all(path); }
};

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const peft::Error& e) {
    return e.what();
  }
  return "(no peft::Error)";
}

torch::Tensor logits(BertForSequenceClassification& model) {
  auto ids = torch::tensor({5, 6, 7, 8, 9, 2, 3, 4, 0, 0}, torch::kLong).view({2, 5});
  auto types = torch::tensor({0, 0, 0, 1, 1, 0, 0, 1, 0, 0}, torch::kLong).view({2, 5});
  torch::NoGradGuard no_grad;
  return model(ids, ids.ne(0).to(torch::kLong), types);
}

// Makes every trained tensor non-trivial, as training would, so identity cannot pass.
void randomize(torch::nn::Module& model) {
  torch::NoGradGuard no_grad;
  for (auto& p : peft::trainable_parameters(model)) p.normal_(0.0, 0.3);
}

// Saves the model's adapter, loads it into a fresh copy of the base and compares bit for bit.
// `same_trainable`: false where saving folds a reparameterisation (fewer tensors train after).
void check_round_trip(BertForSequenceClassification& model, const fs::path& dir,
                      bool same_trainable = true) {
  randomize(*model);
  const auto expected = logits(model);
  peft::save_adapter(*model, dir);
  auto fresh = tiny_model();
  CHECK_FALSE(torch::equal(logits(fresh), expected));
  peft::load_adapter(*fresh, dir);
  CHECK(torch::equal(logits(fresh), expected));
  // What trains after loading is what trained before.
  if (same_trainable) {
    CHECK(peft::count_parameters(*fresh).trainable == peft::count_parameters(*model).trainable);
  }
}

nlohmann::json read_config(const fs::path& dir) {
  std::ifstream in(dir / "adapter_config.json");
  return nlohmann::json::parse(in);
}

}  // namespace

TEST_CASE("LoRA adapters are written with Hugging Face PEFT's keys and config",
          "[adapter-format]") {
  TempDir dir;
  auto model = tiny_model();
  peft::attach(*model, peft::LoRAOptions(4).alpha(8).targets({"query", "value"}));
  peft::save_adapter(*model, dir.path);
  peft::io::SafetensorsFile file(dir.path / "adapter_model.safetensors");
  CHECK(file.size() == 2 * kLayers * 2 + 2);
  CHECK(file.shape("base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight") ==
        std::vector<int64_t>{4, kH});
  CHECK(file.shape("base_model.model.bert.encoder.layer.1.attention.self.value.lora_B.weight") ==
        std::vector<int64_t>{kH, 4});
  CHECK(file.shape("base_model.model.classifier.weight") == std::vector<int64_t>{3, kH});
  CHECK(file.contains("base_model.model.classifier.bias"));
  auto config = read_config(dir.path);
  CHECK(config["peft_type"] == "LORA");
  CHECK(config["task_type"] == "SEQ_CLS");
  CHECK(config["r"] == 4);
  CHECK(config["lora_alpha"] == 8);
  CHECK(config["use_rslora"] == false);
  CHECK(config["modules_to_save"] == nlohmann::json({"classifier"}));
  CHECK(config["base_model_name_or_path"] == "tiny-bert");
  CHECK(config["target_modules"][0] == "bert.encoder.layer.0.attention.self.query");
}

TEST_CASE("Adapter files round-trip bit for bit", "[adapter-format]") {
  TempDir dir;
  SECTION("LoRA on every projection") {
    auto model = tiny_model();
    peft::attach(*model, peft::LoRAOptions(2).alpha(6).rslora(true).targets(
                             {"query", "key", "value", "out_proj", "linear1", "linear2"}));
    check_round_trip(model, dir.path);
  }
  SECTION("prompt tuning") {
    auto model = tiny_model();
    peft::attach(*model, peft::PromptOptions(3));
    check_round_trip(model, dir.path);
    CHECK(read_config(dir.path)["peft_type"] == "PROMPT_TUNING");
    peft::io::SafetensorsFile file(dir.path / "adapter_model.safetensors");
    CHECK(file.shape("prompt_embeddings") == std::vector<int64_t>{3, kH});
    CHECK(file.contains("base_model.classifier.weight"));
  }
  SECTION("prefix tuning") {
    auto model = tiny_model();
    peft::attach(*model, peft::PrefixOptions(4));
    check_round_trip(model, dir.path);
    peft::io::SafetensorsFile file(dir.path / "adapter_model.safetensors");
    CHECK(file.shape("prompt_embeddings") == std::vector<int64_t>{4, kLayers * 2 * kH});
  }
  SECTION("prefix tuning through its projection: the rows it produces are saved") {
    auto model = tiny_model();
    peft::attach(*model, peft::PrefixOptions(4).projection(true).projection_hidden(5));
    check_round_trip(model, dir.path, /*same_trainable=*/false);
    // Loaded as plain rows: 4 key and 4 value rows per layer, plus the head.
    auto fresh = tiny_model();
    peft::load_adapter(*fresh, dir.path);
    CHECK(peft::count_parameters(*fresh).trainable == kLayers * 2 * 4 * kH + 3 * kH + 3);
  }
  SECTION("P-tuning: the rows its encoder produces are saved as prompt tuning") {
    auto model = tiny_model();
    peft::attach(*model, peft::PTuningOptions(3).encoder_hidden_size(5));
    check_round_trip(model, dir.path, /*same_trainable=*/false);
    CHECK(read_config(dir.path)["peft_type"] == "PROMPT_TUNING");
    peft::io::SafetensorsFile file(dir.path / "adapter_model.safetensors");
    CHECK(file.shape("prompt_embeddings") == std::vector<int64_t>{3, kH});
    // Loaded as 3 plain rows plus the head.
    auto fresh = tiny_model();
    peft::load_adapter(*fresh, dir.path);
    CHECK(peft::count_parameters(*fresh).trainable == 3 * kH + 3 * kH + 3);
  }
  SECTION("bottleneck adapters") {
    auto model = tiny_model();
    peft::attach(*model, peft::AdapterOptions(peft::AdapterKind::Parallel)
                             .bottleneck(3)
                             .activation("gelu")
                             .scaling(2.0));
    check_round_trip(model, dir.path);
    CHECK(read_config(dir.path)["peft_type"] == "BOTTLENECK_ADAPTER");
  }
  SECTION("BitFit with LayerNorms") {
    auto model = tiny_model();
    peft::attach(*model, peft::BitFitOptions().layer_norm(true).layers({1}));
    check_round_trip(model, dir.path);
    auto config = read_config(dir.path);
    CHECK(config["peft_type"] == "BITFIT");
    CHECK(config["layer_norm_modules"].size() == 3);  // embeddings, layer 1's norm1 and norm2
  }
}

TEST_CASE("Prefix rows use PEFT's layout: per layer, keys then values", "[adapter-format]") {
  TempDir dir;
  auto model = tiny_model();
  peft::attach(*model, peft::PrefixOptions(2));
  randomize(*model);
  peft::save_adapter(*model, dir.path);
  auto rows =
      peft::io::SafetensorsFile(dir.path / "adapter_model.safetensors").tensor("prompt_embeddings");
  auto methods = peft::attached_methods(*model);
  REQUIRE(methods.size() == kLayers);
  auto layer1 = std::dynamic_pointer_cast<peft::PrefixImpl>(methods[1].second);
  CHECK(methods[1].first == "bert.encoder.layers.1.self_attn.prefix");
  CHECK(torch::equal(rows.narrow(1, 2 * kH, kH), layer1->prefix_keys));
  CHECK(torch::equal(rows.narrow(1, 3 * kH, kH), layer1->prefix_values));
}

TEST_CASE("A bad adapter file is refused before the model changes", "[adapter-format]") {
  TempDir dir;
  auto model = tiny_model();
  peft::attach(*model, peft::LoRAOptions(4).targets({"query", "value"}));
  randomize(*model);
  peft::save_adapter(*model, dir.path);
  const auto weights = dir.path / "adapter_model.safetensors";
  auto tensors = peft::io::load_safetensors(weights);

  auto fresh = tiny_model();
  const auto before = logits(fresh);
  auto rewrite = [&](std::function<void(std::vector<std::pair<std::string, torch::Tensor>>&)> f) {
    auto copy = tensors;
    f(copy);
    peft::io::save_safetensors(weights, copy);
  };
  auto unchanged = [&] {
    CHECK(peft::adapter_names(*fresh).empty());
    CHECK(torch::equal(logits(fresh), before));
  };

  const std::string key =
      "base_model.model.bert.encoder.layer.1.attention.self.value.lora_B.weight";
  rewrite([&](auto& list) {
    for (auto& [name, t] : list) {
      if (name == key) t = torch::zeros({kH, 5});
    }
  });
  CHECK_THAT(error_of([&] { peft::load_adapter(*fresh, dir.path); }),
             Catch::Contains("\"" + key + "\" has shape [8, 5], expected [8, 4]"));
  unchanged();

  rewrite([&](auto& list) {
    list.erase(std::remove_if(list.begin(), list.end(), [&](auto& e) { return e.first == key; }),
               list.end());
  });
  CHECK_THAT(error_of([&] { peft::load_adapter(*fresh, dir.path); }),
             Catch::Contains("missing key \"" + key + "\" (expected shape [8, 4])"));
  unchanged();

  rewrite(
      [&](auto& list) { list.emplace_back("base_model.model.extra.weight", torch::zeros({2})); });
  CHECK_THAT(error_of([&] { peft::load_adapter(*fresh, dir.path); }),
             Catch::Contains("unexpected key \"base_model.model.extra.weight\" (shape [2])"));
  unchanged();

  rewrite([&](auto& list) {
    list.emplace_back("base_model.model.bert.pooler.dense.lora_A.weight", torch::zeros({4, kH}));
  });
  CHECK_THAT(error_of([&] { peft::load_adapter(*fresh, dir.path); }),
             Catch::Contains("names module \"bert.pooler.dense\""));
  unchanged();

  rewrite([&](auto& list) {
    for (auto& [name, t] : list) {
      if (name == "base_model.model.classifier.weight") t = torch::zeros({2, kH});
    }
  });
  CHECK_THAT(error_of([&] { peft::load_adapter(*fresh, dir.path); }),
             Catch::Contains("\"base_model.model.classifier.weight\" has shape [2, 8], expected "
                             "[3, 8]"));
  unchanged();

  rewrite([](auto&) {});
  auto config = read_config(dir.path);
  config["use_dora"] = true;
  std::ofstream(dir.path / "adapter_config.json") << config.dump();
  CHECK_THAT(error_of([&] { peft::load_adapter(*fresh, dir.path); }), Catch::Contains("DoRA"));
  unchanged();
  config["use_dora"] = false;
  config["peft_type"] = "IA3";
  std::ofstream(dir.path / "adapter_config.json") << config.dump();
  CHECK_THAT(error_of([&] { peft::load_adapter(*fresh, dir.path); }),
             Catch::Contains("peft_type \"IA3\" is not supported"));
  unchanged();

  CHECK_THAT(error_of([&] { peft::load_adapter(*fresh, dir.path / "nope"); }),
             Catch::Contains("does not exist"));
  // Loading the same adapter twice is refused too, and the first load stays intact.
  config["peft_type"] = "LORA";
  std::ofstream(dir.path / "adapter_config.json") << config.dump();
  peft::load_adapter(*fresh, dir.path);
  const auto loaded = logits(fresh);
  CHECK(torch::equal(loaded, logits(model)));
  CHECK_THAT(error_of([&] { peft::load_adapter(*fresh, dir.path); }),
             Catch::Contains("already attached"));
  CHECK(torch::equal(logits(fresh), loaded));
}

TEST_CASE("save_adapter refuses what its format cannot hold", "[adapter-format]") {
  TempDir dir;
  auto model = tiny_model();
  CHECK_THAT(error_of([&] { peft::save_adapter(*model, dir.path); }),
             Catch::Contains("no adapter named \"default\""));
  peft::attach(*model, peft::LoRAOptions(4));
  peft::attach(*model, peft::PrefixOptions(2));
  CHECK_THAT(error_of([&] { peft::save_adapter(*model, dir.path); }),
             Catch::Contains("combines lora and prefix"));
  peft::attach(*model, peft::PrefixOptions(2).layers({0}).adapter_name("half"));
  CHECK_THAT(error_of([&] {
               peft::save_adapter(*model, dir.path,
                                  peft::SaveAdapterOptions().adapter_name("half"));
             }),
             Catch::Contains("needs every layer"));
  CHECK_FALSE(fs::exists(dir.path / "adapter_config.json"));
}
