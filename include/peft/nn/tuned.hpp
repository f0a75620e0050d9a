#pragma once

// The templated public face: `peft::LoRA<torch::nn::Linear>`, `peft::Adapter<...>`, ... take a
// stock module, wrap it (freezing it) and attach the method in one step.
//
//     torch::nn::Linear dense(768, 768);
//     peft::LoRA<torch::nn::Linear> tuned(dense, peft::LoRAOptions(8).alpha(16));
//     auto y = tuned(x);   // dense(x) + 2 * B A x

#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/transformercoder.h>
#include <torch/nn/modules/transformerlayer.h>

#include <type_traits>
#include <utility>

#include <peft/config.hpp>
#include <peft/core/attach.hpp>
#include <peft/nn/attention.hpp>
#include <peft/nn/embedding.hpp>
#include <peft/nn/encoder.hpp>
#include <peft/nn/encoder_layer.hpp>
#include <peft/nn/linear.hpp>

PEFT_NAMESPACE_BEGIN

/// The peft wrapper of each supported stock module holder.
template <class Stock>
struct wrapper_of;
template <>
struct wrapper_of<torch::nn::Linear> {
  using type = nn::Linear;
};
template <>
struct wrapper_of<torch::nn::Embedding> {
  using type = nn::Embedding;
};
template <>
struct wrapper_of<torch::nn::MultiheadAttention> {
  using type = nn::MultiheadAttention;
};
template <>
struct wrapper_of<torch::nn::TransformerEncoderLayer> {
  using type = nn::TransformerEncoderLayer;
};
template <>
struct wrapper_of<torch::nn::TransformerEncoder> {
  using type = nn::TransformerEncoder;
};

/// Whether a method has a site in a stock module type (checked at compile time).
template <class Options, class Stock>
struct applies_to : std::true_type {};
template <>
struct applies_to<BitFitOptions, torch::nn::Embedding> : std::false_type {};
template <class Stock>
struct applies_to<AdapterOptions, Stock>
    : std::bool_constant<std::is_same_v<Stock, torch::nn::TransformerEncoderLayer> ||
                         std::is_same_v<Stock, torch::nn::TransformerEncoder>> {};
template <class Stock>
struct applies_to<PrefixOptions, Stock>
    : std::bool_constant<!std::is_same_v<Stock, torch::nn::Linear> &&
                         !std::is_same_v<Stock, torch::nn::Embedding>> {};
template <class Stock>
struct applies_to<PromptOptions, Stock>
    : std::bool_constant<std::is_same_v<Stock, torch::nn::Embedding> ||
                         std::is_same_v<Stock, torch::nn::TransformerEncoder>> {};

/// A stock module wrapped by peft with one method attached. It is the wrapper's module holder
/// (nn::Linear, nn::TransformerEncoder, ...), so more methods can be attached with peft::attach.
template <class Stock, class Options>
class Tuned : public wrapper_of<Stock>::type {
  static_assert(applies_to<Options, Stock>::value,
                "this method has no site in this module type: adapters need an encoder layer or "
                "encoder, prefixes an attention, prompts an encoder or embedding, and BitFit a "
                "projection");
  using Wrapper = typename wrapper_of<Stock>::type;

 public:
  Tuned(Stock stock, const Options& options) : Wrapper(std::move(stock)) {
    // A bare Linear or Embedding is itself the site LoRA and BitFit attach to.
    if constexpr (std::is_base_of_v<SiteImpl, typename Wrapper::ContainedType>) {
      if (Options::fits(*this->get())) {
        attach_site(*this->get(), options);
        return;
      }
    }
    attach(*this->get(), options);
  }
};

/// LoRA on a stock Linear, Embedding (directly), MultiheadAttention, TransformerEncoderLayer or
/// TransformerEncoder (at the options' targets).
template <class Stock>
using LoRA = Tuned<Stock, LoRAOptions>;
/// BitFit on a stock Linear, MultiheadAttention, TransformerEncoderLayer or TransformerEncoder.
template <class Stock>
using BitFit = Tuned<Stock, BitFitOptions>;
/// Bottleneck adapters on a stock TransformerEncoderLayer or TransformerEncoder.
template <class Stock>
using Adapter = Tuned<Stock, AdapterOptions>;
/// Prefix tuning on a stock MultiheadAttention, TransformerEncoderLayer or TransformerEncoder.
template <class Stock>
using PrefixTuning = Tuned<Stock, PrefixOptions>;
/// Prompt tuning on a stock TransformerEncoder or Embedding.
template <class Stock>
using PromptTuning = Tuned<Stock, PromptOptions>;

PEFT_NAMESPACE_END
