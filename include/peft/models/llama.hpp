#pragma once

// Llama-family decoder language models (SmolLM2, TinyLlama, Llama 2/3 shapes): RMSNorm, rotary
// position embeddings, grouped-query attention, SwiGLU feed-forward, tied or separate output head.
// Loaded from a GGUF file (quantised weights are dequantised to float32, as transformers does) or
// from a Hugging Face folder (config.json + model.safetensors). Every projection is a peft site,
// so the methods attach to the decoder as they do to BERT.

#include <torch/arg.h>
#include <torch/nn/functional/activation.h>
#include <torch/nn/functional/loss.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <limits>
#include <map>
#include <numeric>
#include <optional>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include <peft/config.hpp>
#include <peft/core/error.hpp>
#include <peft/detail/json.hpp>
#include <peft/core/hub.hpp>
#include <peft/core/parameters.hpp>
#include <peft/core/site.hpp>
#include <peft/detail/linear.hpp>
#include <peft/detail/shape.hpp>
#include <peft/detail/torch_compat.hpp>
#include <peft/io/gguf.hpp>
#include <peft/io/hf_config.hpp>
#include <peft/io/safetensors.hpp>
#include <peft/io/sharded.hpp>
#include <peft/nn/linear.hpp>

PEFT_NAMESPACE_BEGIN
namespace models {

/// The architecture of a Llama-family decoder.
struct LlamaConfig {
  int64_t vocab_size = 32000;
  int64_t hidden_size = 4096;
  int64_t intermediate_size = 11008;
  int64_t num_hidden_layers = 32;
  int64_t num_attention_heads = 32;
  int64_t num_key_value_heads = 32;
  int64_t max_position_embeddings = 2048;
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  /// Linear RoPE scaling: positions are divided by this factor (1 = none).
  double rope_scaling_factor = 1.0;
  bool tie_word_embeddings = false;
  int64_t bos_token_id = 1;
  int64_t eos_token_id = 2;
  /// The file or folder the model came from ("" when built in code).
  std::string name_or_path;

  int64_t head_dim() const { return hidden_size / num_attention_heads; }
  int64_t kv_dim() const { return num_key_value_heads * head_dim(); }

  /// Throws peft::Error naming `where` when the sizes do not fit together.
  void validate(const std::string& where) const {
    check(vocab_size > 0 && hidden_size > 0 && intermediate_size > 0 && num_hidden_layers > 0 &&
              num_attention_heads > 0 && num_key_value_heads > 0,
          "models::llama", "{}: sizes must be positive", where);
    check(hidden_size % num_attention_heads == 0, "models::llama",
          "{}: hidden size {} is not divisible by {} attention heads", where, hidden_size,
          num_attention_heads);
    check(head_dim() % 2 == 0, "models::llama",
          "{}: head size {} must be even for rotary "
          "embeddings",
          where, head_dim());
    check(num_attention_heads % num_key_value_heads == 0, "models::llama",
          "{}: {} attention heads are not a multiple of {} key/value heads", where,
          num_attention_heads, num_key_value_heads);
    check(rms_norm_eps > 0 && rope_theta > 0 && rope_scaling_factor > 0, "models::llama",
          "{}: rms_norm_eps, rope_theta and the rope scaling factor must be positive", where);
  }

  /// Reads the "<arch>.*" metadata of a GGUF file ("llama" architecture).
  static LlamaConfig from_gguf(const io::GgufFile& f) {
    const auto arch = f.get_string("general.architecture");
    check(arch == "llama", "models::llama",
          "{}: architecture \"{}\" is not supported (peft reads \"llama\" GGUF files)", f.path(),
          arch);
    LlamaConfig c;
    const std::string p = arch + ".";
    c.hidden_size = f.get_int(p + "embedding_length");
    c.intermediate_size = f.get_int(p + "feed_forward_length");
    c.num_hidden_layers = f.get_int(p + "block_count");
    c.num_attention_heads = f.get_int(p + "attention.head_count");
    c.num_key_value_heads = f.get_int(p + "attention.head_count_kv", c.num_attention_heads);
    c.max_position_embeddings = f.get_int(p + "context_length", 2048);
    c.rms_norm_eps = f.get_float(p + "attention.layer_norm_rms_epsilon", 1e-5);
    c.rope_theta = f.get_float(p + "rope.freq_base", 10000.0);
    const auto scaling = f.get_string(p + "rope.scaling.type", "none");
    if (scaling == "linear") {
      c.rope_scaling_factor = f.get_float(p + "rope.scaling.factor");
    } else {
      check(scaling == "none", "models::llama",
            "{}: rope scaling \"{}\" is not supported (none and linear are)", f.path(), scaling);
    }
    c.vocab_size = f.has(p + "vocab_size")
                       ? f.get_int(p + "vocab_size")
                       : static_cast<int64_t>(f.value("tokenizer.ggml.tokens").value.size());
    c.tie_word_embeddings = !f.contains("output.weight");
    c.bos_token_id = f.get_int("tokenizer.ggml.bos_token_id", 1);
    c.eos_token_id = f.get_int("tokenizer.ggml.eos_token_id", 2);
    c.name_or_path = f.path();
    const auto rot = f.get_int(p + "rope.dimension_count", c.head_dim());
    check(rot == c.head_dim(), "models::llama",
          "{}: rotary dimension {} differs from the head size {} (partial rotary is not supported)",
          f.path(), rot, c.head_dim());
    c.validate(f.path());
    return c;
  }

  /// Reads a Hugging Face LlamaConfig (config.json).
  static LlamaConfig from_json(const nlohmann::json& j, const std::string& file) {
    check(j.is_object(), "models::llama", "{}: expected a JSON object", file);
    LlamaConfig c;
    auto get = [&](const char* key, auto& field) {
      peft::detail::config_read(j, key, field, file, "models::llama");
    };
    get("vocab_size", c.vocab_size);
    get("hidden_size", c.hidden_size);
    get("intermediate_size", c.intermediate_size);
    get("num_hidden_layers", c.num_hidden_layers);
    get("num_attention_heads", c.num_attention_heads);
    c.num_key_value_heads = c.num_attention_heads;
    get("num_key_value_heads", c.num_key_value_heads);
    get("max_position_embeddings", c.max_position_embeddings);
    get("rms_norm_eps", c.rms_norm_eps);
    get("rope_theta", c.rope_theta);
    get("tie_word_embeddings", c.tie_word_embeddings);
    get("bos_token_id", c.bos_token_id);
    if (j.contains("eos_token_id") && j["eos_token_id"].is_number_integer()) {
      c.eos_token_id = j["eos_token_id"].get<int64_t>();
    }
    // Rotary settings: transformers 5 writes them as "rope_parameters" {rope_theta, rope_type,
    // factor}; older configs as "rope_theta" and "rope_scaling" {type or rope_type, factor}.
    for (const char* key : {"rope_scaling", "rope_parameters"}) {
      if (!j.contains(key) || !j[key].is_object()) continue;
      const auto& r = j[key];
      if (r.contains("rope_theta") && r["rope_theta"].is_number()) {
        c.rope_theta = r["rope_theta"].get<double>();
      }
      const auto rope = r.value("rope_type", r.value("type", std::string("default")));
      if (rope == "linear") {
        c.rope_scaling_factor = r.value("factor", 1.0);
      } else {
        check(rope == "default", "models::llama",
              "{}: rope type \"{}\" is not supported (default and linear are)", file, rope);
      }
    }
    const auto type = j.value("model_type", std::string("llama"));
    check(type == "llama", "models::llama", "{}: model_type \"{}\" is not llama", file, type);
    c.validate(file);
    return c;
  }
};

/// Root-mean-square layer norm: weight * x / sqrt(mean(x^2) + eps), computed in float32.
class RMSNormImpl : public torch::nn::Module {
 public:
  RMSNormImpl(int64_t dim, double eps) : torch::nn::Module("peft::models::RMSNorm"), eps(eps) {
    weight = register_parameter("weight", torch::ones({dim}));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    auto h = x.to(torch::kFloat);
    h = h * torch::rsqrt(h.pow(2).mean(-1, true) + eps);
    return weight * h.to(x.scalar_type());
  }
  torch::Tensor weight;
  double eps;
};
TORCH_MODULE(RMSNorm);

/// Keys and values of the positions a decoder has seen, one pair per layer ([N, kv heads, T, D]);
/// prefix-tuning rows are not stored here (they are added at every step).
struct KVCache {
  std::vector<torch::Tensor> keys, values;
  /// The side network's keys and values (Ladder Side-Tuning, models/llama_ladder.hpp), one pair
  /// per side block.
  std::vector<torch::Tensor> side_keys, side_values;
  /// Positions cached so far.
  int64_t length() const {
    return keys.empty() || !keys.front().defined() ? 0 : keys.front().size(2);
  }
  void clear() {
    keys.clear();
    values.clear();
    side_keys.clear();
    side_values.clear();
  }
};

namespace detail {
// Llama's rotary embedding in Hugging Face's layout (rotate_half of the two halves of a head).
inline torch::Tensor rotate_half(const torch::Tensor& x) {
  const int64_t half = x.size(-1) / 2;
  return torch::cat({-x.narrow(-1, half, half), x.narrow(-1, 0, half)}, -1);
}
}  // namespace detail

/// Grouped-query self-attention with sites `q_proj` (role "query"), `k_proj` ("key"), `v_proj`
/// ("value"), `o_proj` ("out_proj") and the Attention site `prefix` (rows of kv_dim).
class LlamaAttentionImpl : public torch::nn::Module {
 public:
  explicit LlamaAttentionImpl(const LlamaConfig& c)
      : torch::nn::Module("peft::models::LlamaAttention"),
        heads_(c.num_attention_heads),
        kv_heads_(c.num_key_value_heads),
        head_dim_(c.head_dim()) {
    const int64_t H = c.hidden_size;
    auto proj = [&](const char* name, const char* role, int64_t in, int64_t out) {
      return register_module(
          name,
          peft::nn::Linear(torch::nn::Linear(torch::nn::LinearOptions(in, out).bias(false)), role));
    };
    q_proj = proj("q_proj", "query", H, heads_ * head_dim_);
    k_proj = proj("k_proj", "key", H, c.kv_dim());
    v_proj = proj("v_proj", "value", H, c.kv_dim());
    o_proj = proj("o_proj", "out_proj", heads_ * head_dim_, H);
    prefix = register_module("prefix", Site(SiteKind::Attention, "prefix", c.kv_dim(), c.kv_dim()));
  }

  /// x [N, L, H]; cos, sin [N, 1, L, D]; mask [N, 1, L, S] additive over the S = prefix +
  /// cached + L keys. Appends this step's keys and values to `*cache_k`/`*cache_v` when given.
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                        const torch::Tensor& mask, torch::Tensor* cache_k = nullptr,
                        torch::Tensor* cache_v = nullptr) {
    const int64_t N = x.size(0), L = x.size(1), D = head_dim_;
    auto q = q_proj(x).view({N, L, heads_, D}).transpose(1, 2);
    auto k = k_proj(x).view({N, L, kv_heads_, D}).transpose(1, 2);
    auto v = v_proj(x).view({N, L, kv_heads_, D}).transpose(1, 2);
    q = q * cos + detail::rotate_half(q) * sin;
    k = k * cos + detail::rotate_half(k) * sin;
    if (cache_k != nullptr) {
      if (cache_k->defined()) {
        k = torch::cat({*cache_k, k}, 2);
        v = torch::cat({*cache_v, v}, 2);
      }
      *cache_k = k.detach();
      *cache_v = v.detach();
    }
    auto rows = prefix->prefix_rows();
    if (rows.first.defined()) {
      const int64_t n = rows.first.size(0);
      auto as_heads = [&](const torch::Tensor& t) {
        return t.to(k.scalar_type())
            .view({1, n, kv_heads_, D})
            .transpose(1, 2)
            .expand({N, kv_heads_, n, D});
      };
      k = torch::cat({as_heads(rows.first), k}, 2);
      v = torch::cat({as_heads(rows.second), v}, 2);
    }
    if (kv_heads_ != heads_) {
      k = k.repeat_interleave(heads_ / kv_heads_, 1);
      v = v.repeat_interleave(heads_ / kv_heads_, 1);
    }
#if PEFT_HAS_SDPA
    auto out = at::scaled_dot_product_attention(q, k, v, mask);
#else
    auto scores = torch::matmul(q, k.transpose(-2, -1)) / std::sqrt(static_cast<double>(D));
    auto out = torch::matmul(torch::softmax(scores + mask, -1), v);
#endif
    return o_proj(out.transpose(1, 2).reshape({N, L, heads_ * D}));
  }

  peft::nn::Linear q_proj{nullptr}, k_proj{nullptr}, v_proj{nullptr}, o_proj{nullptr};
  Site prefix{nullptr};

 private:
  int64_t heads_, kv_heads_, head_dim_;
};
TORCH_MODULE(LlamaAttention);

/// SwiGLU feed-forward: down(silu(gate(x)) * up(x)); sites `gate_proj` (role "gate_proj"),
/// `up_proj` ("linear1") and `down_proj` ("linear2", the role BERT's FFN output has, so a method's
/// FFN defaults apply to it).
class LlamaMLPImpl : public torch::nn::Module {
 public:
  explicit LlamaMLPImpl(const LlamaConfig& c) : torch::nn::Module("peft::models::LlamaMLP") {
    auto proj = [&](const char* name, const char* role, int64_t in, int64_t out) {
      return register_module(
          name,
          peft::nn::Linear(torch::nn::Linear(torch::nn::LinearOptions(in, out).bias(false)), role));
    };
    gate_proj = proj("gate_proj", "gate_proj", c.hidden_size, c.intermediate_size);
    up_proj = proj("up_proj", "linear1", c.hidden_size, c.intermediate_size);
    down_proj = proj("down_proj", "linear2", c.intermediate_size, c.hidden_size);
  }
  torch::Tensor forward(const torch::Tensor& x) {
    return down_proj(torch::silu(gate_proj(x)) * up_proj(x));
  }
  peft::nn::Linear gate_proj{nullptr}, up_proj{nullptr}, down_proj{nullptr};
};
TORCH_MODULE(LlamaMLP);

/// One pre-norm decoder layer, with Block sites `attn_block` and `ffn_block` on the two
/// sub-layers' outputs (before their residual adds) for bottleneck adapters.
class LlamaDecoderLayerImpl : public torch::nn::Module {
 public:
  explicit LlamaDecoderLayerImpl(const LlamaConfig& c)
      : torch::nn::Module("peft::models::LlamaDecoderLayer") {
    const int64_t H = c.hidden_size;
    input_layernorm = register_module("input_layernorm", RMSNorm(H, c.rms_norm_eps));
    self_attn = register_module("self_attn", LlamaAttention(c));
    post_attention_layernorm =
        register_module("post_attention_layernorm", RMSNorm(H, c.rms_norm_eps));
    mlp = register_module("mlp", LlamaMLP(c));
    attn_block = register_module("attn_block", Site(SiteKind::Block, "attn_block", H, H));
    ffn_block = register_module("ffn_block", Site(SiteKind::Block, "ffn_block", H, H));
  }
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                        const torch::Tensor& mask, torch::Tensor* cache_k = nullptr,
                        torch::Tensor* cache_v = nullptr) {
    auto a = input_layernorm(x);
    auto h = x + attn_block->adapt(a, self_attn(a, cos, sin, mask, cache_k, cache_v));
    auto m = post_attention_layernorm(h);
    return h + ffn_block->adapt(m, mlp(m));
  }
  RMSNorm input_layernorm{nullptr}, post_attention_layernorm{nullptr};
  LlamaAttention self_attn{nullptr};
  LlamaMLP mlp{nullptr};
  Site attn_block{nullptr}, ffn_block{nullptr};
};
TORCH_MODULE(LlamaDecoderLayer);

/// What LlamaImpl::forward hands a side network beside the decoder.
struct LlamaSideInput {
  /// The hidden states the side network reads: [0] the embeddings (with prompt rows in front, if
  /// any), [i + 1] the output of layer i for each layer in LlamaSideImpl::layers() (undefined for
  /// the others); [N, L, H], computed without autograd.
  const std::vector<torch::Tensor>& states;
  /// The positions of the L inputs as the rotary angles take them, float [1, L] or [N, L]
  /// (packed rows number each example from 0).
  const torch::Tensor& positions;
  /// Additive attention mask [N, 1, L, past + L] over the cached and new positions (causal,
  /// padding, packed examples), without the prefix rows' columns.
  const torch::Tensor& mask;
  /// The side network's part of the key/value cache, or nullptr without one.
  KVCache* cache;
};

/// A network beside the decoder that reads its hidden states and adds to its output: Ladder
/// Side-Tuning (models/llama_ladder.hpp). With one installed (LlamaImpl::set_side), the decoder
/// runs without autograd and forward() returns norm(x) + side(...).
class LlamaSideImpl : public torch::nn::Module {
 public:
  using torch::nn::Module::Module;
  /// The decoder layers whose outputs side() reads (ascending).
  virtual const std::vector<int64_t>& layers() const = 0;
  /// What is added to the decoder's final (normed) hidden state, [N, L, H].
  virtual torch::Tensor side(const LlamaSideInput& input) = 0;
};

/// A Llama-family causal language model. Children: `embed_tokens`, `layers.<i>` (sites
/// `layers.<i>.self_attn.q_proj` ... `layers.<i>.mlp.down_proj`), `norm`, `lm_head` (only when
/// the output head is not tied to the embeddings) and the Input site `prompt`. Module paths are
/// Hugging Face's LlamaForCausalLM paths without its "model." prefix; adapter files add it.
///
/// The whole model is frozen; only attached methods train.
class LlamaImpl : public torch::nn::Module, public HubModel {
 public:
  explicit LlamaImpl(LlamaConfig config)
      : torch::nn::Module("peft::models::Llama"), config_(std::move(config)) {
    config_.validate(config_.name_or_path.empty() ? "config" : config_.name_or_path);
    const int64_t H = config_.hidden_size;
    embed_tokens = register_module(
        "embed_tokens", torch::nn::Embedding(torch::nn::EmbeddingOptions(config_.vocab_size, H)));
    layers = register_module("layers", torch::nn::ModuleList());
    for (int64_t i = 0; i < config_.num_hidden_layers; ++i)
      layers->push_back(LlamaDecoderLayer(config_));
    norm = register_module("norm", RMSNorm(H, config_.rms_norm_eps));
    if (!config_.tie_word_embeddings) {
      lm_head = register_module(
          "lm_head",
          peft::nn::Linear(
              torch::nn::Linear(torch::nn::LinearOptions(H, config_.vocab_size).bias(false)),
              "lm_head"));
    }
    prompt = register_module("prompt", Site(SiteKind::Input, "prompt", H, H));
    prompt->set_vocabulary(embed_tokens->weight);
    // Float32 throughout, as transformers computes it, so the angles match to the last bit;
    // linear scaling divides the frequencies, as transformers' "linear" rope type does.
    const int64_t D = config_.head_dim();
    inv_freq_ = 1.0 / torch::pow(config_.rope_theta,
                                 torch::arange(0, D, 2, torch::kLong).to(torch::kFloat) /
                                     static_cast<double>(D));
    if (config_.rope_scaling_factor != 1.0) inv_freq_ = inv_freq_ / config_.rope_scaling_factor;
    freeze(*this);
  }

  /// Loads a GGUF file (`*.gguf`) or a Hugging Face folder (config.json + model.safetensors, or
  /// its shards and model.safetensors.index.json) into a frozen model.
  static std::shared_ptr<LlamaImpl> from_pretrained(const std::filesystem::path& path) {
    namespace fs = std::filesystem;
    check(fs::exists(path), "models::llama", "{} does not exist", path.string());
    if (fs::is_regular_file(path)) {
      io::GgufFile f(path);
      auto model = std::make_shared<LlamaImpl>(LlamaConfig::from_gguf(f));
      model->load_gguf(f);
      return model;
    }
    const auto config_file = path / "config.json";
    check(fs::exists(config_file), "models::llama", "{} not found", config_file.string());
    auto config =
        LlamaConfig::from_json(io::read_json(config_file, "models::llama"), config_file.string());
    config.name_or_path = path.string();
    auto model = std::make_shared<LlamaImpl>(config);
    model->load_safetensors(io::SafetensorsCheckpoint::find(path, "models::llama"));
    return model;
  }

  /// Copies a GGUF file's tensors into the frozen weights. llama.cpp stores the query and key
  /// rows of each head interleaved for its rotary kernel; they are put back in Hugging Face's
  /// order. Every tensor is checked (present, shape) before anything is copied.
  void load_gguf(const io::GgufFile& f) {
    std::vector<std::pair<torch::Tensor, std::function<torch::Tensor()>>> copies;
    for (auto& [name, target, heads] : gguf_map()) {
      check(f.contains(name), "models::llama", "{}: missing tensor \"{}\" (expected shape {})",
            f.path(), name, peft::detail::shape(target.sizes()));
      const auto& shape = f.info(name).shape;
      check(c10::IntArrayRef(shape) == target.sizes(), "models::llama",
            "{}: tensor \"{}\" has shape {}, expected {}", f.path(), name,
            peft::detail::shape(shape), peft::detail::shape(target.sizes()));
      const std::string key = name;
      const int64_t h = heads;
      copies.emplace_back(target, [&f, key, h] {
        auto w = f.tensor(key);
        return h > 0 ? unpermute_rotary(w, h) : w;
      });
    }
    torch::NoGradGuard no_grad;
    for (auto& [target, source] : copies) target.copy_(source());
  }

  /// Copies a Hugging Face safetensors checkpoint (LlamaForCausalLM names; one file, or a
  /// model.safetensors.index.json and its shards) into the weights.
  void load_safetensors(const std::filesystem::path& file) {
    const io::SafetensorsCheckpoint st(file);
    std::vector<std::pair<torch::Tensor, std::string>> copies;
    for (auto& [name, target] : hub_weight_map()) {
      check(st.contains(name), "models::llama", "{}: missing tensor \"{}\" (expected shape {})",
            file.string(), name, peft::detail::shape(target.sizes()));
      check(c10::IntArrayRef(st.shape(name)) == target.sizes(), "models::llama",
            "{}: tensor \"{}\" has shape {}, expected {}", file.string(), name,
            peft::detail::shape(st.shape(name)), peft::detail::shape(target.sizes()));
      copies.emplace_back(target, name);
    }
    // A slice at a time, the file's pages released once copied (SafetensorsFile::copy_to).
    torch::NoGradGuard no_grad;
    for (auto& [target, name] : copies) st.copy_to(name, target);
  }

  /// Hidden states [N, n + L, H] after the final norm, for input_ids [N, L] (n = prompt rows).
  /// attention_mask [N, past + L] (1 = token, 0 = padding; all ones when undefined) covers the
  /// cached positions too. With a cache, the new keys and values are appended to it. Positions
  /// count from the cache length plus the prefix rows (as Hugging Face numbers tokens after a
  /// key/value cache that holds PEFT's prefix).
  ///
  /// Packed rows (several examples back to back in one row, data::pack_lm_batches): position_ids
  /// [N, L] number each example's tokens from 0, and a token attends only to earlier tokens of
  /// its own example (a new example starts wherever the count restarts at 0), plus the prefix
  /// rows; each example's outputs are then those it gets alone. Not with a cache or prompt rows.
  torch::Tensor forward(const torch::Tensor& input_ids, const torch::Tensor& attention_mask = {},
                        KVCache* cache = nullptr, const torch::Tensor& position_ids = {}) {
    check(input_ids.dim() == 2, "models::llama", "input_ids has shape {}, expected [N, L]",
          peft::detail::shape(input_ids.sizes()));
    const int64_t N = input_ids.size(0);
    // With a side network the decoder is frozen and runs without a graph; only the side trains.
    std::optional<torch::NoGradGuard> no_grad;
    if (side) no_grad.emplace();
    auto x = embed_tokens(input_ids);
    auto rows = prompt->prompt_rows();
    const int64_t past = cache != nullptr ? cache->length() : 0;
    if (rows.defined()) {
      check(past == 0, "models::llama",
            "prompt tuning runs its rows once, in front of the first step; a cached step cannot "
            "add them");
      x = torch::cat(
          {rows.unsqueeze(0).expand({N, rows.size(0), rows.size(1)}).to(x.scalar_type()), x}, 1);
    }
    const int64_t L = x.size(1);
    const int64_t P = prefix_length();
    check(P + past + L <= config_.max_position_embeddings, "models::llama",
          "sequence of {} positions (prefix {} + cached {} + new {}) exceeds the model's {}",
          P + past + L, P, past, L, config_.max_position_embeddings);
    check(!attention_mask.defined() || (attention_mask.dim() == 2 && attention_mask.size(0) == N &&
                                        attention_mask.size(1) == past + input_ids.size(1)),
          "models::llama", "attention_mask has shape {}, expected [{}, {}] (cached + new)",
          peft::detail::shape(attention_mask.sizes()), N, past + input_ids.size(1));

    torch::Tensor positions, segments;
    if (position_ids.defined()) {
      check(cache == nullptr && !rows.defined(), "models::llama",
            "position_ids (packed rows) work without a key/value cache and without prompt rows");
      check(position_ids.dim() == 2 && position_ids.size(0) == N && position_ids.size(1) == L &&
                position_ids.scalar_type() == torch::kLong,
            "models::llama", "position_ids has shape {} of {}, expected [{}, {}] int64",
            peft::detail::shape(position_ids.sizes()), c10::toString(position_ids.scalar_type()), N,
            L);
      check(position_ids.numel() == 0 ||
                (position_ids.min().item<int64_t>() >= 0 &&
                 position_ids.max().item<int64_t>() + P < config_.max_position_embeddings),
            "models::llama", "position_ids must lie in [0, {})",
            config_.max_position_embeddings - P);
      positions = (position_ids + P).to(torch::kFloat).view({N, L});
      segments = position_ids.eq(0).cumsum(1);
    } else {
      positions =
          torch::arange(past + P, past + P + L, torch::kLong).to(torch::kFloat).view({1, L});
    }
    auto freqs = positions.unsqueeze(-1) * inv_freq_.view({1, 1, -1});
    auto emb = torch::cat({freqs, freqs}, -1);
    auto cos = emb.cos().to(x.scalar_type()).unsqueeze(1);
    auto sin = emb.sin().to(x.scalar_type()).unsqueeze(1);
    auto mask = build_mask(N, L, past, P, attention_mask, x.options(), segments);

    if (cache != nullptr && cache->keys.empty()) {
      cache->keys.resize(layers->size());
      cache->values.resize(layers->size());
    }
    std::vector<torch::Tensor> states;
    if (side) {
      states.resize(layers->size() + 1);
      states[0] = x;
    }
    for (size_t i = 0; i < layers->size(); ++i) {
      auto layer = layers->ptr<LlamaDecoderLayerImpl>(i);
      x = cache != nullptr ? layer->forward(x, cos, sin, mask, &cache->keys[i], &cache->values[i])
                           : layer->forward(x, cos, sin, mask);
      if (side) {
        const auto& taps = side->layers();
        if (std::binary_search(taps.begin(), taps.end(), static_cast<int64_t>(i)))
          states[i + 1] = x;
      }
    }
    auto out = norm(x);
    if (!side) return out;
    no_grad.reset();
    const auto side_mask = mask.narrow(3, P, mask.size(3) - P);
    return out + side->side(LlamaSideInput{states, positions, side_mask, cache});
  }

  /// Installs a side network (Ladder Side-Tuning: models::attach_ladder) as child `ladder`; see
  /// LlamaSideImpl.
  void set_side(std::shared_ptr<LlamaSideImpl> network) {
    check(network != nullptr, "models::llama", "set_side needs a side network");
    if (side) {
      replace_module("ladder", network);
    } else {
      register_module("ladder", network);
    }
    side = std::move(network);
  }

  /// Next-token logits [.., V] of hidden states (the tied embeddings or lm_head).
  torch::Tensor logits(const torch::Tensor& hidden) {
    if (lm_head) return lm_head(hidden);
    return peft::detail::linear(hidden, embed_tokens->weight);
  }

  /// Key/value rows the active prefixes add in front of every layer's keys.
  int64_t prefix_length() {
    auto rows = layers->ptr<LlamaDecoderLayerImpl>(0)->self_attn->prefix->prefix_rows();
    return rows.first.defined() ? rows.first.size(0) : 0;
  }
  /// Positions the active prompts add in front of the sequence.
  int64_t prompt_length() {
    auto rows = prompt->prompt_rows();
    return rows.defined() ? rows.size(0) : 0;
  }

  const LlamaConfig& config() const { return config_; }
  LlamaDecoderLayerImpl& layer(size_t i) { return *layers->ptr<LlamaDecoderLayerImpl>(i); }

  std::string hub_module_path(const std::string& path) const override {
    if (path == "lm_head" || path.compare(0, 8, "lm_head.") == 0) return path;
    return "model." + path;
  }
  std::string hub_name_or_path() const override { return config_.name_or_path; }
  int64_t hub_attention_heads() const override { return config_.num_attention_heads; }

  /// Hugging Face LlamaForCausalLM tensor names and the tensors they load into.
  std::vector<std::pair<std::string, torch::Tensor>> hub_weight_map() {
    std::vector<std::pair<std::string, torch::Tensor>> out;
    out.emplace_back("model.embed_tokens.weight", embed_tokens->weight);
    for (size_t i = 0; i < layers->size(); ++i) {
      auto& l = layer(i);
      const std::string p = "model.layers." + std::to_string(i) + ".";
      out.emplace_back(p + "input_layernorm.weight", l.input_layernorm->weight);
      out.emplace_back(p + "self_attn.q_proj.weight", l.self_attn->q_proj->base->weight);
      out.emplace_back(p + "self_attn.k_proj.weight", l.self_attn->k_proj->base->weight);
      out.emplace_back(p + "self_attn.v_proj.weight", l.self_attn->v_proj->base->weight);
      out.emplace_back(p + "self_attn.o_proj.weight", l.self_attn->o_proj->base->weight);
      out.emplace_back(p + "post_attention_layernorm.weight", l.post_attention_layernorm->weight);
      out.emplace_back(p + "mlp.gate_proj.weight", l.mlp->gate_proj->base->weight);
      out.emplace_back(p + "mlp.up_proj.weight", l.mlp->up_proj->base->weight);
      out.emplace_back(p + "mlp.down_proj.weight", l.mlp->down_proj->base->weight);
    }
    out.emplace_back("model.norm.weight", norm->weight);
    if (lm_head) out.emplace_back("lm_head.weight", lm_head->base->weight);
    return out;
  }

  /// llama.cpp's tensor name of a site path ("layers.3.self_attn.q_proj" -> "blk.3.attn_q"), ""
  /// for paths it has no tensor for.
  static std::string gguf_name(const std::string& path) {
    static const std::map<std::string, std::string> names = {
        {"self_attn.q_proj", "attn_q"}, {"self_attn.k_proj", "attn_k"},
        {"self_attn.v_proj", "attn_v"}, {"self_attn.o_proj", "attn_output"},
        {"mlp.gate_proj", "ffn_gate"},  {"mlp.up_proj", "ffn_up"},
        {"mlp.down_proj", "ffn_down"}};
    if (path == "lm_head") return "output";
    const std::string layers_prefix = "layers.";
    if (path.compare(0, layers_prefix.size(), layers_prefix) != 0) return {};
    const size_t dot = path.find('.', layers_prefix.size());
    if (dot == std::string::npos) return {};
    auto it = names.find(path.substr(dot + 1));
    if (it == names.end()) return {};
    return "blk." + path.substr(layers_prefix.size(), dot - layers_prefix.size()) + "." +
           it->second;
  }

  /// llama.cpp's interleaved rotary row order -> Hugging Face's, for a [heads * D, in] matrix.
  static torch::Tensor unpermute_rotary(const torch::Tensor& w, int64_t heads) {
    const int64_t out = w.size(0);
    return w.reshape({heads, out / heads / 2, 2, -1}).transpose(1, 2).reshape(w.sizes());
  }
  /// Hugging Face's row order -> llama.cpp's (the inverse of unpermute_rotary).
  static torch::Tensor permute_rotary(const torch::Tensor& w, int64_t heads) {
    const int64_t out = w.size(0);
    return w.reshape({heads, 2, out / heads / 2, -1}).transpose(1, 2).reshape(w.sizes());
  }

  torch::nn::Embedding embed_tokens{nullptr};
  torch::nn::ModuleList layers{nullptr};
  RMSNorm norm{nullptr};
  peft::nn::Linear lm_head{nullptr};
  Site prompt{nullptr};
  /// The side network beside the decoder (child `ladder`), if one was installed.
  std::shared_ptr<LlamaSideImpl> side;

 private:
  struct GgufTarget {
    std::string name;
    torch::Tensor target;
    int64_t heads;  ///< > 0: rows to un-permute over this many heads
  };

  std::vector<GgufTarget> gguf_map() {
    std::vector<GgufTarget> out;
    out.push_back({"token_embd.weight", embed_tokens->weight, 0});
    for (size_t i = 0; i < layers->size(); ++i) {
      auto& l = layer(i);
      const std::string p = "blk." + std::to_string(i) + ".";
      out.push_back({p + "attn_norm.weight", l.input_layernorm->weight, 0});
      out.push_back(
          {p + "attn_q.weight", l.self_attn->q_proj->base->weight, config_.num_attention_heads});
      out.push_back(
          {p + "attn_k.weight", l.self_attn->k_proj->base->weight, config_.num_key_value_heads});
      out.push_back({p + "attn_v.weight", l.self_attn->v_proj->base->weight, 0});
      out.push_back({p + "attn_output.weight", l.self_attn->o_proj->base->weight, 0});
      out.push_back({p + "ffn_norm.weight", l.post_attention_layernorm->weight, 0});
      out.push_back({p + "ffn_gate.weight", l.mlp->gate_proj->base->weight, 0});
      out.push_back({p + "ffn_up.weight", l.mlp->up_proj->base->weight, 0});
      out.push_back({p + "ffn_down.weight", l.mlp->down_proj->base->weight, 0});
    }
    out.push_back({"output_norm.weight", norm->weight, 0});
    if (lm_head) out.push_back({"output.weight", lm_head->base->weight, 0});
    return out;
  }

  // Additive mask [N, 1, L, P + past + L]: every query sees the prefix rows, the cached positions
  // and itself and those before it, never a padded key, and with `segments` ([N, L], packed
  // rows) only keys of its own segment. A padded query still sees itself, so its row (whose
  // output nobody reads) stays finite.
  static torch::Tensor build_mask(int64_t N, int64_t L, int64_t past, int64_t P,
                                  const torch::Tensor& attention_mask,
                                  const torch::TensorOptions& options,
                                  const torch::Tensor& segments = {}) {
    auto q = torch::arange(L, torch::kLong).view({L, 1}) + past;
    auto k = torch::arange(past + L, torch::kLong).view({1, past + L});
    auto blocked = k.gt(q).view({1, 1, L, past + L}).expand({N, 1, L, past + L});
    if (segments.defined()) {
      blocked = blocked.logical_or(segments.view({N, 1, L, 1}).ne(segments.view({N, 1, 1, L})));
    }
    if (attention_mask.defined()) {
      const int64_t n_prompt = L - (attention_mask.size(1) - past);
      auto pad = attention_mask.eq(0).to(torch::kBool);
      if (n_prompt > 0) pad = torch::cat({torch::zeros({N, n_prompt}, pad.options()), pad}, 1);
      auto self = torch::eye(L, torch::kBool).view({1, 1, L, L});
      auto self_full = torch::cat({torch::zeros({1, 1, L, past}, torch::kBool), self}, 3);
      blocked =
          blocked.logical_or(pad.view({N, 1, 1, past + L})).logical_and(self_full.logical_not());
    }
    if (P > 0) blocked = torch::cat({torch::zeros({N, 1, L, P}, torch::kBool), blocked}, 3);
    return torch::zeros(blocked.sizes(), options)
        .masked_fill(blocked, -std::numeric_limits<float>::infinity());
  }

  LlamaConfig config_;
  torch::Tensor inv_freq_;
};

/// Module holder of LlamaImpl:
///
///     auto lm = peft::models::Llama::from_pretrained("SmolLM2-135M-Instruct.Q4_1.gguf");
///     auto logits = lm->logits(lm(input_ids));
class Llama : public torch::nn::ModuleHolder<LlamaImpl> {
 public:
  using torch::nn::ModuleHolder<LlamaImpl>::ModuleHolder;
  /// Loads a GGUF file or a Hugging Face folder; see LlamaImpl::from_pretrained.
  static Llama from_pretrained(const std::filesystem::path& path) {
    return Llama(LlamaImpl::from_pretrained(path));
  }
};

/// Hugging Face's LlamaForSequenceClassification: a Linear(H, num_labels) without bias (`score`,
/// trainable, N(0, 0.02)) on the final hidden state of each example's last real token (the last
/// position whose attention_mask is 1; the last position without a mask). Children `model`
/// (a frozen LlamaImpl whose `lm_head`, if any, is unused) and `score`. num_labels 1 means
/// regression. Adapter files use Hugging Face's paths (`model.layers.N...`, `score`).
class LlamaForSequenceClassificationImpl : public torch::nn::Module,
                                           public HubModel,
                                           public TaskModel {
 public:
  LlamaForSequenceClassificationImpl(Llama backbone, int64_t num_labels)
      : torch::nn::Module("peft::models::LlamaForSequenceClassification"),
        model(register_module("model", std::move(backbone))) {
    check(num_labels > 0, "models::llama", "num_labels must be positive, got {}", num_labels);
    score = register_module(
        "score",
        torch::nn::Linear(
            torch::nn::LinearOptions(model->config().hidden_size, num_labels).bias(false)));
    torch::NoGradGuard no_grad;
    score->weight.normal_(0.0, 0.02);
  }

  /// A frozen decoder from a GGUF file or Hugging Face folder with a new head.
  static std::shared_ptr<LlamaForSequenceClassificationImpl> from_pretrained(
      const std::filesystem::path& path, int64_t num_labels) {
    return std::make_shared<LlamaForSequenceClassificationImpl>(Llama::from_pretrained(path),
                                                                num_labels);
  }

  /// Logits [N, num_labels] for input_ids [N, L] and attention_mask [N, L] (token_type_ids, which
  /// a decoder has no use for, are accepted and ignored so that batches built for BERT fit).
  torch::Tensor forward(const torch::Tensor& input_ids, const torch::Tensor& attention_mask = {},
                        const torch::Tensor& token_type_ids = {}) {
    (void)token_type_ids;
    auto hidden = model->forward(input_ids, attention_mask);
    const int64_t N = hidden.size(0), T = hidden.size(1);
    torch::Tensor last;
    if (attention_mask.defined()) {
      // The rightmost real token, found as Hugging Face finds the rightmost non-pad token; the
      // prompt rows in front (prompt tuning) shift every position by the same amount.
      auto positions = torch::arange(attention_mask.size(1), torch::kLong).unsqueeze(0);
      last = (positions * attention_mask.ne(0).to(torch::kLong)).argmax(-1) +
             (T - attention_mask.size(1));
    } else {
      last = torch::full({N}, T - 1, torch::kLong);
    }
    auto pooled = hidden.gather(1, last.view({N, 1, 1}).expand({N, 1, hidden.size(2)})).squeeze(1);
    return score(pooled);
  }

  int64_t num_labels() const { return score->options.out_features(); }

  std::string hub_module_path(const std::string& path) const override { return path; }
  std::string hub_name_or_path() const override { return model->config().name_or_path; }
  int64_t hub_attention_heads() const override { return model->config().num_attention_heads; }
  std::vector<std::string> task_modules() const override { return {"score"}; }

  Llama model{nullptr};
  torch::nn::Linear score{nullptr};
};

/// Module holder of LlamaForSequenceClassificationImpl, with from_pretrained().
class LlamaForSequenceClassification
    : public torch::nn::ModuleHolder<LlamaForSequenceClassificationImpl> {
 public:
  using torch::nn::ModuleHolder<LlamaForSequenceClassificationImpl>::ModuleHolder;
  static LlamaForSequenceClassification from_pretrained(const std::filesystem::path& path,
                                                        int64_t num_labels) {
    return LlamaForSequenceClassification(
        LlamaForSequenceClassificationImpl::from_pretrained(path, num_labels));
  }
};

/// Mean cross-entropy of next-token prediction over the labelled positions: logits [N, T, V]
/// (T = L, or n + L with n prompt rows in front, which are skipped), labels [N, L] with -100 for
/// positions that carry no loss (the prompt of an instruction, padding). Position t predicts
/// labels[t + 1], as in Hugging Face's causal-LM loss.
inline torch::Tensor causal_lm_loss(const torch::Tensor& logits, const torch::Tensor& labels) {
  check(logits.dim() == 3 && labels.dim() == 2 && logits.size(0) == labels.size(0) &&
            logits.size(1) >= labels.size(1),
        "models::llama", "logits {} and labels {} do not fit ([N, T, V] and [N, L], T >= L)",
        peft::detail::shape(logits.sizes()), peft::detail::shape(labels.sizes()));
  const int64_t L = labels.size(1);
  auto l = logits.narrow(1, logits.size(1) - L, L);
  auto shifted = l.narrow(1, 0, L - 1).reshape({-1, l.size(2)});
  auto target = labels.narrow(1, 1, L - 1).reshape({-1});
  namespace F = torch::nn::functional;
  return F::cross_entropy(shifted.to(torch::kFloat), target,
                          F::CrossEntropyFuncOptions().ignore_index(-100));
}

/// How generate() picks tokens.
struct GenerateOptions {
  /// Tokens to add at most.
  TORCH_ARG(int64_t, max_new_tokens) = 64;
  /// 0 = greedy (argmax); otherwise logits are divided by it before sampling.
  TORCH_ARG(double, temperature) = 0.0;
  /// Sample among the k most likely tokens only (0 = all).
  TORCH_ARG(int64_t, top_k) = 0;
  /// Sample among the smallest set of tokens whose probabilities reach p (1 = all).
  TORCH_ARG(double, top_p) = 1.0;
  /// Generation stops after any of these (the model's eos when empty).
  TORCH_ARG(std::vector<int64_t>, stop_tokens);
  /// Seed of the sampler (temperature > 0).
  TORCH_ARG(uint64_t, seed) = 0;
};

/// Continues `prompt` (token ids) with a key/value cache; returns the new tokens (the stop token
/// included when one ended generation). Runs in eval mode without gradients.
inline std::vector<int64_t> generate(LlamaImpl& model, const std::vector<int64_t>& prompt,
                                     const GenerateOptions& options = {}) {
  check(!prompt.empty(), "models::llama", "generate needs a non-empty prompt");
  check(options.temperature() >= 0 && options.top_k() >= 0 && options.top_p() > 0 &&
            options.top_p() <= 1,
        "models::llama",
        "temperature must be >= 0, top_k >= 0 and top_p in (0, 1], got {}, {} and {}",
        options.temperature(), options.top_k(), options.top_p());
  for (auto id : prompt) {
    check(id >= 0 && id < model.config().vocab_size, "models::llama",
          "prompt token {} is outside the vocabulary of {}", id, model.config().vocab_size);
  }
  torch::NoGradGuard no_grad;
  const bool was_training = model.is_training();
  model.eval();
  auto stops = options.stop_tokens();
  if (stops.empty()) stops.push_back(model.config().eos_token_id);
  std::mt19937_64 rng(options.seed());
  KVCache cache;
  std::vector<int64_t> out;
  auto ids = torch::tensor(prompt, torch::kLong).view({1, -1});
  for (int64_t step = 0; step < options.max_new_tokens(); ++step) {
    auto hidden = model.forward(ids, {}, &cache);
    auto last = model.logits(hidden.select(1, hidden.size(1) - 1)).select(0, 0).to(torch::kFloat);
    int64_t next = 0;
    if (options.temperature() == 0) {
      next = last.argmax().item<int64_t>();
    } else {
      auto scaled = last / options.temperature();
      auto [sorted, order] = scaled.sort(-1, /*descending=*/true);
      int64_t keep = sorted.size(0);
      if (options.top_k() > 0) keep = std::min(keep, options.top_k());
      auto probs = torch::softmax(sorted.narrow(0, 0, keep), -1);
      if (options.top_p() < 1) {
        // Hugging Face's rule: drop the tokens after the cumulative probability exceeds p, always
        // keeping the first.
        auto cum = probs.cumsum(0);
        const auto above = cum.gt(options.top_p()).nonzero();
        if (above.numel() > 0) keep = std::min(keep, above[0].item<int64_t>() + 1);
        probs = torch::softmax(sorted.narrow(0, 0, keep), -1);
      }
      auto p = probs.contiguous();
      std::discrete_distribution<int64_t> pick(p.data_ptr<float>(), p.data_ptr<float>() + keep);
      next = order[pick(rng)].item<int64_t>();
    }
    out.push_back(next);
    if (std::find(stops.begin(), stops.end(), next) != stops.end()) break;
    ids = torch::tensor({next}, torch::kLong).view({1, 1});
  }
  model.train(was_training);
  return out;
}

}  // namespace models
PEFT_NAMESPACE_END
