#pragma once

// VeRA (Kopiczko et al., 2024, "Vector-based Random Matrix Adaptation"): one pair of frozen
// random matrices A [r, in_max] and B [out_max, r] is shared by every adapted projection, and
// each projection trains only two vectors: y = W x + b + lambda_b * (B (lambda_d * (A x))),
// with A and B cut to the projection's sizes. lambda_b starts at zero, so a new adapter changes
// nothing; lambda_d starts at d_initial. Hugging Face PEFT's `VERA` files: per projection
// `vera_lambda_b` [out] and `vera_lambda_d` [r], and the shared `base_model.vera_A`,
// `base_model.vera_B` once.

#include <torch/arg.h>
#include <torch/nn/functional/linear.h>
#include <torch/types.h>

#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include <peft/config.hpp>
#include <peft/core/attach.hpp>
#include <peft/core/error.hpp>
#include <peft/core/registry.hpp>
#include <peft/core/site.hpp>
#include <peft/core/targets.hpp>
#include <peft/detail/json.hpp>
#include <peft/nn/tuned.hpp>

PEFT_NAMESPACE_BEGIN

class VeRAImpl;

/// Options of VeRA. Default targets: the attention query and value projections.
struct VeRAOptions : TargetOptions<VeRAOptions> {
  explicit VeRAOptions(int64_t r = 256) : TargetOptions({"query", "value"}), r_(r) {}
  /// Rank of the shared random matrices.
  TORCH_ARG(int64_t, r);
  /// The start of every lambda_d entry.
  TORCH_ARG(double, d_initial) = 0.1;
  /// Seed of the shared matrices (drawn as Hugging Face PEFT draws them).
  TORCH_ARG(int64_t, projection_prng_key) = 0;

 public:
  using Impl = VeRAImpl;
  static constexpr const char* method = "vera";
  /// The kinds of site the method can sit at.
  static constexpr unsigned kinds = site_kinds(SiteKind::Linear);
  static bool fits(const SiteImpl& site) { return site.kind() == SiteKind::Linear; }
  void validate() const { check(r_ > 0, method, "rank must be positive, got r={}", r_); }
  /// Gives every VeRA of this attach() call the shared matrices, sized for the largest of them.
  /// Draws them as Hugging Face PEFT does: A [r, in] then B [out, r], kaiming-uniform from a
  /// CPU generator seeded with projection_prng_key.
  void after_attach(torch::nn::Module& model) const;
};

/// VeRA at one projection: the trained `vera_lambda_b` [out] and `vera_lambda_d` [r]; the shared
/// frozen `vera_A` and `vera_B` are buffers (the same tensors at every site of the adapter).
class VeRAImpl : public MethodImpl {
 public:
  VeRAImpl(const SiteImpl& site, const VeRAOptions& options)
      : MethodImpl(VeRAOptions::method, options.adapter_name()),
        options_(options),
        in_(site.in_features()),
        out_(site.out_features()) {
    options.validate();
    vera_lambda_b = register_parameter("vera_lambda_b", torch::zeros({out_}));
    vera_lambda_d =
        register_parameter("vera_lambda_d", torch::full({options.r()}, options.d_initial()));
  }

  torch::Tensor apply(const torch::Tensor& input, const torch::Tensor& output) override {
    check(vera_A.defined(), VeRAOptions::method, "the shared matrices are not set");
    const auto a = vera_A.narrow(1, 0, in_).to(input.scalar_type());
    const auto b = vera_B.narrow(0, 0, out_).to(input.scalar_type());
    const auto inner =
        vera_lambda_d.to(input.scalar_type()) * torch::nn::functional::linear(input, a);
    return output + vera_lambda_b.to(input.scalar_type()) * torch::nn::functional::linear(inner, b);
  }

  bool can_merge() const override { return true; }

  torch::Tensor delta_weight() override {
    return torch::matmul(vera_lambda_b.unsqueeze(1) * vera_B.narrow(0, 0, out_),
                         vera_lambda_d.unsqueeze(1) * vera_A.narrow(1, 0, in_));
  }

  /// Installs the shared matrices (VeRAOptions::after_attach does, once per attach()).
  void share(const torch::Tensor& a, const torch::Tensor& b) {
    check(!vera_A.defined(), VeRAOptions::method, "the shared matrices are already set");
    check(a.size(0) == options_.r() && a.size(1) >= in_ && b.size(0) >= out_ &&
              b.size(1) == options_.r(),
          VeRAOptions::method, "shared matrices [{}, {}] and [{}, {}] do not fit r {} and {} -> {}",
          a.size(0), a.size(1), b.size(0), b.size(1), options_.r(), in_, out_);
    vera_A = register_buffer("vera_A", a);
    vera_B = register_buffer("vera_B", b);
  }

  const VeRAOptions& options() const { return options_; }
  int64_t in_features() const { return in_; }
  int64_t out_features() const { return out_; }

  torch::Tensor vera_lambda_b, vera_lambda_d;
  torch::Tensor vera_A, vera_B;

 private:
  VeRAOptions options_;
  int64_t in_, out_;
};

namespace detail {

/// Kaiming-uniform values (fan in, gain sqrt(2)) drawn from `generator`, as Hugging Face PEFT
/// draws VeRA's shared matrices from its projection_prng_key.
inline torch::Tensor vera_kaiming(std::vector<int64_t> shape, at::Generator& generator) {
  auto t = torch::empty(shape);
  const double bound = std::sqrt(3.0) * std::sqrt(2.0) / std::sqrt(static_cast<double>(shape[1]));
  t.uniform_(-bound, bound, generator);
  return t;
}

/// The VeRA methods of adapter `adapter` in `model` that have no shared matrices yet.
inline std::vector<std::shared_ptr<VeRAImpl>> vera_methods(torch::nn::Module& model,
                                                           const std::string& adapter) {
  std::vector<std::shared_ptr<VeRAImpl>> out;
  for (auto& [path, m] : attached_methods(model)) {
    auto v = std::dynamic_pointer_cast<VeRAImpl>(m);
    if (v && v->adapter() == adapter && !v->vera_A.defined()) out.push_back(v);
  }
  return out;
}

}  // namespace detail

inline void VeRAOptions::after_attach(torch::nn::Module& model) const {
  auto methods = detail::vera_methods(model, adapter_name());
  int64_t in = 0, out = 0;
  for (auto& v : methods) {
    in = std::max(in, v->in_features());
    out = std::max(out, v->out_features());
  }
  auto generator =
      at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(projection_prng_key_));
  auto a = detail::vera_kaiming({r_, in}, generator);
  auto b = detail::vera_kaiming({out, r_}, generator);
  const auto& like = methods.front()->vera_lambda_b;
  a = a.to(like.device(), like.scalar_type());
  b = b.to(like.device(), like.scalar_type());
  for (auto& v : methods) v->share(a, b);
}

// ------------------------------------------------------------------------- options and format

namespace detail {

inline VeRAOptions vera_options_from_json(const nlohmann::json& config, const std::string& file,
                                          const char* where) {
  check(config_value_or<std::string>(config, "bias", "none", file, where) == "none", where,
        "{}: VeRA bias other than \"none\" is not supported", file);
  check(config_value_or<double>(config, "vera_dropout", 0.0, file, where) == 0.0, where,
        "{}: vera_dropout is not supported (only 0)", file);
  check(!config_value_or<bool>(config, "fan_in_fan_out", false, file, where), where,
        "{}: fan_in_fan_out is not supported", file);
  VeRAOptions options(config_value_or<int64_t>(config, "r", 256, file, where));
  options.d_initial(config_value_or<double>(config, "d_initial", 0.1, file, where))
      .projection_prng_key(config_value_or<int64_t>(config, "projection_prng_key", 0, file, where));
  targets_from_json(config, options, file, where);
  validate_from_file(options, file);
  return options;
}

inline void save_vera(SaveContext& c) {
  c.save_prefix = "base_model.model.";
  auto first = std::dynamic_pointer_cast<VeRAImpl>(c.methods.front().second);
  for (auto& [path, m] : c.methods) {
    auto v = std::dynamic_pointer_cast<VeRAImpl>(m);
    check(v->options().r() == first->options().r() && v->vera_A.is_same(first->vera_A),
          "save_adapter",
          "VeRA at \"{}\" does not share the matrices and r of \"{}\"; one file holds one pair",
          path, c.methods.front().first);
  }
  // The lambdas per site; the shared matrices (buffers, not parameters) once.
  const auto targets = save_site_parameters(c);
  c.tensors.emplace_back("base_model.vera_A", first->vera_A);
  c.tensors.emplace_back("base_model.vera_B", first->vera_B);
  const auto& o = first->options();
  c.config["r"] = o.r();
  c.config["d_initial"] = o.d_initial();
  c.config["projection_prng_key"] = o.projection_prng_key();
  c.config["save_projection"] = true;
  c.config["vera_dropout"] = 0.0;
  c.config["bias"] = "none";
  c.config["fan_in_fan_out"] = false;
  c.config["init_weights"] = true;
  c.config["target_modules"] = targets;
}

inline LoadPlan load_vera(const LoadContext& c) {
  LoadPlan plan;
  plan.save_prefix = "base_model.model.";
  check(config_value_or<bool>(c.config, "save_projection", true, c.config_file), "load_adapter",
        "{}: save_projection false: the file lacks the shared matrices (vera_A, vera_B), which "
        "peft cannot regenerate bit for bit on every device; save with save_projection true",
        c.config_file);
  auto options = vera_options_from_json(c.config, c.config_file, "load_adapter");
  options.adapter_name(c.adapter);
  const int64_t r = options.r();
  auto targets = file_sites(c, plan.save_prefix, {".vera_lambda_b"}, &VeRAOptions::fits);
  check(!targets.empty(), "load_adapter", "{}: no VeRA weights (keys ending in .vera_lambda_b)",
        c.weights_file);
  auto sites = sites_by_path(c.model);
  int64_t in = 0, out = 0;
  for (const auto& path : targets) {
    auto site = sites[path];
    in = std::max(in, site->in_features());
    out = std::max(out, site->out_features());
    const std::string stem = plan.save_prefix + c.hub_path(path);
    plan.slots.push_back({stem + ".vera_lambda_b", {site->out_features()}, [c, path] {
                            return c.method_at<VeRAImpl>(path, "vera")->vera_lambda_b;
                          }});
    plan.slots.push_back({stem + ".vera_lambda_d", {r}, [c, path] {
                            return c.method_at<VeRAImpl>(path, "vera")->vera_lambda_d;
                          }});
  }
  // The file's matrices overwrite the drawn ones, in the tensors every site shares.
  const std::string head = targets.front();
  plan.slots.push_back({"base_model.vera_A", {r, in}, [c, head] {
                          return c.method_at<VeRAImpl>(head, "vera")->vera_A;
                        }});
  plan.slots.push_back({"base_model.vera_B", {out, r}, [c, head] {
                          return c.method_at<VeRAImpl>(head, "vera")->vera_B;
                        }});
  options.targets(targets);
  auto& model = c.model;
  plan.apply = [&model, options] { attach(model, options); };
  return plan;
}

inline MethodEntry vera_entry() {
  MethodEntry e;
  e.name = "vera";
  e.summary =
      "VeRA: shared frozen random matrices, two trained vectors per projection "
      "(Kopiczko et al., 2024)";
  e.default_lr = 1e-2;
  e.option_keys = {
      "r",    "d_initial",    "projection_prng_key", "target_modules", "layers_to_transform",
      "bias", "vera_dropout", "fan_in_fan_out"};
  e.attach = [](torch::nn::Module& model, const nlohmann::json& json) {
    return peft::attach(model, vera_options_from_json(json, "options", "vera"));
  };
  e.format = AdapterFormat{"VERA", true, save_vera, load_vera};
  return e;
}

inline const bool vera_registered = register_method(vera_entry());

}  // namespace detail

/// VeRA on a stock Linear, MultiheadAttention, TransformerEncoderLayer or TransformerEncoder.
template <class Stock>
using VeRA = Tuned<Stock, VeRAOptions>;

PEFT_NAMESPACE_END
