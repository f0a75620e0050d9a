#pragma once

// Prefix tuning (Li & Liang, 2021): every selected attention gets n trainable key and value rows,
// after the projections, in front of the real ones; all queries may attend to them. With
// projection(true) the rows are produced during training by an MLP from a smaller embedding (the
// paper's reparameterisation); fold() replaces the MLP by the rows it produces, for saving and
// inference.

#include <torch/arg.h>
#include <torch/nn/modules/linear.h>
#include <torch/types.h>

#include <cstdint>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include <peft/config.hpp>
#include <peft/core/attach.hpp>
#include <peft/core/error.hpp>
#include <peft/core/site.hpp>
#include <peft/core/registry.hpp>
#include <peft/core/targets.hpp>
#include <peft/detail/json.hpp>
#include <peft/methods/prompt.hpp>
#include <peft/nn/tuned.hpp>

PEFT_NAMESPACE_BEGIN

class PrefixImpl;

/// Options of prefix tuning. Default targets: every attention's `prefix` site.
struct PrefixOptions : TargetOptions<PrefixOptions> {
  explicit PrefixOptions(int64_t num_virtual_tokens = 10)
      : TargetOptions({"prefix"}), num_virtual_tokens_(num_virtual_tokens) {}
  /// n: key/value rows per attention.
  TORCH_ARG(int64_t, num_virtual_tokens);
  /// Produce the rows with an MLP (embedding -> Linear -> tanh -> Linear) during training.
  TORCH_ARG(bool, projection) = false;
  /// Hidden size of that MLP.
  TORCH_ARG(int64_t, projection_hidden) = 512;
  /// Standard deviation of the initial rows (or of the MLP's input embedding).
  TORCH_ARG(double, init_std) = 0.02;

 public:
  using Impl = PrefixImpl;
  static constexpr const char* method = "prefix";
  /// The kinds of site the method can sit at.
  static constexpr unsigned kinds = site_kinds(SiteKind::Attention);
  static bool fits(const SiteImpl& site) { return site.kind() == SiteKind::Attention; }
  void validate() const {
    check(num_virtual_tokens_ > 0, method, "num_virtual_tokens must be positive, got {}",
          num_virtual_tokens_);
    check(!projection_ || projection_hidden_ > 0, method,
          "projection_hidden must be positive, got {}", projection_hidden_);
    check(init_std_ >= 0, method, "init_std must not be negative, got {}", init_std_);
  }
};

/// The training-time reparameterisation of prefix rows: embedding [n, E] -> Linear -> tanh ->
/// Linear -> [n, 2E] (keys, then values).
class PrefixProjectionImpl : public torch::nn::Module {
 public:
  PrefixProjectionImpl(int64_t n, int64_t dim, int64_t hidden, double init_std)
      : torch::nn::Module("peft::PrefixProjection") {
    embedding = register_parameter("embedding", torch::randn({n, dim}) * init_std);
    dense_in = register_module("dense_in", torch::nn::Linear(dim, hidden));
    dense_out = register_module("dense_out", torch::nn::Linear(hidden, 2 * dim));
  }
  torch::Tensor forward() { return dense_out->forward(torch::tanh(dense_in->forward(embedding))); }

  torch::Tensor embedding;
  torch::nn::Linear dense_in{nullptr}, dense_out{nullptr};
};
TORCH_MODULE(PrefixProjection);

/// Prefix rows for one attention: `prefix_keys` and `prefix_values`, each [n, E], or before fold()
/// the child `projection` that produces them.
class PrefixImpl : public MethodImpl {
 public:
  PrefixImpl(const SiteImpl& site, const PrefixOptions& options)
      : MethodImpl("prefix", options.adapter_name()) {
    options.validate();
    const int64_t n = options.num_virtual_tokens(), dim = site.out_features();
    if (options.projection()) {
      projection = register_module(
          "projection", PrefixProjection(n, dim, options.projection_hidden(), options.init_std()));
    } else {
      prefix_keys = register_parameter("prefix_keys", torch::randn({n, dim}) * options.init_std());
      prefix_values =
          register_parameter("prefix_values", torch::randn({n, dim}) * options.init_std());
    }
  }

  std::pair<torch::Tensor, torch::Tensor> prefix() override {
    if (!projection) return {prefix_keys, prefix_values};
    auto kv = projection->forward().chunk(2, -1);
    return {kv[0], kv[1]};
  }

  /// Replaces the projection by the rows it currently produces (no-op without one).
  void fold() override {
    if (!projection) return;
    torch::Tensor k, v;
    {
      torch::NoGradGuard no_grad;
      std::tie(k, v) = prefix();
    }
    const bool train = projection->embedding.requires_grad();
    unregister_module("projection");
    projection = nullptr;
    prefix_keys = register_parameter("prefix_keys", k.contiguous(), train);
    prefix_values = register_parameter("prefix_values", v.contiguous(), train);
  }

  /// Whether the rows still come from the projection.
  bool projected() const { return static_cast<bool>(projection); }

  torch::Tensor prefix_keys, prefix_values;
  PrefixProjection projection{nullptr};
};

// ------------------------------------------------------------------------- options and format

namespace detail {

/// PEFT's PREFIX_TUNING layout: `prompt_embeddings` [n, layers * 2 * E], row t holding, layer
/// after layer, that layer's key then value row. Needs the adapter at every attention.
inline void save_prefix(SaveContext& c) {
  c.save_prefix = "base_model.";
  auto all = attention_sites(c.model);
  check(c.methods.size() == all.size(), "save_adapter",
        "prefix adapter \"{}\" sits at {} of the model's {} attentions; the file format needs "
        "every layer",
        c.adapter, c.methods.size(), all.size());
  std::vector<torch::Tensor> columns;
  for (size_t i = 0; i < all.size(); ++i) {
    check(c.methods[i].first == all[i].path, "save_adapter",
          "prefix adapter \"{}\" is not at every attention in layer order (\"{}\" vs \"{}\")",
          c.adapter, c.methods[i].first, all[i].path);
    auto [k, v] = c.methods[i].second->prefix();
    if (!columns.empty()) {
      check(k.size(0) == columns.front().size(0), "save_adapter",
            "prefix at \"{}\" has {} rows, unlike the first layer's {}", c.methods[i].first,
            k.size(0), columns.front().size(0));
    }
    columns.push_back(k);
    columns.push_back(v);
  }
  auto rows = torch::cat(columns, 1);
  c.tensors.emplace_back("prompt_embeddings", rows);
  const int64_t dim = columns.front().size(1);
  c.config["prefix_projection"] = false;
  c.config["encoder_hidden_size"] = dim;
  prompt_learning_config(c, rows.size(0), dim);
}

inline LoadPlan load_prefix(const LoadContext& c) {
  LoadPlan plan;
  plan.save_prefix = "base_model.";
  const int64_t n = prompt_learning_tokens(c);
  check(!config_value_or<bool>(c.config, "prefix_projection", false, c.config_file), "load_adapter",
        "{}: prefix_projection true is not supported (the file holds the MLP, not the rows)",
        c.config_file);
  auto all = attention_sites(c.model);
  check(!all.empty(), "load_adapter", "{}: the model has no attention", c.config_file);
  const auto layers = config_value<int64_t>(c.config, "num_layers", c.config_file);
  check(layers == static_cast<int64_t>(all.size()), "load_adapter",
        "{}: num_layers is {}, but the model has {} attentions", c.config_file, layers, all.size());
  const int64_t E = all.front().site->out_features();
  std::vector<std::string> paths;
  for (auto& ref : all) paths.push_back(ref.path);
  // The rows arrive in one buffer; finish() hands each layer its columns.
  auto rows = torch::empty({n, layers * 2 * E});
  plan.slots.push_back({"prompt_embeddings", {n, layers * 2 * E}, [rows] { return rows; }});
  auto options = PrefixOptions(n);
  options.adapter_name(c.adapter);
  options.targets(paths);
  auto& model = c.model;
  plan.apply = [&model, options] { attach(model, options); };
  plan.finish = [c, paths, rows, E] {
    for (size_t l = 0; l < paths.size(); ++l) {
      auto prefix = c.method_at<PrefixImpl>(paths[l], "prefix");
      prefix->prefix_keys.copy_(rows.narrow(1, static_cast<int64_t>(2 * l) * E, E));
      prefix->prefix_values.copy_(rows.narrow(1, static_cast<int64_t>(2 * l + 1) * E, E));
    }
  };
  return plan;
}

inline MethodEntry prefix_entry() {
  MethodEntry e;
  e.name = "prefix";
  e.summary = "prefix tuning: trainable key/value rows at every attention (Li & Liang, 2021)";
  e.default_lr = 1e-2;
  e.option_keys = {"num_virtual_tokens", "prefix_projection", "encoder_hidden_size"};
  e.attach = [](torch::nn::Module& model, const nlohmann::json& json) {
    auto options = PrefixOptions(
        config_value_or<int64_t>(json, "num_virtual_tokens", 10, "options", "prefix"));
    options.projection(config_value_or<bool>(json, "prefix_projection", false, "options", "prefix"))
        .projection_hidden(
            config_value_or<int64_t>(json, "encoder_hidden_size", 512, "options", "prefix"));
    return peft::attach(model, options);
  };
  e.format = AdapterFormat{"PREFIX_TUNING", true, save_prefix, load_prefix};
  return e;
}

inline const bool prefix_registered = register_method(prefix_entry());

}  // namespace detail

/// Prefix tuning on a stock MultiheadAttention, TransformerEncoderLayer or TransformerEncoder.
template <class Stock>
using PrefixTuning = Tuned<Stock, PrefixOptions>;

PEFT_NAMESPACE_END
