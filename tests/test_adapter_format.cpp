#include <peft/core/attach.hpp>
#include <peft/methods/adapter.hpp>
#include <peft/methods/bitfit.hpp>
#include <peft/methods/dora.hpp>
#include <peft/methods/lora.hpp>
#include <peft/methods/prefix.hpp>
#include <peft/methods/prompt.hpp>
#include <peft/io/adapter_format.hpp>
#include <peft/io/safetensors.hpp>
#include <peft/methods/compacter.hpp>
#include <peft/methods/fusion.hpp>
#include <peft/methods/propetl.hpp>
#include <peft/methods/ptuning.hpp>
#include <peft/models/bert.hpp>
#include <peft/models/heads.hpp>
#include <peft/models/ladder_heads.hpp>

#include "model_helpers.hpp"

#include <catch2/catch.hpp>
#include <torch/torch.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <string>

#include <nlohmann/json.hpp>

namespace fs = std::filesystem;
using peft::models::BertForSequenceClassification;
using peft::models::BertLadderForSequenceClassification;

namespace {

constexpr int64_t kH = 8, kLayers = 2;

peft::models::BertConfig tiny_config() {
  return testing::tiny_bert_config(kLayers);
}

// The same random base every call (same seed), with a head of 3 labels.
BertForSequenceClassification tiny_model() {
  torch::manual_seed(7);
  auto model = BertForSequenceClassification(peft::models::Bert(tiny_config()), 3);
  model->eval();
  return model;
}

// The same backbone as tiny_model() with a ladder side network and a head of 3 labels.
BertLadderForSequenceClassification tiny_ladder(const peft::LadderOptions& options) {
  torch::manual_seed(7);
  auto model = BertLadderForSequenceClassification(peft::models::Bert(tiny_config()), 3, options);
  model->eval();
  return model;
}

struct TempDir : testing::TempDir {
  TempDir() : testing::TempDir("peft_adapter") {}
};

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const peft::Error& e) {
    return e.what();
  }
  return "(no peft::Error)";
}

template <class Model>
torch::Tensor logits(Model& model) {
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

void write_config(const fs::path& dir, const nlohmann::json& config) {
  std::ofstream(dir / "adapter_config.json") << config.dump();
}

using TensorList = std::vector<std::pair<std::string, torch::Tensor>>;

// Writes `tensors` changed by `f` as the folder's weights.
void rewrite_weights(const fs::path& dir, const TensorList& tensors,
                     const std::function<void(TensorList&)>& f) {
  auto copy = tensors;
  f(copy);
  peft::io::save_safetensors(dir / "adapter_model.safetensors", copy);
}

void replace_tensor(TensorList& list, const std::string& key, const torch::Tensor& value) {
  bool found = false;
  for (auto& [name, t] : list) {
    if (name == key) {
      t = value;
      found = true;
    }
  }
  REQUIRE(found);
}

void erase_tensor(TensorList& list, const std::string& key) {
  const auto size = list.size();
  list.erase(std::remove_if(list.begin(), list.end(), [&](auto& e) { return e.first == key; }),
             list.end());
  REQUIRE(list.size() + 1 == size);
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
  // use_dora makes it a DoRA file, which needs a magnitude per projection.
  CHECK_THAT(error_of([&] { peft::load_adapter(*fresh, dir.path); }),
             Catch::Contains("missing key") && Catch::Contains("lora_magnitude_vector"));
  unchanged();
  config["use_dora"] = false;
  config["peft_type"] = "VERA";
  std::ofstream(dir.path / "adapter_config.json") << config.dump();
  CHECK_THAT(error_of([&] { peft::load_adapter(*fresh, dir.path); }),
             Catch::Contains("peft_type \"VERA\" is not supported"));
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

TEST_CASE("Which methods have a file format", "[adapter-format]") {
  for (const char* method : {"lora", "prompt", "ptuning", "prefix", "adapter", "bitfit", "propetl",
                             "compacter", "fusion", "lst"}) {
    CHECK(peft::has_adapter_format(method));
  }
  CHECK_FALSE(peft::has_adapter_format("full"));
  CHECK_FALSE(peft::has_adapter_format("ia3"));
}

namespace {

// Bytes of the file's tensors whose keys start with `prefix` and have dtype `dtype`.
int64_t stored_bytes(const peft::io::SafetensorsFile& file, const std::string& prefix,
                     c10::ScalarType dtype) {
  int64_t bytes = 0;
  for (const auto& name : file.names()) {
    if (name.compare(0, prefix.size(), prefix) != 0 || file.dtype(name) != dtype) continue;
    const auto t = file.tensor(name);
    bytes += t.numel() * static_cast<int64_t>(t.element_size());
  }
  return bytes;
}

}  // namespace

TEST_CASE("ProPETL files hold the prototype once and each mask in bits",
          "[adapter-format][propetl]") {
  TempDir dir;
  auto options = peft::ProPETLOptions(peft::ProPETLBase::Adapter, peft::AdapterKind::Houlsby)
                     .bottleneck(3)
                     .keep_ratio(0.3)
                     .activation("gelu")
                     .scaling(0.5);
  SECTION("adapter prototype") {}
  SECTION("LoRA prototype") {
    options = peft::ProPETLOptions(peft::ProPETLBase::LoRA).r(2).alpha(6).keep_ratio(0.5);
  }
  SECTION("prefix prototype") {
    options = peft::ProPETLOptions(peft::ProPETLBase::Prefix).num_virtual_tokens(3).keep_ratio(0.7);
  }
  auto model = tiny_model();
  peft::attach(*model, options);
  randomize(*model);
  const auto expected = logits(model);
  peft::save_adapter(*model, dir.path);

  const auto weights = dir.path / "adapter_model.safetensors";
  peft::io::SafetensorsFile file(weights);
  const auto storage = peft::propetl_storage(*model);
  int64_t masks = 0;
  for (auto& [path, m] : peft::attached_methods(*model)) {
    auto p = std::dynamic_pointer_cast<peft::ProPETLImpl>(m);
    REQUIRE(p);
    const auto site_masks = p->masks();
    for (size_t i = 0; i < site_masks.size(); ++i) {
      const auto key = path + ".mask_" + p->prototype()->weight_names()[i];
      REQUIRE(file.contains(key));
      CHECK(file.dtype(key) == torch::kUInt8);
      CHECK(file.shape(key) == std::vector<int64_t>{(site_masks[i].numel() + 7) / 8});
      CHECK(
          torch::equal(peft::unpack_mask(file.tensor(key), site_masks[i].sizes()), site_masks[i]));
      ++masks;
    }
  }
  CHECK(masks > 0);
  // The file stores what propetl_storage() counts: the prototype once, one bit per mask entry,
  // and the head; no float scores.
  CHECK(stored_bytes(file, "", torch::kUInt8) == storage.mask_bytes);
  CHECK(stored_bytes(file, "prototype.", torch::kFloat) == storage.prototype_bytes);
  auto first =
      std::dynamic_pointer_cast<peft::ProPETLImpl>(peft::attached_methods(*model)[0].second);
  const auto prototype_tensors = first->prototype()->parameters().size();
  CHECK(file.size() == static_cast<size_t>(masks) + prototype_tensors + 2);  // + the head
  uint64_t header = 0;
  {
    std::ifstream in(weights, std::ios::binary);
    unsigned char bytes[8] = {};
    in.read(reinterpret_cast<char*>(bytes), 8);
    for (int i = 7; i >= 0; --i) header = (header << 8) | bytes[i];
  }
  const int64_t head_bytes = (3 * kH + 3) * 4;
  CHECK(static_cast<int64_t>(fs::file_size(weights)) ==
        8 + static_cast<int64_t>(header) + storage.total() + head_bytes);

  auto config = read_config(dir.path);
  CHECK(config["peft_type"] == "PROPETL");
  CHECK(config["base"] == peft::to_string(options.base()));
  CHECK(config["keep_ratio"] == options.keep_ratio());
  CHECK(static_cast<int64_t>(config["target_modules"].size()) == storage.sites);

  auto fresh = tiny_model();
  CHECK_FALSE(torch::equal(logits(fresh), expected));
  peft::load_adapter(*fresh, dir.path);
  CHECK(torch::equal(logits(fresh), expected));
  for (auto& [path, m] : peft::attached_methods(*fresh)) {
    auto p = std::dynamic_pointer_cast<peft::ProPETLImpl>(m);
    REQUIRE(p);
    CHECK(p->masks_frozen());
  }
  // The loaded model stores the same bytes, and saves the same masks again.
  const auto again = peft::propetl_storage(*fresh);
  CHECK(again.total() == storage.total());
  TempDir resaved;
  peft::save_adapter(*fresh, resaved.path);
  peft::io::SafetensorsFile file2(resaved.path / "adapter_model.safetensors");
  for (const auto& name : file.names()) {
    CHECK(torch::equal(file2.tensor(name), file.tensor(name)));
  }
}

TEST_CASE("A bad ProPETL file is refused before the model changes", "[adapter-format][propetl]") {
  TempDir dir;
  auto model = tiny_model();
  peft::attach(*model, peft::ProPETLOptions().bottleneck(2).keep_ratio(0.25));
  randomize(*model);
  peft::save_adapter(*model, dir.path);
  const auto tensors = peft::io::load_safetensors(dir.path / "adapter_model.safetensors");
  const auto config = read_config(dir.path);
  const std::string site = peft::attached_methods(*model).back().first;
  const std::string mask = site + ".mask_up";  // up: [8, 2], 16 entries, 2 bytes, 4 ones

  auto fresh = tiny_model();
  const auto before = logits(fresh);
  auto unchanged = [&] {
    CHECK(peft::adapter_names(*fresh).empty());
    CHECK(torch::equal(logits(fresh), before));
  };
  auto load_error = [&] { return error_of([&] { peft::load_adapter(*fresh, dir.path); }); };

  rewrite_weights(dir.path, tensors, [&](auto& list) {
    replace_tensor(list, mask, torch::zeros({3}, torch::kUInt8));
  });
  CHECK_THAT(load_error(), Catch::Contains("adapter_model.safetensors: key \"" + mask +
                                           "\" has shape [3], expected [2]"));
  unchanged();

  rewrite_weights(dir.path, tensors,
                  [&](auto& list) { replace_tensor(list, mask, torch::zeros({2})); });
  CHECK_THAT(load_error(), Catch::Contains("key \"" + mask + "\" has dtype F32"));
  unchanged();

  rewrite_weights(dir.path, tensors, [&](auto& list) {
    replace_tensor(list, mask, torch::full({2}, 255, torch::kUInt8));
  });
  CHECK_THAT(load_error(), Catch::Contains("mask \"" + mask + "\" keeps 16 of 16 entries"));
  unchanged();

  rewrite_weights(dir.path, tensors,
                  [&](auto& list) { erase_tensor(list, "prototype.adapter_up.weight"); });
  CHECK_THAT(load_error(), Catch::Contains("missing key \"prototype.adapter_up.weight\""));
  unchanged();

  rewrite_weights(dir.path, tensors, [](auto&) {});
  auto bad = config;
  bad["mask_shapes"]["up"] = {kH, 3};
  write_config(dir.path, bad);
  CHECK_THAT(load_error(), Catch::Contains("mask_shapes \"up\" is [8, 3]"));
  unchanged();
  bad = config;
  bad["base"] = "ia3";
  write_config(dir.path, bad);
  CHECK_THAT(load_error(),
             Catch::Contains(
                 "unknown ProPETL base \"ia3\" (expected \"adapter\", \"lora\" or \"prefix\")"));
  unchanged();

  write_config(dir.path, config);
  peft::load_adapter(*fresh, dir.path);
  CHECK(torch::equal(logits(fresh), logits(model)));
}

TEST_CASE("Compacter files round-trip with shared rules stored once",
          "[adapter-format][compacter]") {
  TempDir dir;
  auto options = peft::CompacterOptions(peft::AdapterKind::Houlsby)
                     .bottleneck(4)
                     .phm_dim(2)
                     .rank(2)
                     .activation("gelu")
                     .scaling(0.5);
  bool shared = true;
  SECTION("shared rules") {}
  SECTION("each layer its own rules") {
    options = peft::CompacterOptions(peft::AdapterKind::Parallel)
                  .bottleneck(4)
                  .phm_dim(4)
                  .shared_phm_rule(false);
    shared = false;
  }
  auto model = tiny_model();
  peft::attach(*model, options);
  randomize(*model);
  const auto expected = logits(model);
  peft::save_adapter(*model, dir.path);

  peft::io::SafetensorsFile file(dir.path / "adapter_model.safetensors");
  CHECK(file.contains("phm_rule") == shared);
  int64_t rules = 0;
  for (const auto& name : file.names()) {
    if (name.size() > 9 && name.compare(name.size() - 9, 9, ".phm_rule") == 0) ++rules;
  }
  const auto sites = static_cast<int64_t>(peft::attached_methods(*model).size());
  CHECK(rules == (shared ? 0 : 2 * sites));
  const auto site = peft::attached_methods(*model).front().first;
  CHECK(file.shape(site + ".adapter_down.W_left") ==
        std::vector<int64_t>{options.phm_dim(), kH / options.phm_dim(), options.rank()});
  auto config = read_config(dir.path);
  CHECK(config["peft_type"] == "COMPACTER");
  CHECK(config["phm_dim"] == options.phm_dim());
  CHECK(config["shared_phm_rule"] == shared);

  auto fresh = tiny_model();
  CHECK_FALSE(torch::equal(logits(fresh), expected));
  peft::load_adapter(*fresh, dir.path);
  CHECK(torch::equal(logits(fresh), expected));
  CHECK(peft::count_parameters(*fresh).trainable == peft::count_parameters(*model).trainable);
  if (shared) {
    // Still one set of rules after loading.
    auto methods = peft::attached_methods(*fresh);
    auto a = std::dynamic_pointer_cast<peft::CompacterImpl>(methods.front().second);
    auto b = std::dynamic_pointer_cast<peft::CompacterImpl>(methods.back().second);
    CHECK(a->adapter_up->phm_rule.is_same(b->adapter_down->phm_rule));
  }
}

TEST_CASE("A bad Compacter file is refused before the model changes",
          "[adapter-format][compacter]") {
  TempDir dir;
  auto model = tiny_model();
  peft::attach(*model, peft::CompacterOptions().bottleneck(4).phm_dim(2));
  randomize(*model);
  peft::save_adapter(*model, dir.path);
  const auto tensors = peft::io::load_safetensors(dir.path / "adapter_model.safetensors");
  const auto config = read_config(dir.path);
  const std::string key = peft::attached_methods(*model).back().first + ".adapter_up.W_right";

  auto fresh = tiny_model();
  const auto before = logits(fresh);
  auto unchanged = [&] {
    CHECK(peft::adapter_names(*fresh).empty());
    CHECK(torch::equal(logits(fresh), before));
  };
  auto load_error = [&] { return error_of([&] { peft::load_adapter(*fresh, dir.path); }); };

  rewrite_weights(dir.path, tensors, [&](auto& list) {
    replace_tensor(list, key, torch::zeros({2, 4, 2}));
  });
  CHECK_THAT(load_error(),
             Catch::Contains("key \"" + key + "\" has shape [2, 4, 2], expected [2, 4, 1]"));
  unchanged();

  rewrite_weights(dir.path, tensors, [&](auto& list) { erase_tensor(list, "phm_rule"); });
  CHECK_THAT(load_error(), Catch::Contains("missing key \"phm_rule\" (expected shape [2, 2, 2])"));
  unchanged();

  rewrite_weights(dir.path, tensors, [](auto&) {});
  auto bad = config;
  bad["phm_dim"] = 3;
  write_config(dir.path, bad);
  CHECK_THAT(load_error(), Catch::Contains("phm_dim 3 must divide"));
  unchanged();

  write_config(dir.path, config);
  peft::load_adapter(*fresh, dir.path);
  CHECK(torch::equal(logits(fresh), logits(model)));
}

TEST_CASE("AdapterFusion files hold the fusion, the fused adapters load from their own folders",
          "[adapter-format][fusion]") {
  TempDir a, b, fusion;
  auto model = tiny_model();
  peft::attach(*model, peft::AdapterOptions().bottleneck(2).adapter_name("a"));
  peft::attach(*model, peft::AdapterOptions().bottleneck(3).adapter_name("b"));
  randomize(*model);
  peft::fuse(*model, {"a", "b"}, peft::FusionOptions().temperature(0.5));
  randomize(*model);  // the fusion layers and the head
  const auto expected = logits(model);
  peft::save_adapter(*model, a.path, peft::SaveAdapterOptions().adapter_name("a"));
  peft::save_adapter(*model, b.path, peft::SaveAdapterOptions().adapter_name("b"));
  peft::save_adapter(*model, fusion.path, peft::SaveAdapterOptions().adapter_name("fusion"));
  auto config = read_config(fusion.path);
  CHECK(config["peft_type"] == "ADAPTER_FUSION");
  CHECK(config["fused_adapters"] == nlohmann::json({"a", "b"}));
  CHECK(config["temperature"] == 0.5);
  peft::io::SafetensorsFile file(fusion.path / "adapter_model.safetensors");
  const auto site = peft::attached_methods(*model).back().first;
  CHECK(file.shape(site + ".query.weight") == std::vector<int64_t>{kH, kH});
  CHECK_FALSE(file.contains(site + ".adapter_down.weight"));

  auto fresh = tiny_model();
  const auto before = logits(fresh);
  // Without the fused adapters the fusion cannot load.
  CHECK_THAT(error_of([&] { peft::load_adapter(*fresh, fusion.path, "fusion"); }),
             Catch::Contains("combines adapter \"a\", which is not attached"));
  CHECK(peft::adapter_names(*fresh).empty());
  CHECK(torch::equal(logits(fresh), before));

  peft::load_adapter(*fresh, a.path, "a");
  peft::load_adapter(*fresh, b.path, "b");
  // A fusion file with a bad tensor leaves the fused adapters as they were.
  const auto tensors = peft::io::load_safetensors(fusion.path / "adapter_model.safetensors");
  const auto with_adapters = logits(fresh);
  rewrite_weights(fusion.path, tensors, [&](auto& list) {
    replace_tensor(list, site + ".value.bias", torch::zeros({kH + 1}));
  });
  CHECK_THAT(error_of([&] { peft::load_adapter(*fresh, fusion.path, "fusion"); }),
             Catch::Contains("key \"" + site + ".value.bias\" has shape [9], expected [8]"));
  CHECK(peft::adapter_names(*fresh) == std::vector<std::string>{"a", "b"});
  CHECK(torch::equal(logits(fresh), with_adapters));

  rewrite_weights(fusion.path, tensors, [](auto&) {});
  peft::load_adapter(*fresh, fusion.path, "fusion");
  CHECK(torch::equal(logits(fresh), expected));
  CHECK(peft::count_parameters(*fresh).trainable == peft::count_parameters(*model).trainable);
}

TEST_CASE("Ladder side networks are rebuilt on a fresh backbone", "[adapter-format][lst]") {
  TempDir dir;
  auto model = tiny_ladder(
      peft::LadderOptions().reduction_factor(2).layers({1}).gate_temperature(0.5).side_heads(1));
  model->pooling = peft::models::Pooling::Mean;
  randomize(*model);
  const auto expected = logits(model);
  peft::save_adapter(*model, dir.path);

  auto config = read_config(dir.path);
  CHECK(config["peft_type"] == "LADDER_SIDE_TUNING");
  CHECK(config["reduction_factor"] == 2);
  CHECK(config["layers"] == nlohmann::json({1}));
  CHECK(config["gate_temperature"] == 0.5);
  CHECK(config["side_heads"] == 1);
  CHECK(config["pooling"] == "mean");
  CHECK(config["modules_to_save"] == nlohmann::json({"classifier"}));
  peft::io::SafetensorsFile file(dir.path / "adapter_model.safetensors");
  CHECK(file.shape("ladder.gates") == std::vector<int64_t>{1});
  CHECK(file.shape("ladder.upsample.weight") == std::vector<int64_t>{kH, kH / 2});
  CHECK(file.contains("classifier.weight"));
  for (const auto& name : file.names()) CHECK(name.compare(0, 5, "bert.") != 0);

  // A side network of other settings is replaced by the stored one.
  auto fresh = tiny_ladder(peft::LadderOptions());
  CHECK_FALSE(torch::equal(logits(fresh), expected));
  peft::load_adapter(*fresh, dir.path);
  CHECK(torch::equal(logits(fresh), expected));
  CHECK(fresh->pooling == peft::models::Pooling::Mean);
  CHECK(fresh->ladder->selected_layers() == std::vector<int64_t>{1});
  CHECK(peft::count_parameters(*fresh).trainable == peft::count_parameters(*model).trainable);
  CHECK(peft::count_parameters(*fresh->bert).trainable == 0);
}

TEST_CASE("Ladder T5 side blocks round-trip through adapter files", "[adapter-format][lst]") {
  TempDir dir;
  auto model = tiny_ladder(
      peft::LadderOptions().reduction_factor(2).layers({0, 1}).block(peft::LadderBlock::T5));
  randomize(*model);
  const auto expected = logits(model);
  peft::save_adapter(*model, dir.path);
  auto config = read_config(dir.path);
  CHECK(config["side_block"] == "t5");
  peft::io::SafetensorsFile file(dir.path / "adapter_model.safetensors");
  CHECK(file.shape("ladder.final_norm") == std::vector<int64_t>{kH / 2});
  CHECK(file.shape("ladder.side.1.in_proj_weight") == std::vector<int64_t>{3 * kH / 2, kH / 2});
  CHECK_FALSE(file.contains("ladder.side.0.self_attn.in_proj_bias"));

  // A model with stock side blocks takes the T5 ones from the file.
  auto fresh = tiny_ladder(peft::LadderOptions());
  CHECK_FALSE(torch::equal(logits(fresh), expected));
  peft::load_adapter(*fresh, dir.path);
  CHECK(fresh->ladder->options().block() == peft::LadderBlock::T5);
  CHECK(torch::equal(logits(fresh), expected));

  auto bad = config;
  bad["side_block"] = "t6";
  write_config(dir.path, bad);
  auto other = tiny_ladder(peft::LadderOptions());
  const auto before = logits(other);
  CHECK_THAT(error_of([&] { peft::load_adapter(*other, dir.path); }),
             Catch::Contains("unknown side block \"t6\" (expected \"transformer_encoder_layer\", "
                             "\"t5\" or \"llama\")"));
  CHECK(torch::equal(logits(other), before));
}

TEST_CASE("A bad ladder file is refused before the model changes", "[adapter-format][lst]") {
  TempDir dir;
  auto model = tiny_ladder(peft::LadderOptions().reduction_factor(2).layers({0, 1}));
  randomize(*model);
  peft::save_adapter(*model, dir.path);
  const auto tensors = peft::io::load_safetensors(dir.path / "adapter_model.safetensors");
  const auto config = read_config(dir.path);

  auto fresh = tiny_ladder(peft::LadderOptions());
  const auto before = logits(fresh);
  const auto* ladder = fresh->ladder.get();
  auto unchanged = [&] {
    CHECK(fresh->ladder.get() == ladder);
    CHECK(torch::equal(logits(fresh), before));
  };
  auto load_error = [&] { return error_of([&] { peft::load_adapter(*fresh, dir.path); }); };

  rewrite_weights(dir.path, tensors,
                  [&](auto& list) { replace_tensor(list, "ladder.gates", torch::zeros({3})); });
  CHECK_THAT(load_error(), Catch::Contains("key \"ladder.gates\" has shape [3], expected [2]"));
  unchanged();

  rewrite_weights(dir.path, tensors,
                  [&](auto& list) { erase_tensor(list, "ladder.side.1.linear2.bias"); });
  CHECK_THAT(load_error(), Catch::Contains("missing key \"ladder.side.1.linear2.bias\""));
  unchanged();

  rewrite_weights(dir.path, tensors, [](auto&) {});
  auto bad = config;
  bad["side_dim_feedforward"] = 5;
  write_config(dir.path, bad);
  CHECK_THAT(load_error(), Catch::Contains("feed-forward size 5"));
  unchanged();
  bad = config;
  bad["layers"] = {0, 7};
  write_config(dir.path, bad);
  CHECK_THAT(load_error(), Catch::Contains("layer 7 is outside"));
  unchanged();

  // Only a ladder model can take the file.
  write_config(dir.path, config);
  auto plain = tiny_model();
  CHECK_THAT(error_of([&] { peft::load_adapter(*plain, dir.path); }),
             Catch::Contains("loads into a models::BertLadderForSequenceClassification"));

  peft::load_adapter(*fresh, dir.path);
  CHECK(torch::equal(logits(fresh), logits(model)));
}
