#pragma once

// P-tuning (Liu et al., 2021, "GPT Understands, Too"): the n virtual tokens in front of the input
// are produced during training by a prompt encoder — a bidirectional LSTM followed by an MLP, as in
// the paper, or an MLP alone (Hugging Face PEFT's default) — from n trainable input embeddings.
// fold() replaces the encoder by the rows it produces, `prompt_embeddings` [n, dim], which is what
// Hugging Face PEFT saves; the folded method is prompt tuning with those rows.

#include <torch/arg.h>
#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/rnn.h>
#include <torch/types.h>

#include <cstdint>
#include <string>
#include <tuple>

#include <nlohmann/json.hpp>

#include <peft/config.hpp>
#include <peft/core/attach.hpp>
#include <peft/core/enum_names.hpp>
#include <peft/core/error.hpp>
#include <peft/core/site.hpp>
#include <peft/core/registry.hpp>
#include <peft/core/targets.hpp>
#include <peft/detail/json.hpp>
#include <peft/methods/prompt.hpp>

PEFT_NAMESPACE_BEGIN

/// The network that produces P-tuning's virtual tokens during training.
enum class PromptEncoderType {
  MLP,   ///< Linear -> ReLU -> Linear -> ReLU -> Linear (Hugging Face PEFT's default)
  LSTM,  ///< bidirectional LSTM, then Linear -> ReLU -> Linear (the paper's)
};

/// "mlp" or "lstm" (the names on peft-glue's command line).
constexpr EnumTable<PromptEncoderType, 2> enum_table(PromptEncoderType) {
  return {"prompt encoder",
          "ptuning",
          {{{PromptEncoderType::MLP, "mlp"}, {PromptEncoderType::LSTM, "lstm"}}}};
}

class PTuningImpl;

/// Options of P-tuning. Default targets: the model's `prompt` site.
struct PTuningOptions : TargetOptions<PTuningOptions> {
  explicit PTuningOptions(int64_t num_virtual_tokens = 20)
      : TargetOptions({"prompt"}), num_virtual_tokens_(num_virtual_tokens) {}
  /// n: virtual tokens.
  TORCH_ARG(int64_t, num_virtual_tokens);
  TORCH_ARG(PromptEncoderType, encoder) = PromptEncoderType::MLP;
  /// Hidden size of the encoder (per direction for the LSTM); 0 = the token dimension.
  TORCH_ARG(int64_t, encoder_hidden_size) = 0;
  /// LSTM layers (the MLP always has three linear layers).
  TORCH_ARG(int64_t, encoder_num_layers) = 2;
  /// Standard deviation of the encoder's input embeddings (Hugging Face: nn.Embedding's 1.0).
  TORCH_ARG(double, init_std) = 1.0;

 public:
  using Impl = PTuningImpl;
  static constexpr const char* method = "ptuning";
  /// The kinds of site the method can sit at.
  static constexpr unsigned kinds = site_kinds(SiteKind::Input);
  static bool fits(const SiteImpl& site) { return site.kind() == SiteKind::Input; }
  void validate() const {
    check(num_virtual_tokens_ > 0, method, "num_virtual_tokens must be positive, got {}",
          num_virtual_tokens_);
    check(encoder_hidden_size_ >= 0, method,
          "encoder_hidden_size must be positive (or 0 for the token dimension), got {}",
          encoder_hidden_size_);
    check(encoder_num_layers_ > 0, method, "encoder_num_layers must be positive, got {}",
          encoder_num_layers_);
    check(init_std_ >= 0, method, "init_std must not be negative, got {}", init_std_);
  }
};

/// The prompt encoder: `embedding` [n, dim] -> (`lstm_head`) -> `mlp_head` -> [n, dim]. Names
/// follow Hugging Face's PromptEncoder (its `embedding.weight` is our `embedding`).
class PromptEncoderImpl : public torch::nn::Module {
 public:
  PromptEncoderImpl(int64_t n, int64_t dim, const PTuningOptions& options)
      : torch::nn::Module("peft::PromptEncoder"), type_(options.encoder()) {
    const int64_t h = options.encoder_hidden_size() > 0 ? options.encoder_hidden_size() : dim;
    embedding = register_parameter("embedding", torch::randn({n, dim}) * options.init_std());
    if (type_ == PromptEncoderType::LSTM) {
      lstm_head =
          register_module("lstm_head", torch::nn::LSTM(torch::nn::LSTMOptions(dim, h)
                                                           .num_layers(options.encoder_num_layers())
                                                           .bidirectional(true)));
      mlp_head = register_module(
          "mlp_head", torch::nn::Sequential(torch::nn::Linear(2 * h, 2 * h), torch::nn::ReLU(),
                                            torch::nn::Linear(2 * h, dim)));
    } else {
      mlp_head = register_module("mlp_head",
                                 torch::nn::Sequential(torch::nn::Linear(dim, h), torch::nn::ReLU(),
                                                       torch::nn::Linear(h, h), torch::nn::ReLU(),
                                                       torch::nn::Linear(h, dim)));
    }
  }

  /// The virtual tokens [n, dim].
  torch::Tensor forward() {
    if (type_ == PromptEncoderType::MLP) return mlp_head->forward(embedding);
    // One sequence of n tokens, sequence-first: [n, 1, dim].
    auto encoded = std::get<0>(lstm_head->forward(embedding.unsqueeze(1))).squeeze(1);
    return mlp_head->forward(encoded);
  }

  torch::Tensor embedding;
  torch::nn::LSTM lstm_head{nullptr};
  torch::nn::Sequential mlp_head{nullptr};

 private:
  PromptEncoderType type_;
};
TORCH_MODULE(PromptEncoder);

/// P-tuning at one Input site: the child `prompt_encoder` during training, `prompt_embeddings`
/// [n, dim] after fold().
class PTuningImpl : public MethodImpl {
 public:
  PTuningImpl(const SiteImpl& site, const PTuningOptions& options)
      : MethodImpl("ptuning", options.adapter_name()) {
    options.validate();
    prompt_encoder = register_module("prompt_encoder", PromptEncoder(options.num_virtual_tokens(),
                                                                     site.out_features(), options));
  }

  torch::Tensor prompt() override {
    return prompt_encoder ? prompt_encoder->forward() : prompt_embeddings;
  }

  /// Replaces the encoder by the rows it produces now (no-op once folded).
  void fold() override {
    if (!prompt_encoder) return;
    // Run as training does (LibTorch's LSTM takes another kernel without autograd, which differs
    // in the last bits), so the folded model reproduces the trained one exactly.
    auto rows = prompt_encoder->forward().detach().clone();
    const bool train = prompt_encoder->embedding.requires_grad();
    unregister_module("prompt_encoder");
    prompt_encoder = nullptr;
    prompt_embeddings = register_parameter("prompt_embeddings", rows, train);
  }

  /// Whether the rows still come from the encoder.
  bool encoded() const { return static_cast<bool>(prompt_encoder); }

  PromptEncoder prompt_encoder{nullptr};
  torch::Tensor prompt_embeddings;
};

namespace detail {

inline MethodEntry ptuning_entry() {
  MethodEntry e;
  e.name = "ptuning";
  e.summary = "P-tuning: prompt rows produced by a small encoder (Liu et al., 2021)";
  e.default_lr = 1e-3;
  e.option_keys = {"num_virtual_tokens", "encoder_reparameterization_type", "encoder_hidden_size"};
  e.attach = [](torch::nn::Module& model, const nlohmann::json& json) {
    auto options = PTuningOptions(
        config_value_or<int64_t>(json, "num_virtual_tokens", 20, "options", "ptuning"));
    const auto type = config_value_or<std::string>(json, "encoder_reparameterization_type", "MLP",
                                                   "options", "ptuning");
    check(type == "MLP" || type == "LSTM", "ptuning",
          "encoder_reparameterization_type must be MLP or LSTM, got \"{}\"", type);
    options.encoder(type == "LSTM" ? PromptEncoderType::LSTM : PromptEncoderType::MLP)
        .encoder_hidden_size(
            config_value_or<int64_t>(json, "encoder_hidden_size", 0, "options", "ptuning"));
    return peft::attach(model, options);
  };
  // Saved as the rows the encoder produces now: PROMPT_TUNING, which loads as prompt tuning.
  // Hugging Face PEFT's own P_TUNING files hold the same thing (`prompt_embeddings`, the
  // encoder's output: get_prompt_embedding_to_save), so they load here as those rows too.
  e.format = AdapterFormat{"PROMPT_TUNING", /*reads=*/false, save_prompt_rows, load_prompt};
  e.format->also_reads = {"P_TUNING"};
  return e;
}

inline const bool ptuning_registered = register_method(ptuning_entry());

}  // namespace detail

PEFT_NAMESPACE_END
