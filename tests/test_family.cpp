// The method family built on the core: ProPETL, P-tuning, Compacter, AdapterDrop, AdapterFusion.
// Each against a hand computation or an existing method, plus the scale-task learning test.
#include <peft/methods/compacter.hpp>
#include <peft/methods/fusion.hpp>
#include <peft/methods/propetl.hpp>
#include <peft/methods/ptuning.hpp>
#include <peft/nn/encoder.hpp>
#include <peft/nn/tuned.hpp>

#include <cmath>

#include "helpers.hpp"

using namespace testing;

namespace {

template <class Method>
std::vector<std::shared_ptr<Method>> methods_of(torch::nn::Module& model) {
  std::vector<std::shared_ptr<Method>> out;
  for (auto& [path, m] : peft::attached_methods(model)) {
    if (auto p = std::dynamic_pointer_cast<Method>(m)) out.push_back(p);
  }
  return out;
}

}  // namespace

// ------------------------------------------------------------------------------------- ProPETL

TEST_CASE("ProPETL: masks keep exactly round(keep_ratio * numel), ties by index", "[propetl]") {
  for (double keep : {0.3, 0.5, 1.0}) {
    peft::nn::TransformerEncoder model(stock_encoder());
    peft::attach(*model, peft::ProPETLOptions().keep_ratio(keep).bottleneck(3));
    auto methods = methods_of<peft::ProPETLImpl>(*model);
    REQUIRE(methods.size() == static_cast<size_t>(kLayers));
    for (const auto& m : methods) {
      for (const auto& mask : m->masks()) {
        const auto expected = std::llround(keep * static_cast<double>(mask.numel()));
        CHECK(mask.sum().item<double>() == static_cast<double>(expected));
        CHECK(mask.eq(0).logical_or(mask.eq(1)).all().item<bool>());
      }
    }
    // Different sites draw different scores, so their masks differ (unless everything is kept).
    if (keep < 1.0) CHECK_FALSE(torch::equal(methods[0]->masks()[0], methods[1]->masks()[0]));
  }
  // Ties: all scores equal keeps the lowest flat indices; a clear order keeps the largest.
  auto ties = peft::top_k_mask(torch::zeros({2, 5}), 0.3);
  CHECK(torch::equal(
      ties, torch::tensor({1.f, 1.f, 1.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f}).view({2, 5})));
  auto ranked = peft::top_k_mask(torch::tensor({0.1f, 0.9f, 0.5f, 0.9f, 0.2f}), 0.4);
  CHECK(torch::equal(ranked, torch::tensor({0.f, 1.f, 0.f, 1.f, 0.f})));
  peft::nn::TransformerEncoder model(stock_encoder());
  CHECK_THROWS_WITH(peft::attach(*model, peft::ProPETLOptions().keep_ratio(0.0)),
                    Catch::Contains("[peft::propetl] keep_ratio must be in (0, 1], got 0"));
  CHECK_THROWS_WITH(peft::attach(*model, peft::ProPETLOptions().keep_ratio(1.5)),
                    Catch::Contains("keep_ratio must be in (0, 1], got 1.5"));
  // One prototype cannot serve sites of two sizes.
  CHECK_THROWS_WITH(
      peft::attach(*model,
                   peft::ProPETLOptions(peft::ProPETLBase::LoRA).targets({"query", "linear1"})),
      Catch::Contains(
          "all sites share one prototype of sizes 16 -> 16, but \"linear1\" has 16 -> 32"));
  CHECK(peft::attached_methods(*model).empty());
}

TEST_CASE("ProPETL: one shared prototype, counted once, adapter output by hand", "[propetl]") {
  peft::nn::TransformerEncoder model(stock_encoder());
  auto x = torch::randn({5, 2, kDim});
  auto stock_out = model(x);
  auto sites = peft::attach(*model, peft::ProPETLOptions().bottleneck(4).keep_ratio(0.5));
  CHECK(sites == std::vector<std::string>{"layers.0.ffn_block", "layers.1.ffn_block"});
  CHECK(torch::equal(model(x), stock_out));  // up-projection starts at zero

  auto methods = methods_of<peft::ProPETLImpl>(*model);
  REQUIRE(methods.size() == 2);
  CHECK(methods[0]->prototype().get() == methods[1]->prototype().get());
  const int64_t proto = 2 * kDim * 4 + 4 + kDim, scores = 2 * kDim * 4;
  CHECK(peft::count_parameters(*model).trainable == proto + 2 * scores);
  // The prototype is registered under the first site only; every score under its own site.
  std::vector<std::string> names;
  for (auto& [name, p] : peft::named_trainable_parameters(*model)) names.push_back(name);
  CHECK(names ==
        std::vector<std::string>{"layers.0.ffn_block.propetl_default.mask_scores_down",
                                 "layers.0.ffn_block.propetl_default.mask_scores_up",
                                 "layers.0.ffn_block.propetl_default.prototype.adapter_down.weight",
                                 "layers.0.ffn_block.propetl_default.prototype.adapter_down.bias",
                                 "layers.0.ffn_block.propetl_default.prototype.adapter_up.weight",
                                 "layers.0.ffn_block.propetl_default.prototype.adapter_up.bias",
                                 "layers.1.ffn_block.propetl_default.mask_scores_down",
                                 "layers.1.ffn_block.propetl_default.mask_scores_up"});
  CHECK(peft::adapter_bytes(*model) == 4 * (proto + 2 * scores));

  // Layer 1 by hand: Pfeiffer adapter with the prototype's weights times this site's masks.
  randomize(*methods[0]->prototype(), 0.3);
  model->eval();
  auto layer0 = model->layer(0)(x);
  auto& stock1 = *model->base->layers->ptr<torch::nn::TransformerEncoderLayerImpl>(1);
  auto attended = std::get<0>(stock1.self_attn(layer0, layer0, layer0));
  auto h = stock1.norm1(layer0 + attended);
  auto ffn = stock1.linear2(torch::relu(stock1.linear1(h)));
  auto proto_m = methods[1]->prototype();
  auto masks = methods[1]->masks();
  auto down = torch::relu(torch::matmul(ffn, (proto_m->adapter_down->weight * masks[0]).t()) +
                          proto_m->adapter_down->bias);
  auto up =
      torch::matmul(down, (proto_m->adapter_up->weight * masks[1]).t()) + proto_m->adapter_up->bias;
  CHECK(max_diff(model(x), stock1.norm2(h + ffn + up)) <= 1e-5);
}

TEST_CASE("ProPETL: straight-through gradients reach the scores and the prototype", "[propetl]") {
  torch::manual_seed(7);
  peft::nn::TransformerEncoderLayer layer(stock_layer());
  peft::attach(*layer, peft::ProPETLOptions().bottleneck(4).keep_ratio(0.5));
  auto method = methods_of<peft::ProPETLImpl>(*layer).at(0);
  randomize(*method->prototype(), 0.3);
  auto x = torch::randn({5, 2, kDim});
  layer(x).pow(2).mean().backward();
  auto masks = method->masks();
  const auto& weights = method->prototype()->weights();
  for (size_t i = 0; i < 2; ++i) {
    const auto& s = method->scores()[i];
    REQUIRE(s.grad().defined());
    REQUIRE(weights[i].grad().defined());
    CHECK(s.grad().abs().sum().item<double>() > 0);
    CHECK(weights[i].grad().abs().sum().item<double>() > 0);
    // With G = dL/d(masked weight): the prototype gets G * mask and the scores G * W (the mask is
    // the identity backwards), so scores.grad * mask == W.grad * W, and the dropped entries still
    // receive a score gradient.
    CHECK(max_diff(s.grad() * masks[i], weights[i].grad() * weights[i]) <= 1e-12);
    CHECK((s.grad() * (1 - masks[i])).abs().sum().item<double>() > 0);
    CHECK((weights[i].grad() * (1 - masks[i])).abs().sum().item<double>() == 0);
  }
  // Frozen stays frozen.
  for (const auto& p : layer->base->parameters()) CHECK_FALSE(p.grad().defined());
}

TEST_CASE("ProPETL: bit-packed masks round-trip, stored bytes ~ 1/L + 1/32", "[propetl]") {
  // Bit order: entry 8j+i is bit i of byte j.
  auto packed = peft::pack_mask(torch::tensor({1, 0, 0, 0, 0, 0, 0, 1, 1, 1}));
  CHECK(torch::equal(packed, torch::tensor({129, 3}, torch::kUInt8)));
  for (auto shape :
       {std::vector<int64_t>{13}, std::vector<int64_t>{3, 5, 7}, std::vector<int64_t>{4, 16}}) {
    auto mask = (torch::rand(shape) < 0.4).to(torch::kFloat);
    auto bytes = peft::pack_mask(mask);
    CHECK(bytes.numel() == (mask.numel() + 7) / 8);
    CHECK(torch::equal(peft::unpack_mask(bytes, shape), mask));
  }
  CHECK_THROWS_WITH(peft::unpack_mask(packed, {30}),
                    Catch::Contains("2 bytes cannot hold a mask of shape [30] (expected 4 bytes)"));
  CHECK_THROWS_WITH(peft::pack_mask(torch::tensor({0.f, 0.5f})),
                    Catch::Contains("[peft::pack_mask] mask of shape [2] has entries other than"));

  // L = 6 layers, d = 16, bottleneck 4: prototype 2*16*4 weights + 4 + 16 biases = 148 floats =
  // 592 bytes; each site stores 128 mask bits = 16 bytes. Unshared: 6 * 592 = 3552 bytes.
  // ProPETL: 592 + 6 * 16 = 688 bytes; 688 / 3552 = 0.1937 ~ 1/6 + 1/32 * 128/148 (biases are not
  // masked, so the mask term is a little under 1/32).
  torch::manual_seed(1);
  auto options = torch::nn::TransformerEncoderOptions(stock_layer(), 6);
  peft::nn::TransformerEncoder model{torch::nn::TransformerEncoder(options)};
  peft::attach(*model, peft::ProPETLOptions().bottleneck(4));
  auto storage = peft::propetl_storage(*model);
  CHECK(storage.sites == 6);
  CHECK(storage.prototype_bytes == 592);
  CHECK(storage.mask_bytes == 96);
  CHECK(storage.unshared_bytes == 3552);
  CHECK(storage.total() == 688);
  CHECK(std::abs(storage.ratio() - (1.0 / 6 + 1.0 / 32 * 128.0 / 148.0)) < 1e-12);
  CHECK(std::abs(storage.ratio() - (1.0 / 6 + 1.0 / 32)) < 0.005);
  // The stored form reproduces the masks.
  for (const auto& m : methods_of<peft::ProPETLImpl>(*model)) {
    auto masks = m->masks();
    auto stored = m->packed_masks();
    for (size_t i = 0; i < masks.size(); ++i) {
      CHECK(torch::equal(peft::unpack_mask(stored[i], masks[i].sizes()), masks[i]));
    }
  }
  CHECK_THROWS_WITH(peft::propetl_storage(*model, "other"),
                    Catch::Contains("no ProPETL method of adapter \"other\" is attached"));
}

TEST_CASE("ProPETL: freeze_masks caches masked weights, LoRA merges, prefix rows by hand",
          "[propetl]") {
  auto x = torch::randn({5, 2, kDim});
  {
    peft::nn::TransformerEncoder model(stock_encoder());
    peft::attach(
        *model,
        peft::ProPETLOptions(peft::ProPETLBase::Adapter, peft::AdapterKind::Houlsby).bottleneck(4));
    auto methods = methods_of<peft::ProPETLImpl>(*model);
    CHECK(methods.size() == 2 * static_cast<size_t>(kLayers));
    randomize(*methods[0]->prototype(), 0.3);
    auto before = model(x);
    CHECK(peft::freeze_masks(*model) == 4);
    CHECK(methods[0]->masks_frozen());
    CHECK(torch::equal(model(x), before));
    // The scores stop training; the prototype still could.
    CHECK(peft::count_parameters(*model).trainable == 2 * kDim * 4 + 4 + kDim);
  }
  {
    auto stock = stock_encoder();
    peft::nn::TransformerEncoder model(stock);
    peft::attach(*model, peft::ProPETLOptions(peft::ProPETLBase::LoRA).r(2).alpha(4));
    CHECK(torch::equal(model(x), peft::nn::TransformerEncoder(stock_encoder())(x)));
    auto methods = methods_of<peft::ProPETLImpl>(*model);
    CHECK(methods.size() == 2 * static_cast<size_t>(kLayers));  // query and value
    randomize(*methods[0]->prototype(), 0.3);
    auto proto = methods[0]->prototype();
    auto masks = methods[0]->masks();
    auto expected =
        torch::matmul(proto->lora_B->weight * masks[1], proto->lora_A->weight * masks[0]) * 2.0;
    CHECK(max_diff(methods[0]->delta_weight(), expected) <= 1e-7);
    auto before = model(x);
    CHECK(peft::merge(*model) == 4);
    CHECK(max_diff(model(x), before) <= 1e-5);
    peft::unmerge(*model);
    CHECK(max_diff(model(x), before) <= 1e-5);
  }
  {
    peft::nn::TransformerEncoder model(stock_encoder());
    peft::attach(*model, peft::ProPETLOptions(peft::ProPETLBase::Prefix).num_virtual_tokens(3));
    auto methods = methods_of<peft::ProPETLImpl>(*model);
    REQUIRE(methods.size() == static_cast<size_t>(kLayers));
    auto proto = methods[1]->prototype();
    auto masks = methods[1]->masks();
    auto [k, v] = methods[1]->prefix();
    CHECK(torch::equal(k, proto->prefix_keys * masks[0]));
    CHECK(torch::equal(v, proto->prefix_values * masks[1]));
    CHECK(peft::count_parameters(*model).trainable == 2 * 3 * kDim * (1 + kLayers));
  }
}

TEST_CASE("ProPETL: learns the scale task", "[propetl]") {
  peft::nn::TransformerEncoder fresh(stock_encoder());
  peft::attach(*fresh, peft::ProPETLOptions(peft::ProPETLBase::Adapter, peft::AdapterKind::Houlsby)
                           .reduction_factor(4)
                           .keep_ratio(0.5));
  const double baseline = head_only_baseline();
  const double tuned = train_scale_task([&](const torch::Tensor& in) { return fresh(in); },
                                        peft::trainable_parameters(*fresh));
  INFO("head only " << baseline << ", propetl " << tuned);
  CHECK(tuned <= 0.5 * baseline);
}

// ------------------------------------------------------------------------------------ P-tuning

TEST_CASE("P-tuning: folds into prompt_embeddings, equals prompt tuning with those rows",
          "[ptuning]") {
  for (auto type : {peft::PromptEncoderType::LSTM, peft::PromptEncoderType::MLP}) {
    INFO((type == peft::PromptEncoderType::LSTM ? "lstm" : "mlp"));
    torch::manual_seed(11);
    auto stock = stock_encoder();
    peft::nn::TransformerEncoder model(stock);
    peft::attach(*model, peft::PTuningOptions(3).encoder(type).encoder_hidden_size(8));
    auto method = methods_of<peft::PTuningImpl>(*model).at(0);
    CHECK(method->encoded());
    // The LSTM is bidirectional with 2 layers, 8 units each way, then a 16 -> 16 -> dim MLP.
    const int64_t lstm =
        2 * (4 * 8 * kDim + 4 * 8 * 8 + 8 * 8) + 2 * (4 * 8 * 16 + 4 * 8 * 8 + 8 * 8);
    const int64_t expected = type == peft::PromptEncoderType::LSTM
                                 ? 3 * kDim + lstm + (16 * 16 + 16) + (16 * kDim + kDim)
                                 : 3 * kDim + (kDim * 8 + 8) + (8 * 8 + 8) + (8 * kDim + kDim);
    CHECK(peft::count_parameters(*model).trainable == expected);
    auto x = torch::randn({5, 2, kDim});
    auto kpm = padding_mask(2, 5);
    auto before = model(x, torch::Tensor(), kpm);
    CHECK(before.size(0) == 3 + 5);

    peft::fold(*model);
    CHECK_FALSE(method->encoded());
    INFO("fold diff " << max_diff(model(x, torch::Tensor(), kpm), before));
    CHECK(torch::equal(model(x, torch::Tensor(), kpm), before));
    std::vector<std::string> names;
    for (auto& [name, p] : peft::named_trainable_parameters(*model)) names.push_back(name);
    CHECK(names == std::vector<std::string>{"prompt.ptuning_default.prompt_embeddings"});
    CHECK(method->prompt_embeddings.sizes() == torch::IntArrayRef({3, kDim}));

    // Prompt tuning over the same stock encoder with the folded rows computes the same function.
    peft::nn::TransformerEncoder prompted(stock);
    peft::attach(*prompted, peft::PromptOptions(3));
    auto prompt = methods_of<peft::PromptImpl>(*prompted).at(0);
    {
      torch::NoGradGuard no_grad;
      prompt->prompt_embeddings.copy_(method->prompt_embeddings);
    }
    CHECK(torch::equal(prompted(x, torch::Tensor(), kpm), before));
  }
  peft::nn::TransformerEncoder model(stock_encoder());
  CHECK_THROWS_WITH(peft::attach(*model, peft::PTuningOptions(0)),
                    Catch::Contains("[peft::ptuning] num_virtual_tokens must be positive, got 0"));
  CHECK_THROWS_WITH(peft::attach(*model, peft::PTuningOptions(2).encoder_num_layers(0)),
                    Catch::Contains("encoder_num_layers must be positive, got 0"));
}

TEST_CASE("P-tuning: the encoder trains, the base stays frozen, learns the scale task",
          "[ptuning]") {
  peft::nn::TransformerEncoder model(stock_encoder());
  peft::attach(*model, peft::PTuningOptions(4).encoder(peft::PromptEncoderType::LSTM));
  auto x = torch::randn({5, 3, kDim});
  model(x).pow(2).mean().backward();
  for (const auto& p : model->base->parameters()) CHECK_FALSE(p.grad().defined());
  auto method = methods_of<peft::PTuningImpl>(*model).at(0);
  CHECK(method->prompt_encoder->embedding.grad().abs().sum().item<double>() > 0);

  for (auto type : {peft::PromptEncoderType::LSTM, peft::PromptEncoderType::MLP}) {
    peft::nn::TransformerEncoder fresh(stock_encoder());
    peft::attach(*fresh, peft::PTuningOptions(4).encoder(type));
    const double baseline = head_only_baseline();
    const double tuned = train_scale_task([&](const torch::Tensor& in) { return fresh(in); },
                                          peft::trainable_parameters(*fresh));
    INFO("head only " << baseline << ", ptuning " << tuned);
    CHECK(tuned <= 0.5 * baseline);
  }
}

// ----------------------------------------------------------------------------------- Compacter

TEST_CASE("Compacter: PHM weight is the Kronecker sum, bad phm_dim is named", "[compacter]") {
  torch::manual_seed(21);
  peft::PHMLinear phm(8, 12, 4, 2, torch::Tensor(), /*zero_right=*/false);
  auto expected = torch::zeros({8, 12});
  for (int64_t i = 0; i < 4; ++i) {
    auto b = torch::matmul(phm->W_left[i], phm->W_right[i].t());  // [2, 3], rank 2
    expected += torch::kron(phm->phm_rule[i], b);
  }
  CHECK(max_diff(phm->weight(), expected) <= 1e-6);
  {
    torch::NoGradGuard no_grad;
    phm->b.normal_();
  }
  auto x = torch::randn({3, 5, 8});
  CHECK(max_diff(phm(x), torch::matmul(x, expected) + phm->b) <= 1e-5);
  CHECK_THROWS_WITH(peft::PHMLinear(8, 10, 4, 1, torch::Tensor(), false),
                    Catch::Contains("[peft::compacter] phm_dim 4 must divide the projection's "
                                    "sizes, got 8 -> 10"));
  peft::nn::TransformerEncoder model(stock_encoder());
  CHECK_THROWS_WITH(peft::attach(*model, peft::CompacterOptions().reduction_factor(4).phm_dim(3)),
                    Catch::Contains("[peft::compacter] phm_dim 3 must divide the model dimension "
                                    "16 and the bottleneck 4 (at \"attn_block\")"));
  CHECK_THROWS_WITH(peft::attach(*model, peft::CompacterOptions().rank(0)),
                    Catch::Contains("rank must be positive, got 0"));
  CHECK(peft::attached_methods(*model).empty());
}

TEST_CASE("Compacter: identity at init, shared rules counted once, parameter formula",
          "[compacter]") {
  auto x = torch::randn({5, 2, kDim});
  // Houlsby, d = 16, m = 4, n = 4: per site rank * (16 + 4) + 4 for the down projection and
  // rank * (4 + 16) + 16 for the up projection, plus the n^3 = 64 rules once (shared) or per
  // projection (not shared). 2 layers * 2 sites = 4 sites.
  struct Case {
    int64_t rank;
    bool shared;
    int64_t expected;
  };
  for (auto c :
       {Case{1, true, 64 + 4 * (20 + 4 + 20 + 16)}, Case{2, true, 64 + 4 * (40 + 4 + 40 + 16)},
        Case{1, false, 4 * (20 + 4 + 20 + 16 + 2 * 64)}}) {
    auto stock = stock_encoder();
    peft::nn::TransformerEncoder model(stock);
    auto sites = peft::attach(
        *model,
        peft::CompacterOptions().reduction_factor(4).rank(c.rank).shared_phm_rule(c.shared));
    CHECK(sites.size() == 4);
    CHECK(peft::count_parameters(*model).trainable == c.expected);
    CHECK(max_diff(model(x), stock(x)) <= 1e-5);
    auto with = model(x);
    {
      peft::AdaptersDisabled off(*model);
      CHECK(torch::equal(with, model(x)));
    }
    auto methods = methods_of<peft::CompacterImpl>(*model);
    if (c.shared) {
      for (const auto& m : methods) {
        CHECK(m->adapter_down->phm_rule.unsafeGetTensorImpl() ==
              methods[0]->adapter_up->phm_rule.unsafeGetTensorImpl());
      }
      int64_t rules = 0;
      for (auto& item : model->named_parameters()) {
        if (item.key().find("phm_rule") != std::string::npos) ++rules;
      }
      CHECK(rules == 1);
    }
    // Compacter computes the Pfeiffer/Houlsby formula with the PHM weights.
    randomize(*methods[1], 0.3);
    auto m = methods[1];
    auto h = torch::randn({3, 2, kDim});
    auto down = torch::relu(torch::matmul(h, m->adapter_down->weight()) + m->adapter_down->b);
    auto up = torch::matmul(down, m->adapter_up->weight()) + m->adapter_up->b;
    CHECK(max_diff(m->apply(h, h), h + up) <= 1e-5);
  }
}

TEST_CASE("Compacter: learns the scale task", "[compacter]") {
  peft::nn::TransformerEncoder fresh(stock_encoder());
  peft::attach(*fresh, peft::CompacterOptions().reduction_factor(4).phm_dim(4));
  const double baseline = head_only_baseline();
  const double tuned = train_scale_task([&](const torch::Tensor& in) { return fresh(in); },
                                        peft::trainable_parameters(*fresh));
  INFO("head only " << baseline << ", compacter " << tuned);
  CHECK(tuned <= 0.5 * baseline);
}

// --------------------------------------------------------------------------------- AdapterDrop

namespace {

torch::nn::TransformerEncoder deep_encoder(int64_t layers) {
  torch::manual_seed(9);
  return torch::nn::TransformerEncoder(torch::nn::TransformerEncoderOptions(stock_layer(), layers));
}

/// Each stock layer's output on x, by running the frozen layers one after another.
std::vector<torch::Tensor> stock_states(torch::nn::TransformerEncoder& stock,
                                        const torch::Tensor& x) {
  std::vector<torch::Tensor> states{x};
  for (size_t i = 0; i < stock->layers->size(); ++i) {
    states.push_back(
        stock->layers->ptr<torch::nn::TransformerEncoderLayerImpl>(i)->forward(states.back()));
  }
  return states;
}

}  // namespace

TEST_CASE("AdapterDrop at attach time: no adapter in the first k layers", "[adapterdrop]") {
  auto stock = deep_encoder(4);
  peft::nn::TransformerEncoder model(stock);
  auto x = torch::randn({5, 2, kDim});
  CHECK(peft::layers_from(2, 4) == std::vector<int64_t>{2, 3});
  CHECK_THROWS_WITH(peft::layers_from(5, 4), Catch::Contains("[peft::adapter_drop] k must be in "
                                                             "[0, 4], got 5"));
  auto sites = peft::attach(
      *model, peft::AdapterOptions().reduction_factor(4).layers(peft::layers_from(2, 4)));
  CHECK(sites == std::vector<std::string>{"layers.2.attn_block", "layers.2.ffn_block",
                                          "layers.3.attn_block", "layers.3.ffn_block"});
  const int64_t per_adapter = 2 * kDim * 4 + kDim + 4;
  CHECK(peft::count_parameters(*model).trainable == 4 * per_adapter);
  for (auto& [path, m] : peft::attached_methods(*model)) randomize(*m);
  auto states = model->hidden_states(x);
  auto expected = stock_states(stock, x);
  std::vector<torch::Tensor> frozen;
  {
    peft::AdaptersDisabled off(*model);
    frozen = model->hidden_states(x);
  }
  // Layers 0 and 1 compute the frozen layers: the same kernels as the wrapper without adapters
  // (bit-exact), and the stock layers within the wrappers' tolerance.
  for (int i = 1; i <= 2; ++i) {
    CHECK(torch::equal(states[i], frozen[i]));
    CHECK(max_diff(states[i], expected[i]) <= 1e-5);
  }
  CHECK(max_diff(states[3], expected[3]) > 1e-3);
}

TEST_CASE("AdapterDrop on attached adapters: the first k layers lose them for good",
          "[adapterdrop]") {
  auto stock = deep_encoder(4);
  peft::nn::TransformerEncoder model(stock);
  auto x = torch::randn({5, 2, kDim});
  peft::attach(*model, peft::AdapterOptions().reduction_factor(4));
  for (auto& [path, m] : peft::attached_methods(*model)) randomize(*m);
  const int64_t per_adapter = 2 * kDim * 4 + kDim + 4;
  CHECK(peft::count_parameters(*model).trainable == 8 * per_adapter);
  CHECK(max_diff(model->hidden_states(x)[1], stock_states(stock, x)[1]) > 1e-3);

  auto dropped = peft::drop_adapters(*model, 3);
  CHECK(dropped == std::vector<std::string>{"layers.0.attn_block", "layers.0.ffn_block",
                                            "layers.1.attn_block", "layers.1.ffn_block",
                                            "layers.2.attn_block", "layers.2.ffn_block"});
  CHECK(peft::count_parameters(*model).trainable == 2 * per_adapter);
  // Removed, not just switched off: not listed, not counted, not revived by set_adapter.
  CHECK(peft::attached_methods(*model).size() == 2);
  CHECK(peft::count_parameters(*model).total ==
        peft::count_parameters(*stock).total + 2 * per_adapter);
  peft::set_adapter(*model, {"default"});
  auto states = model->hidden_states(x);
  auto expected = stock_states(stock, x);
  std::vector<torch::Tensor> frozen;
  {
    peft::AdaptersDisabled off(*model);
    frozen = model->hidden_states(x);
  }
  for (int i = 1; i <= 3; ++i) {
    CHECK(torch::equal(states[i], frozen[i]));
    CHECK(max_diff(states[i], expected[i]) <= 1e-5);
  }
  // Layer 3 still adapts.
  CHECK(max_diff(states[4], frozen[4]) > 1e-3);
  model(x).pow(2).mean().backward();
  for (auto& [path, m] : peft::attached_methods(*model)) {
    const bool kept = path.rfind("layers.3.", 0) == 0;
    for (const auto& p : m->parameters()) CHECK(p.grad().defined() == kept);
  }
  CHECK_THROWS_WITH(peft::drop_adapters(*model, -1),
                    Catch::Contains("[peft::adapter_drop] k must not be negative, got -1"));

  // ProPETL's prototype is shared by every layer: refused, nothing removed.
  peft::nn::TransformerEncoder shared(deep_encoder(4));
  peft::attach(*shared,
               peft::ProPETLOptions(peft::ProPETLBase::Adapter, peft::AdapterKind::Pfeiffer));
  const auto sites = peft::attached_methods(*shared).size();
  CHECK_THROWS_WITH(
      peft::drop_adapters(*shared, 2),
      Catch::Contains("at \"layers.0.ffn_block\" is a propetl, which shares its weights"));
  CHECK(peft::attached_methods(*shared).size() == sites);
}

// ------------------------------------------------------------------------------- AdapterFusion

TEST_CASE("Fusion: one adapter is that adapter, two adapters by hand", "[fusion]") {
  auto x = torch::randn({5, 2, kDim});
  peft::nn::TransformerEncoder model(stock_encoder());
  peft::attach(
      *model,
      peft::AdapterOptions(peft::AdapterKind::Pfeiffer).reduction_factor(4).adapter_name("a"));
  for (auto& [path, m] : peft::attached_methods(*model)) randomize(*m, 0.3);
  auto with_a = model(x);
  auto paths = peft::fuse(*model, {"a"});
  CHECK(paths == std::vector<std::string>{"layers.0.ffn_block", "layers.1.ffn_block"});
  // Softmax over one adapter is exactly 1 and V is the identity: the fusion returns a's output.
  CHECK(max_diff(model(x), with_a) <= 1e-6);

  // Two adapters at one site, with random fusion parameters, against the paper's formula.
  peft::nn::TransformerEncoder two(stock_encoder());
  for (const char* name : {"a", "b"}) {
    peft::attach(
        *two,
        peft::AdapterOptions(peft::AdapterKind::Pfeiffer).reduction_factor(4).adapter_name(name));
  }
  for (auto& [path, m] : peft::attached_methods(*two)) randomize(*m, 0.3);
  peft::fuse(*two, {"b", "a"}, peft::FusionOptions().temperature(2.0));
  auto fusion = methods_of<peft::FusionImpl>(*two).at(0);
  REQUIRE(fusion->fused().size() == 2);
  CHECK(fusion->fused()[0]->adapter() == "b");
  randomize(*fusion, 0.3);
  auto h = torch::randn({3, 2, kDim});
  auto ob = fusion->fused()[0]->apply(h, h), oa = fusion->fused()[1]->apply(h, h);
  auto q = torch::matmul(h, fusion->query->weight.t()) + fusion->query->bias;
  auto kb = torch::matmul(ob, fusion->key->weight.t()) + fusion->key->bias;
  auto ka = torch::matmul(oa, fusion->key->weight.t()) + fusion->key->bias;
  auto sb = torch::exp((q * kb).sum(-1, true) / 2.0), sa = torch::exp((q * ka).sum(-1, true) / 2.0);
  auto vb = torch::matmul(ob, fusion->value->weight.t()) + fusion->value->bias;
  auto va = torch::matmul(oa, fusion->value->weight.t()) + fusion->value->bias;
  auto expected = (sb * vb + sa * va) / (sb + sa);
  CHECK(max_diff(fusion->apply(h, h), expected) <= 1e-5);

  CHECK_THROWS_WITH(
      peft::fuse(*two, {"c"}),
      Catch::Contains("[peft::fusion] no adapter named \"c\"; attached: a, b, fusion"));
  peft::nn::TransformerEncoder partial(stock_encoder());
  peft::attach(
      *partial,
      peft::AdapterOptions(peft::AdapterKind::Pfeiffer).reduction_factor(4).adapter_name("a"));
  peft::attach(*partial, peft::AdapterOptions(peft::AdapterKind::Pfeiffer)
                             .reduction_factor(4)
                             .adapter_name("b")
                             .layers({1}));
  CHECK_THROWS_WITH(peft::fuse(*partial, {"a", "b"}),
                    Catch::Contains("\"layers.0.ffn_block\" has adapter(s) a, b but not b"));
  CHECK(peft::attached_methods(*partial).size() == 3);
}

TEST_CASE("Fusion: fused adapters stay frozen, only fusion trains, learns the scale task",
          "[fusion]") {
  auto make = [] {
    auto model = std::make_shared<peft::nn::TransformerEncoderImpl>(stock_encoder());
    torch::manual_seed(31);
    for (const char* name : {"a", "b"}) {
      peft::attach(*model, peft::AdapterOptions().reduction_factor(4).adapter_name(name));
    }
    for (auto& [path, m] : peft::attached_methods(*model)) {
      randomize(*m, 0.3);
      peft::freeze(*m);  // "trained" adapters, frozen
    }
    return model;
  };
  auto model = make();
  peft::fuse(*model, {"a", "b"});
  auto adapters = snapshot(*model);
  for (auto& [name, p] : peft::named_trainable_parameters(*model)) {
    CHECK(name.find("fusion_fusion") != std::string::npos);
  }
  CHECK(peft::count_parameters(*model).trainable == 4 * 3 * (kDim * kDim + kDim));

  // A head over one frozen adapter cannot read the scale; the fusion over two learns it.
  auto single = make();
  peft::set_adapter(*single, {"a"});
  const double head_over_a =
      train_scale_task([&](const torch::Tensor& in) { return single->forward(in); }, {});
  const double fused = train_scale_task([&](const torch::Tensor& in) { return model->forward(in); },
                                        peft::trainable_parameters(*model));
  INFO("head over adapter a " << head_over_a << ", fusion " << fused);
  CHECK(fused <= 0.5 * head_over_a);
  // The fused adapters did not move, and got no gradient.
  auto after = snapshot(*model);
  size_t i = 0;
  for (const auto& p : model->parameters()) {
    if (!p.requires_grad()) {
      CHECK(torch::equal(after[i], adapters[i]));
      CHECK_FALSE(p.grad().defined());
    }
    ++i;
  }
}
