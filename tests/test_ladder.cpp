// Ladder Side-Tuning: no graph through the backbone, the ladder arithmetic, pruned
// initialisation, and learning.
#include <peft/methods/ladder.hpp>

#include "helpers.hpp"

using namespace testing;

TEST_CASE("LST keeps no autograd graph through the backbone", "[lst]") {
  auto stock = stock_encoder(0.1);
  peft::Ladder ladder(peft::nn::TransformerEncoder(stock),
                      peft::LadderOptions().reduction_factor(4).init(peft::LadderInit::Random));
  auto x = torch::randn({5, 3, kDim}, torch::requires_grad());
  auto states = [&] {
    torch::NoGradGuard no_grad;
    return ladder->backbone->hidden_states(x);
  }();
  for (const auto& s : states) CHECK_FALSE(s.grad_fn());
  auto out = ladder(x, torch::Tensor(), padding_mask(3, 5));
  CHECK(out.sizes() == torch::IntArrayRef({5, 3, kDim}));
  out.pow(2).mean().backward();
  // The backbone is frozen and outside the graph. The input still gets a gradient, through the
  // side network's own downsample of it (trainable input embeddings would train).
  for (const auto& p : stock->parameters()) CHECK_FALSE(p.grad().defined());
  CHECK(x.grad().defined());
  for (const auto& [name, p] : peft::named_trainable_parameters(*ladder)) {
    INFO(name);
    CHECK(name.rfind("backbone", 0) != 0);
    CHECK(p.grad().defined());
  }
  CHECK(ladder->gates.grad().abs().sum().item<double>() > 0);
}

TEST_CASE("LST computes the gated ladder the paper describes", "[lst]") {
  auto stock = stock_encoder();
  peft::Ladder ladder(
      peft::nn::TransformerEncoder(stock),
      peft::LadderOptions().reduction_factor(2).layers({1}).init(peft::LadderInit::Random));
  ladder->eval();
  stock->eval();
  CHECK(ladder->selected_layers() == std::vector<int64_t>{1});
  {
    torch::NoGradGuard no_grad;
    ladder->gates.fill_(0.05);  // mu = sigmoid(0.05 / 0.1)
  }
  auto x = torch::randn({4, 2, kDim});
  // By hand from stock pieces: backbone layer outputs, the two ladders, the side block.
  auto layer0 = stock->layers->at<torch::nn::TransformerEncoderLayerImpl>(0).forward(x);
  auto layer1 = stock->layers->at<torch::nn::TransformerEncoderLayerImpl>(1).forward(layer0);
  const double mu = 1.0 / (1.0 + std::exp(-0.5));
  auto h = mu * ladder->downsample->ptr<torch::nn::LinearImpl>(0)->forward(x) +
           (1 - mu) * ladder->downsample->ptr<torch::nn::LinearImpl>(1)->forward(layer1);
  h = ladder->side->ptr<torch::nn::TransformerEncoderLayerImpl>(0)->forward(h);
  auto expected = ladder->upsample(h);
  CHECK(max_diff(ladder(x), expected) <= 1e-5);

  CHECK_THROWS_WITH(
      peft::Ladder(peft::nn::TransformerEncoder(stock_encoder()),
                   peft::LadderOptions().reduction_factor(5)),
      Catch::Contains("[peft::lst] reduction_factor 5 must divide the model width 16"));
  CHECK_THROWS_WITH(peft::Ladder(peft::nn::TransformerEncoder(stock_encoder()),
                                 peft::LadderOptions().layers({3})),
                    Catch::Contains("layer 3 is outside the backbone's 2 layers"));
}

TEST_CASE("LST pruned initialisation keeps the highest-importance rows", "[lst]") {
  torch::manual_seed(9);
  auto stock = stock_layer();
  {
    // Make model units 3 and 11, attention rows 5 and 9 and FFN rows 2 and 30 the important ones.
    torch::NoGradGuard no_grad;
    for (auto* p : {&stock->self_attn->in_proj_weight, &stock->linear1->weight}) *p *= 0.01;
    stock->self_attn->in_proj_weight.select(1, 3).mul_(1000);
    stock->self_attn->in_proj_weight.select(1, 11).mul_(1000);
    for (int64_t part = 0; part < 3; ++part) {
      stock->self_attn->in_proj_weight[part * kDim + 5].mul_(50);
      stock->self_attn->in_proj_weight[part * kDim + 9].mul_(50);
    }
    stock->linear1->weight[2].mul_(50);
    stock->linear1->weight[30].mul_(50);
  }
  auto side = torch::nn::TransformerEncoderLayer(
      torch::nn::TransformerEncoderLayerOptions(2, 1).dim_feedforward(2));
  peft::detail::prune_into(*stock, *side);
  const auto units = torch::tensor({3, 11}, torch::kLong);
  const auto rows = torch::tensor({5, 9}, torch::kLong);
  const auto ffn = torch::tensor({2, 30}, torch::kLong);
  auto q = stock->self_attn->in_proj_weight.narrow(0, 0, kDim);
  auto v = stock->self_attn->in_proj_weight.narrow(0, 2 * kDim, kDim);
  CHECK(torch::equal(side->self_attn->in_proj_weight.narrow(0, 0, 2),
                     q.index_select(0, rows).index_select(1, units)));
  CHECK(torch::equal(side->self_attn->in_proj_weight.narrow(0, 4, 2),
                     v.index_select(0, rows).index_select(1, units)));
  CHECK(torch::equal(
      side->self_attn->out_proj->weight,
      stock->self_attn->out_proj->weight.index_select(0, units).index_select(1, rows)));
  CHECK(torch::equal(side->linear1->weight,
                     stock->linear1->weight.index_select(0, ffn).index_select(1, units)));
  CHECK(torch::equal(side->linear2->weight,
                     stock->linear2->weight.index_select(0, units).index_select(1, ffn)));
  CHECK(torch::equal(side->norm1->weight, stock->norm1->weight.index_select(0, units)));
}

TEST_CASE("LST learns the scale task, only the side network trains", "[lst]") {
  peft::Ladder ladder(peft::nn::TransformerEncoder(stock_encoder()),
                      peft::LadderOptions().reduction_factor(4));
  auto count = peft::count_parameters(*ladder);
  CHECK(count.trainable < count.total / 2);
  const double baseline = head_only_baseline();
  const double tuned = train_scale_task([&](const torch::Tensor& in) { return ladder(in); },
                                        peft::trainable_parameters(*ladder));
  INFO("head only " << baseline << ", lst " << tuned);
  CHECK(tuned <= 0.5 * baseline);
}

namespace {

/// A tiny randomly initialised BERT (no files): width kDim, kLayers layers, a 30-token vocabulary.
peft::models::Bert tiny_bert(uint64_t seed = 11) {
  torch::manual_seed(seed);
  peft::models::BertConfig config;
  config.vocab_size = 30;
  config.hidden_size = kDim;
  config.num_hidden_layers = kLayers;
  config.num_attention_heads = kHeads;
  config.intermediate_size = kFF;
  config.max_position_embeddings = 24;
  return peft::models::Bert(config);
}

using peft::models::BertLadderForSequenceClassification;
using peft::models::Pooling;

}  // namespace

TEST_CASE("LST over Bert: the logits a side network and head compute from BERT's embeddings",
          "[lst]") {
  auto bert = tiny_bert();
  BertLadderForSequenceClassification model(bert, 3, peft::LadderOptions().reduction_factor(4));
  model->eval();
  auto ids = torch::tensor({2, 7, 9, 4, 3, 11, 5, 0}, torch::kLong).view({2, 4});
  auto mask = ids.ne(0).to(torch::kLong);
  auto types = torch::tensor({0, 0, 1, 1, 0, 1, 1, 0}, torch::kLong).view({2, 4});
  // By hand from the stock pieces: BERT's embeddings, the ladder, the head on position 0.
  auto positions = torch::arange(4).unsqueeze(0).expand({2, 4});
  auto x = bert->embeddings_norm(bert->word_embeddings(ids) + bert->position_embeddings(positions) +
                                 bert->token_type_embeddings(types));
  CHECK(max_diff(bert->embed(ids, types), x) <= 1e-6);
  auto side = model->ladder(x.transpose(0, 1), torch::Tensor(), mask.eq(0));
  auto expected = model->classifier(side.select(0, 0));
  auto logits = model(ids, mask, types);
  CHECK(logits.sizes() == torch::IntArrayRef({2, 3}));
  CHECK(max_diff(logits, expected) <= 1e-6);

  // The ladder's backbone is BERT's encoder, listed once (under bert).
  CHECK(model->ladder->backbone.get() == bert->encoder.get());
  for (const auto& item : model->named_parameters()) {
    INFO(item.key());
    CHECK(item.key().rfind("ladder.backbone", 0) != 0);
  }

  CHECK_THROWS_WITH(BertLadderForSequenceClassification(tiny_bert(), 0),
                    Catch::Contains("[peft::models::bert] num_labels must be positive, got 0"));
  CHECK_THROWS_WITH(model(ids, mask.slice(1, 0, 3)),
                    Catch::Contains("attention_mask has shape [2, 3], expected [2, 4]"));
}

TEST_CASE("LST over Bert: padding does not change a sentence's logits", "[lst]") {
  for (auto pooling : {Pooling::Cls, Pooling::Mean}) {
    INFO("pooling " << peft::models::to_string(pooling));
    BertLadderForSequenceClassification model(tiny_bert(), 2,
                                              peft::LadderOptions().reduction_factor(4), pooling);
    model->eval();
    torch::NoGradGuard no_grad;
    auto sentence = torch::tensor({{2, 17, 8, 23, 3}}, torch::kLong);
    auto alone = model(sentence, torch::ones_like(sentence));
    // The same sentence padded to 8 in a batch with a longer one.
    auto ids = torch::tensor({2, 17, 8, 23, 3, 0, 0, 0, 2, 5, 6, 7, 9, 10, 12, 3}, torch::kLong)
                   .view({2, 8});
    auto mask = ids.ne(0).to(torch::kLong);
    auto batch = model(ids, mask);
    CHECK(max_diff(batch.slice(0, 0, 1), alone) <= 1e-5);
    // The mask is what keeps the padding out: attending to it changes the logits.
    auto unmasked = model(ids, torch::ones_like(ids));
    CHECK(max_diff(unmasked.slice(0, 0, 1), alone) > 1e-4);
  }
}

TEST_CASE("LST over Bert: only the ladder and the head train, the backbone gets no gradient",
          "[lst]") {
  auto bert = tiny_bert();
  BertLadderForSequenceClassification model(
      bert, 2, peft::LadderOptions().reduction_factor(4).layers({1}), Pooling::Mean);
  model->eval();
  const auto frozen = snapshot(*bert);
  auto ids = torch::tensor({2, 7, 9, 4, 3, 11, 5, 0}, torch::kLong).view({2, 4});
  auto mask = ids.ne(0).to(torch::kLong);
  auto labels = torch::tensor({0, 1}, torch::kLong);

  const auto trainable = peft::named_trainable_parameters(*model);
  int64_t expected_count = 0;
  for (const auto& p : model->ladder->parameters()) expected_count += p.numel();
  for (const auto& p : model->classifier->parameters()) expected_count += p.numel();
  CHECK(peft::count_parameters(*model).trainable == expected_count);
  CHECK(peft::count_parameters(*model).total ==
        peft::count_parameters(*bert).total + expected_count);
  CHECK(peft::count_parameters(*bert).trainable == 0);
  for (const auto& [name, p] : trainable) {
    INFO(name);
    CHECK((name.rfind("ladder.", 0) == 0 || name.rfind("classifier.", 0) == 0));
  }

  auto before = model(ids, mask).detach();
  torch::optim::AdamW opt(peft::trainable_parameters(*model), torch::optim::AdamWOptions(1e-2));
  auto loss = torch::nn::functional::cross_entropy(model(ids, mask), labels);
  loss.backward();
  for (const auto& p : bert->parameters()) CHECK_FALSE(p.grad().defined());
  for (const auto& [name, p] : trainable) {
    INFO(name);
    CHECK(p.grad().defined());
  }
  CHECK(model->ladder->gates.grad().abs().sum().item<double>() > 0);
  opt.step();

  // One step moves the logits and leaves every backbone tensor bit-identical.
  auto after = model(ids, mask).detach();
  CHECK(max_diff(after, before) > 1e-4);
  const auto now = snapshot(*bert);
  REQUIRE(now.size() == frozen.size());
  for (size_t i = 0; i < now.size(); ++i) CHECK(torch::equal(now[i], frozen[i]));
}
