// Methods that reparameterise a projection's weight: IA3, DoRA, VeRA, LoHa, LoKr (and the
// registry they come through). Each is checked against the formula of its paper computed here from
// the stock module's weights, for identity at initialisation, exact merging and a bit-for-bit file
// round trip; Python parity (both directions) is in tests/python/adapter_parity.py.

#include <peft/methods/dora.hpp>
#include <peft/methods/ia3.hpp>
#include <peft/methods/loha.hpp>
#include <peft/methods/lokr.hpp>
#include <peft/methods/vera.hpp>
#include <peft/peft.hpp>  // the registry tests look at every method

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <set>
#include <string>

#include "helpers.hpp"
#include "model_helpers.hpp"

using namespace testing;
namespace fs = std::filesystem;

namespace {

struct Folder {
  fs::path path;
  Folder() {
    static int counter = 0;
    path = fs::temp_directory_path() /
           ("peft_reparam_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    fs::remove_all(path);
  }
  ~Folder() { fs::remove_all(path); }
};

/// Attaches `method` from JSON options to a wrapped stock encoder, moves every method parameter
/// off its start, and checks: the identity at init, that a saved and reloaded adapter reproduces
/// the outputs bit for bit, and merge/unmerge exactness (last: unmerge restores the frozen
/// weights only up to float rounding).
void check_method(const std::string& method, const nlohmann::json& options) {
  auto x = torch::randn({5, 3, kDim});
  auto kpm = padding_mask(3, 5);
  auto stock = stock_encoder(0.0, false, 7);
  peft::nn::TransformerEncoder model(stock);
  model->eval();
  const auto sites = peft::attach(*model, method, options);
  REQUIRE(!sites.empty());
  CHECK(max_diff(model(x, torch::Tensor(), kpm), stock(x, torch::Tensor(), kpm)) <= 1e-5);

  torch::manual_seed(11);
  {
    torch::NoGradGuard no_grad;
    for (auto& [path, m] : peft::attached_methods(*model)) {
      for (auto& p : m->parameters()) p.add_(torch::randn_like(p) * 0.2);
    }
  }
  const auto tuned = model(x, torch::Tensor(), kpm);
  CHECK(max_diff(tuned, stock(x, torch::Tensor(), kpm)) > 1e-3);

  Folder dir;
  peft::save_adapter(*model, dir.path);
  auto fresh_stock = stock_encoder(0.0, false, 7);
  peft::nn::TransformerEncoder fresh(fresh_stock);
  fresh->eval();
  peft::load_adapter(*fresh, dir.path);
  CHECK(torch::equal(fresh(x, torch::Tensor(), kpm), tuned));

  const auto original = snapshot(*stock);
  CHECK(peft::merge(*model) == static_cast<int64_t>(sites.size()));
  CHECK(max_diff(stock(x, torch::Tensor(), kpm), tuned) <= 1e-5);
  CHECK(max_diff(model(x, torch::Tensor(), kpm), tuned) <= 1e-5);
  CHECK(peft::unmerge(*model) == static_cast<int64_t>(sites.size()));
  const auto restored = stock->parameters();
  for (size_t i = 0; i < restored.size(); ++i) CHECK(max_diff(restored[i], original[i]) <= 1e-6);
}

}  // namespace

TEST_CASE("IA3 scales outputs, or inputs at feed-forward projections, as the paper says", "[ia3]") {
  torch::manual_seed(0);
  torch::nn::Linear stock(6, 4);
  peft::IA3<torch::nn::Linear> scaled(stock, peft::IA3Options().feedforward({}));
  auto x = torch::randn({3, 6});
  CHECK(torch::equal(scaled(x), stock(x)));
  auto& out = std::dynamic_pointer_cast<peft::IA3Impl>(scaled->methods().at(0))->ia3_l;
  CHECK(out.sizes() == torch::IntArrayRef({4, 1}));
  {
    torch::NoGradGuard no_grad;
    out.copy_(torch::randn({4, 1}));
  }
  // (W x + b) * l
  CHECK(max_diff(scaled(x), stock(x) * out.flatten()) <= 1e-6);

  torch::nn::Linear ff_stock(6, 4);
  peft::IA3<torch::nn::Linear> ff(ff_stock, peft::IA3Options().feedforward({"linear"}));
  auto& in = std::dynamic_pointer_cast<peft::IA3Impl>(ff->methods().at(0))->ia3_l;
  CHECK(in.sizes() == torch::IntArrayRef({1, 6}));
  CHECK(torch::equal(ff(x), ff_stock(x)));
  {
    torch::NoGradGuard no_grad;
    in.copy_(torch::randn({1, 6}));
  }
  // W (x * l) + b
  CHECK(max_diff(ff(x), ff_stock(x * in.flatten())) <= 1e-5);
}

TEST_CASE("IA3: identity at init, exact merge, file round trip, only the vectors train", "[ia3]") {
  torch::manual_seed(1);
  check_method("ia3", nlohmann::json::object());
  auto stock = stock_encoder();
  peft::nn::TransformerEncoder model(stock);
  peft::attach(*model, peft::IA3Options());
  const auto counts = peft::count_parameters(*model);
  // key and value scale their outputs (16 each), out_proj (16) and linear2 (32) their inputs.
  CHECK(counts.trainable == kLayers * (kDim + kDim + kDim + kFF));
}

TEST_CASE("DoRA computes m * (W + s B A) / ||W + s B A|| x + b", "[dora]") {
  torch::manual_seed(2);
  torch::nn::Linear stock(6, 4);
  peft::DoRA<torch::nn::Linear> tuned(stock, peft::DoRAOptions(2).alpha(4));
  auto x = torch::randn({3, 6});
  CHECK(max_diff(tuned(x), stock(x)) <= 1e-6);
  auto dora = std::dynamic_pointer_cast<peft::DoRAImpl>(tuned->methods().at(0));
  CHECK(max_diff(dora->lora_magnitude_vector, stock->weight.norm(2, {1})) <= 1e-6);
  {
    torch::NoGradGuard no_grad;
    dora->lora_B->weight.normal_();
    dora->lora_magnitude_vector.add_(torch::randn({4}));
  }
  auto adapted = stock->weight + 2.0 * torch::matmul(dora->lora_B->weight, dora->lora_A->weight);
  auto weight = dora->lora_magnitude_vector.unsqueeze(1) * adapted / adapted.norm(2, {1}, true);
  CHECK(max_diff(tuned(x), torch::nn::functional::linear(x, weight, stock->bias)) <= 1e-5);

  // The norm is a constant in the backward pass (as Hugging Face PEFT): the magnitude's gradient
  // is that of m * const.
  tuned(x).sum().backward();
  CHECK(dora->lora_magnitude_vector.grad().defined());
  CHECK(!stock->weight.grad().defined());
}

TEST_CASE("DoRA: identity at init, exact merge, file round trip", "[dora]") {
  torch::manual_seed(3);
  check_method("dora", {{"r", 2}, {"lora_alpha", 4}, {"target_modules", {"query", "linear1"}}});
}

TEST_CASE("VeRA: one shared pair of frozen matrices, lambda_b * B (lambda_d * A x)", "[vera]") {
  torch::manual_seed(4);
  auto stock = stock_encoder();
  peft::nn::TransformerEncoder model(stock);
  peft::attach(*model, peft::VeRAOptions(4).targets({"query", "linear1"}));
  std::vector<std::shared_ptr<peft::VeRAImpl>> vera;
  for (auto& [path, m] : peft::attached_methods(*model)) {
    vera.push_back(std::dynamic_pointer_cast<peft::VeRAImpl>(m));
  }
  REQUIRE(vera.size() == 2 * static_cast<size_t>(kLayers));
  // Sized for the largest projection (linear1: 16 -> 32), shared by all, frozen.
  CHECK(vera[0]->vera_A.sizes() == torch::IntArrayRef({4, kDim}));
  CHECK(vera[0]->vera_B.sizes() == torch::IntArrayRef({kFF, 4}));
  for (auto& v : vera) CHECK(v->vera_A.is_same(vera[0]->vera_A));
  CHECK(!vera[0]->vera_A.requires_grad());
  CHECK(peft::count_parameters(*model).trainable == kLayers * (kDim + 4 + kFF + 4));
  // Kaiming-uniform A then B from one seeded CPU generator (that this equals PEFT's own draw
  // is checked against Python in tests/python/adapter_parity.py).
  auto generator = at::make_generator<at::CPUGeneratorImpl>(0);
  auto a =
      torch::empty({4, kDim}).uniform_(-std::sqrt(6.0 / kDim), std::sqrt(6.0 / kDim), generator);
  CHECK(torch::equal(vera[0]->vera_A, a));

  torch::nn::Linear linear(6, 5);
  peft::VeRA<torch::nn::Linear> one(linear, peft::VeRAOptions(3));
  auto v = std::dynamic_pointer_cast<peft::VeRAImpl>(one->methods().at(0));
  auto x = torch::randn({2, 6});
  CHECK(torch::equal(one(x), linear(x)));
  {
    torch::NoGradGuard no_grad;
    v->vera_lambda_b.normal_();
    v->vera_lambda_d.normal_();
  }
  auto expected = linear(x) + v->vera_lambda_b *
                                  torch::matmul(v->vera_lambda_d * torch::matmul(x, v->vera_A.t()),
                                                v->vera_B.t());
  CHECK(max_diff(one(x), expected) <= 1e-5);
  check_method("vera", {{"r", 4}, {"target_modules", {"query", "value", "linear2"}}});
}

TEST_CASE("LoHa: dW = (alpha / r) (W1a W1b) * (W2a W2b)", "[loha]") {
  torch::manual_seed(5);
  torch::nn::Linear linear(6, 5);
  peft::LoHa<torch::nn::Linear> tuned(linear, peft::LoHaOptions(2).alpha(3));
  auto h = std::dynamic_pointer_cast<peft::LoHaImpl>(tuned->methods().at(0));
  auto x = torch::randn({2, 6});
  CHECK(torch::equal(tuned(x), linear(x)));
  {
    torch::NoGradGuard no_grad;
    h->hada_w2_b.normal_();
  }
  auto dw =
      torch::matmul(h->hada_w1_a, h->hada_w1_b) * torch::matmul(h->hada_w2_a, h->hada_w2_b) * 1.5;
  CHECK(max_diff(tuned(x), linear(x) + torch::matmul(x, dw.t())) <= 1e-5);
  check_method("loha", {{"r", 2}, {"alpha", 4}, {"target_modules", {"query", "linear1"}}});
}

TEST_CASE("LoKr: factor shapes as LyCORIS, dW = (alpha / r) kron(W1, W2a W2b)", "[lokr]") {
  // Hugging Face PEFT's factorization examples.
  CHECK(peft::lokr_factorization(256) == std::pair<int64_t, int64_t>{16, 16});
  CHECK(peft::lokr_factorization(128) == std::pair<int64_t, int64_t>{8, 16});
  CHECK(peft::lokr_factorization(127) == std::pair<int64_t, int64_t>{1, 127});
  CHECK(peft::lokr_factorization(128, 4) == std::pair<int64_t, int64_t>{4, 32});
  CHECK(peft::lokr_factorization(384) == std::pair<int64_t, int64_t>{16, 24});

  torch::manual_seed(6);
  torch::nn::Linear linear(32, 16);
  peft::LoKr<torch::nn::Linear> tuned(linear, peft::LoKrOptions(2).alpha(4));
  auto k = std::dynamic_pointer_cast<peft::LoKrImpl>(tuned->methods().at(0));
  // 16 = 4 x 4 out, 32 = 4 x 8 in; W1 full [4, 4], W2 = [4, 2] x [2, 8] since 2 < 8 / 2.
  CHECK(k->lokr_w1.sizes() == torch::IntArrayRef({4, 4}));
  CHECK(!k->lokr_w2.defined());
  CHECK(k->lokr_w2_a.sizes() == torch::IntArrayRef({4, 2}));
  CHECK(k->lokr_w2_b.sizes() == torch::IntArrayRef({2, 8}));
  auto x = torch::randn({3, 32});
  CHECK(torch::equal(tuned(x), linear(x)));
  {
    torch::NoGradGuard no_grad;
    k->lokr_w1.normal_();
  }
  auto dw = torch::kron(k->lokr_w1, torch::matmul(k->lokr_w2_a, k->lokr_w2_b)) * 2.0;
  CHECK(max_diff(tuned(x), linear(x) + torch::matmul(x, dw.t())) <= 1e-5);
  check_method("lokr", {{"r", 2}, {"alpha", 4}, {"target_modules", {"value", "linear2"}}});
  check_method("lokr", {{"r", 1}, {"decompose_both", true}, {"target_modules", {"linear1"}}});
}

TEST_CASE("The registry lists every included method and attaches from JSON options", "[registry]") {
  const auto names = peft::method_names();
  for (const char* name : {"lora", "ia3", "dora", "vera", "loha", "lokr"}) {
    CHECK(std::find(names.begin(), names.end(), name) != names.end());
  }
  auto stock = stock_encoder();
  peft::nn::TransformerEncoder model(stock);
  auto sites = peft::attach(*model, "lora", {{"r", 2}, {"target_modules", {"query"}}});
  CHECK(sites.size() == static_cast<size_t>(kLayers));
  CHECK_THROWS_WITH(peft::attach(*model, "lorra"),
                    Catch::Contains("unknown method \"lorra\"") && Catch::Contains("ia3"));
  CHECK_THROWS_WITH(peft::attach(*model, "lora", {{"r", "eight"}}),
                    Catch::Contains("\"r\" has the wrong type"));
  CHECK_THROWS_WITH(peft::attach(*model, "lora", {{"bias", "all"}}),
                    Catch::Contains("bias \"all\" is not supported"));
  CHECK(peft::has_adapter_format("ia3"));
}

TEST_CASE("Each method declares the option keys it reads, and attach refuses any other key",
          "[registry]") {
  // What each method reads is recorded while it attaches to a tiny BERT with its defaults (and
  // its learning-rate rules run): the declared keys must be exactly those.
  auto config = testing::tiny_bert_config(2);
  config.hidden_size = 64;  // wide enough for the adapters' defaults (reduction 16, phm_dim 4)
  config.intermediate_size = 128;
  std::vector<std::string> checked;
  for (const auto& entry : peft::registered_methods()) {
    if (!entry.attach) continue;
    INFO("method " << entry.name);
    peft::models::Bert model(config);
    peft::detail::KeyLog log;
    // Fusion needs the adapters it fuses; with none attached it fails after reading its options.
    // LST attaches by name beside a Llama decoder only; on BERT it fails after reading them.
    const nlohmann::json options = entry.name == "fusion"
                                       ? nlohmann::json{{"fused_adapters", {"a", "b"}}}
                                       : nlohmann::json::object();
    try {
      entry.attach(*model, options);
    } catch (const peft::Error& e) {
      INFO(e.what());
      CHECK((entry.name == "fusion" || entry.name == "lst"));
    }
    if (entry.lr_rules) entry.lr_rules(1e-3, options);
    const std::set<std::string> declared(entry.option_keys.begin(), entry.option_keys.end());
    CHECK(declared.size() == entry.option_keys.size());  // no key listed twice
    CHECK(log.keys() == declared);
    checked.push_back(entry.name);
  }
  CHECK(checked.size() >= 14);

  // Any other key is refused before the model changes, naming the key and the method's keys.
  for (const auto& name : peft::method_names()) {
    const auto entry = peft::method_entry(name);
    if (!entry.attach) continue;
    INFO("method " << name);
    peft::models::Bert model(config);
    const auto before = snapshot(*model);
    CHECK_THROWS_WITH(peft::attach(*model, name, {{"not_an_option", 1}}),
                      Catch::Contains("unknown option \"not_an_option\"") &&
                          Catch::Contains(name + " reads: " + entry.option_keys.front()));
    CHECK(peft::attached_methods(*model).empty());
    const auto after = snapshot(*model);
    REQUIRE(after.size() == before.size());
    for (size_t i = 0; i < after.size(); ++i) CHECK(torch::equal(after[i], before[i]));
  }
  peft::models::Bert model(config);
  // A misspelt key is named with the key it resembles; one that resembles none gets the list.
  CHECK_THROWS_WITH(peft::attach(*model, "lora", {{"alpha", 16}}),
                    Catch::Contains("did you mean \"lora_alpha\"?"));
  CHECK_THROWS_WITH(peft::attach(*model, "lora", {{"lora_dropuot", 0.1}}),
                    Catch::Contains("did you mean \"lora_dropout\"?"));
  CHECK_THROWS_WITH(peft::attach(*model, "lora", {{"rank", 4}}),
                    Catch::Contains("unknown option \"rank\"; lora reads: r, lora_alpha"));
  CHECK_THROWS_WITH(peft::attach(*model, "lora", {{"use_dora", true}}),
                    Catch::Contains("unknown option \"use_dora\""));
  CHECK_THROWS_WITH(peft::attach(*model, "lorra"), Catch::Contains("did you mean \"lora\"?"));
  // target_modules as Hugging Face's regular expression is refused, not ignored; one layer index
  // is a list of one.
  CHECK_THROWS_WITH(peft::attach(*model, "lora", {{"target_modules", "query|value"}}),
                    Catch::Contains("\"target_modules\" must be a list of module names"));
  // Likewise IA3's feed-forward list (a string used to leave the default list in place).
  CHECK_THROWS_WITH(peft::attach(*model, "ia3", {{"feedforward_modules", "output.dense"}}),
                    Catch::Contains("\"feedforward_modules\" must be a list of module names"));
  CHECK(peft::attached_methods(*model).empty());
  const auto sites =
      peft::attach(*model, "lora", {{"target_modules", {"query"}}, {"layers_to_transform", 1}});
  REQUIRE(sites.size() == 1);
  CHECK(sites[0].find("1") != std::string::npos);
  // A file Python saved with the regular-expression form still loads: its tensor keys name the
  // modules.
  testing::TempDir dir;
  peft::save_adapter(*model, dir.path);
  {
    auto saved = peft::io::read_json(dir.path / "adapter_config.json");
    saved["target_modules"] = ".*query";
    std::ofstream(dir.path / "adapter_config.json", std::ios::trunc) << saved.dump();
  }
  peft::models::Bert fresh(config);
  peft::load_adapter(*fresh, dir.path);
  const auto loaded = peft::attached_methods(*fresh);
  REQUIRE(loaded.size() == 1);
  CHECK(loaded[0].first == sites[0]);
}

TEST_CASE("One adapter file holds one setting: sites attached with different ranks are refused",
          "[registry]") {
  // LoRA and DoRA store one r/alpha/rslora/dropout for all sites, LoHa and LoKr one r/alpha (and
  // LoKr one factorisation): a model whose sites differ cannot be saved as one file, and the
  // refusal names both settings and writes nothing.
  const auto config = testing::tiny_bert_config(2);
  for (const char* name : {"lora", "dora", "loha", "lokr"}) {
    INFO("method " << name);
    peft::models::Bert model(config);
    peft::attach(*model, name, {{"r", 4}, {"target_modules", {"query"}}});
    peft::attach(*model, name, {{"r", 2}, {"target_modules", {"value"}}});
    testing::TempDir dir;
    const auto folder = dir.path / "adapter";
    CHECK_THROWS_WITH(peft::save_adapter(*model, folder),
                      Catch::Contains("has r=2") && Catch::Contains("(r=4") &&
                          Catch::Contains("one file holds one setting"));
    CHECK_FALSE(std::filesystem::exists(folder / "adapter_config.json"));
    CHECK_FALSE(std::filesystem::exists(folder / "adapter_model.safetensors"));
  }
  // LoKr's factorisation is part of its setting.
  peft::models::Bert model(config);
  peft::attach(*model, "lokr", {{"r", 4}, {"target_modules", {"query"}}});
  peft::attach(*model, "lokr", {{"r", 4}, {"target_modules", {"value"}}, {"decompose_factor", 2}});
  testing::TempDir dir;
  CHECK_THROWS_WITH(
      peft::save_adapter(*model, dir.path / "adapter"),
      Catch::Contains("decompose_factor=2") && Catch::Contains("one file holds one setting"));
}
