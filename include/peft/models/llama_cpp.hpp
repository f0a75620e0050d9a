#pragma once

// llama.cpp interoperability of the Llama decoder: LoRA adapters written as llama.cpp's GGUF LoRA
// adapter files (the layout its convert_lora_to_gguf.py writes), and merged models written as
// GGUF model files that llama.cpp loads like the original.

#include <torch/types.h>

#include <cmath>
#include <filesystem>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include <peft/config.hpp>
#include <peft/core/error.hpp>
#include <peft/core/targets.hpp>
#include <peft/io/gguf.hpp>
#include <peft/models/llama.hpp>

PEFT_NAMESPACE_BEGIN
namespace models {

/// Writes the LoRA of `adapter` on `model` as a llama.cpp LoRA adapter (GGUF): metadata
/// general.type = "adapter", adapter.type = "lora", adapter.lora.alpha; tensors
/// `<base tensor>.lora_a` [r, in] and `.lora_b` [out, r] in float32. llama.cpp scales by
/// alpha / r, as peft does; rsLoRA's alpha / sqrt(r) is stored as the alpha that gives the same
/// scale. Query and key B rows are put in llama.cpp's rotary order. The factors come from each
/// method's MethodImpl::low_rank(), so any method that has them can be written. Throws
/// peft::Error when the adapter is empty, holds a method without low-rank factors (one with a
/// magnitude or scaling vector, a LoRA on the embeddings), sits where llama.cpp has no tensor, or
/// its sites disagree on the scale (llama.cpp has one alpha per file).
inline void save_llama_cpp_lora(LlamaImpl& model, const std::filesystem::path& path,
                                const std::string& adapter = "default") {
  io::GgufWriter w;
  w.add("general.architecture", io::GgufValue::string("llama"));
  w.add("general.type", io::GgufValue::string("adapter"));
  w.add("adapter.type", io::GgufValue::string("lora"));
  double alpha = -1;
  size_t count = 0;
  for (const auto& ref : find_sites(model)) {
    for (const auto& m : ref.site->methods()) {
      if (m->adapter() != adapter) continue;
      const auto factors = m->low_rank();
      check(factors.has_value(), "models::llama_cpp",
            "{}: llama.cpp adapters hold low-rank factors of linear layers; the {} method at "
            "\"{}\" has none",
            path.string(), m->method(), ref.path);
      const auto name = LlamaImpl::gguf_name(ref.path);
      check(!name.empty(), "models::llama_cpp",
            "{}: llama.cpp has no LoRA tensor for the site \"{}\"", path.string(), ref.path);
      auto a = factors->a;
      auto b = factors->b;
      const double r = static_cast<double>(a.size(0));
      const double site_alpha = factors->scaling * r;
      check(alpha < 0 || std::fabs(site_alpha - alpha) <= 1e-9 * alpha, "models::llama_cpp",
            "{}: llama.cpp stores one alpha per adapter file, but site \"{}\" scales by {} where "
            "the others scale by {}",
            path.string(), ref.path, factors->scaling, alpha / r);
      alpha = site_alpha;
      // llama.cpp keeps the query and key rows of each head in its rotary order.
      const auto& c = model.config();
      if (ref.site->role() == "query") {
        b = LlamaImpl::permute_rotary(b, c.num_attention_heads);
      } else if (ref.site->role() == "key") {
        b = LlamaImpl::permute_rotary(b, c.num_key_value_heads);
      }
      w.add_tensor(name + ".weight.lora_a", a, io::GgmlType::F32);
      w.add_tensor(name + ".weight.lora_b", b, io::GgmlType::F32);
      ++count;
    }
  }
  check(count > 0, "models::llama_cpp", "{}: adapter \"{}\" has no LoRA on this model",
        path.string(), adapter);
  w.add("adapter.lora.alpha", io::GgufValue::f32(static_cast<float>(alpha)));
  w.write(path);
}

/// Writes `model`'s weights (merge adapters first to include them) as a GGUF model file with the
/// metadata of `base_gguf` (the file the model was loaded from: tokenizer, chat template,
/// hyper-parameters). Matrices are stored as `type` (F32, F16 or Q8_0); norms stay F32.
inline void save_llama_cpp_model(LlamaImpl& model, const std::filesystem::path& base_gguf,
                                 const std::filesystem::path& path, io::GgmlType type) {
  check(type == io::GgmlType::F32 || type == io::GgmlType::F16 || type == io::GgmlType::Q8_0,
        "models::llama_cpp", "{}: merged models are written as F32, F16 or Q8_0, not {}",
        path.string(), io::ggml_type_name(static_cast<uint32_t>(type)));
  check(!model.side, "models::llama_cpp",
        "{}: the model has a ladder side network, which does not merge into the decoder's "
        "weights and which llama.cpp cannot run; save it with save_adapter",
        path.string());
  io::GgufFile base(base_gguf);
  io::GgufWriter w;
  for (const auto& key : base.keys()) {
    if (key == "general.alignment") continue;
    w.add(key, base.value(key));
  }
  // llama.cpp's file-type numbers: all F32, mostly F16, mostly Q8_0.
  const uint32_t file_type = type == io::GgmlType::F32 ? 0 : type == io::GgmlType::F16 ? 1 : 7;
  w.add("general.file_type", io::GgufValue::u32(file_type));
  const auto& c = model.config();
  auto put = [&](const std::string& name, torch::Tensor t, int64_t heads) {
    if (heads > 0) t = LlamaImpl::permute_rotary(t, heads);
    w.add_tensor(name, t, t.dim() == 1 ? io::GgmlType::F32 : type);
  };
  put("token_embd.weight", model.embed_tokens->weight, 0);
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    auto& l = model.layer(static_cast<size_t>(i));
    const std::string p = "blk." + std::to_string(i) + ".";
    put(p + "attn_norm.weight", l.input_layernorm->weight, 0);
    put(p + "attn_q.weight", l.self_attn->q_proj->base->weight, c.num_attention_heads);
    put(p + "attn_k.weight", l.self_attn->k_proj->base->weight, c.num_key_value_heads);
    put(p + "attn_v.weight", l.self_attn->v_proj->base->weight, 0);
    put(p + "attn_output.weight", l.self_attn->o_proj->base->weight, 0);
    put(p + "ffn_norm.weight", l.post_attention_layernorm->weight, 0);
    put(p + "ffn_gate.weight", l.mlp->gate_proj->base->weight, 0);
    put(p + "ffn_up.weight", l.mlp->up_proj->base->weight, 0);
    put(p + "ffn_down.weight", l.mlp->down_proj->base->weight, 0);
  }
  put("output_norm.weight", model.norm->weight, 0);
  if (model.lm_head) put("output.weight", model.lm_head->base->weight, 0);
  w.write(path);
}

}  // namespace models
PEFT_NAMESPACE_END
