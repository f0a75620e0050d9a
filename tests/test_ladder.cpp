// Ladder Side-Tuning: no graph through the backbone, the ladder arithmetic, pruned
// initialisation, and learning.
#include <peft/methods/ladder.hpp>
#include <peft/models/bert.hpp>
#include <peft/models/ladder_heads.hpp>
#include <peft/nn/encoder.hpp>

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

TEST_CASE("LST side network dropout: the backbone's rate unless set", "[lst]") {
  for (auto block : {peft::LadderBlock::PostNorm, peft::LadderBlock::T5}) {
    INFO(peft::enum_name(block));
    auto x = torch::randn({6, 3, kDim});
    // Train mode for the side network only: the backbone's own dropout is not what is measured.
    auto outputs = [&](std::optional<double> rate) {
      auto options =
          peft::LadderOptions().reduction_factor(2).block(block).init(peft::LadderInit::Random);
      if (rate) options.dropout(*rate);
      peft::Ladder ladder(peft::nn::TransformerEncoder(stock_encoder(0.3)), options);
      ladder->train();
      ladder->backbone->eval();
      torch::NoGradGuard no_grad;
      auto a = ladder(x), b = ladder(x);
      ladder->eval();
      return std::make_tuple(ladder->side_dropout(), a, b, ladder(x));
    };
    const auto [inherited, a1, b1, eval1] = outputs(std::nullopt);
    CHECK(inherited == Approx(0.3));
    CHECK(max_diff(a1, b1) > 1e-3);  // two draws of the side network's dropout
    const auto [off, a0, b0, eval0] = outputs(0.0);
    CHECK(off == 0.0);
    CHECK(max_diff(a0, b0) == 0.0);
    CHECK(max_diff(a0, eval0) <= 1e-6);  // no dropout left in training mode
  }
  CHECK_THROWS_WITH(peft::Ladder(peft::nn::TransformerEncoder(stock_encoder()),
                                 peft::LadderOptions().dropout(1.0)),
                    Catch::Contains("[peft::lst] dropout must be in [0, 1), got 1"));
}

TEST_CASE("LST post-norm side block: the stock layer's forward, with masks, in both layouts",
          "[lst]") {
  auto block = torch::nn::TransformerEncoderLayer(
      torch::nn::TransformerEncoderLayerOptions(8, 2).dim_feedforward(16).dropout(0.0).activation(
          torch::kGELU));
  block->eval();
  auto x = torch::randn({5, 3, 8});  // [L, N, d]
  auto kpm = padding_mask(3, 5);
  auto future = torch::triu(torch::ones({5, 5}, torch::kBool), 1);
  auto additive = torch::zeros({5, 5}).masked_fill(future, -std::numeric_limits<float>::infinity());
  torch::NoGradGuard no_grad;
  for (const auto& mask : {torch::Tensor(), additive}) {
    INFO("src_mask " << (mask.defined() ? "causal" : "none"));
    auto stock = block->forward(x, mask, kpm);
    auto ours = peft::detail::post_norm_block(*block, x, mask, kpm, /*batch_first=*/false);
    CHECK(max_diff(ours, stock) <= 1e-5);
    auto first = peft::detail::post_norm_block(*block, x.transpose(0, 1).contiguous(), mask, kpm,
                                               /*batch_first=*/true);
    CHECK(max_diff(first.transpose(0, 1), stock) <= 1e-5);
    CHECK(stock.abs().max().item<double>() > 0.1);
  }
  // A bool mask means "true = may not attend", as in PyTorch and peft's backbone; LibTorch's C++
  // MultiheadAttention adds it as 0/1 instead, which the side blocks no longer do.
  auto with_bool = peft::detail::post_norm_block(*block, x, future, kpm, false);
  CHECK(max_diff(with_bool, block->forward(x, additive, kpm)) <= 1e-5);
  CHECK(max_diff(with_bool, block->forward(x, future, kpm)) > 1e-2);
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
  CHECK_THROWS_WITH(peft::Ladder(peft::nn::TransformerEncoder(stock_encoder()),
                                 peft::LadderOptions().block(peft::LadderBlock::Llama)),
                    Catch::Contains("side_block llama is for Llama decoders"));
}

TEST_CASE("LST over a batch-first backbone: the sequence-first ladder's output, transposed",
          "[lst]") {
  // models::Bert's encoder is batch-first; a ladder over it takes and returns [N, L, E].
  for (auto block : {peft::LadderBlock::PostNorm, peft::LadderBlock::T5}) {
    INFO("block " << peft::enum_name(block));
    auto stock = stock_encoder();
    auto make = [&](bool batch_first) {
      torch::manual_seed(11);
      peft::Ladder ladder(
          peft::nn::TransformerEncoder(stock, batch_first),
          peft::LadderOptions().reduction_factor(2).block(block).init(peft::LadderInit::Random));
      torch::NoGradGuard no_grad;
      ladder->gates.fill_(0.05);
      ladder->eval();
      return ladder;
    };
    auto seq = make(false), bf = make(true);
    auto x = torch::randn({5, 3, kDim});
    auto kpm = padding_mask(3, 5);
    auto expected = seq(x, torch::Tensor(), kpm);
    auto got = bf(x.transpose(0, 1).contiguous(), torch::Tensor(), kpm);
    REQUIRE(got.sizes() == torch::IntArrayRef({3, 5, kDim}));
    CHECK(max_diff(got.transpose(0, 1), expected) <= 1e-5);
  }
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

TEST_CASE("LST Fisher importance is the mean squared gradient and steers the pruned rows",
          "[lst]") {
  torch::manual_seed(10);
  auto stock = stock_encoder();
  peft::nn::TransformerEncoder backbone(stock);
  const std::vector<torch::Tensor> xs = {torch::randn({5, 2, kDim}), torch::randn({5, 2, kDim})};
  auto loss = [&](int64_t i) { return backbone(xs[static_cast<size_t>(i)]).pow(3).sum(); };
  auto fisher = peft::fisher_importance(*backbone, loss, 2);
  REQUIRE(fisher.size() == static_cast<size_t>(kLayers));

  // Independent expectation: the stock encoder's own autograd on a copy of it.
  auto copy = std::dynamic_pointer_cast<torch::nn::TransformerEncoderImpl>(stock->clone());
  std::vector<torch::Tensor> expected(2 * kLayers);
  for (size_t b = 0; b < xs.size(); ++b) {
    std::vector<torch::Tensor> ws;
    for (size_t l = 0; l < static_cast<size_t>(kLayers); ++l) {
      auto& layer = copy->layers->at<torch::nn::TransformerEncoderLayerImpl>(l);
      ws.push_back(layer.self_attn->in_proj_weight.set_requires_grad(true));
      ws.push_back(layer.linear1->weight.set_requires_grad(true));
    }
    auto grads = torch::autograd::grad({copy->forward(xs[b]).pow(3).sum()}, ws);
    for (size_t i = 0; i < grads.size(); ++i) {
      auto sq = grads[i].square() / 2.0;
      expected[i] = b == 0 ? sq : expected[i] + sq;
    }
  }
  for (size_t l = 0; l < static_cast<size_t>(kLayers); ++l) {
    INFO("layer " << l);
    CHECK(torch::allclose(fisher[l].in_proj_weight, expected[2 * l], 1e-4, 1e-6));
    CHECK(torch::allclose(fisher[l].linear1_weight, expected[2 * l + 1], 1e-4, 1e-6));
    CHECK(fisher[l].in_proj_weight.abs().sum().item<double>() > 0);
  }
  // The backbone is frozen again with no gradients, also after a loss that fails.
  auto frozen = [&] {
    for (const auto& p : stock->parameters()) {
      if (p.requires_grad() || p.grad().defined()) return false;
    }
    return true;
  };
  CHECK(frozen());
  CHECK_THROWS_WITH(
      peft::fisher_importance(
          *backbone, [&](int64_t i) { return i == 0 ? loss(0) : loss(0) + std::nan(""); }, 2),
      Catch::Contains("[peft::lst] fisher_importance: loss(1) is nan"));
  CHECK(frozen());
  CHECK_THROWS_WITH(peft::fisher_importance(*backbone, loss, 0),
                    Catch::Contains("needs at least one batch, got 0"));

  // The ladder prunes by the given importance: identical to pruning with it by hand, and (for
  // crafted scores) the units, attention rows and FFN rows with the highest scores.
  peft::Ladder ladder(backbone, peft::LadderOptions().reduction_factor(8).importance(fisher));
  auto by_hand = torch::nn::TransformerEncoderLayer(
      torch::nn::TransformerEncoderLayerOptions(2, 1).dim_feedforward(kFF / 8));
  peft::detail::prune_into(stock->layers->at<torch::nn::TransformerEncoderLayerImpl>(1), *by_hand,
                           fisher[1]);
  auto side1 = ladder->side->ptr<torch::nn::TransformerEncoderLayerImpl>(1);
  CHECK(torch::equal(side1->self_attn->in_proj_weight, by_hand->self_attn->in_proj_weight));
  CHECK(torch::equal(side1->linear2->weight, by_hand->linear2->weight));

  const auto& layer0 = stock->layers->at<torch::nn::TransformerEncoderLayerImpl>(0);
  peft::LayerImportance crafted{torch::zeros({3 * kDim, kDim}), torch::zeros({kFF, kDim})};
  crafted.in_proj_weight.select(1, 4).fill_(1);
  crafted.in_proj_weight.select(1, 7).fill_(1);
  for (int64_t part = 0; part < 3; ++part) {
    crafted.in_proj_weight[part * kDim + 1] += 0.5;
    crafted.in_proj_weight[part * kDim + 12] += 0.5;
  }
  crafted.linear1_weight[6] += 1;
  crafted.linear1_weight[20] += 1;
  auto side = torch::nn::TransformerEncoderLayer(
      torch::nn::TransformerEncoderLayerOptions(2, 1).dim_feedforward(2));
  peft::detail::prune_into(layer0, *side, crafted);
  const auto units = torch::tensor({4, 7}, torch::kLong);
  const auto rows = torch::tensor({1, 12}, torch::kLong);
  const auto ffn = torch::tensor({6, 20}, torch::kLong);
  auto k = layer0.self_attn->in_proj_weight.narrow(0, kDim, kDim);
  CHECK(torch::equal(side->self_attn->in_proj_weight.narrow(0, 2, 2),
                     k.index_select(0, rows).index_select(1, units)));
  CHECK(torch::equal(side->linear1->weight,
                     layer0.linear1->weight.index_select(0, ffn).index_select(1, units)));

  CHECK_THROWS_WITH(
      peft::Ladder(backbone, peft::LadderOptions().importance({fisher[0]})),
      Catch::Contains("importance has 1 entries, expected one per backbone layer (2)"));
  auto bad = fisher;
  bad[0].linear1_weight = torch::zeros({3, 3});
  CHECK_THROWS_WITH(
      peft::Ladder(backbone, peft::LadderOptions().reduction_factor(8).importance(bad)),
      Catch::Contains("importance of linear1.weight has shape [3, 3], expected [32, 16]"));
}

TEST_CASE("LST learns the scale task with either side block, only the side network trains",
          "[lst]") {
  const double baseline = head_only_baseline();
  for (auto block : {peft::LadderBlock::PostNorm, peft::LadderBlock::T5}) {
    INFO("side block " << peft::to_string(block));
    peft::Ladder ladder(peft::nn::TransformerEncoder(stock_encoder()),
                        peft::LadderOptions().reduction_factor(4).block(block));
    auto count = peft::count_parameters(*ladder);
    CHECK(count.trainable < count.total / 2);
    const double tuned = train_scale_task([&](const torch::Tensor& in) { return ladder(in); },
                                          peft::trainable_parameters(*ladder));
    INFO("head only " << baseline << ", lst " << tuned);
    CHECK(tuned <= 0.5 * baseline);
  }
}

namespace {

/// T5's RMS norm written out: x / sqrt(mean of squares + 1e-6) * w.
torch::Tensor rms_by_hand(const torch::Tensor& x, const torch::Tensor& w) {
  const auto width = static_cast<double>(x.size(-1));
  return x / ((x * x).sum(-1, true) / width + 1e-6).sqrt() * w;
}

/// The T5 side block computed head by head and sentence by sentence with plain tensor ops;
/// `relu`: the block's activation is ReLU (else GELU).
torch::Tensor t5_block_by_hand(const peft::T5SideBlockImpl& b, const torch::Tensor& x,
                               const torch::Tensor& padding, int64_t heads, bool relu) {
  const int64_t L = x.size(0), N = x.size(1), d = x.size(2), hd = d / heads;
  auto wq = b.in_proj_weight.narrow(0, 0, d), wk = b.in_proj_weight.narrow(0, d, d),
       wv = b.in_proj_weight.narrow(0, 2 * d, d);
  std::vector<torch::Tensor> sentences;
  for (int64_t n = 0; n < N; ++n) {
    auto xn = x.select(1, n);  // [L, d]
    auto z = rms_by_hand(xn, b.norm1_weight);
    std::vector<torch::Tensor> per_head;
    for (int64_t h = 0; h < heads; ++h) {
      auto q = torch::mm(z, wq.narrow(0, h * hd, hd).t());
      auto k = torch::mm(z, wk.narrow(0, h * hd, hd).t());
      auto v = torch::mm(z, wv.narrow(0, h * hd, hd).t());
      auto scores = torch::mm(q, k.t()) / std::sqrt(static_cast<double>(hd));
      scores = scores.masked_fill(padding[n].view({1, L}), -1e30);
      per_head.push_back(torch::mm(torch::softmax(scores, 1), v));
    }
    auto h1 = xn + torch::mm(torch::cat(per_head, 1), b.out_proj_weight.t());
    auto f = torch::mm(rms_by_hand(h1, b.norm2_weight), b.linear1_weight.t());
    f = relu ? torch::relu(f) : torch::gelu(f);
    sentences.push_back(h1 + torch::mm(f, b.linear2_weight.t()));
  }
  return torch::stack(sentences, 1);
}

}  // namespace

TEST_CASE("LST T5 side block: pre-norm RMS attention and FFN without biases", "[lst]") {
  torch::manual_seed(21);
  peft::T5SideBlock block(8, 2, 12, 0.0, torch::kGELU);
  {
    torch::NoGradGuard no_grad;
    block->norm1_weight.uniform_(0.5, 1.5);
    block->norm2_weight.uniform_(0.5, 1.5);
  }
  CHECK(block->parameters().size() == 6);
  for (const auto& p : block->parameters()) CHECK(p.dim() >= 1);
  auto x = torch::randn({5, 3, 8});
  auto padding = padding_mask(3, 5);
  auto expected = t5_block_by_hand(*block, x, padding, 2, /*relu=*/false);
  CHECK(max_diff(block(x, torch::Tensor(), padding), expected) <= 1e-5);
  // The residual stream is not normalised at the block's output (pre-norm): scaling the input
  // far up leaves the output scaled too, unlike a post-norm block's.
  auto big = block(x * 100, torch::Tensor(), padding);
  CHECK(big.abs().mean().item<double>() > 10 * expected.abs().mean().item<double>());

  CHECK_THROWS_WITH(peft::T5SideBlock(9, 2, 12, 0.0, torch::kGELU),
                    Catch::Contains("width 9, heads 2"));
}

TEST_CASE("LST with T5 side blocks: the ladder by hand, pruned start, side-only gradients",
          "[lst]") {
  torch::manual_seed(22);
  auto stock = stock_encoder();
  const auto options =
      peft::LadderOptions().reduction_factor(2).layers({1}).block(peft::LadderBlock::T5);
  peft::Ladder ladder(peft::nn::TransformerEncoder(stock), options);
  ladder->eval();
  stock->eval();
  REQUIRE(ladder->side->size() == 1);
  auto& block = *ladder->side->ptr<peft::T5SideBlockImpl>(0);
  // Pruned from backbone layer 1: the same matrices the stock-block ladder starts from.
  peft::Ladder post(peft::nn::TransformerEncoder(stock_encoder()),
                    peft::LadderOptions().reduction_factor(2).layers({1}));
  auto reference = torch::nn::TransformerEncoderLayer(
      torch::nn::TransformerEncoderLayerOptions(kDim / 2, ladder->side_heads())
          .dim_feedforward(ladder->side_dim_feedforward()));
  peft::detail::prune_into(stock->layers->at<torch::nn::TransformerEncoderLayerImpl>(1),
                           *reference);
  CHECK(torch::equal(block.in_proj_weight, reference->self_attn->in_proj_weight));
  CHECK(torch::equal(block.out_proj_weight, reference->self_attn->out_proj->weight));
  CHECK(torch::equal(block.linear1_weight, reference->linear1->weight));
  CHECK(torch::equal(block.linear2_weight, reference->linear2->weight));
  CHECK(torch::equal(block.norm1_weight, torch::ones({kDim / 2})));
  CHECK(torch::equal(ladder->final_norm, torch::ones({kDim / 2})));
  CHECK_FALSE(post->final_norm.defined());
  {
    torch::NoGradGuard no_grad;
    ladder->gates.fill_(-0.1);  // mu = sigmoid(-1)
    ladder->final_norm.uniform_(0.5, 1.5);
  }
  auto x = torch::randn({4, 2, kDim});
  auto padding = padding_mask(2, 4);
  auto layer0 = stock->layers->at<torch::nn::TransformerEncoderLayerImpl>(0).forward(
      x, torch::Tensor(), padding);
  auto layer1 = stock->layers->at<torch::nn::TransformerEncoderLayerImpl>(1).forward(
      layer0, torch::Tensor(), padding);
  const double mu = 1.0 / (1.0 + std::exp(1.0));
  auto h = mu * ladder->downsample->ptr<torch::nn::LinearImpl>(0)->forward(x) +
           (1 - mu) * ladder->downsample->ptr<torch::nn::LinearImpl>(1)->forward(layer1);
  // The stock test layers use ReLU, which the side blocks take over.
  h = t5_block_by_hand(block, h, padding, ladder->side_heads(), /*relu=*/true);
  auto expected = ladder->upsample(rms_by_hand(h, ladder->final_norm));
  auto out = ladder(x, torch::Tensor(), padding);
  CHECK(max_diff(out, expected) <= 1e-5);

  ladder->train();
  out = ladder(x, torch::Tensor(), padding);
  out.pow(2).mean().backward();
  for (const auto& p : stock->parameters()) CHECK_FALSE(p.grad().defined());
  for (const auto& [name, p] : peft::named_trainable_parameters(*ladder)) {
    INFO(name);
    CHECK(name.rfind("backbone", 0) != 0);
    REQUIRE(p.grad().defined());
    CHECK(p.grad().abs().sum().item<double>() > 0);
  }
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
  // BERT's encoder is batch-first, so the ladder over it takes and returns [N, L, H].
  auto side = model->ladder(x, torch::Tensor(), mask.eq(0));
  auto expected = model->classifier(side.select(1, 0));
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
