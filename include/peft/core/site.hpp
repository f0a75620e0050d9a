#pragma once

// Sites are the points inside a wrapped model where methods add their part: a projection's output
// (LoRA, BitFit), a sub-layer's output (bottleneck adapters), an attention's keys and values
// (prefix tuning) or a sequence's front (prompt tuning). A wrapper computes the stock result and
// passes it through the site; with no active method the site returns it untouched.

#include <torch/nn/module.h>
#include <torch/types.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <peft/config.hpp>
#include <peft/core/enum_names.hpp>
#include <peft/core/error.hpp>

PEFT_NAMESPACE_BEGIN

/// What a site sees, and so which methods fit it.
enum class SiteKind {
  Linear,     ///< y = x W^T + b; methods get (x, y) and return a new y
  Embedding,  ///< y = W[ids]; methods get (ids, y)
  Block,      ///< a sub-layer's output before its residual; methods get (sub-layer input, output)
  Attention,  ///< an attention's keys and values; methods contribute rows to prepend
  Input,      ///< a sequence's front; methods contribute rows to prepend
};

constexpr EnumTable<SiteKind, 5> enum_table(SiteKind) {
  return {"site kind",
          "site",
          {{{SiteKind::Linear, "linear"},
            {SiteKind::Embedding, "embedding"},
            {SiteKind::Block, "block"},
            {SiteKind::Attention, "attention"},
            {SiteKind::Input, "input"}}}};
}

/// "linear", "embedding", "block", "attention" or "input".
inline const char* to_string(SiteKind kind) {
  return enum_name(kind);
}

/// A set of site kinds, one bit each (`site_kinds(SiteKind::Linear, SiteKind::Embedding)`).
constexpr unsigned site_kind_bit(SiteKind kind) {
  return 1U << static_cast<unsigned>(kind);
}
template <class... Kinds>
constexpr unsigned site_kinds(Kinds... kinds) {
  return (0U | ... | site_kind_bit(kinds));
}

class SiteImpl;

/// Base of every method instance attached to one site. A method is a module: its parameters are
/// registered under the site as `<method>_<adapter>`, e.g. `query.lora_default.lora_A.weight`.
class MethodImpl : public torch::nn::Module {
 public:
  MethodImpl(std::string method, std::string adapter)
      : torch::nn::Module(method), method_(std::move(method)), adapter_(std::move(adapter)) {}

  /// The method's name: "lora", "adapter", "bitfit", "prefix", "prompt", ...
  const std::string& method() const { return method_; }
  /// The adapter this instance belongs to ("default" unless named otherwise).
  const std::string& adapter() const { return adapter_; }
  /// Whether the method takes part in forward (see peft::set_adapter).
  bool active() const { return active_; }
  /// Whether the method is merged into the frozen weights (and so skipped in forward).
  bool merged() const { return merged_; }

  /// Linear, Embedding and Block sites: returns `output` with this method applied; `input` is
  /// what the site's layer received.
  virtual torch::Tensor apply(const torch::Tensor& input, const torch::Tensor& output) {
    (void)input;
    return output;
  }
  /// Attention sites: key and value rows, each [n, embed_dim], put in front of the real ones.
  virtual std::pair<torch::Tensor, torch::Tensor> prefix() { return {}; }
  /// Input sites: rows [n, dim] put in front of the sequence.
  virtual torch::Tensor prompt() { return {}; }

  /// Whether merge() can fold this method into the frozen weights.
  virtual bool can_merge() const { return false; }
  /// The change to the frozen weight in its own layout, or an undefined tensor.
  virtual torch::Tensor delta_weight() { return {}; }
  /// The change to the frozen bias, or an undefined tensor.
  virtual torch::Tensor delta_bias() { return {}; }
  /// Replaces training-only reparameterisations by the plain parameters they produce.
  virtual void fold() {}
  /// Whether this instance shares trained state with the instances at its adapter's other
  /// sites (ProPETL's prototype), so it cannot leave one site alone.
  virtual bool shared_across_sites() const { return false; }

  /// A low-rank update of a linear layer's weight, delta = scaling * b.matmul(a) with a [r, in]
  /// and b [out, r], for file formats that store the factors (llama.cpp's LoRA adapters).
  struct LowRank {
    torch::Tensor a, b;
    double scaling = 1.0;
  };
  /// This method's update as LowRank factors, or nothing when it has another form (the default;
  /// LoRA on a linear layer says yes).
  virtual std::optional<LowRank> low_rank() const { return std::nullopt; }

 private:
  friend class SiteImpl;
  friend void set_method_state(MethodImpl&, bool, bool);
  std::string method_;
  std::string adapter_;
  bool active_ = true;
  bool merged_ = false;
};

/// Sets the activity and merge flags of a method; used by the model-level controls.
inline void set_method_state(MethodImpl& method, bool active, bool merged) {
  method.active_ = active;
  method.merged_ = merged;
}

/// A point where methods attach. Owned by a wrapper; holds the attached methods as children and,
/// for projections, views of the frozen weight and bias that merge() writes into.
class SiteImpl : public torch::nn::Module {
 public:
  /// `in` and `out` are the feature sizes the site sees (for Embedding: vocabulary size and
  /// embedding size; for Block, Attention and Input: the model dimension twice).
  SiteImpl(SiteKind kind, std::string role, int64_t in, int64_t out)
      : torch::nn::Module("peft::Site"), kind_(kind), role_(std::move(role)), in_(in), out_(out) {}

  SiteKind kind() const { return kind_; }
  /// What the site is in its layer: "query", "key", "value", "out_proj", "linear1", "linear2",
  /// "attn_block", "ffn_block", "prefix", "prompt", "embedding" or "linear".
  const std::string& role() const { return role_; }
  int64_t in_features() const { return in_; }
  int64_t out_features() const { return out_; }

  /// Views of the frozen tensors this site's output comes from (bias may be undefined).
  void set_frozen(torch::Tensor weight, torch::Tensor bias) {
    weight_ = std::move(weight);
    bias_ = std::move(bias);
  }
  const torch::Tensor& frozen_weight() const { return weight_; }
  const torch::Tensor& frozen_bias() const { return bias_; }

  /// Rows a prompt may be initialised from (an embedding table), if the site knows one.
  void set_vocabulary(torch::Tensor table) { vocabulary_ = std::move(table); }
  const torch::Tensor& vocabulary() const { return vocabulary_; }

  /// Attaches a method; its registration name is `<method>_<adapter>` and must be new here.
  void add(std::shared_ptr<MethodImpl> method) {
    std::string name = method->method() + "_" + method->adapter();
    for (const auto& m : methods_) {
      if (m->method() == method->method() && m->adapter() == method->adapter()) {
        fail(method->method(), "adapter \"{}\" already has a {} at this {} site (\"{}\")",
             method->adapter(), method->method(), to_string(kind_), role_);
      }
    }
    register_module(name, method);
    methods_.push_back(std::move(method));
  }

  const std::vector<std::shared_ptr<MethodImpl>>& methods() const { return methods_; }
  /// Detaches the `method` of `adapter` from this site and returns it: its parameters leave the
  /// model (parameters(), trainable_parameters(), adapter files) and forward no longer runs it.
  /// Throws when there is none, or when it is merged (unmerge first: the frozen weights would
  /// keep its change). An optimizer built before still holds the removed tensors.
  std::shared_ptr<MethodImpl> remove(const std::string& method, const std::string& adapter) {
    for (auto it = methods_.begin(); it != methods_.end(); ++it) {
      if ((*it)->method() != method || (*it)->adapter() != adapter) continue;
      check(!(*it)->merged(), method,
            "adapter \"{}\" is merged at this {} site (\"{}\"); unmerge "
            "first",
            adapter, to_string(kind_), role_);
      auto removed = *it;
      unregister_module(method + "_" + adapter);
      methods_.erase(it);
      return removed;
    }
    fail(method, "adapter \"{}\" has no {} at this {} site (\"{}\")", adapter, method,
         to_string(kind_), role_);
  }

  /// Turns every method of this site off (or back on) without forgetting which are active.
  void set_enabled(bool enabled) { enabled_ = enabled; }
  bool enabled() const { return enabled_; }

  /// Whether forward will run any method here.
  bool busy() const {
    if (!enabled_) return false;
    for (const auto& m : methods_) {
      if (m->active() && !m->merged()) return true;
    }
    return false;
  }

  /// Applies every active, unmerged method in attachment order.
  torch::Tensor adapt(const torch::Tensor& input, torch::Tensor output) {
    if (!enabled_) return output;
    for (const auto& m : methods_) {
      if (m->active() && !m->merged()) output = m->apply(input, output);
    }
    return output;
  }

  /// Attention sites: the key and value rows of every active method, concatenated ([n, E] each),
  /// or undefined tensors when there are none.
  std::pair<torch::Tensor, torch::Tensor> prefix_rows() {
    std::vector<torch::Tensor> keys, values;
    if (enabled_) {
      for (const auto& m : methods_) {
        if (!m->active()) continue;
        auto kv = m->prefix();
        if (!kv.first.defined()) continue;
        keys.push_back(kv.first);
        values.push_back(kv.second);
      }
    }
    if (keys.empty()) return {};
    if (keys.size() == 1) return {keys[0], values[0]};
    return {torch::cat(keys, 0), torch::cat(values, 0)};
  }

  /// Input sites: the rows of every active method, concatenated ([n, dim]), or undefined.
  torch::Tensor prompt_rows() {
    std::vector<torch::Tensor> rows;
    if (enabled_) {
      for (const auto& m : methods_) {
        if (!m->active()) continue;
        auto p = m->prompt();
        if (p.defined()) rows.push_back(p);
      }
    }
    if (rows.empty()) return {};
    return rows.size() == 1 ? rows[0] : torch::cat(rows, 0);
  }

 private:
  SiteKind kind_;
  std::string role_;
  int64_t in_;
  int64_t out_;
  torch::Tensor weight_;
  torch::Tensor bias_;
  torch::Tensor vocabulary_;
  bool enabled_ = true;
  std::vector<std::shared_ptr<MethodImpl>> methods_;
};
TORCH_MODULE(Site);

PEFT_NAMESPACE_END
