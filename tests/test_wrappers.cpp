// Invariant 1 (exactness): with no method attached, or every method at its identity
// initialisation, a wrapper's output equals the stock module's.
#include <peft/core/attach.hpp>
#include <peft/core/parameters.hpp>
#include <peft/detail/linear.hpp>
#include <peft/functional/attention.hpp>
#include <peft/methods/adapter.hpp>
#include <peft/methods/lora.hpp>
#include <peft/methods/prefix.hpp>
#include <peft/methods/prompt.hpp>
#include <peft/nn/attention.hpp>
#include <peft/nn/embedding.hpp>
#include <peft/nn/encoder.hpp>
#include <peft/nn/encoder_layer.hpp>
#include <peft/nn/linear.hpp>
#include <peft/nn/tuned.hpp>
#include <peft/train/precision.hpp>

#include "helpers.hpp"

#include <algorithm>

using namespace testing;

namespace {

// The gradients of a module's trainable parameters in registration order, copied (zeros where a
// parameter got none).
std::vector<torch::Tensor> trainable_grads(torch::nn::Module& module) {
  std::vector<torch::Tensor> out;
  for (auto& p : peft::trainable_parameters(module)) {
    out.push_back(p.grad().defined() ? p.grad().clone() : torch::zeros_like(p));
  }
  return out;
}

// Two lists of gradients agree within `tolerance`, and the expected ones are not all near zero
// (their largest entry exceeds `floor`), so the agreement says something.
void check_same_grads(const std::vector<torch::Tensor>& got,
                      const std::vector<torch::Tensor>& expected, double tolerance, double floor) {
  REQUIRE(got.size() == expected.size());
  double largest = 0.0;
  for (size_t i = 0; i < got.size(); ++i) {
    INFO("tensor " << i);
    CHECK(max_diff(got[i], expected[i]) <= tolerance);
    largest = std::max(largest, expected[i].abs().max().item<double>());
  }
  CHECK(largest > floor);
}

}  // namespace

TEST_CASE("nn::Linear and nn::Embedding reproduce the stock modules bit for bit",
          "[core][wrappers]") {
  torch::manual_seed(0);
  torch::nn::Linear stock(kDim, 8);
  peft::nn::Linear wrapped(stock);
  auto x = torch::randn({4, 5, kDim});
  CHECK(torch::equal(wrapped(x), stock(x)));
  CHECK_FALSE(stock->weight.requires_grad());
  CHECK(peft::trainable_parameters(*wrapped).empty());

  torch::nn::Embedding table(50, kDim);
  peft::nn::Embedding embedding(table);
  auto ids = torch::randint(50, {3, 7});
  CHECK(torch::equal(embedding(ids), table(ids)));
  CHECK(embedding->prompt_length() == 0);
}

TEST_CASE("nn::MultiheadAttention matches stock attention with masks, in eval and train",
          "[core][wrappers]") {
  torch::manual_seed(0);
  torch::nn::MultiheadAttention stock(
      torch::nn::MultiheadAttentionOptions(kDim, kHeads).dropout(0.0));
  peft::nn::MultiheadAttention wrapped(stock);
  const int64_t L = 7, N = 4;
  auto x = torch::randn({L, N, kDim});
  auto kpm = padding_mask(N, L);
  auto mask = causal_mask(L);

  for (bool training : {false, true}) {
    stock->train(training);
    wrapped->train(training);
    INFO("training " << training);
    auto expected = std::get<0>(stock(x, x, x, kpm, false, mask));
    CHECK(max_diff(wrapped(x, x, x, kpm, mask), expected) <= 1e-5);
    CHECK(max_diff(wrapped(x, x, x), std::get<0>(stock(x, x, x))) <= 1e-5);
  }

  SECTION("cross attention: separate key and value tensors") {
    auto memory = torch::randn({5, N, kDim});
    auto other = torch::randn({5, N, kDim});
    auto expected = std::get<0>(stock(x, memory, other, padding_mask(N, 5)));
    CHECK(max_diff(wrapped(x, memory, other, padding_mask(N, 5)), expected) <= 1e-5);
    CHECK(max_diff(wrapped(x, memory, memory), std::get<0>(stock(x, memory, memory))) <= 1e-5);
  }

  SECTION("attention dropout draws the same numbers as the stock module") {
    torch::nn::MultiheadAttention dropping(
        torch::nn::MultiheadAttentionOptions(kDim, kHeads).dropout(0.3));
    peft::nn::MultiheadAttention wrapped_dropping(dropping);
    dropping->train();
    wrapped_dropping->train();
    torch::manual_seed(42);
    auto expected = std::get<0>(dropping(x, x, x, kpm, false, mask));
    torch::manual_seed(42);
    CHECK(torch::equal(wrapped_dropping(x, x, x, kpm, mask), expected));
  }

  SECTION("the input's gradient equals the stock module's (frozen_split_linear's backward)") {
    auto upstream = torch::randn({L, N, kDim});
    auto xs = x.clone().requires_grad_(true);
    (std::get<0>(stock(xs, xs, xs, kpm)) * upstream).sum().backward();
    auto xw = x.clone().requires_grad_(true);
    (wrapped(xw, xw, xw, kpm) * upstream).sum().backward();
    CHECK(max_diff(xw.grad(), xs.grad()) <= 1e-5);
    // Cross attention: key == value packs two projections.
    auto memory = torch::randn({5, N, kDim});
    auto ms = memory.clone().requires_grad_(true);
    auto qs = x.clone().requires_grad_(true);
    (std::get<0>(stock(qs, ms, ms)) * upstream).sum().backward();
    auto mw = memory.clone().requires_grad_(true);
    auto qw = x.clone().requires_grad_(true);
    (wrapped(qw, mw, mw) * upstream).sum().backward();
    CHECK(max_diff(mw.grad(), ms.grad()) <= 1e-5);
    CHECK(max_diff(qw.grad(), qs.grad()) <= 1e-5);
  }

  SECTION("bad shapes name what was wrong") {
    CHECK_THROWS_WITH(wrapped(torch::randn({L, N, 8}), x, x),
                      Catch::Contains("query has shape [7, 4, 8], expected [L, N, 16]"));
    CHECK_THROWS_WITH(wrapped(x, x, x, torch::zeros({N, L + 1}, torch::kBool)),
                      Catch::Contains("key_padding_mask has shape [4, 8], expected [4, 7]"));
  }
}

TEST_CASE("frozen_split_linear: the packed product's chunks and the same input gradient",
          "[core][wrappers]") {
  torch::manual_seed(0);
  auto weight = torch::randn({3 * kDim, kDim});
  auto bias = torch::randn({3 * kDim});
  auto x0 = torch::randn({5, 2, kDim});
  auto upstream = torch::randn({3, 5, 2, kDim});
  // Reference: one packed product and its views, through stock autograd.
  auto xr = x0.clone().requires_grad_(true);
  auto ref = peft::detail::linear(xr, weight, bias).chunk(3, -1);
  // The key's output unused: its gradient never arrives.
  ((ref[0] * upstream[0]).sum() + (ref[2] * upstream[2]).sum()).backward();
  auto xs = x0.clone().requires_grad_(true);
  auto out = peft::detail::frozen_split_linear(xs, weight, bias, 3);
  REQUIRE(out.size() == 3);
  for (int i = 0; i < 3; ++i) {
    CHECK(max_diff(out[i], ref[i]) <= 1e-5);
    CHECK(out[i].is_contiguous());
  }
  // Separate tensors: freeing one frees its memory.
  CHECK(out[0].storage().data() != out[1].storage().data());
  ((out[0] * upstream[0]).sum() + (out[2] * upstream[2]).sum()).backward();
  CHECK(max_diff(xs.grad(), xr.grad()) <= 1e-5);
  // By hand: x's gradient is g_q W_q + g_v W_v.
  auto by_hand = torch::matmul(upstream[0], weight.narrow(0, 0, kDim)) +
                 torch::matmul(upstream[2], weight.narrow(0, 2 * kDim, kDim));
  CHECK(max_diff(xs.grad(), by_hand) <= 1e-5);

  SECTION("under bf16 autocast the gradient comes back in the input's type") {
    auto xa = x0.clone().requires_grad_(true);
    torch::Tensor loss;
    {
      peft::AutocastGuard guard(torch::kCPU, peft::Precision::bf16);
      auto parts = peft::detail::frozen_split_linear(xa, weight, bias, 3);
      CHECK(parts[1].scalar_type() == torch::kBFloat16);
      loss = (parts[1].to(torch::kFloat) * upstream[1]).sum();
    }
    loss.backward();
    CHECK(xa.grad().scalar_type() == torch::kFloat);
    auto expected = torch::matmul(upstream[1], weight.narrow(0, kDim, kDim));
    CHECK(max_diff(xa.grad(), expected) <= 0.05 * expected.abs().max().item<double>());
  }
}

TEST_CASE("nn::TransformerEncoderLayer matches the stock layer (ReLU and GELU, masks, dropout)",
          "[core][wrappers]") {
  const int64_t L = 6, N = 3;
  for (bool gelu : {false, true}) {
    torch::manual_seed(1);
    auto stock = stock_layer(0.1, gelu);
    peft::nn::TransformerEncoderLayer wrapped(stock);
    auto x = torch::randn({L, N, kDim});
    auto kpm = padding_mask(N, L);
    auto mask = causal_mask(L);
    INFO("gelu " << gelu);

    stock->eval();
    wrapped->eval();
    CHECK(max_diff(wrapped(x, mask, kpm), stock(x, mask, kpm)) <= 1e-5);
    CHECK(max_diff(wrapped(x), stock(x)) <= 1e-5);

    // In training every dropout draws in the stock order, so the same seed gives the same output.
    stock->train();
    wrapped->train();
    torch::manual_seed(7);
    auto expected = stock(x, mask, kpm);
    torch::manual_seed(7);
    CHECK(torch::equal(wrapped(x, mask, kpm), expected));
  }
}

TEST_CASE("nn::TransformerEncoder matches the stock encoder, final norm included",
          "[core][wrappers]") {
  const int64_t L = 5, N = 4;
  auto stock = stock_encoder(0.0, /*final_norm=*/true);
  peft::nn::TransformerEncoder wrapped(stock);
  auto x = torch::randn({L, N, kDim});
  auto kpm = padding_mask(N, L);
  for (bool training : {false, true}) {
    stock->train(training);
    wrapped->train(training);
    CHECK(max_diff(wrapped(x, causal_mask(L), kpm), stock(x, causal_mask(L), kpm)) <= 1e-5);
  }
  // The wrapper freezes the stock encoder, clones and all.
  for (const auto& p : stock->parameters()) CHECK_FALSE(p.requires_grad());
  CHECK(peft::count_parameters(*wrapped).total == peft::count_parameters(*stock).total);
  CHECK(wrapped->layers->size() == static_cast<size_t>(kLayers));

  // Every hidden state, as a side network reads them: the input, then each layer's output.
  stock->eval();
  wrapped->eval();
  auto states = wrapped->hidden_states(x, torch::Tensor(), kpm);
  REQUIRE(states.size() == static_cast<size_t>(kLayers) + 1);
  CHECK(torch::equal(states[0], x));
  auto first = stock->layers->at<torch::nn::TransformerEncoderLayerImpl>(0).forward(x, {}, kpm);
  CHECK(max_diff(states[1], first) <= 1e-5);
  CHECK(torch::equal(states.back(), wrapped(x, torch::Tensor(), kpm)));
}

TEST_CASE("forward_first: the first rows of the stock layer's and encoder's output",
          "[core][wrappers]") {
  const int64_t L = 6, N = 4;
  auto x = torch::randn({L, N, kDim});
  auto kpm = padding_mask(N, L);
  auto mask = causal_mask(L);
  for (bool gelu : {false, true}) {
    torch::manual_seed(3);
    auto stock = stock_layer(0.0, gelu);
    peft::nn::TransformerEncoderLayer wrapped(stock);
    stock->eval();
    wrapped->eval();
    INFO("gelu " << gelu);
    for (int64_t rows : {int64_t{1}, int64_t{3}, L}) {
      INFO("rows " << rows);
      auto first = wrapped->forward_first(x, rows, mask, kpm);
      CHECK(max_diff(first, stock(x, mask, kpm).narrow(0, 0, rows)) <= 1e-5);
      CHECK(max_diff(wrapped->forward_first(x, rows), stock(x).narrow(0, 0, rows)) <= 1e-5);
    }
    CHECK_THROWS_WITH(wrapped->forward_first(x, 0),
                      Catch::Contains("0 rows asked of an input of shape [6, 4, 16]"));
    CHECK_THROWS_WITH(wrapped->forward_first(x, L + 1), Catch::Contains("7 rows asked"));
  }

  // The encoder runs only its last layer for the first rows; with methods attached (random, so
  // not at identity) its full forward is the expectation, prompt rows in front included.
  auto stock = stock_encoder(0.0, /*final_norm=*/true);
  peft::nn::TransformerEncoder wrapped(stock);
  stock->eval();
  wrapped->eval();
  CHECK(max_diff(wrapped->forward_first(x, 1, mask, kpm), stock(x, mask, kpm).narrow(0, 0, 1)) <=
        1e-5);
  peft::attach(*wrapped, peft::LoRAOptions(4).targets({"query", "value", "linear1"}));
  peft::attach(*wrapped, peft::AdapterOptions(peft::AdapterKind::Houlsby).reduction_factor(4));
  peft::attach(*wrapped, peft::PromptOptions(2));
  randomize(*wrapped);
  CHECK(wrapped->prompt_length() == 2);
  auto full = wrapped(x, mask, kpm);
  CHECK(full.size(0) == L + 2);
  CHECK(max_diff(wrapped->forward_first(x, 1, mask, kpm), full.narrow(0, 0, 1)) <= 1e-5);
  CHECK(max_diff(wrapped->forward_first(x, 4, mask, kpm), full.narrow(0, 0, 4)) <= 1e-5);

  // Gradients reach the trainable parameters the same way (the loss reads the first row only).
  auto grads = [&](bool first_only) {
    for (auto& p : peft::trainable_parameters(*wrapped)) p.mutable_grad() = torch::Tensor();
    auto out = first_only ? wrapped->forward_first(x, 1, mask, kpm) : wrapped(x, mask, kpm);
    out.select(0, 0).pow(2).sum().backward();
    return trainable_grads(*wrapped);
  };
  check_same_grads(grads(true), grads(false), 1e-5, 1e-3);
}

TEST_CASE("forward_first runs the last feed-forward for the first rows only", "[core][wrappers]") {
  // The first-rows tests above would also pass if forward_first computed every row and cut the
  // result; an activation that counts the token positions it is given shows what is computed.
  const int64_t L = 6, N = 4;
  std::vector<int64_t> positions;
  auto counting = [&positions](const torch::Tensor& t) {
    positions.push_back(t.numel() / kFF);
    return torch::relu(t);
  };
  torch::manual_seed(3);
  torch::nn::TransformerEncoderLayer stock(torch::nn::TransformerEncoderLayerOptions(kDim, kHeads)
                                               .dim_feedforward(kFF)
                                               .dropout(0.0)
                                               .activation(counting));
  peft::nn::TransformerEncoderLayer layer(stock);
  layer->eval();
  auto x = torch::randn({L, N, kDim});
  torch::NoGradGuard no_grad;
  layer(x);
  CHECK(positions == std::vector<int64_t>{L * N});
  positions.clear();
  layer->forward_first(x, 2);
  CHECK(positions == std::vector<int64_t>{2 * N});

  peft::nn::TransformerEncoder encoder(
      torch::nn::TransformerEncoder(torch::nn::TransformerEncoderOptions(stock, kLayers)));
  encoder->eval();
  positions.clear();
  encoder->forward_first(x, 1);
  std::vector<int64_t> expected(kLayers - 1, L * N);  // every position feeds the next layer
  expected.push_back(N);                              // the last layer: position 0 only
  CHECK(positions == expected);
}

TEST_CASE("batch_first: the sequence-first results, transposed, methods and prefixes attached",
          "[core][wrappers]") {
  // The expectation is the sequence-first wrapper, itself checked against the stock modules
  // above; both wrap the same stock encoder and get the same random method weights.
  const int64_t L = 6, N = 4;
  auto stock = stock_encoder(0.0, /*final_norm=*/true);
  auto make = [&](bool batch_first) {
    peft::nn::TransformerEncoder wrapped(stock, batch_first);
    peft::attach(*wrapped, peft::LoRAOptions(4).targets({"query", "value", "linear1"}));
    peft::attach(*wrapped, peft::AdapterOptions(peft::AdapterKind::Houlsby).reduction_factor(4));
    peft::attach(*wrapped, peft::PromptOptions(2));
    peft::attach(*wrapped, peft::PrefixOptions(3));
    torch::manual_seed(7);
    randomize(*wrapped);
    return wrapped;
  };
  auto seq = make(false), bf = make(true);
  CHECK_FALSE(seq->batch_first());
  CHECK(bf->batch_first());
  CHECK(bf->layer(0)->batch_first());
  CHECK(bf->layer(0)->self_attn->batch_first());
  auto x = torch::randn({L, N, kDim});
  auto xb = x.transpose(0, 1).contiguous();
  auto kpm = padding_mask(N, L);
  auto mask = causal_mask(L);
  seq->eval();
  bf->eval();
  auto expected = seq(x, mask, kpm);
  auto got = bf(xb, mask, kpm);
  REQUIRE(got.sizes() == torch::IntArrayRef({N, L + 2, kDim}));
  CHECK(max_diff(got.transpose(0, 1), expected) <= 1e-5);
  for (int64_t rows : {int64_t{1}, int64_t{3}}) {
    INFO("rows " << rows);
    CHECK(max_diff(bf->forward_first(xb, rows, mask, kpm).transpose(0, 1),
                   expected.narrow(0, 0, rows)) <= 1e-5);
  }
  auto states_seq = seq->hidden_states(x, {}, kpm), states_bf = bf->hidden_states(xb, {}, kpm);
  REQUIRE(states_bf.size() == states_seq.size());
  for (size_t i = 0; i < states_bf.size(); ++i) {
    INFO("state " << i);
    CHECK(max_diff(states_bf[i].transpose(0, 1), states_seq[i]) <= 1e-5);
  }
  CHECK_THROWS_WITH(bf->layer(0)->self_attn->forward(xb, x, x),
                    Catch::Contains("must both be [4, S, 16]"));
  CHECK_THROWS_WITH(
      bf->layer(0)->forward_first(xb, L + 1),
      Catch::Contains("7 rows asked of an input of shape [4, 6, 16] (expected [N, L, E]"));

  // Training (no dropout drawn): the same gradients for every trainable parameter.
  seq->train();
  bf->train();
  auto weights = torch::randn({L + 2, N, kDim});
  auto grads = [&](peft::nn::TransformerEncoder& m, const torch::Tensor& in, bool batch_first) {
    auto out = m(in, mask, kpm);
    if (batch_first) out = out.transpose(0, 1);
    (out * weights).sum().backward();
    return trainable_grads(*m);
  };
  check_same_grads(grads(bf, xb, true), grads(seq, x, false), 1e-4, 1e-2);
}

TEST_CASE("functional::attention batch_first: same result, contiguous gradients from the kernel",
          "[core][wrappers]") {
  const int64_t L = 5, S = 7, N = 3, H = 2;
  auto q = torch::randn({L, N, kDim}), k = torch::randn({S, N, kDim}),
       v = torch::randn({S, N, kDim});
  auto kpm = padding_mask(N, S);
  auto mask = torch::randn({L, S});
  auto bf = [](const torch::Tensor& t) { return t.transpose(0, 1).contiguous(); };
  // Eval (the fused kernel from LibTorch 2.0 on), and training with attention dropout (the
  // unfused path, whose dropout draws [N * H, L, S] in the same order for both layouts).
  for (bool dropout : {false, true}) {
    INFO("dropout " << dropout);
    const double p = dropout ? 0.3 : 0.0;
    torch::manual_seed(5);
    auto expected = peft::functional::attention(q, k, v, H, mask, kpm, p, dropout);
    torch::manual_seed(5);
    auto got = peft::functional::attention(bf(q), bf(k), bf(v), H, mask, kpm, p, dropout, true);
    REQUIRE(got.sizes() == torch::IntArrayRef({N, L, kDim}));
    CHECK(max_diff(got.transpose(0, 1), expected) <= 1e-5);
  }
  CHECK_THROWS_WITH(
      peft::functional::attention(bf(q), k, v, H, {}, {}, 0.0, false, true),
      Catch::Contains("keys [7, 3, 16] and values [7, 3, 16] must both be [3, S, 16]"));

#if PEFT_HAS_SDPA
  // Why models::Bert runs batch-first: the fused kernel hands back q's, k's and v's gradients
  // (and its output) in contiguous [N, L, E] memory, so the projections' backward multiplies them
  // as they are. (Sequence-first, they come back with batch-first strides and get copied.)
  std::vector<std::vector<int64_t>> strides(3);
  std::vector<torch::Tensor> inputs;
  for (const auto& t : {q, k, v}) {
    auto leaf = bf(t).requires_grad_();
    auto through = leaf * 1.0;  // a non-leaf, whose hook sees the gradient as the kernel made it
    auto* slot = &strides[inputs.size()];
    through.register_hook([slot](torch::Tensor g) { *slot = g.strides().vec(); });
    inputs.push_back(through);
  }
  auto out =
      peft::functional::attention(inputs[0], inputs[1], inputs[2], H, {}, kpm, 0.0, true, true);
  CHECK(out.is_contiguous());
  out.pow(2).sum().backward();
  const std::vector<int64_t> q_strides{L * kDim, kDim, 1}, kv_strides{S * kDim, kDim, 1};
  CHECK(strides[0] == q_strides);
  CHECK(strides[1] == kv_strides);
  CHECK(strides[2] == kv_strides);
#endif
}

TEST_CASE("sites are found by path and role", "[core][wrappers]") {
  peft::nn::TransformerEncoder wrapped(stock_encoder());
  std::vector<std::string> paths;
  for (const auto& ref : peft::find_sites(*wrapped)) paths.push_back(ref.path);
  const std::vector<std::string> expected = {"prompt",
                                             "layers.0.self_attn.query",
                                             "layers.0.self_attn.key",
                                             "layers.0.self_attn.value",
                                             "layers.0.self_attn.out_proj",
                                             "layers.0.self_attn.prefix",
                                             "layers.0.linear1",
                                             "layers.0.linear2",
                                             "layers.0.attn_block",
                                             "layers.0.ffn_block",
                                             "layers.1.self_attn.query",
                                             "layers.1.self_attn.key",
                                             "layers.1.self_attn.value",
                                             "layers.1.self_attn.out_proj",
                                             "layers.1.self_attn.prefix",
                                             "layers.1.linear1",
                                             "layers.1.linear2",
                                             "layers.1.attn_block",
                                             "layers.1.ffn_block"};
  CHECK(paths == expected);
  CHECK(peft::detail::layer_index("layers.1.self_attn.query") == 1);
  CHECK(peft::detail::layer_index("encoder.layer.11.attention") == 11);
  CHECK(peft::detail::layer_index("prompt") == -1);
}
