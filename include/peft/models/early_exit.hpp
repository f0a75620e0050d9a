#pragma once

// Early exit over models::Bert: a classifier after every encoder layer and a learned confidence
// predictor; at inference an example stops at the first layer whose answer the exit policy
// accepts, and the later layers do not run for it (also inside a batch).
//
// Policies: the entropy of the layer's prediction below a threshold (DeeBERT, Xin et al., 2020),
// the same prediction from a number of consecutive layers (PABEE's patience, Zhou et al., 2020),
// or a learned predictor of the layer's correctness above a threshold (BERxiT's
// learning-to-exit, Xin et al., 2021).

#include <torch/nn/functional/loss.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/dropout.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>
#include <torch/types.h>

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include <peft/config.hpp>
#include <peft/core/enum_names.hpp>
#include <peft/core/error.hpp>
#include <peft/core/hub.hpp>
#include <peft/core/registry.hpp>
#include <peft/detail/json.hpp>
#include <peft/detail/shape.hpp>
#include <peft/models/bert.hpp>
#include <peft/models/heads.hpp>

PEFT_NAMESPACE_BEGIN
namespace models {

/// When an example leaves the network before the last layer.
enum class ExitPolicy {
  /// Never: every example runs every layer and gets the last layer's answer.
  None,
  /// When the entropy (in nats) of the layer's softmax is below the threshold (DeeBERT).
  Entropy,
  /// When the threshold (a whole number t >= 1) of consecutive layers after the first gave the
  /// same class as the layer before them (PABEE's patience): the earliest exit is at layer t + 1.
  Patience,
  /// When the confidence predictor's estimate that the layer's answer is right is at least the
  /// threshold (BERxiT's learning-to-exit).
  Learned,
};

constexpr EnumTable<ExitPolicy, 4> enum_table(ExitPolicy) {
  return {"exit policy",
          "models::early_exit",
          {{{ExitPolicy::None, "none"},
            {ExitPolicy::Entropy, "entropy"},
            {ExitPolicy::Patience, "patience"},
            {ExitPolicy::Learned, "learned"}}}};
}

/// "none", "entropy", "patience" or "learned".
inline const char* to_string(ExitPolicy policy) {
  return enum_name(policy);
}

/// Parses to_string()'s names; anything else is an error naming the accepted values.
inline ExitPolicy exit_policy_from_string(const std::string& name) {
  return enum_from_name<ExitPolicy>(name);
}

/// Checks a threshold for a policy: entropy >= 0, patience a whole number >= 1, learned in
/// [0, 1]; `where` names the source in the error.
inline void check_exit_threshold(ExitPolicy policy, double threshold, const std::string& where) {
  const bool finite = std::isfinite(threshold);
  switch (policy) {
    case ExitPolicy::Entropy:
      check(finite && threshold >= 0, "models::early_exit",
            "{}: an entropy threshold is a number of nats >= 0, got {}", where, threshold);
      break;
    case ExitPolicy::Patience:
      check(finite && threshold >= 1 && threshold == std::floor(threshold), "models::early_exit",
            "{}: a patience is a whole number of layers >= 1, got {}", where, threshold);
      break;
    case ExitPolicy::Learned:
      check(finite && threshold >= 0 && threshold <= 1, "models::early_exit",
            "{}: a confidence threshold is in [0, 1], got {}", where, threshold);
      break;
    case ExitPolicy::None:
      break;
  }
}

/// Every exit's answer for a batch, from forward_exits(): logits [N, C] and the predictor's
/// confidence logit [N] (before the sigmoid) per layer, first layer first.
struct ExitOutputs {
  std::vector<torch::Tensor> logits;
  std::vector<torch::Tensor> confidence;
};

/// What early_exit() gives: the logits of the exit each example took [N, C] and how many
/// encoder layers ran for it [N] (int64, 1 .. num_layers).
struct ExitResult {
  torch::Tensor logits;
  torch::Tensor layers;
};

/// A sequence classifier with an exit after every encoder layer of a frozen BERT. Children:
/// `bert` (frozen), `dropout`, `exits` (Linear(H, C) after layers 1 .. L-1), `classifier`
/// (Linear(H, C) after the last layer, the head of a BertForSequenceClassification) and
/// `predictor` (Linear(H + C, 1): the pooled hidden state and the exit's class probabilities in,
/// the logit of "this exit's answer is right" out). Every exit reads the layer's hidden states
/// through the same pooling as the last one. num_labels >= 2 (classification).
///
/// Training (forward_exits() and loss()) runs every layer; an attached PEFT method trains with
/// the exits, or, with the method and `classifier` loaded from an adapter and frozen, only the
/// exits and the predictor train (a second stage on an already-tuned model). Inference
/// (forward() in eval mode, or early_exit()) stops each example at its exit.
class BertEarlyExitForSequenceClassificationImpl : public torch::nn::Module, public TaskModel {
 public:
  BertEarlyExitForSequenceClassificationImpl(Bert backbone, int64_t num_labels,
                                             Pooling pooling = Pooling::Cls)
      : torch::nn::Module("peft::models::BertEarlyExitForSequenceClassification"),
        bert(register_module("bert", std::move(backbone))),
        pooling(pooling) {
    check(num_labels >= 2, "models::early_exit",
          "early exit needs a classification task (num_labels >= 2), got num_labels {}",
          num_labels);
    const int64_t H = bert->config().hidden_size;
    const int64_t L = bert->config().num_hidden_layers;
    check(L >= 1, "models::early_exit", "the backbone has no encoder layer");
    dropout = register_module("dropout", torch::nn::Dropout(bert->config().head_dropout()));
    exits = register_module("exits", torch::nn::ModuleList());
    for (int64_t i = 0; i + 1 < L; ++i) exits->push_back(new_head(H, num_labels));
    classifier = register_module("classifier", new_head(H, num_labels));
    predictor = register_module("predictor", new_head(H + num_labels, 1));
  }

  /// A frozen backbone from a Hugging Face folder (its config edited by `adjust` if given) with
  /// new exits and predictor.
  static std::shared_ptr<BertEarlyExitForSequenceClassificationImpl> from_pretrained(
      const std::filesystem::path& folder, int64_t num_labels, Pooling pooling = Pooling::Cls,
      const ConfigAdjust& adjust = nullptr) {
    return std::make_shared<BertEarlyExitForSequenceClassificationImpl>(
        Bert::from_pretrained(folder, adjust), num_labels, pooling);
  }

  /// Sets the exit policy and its threshold (see ExitPolicy; checked by check_exit_threshold).
  void set_exit(ExitPolicy policy, double threshold) {
    check_exit_threshold(policy, threshold, "set_exit");
    policy_ = policy;
    threshold_ = threshold;
  }
  ExitPolicy policy() const { return policy_; }
  double threshold() const { return threshold_; }

  int64_t num_labels() const { return classifier->options.out_features(); }
  int64_t num_layers() const { return static_cast<int64_t>(bert->encoder->layers->size()); }

  /// Logits [N, num_labels]. In eval mode with a policy other than None, early_exit()'s logits;
  /// otherwise the last layer's (every layer runs), which equal a BertForSequenceClassification's
  /// with the same backbone, method and `classifier`.
  torch::Tensor forward(const torch::Tensor& input_ids, const torch::Tensor& attention_mask = {},
                        const torch::Tensor& token_type_ids = {}) {
    if (!is_training() && policy_ != ExitPolicy::None) {
      return early_exit(input_ids, attention_mask, token_type_ids).logits;
    }
    return run(input_ids, attention_mask, token_type_ids, nullptr, true).logits;
  }

  /// Every layer's exit logits and predictor confidence, all layers run (training; see loss()).
  /// The predictor reads the pooled state and the probabilities detached, so its loss does not
  /// move the exits or the backbone.
  ExitOutputs forward_exits(const torch::Tensor& input_ids,
                            const torch::Tensor& attention_mask = {},
                            const torch::Tensor& token_type_ids = {}) {
    ExitOutputs out;
    run(input_ids, attention_mask, token_type_ids, &out, false);
    return out;
  }

  /// The training loss for labels [N] (int64 classes): the exits' cross-entropies averaged with
  /// weight i for layer i, as PABEE weights them (deeper exits, which see more of the input, count
  /// more; the last layer's head gets the largest share), plus the predictor's binary
  /// cross-entropy against whether each exit's argmax is right, averaged over layers (BERxiT).
  torch::Tensor loss(const ExitOutputs& outputs, const torch::Tensor& labels) const {
    check(!outputs.logits.empty() && outputs.logits.size() == outputs.confidence.size(),
          "models::early_exit", "loss: expected one logits and one confidence tensor per layer");
    namespace F = torch::nn::functional;
    torch::Tensor heads, confidence;
    double total = 0;
    for (size_t i = 0; i < outputs.logits.size(); ++i) {
      const auto& logits = outputs.logits[i];
      const double w = static_cast<double>(i + 1);
      auto ce = F::cross_entropy(logits.to(torch::kFloat), labels) * w;
      heads = heads.defined() ? heads + ce : ce;
      total += w;
      auto right = logits.argmax(-1).eq(labels).to(torch::kFloat);
      auto bce =
          F::binary_cross_entropy_with_logits(outputs.confidence[i].to(torch::kFloat), right);
      confidence = confidence.defined() ? confidence + bce : bce;
    }
    const auto layers = static_cast<double>(outputs.logits.size());
    return heads / total + confidence / layers;
  }

  /// Inference with the exit policy: each example stops at the first layer whose answer the
  /// policy accepts, and the later layers run only for the examples still in (the batch shrinks
  /// as examples leave). Every example leaves at the last layer at the latest. With
  /// ExitPolicy::None every layer runs for every example.
  ExitResult early_exit(const torch::Tensor& input_ids, const torch::Tensor& attention_mask = {},
                        const torch::Tensor& token_type_ids = {}) {
    auto x = bert->embed(input_ids, token_type_ids);
    const int64_t N = input_ids.size(0), L = num_layers();
    const int64_t extra = x.size(1) - input_ids.size(1);
    auto mask = attention_mask;
    auto padding = BertImpl::key_padding_mask(mask, extra);
    auto index = torch::arange(N, input_ids.options().dtype(torch::kLong));
    torch::Tensor logits_out, layers_out = torch::full({N}, L, index.options());
    torch::Tensor previous, streak;  // patience: last class and agreeing layers per example
    for (int64_t i = 0; i < L; ++i) {
      x = step(i, x, padding);
      auto pooled = pool(x, mask);
      auto logits = head(i)(dropout(pooled));
      if (!logits_out.defined()) logits_out = torch::empty({N, logits.size(1)}, logits.options());
      if (i + 1 == L) {
        logits_out.index_copy_(0, index, logits);
        break;
      }
      auto leave = decide(pooled, logits, previous, streak);
      if (!leave.any().item<bool>()) continue;
      auto gone = leave.nonzero().squeeze(1), stay = leave.logical_not().nonzero().squeeze(1);
      logits_out.index_copy_(0, index.index_select(0, gone), logits.index_select(0, gone));
      layers_out.index_fill_(0, index.index_select(0, gone), i + 1);
      if (stay.numel() == 0) break;
      index = index.index_select(0, stay);
      x = x.index_select(0, stay);
      if (padding.defined()) padding = padding.index_select(0, stay);
      if (mask.defined()) mask = mask.index_select(0, stay);
      if (previous.defined()) previous = previous.index_select(0, stay);
      if (streak.defined()) streak = streak.index_select(0, stay);
    }
    return {logits_out, layers_out};
  }

  // TaskModel: the heads and the predictor go with the adapter, the policy into its config.
  std::vector<std::string> task_modules() const override {
    return {"classifier", "exits", "predictor"};
  }
  nlohmann::json task_settings() const override {
    return {{"early_exit",
             {{"policy", to_string(policy_)},
              {"threshold", threshold_},
              {"pooling", to_string(pooling)},
              {"num_labels", num_labels()},
              {"layers", num_layers()}}}};
  }
  std::function<void()> plan_task_settings(const nlohmann::json& settings,
                                           const std::string& file) override {
    check(settings.is_object() && settings.contains("early_exit"), "load_adapter",
          "{}: task_settings has no \"early_exit\" object", file);
    const auto& e = settings["early_exit"];
    check(e.is_object(), "load_adapter", "{}: task_settings.early_exit is not an object", file);
    using peft::detail::config_value;
    const auto policy =
        enum_from_name<ExitPolicy>(config_value<std::string>(e, "policy", file), file);
    const auto pool_kind =
        enum_from_name<Pooling>(config_value<std::string>(e, "pooling", file), file);
    const auto threshold = config_value<double>(e, "threshold", file);
    check_exit_threshold(policy, threshold, file);
    const auto labels = config_value<int64_t>(e, "num_labels", file);
    const auto layers = config_value<int64_t>(e, "layers", file);
    check(labels == num_labels() && layers == num_layers(), "load_adapter",
          "{}: early exit for {} labels over {} layers, but this model has {} labels and {} layers",
          file, labels, layers, num_labels(), num_layers());
    return [this, policy, threshold, pool_kind] {
      policy_ = policy;
      threshold_ = threshold;
      pooling = pool_kind;
    };
  }

  Bert bert{nullptr};
  torch::nn::Dropout dropout{nullptr};
  torch::nn::ModuleList exits{nullptr};
  torch::nn::Linear classifier{nullptr};
  torch::nn::Linear predictor{nullptr};
  /// How a layer's hidden states become its exit's input (the same for every layer).
  Pooling pooling = Pooling::Cls;

 private:
  /// The head after layer i (0-based): exits[i], or classifier after the last layer.
  torch::nn::Linear head(int64_t i) {
    if (i + 1 == num_layers()) return classifier;
    return torch::nn::Linear(exits->ptr<torch::nn::LinearImpl>(static_cast<size_t>(i)));
  }

  /// Encoder layer i on x [N, S, H] (BERT runs its encoder batch-first), with the encoder's final
  /// norm (if any) after the last.
  torch::Tensor step(int64_t i, const torch::Tensor& x, const torch::Tensor& padding) {
    auto* layer =
        bert->encoder->layers->ptr<peft::nn::TransformerEncoderLayerImpl>(static_cast<size_t>(i))
            .get();
    auto out = layer->forward(x, {}, padding);
    if (i + 1 == num_layers() && !bert->encoder->base->norm.is_empty()) {
      out = bert->encoder->base->norm.forward<torch::Tensor>(out);
    }
    return out;
  }

  torch::Tensor pool(const torch::Tensor& hidden, const torch::Tensor& mask) {
    return pooling == Pooling::Mean ? masked_mean(hidden, mask) : bert->pool(hidden);
  }

  /// The predictor's logit for pooled states [N, H] and exit logits [N, C].
  torch::Tensor confidence(const torch::Tensor& pooled, const torch::Tensor& logits) {
    auto probs = torch::softmax(logits.detach().to(torch::kFloat), -1).to(pooled.scalar_type());
    return predictor(torch::cat({pooled.detach(), probs}, -1)).squeeze(-1);
  }

  /// Which of the examples still in leave after this layer [n] (bool).
  torch::Tensor decide(const torch::Tensor& pooled, const torch::Tensor& logits,
                       torch::Tensor& previous, torch::Tensor& streak) {
    switch (policy_) {
      case ExitPolicy::Entropy: {
        auto logp = torch::log_softmax(logits.to(torch::kFloat), -1);
        auto entropy = -(logp.exp() * logp).sum(-1);
        return entropy.lt(threshold_);
      }
      case ExitPolicy::Patience: {
        auto cls = logits.argmax(-1);
        if (!previous.defined()) {
          streak = torch::zeros_like(cls);
        } else {
          streak = torch::where(cls.eq(previous), streak + 1, torch::zeros_like(streak));
        }
        previous = cls;
        return streak.ge(static_cast<int64_t>(threshold_));
      }
      case ExitPolicy::Learned:
        return torch::sigmoid(confidence(pooled, logits).to(torch::kFloat)).ge(threshold_);
      case ExitPolicy::None:
        break;
    }
    return torch::zeros({logits.size(0)}, logits.options().dtype(torch::kBool));
  }

  /// Every layer for every example; fills `outputs` (all exits) when given, else only the last
  /// layer's logits are computed.
  ExitResult run(const torch::Tensor& input_ids, const torch::Tensor& attention_mask,
                 const torch::Tensor& token_type_ids, ExitOutputs* outputs, bool last_only) {
    auto x = bert->embed(input_ids, token_type_ids);
    const auto padding = BertImpl::key_padding_mask(attention_mask, x.size(1) - input_ids.size(1));
    const int64_t L = num_layers();
    torch::Tensor logits;
    for (int64_t i = 0; i < L; ++i) {
      x = step(i, x, padding);
      if (last_only && i + 1 < L) continue;
      auto pooled = pool(x, attention_mask);
      logits = head(i)(dropout(pooled));
      if (outputs != nullptr) {
        outputs->logits.push_back(logits);
        outputs->confidence.push_back(confidence(pooled, logits));
      }
    }
    return {logits, torch::full({input_ids.size(0)}, L, input_ids.options().dtype(torch::kLong))};
  }

  ExitPolicy policy_ = ExitPolicy::None;
  double threshold_ = 0;
};

/// Module holder of BertEarlyExitForSequenceClassificationImpl, with from_pretrained():
///
///     auto model = peft::models::BertEarlyExitForSequenceClassification::from_pretrained(
///         "models/all-MiniLM-L6-v2", 2, peft::models::Pooling::Mean);
///     peft::attach(*model->bert, peft::LoRAOptions(8).targets({"query", "value"}));
///     // train on model->loss(model->forward_exits(ids, mask, types), labels), then:
///     model->eval();
///     model->set_exit(peft::models::ExitPolicy::Entropy, 0.2);
///     auto result = model->early_exit(ids, mask, types);  // logits and layers run per example
class BertEarlyExitForSequenceClassification
    : public torch::nn::ModuleHolder<BertEarlyExitForSequenceClassificationImpl> {
 public:
  using torch::nn::ModuleHolder<BertEarlyExitForSequenceClassificationImpl>::ModuleHolder;
  using torch::nn::ModuleHolder<BertEarlyExitForSequenceClassificationImpl>::get;

  /// A frozen backbone from a Hugging Face folder (its config edited by `adjust` if given) with
  /// new exits and predictor.
  static BertEarlyExitForSequenceClassification from_pretrained(
      const std::filesystem::path& folder, int64_t num_labels, Pooling pooling = Pooling::Cls,
      const ConfigAdjust& adjust = nullptr) {
    return BertEarlyExitForSequenceClassification(
        BertEarlyExitForSequenceClassificationImpl::from_pretrained(folder, num_labels, pooling,
                                                                    adjust));
  }
};

// ------------------------------------------------------------------------------ file format

namespace detail {

/// The file format of an early-exit model with no method attached (the exits over a fully
/// frozen model): `peft_type` EARLY_EXIT, the heads as modules to save and the policy as
/// task_settings (save_adapter adds both for any TaskModel). With a method attached, the
/// method's own format carries the same heads and settings.
inline MethodEntry early_exit_entry() {
  MethodEntry e;
  e.name = "early_exit";
  e.summary =
      "Early exit: a classifier per layer and a learned confidence predictor (PABEE, "
      "BERxiT); the heads alone, over a frozen model";
  e.default_lr = 1e-3;
  e.format = AdapterFormat{
      "EARLY_EXIT", true, [](SaveContext&) {},
      [](const LoadContext& c) {
        auto found = peft::detail::find_module<BertEarlyExitForSequenceClassificationImpl>(c.model);
        check(found.second != nullptr, "load_adapter",
              "{}: EARLY_EXIT loads into a models::BertEarlyExitForSequenceClassification, which "
              "this model neither is nor contains",
              c.config_file);
        LoadPlan plan;
        plan.apply = [] {};
        return plan;
      }};
  e.held_by = [](torch::nn::Module& model) {
    return peft::detail::find_module<BertEarlyExitForSequenceClassificationImpl>(model).second !=
           nullptr;
  };
  e.trainable = false;
  return e;
}

inline const bool early_exit_registered = register_method(early_exit_entry());

}  // namespace detail
}  // namespace models
PEFT_NAMESPACE_END
