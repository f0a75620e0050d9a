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
#include <peft/core/site.hpp>
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

/// The kinds of site a stock module's peft wrapper has.
template <class Stock>
constexpr unsigned wrapper_site_kinds() {
  if constexpr (std::is_same_v<Stock, torch::nn::Linear>) return site_kinds(SiteKind::Linear);
  if constexpr (std::is_same_v<Stock, torch::nn::Embedding>) {
    return site_kinds(SiteKind::Embedding, SiteKind::Input);
  }
  if constexpr (std::is_same_v<Stock, torch::nn::MultiheadAttention>) {
    return site_kinds(SiteKind::Linear, SiteKind::Attention);
  }
  if constexpr (std::is_same_v<Stock, torch::nn::TransformerEncoderLayer>) {
    return site_kinds(SiteKind::Linear, SiteKind::Attention, SiteKind::Block);
  }
  return site_kinds(SiteKind::Linear, SiteKind::Attention, SiteKind::Block, SiteKind::Input);
}

/// Whether a method has a site in a stock module type (checked at compile time from the
/// method's `kinds`).
template <class Options, class Stock>
struct applies_to : std::bool_constant<(Options::kinds & wrapper_site_kinds<Stock>()) != 0> {};

/// A stock module wrapped by peft with one method attached. It is the wrapper's module holder
/// (nn::Linear, nn::TransformerEncoder, ...), so more methods can be attached with peft::attach.
template <class Stock, class Options>
class Tuned : public wrapper_of<Stock>::type {
  static_assert(applies_to<Options, Stock>::value,
                "this method has no site in this module type (its Options::kinds and the "
                "wrapper's sites have no kind in common)");
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

PEFT_NAMESPACE_END
