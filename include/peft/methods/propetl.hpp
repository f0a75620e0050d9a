#pragma once

// ProPETL (Zeng et al., ACL 2023, "One Network, Many Masks"): one prototype module — a bottleneck
// adapter, a LoRA update or a pair of prefix rows — is shared by every selected site, and each site
// owns a binary mask over the prototype's weights (not its biases). A mask keeps exactly the top
// keep_ratio fraction of real-valued scores; forward uses the hard 0/1 mask and backward passes
// the gradient to the scores as if the mask were the identity (straight-through). Stored, a model
// is the prototype plus one bit per mask entry; at inference the masked weights can be computed
// once per site (freeze_masks()).

#include <torch/arg.h>
#include <torch/nn/functional/linear.h>
#include <torch/nn/init.h>
#include <torch/nn/modules/linear.h>
#include <torch/types.h>

#include <cmath>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <unordered_set>
#include <utility>
#include <vector>

#include <peft/config.hpp>
#include <peft/core/attach.hpp>
#include <peft/core/enum_names.hpp>
#include <peft/core/error.hpp>
#include <peft/core/site.hpp>
#include <peft/core/targets.hpp>
#include <peft/core/registry.hpp>
#include <peft/detail/json.hpp>
#include <peft/detail/linear.hpp>
#include <peft/detail/shape.hpp>
#include <peft/methods/adapter.hpp>

PEFT_NAMESPACE_BEGIN

/// The module ProPETL shares between sites.
enum class ProPETLBase {
  Adapter,  ///< bottleneck adapter at Block sites (default targets follow adapter_kind)
  LoRA,     ///< low-rank update at Linear sites (default targets: query, value)
  Prefix,   ///< key/value rows at Attention sites (default target: prefix)
};

constexpr EnumTable<ProPETLBase, 3> enum_table(ProPETLBase) {
  return {"ProPETL base",
          "propetl",
          {{{ProPETLBase::Adapter, "adapter"},
            {ProPETLBase::LoRA, "lora"},
            {ProPETLBase::Prefix, "prefix"}}}};
}

/// "adapter", "lora" or "prefix".
inline const char* to_string(ProPETLBase base) {
  return enum_name(base);
}

class ProPETLPrototypeImpl;

namespace detail {

/// The prototype one attach() call shares: created by the first site's method, which also
/// registers it (so it is saved and counted once); the other sites hold the same module.
struct ProPETLShared {
  std::shared_ptr<ProPETLPrototypeImpl> prototype;
  bool registered = false;
};

inline std::vector<std::string> propetl_default_targets(ProPETLBase base, AdapterKind kind) {
  switch (base) {
    case ProPETLBase::Adapter:
      return kind == AdapterKind::Houlsby ? std::vector<std::string>{"attn_block", "ffn_block"}
                                          : std::vector<std::string>{"ffn_block"};
    case ProPETLBase::LoRA:
      return {"query", "value"};
    case ProPETLBase::Prefix:
      return {"prefix"};
  }
  return {};
}

inline SiteKind propetl_site_kind(ProPETLBase base) {
  switch (base) {
    case ProPETLBase::Adapter:
      return SiteKind::Block;
    case ProPETLBase::LoRA:
      return SiteKind::Linear;
    case ProPETLBase::Prefix:
      return SiteKind::Attention;
  }
  return SiteKind::Block;
}

}  // namespace detail

class ProPETLImpl;

/// Options of ProPETL. The prototype's own settings mirror AdapterOptions, LoRAOptions and
/// PrefixOptions; only those of the chosen base are used.
struct ProPETLOptions : TargetOptions<ProPETLOptions> {
  explicit ProPETLOptions(ProPETLBase base = ProPETLBase::Adapter,
                          AdapterKind adapter_kind = AdapterKind::Pfeiffer)
      : TargetOptions(detail::propetl_default_targets(base, adapter_kind)),
        base_(base),
        adapter_kind_(adapter_kind) {}
  TORCH_ARG(ProPETLBase, base);
  /// Fraction of each prototype weight a site keeps, in (0, 1]: exactly round(keep_ratio * numel)
  /// entries per mask are 1.
  TORCH_ARG(double, keep_ratio) = 0.5;
  /// Adapter base: placement (also sets the default targets in the constructor).
  TORCH_ARG(AdapterKind, adapter_kind);
  /// Adapter base: inner size = dimension / reduction_factor unless bottleneck() is set.
  TORCH_ARG(int64_t, reduction_factor) = 16;
  TORCH_ARG(int64_t, bottleneck) = 0;
  /// Adapter base: "relu", "gelu", "tanh", "silu" or "identity".
  TORCH_ARG(std::string, activation) = "relu";
  /// Adapter base: multiplies the adapter's output.
  TORCH_ARG(double, scaling) = 1.0;
  /// Adapter base: standard deviation of the down-projection; prefix base: of the rows.
  TORCH_ARG(double, init_std) = 1e-2;
  /// LoRA base: rank and alpha (the update is scaled by alpha / r).
  TORCH_ARG(int64_t, r) = 8;
  TORCH_ARG(double, alpha) = 8.0;
  /// Prefix base: rows per attention.
  TORCH_ARG(int64_t, num_virtual_tokens) = 10;

 public:
  using Impl = ProPETLImpl;
  static constexpr const char* method = "propetl";
  /// The kinds of site the method can sit at.
  static constexpr unsigned kinds =
      site_kinds(SiteKind::Block, SiteKind::Linear, SiteKind::Attention);
  /// Any site a base fits; the method checks the site against the chosen base.
  static bool fits(const SiteImpl& site) {
    return site.kind() == SiteKind::Block || site.kind() == SiteKind::Linear ||
           site.kind() == SiteKind::Attention;
  }
  /// The sites attach() takes: those of the chosen base.
  bool selects(const SiteImpl& site) const {
    return site.kind() == detail::propetl_site_kind(base_);
  }
  void validate() const {
    check(keep_ratio_ > 0 && keep_ratio_ <= 1, method, "keep_ratio must be in (0, 1], got {}",
          keep_ratio_);
    check(reduction_factor_ > 0, method, "reduction_factor must be positive, got {}",
          reduction_factor_);
    check(bottleneck_ >= 0, method, "bottleneck must not be negative, got {}", bottleneck_);
    check(init_std_ >= 0, method, "init_std must not be negative, got {}", init_std_);
    check(r_ > 0, method, "rank must be positive, got r={}", r_);
    check(alpha_ > 0, method, "alpha must be positive, got alpha={}", alpha_);
    check(num_virtual_tokens_ > 0, method, "num_virtual_tokens must be positive, got {}",
          num_virtual_tokens_);
    AdapterOptions::activation_fn(activation_);
  }

  /// The prototype these options share between sites (set by peft::attach; without one, each
  /// method builds its own).
  const std::shared_ptr<detail::ProPETLShared>& shared() const { return shared_; }
  ProPETLOptions& shared(std::shared_ptr<detail::ProPETLShared> state) {
    shared_ = std::move(state);
    return *this;
  }
  /// These options with fresh shared state bound, so every site of one attach() call shares it.
  ProPETLOptions prepared() const {
    ProPETLOptions bound = *this;
    bound.shared(std::make_shared<detail::ProPETLShared>());
    return bound;
  }

 private:
  std::shared_ptr<detail::ProPETLShared> shared_;
};

/// The shared module: its weights (masked per site) and biases (shared as they are). Parameter
/// names follow the unshared methods: `adapter_down.weight`, `lora_A.weight`, `prefix_keys`, ...
class ProPETLPrototypeImpl : public torch::nn::Module {
 public:
  /// Builds the prototype for a site of sizes in -> out.
  ProPETLPrototypeImpl(const ProPETLOptions& options, int64_t in, int64_t out)
      : torch::nn::Module("peft::ProPETLPrototype"), base_(options.base()), in_(in), out_(out) {
    torch::NoGradGuard no_grad;
    switch (base_) {
      case ProPETLBase::Adapter: {
        const int64_t m =
            options.bottleneck() > 0 ? options.bottleneck() : out / options.reduction_factor();
        check(m > 0, ProPETLOptions::method, "reduction_factor {} leaves no units of dimension {}",
              options.reduction_factor(), out);
        adapter_down = register_module("adapter_down", torch::nn::Linear(out, m));
        adapter_up = register_module("adapter_up", torch::nn::Linear(m, out));
        adapter_down->weight.normal_(0.0, options.init_std());
        adapter_down->bias.zero_();
        adapter_up->weight.zero_();
        adapter_up->bias.zero_();
        weights_ = {adapter_down->weight, adapter_up->weight};
        weight_names_ = {"down", "up"};
        break;
      }
      case ProPETLBase::LoRA: {
        const int64_t r = options.r();
        lora_A = register_module("lora_A",
                                 torch::nn::Linear(torch::nn::LinearOptions(in, r).bias(false)));
        lora_B = register_module("lora_B",
                                 torch::nn::Linear(torch::nn::LinearOptions(r, out).bias(false)));
        lora_B->weight.zero_();
        weights_ = {lora_A->weight, lora_B->weight};
        weight_names_ = {"A", "B"};
        break;
      }
      case ProPETLBase::Prefix: {
        const int64_t n = options.num_virtual_tokens();
        prefix_keys =
            register_parameter("prefix_keys", torch::randn({n, out}) * options.init_std());
        prefix_values =
            register_parameter("prefix_values", torch::randn({n, out}) * options.init_std());
        weights_ = {prefix_keys, prefix_values};
        weight_names_ = {"keys", "values"};
        break;
      }
    }
  }

  ProPETLBase base() const { return base_; }
  int64_t in_features() const { return in_; }
  int64_t out_features() const { return out_; }
  /// The masked tensors, in the order of weight_names().
  const std::vector<torch::Tensor>& weights() const { return weights_; }
  /// Short names of the masked tensors ("down"/"up", "A"/"B", "keys"/"values").
  const std::vector<std::string>& weight_names() const { return weight_names_; }

  torch::nn::Linear adapter_down{nullptr}, adapter_up{nullptr};
  torch::nn::Linear lora_A{nullptr}, lora_B{nullptr};
  torch::Tensor prefix_keys, prefix_values;

 private:
  ProPETLBase base_;
  int64_t in_, out_;
  std::vector<torch::Tensor> weights_;
  std::vector<std::string> weight_names_;
};
TORCH_MODULE(ProPETLPrototype);

/// The hard mask of `scores`: exactly round(keep_ratio * numel) ones at the highest scores; among
/// equal scores the lower flat index is kept, so the mask is deterministic.
inline torch::Tensor top_k_mask(const torch::Tensor& scores, double keep_ratio) {
  check(keep_ratio > 0 && keep_ratio <= 1, ProPETLOptions::method,
        "keep_ratio must be in (0, 1], got {}", keep_ratio);
  const int64_t numel = scores.numel();
  const int64_t keep = static_cast<int64_t>(std::llround(keep_ratio * static_cast<double>(numel)));
  auto flat = scores.detach().reshape({numel});
  // A stable sort keeps equal scores in index order, which is the tie-break.
  auto order = std::get<1>(torch::sort(flat, /*stable=*/true, /*dim=*/0, /*descending=*/true));
  auto mask = torch::zeros({numel}, flat.options());
  mask.index_fill_(0, order.narrow(0, 0, keep), 1.0);
  return mask.view(scores.sizes());
}

/// Packs a 0/1 (or bool) tensor into bytes, eight entries per byte, entry 8j+i in bit i of byte j
/// (least significant first); the last byte is zero-padded. Returns a uint8 tensor
/// [ceil(numel / 8)].
inline torch::Tensor pack_mask(const torch::Tensor& mask) {
  auto flat = mask.detach().reshape({mask.numel()}).cpu();
  check(flat.scalar_type() == torch::kBool || flat.eq(0).logical_or(flat.eq(1)).all().item<bool>(),
        "pack_mask", "mask of shape {} has entries other than 0 and 1",
        detail::shape(mask.sizes()));
  auto bits = flat.ne(0);
  const int64_t bytes = (flat.numel() + 7) / 8;
  auto padded = torch::zeros({bytes * 8}, torch::kUInt8);
  padded.narrow(0, 0, flat.numel()).copy_(bits.to(torch::kUInt8));
  auto weights = torch::tensor({1, 2, 4, 8, 16, 32, 64, 128}, torch::kUInt8);
  return (padded.view({bytes, 8}) * weights).sum(1).to(torch::kUInt8);
}

/// Unpacks pack_mask()'s bytes into a float 0/1 tensor of `shape`. Throws when the byte count does
/// not fit the shape.
inline torch::Tensor unpack_mask(const torch::Tensor& packed, c10::IntArrayRef shape) {
  int64_t numel = 1;
  for (auto s : shape) numel *= s;
  check(packed.scalar_type() == torch::kUInt8 && packed.dim() == 1, "unpack_mask",
        "packed mask must be a 1-d uint8 tensor, got shape {}", detail::shape(packed.sizes()));
  check(packed.numel() == (numel + 7) / 8, "unpack_mask",
        "{} bytes cannot hold a mask of shape {} (expected {} bytes)", packed.numel(),
        detail::shape(shape), (numel + 7) / 8);
  auto weights = torch::tensor({1, 2, 4, 8, 16, 32, 64, 128}, torch::kUInt8);
  auto bits = torch::bitwise_and(packed.cpu().unsqueeze(1), weights).ne(0);
  return bits.reshape({-1}).narrow(0, 0, numel).to(torch::kFloat).view(shape);
}

/// One site's ProPETL: a handle on the shared prototype and one score tensor per prototype weight,
/// `mask_scores_<weight>` (e.g. `mask_scores_down`), so a trainer can give the scores their own
/// learning rate with `lr_for("mask_scores", ...)`.
class ProPETLImpl : public MethodImpl {
 public:
  ProPETLImpl(const SiteImpl& site, const ProPETLOptions& options)
      : MethodImpl("propetl", options.adapter_name()),
        options_(options),
        activation_(AdapterOptions::activation_fn(options.activation())) {
    options.validate();
    check(options.selects(site), ProPETLOptions::method,
          "a {} prototype needs {} sites, but \"{}\" is a {} site", to_string(options.base()),
          to_string(detail::propetl_site_kind(options.base())), site.role(),
          to_string(site.kind()));
    auto shared = options.shared() ? options.shared() : std::make_shared<detail::ProPETLShared>();
    if (!shared->prototype) {
      shared->prototype =
          std::make_shared<ProPETLPrototypeImpl>(options, site.in_features(), site.out_features());
    }
    prototype_ = shared->prototype;
    check(prototype_->in_features() == site.in_features() &&
              prototype_->out_features() == site.out_features(),
          ProPETLOptions::method,
          "all sites share one prototype of sizes {} -> {}, but \"{}\" has {} -> {}; select "
          "sites of one size (or attach twice)",
          prototype_->in_features(), prototype_->out_features(), site.role(), site.in_features(),
          site.out_features());
    if (!shared->registered) {
      register_module("prototype", ProPETLPrototype(prototype_));
      shared->registered = true;
    }
    for (size_t i = 0; i < prototype_->weights().size(); ++i) {
      const auto& w = prototype_->weights()[i];
      scores_.push_back(register_parameter("mask_scores_" + prototype_->weight_names()[i],
                                           torch::rand(w.sizes(), w.options())));
    }
  }

  /// The hard masks of this site, one per prototype weight.
  std::vector<torch::Tensor> masks() const {
    std::vector<torch::Tensor> out;
    for (const auto& s : scores_) out.push_back(top_k_mask(s, options_.keep_ratio()));
    return out;
  }

  /// The masked weights this site computes with: prototype * mask, with straight-through
  /// gradients to the scores (or the cached tensors after freeze_masks()).
  std::vector<torch::Tensor> masked_weights() const {
    if (!cached_.empty()) return cached_;
    std::vector<torch::Tensor> out;
    for (size_t i = 0; i < scores_.size(); ++i) {
      const auto& s = scores_[i];
      // hard + (s - s) is exactly the hard mask in value, and the identity for s's gradient.
      auto mask = top_k_mask(s, options_.keep_ratio()) + (s - s.detach());
      out.push_back(prototype_->weights()[i] * mask);
    }
    return out;
  }

  /// Fixes the masks and computes this site's masked weights once (inference): the scores stop
  /// training and forward no longer sorts or multiplies. Call again after changing the prototype.
  void freeze_masks() {
    cached_.clear();
    torch::NoGradGuard no_grad;
    auto weights = masked_weights();
    for (auto& w : weights) cached_.push_back(w.detach().clone());
    for (auto& s : scores_) s.set_requires_grad(false);
  }
  /// The prototype is shared by every site of the attach() call.
  bool shared_across_sites() const override { return true; }
  /// Whether freeze_masks() is in effect.
  bool masks_frozen() const { return !cached_.empty(); }

  torch::Tensor apply(const torch::Tensor& input, const torch::Tensor& output) override {
    auto w = masked_weights();
    if (prototype_->base() == ProPETLBase::LoRA) {
      return output +
             peft::detail::linear(peft::detail::linear(input, w[0]), w[1]) * lora_scaling();
    }
    const auto& source = options_.adapter_kind() == AdapterKind::Parallel ? input : output;
    auto down = activation_(peft::detail::linear(source, w[0], prototype_->adapter_down->bias));
    return output +
           peft::detail::linear(down, w[1], prototype_->adapter_up->bias) * options_.scaling();
  }

  std::pair<torch::Tensor, torch::Tensor> prefix() override {
    if (prototype_->base() != ProPETLBase::Prefix) return {};
    auto w = masked_weights();
    return {w[0], w[1]};
  }

  bool can_merge() const override { return prototype_->base() == ProPETLBase::LoRA; }
  torch::Tensor delta_weight() override {
    if (prototype_->base() != ProPETLBase::LoRA) return {};
    auto w = masked_weights();
    return torch::matmul(w[1], w[0]) * lora_scaling();
  }

  /// The masks packed one bit per entry (what is stored per site besides the prototype).
  std::vector<torch::Tensor> packed_masks() const {
    std::vector<torch::Tensor> out;
    for (const auto& m : masks()) out.push_back(pack_mask(m));
    return out;
  }

  const ProPETLOptions& options() const { return options_; }
  /// The prototype shared with the other sites of the same attach() call.
  ProPETLPrototype prototype() const { return ProPETLPrototype(prototype_); }
  /// Score tensors, one per prototype weight.
  const std::vector<torch::Tensor>& scores() const { return scores_; }

 private:
  double lora_scaling() const { return options_.alpha() / static_cast<double>(options_.r()); }

  ProPETLOptions options_;
  std::function<torch::Tensor(const torch::Tensor&)> activation_;
  std::shared_ptr<ProPETLPrototypeImpl> prototype_;
  std::vector<torch::Tensor> scores_;
  std::vector<torch::Tensor> cached_;
};

/// freeze_masks() on every ProPETL method of `model`; returns how many.
inline int64_t freeze_masks(torch::nn::Module& model) {
  int64_t n = 0;
  for (auto& [path, m] : attached_methods(model)) {
    if (auto p = std::dynamic_pointer_cast<ProPETLImpl>(m)) {
      p->freeze_masks();
      ++n;
    }
  }
  return n;
}

/// What a ProPETL model stores, against the same method without sharing.
struct ProPETLStorage {
  int64_t prototype_bytes = 0;  ///< every distinct prototype's parameters, in their dtype
  int64_t mask_bytes = 0;       ///< every site's masks, bit-packed
  int64_t unshared_bytes = 0;   ///< one full copy of the prototype per site (the plain method)
  int64_t sites = 0;
  int64_t total() const { return prototype_bytes + mask_bytes; }
  /// total() / unshared_bytes: about 1/L + 1/32 for L sites in fp32.
  double ratio() const {
    return unshared_bytes == 0 ? 0.0
                               : static_cast<double>(total()) / static_cast<double>(unshared_bytes);
  }
};

/// Stored bytes of the ProPETL methods of one adapter in `model`.
inline ProPETLStorage propetl_storage(torch::nn::Module& model,
                                      const std::string& adapter = "default") {
  ProPETLStorage out;
  std::unordered_set<const void*> seen;
  for (auto& [path, m] : attached_methods(model)) {
    auto p = std::dynamic_pointer_cast<ProPETLImpl>(m);
    if (!p || p->adapter() != adapter) continue;
    int64_t bytes = 0;
    for (const auto& t : p->prototype()->parameters()) {
      bytes += t.numel() * static_cast<int64_t>(t.element_size());
    }
    if (seen.insert(p->prototype().get()).second) out.prototype_bytes += bytes;
    out.unshared_bytes += bytes;
    for (const auto& packed : p->packed_masks()) out.mask_bytes += packed.numel();
    ++out.sites;
  }
  check(out.sites > 0, ProPETLOptions::method, "no ProPETL method of adapter \"{}\" is attached",
        adapter);
  return out;
}

// ------------------------------------------------------------------------- options and format

namespace detail {

/// ProPETL: the shared prototype once (`prototype.<parameter>`) and, per site, each mask packed
/// one bit per entry (`<site>.mask_<weight>`, uint8); the float scores are not stored.
inline void save_propetl(const SiteMethods& methods, nlohmann::json& config,
                         NamedTensors& tensors) {
  auto first = std::dynamic_pointer_cast<ProPETLImpl>(methods.front().second);
  auto prototype = first->prototype();
  const auto& o = first->options();
  std::vector<std::string> targets;
  for (const auto& [path, m] : methods) {
    auto p = std::dynamic_pointer_cast<ProPETLImpl>(m);
    check(p->prototype().get() == prototype.get() && p->options().keep_ratio() == o.keep_ratio(),
          "save_adapter",
          "ProPETL at \"{}\" does not share the prototype and keep_ratio of \"{}\"; a file holds "
          "one prototype (give each attach() its own adapter_name)",
          path, methods.front().first);
    targets.push_back(path);
    const auto masks = p->masks();
    for (size_t i = 0; i < masks.size(); ++i) {
      tensors.emplace_back(path + ".mask_" + prototype->weight_names()[i], pack_mask(masks[i]));
    }
  }
  for (const auto& item : prototype->named_parameters()) {
    tensors.emplace_back("prototype." + item.key(), item.value());
  }
  nlohmann::json shapes = nlohmann::json::object();
  for (size_t i = 0; i < prototype->weights().size(); ++i) {
    shapes[prototype->weight_names()[i]] = prototype->weights()[i].sizes().vec();
  }
  config["base"] = to_string(prototype->base());
  config["keep_ratio"] = o.keep_ratio();
  switch (prototype->base()) {
    case ProPETLBase::Adapter:
      config["adapter_kind"] = to_string(o.adapter_kind());
      config["bottleneck"] = prototype->adapter_down->weight.size(0);
      config["activation"] = o.activation();
      config["scaling"] = o.scaling();
      break;
    case ProPETLBase::LoRA:
      config["r"] = prototype->lora_A->weight.size(0);
      config["lora_alpha"] = number(o.alpha());
      break;
    case ProPETLBase::Prefix:
      config["num_virtual_tokens"] = prototype->prefix_keys.size(0);
      break;
  }
  config["target_modules"] = targets;
  config["mask_shapes"] = shapes;
}

inline LoadPlan plan_propetl(torch::nn::Module& model, const nlohmann::json& config,
                             const std::string& cfg_name, const std::string& adapter_name) {
  const auto base_name = config_value<std::string>(config, "base", cfg_name);
  const auto base = enum_from_name<ProPETLBase>(base_name, cfg_name);
  const AdapterKind kind =
      base == ProPETLBase::Adapter
          ? enum_from_name<AdapterKind>(config_value<std::string>(config, "adapter_kind", cfg_name),
                                        cfg_name)
          : AdapterKind::Pfeiffer;
  ProPETLOptions options(base, kind);
  options.keep_ratio(config_value<double>(config, "keep_ratio", cfg_name));
  switch (base) {
    case ProPETLBase::Adapter:
      options.bottleneck(config_value<int64_t>(config, "bottleneck", cfg_name))
          .activation(config_value<std::string>(config, "activation", cfg_name))
          .scaling(config_value<double>(config, "scaling", cfg_name));
      check(options.bottleneck() > 0, "load_adapter", "{}: bottleneck must be positive, got {}",
            cfg_name, options.bottleneck());
      break;
    case ProPETLBase::LoRA:
      options.r(config_value<int64_t>(config, "r", cfg_name))
          .alpha(config_value<double>(config, "lora_alpha", cfg_name));
      break;
    case ProPETLBase::Prefix:
      options.num_virtual_tokens(config_value<int64_t>(config, "num_virtual_tokens", cfg_name));
      break;
  }
  const auto targets = config_value<std::vector<std::string>>(config, "target_modules", cfg_name);
  check(!targets.empty(), "load_adapter", "{}: target_modules is empty", cfg_name);
  options.adapter_name(adapter_name);
  options.targets(targets);
  detail::validate_from_file(options, cfg_name);
  auto sites = sites_by_path(model);
  std::shared_ptr<SiteImpl> first;
  for (const auto& path : targets) {
    auto it = sites.find(path);
    check(it != sites.end() && options.selects(*it->second), "load_adapter",
          "{}: target \"{}\" is no {} site of this model", cfg_name, path,
          to_string(propetl_site_kind(base)));
    if (!first) first = it->second;
    check(it->second->in_features() == first->in_features() &&
              it->second->out_features() == first->out_features(),
          "load_adapter", "{}: target \"{}\" has sizes {} -> {}, unlike \"{}\" ({} -> {})",
          cfg_name, path, it->second->in_features(), it->second->out_features(), targets.front(),
          first->in_features(), first->out_features());
  }
  // A prototype built from the settings, off the model, gives the expected keys and shapes.
  std::shared_ptr<ProPETLPrototypeImpl> probe;
  try {
    probe = std::make_shared<ProPETLPrototypeImpl>(options, first->in_features(),
                                                   first->out_features());
  } catch (const Error& e) {
    fail("load_adapter", "{}: {}", cfg_name, e.what());
  }
  const auto shapes =
      config_value<std::map<std::string, std::vector<int64_t>>>(config, "mask_shapes", cfg_name);
  check(shapes.size() == probe->weights().size(), "load_adapter",
        "{}: mask_shapes lists {} masks; a {} prototype has {} ({})", cfg_name, shapes.size(),
        base_name, probe->weights().size(),
        fmt::format("{}", fmt::join(probe->weight_names(), ", ")));
  for (size_t i = 0; i < probe->weights().size(); ++i) {
    const auto& name = probe->weight_names()[i];
    const auto expected = probe->weights()[i].sizes().vec();
    auto it = shapes.find(name);
    check(it != shapes.end(), "load_adapter", "{}: mask_shapes has no \"{}\"", cfg_name, name);
    check(it->second == expected, "load_adapter",
          "{}: mask_shapes \"{}\" is {}, but the prototype these settings build has {}", cfg_name,
          name, shape_of(it->second), shape_of(expected));
  }

  LoadPlan plan;
  const std::string head = targets.front();
  for (const auto& item : probe->named_parameters()) {
    const std::string key = item.key();
    plan.slots.push_back(
        {"prototype." + key, item.value().sizes().vec(), [&model, head, adapter_name, key] {
           auto p = method_of<ProPETLImpl>(model, head, "propetl", adapter_name);
           return parameter(*p->prototype(), key);
         }});
  }
  const double keep_ratio = options.keep_ratio();
  for (const auto& path : targets) {
    for (size_t i = 0; i < probe->weights().size(); ++i) {
      const auto shape = probe->weights()[i].sizes().vec();
      const int64_t numel = probe->weights()[i].numel();
      const int64_t keep =
          static_cast<int64_t>(std::llround(keep_ratio * static_cast<double>(numel)));
      const std::string key = path + ".mask_" + probe->weight_names()[i];
      Slot slot{key, {(numel + 7) / 8}, [&model, path, adapter_name, i] {
                  return method_of<ProPETLImpl>(model, path, "propetl", adapter_name)->scores()[i];
                }};
      slot.dtype = torch::kByte;
      // Scores equal to the 0/1 mask make top_k_mask() give that mask back, as long as it keeps
      // exactly as many entries as keep_ratio does.
      slot.convert = [cfg_name, key, shape, keep, numel, keep_ratio](const torch::Tensor& packed,
                                                                     const std::string& file) {
        auto mask = unpack_mask(packed, torch::IntArrayRef(shape));
        const auto ones = mask.sum().item<double>();
        check(ones == static_cast<double>(keep), "load_adapter",
              "{}: mask \"{}\" keeps {} of {} entries, but keep_ratio {} (in {}) keeps {}", file,
              key, static_cast<int64_t>(ones), numel, keep_ratio, cfg_name, keep);
        return mask;
      };
      plan.slots.push_back(std::move(slot));
    }
  }
  plan.apply = [&model, options] { attach(model, options); };
  plan.finish = [&model, targets, adapter_name] {
    for (const auto& path : targets) {
      method_of<ProPETLImpl>(model, path, "propetl", adapter_name)->freeze_masks();
    }
  };
  return plan;
}

inline MethodEntry propetl_entry() {
  MethodEntry e;
  e.name = "propetl";
  e.summary = "ProPETL: one shared prototype, a binary mask per layer (Zeng et al., 2023)";
  e.default_lr = 1e-3;
  e.option_keys = {
      "base",       "keep_ratio",         "mask_lr",        "reduction_factor",   "activation", "r",
      "lora_alpha", "num_virtual_tokens", "target_modules", "layers_to_transform"};
  e.attach = [](torch::nn::Module& model, const nlohmann::json& json) {
    const char* w = "propetl";
    const auto base_name = config_value_or<std::string>(json, "base", "adapter", "options", w);
    check(base_name == "adapter" || base_name == "lora" || base_name == "prefix", w,
          "base must be adapter, lora or prefix, got \"{}\"", base_name);
    const auto base = base_name == "lora"     ? ProPETLBase::LoRA
                      : base_name == "prefix" ? ProPETLBase::Prefix
                                              : ProPETLBase::Adapter;
    ProPETLOptions options(base);
    options.keep_ratio(config_value_or<double>(json, "keep_ratio", 0.5, "options", w))
        .reduction_factor(config_value_or<int64_t>(json, "reduction_factor", 16, "options", w))
        .activation(config_value_or<std::string>(json, "activation", "relu", "options", w))
        .r(config_value_or<int64_t>(json, "r", 8, "options", w))
        .alpha(config_value_or<double>(json, "lora_alpha", 8.0, "options", w))
        .num_virtual_tokens(config_value_or<int64_t>(json, "num_virtual_tokens", 10, "options", w));
    targets_from_json(json, options, "options", "propetl");
    return peft::attach(model, options);
  };
  e.lr_rules = [](double, const nlohmann::json& json) {
    // The masks learn through their scores (mask_scores_<weight>) at their own rate.
    return std::vector<std::pair<std::string, double>>{
        {"mask_scores", config_value_or<double>(json, "mask_lr", 1e-2, "options", "propetl")}};
  };
  e.format = AdapterFormat{"PROPETL", true,
                           [](SaveContext& c) { save_propetl(c.methods, c.config, c.tensors); },
                           [](const LoadContext& c) {
                             return plan_propetl(c.model, c.config, c.config_file, c.adapter);
                           }};
  return e;
}

inline const bool propetl_registered = register_method(propetl_entry());

}  // namespace detail

PEFT_NAMESPACE_END
