#include <peft/core/parameters.hpp>

#include <catch2/catch.hpp>
#include <torch/torch.h>

namespace {

torch::nn::TransformerEncoder small_encoder() {
  auto layer = torch::nn::TransformerEncoderLayer(
      torch::nn::TransformerEncoderLayerOptions(16, 2).dim_feedforward(32).dropout(0.0));
  return torch::nn::TransformerEncoder(torch::nn::TransformerEncoderOptions(layer, 2));
}

// A module that registers one tensor under two names, as tied embeddings do.
struct TiedImpl : torch::nn::Module {
  TiedImpl() {
    a = register_module("a", torch::nn::Linear(4, 4));
    b = register_module("b", torch::nn::Linear(4, 4));
    tied = register_parameter("tied", a->weight);
  }
  torch::nn::Linear a{nullptr}, b{nullptr};
  torch::Tensor tied;
};
TORCH_MODULE(Tied);

}  // namespace

TEST_CASE("freeze turns off requires_grad everywhere, including after clone()", "[core]") {
  auto encoder = small_encoder();
  // The stock encoder clones its layer, and clone() re-runs reset(): everything trains again.
  for (const auto& p : encoder->parameters()) REQUIRE(p.requires_grad());
  peft::freeze(*encoder);
  for (const auto& p : encoder->parameters()) CHECK_FALSE(p.requires_grad());
  CHECK(peft::trainable_parameters(*encoder).empty());

  auto copy = std::dynamic_pointer_cast<torch::nn::TransformerEncoderImpl>(encoder->clone());
  REQUIRE(copy);
  int64_t retrained = 0;
  for (const auto& p : copy->parameters()) retrained += p.requires_grad() ? 1 : 0;
  CHECK(retrained == static_cast<int64_t>(copy->parameters().size()));
  peft::freeze(*copy);
  CHECK(peft::trainable_parameters(*copy).empty());

  peft::unfreeze(*copy);
  CHECK(peft::trainable_parameters(*copy).size() == copy->parameters().size());
}

TEST_CASE("trainable_parameters keeps registration order and drops frozen tensors", "[core]") {
  auto encoder = small_encoder();
  peft::freeze(*encoder);
  auto layer1 = encoder->layers->at<torch::nn::TransformerEncoderLayerImpl>(1);
  layer1.linear2->bias.set_requires_grad(true);
  layer1.self_attn->in_proj_bias.set_requires_grad(true);
  layer1.norm1->weight.set_requires_grad(true);

  auto named = peft::named_trainable_parameters(*encoder);
  REQUIRE(named.size() == 3);
  // Registration order inside a TransformerEncoderLayer: self_attn, linear1, dropout, linear2,
  // norm1, norm2.
  CHECK(named[0].first == "layers.1.self_attn.in_proj_bias");
  CHECK(named[1].first == "layers.1.linear2.bias");
  CHECK(named[2].first == "layers.1.norm1.weight");
  auto tensors = peft::trainable_parameters(*encoder);
  REQUIRE(tensors.size() == 3);
  CHECK(tensors[0].is_same(layer1.self_attn->in_proj_bias));
  CHECK(tensors[1].is_same(layer1.linear2->bias));
  CHECK(tensors[2].is_same(layer1.norm1->weight));
}

TEST_CASE("shared tensors are listed and counted once", "[core]") {
  Tied tied;
  REQUIRE(tied->tied.is_same(tied->a->weight));
  // A module's own parameters come before its children's: "tied" is the first name of a.weight.
  auto named = peft::named_trainable_parameters(*tied);
  REQUIRE(named.size() == 4);
  CHECK(named[0].first == "tied");
  CHECK(named[1].first == "a.bias");
  CHECK(named[2].first == "b.weight");
  CHECK(named[3].first == "b.bias");
  CHECK(tied->parameters().size() == 5);
  auto count = peft::count_parameters(*tied);
  CHECK(count.total == 2 * (16 + 4));
  CHECK(count.trainable == 40);
  CHECK(count.trainable_bytes == 40 * 4);
}

TEST_CASE("count_parameters and the one-line report", "[core]") {
  torch::nn::Linear layer(10, 5);
  auto all = peft::count_parameters(*layer);
  CHECK(all.total == 55);
  CHECK(all.trainable == 55);
  CHECK(peft::trainable_report(*layer) == "trainable 55 / 55 (100.00%)");

  peft::freeze(*layer);
  layer->bias.set_requires_grad(true);
  auto some = peft::count_parameters(*layer);
  CHECK(some.trainable == 5);
  CHECK(some.percent() == Approx(100.0 * 5 / 55));
  CHECK(peft::trainable_report(*layer) == "trainable 5 / 55 (9.09%)");

  std::ostringstream out;
  peft::print_trainable(*layer, out);
  CHECK(out.str() == "trainable 5 / 55 (9.09%)\n");

  peft::ParameterCount big{147456, 22713216, 0};
  CHECK(peft::trainable_report(big) == "trainable 147,456 / 22,713,216 (0.65%)");
  CHECK(peft::detail::group_thousands(0) == "0");
  CHECK(peft::detail::group_thousands(999) == "999");
  CHECK(peft::detail::group_thousands(1000) == "1,000");
  CHECK(peft::detail::group_thousands(-1234567) == "-1,234,567");
}

TEST_CASE("an optimizer given trainable_parameters leaves frozen tensors bit-identical", "[core]") {
  torch::manual_seed(0);
  auto encoder = small_encoder();
  peft::freeze(*encoder);
  torch::nn::Linear head(16, 3);
  auto layer0 = encoder->layers->at<torch::nn::TransformerEncoderLayerImpl>(0);
  layer0.linear1->bias.set_requires_grad(true);

  std::vector<torch::Tensor> frozen_before;
  for (const auto& p : encoder->parameters()) {
    if (!p.requires_grad()) frozen_before.push_back(p.detach().clone());
  }
  auto bias_before = layer0.linear1->bias.detach().clone();

  auto params = peft::trainable_parameters(*encoder);
  for (auto& p : head->parameters()) params.push_back(p);
  torch::optim::AdamW opt(params, torch::optim::AdamWOptions(1e-2));
  auto x = torch::randn({5, 4, 16});
  auto loss = head(encoder(x)).pow(2).mean();
  loss.backward();
  opt.step();

  size_t i = 0;
  for (const auto& p : encoder->parameters()) {
    if (p.requires_grad()) continue;
    CHECK_FALSE(p.grad().defined());
    CHECK(torch::equal(p, frozen_before[i++]));
  }
  CHECK(i == frozen_before.size());
  CHECK_FALSE(torch::equal(layer0.linear1->bias, bias_before));
}
