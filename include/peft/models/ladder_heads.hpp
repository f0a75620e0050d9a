#pragma once

// Ladder Side-Tuning over models::Bert for sequence classification: BERT's embeddings and
// encoder run frozen and without autograd, a peft::Ladder side network reads the encoder's
// hidden states, and a new head classifies from the side network's output. Also the method's
// registry entry and adapter files, for BERT's classifier and for the side network beside a
// Llama decoder (models/llama_ladder.hpp).

#include <torch/nn/modules/dropout.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>
#include <torch/types.h>
#include <torch/utils.h>

#include <cstdint>
#include <filesystem>
#include <memory>
#include <utility>

#include <peft/config.hpp>
#include <peft/core/enum_names.hpp>
#include <peft/core/error.hpp>
#include <peft/core/registry.hpp>
#include <peft/detail/json.hpp>
#include <peft/detail/shape.hpp>
#include <peft/methods/ladder.hpp>
#include <peft/models/bert.hpp>
#include <peft/models/heads.hpp>
#include <peft/models/llama.hpp>
#include <peft/models/llama_ladder.hpp>

PEFT_NAMESPACE_BEGIN
namespace models {

/// A classifier on a ladder side network beside a frozen BERT. Children: `bert` (frozen; its
/// embeddings and encoder run under NoGradGuard), `ladder` (peft::Ladder over `bert.encoder`:
/// downsamples, gates, side blocks, upsample), `dropout` and `classifier` (Linear(H, num_labels)).
/// Only the ladder and the classifier train. num_labels 1 means regression.
///
/// The ladder's backbone is `bert.encoder` itself; it is listed once, under `bert`, so methods
/// and parameter names see one encoder.
class BertLadderForSequenceClassificationImpl : public torch::nn::Module {
 public:
  BertLadderForSequenceClassificationImpl(Bert backbone, int64_t num_labels,
                                          const LadderOptions& options = LadderOptions(),
                                          Pooling pooling = Pooling::Cls)
      : torch::nn::Module("peft::models::BertLadderForSequenceClassification"),
        bert(register_module("bert", std::move(backbone))),
        pooling(pooling) {
    check(num_labels > 0, "models::bert", "num_labels must be positive, got {}", num_labels);
    ladder = register_module("ladder", Ladder(bert->encoder, options));
    ladder->unregister_module("backbone");
    dropout = register_module("dropout", torch::nn::Dropout(bert->config().head_dropout()));
    // Initialised like BertForSequenceClassification's head.
    classifier = register_module("classifier", new_head(bert->config().hidden_size, num_labels));
  }

  /// A frozen backbone from a Hugging Face folder (its config edited by `adjust` if given) with a
  /// new side network and head.
  static std::shared_ptr<BertLadderForSequenceClassificationImpl> from_pretrained(
      const std::filesystem::path& folder, int64_t num_labels,
      const LadderOptions& options = LadderOptions(), Pooling pooling = Pooling::Cls,
      const ConfigAdjust& adjust = nullptr) {
    return std::make_shared<BertLadderForSequenceClassificationImpl>(
        Bert::from_pretrained(folder, adjust), num_labels, options, pooling);
  }

  /// Logits [N, num_labels] from input_ids [N, L], attention_mask [N, L] (1 = token, 0 =
  /// padding; all ones if undefined) and token_type_ids [N, L] (zeros if undefined). Padding
  /// positions are masked in the backbone and in the side blocks, and mean pooling skips them,
  /// so a sentence gets the same logits alone or padded in a batch.
  torch::Tensor forward(const torch::Tensor& input_ids, const torch::Tensor& attention_mask = {},
                        const torch::Tensor& token_type_ids = {}) {
    check(!attention_mask.defined() || attention_mask.sizes() == input_ids.sizes(), "models::bert",
          "attention_mask has shape {}, expected {} like input_ids",
          peft::detail::shape(attention_mask.sizes()), peft::detail::shape(input_ids.sizes()));
    torch::Tensor x;
    {
      // The embeddings are frozen too: no graph through them either.
      torch::NoGradGuard no_grad;
      x = bert->embed(input_ids, token_type_ids);
    }
    const auto padding = BertImpl::key_padding_mask(attention_mask, x.size(1) - input_ids.size(1));
    // BERT's encoder is batch-first, and so is the ladder over it: side is [N, L, H].
    auto side = ladder->forward(x, torch::Tensor(), padding);
    auto pooled = pooling == Pooling::Mean ? masked_mean(side, attention_mask) : side.select(1, 0);
    return classifier(dropout(pooled));
  }

  int64_t num_labels() const { return classifier->options.out_features(); }

  Bert bert{nullptr};
  Ladder ladder{nullptr};
  torch::nn::Dropout dropout{nullptr};
  torch::nn::Linear classifier{nullptr};
  /// How the side network's output [N, L, H] becomes the classifier's input: Cls reads the first
  /// position (no pooler: BERT's was trained on the backbone's states, not the side network's),
  /// Mean averages the real tokens.
  Pooling pooling = Pooling::Cls;
};

/// Module holder of BertLadderForSequenceClassificationImpl, with from_pretrained():
///
///     auto model = peft::models::BertLadderForSequenceClassification::from_pretrained(
///         "models/all-MiniLM-L6-v2", 2, peft::LadderOptions().reduction_factor(8));
///     torch::optim::AdamW opt(peft::trainable_parameters(*model), 1e-3);
class BertLadderForSequenceClassification
    : public torch::nn::ModuleHolder<BertLadderForSequenceClassificationImpl> {
 public:
  using torch::nn::ModuleHolder<BertLadderForSequenceClassificationImpl>::ModuleHolder;
  using torch::nn::ModuleHolder<BertLadderForSequenceClassificationImpl>::get;

  /// A frozen backbone from a Hugging Face folder (its config edited by `adjust` if given) with a
  /// new side network and a head of `num_labels` outputs.
  static BertLadderForSequenceClassification from_pretrained(
      const std::filesystem::path& folder, int64_t num_labels,
      const LadderOptions& options = LadderOptions(), Pooling pooling = Pooling::Cls,
      const ConfigAdjust& adjust = nullptr) {
    return BertLadderForSequenceClassification(
        BertLadderForSequenceClassificationImpl::from_pretrained(folder, num_labels, options,
                                                                 pooling, adjust));
  }
};

// ------------------------------------------------------------------------------ file format

namespace detail {

using peft::detail::config_value;
using peft::detail::find_module;

/// Ladder Side-Tuning: the side network's parameters under `ladder.` (downsamples, gates, side
/// blocks, upsample) and what it takes to rebuild it beside the same backbone.
inline void save_ladder(const std::string& path,
                        const BertLadderForSequenceClassificationImpl& model,
                        nlohmann::json& config, NamedTensors& tensors) {
  const auto& ladder = *model.ladder;
  const int64_t E = ladder.upsample->weight.size(0), width = ladder.upsample->weight.size(1);
  config["reduction_factor"] = E / width;
  config["layers"] = ladder.selected_layers();
  config["gate_temperature"] = ladder.options().gate_temperature();
  config["side_block"] = to_string(ladder.options().block());
  config["side_width"] = width;
  config["side_heads"] = ladder.side_heads();
  config["side_dim_feedforward"] = ladder.side_dim_feedforward();
  config["pooling"] = to_string(model.pooling);
  const std::string prefix = path.empty() ? "ladder." : path + ".ladder.";
  for (const auto& item : ladder.named_parameters()) {
    tensors.emplace_back(prefix + item.key(), item.value());
  }
}

inline LoadPlan plan_ladder(torch::nn::Module& model, const nlohmann::json& config,
                            const std::string& cfg_name) {
  auto [path, target] = find_module<BertLadderForSequenceClassificationImpl>(model);
  check(target != nullptr, "load_adapter",
        "{}: LADDER_SIDE_TUNING loads into a models::BertLadderForSequenceClassification, which "
        "this model neither is nor contains",
        cfg_name);
  const auto block_name = config_value<std::string>(config, "side_block", cfg_name);
  const auto block = enum_from_name<LadderBlock>(block_name, cfg_name);
  auto options = LadderOptions()
                     .block(block)
                     .reduction_factor(config_value<int64_t>(config, "reduction_factor", cfg_name))
                     .gate_temperature(config_value<double>(config, "gate_temperature", cfg_name))
                     .layers(config_value<std::vector<int64_t>>(config, "layers", cfg_name))
                     .side_heads(config_value<int64_t>(config, "side_heads", cfg_name))
                     // The stored weights replace any initialisation; skip the pruning.
                     .init(LadderInit::Random);
  const auto pooling =
      enum_from_name<Pooling>(config_value<std::string>(config, "pooling", cfg_name), cfg_name);
  // The new side network is built beside the backbone but installed only by apply(). Building
  // it freezes the backbone, which must not change what trains there now.
  auto encoder = target->bert->encoder;
  struct RestoreGrads {
    std::vector<std::pair<torch::Tensor, bool>> saved;
    ~RestoreGrads() {
      for (auto& [t, g] : saved) t.set_requires_grad(g);
    }
  } restore;
  for (auto& p : encoder->parameters()) restore.saved.emplace_back(p, p.requires_grad());
  Ladder fresh{nullptr};
  try {
    fresh = Ladder(encoder, options);
  } catch (const Error& e) {
    fail("load_adapter", "{}: {}", cfg_name, e.what());
  }
  fresh->unregister_module("backbone");
  const auto width = config_value<int64_t>(config, "side_width", cfg_name);
  const auto ff = config_value<int64_t>(config, "side_dim_feedforward", cfg_name);
  check(fresh->side_width() == width && fresh->side_dim_feedforward() == ff, "load_adapter",
        "{}: side blocks of width {} and feed-forward size {}, but this backbone gives {} and {}",
        cfg_name, width, ff, fresh->side_width(), fresh->side_dim_feedforward());
  const auto& reference = target->ladder->upsample->weight;
  fresh->to(reference.device(), reference.scalar_type());
  fresh->train(target->is_training());

  LoadPlan plan;
  const std::string prefix = path.empty() ? "ladder." : path + ".ladder.";
  for (const auto& item : fresh->named_parameters()) {
    auto tensor = item.value();
    plan.slots.push_back({prefix + item.key(), tensor.sizes().vec(), [tensor] { return tensor; }});
  }
  auto* owner = target;
  plan.apply = [owner, fresh, pooling] {
    owner->ladder = Ladder(owner->replace_module("ladder", fresh));
    owner->pooling = pooling;
  };
  return plan;
}

/// The decoder in `model` that has a ladder side network beside it, with its path; nullptr if
/// there is none.
inline std::pair<std::string, LlamaImpl*> llama_with_ladder(torch::nn::Module& model) {
  auto [path, decoder] = find_module<LlamaImpl>(model);
  if (decoder == nullptr || !std::dynamic_pointer_cast<LlamaLadderImpl>(decoder->side)) {
    return {"", nullptr};
  }
  return {path, decoder};
}

/// The ladder beside a decoder: its parameters under the decoder's hub path + ".ladder." and the
/// shape that rebuilds it (side_block "llama").
inline void save_llama_ladder(SaveContext& c, const std::string& path, LlamaImpl& decoder) {
  const auto& ladder = dynamic_cast<const LlamaLadderImpl&>(*decoder.side);
  c.config["reduction_factor"] = ladder.options().reduction_factor();
  c.config["layers"] = ladder.layers();
  c.config["gate_temperature"] = ladder.options().gate_temperature();
  c.config["side_block"] = to_string(LadderBlock::Llama);
  c.config["side_width"] = ladder.side_width();
  c.config["side_heads"] = ladder.side_heads();
  c.config["side_dim_feedforward"] = ladder.side_dim_feedforward();
  const std::string prefix = c.hub_path(path.empty() ? "ladder" : path + ".ladder") + ".";
  for (const auto& item : ladder.named_parameters()) {
    c.tensors.emplace_back(prefix + item.key(), item.value());
  }
}

inline LoadPlan plan_llama_ladder(const LoadContext& c, const LadderOptions& options) {
  auto [path, decoder] = find_module<LlamaImpl>(c.model);
  check(decoder != nullptr, "load_adapter",
        "{}: a side network of side_block llama loads beside a models::Llama decoder, which "
        "this model neither is nor contains",
        c.config_file);
  check(!decoder->side, "load_adapter", "{}: the decoder already has a ladder side network",
        c.config_file);
  LlamaLadder fresh{nullptr};
  try {
    fresh = LlamaLadder(*decoder, options);
  } catch (const Error& e) {
    fail("load_adapter", "{}: {}", c.config_file, e.what());
  }
  const auto width = config_value<int64_t>(c.config, "side_width", c.config_file);
  const auto ff = config_value<int64_t>(c.config, "side_dim_feedforward", c.config_file);
  check(fresh->side_width() == width && fresh->side_dim_feedforward() == ff, "load_adapter",
        "{}: side blocks of width {} and feed-forward size {}, but this decoder gives {} and {}",
        c.config_file, width, ff, fresh->side_width(), fresh->side_dim_feedforward());
  const auto& reference = decoder->embed_tokens->weight;
  fresh->to(reference.device(), reference.scalar_type());
  fresh->train(decoder->is_training());
  LoadPlan plan;
  const std::string prefix = c.hub_path(path.empty() ? "ladder" : path + ".ladder") + ".";
  for (const auto& item : fresh->named_parameters()) {
    auto tensor = item.value();
    plan.slots.push_back({prefix + item.key(), tensor.sizes().vec(), [tensor] { return tensor; }});
  }
  auto* owner = decoder;
  plan.apply = [owner, fresh] { owner->set_side(fresh.ptr()); };
  return plan;
}

/// LadderOptions from the JSON options of peft::attach(model, "lst", ...): reduction_factor,
/// gate_temperature, layers, side_heads, init ("pruned" or "random"), side_block, dropout.
inline LadderOptions ladder_options_from_json(const nlohmann::json& j) {
  using peft::detail::config_read;
  const std::string where = "lst options";
  const char* method = LadderOptions::method;
  LadderOptions o;
  auto reduction = o.reduction_factor(), heads = o.side_heads();
  auto temperature = o.gate_temperature();
  auto layers = o.layers();
  std::string init = enum_name(o.init()), block = enum_name(o.block());
  config_read(j, "reduction_factor", reduction, where, method);
  config_read(j, "gate_temperature", temperature, where, method);
  config_read(j, "layers", layers, where, method);
  config_read(j, "side_heads", heads, where, method);
  config_read(j, "init", init, where, method);
  config_read(j, "side_block", block, where, method);
  o.reduction_factor(reduction).gate_temperature(temperature).layers(layers).side_heads(heads);
  o.init(enum_from_name<LadderInit>(init, where));
  o.block(enum_from_name<LadderBlock>(block, where));
  double dropout = 0;
  config_read(j, "dropout", dropout, where, method);
  if (j.contains("dropout") && !j["dropout"].is_null()) o.dropout(dropout);  // unset: none
  return o;
}

inline MethodEntry ladder_entry() {
  MethodEntry e;
  e.name = "lst";
  e.summary =
      "Ladder Side-Tuning: a small side network beside the frozen backbone (Sung et al., 2022)";
  e.default_lr = 3e-3;
  e.format = AdapterFormat{
      "LADDER_SIDE_TUNING", true,
      [](SaveContext& c) {
        auto [path, model] = find_module<BertLadderForSequenceClassificationImpl>(c.model);
        if (model != nullptr) {
          save_ladder(path, *model, c.config, c.tensors);
          return;
        }
        auto [decoder_path, decoder] = llama_with_ladder(c.model);
        check(decoder != nullptr, "save_adapter", "the model holds no ladder side network");
        save_llama_ladder(c, decoder_path, *decoder);
      },
      [](const LoadContext& c) {
        const auto block = config_value<std::string>(c.config, "side_block", c.config_file);
        if (enum_from_name<LadderBlock>(block, c.config_file) != LadderBlock::Llama) {
          return plan_ladder(c.model, c.config, c.config_file);
        }
        auto options =
            LadderOptions()
                .block(LadderBlock::Llama)
                .reduction_factor(
                    config_value<int64_t>(c.config, "reduction_factor", c.config_file))
                .gate_temperature(config_value<double>(c.config, "gate_temperature", c.config_file))
                .layers(config_value<std::vector<int64_t>>(c.config, "layers", c.config_file))
                .side_heads(config_value<int64_t>(c.config, "side_heads", c.config_file))
                .init(LadderInit::Random);  // the stored weights replace any start
        return plan_llama_ladder(c, options);
      }};
  // By name, the side network attaches beside a Llama decoder; BERT's is a model of its own.
  e.attach = [](torch::nn::Module& model, const nlohmann::json& options) {
    const auto ladder_options = ladder_options_from_json(options);
    auto [path, decoder] = find_module<LlamaImpl>(model);
    check(decoder != nullptr, LadderOptions::method,
          "attaches by name beside a Llama decoder only; for BERT build a "
          "models::BertLadderForSequenceClassification (TextClassifier method \"lst\")");
    attach_ladder(*decoder, ladder_options);
    return std::vector<std::string>{path.empty() ? "ladder" : path + ".ladder"};
  };
  e.option_keys = {"reduction_factor", "gate_temperature", "layers", "side_heads", "init",
                   "side_block",       "dropout"};
  e.held_by = [](torch::nn::Module& model) {
    return find_module<BertLadderForSequenceClassificationImpl>(model).second != nullptr ||
           llama_with_ladder(model).second != nullptr;
  };
  return e;
}

inline const bool ladder_registered = register_method(ladder_entry());

}  // namespace detail
}  // namespace models
PEFT_NAMESPACE_END
