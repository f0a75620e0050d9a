// The methods: identity at initialisation, hand-computed or stock-module expectations once
// trained, merge, gradients, bad options, and learning a task the head alone cannot.
#include <peft/core/attach.hpp>
#include <peft/core/parameters.hpp>
#include <peft/methods/adapter.hpp>
#include <peft/methods/bitfit.hpp>
#include <peft/methods/lora.hpp>
#include <peft/methods/prefix.hpp>
#include <peft/methods/prompt.hpp>
#include <peft/nn/encoder.hpp>
#include <peft/nn/tuned.hpp>

#include "helpers.hpp"

using namespace testing;

namespace {

/// Invariant 2: after backward only trainable tensors have gradients, and an optimizer step over
/// trainable_parameters leaves every frozen tensor bit-identical.
void check_frozen_stays_frozen(torch::nn::Module& model,
                               const std::function<torch::Tensor()>& loss) {
  std::vector<torch::Tensor> frozen, before;
  for (const auto& p : model.parameters()) {
    if (p.requires_grad()) continue;
    frozen.push_back(p);
    before.push_back(p.detach().clone());
  }
  auto params = peft::trainable_parameters(model);
  REQUIRE_FALSE(params.empty());
  std::vector<torch::Tensor> trainable_before;
  for (const auto& p : params) trainable_before.push_back(p.detach().clone());
  torch::optim::AdamW opt(params, torch::optim::AdamWOptions(1e-2));
  opt.zero_grad();
  loss().backward();
  for (const auto& p : frozen) CHECK_FALSE(p.grad().defined());
  opt.step();
  for (size_t i = 0; i < frozen.size(); ++i) CHECK(torch::equal(frozen[i], before[i]));
  bool moved = false;
  for (size_t i = 0; i < params.size(); ++i)
    moved = moved || !torch::equal(params[i], trainable_before[i]);
  CHECK(moved);
}

}  // namespace

// ---------------------------------------------------------------------------------------- LoRA

TEST_CASE("LoRA on a Linear: identity at init, then W x + b + (alpha/r) B A x", "[lora]") {
  torch::manual_seed(0);
  torch::nn::Linear stock(kDim, 8);
  peft::LoRA<torch::nn::Linear> tuned(stock, peft::LoRAOptions(4).alpha(8));
  auto x = torch::randn({5, kDim});
  CHECK(torch::equal(tuned(x), stock(x)));  // same kernels, and B = 0 adds exact zeros

  auto lora = std::dynamic_pointer_cast<peft::LoRAImpl>(tuned->methods().at(0));
  REQUIRE(lora);
  CHECK(lora->lora_A->weight.sizes() == torch::IntArrayRef({4, kDim}));
  CHECK(lora->lora_B->weight.sizes() == torch::IntArrayRef({8, 4}));
  CHECK(torch::equal(lora->lora_B->weight, torch::zeros({8, 4})));
  randomize(*lora);
  auto expected =
      torch::matmul(x, stock->weight.t()) + stock->bias +
      2.0 * torch::matmul(torch::matmul(x, lora->lora_A->weight.t()), lora->lora_B->weight.t());
  CHECK(max_diff(tuned(x), expected) <= 1e-5);

  auto names = peft::named_trainable_parameters(*tuned);
  REQUIRE(names.size() == 2);
  CHECK(names[0].first == "lora_default.lora_A.weight");
  CHECK(names[1].first == "lora_default.lora_B.weight");
  CHECK(peft::LoRAOptions(16).alpha(8).rslora(true).scaling() == Approx(2.0));
  CHECK(peft::LoRAOptions(16).alpha(8).scaling() == Approx(0.5));
}

TEST_CASE("LoRA merge and unmerge are exact on an encoder and an embedding", "[lora]") {
  torch::manual_seed(0);
  auto stock = stock_encoder(0.0, true);
  peft::nn::TransformerEncoder model(stock);
  auto sites =
      peft::attach(*model, peft::LoRAOptions(4).alpha(8).targets(
                               {"query", "key", "value", "out_proj", "linear1", "linear2"}));
  CHECK(sites.size() == 6 * static_cast<size_t>(kLayers));
  for (auto& [path, m] : peft::attached_methods(*model)) randomize(*m);
  model->eval();
  auto x = torch::randn({6, 3, kDim});
  auto kpm = padding_mask(3, 6);
  auto unmerged = model(x, torch::Tensor(), kpm);
  auto original = snapshot(*stock);
  CHECK(max_diff(unmerged, stock(x, torch::Tensor(), kpm)) > 1e-3);  // the adapter does something

  CHECK(peft::merge(*model) == 6 * kLayers);
  CHECK(max_diff(model(x, torch::Tensor(), kpm), unmerged) <= 1e-5);
  // Merged into the stock weights: the stock encoder alone now computes the tuned function.
  CHECK(max_diff(stock(x, torch::Tensor(), kpm), unmerged) <= 1e-5);

  CHECK(peft::unmerge(*model) == 6 * kLayers);
  auto restored = stock->parameters();
  for (size_t i = 0; i < restored.size(); ++i) CHECK(max_diff(restored[i], original[i]) <= 1e-6);
  CHECK(max_diff(model(x, torch::Tensor(), kpm), unmerged) <= 1e-5);

  torch::nn::Embedding table(40, kDim);
  peft::LoRA<torch::nn::Embedding> emb(table, peft::LoRAOptions(4));
  auto ids = torch::randint(40, {2, 9});
  CHECK(torch::equal(emb(ids), table(ids)));
  randomize(*emb->methods().at(0));
  auto tuned_out = emb(ids);
  CHECK(max_diff(tuned_out, table(ids)) > 1e-3);
  peft::merge(*emb);
  CHECK(max_diff(table(ids), tuned_out) <= 1e-5);
}

TEST_CASE("LoRA: several named adapters, switching and disabling", "[lora]") {
  auto stock = stock_encoder();
  peft::nn::TransformerEncoder model(stock);
  peft::attach(*model, peft::LoRAOptions(2).adapter_name("a"));
  peft::attach(*model, peft::LoRAOptions(2).adapter_name("b").targets({"linear1"}));
  CHECK(peft::adapter_names(*model) == std::vector<std::string>{"a", "b"});
  for (auto& [path, m] : peft::attached_methods(*model)) randomize(*m);
  auto x = torch::randn({4, 2, kDim});
  auto both = model(x);

  peft::set_adapter(*model, {"a"});
  auto only_a = model(x);
  peft::set_adapter(*model, {"b"});
  auto only_b = model(x);
  CHECK(max_diff(only_a, only_b) > 1e-4);
  CHECK(max_diff(only_a, both) > 1e-5);

  {
    peft::AdaptersDisabled off(*model);
    const auto plain = [&] {
      peft::nn::TransformerEncoder p(stock);
      return p(x);
    }();
    CHECK(torch::equal(model(x), plain));
    {
      // Guards nest: the inner one gives back the outer one's state, not "enabled".
      peft::AdaptersDisabled inner(*model);
    }
    CHECK(torch::equal(model(x), plain));
  }
  CHECK(torch::equal(model(x), only_b));
  peft::set_adapter(*model, {"a", "b"});
  CHECK(torch::equal(model(x), both));
  CHECK_THROWS_WITH(peft::set_adapter(*model, {"c"}),
                    Catch::Contains("no adapter named \"c\"; attached: a, b"));
  CHECK_THROWS_WITH(
      peft::attach(*model, peft::LoRAOptions(2).adapter_name("a")),
      Catch::Contains("adapter \"a\" is already attached at \"layers.0.self_attn.query\""));
}

TEST_CASE("delete_adapter removes one adapter for good and refuses merged or unknown names",
          "[lora][core]") {
  auto stock = stock_encoder();
  peft::nn::TransformerEncoder model(stock);
  peft::attach(*model, peft::LoRAOptions(2).adapter_name("a"));
  peft::attach(*model, peft::LoRAOptions(2).adapter_name("b").targets({"linear1"}));
  for (auto& [path, m] : peft::attached_methods(*model)) randomize(*m);
  auto x = torch::randn({4, 2, kDim});
  peft::set_adapter(*model, {"b"});
  const auto only_b = model(x);
  peft::set_adapter(*model, {"a", "b"});
  const auto before = peft::count_parameters(*model);

  // Expected from the options, r (in + out) per site: "a" at query and value, "b" at linear1.
  const int64_t a_params = kLayers * 2 * 2 * (kDim + kDim);
  const int64_t b_params = kLayers * 2 * (kDim + kFF);
  CHECK(before.trainable == a_params + b_params);
  auto removed = peft::delete_adapter(*model, "a");
  CHECK(removed.size() == static_cast<size_t>(2 * kLayers));
  CHECK(removed.front() == "layers.0.self_attn.query");
  CHECK(peft::adapter_names(*model) == std::vector<std::string>{"b"});
  CHECK(peft::count_parameters(*model).trainable == before.trainable - a_params);
  CHECK(peft::count_parameters(*model).trainable == b_params);
  CHECK(peft::count_parameters(*model).total == before.total - a_params);
  for (const auto& p : model->named_parameters())
    CHECK(p.key().find(".lora_a.") == std::string::npos);
  // Only "b" runs now, and "a" cannot be switched back on.
  CHECK(torch::equal(model(x), only_b));
  CHECK_THROWS_WITH(peft::set_adapter(*model, {"a"}),
                    Catch::Contains("no adapter named \"a\"; attached: b"));
  CHECK_THROWS_WITH(peft::delete_adapter(*model, "a"),
                    Catch::Contains("[peft::delete_adapter] no adapter named \"a\"; attached: b"));
  // A merged adapter stays, and so does everything else.
  peft::merge(*model);
  CHECK_THROWS_WITH(
      peft::delete_adapter(*model, "b"),
      Catch::Contains("adapter \"b\" is merged at \"layers.0.linear1\"; unmerge first"));
  CHECK(peft::adapter_names(*model) == std::vector<std::string>{"b"});
  peft::unmerge(*model);
  peft::delete_adapter(*model, "b");
  CHECK(peft::attached_methods(*model).empty());
  CHECK(peft::count_parameters(*model).trainable == 0);
  CHECK(max_diff(model(x), peft::nn::TransformerEncoder(stock)(x)) <= 1e-6);

  // The site-level call names what is missing.
  auto site = model->layer(0)->self_attn->query;
  CHECK_THROWS_WITH(site->remove("lora", "b"),
                    Catch::Contains("adapter \"b\" has no lora at this linear site (\"query\")"));
}

TEST_CASE("LoRA: bad options and unknown targets name the option and the value", "[lora]") {
  peft::nn::TransformerEncoder model(stock_encoder());
  CHECK_THROWS_WITH(peft::attach(*model, peft::LoRAOptions(0)),
                    Catch::Contains("[peft::lora] rank must be positive, got r=0"));
  CHECK_THROWS_WITH(peft::attach(*model, peft::LoRAOptions(4).alpha(0)),
                    Catch::Contains("alpha must be positive, got alpha=0"));
  CHECK_THROWS_WITH(peft::attach(*model, peft::LoRAOptions(4).dropout(1.5)),
                    Catch::Contains("dropout must be in [0, 1), got dropout=1.5"));
  CHECK_THROWS_WITH(
      peft::attach(*model, peft::LoRAOptions(4).targets({"qury"})),
      Catch::Contains("[peft::lora] target \"qury\" matched no module; candidates: key, linear1, "
                      "linear2, out_proj, query, value"));
  CHECK_THROWS_WITH(peft::attach(*model, peft::LoRAOptions(4).target_regex("(")),
                    Catch::Contains("is not a valid regular expression"));
  // Nothing was attached by the failed calls.
  CHECK(peft::attached_methods(*model).empty());

  auto sites = peft::attach(
      *model, peft::LoRAOptions(4).target_regex(".*self_attn\\.(query|key)").layers({1}));
  CHECK(sites == std::vector<std::string>{"layers.1.self_attn.query", "layers.1.self_attn.key"});
  auto dense = peft::attach(*model, peft::LoRAOptions(4).targets({"dense"}).adapter_name("d"));
  CHECK(dense.size() == 3 * static_cast<size_t>(kLayers));
}

TEST_CASE("LoRA: only LoRA tensors train and the model learns the scale task", "[lora]") {
  auto encoder = stock_encoder();
  peft::nn::TransformerEncoder model(encoder);
  peft::attach(*model, peft::LoRAOptions(4).alpha(8));
  auto x = torch::randn({5, 3, kDim});
  for (auto& [path, m] : peft::attached_methods(*model)) randomize(*m);
  check_frozen_stays_frozen(*model, [&] { return model(x).pow(2).mean(); });

  peft::nn::TransformerEncoder fresh(stock_encoder());
  peft::attach(*fresh, peft::LoRAOptions(4).alpha(8));
  const double baseline = head_only_baseline();
  const double tuned = train_scale_task([&](const torch::Tensor& in) { return fresh(in); },
                                        peft::trainable_parameters(*fresh));
  INFO("head only " << baseline << ", lora " << tuned);
  CHECK(tuned <= 0.5 * baseline);
}

// -------------------------------------------------------------------------------------- BitFit

TEST_CASE("BitFit on the query bias equals the stock layer with that bias shifted", "[bitfit]") {
  torch::manual_seed(2);
  auto stock = stock_layer();
  auto reference = stock_layer();
  {
    torch::NoGradGuard no_grad;
    auto src = stock->named_parameters();
    auto dst = reference->named_parameters();
    for (const auto& item : src) dst[item.key()].copy_(item.value());
  }
  peft::BitFit<torch::nn::TransformerEncoderLayer> tuned(
      stock, peft::BitFitOptions().targets({"query", "linear1"}));
  auto x = torch::randn({5, 2, kDim});
  CHECK(max_diff(tuned(x), stock(x)) <= 1e-5);

  auto methods = peft::attached_methods(*tuned);
  REQUIRE(methods.size() == 2);
  CHECK(methods[0].first == "self_attn.query");
  CHECK(methods[1].first == "linear1");
  auto dq = torch::randn({kDim}) * 0.5, d1 = torch::randn({kFF}) * 0.5;
  {
    torch::NoGradGuard no_grad;
    std::dynamic_pointer_cast<peft::BitFitImpl>(methods[0].second)->bias.copy_(dq);
    std::dynamic_pointer_cast<peft::BitFitImpl>(methods[1].second)->bias.copy_(d1);
    reference->self_attn->in_proj_bias.narrow(0, 0, kDim).add_(dq);
    reference->linear1->bias.add_(d1);
  }
  CHECK(max_diff(tuned(x), reference(x)) <= 1e-5);
  CHECK(peft::count_parameters(*tuned).trainable == kDim + kFF);

  CHECK(peft::merge(*tuned) == 2);
  CHECK(max_diff(stock->self_attn->in_proj_bias, reference->self_attn->in_proj_bias) <= 1e-6);
  CHECK(max_diff(tuned(x), reference(x)) <= 1e-5);
}

TEST_CASE("BitFit: layer_norm trains the selected layers' LayerNorms, nothing else", "[bitfit]") {
  peft::nn::TransformerEncoder model(stock_encoder());
  peft::attach(*model, peft::BitFitOptions().layer_norm(true).layers({1}));
  std::vector<std::string> names;
  for (auto& [name, p] : peft::named_trainable_parameters(*model)) names.push_back(name);
  const std::vector<std::string> expected = {"base.layers.1.norm1.weight",
                                             "base.layers.1.norm1.bias",
                                             "base.layers.1.norm2.weight",
                                             "base.layers.1.norm2.bias",
                                             "layers.1.self_attn.query.bitfit_default.bias",
                                             "layers.1.self_attn.key.bitfit_default.bias",
                                             "layers.1.self_attn.value.bitfit_default.bias",
                                             "layers.1.self_attn.out_proj.bitfit_default.bias",
                                             "layers.1.linear1.bitfit_default.bias",
                                             "layers.1.linear2.bitfit_default.bias"};
  CHECK(names == expected);
  CHECK_THROWS_WITH(peft::attach(*model, peft::BitFitOptions().targets({"prompt"})),
                    Catch::Contains("[peft::bitfit] target \"prompt\" matched no module"));
}

TEST_CASE("BitFit: gradients stay on biases and the model learns the scale task", "[bitfit]") {
  peft::nn::TransformerEncoder model(stock_encoder());
  peft::attach(*model, peft::BitFitOptions());
  auto x = torch::randn({5, 3, kDim});
  check_frozen_stays_frozen(*model, [&] { return model(x).pow(2).mean(); });

  peft::nn::TransformerEncoder fresh(stock_encoder());
  peft::attach(*fresh, peft::BitFitOptions());
  const double baseline = head_only_baseline();
  const double tuned = train_scale_task([&](const torch::Tensor& in) { return fresh(in); },
                                        peft::trainable_parameters(*fresh));
  INFO("head only " << baseline << ", bitfit " << tuned);
  CHECK(tuned <= 0.5 * baseline);
}

// ------------------------------------------------------------------------------------ Adapters

TEST_CASE("Adapters are the identity at init for every kind", "[adapter]") {
  auto x = torch::randn({5, 2, kDim});
  for (auto kind :
       {peft::AdapterKind::Houlsby, peft::AdapterKind::Pfeiffer, peft::AdapterKind::Parallel}) {
    auto stock = stock_encoder();
    peft::nn::TransformerEncoder model(stock);
    auto sites = peft::attach(*model, peft::AdapterOptions(kind).reduction_factor(4));
    INFO(peft::to_string(kind));
    CHECK(sites.size() == (kind == peft::AdapterKind::Houlsby ? 2u : 1u) * kLayers);
    CHECK(max_diff(model(x), stock(x)) <= 1e-5);
    // Against the same wrapper with the adapters switched off, the kernels are the same: a zero
    // up-projection adds exact zeros.
    auto with_adapters = model(x);
    peft::AdaptersDisabled off(*model);
    CHECK(torch::equal(with_adapters, model(x)));
    const int64_t per_adapter = 2 * kDim * (kDim / 4) + kDim + kDim / 4;
    CHECK(peft::count_parameters(*model).trainable ==
          static_cast<int64_t>(sites.size()) * per_adapter);
  }
}

TEST_CASE("Pfeiffer and parallel adapters compute what the papers describe", "[adapter]") {
  torch::manual_seed(4);
  auto stock = stock_layer();
  stock->eval();
  auto x = torch::randn({5, 2, kDim});
  // The stock layer's pieces, by hand (dropout 0, eval).
  auto attended = std::get<0>(stock->self_attn(x, x, x));
  auto h = stock->norm1(x + attended);
  auto ffn = stock->linear2(torch::relu(stock->linear1(h)));

  for (auto kind : {peft::AdapterKind::Pfeiffer, peft::AdapterKind::Parallel}) {
    peft::Adapter<torch::nn::TransformerEncoderLayer> tuned(
        stock, peft::AdapterOptions(kind).bottleneck(3).activation("tanh").scaling(0.5));
    tuned->eval();
    auto adapter =
        std::dynamic_pointer_cast<peft::AdapterImpl>(peft::attached_methods(*tuned).at(0).second);
    REQUIRE(adapter);
    randomize(*adapter, 0.3);
    const auto& source = kind == peft::AdapterKind::Pfeiffer ? ffn : h;
    auto down = torch::tanh(torch::matmul(source, adapter->adapter_down->weight.t()) +
                            adapter->adapter_down->bias);
    auto up = torch::matmul(down, adapter->adapter_up->weight.t()) + adapter->adapter_up->bias;
    auto expected = stock->norm2(h + ffn + 0.5 * up);
    INFO(peft::to_string(kind));
    CHECK(max_diff(tuned(x), expected) <= 1e-5);
  }
}

TEST_CASE("Adapters: bad options, frozen base, and learning the scale task", "[adapter]") {
  peft::nn::TransformerEncoder model(stock_encoder());
  CHECK_THROWS_WITH(peft::attach(*model, peft::AdapterOptions().reduction_factor(0)),
                    Catch::Contains("[peft::adapter] reduction_factor must be positive, got 0"));
  CHECK_THROWS_WITH(peft::attach(*model, peft::AdapterOptions().activation("swish2")),
                    Catch::Contains("unknown activation \"swish2\""));
  CHECK_THROWS_WITH(peft::attach(*model, peft::AdapterOptions().reduction_factor(32)),
                    Catch::Contains("reduction_factor 32 leaves no units of dimension 16"));
  peft::attach(*model, peft::AdapterOptions().reduction_factor(4));
  for (auto& [path, m] : peft::attached_methods(*model)) randomize(*m);
  auto x = torch::randn({5, 3, kDim});
  check_frozen_stays_frozen(*model, [&] { return model(x).pow(2).mean(); });

  peft::nn::TransformerEncoder fresh(stock_encoder());
  peft::attach(*fresh, peft::AdapterOptions().reduction_factor(4));
  const double baseline = head_only_baseline();
  const double tuned = train_scale_task([&](const torch::Tensor& in) { return fresh(in); },
                                        peft::trainable_parameters(*fresh));
  INFO("head only " << baseline << ", adapter " << tuned);
  CHECK(tuned <= 0.5 * baseline);
}

// -------------------------------------------------------------------------------------- Prefix

TEST_CASE("A one-row prefix equals stock attention with add_bias_kv", "[prefix]") {
  // Attention is invariant to the order of keys, so one prefix row in front is the stock module's
  // learned bias_k/bias_v row at the end.
  torch::manual_seed(3);
  torch::nn::MultiheadAttention with_bias(
      torch::nn::MultiheadAttentionOptions(kDim, kHeads).add_bias_kv(true));
  torch::nn::MultiheadAttention plain(torch::nn::MultiheadAttentionOptions(kDim, kHeads));
  {
    torch::NoGradGuard no_grad;
    plain->in_proj_weight.copy_(with_bias->in_proj_weight);
    plain->in_proj_bias.copy_(with_bias->in_proj_bias);
    plain->out_proj->weight.copy_(with_bias->out_proj->weight);
    plain->out_proj->bias.copy_(with_bias->out_proj->bias);
  }
  peft::PrefixTuning<torch::nn::MultiheadAttention> tuned(plain, peft::PrefixOptions(1));
  auto prefix =
      std::dynamic_pointer_cast<peft::PrefixImpl>(peft::attached_methods(*tuned).at(0).second);
  {
    torch::NoGradGuard no_grad;
    prefix->prefix_keys.copy_(with_bias->bias_k.view({1, kDim}));
    prefix->prefix_values.copy_(with_bias->bias_v.view({1, kDim}));
  }
  const int64_t L = 6, N = 3;
  auto x = torch::randn({L, N, kDim});
  auto kpm = padding_mask(N, L);
  auto expected = std::get<0>(with_bias(x, x, x, kpm));
  CHECK(max_diff(tuned(x, x, x, kpm), expected) <= 1e-5);
  auto expected_masked = std::get<0>(with_bias(x, x, x, torch::Tensor(), false, causal_mask(L)));
  CHECK(max_diff(tuned(x, x, x, torch::Tensor(), causal_mask(L)), expected_masked) <= 1e-5);
}

TEST_CASE("Longer prefixes match stock attention given the extended keys and values", "[prefix]") {
  torch::manual_seed(3);
  torch::nn::MultiheadAttention stock(torch::nn::MultiheadAttentionOptions(kDim, kHeads));
  peft::PrefixTuning<torch::nn::MultiheadAttention> tuned(stock, peft::PrefixOptions(4));
  auto prefix =
      std::dynamic_pointer_cast<peft::PrefixImpl>(peft::attached_methods(*tuned).at(0).second);
  const int64_t L = 5, N = 2, n = 4, D = kDim / kHeads;
  auto x = torch::randn({L, N, kDim});
  // Keys and values by hand, in the layout the stock functional's static_k/static_v take.
  auto w = stock->in_proj_weight;
  auto b = stock->in_proj_bias;
  auto k = torch::cat({prefix->prefix_keys.unsqueeze(1).expand({n, N, kDim}),
                       torch::matmul(x, w.narrow(0, kDim, kDim).t()) + b.narrow(0, kDim, kDim)});
  auto v =
      torch::cat({prefix->prefix_values.unsqueeze(1).expand({n, N, kDim}),
                  torch::matmul(x, w.narrow(0, 2 * kDim, kDim).t()) + b.narrow(0, 2 * kDim, kDim)});
  auto static_k = k.contiguous().view({n + L, N * kHeads, D}).transpose(0, 1);
  auto static_v = v.contiguous().view({n + L, N * kHeads, D}).transpose(0, 1);
  namespace F = torch::nn::functional;
  auto expected = std::get<0>(F::multi_head_attention_forward(
      x, x, x,
      F::MultiheadAttentionForwardFuncOptions(kDim, kHeads, w, b, {}, {}, false, 0.0,
                                              stock->out_proj->weight, stock->out_proj->bias)
          .static_k(static_k)
          .static_v(static_v)
          .need_weights(false)));
  CHECK(max_diff(tuned(x, x, x), expected) <= 1e-5);
  CHECK(peft::count_parameters(*tuned).trainable == 2 * n * kDim);
}

TEST_CASE("Prefix: projection folds exactly, bad options, learns the scale task", "[prefix]") {
  peft::nn::TransformerEncoder model(stock_encoder());
  CHECK_THROWS_WITH(peft::attach(*model, peft::PrefixOptions(0)),
                    Catch::Contains("[peft::prefix] num_virtual_tokens must be positive, got 0"));
  peft::attach(*model, peft::PrefixOptions(3).projection(true).projection_hidden(8));
  auto x = torch::randn({5, 2, kDim});
  auto kpm = padding_mask(2, 5);
  auto before = model(x, torch::Tensor(), kpm);
  const int64_t projected = peft::count_parameters(*model).trainable;
  CHECK(projected == kLayers * (3 * kDim + kDim * 8 + 8 + 8 * 2 * kDim + 2 * kDim));
  peft::fold(*model);
  CHECK(max_diff(model(x, torch::Tensor(), kpm), before) <= 1e-6);
  CHECK(peft::count_parameters(*model).trainable == kLayers * 2 * 3 * kDim);
  check_frozen_stays_frozen(*model, [&] { return model(x, torch::Tensor(), kpm).pow(2).mean(); });

  peft::nn::TransformerEncoder fresh(stock_encoder());
  peft::attach(*fresh, peft::PrefixOptions(4));
  const double baseline = head_only_baseline();
  const double tuned = train_scale_task([&](const torch::Tensor& in) { return fresh(in); },
                                        peft::trainable_parameters(*fresh));
  INFO("head only " << baseline << ", prefix " << tuned);
  CHECK(tuned <= 0.5 * baseline);
}

// -------------------------------------------------------------------------------------- Prompt

TEST_CASE("Prompt tuning on an encoder equals the stock encoder on the extended input",
          "[prompt]") {
  auto stock = stock_encoder();
  peft::PromptTuning<torch::nn::TransformerEncoder> tuned(stock,
                                                          peft::PromptOptions(3).init_std(1.0));
  auto rows =
      std::dynamic_pointer_cast<peft::PromptImpl>(peft::attached_methods(*tuned).at(0).second)
          ->prompt_embeddings;
  const int64_t L = 5, N = 3, n = 3;
  auto x = torch::randn({L, N, kDim});
  auto kpm = padding_mask(N, L);
  auto extended = torch::cat({rows.unsqueeze(1).expand({n, N, kDim}), x});
  auto extended_kpm = torch::cat({torch::zeros({N, n}, torch::kBool), kpm}, 1);
  auto out = tuned(x, torch::Tensor(), kpm);
  CHECK(out.sizes() == torch::IntArrayRef({n + L, N, kDim}));
  CHECK(tuned->prompt_length() == n);
  CHECK(max_diff(out, stock(extended, torch::Tensor(), extended_kpm)) <= 1e-5);

  // With a causal mask, prompt positions only see each other: changing tokens leaves them alone.
  auto causal = causal_mask(L);
  auto a = tuned(x, causal);
  auto b = tuned(x + 1.0, causal);
  CHECK(max_diff(a.narrow(0, 0, n), b.narrow(0, 0, n)) <= 1e-6);
  CHECK(max_diff(a.narrow(0, n, L), b.narrow(0, n, L)) > 1e-3);
}

TEST_CASE("Prompt tuning on an embedding: rows in front, initialised from token ids", "[prompt]") {
  torch::nn::Embedding table(30, kDim);
  peft::PromptTuning<torch::nn::Embedding> tuned(
      table, peft::PromptOptions(5).init(peft::PromptInit::Tokens).token_ids({7, 2}));
  auto rows =
      std::dynamic_pointer_cast<peft::PromptImpl>(peft::attached_methods(*tuned).at(0).second)
          ->prompt_embeddings;
  auto expected_rows = table->weight.index_select(0, torch::tensor({7, 2, 7, 2, 7}, torch::kLong));
  CHECK(torch::equal(rows, expected_rows));
  auto ids = torch::randint(30, {2, 4});
  auto out = tuned(ids);
  CHECK(out.sizes() == torch::IntArrayRef({2, 9, kDim}));
  CHECK(torch::equal(out.narrow(1, 5, 4), table(ids)));
  CHECK(torch::equal(out[1].narrow(0, 0, 5), expected_rows));

  peft::PromptTuning<torch::nn::Embedding> sampled(
      table, peft::PromptOptions(4).init(peft::PromptInit::Vocab));
  auto sampled_rows =
      std::dynamic_pointer_cast<peft::PromptImpl>(peft::attached_methods(*sampled).at(0).second)
          ->prompt_embeddings;
  for (int64_t i = 0; i < 4; ++i) {
    // Each row is a copy of some vocabulary row.
    CHECK((table->weight - sampled_rows[i]).abs().sum(1).min().item<double>() == 0.0);
  }
}

TEST_CASE("Prompt: bad options, only prompts train, learns the scale task", "[prompt]") {
  peft::nn::TransformerEncoder model(stock_encoder());
  CHECK_THROWS_WITH(peft::attach(*model, peft::PromptOptions(0)),
                    Catch::Contains("[peft::prompt] num_virtual_tokens must be positive, got 0"));
  CHECK_THROWS_WITH(peft::attach(*model, peft::PromptOptions(2).init(peft::PromptInit::Vocab)),
                    Catch::Contains("needs a vocabulary table"));
  CHECK_THROWS_WITH(peft::attach(*model, peft::PromptOptions(2).init(peft::PromptInit::Tokens)),
                    Catch::Contains("init Tokens needs token_ids"));
  peft::attach(*model, peft::PromptOptions(4));
  auto x = torch::randn({5, 3, kDim});
  check_frozen_stays_frozen(*model, [&] { return model(x).pow(2).mean(); });

  peft::nn::TransformerEncoder fresh(stock_encoder());
  peft::attach(*fresh, peft::PromptOptions(4));
  const double baseline = head_only_baseline();
  const double tuned = train_scale_task([&](const torch::Tensor& in) { return fresh(in); },
                                        peft::trainable_parameters(*fresh));
  INFO("head only " << baseline << ", prompt " << tuned);
  CHECK(tuned <= 0.5 * baseline);
}

// --------------------------------------------------------------------------------- Composition

TEST_CASE("Methods compose on one model without special cases", "[lora][adapter][prefix][prompt]") {
  auto stock = stock_encoder();
  peft::nn::TransformerEncoder model(stock);
  peft::attach(*model, peft::LoRAOptions(2));
  peft::attach(*model, peft::AdapterOptions().reduction_factor(4));
  peft::attach(*model, peft::BitFitOptions().targets({"linear1"}));
  auto x = torch::randn({4, 2, kDim});
  CHECK(max_diff(model(x), stock(x)) <= 1e-6);
  peft::attach(*model, peft::PrefixOptions(2));
  peft::attach(*model, peft::PromptOptions(2));
  CHECK(peft::attached_methods(*model).size() ==
        static_cast<size_t>(kLayers * (2 + 2 + 1 + 1) + 1));
  check_frozen_stays_frozen(*model, [&] { return model(x).pow(2).mean(); });
  // Merging folds LoRA and BitFit in; the others keep running and the output is unchanged.
  auto before = model(x);
  CHECK(peft::merge(*model) == kLayers * 3);
  CHECK(max_diff(model(x), before) <= 1e-5);
  CHECK(peft::adapter_bytes(*model) > 0);
}
