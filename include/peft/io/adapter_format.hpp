#pragma once

// Adapter files: `adapter_config.json` + `adapter_model.safetensors` in a folder, as Hugging Face
// PEFT writes them. LoRA, prefix tuning and prompt tuning use PEFT's own key names and config
// fields, so the folders load with `PeftModel.from_pretrained` and PEFT's folders load here;
// bottleneck adapters and BitFit, which PEFT does not have, use the same two files with peft's
// own `peft_type` and module paths (see docs/ADAPTER_FORMAT.md).

#include <torch/arg.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/normalization.h>
#include <torch/types.h>

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include <peft/config.hpp>
#include <peft/core/attach.hpp>
#include <peft/core/error.hpp>
#include <peft/core/site.hpp>
#include <peft/core/targets.hpp>
#include <peft/detail/shape.hpp>
#include <peft/io/hf_config.hpp>
#include <peft/io/safetensors.hpp>
#include <peft/methods/adapter.hpp>
#include <peft/methods/bitfit.hpp>
#include <peft/methods/lora.hpp>
#include <peft/methods/prefix.hpp>
#include <peft/methods/prompt.hpp>
#include <peft/models/bert.hpp>
#include <peft/nn/attention.hpp>

PEFT_NAMESPACE_BEGIN

/// How save_adapter() writes a folder.
struct SaveAdapterOptions {
  /// Which attached adapter to write.
  TORCH_ARG(std::string, adapter_name) = "default";
  /// Recorded as `base_model_name_or_path`; empty = the folder a models::Bert was loaded from.
  TORCH_ARG(std::string, base_model_name_or_path);
  /// Fully trained modules saved with the adapter (PEFT's modules_to_save); unset = "classifier"
  /// when the model has a child of that name.
  TORCH_ARG(std::optional<std::vector<std::string>>, modules_to_save);
};

namespace detail {

inline constexpr const char* kAdapterConfig = "adapter_config.json";
inline constexpr const char* kAdapterWeights = "adapter_model.safetensors";

/// The models::Bert inside `model` and its path ("" for the model itself), if there is one.
inline std::pair<std::string, models::BertImpl*> find_bert(torch::nn::Module& model) {
  for (const auto& item : model.named_modules("", /*include_self=*/true)) {
    if (auto* bert = dynamic_cast<models::BertImpl*>(item.value().get())) {
      return {item.key(), bert};
    }
  }
  return {"", nullptr};
}

/// Hugging Face's module path for one of our projection sites inside a Bert
/// ("bert.encoder.layers.3.self_attn.query" -> "bert.encoder.layer.3.attention.self.query"),
/// or the path unchanged when it has none.
inline std::string hf_module_path(const std::string& path, const std::string& bert_path,
                                  bool has_bert) {
  if (!has_bert) return path;
  const std::string prefix = bert_path.empty() ? "" : bert_path + ".";
  const std::string layers = prefix + "encoder.layers.";
  if (path.compare(0, layers.size(), layers) != 0) return path;
  const size_t dot = path.find('.', layers.size());
  if (dot == std::string::npos) return path;
  const std::string index = path.substr(layers.size(), dot - layers.size());
  const std::string rest = path.substr(dot + 1);
  static const std::map<std::string, std::string> names = {
      {"self_attn.query", "attention.self.query"}, {"self_attn.key", "attention.self.key"},
      {"self_attn.value", "attention.self.value"}, {"self_attn.out_proj", "attention.output.dense"},
      {"linear1", "intermediate.dense"},           {"linear2", "output.dense"}};
  auto it = names.find(rest);
  if (it == names.end()) return path;
  return prefix + "encoder.layer." + index + "." + it->second;
}

/// Every parameter of the named modules that exist in `model`, by dotted path.
inline std::vector<std::pair<std::string, torch::Tensor>> module_parameters(
    torch::nn::Module& model, const std::vector<std::string>& modules) {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  auto all = model.named_modules("", /*include_self=*/false);
  for (const auto& name : modules) {
    if (!all.contains(name)) continue;
    for (const auto& p : all[name]->named_parameters(/*recurse=*/true)) {
      out.emplace_back(name + "." + p.key(), p.value());
    }
  }
  return out;
}

inline bool has_module(torch::nn::Module& model, const std::string& name) {
  return model.named_modules("", /*include_self=*/false).contains(name);
}

/// Writes `text` to `path` through a temporary file renamed over it.
inline void write_text_atomically(const std::filesystem::path& path, const std::string& text) {
  const auto tmp = path.string() + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    check(static_cast<bool>(out), "save_adapter", "cannot write {}", tmp);
    out << text;
    out.flush();
    check(static_cast<bool>(out), "save_adapter", "error writing {}", tmp);
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) {
    std::filesystem::remove(tmp, ec);
    fail("save_adapter", "cannot rename {} to {}", tmp, path.string());
  }
}

/// One tensor an adapter file must hold: its key, the shape it must have, and where it goes.
struct Slot {
  std::string key;
  std::vector<int64_t> shape;
  std::function<torch::Tensor()> target;  ///< resolved after the methods are attached
};

inline std::string shape_of(const std::vector<int64_t>& shape) {
  return peft::detail::shape(shape);
}

/// Checks that `file` holds exactly the slots' keys with their shapes (throws before anything
/// changes otherwise).
inline void check_slots(const io::SafetensorsFile& file, const std::vector<Slot>& slots) {
  std::set<std::string> expected;
  for (const auto& slot : slots) {
    expected.insert(slot.key);
    check(file.contains(slot.key), "load_adapter", "{}: missing key \"{}\" (expected shape {})",
          file.path(), slot.key, shape_of(slot.shape));
    const auto found = file.shape(slot.key);
    check(found == slot.shape, "load_adapter", "{}: key \"{}\" has shape {}, expected {}",
          file.path(), slot.key, shape_of(found), shape_of(slot.shape));
    check(c10::isFloatingType(file.dtype(slot.key)), "load_adapter",
          "{}: key \"{}\" has dtype {}, expected a floating-point type", file.path(), slot.key,
          file.entry(slot.key).dtype_name);
  }
  for (const auto& name : file.names()) {
    check(expected.count(name) != 0, "load_adapter",
          "{}: unexpected key \"{}\" (shape {}): the model has no place for it", file.path(), name,
          shape_of(file.shape(name)));
  }
}

/// The sites of `model` with their paths, by path.
inline std::map<std::string, std::shared_ptr<SiteImpl>> sites_by_path(torch::nn::Module& model) {
  std::map<std::string, std::shared_ptr<SiteImpl>> out;
  for (auto& ref : find_sites(model)) out[ref.path] = ref.site;
  return out;
}

/// Attention sites in layer order, as PEFT's prefix layout counts them.
inline std::vector<SiteRef> attention_sites(torch::nn::Module& model) {
  std::vector<SiteRef> out;
  for (auto& ref : find_sites(model)) {
    if (ref.site->kind() == SiteKind::Attention) out.push_back(ref);
  }
  return out;
}

/// The number of attention heads of the model's attentions (0 when it has none).
inline int64_t attention_heads(torch::nn::Module& model) {
  for (const auto& m : model.modules(/*include_self=*/true)) {
    if (auto* mha = dynamic_cast<nn::MultiheadAttentionImpl*>(m.get())) {
      return mha->base->options.num_heads();
    }
  }
  return 0;
}

template <class T>
nlohmann::json number(T value) {
  if constexpr (std::is_floating_point_v<T>) {
    if (value == static_cast<double>(static_cast<int64_t>(value))) {
      return static_cast<int64_t>(value);
    }
  }
  return value;
}

/// The LayerNorms of `model` whose parameters train (BitFit's layer_norm option), by path.
inline std::vector<std::string> trainable_layer_norms(torch::nn::Module& model) {
  std::vector<std::string> out;
  for (const auto& item : model.named_modules("", /*include_self=*/false)) {
    if (!std::dynamic_pointer_cast<torch::nn::LayerNormImpl>(item.value())) continue;
    bool trains = false;
    for (const auto& p : item.value()->parameters()) trains = trains || p.requires_grad();
    if (trains) out.push_back(item.key());
  }
  return out;
}

template <class T>
T config_value(const nlohmann::json& config, const char* key, const std::string& file) {
  auto it = config.find(key);
  check(it != config.end() && !it->is_null(), "load_adapter", "{}: \"{}\" is missing", file, key);
  try {
    return it->get<T>();
  } catch (const nlohmann::json::exception&) {
    fail("load_adapter", "{}: \"{}\" has the wrong type ({})", file, key, it->dump());
  }
}

template <class T>
T config_value_or(const nlohmann::json& config, const char* key, T fallback,
                  const std::string& file) {
  auto it = config.find(key);
  if (it == config.end() || it->is_null()) return fallback;
  return config_value<T>(config, key, file);
}

}  // namespace detail

/// Writes the adapter `options.adapter_name()` of `model` to the folder `dir` (created if needed):
/// `adapter_config.json` and `adapter_model.safetensors`, each replaced atomically. The adapter
/// must consist of one method (LoRA, prefix, prompt, bottleneck adapter or BitFit; P-tuning is
/// written as the prompt rows its encoder produces, PEFT's PROMPT_TUNING, and loads back as prompt
/// tuning); the modules to save (by default a `classifier` head) are written with it. The model is
/// not changed.
///
///     peft::save_adapter(*model, "out/sst2-lora");
inline void save_adapter(torch::nn::Module& model, const std::filesystem::path& dir,
                         const SaveAdapterOptions& options = SaveAdapterOptions()) {
  namespace fs = std::filesystem;
  const std::string& name = options.adapter_name();
  std::vector<std::pair<std::string, std::shared_ptr<MethodImpl>>> methods;
  std::set<std::string> kinds;
  for (auto& [path, m] : attached_methods(model)) {
    if (m->adapter() != name) continue;
    methods.emplace_back(path, m);
    kinds.insert(m->method());
  }
  if (methods.empty()) {
    auto known = adapter_names(model);
    fail("save_adapter", "no adapter named \"{}\"; attached: {}", name,
         known.empty() ? std::string("(none)") : fmt::format("{}", fmt::join(known, ", ")));
  }
  check(kinds.size() == 1, "save_adapter",
        "adapter \"{}\" combines {}; an adapter file holds one method (give each its own "
        "adapter_name)",
        name, fmt::format("{}", fmt::join(kinds, " and ")));
  const std::string method = *kinds.begin();

  auto [bert_path, bert] = detail::find_bert(model);
  std::vector<std::string> to_save;
  if (options.modules_to_save()) {
    to_save = *options.modules_to_save();
    for (const auto& m : to_save) {
      check(detail::has_module(model, m), "save_adapter",
            "modules_to_save: the model has no \"{}\"", m);
    }
  } else if (detail::has_module(model, "classifier")) {
    to_save = {"classifier"};
  }
  const bool classifier = std::find(to_save.begin(), to_save.end(), "classifier") != to_save.end();
  std::string base = options.base_model_name_or_path();
  if (base.empty() && bert != nullptr) base = bert->config().name_or_path;

  nlohmann::json config;
  config["base_model_name_or_path"] = base.empty() ? nlohmann::json() : nlohmann::json(base);
  config["task_type"] = classifier ? "SEQ_CLS" : "FEATURE_EXTRACTION";
  config["modules_to_save"] = to_save.empty() ? nlohmann::json() : nlohmann::json(to_save);
  config["inference_mode"] = true;
  config["revision"] = nullptr;
  config["peft_library"] = "peft-cpp";

  std::vector<std::pair<std::string, torch::Tensor>> tensors;
  torch::NoGradGuard no_grad;
  // PEFT nests the transformers model one level deeper for LoRA than for prompt methods.
  std::string save_prefix;

  if (method == "lora") {
    save_prefix = "base_model.model.";
    const auto& first = std::dynamic_pointer_cast<LoRAImpl>(methods.front().second)->options();
    std::vector<std::string> targets;
    for (auto& [path, m] : methods) {
      auto lora = std::dynamic_pointer_cast<LoRAImpl>(m);
      const auto& o = lora->options();
      check(o.r() == first.r() && o.alpha() == first.alpha() && o.rslora() == first.rslora() &&
                o.dropout() == first.dropout(),
            "save_adapter",
            "LoRA at \"{}\" has r={} alpha={} rslora={} dropout={}, unlike \"{}\"; one file holds "
            "one setting",
            path, o.r(), o.alpha(), o.rslora(), o.dropout(), methods.front().first);
      const std::string hf = detail::hf_module_path(path, bert_path, bert != nullptr);
      targets.push_back(hf);
      if (lora->on_embedding()) {
        tensors.emplace_back(save_prefix + hf + ".lora_embedding_A", lora->lora_embedding_A);
        tensors.emplace_back(save_prefix + hf + ".lora_embedding_B", lora->lora_embedding_B);
      } else {
        tensors.emplace_back(save_prefix + hf + ".lora_A.weight", lora->lora_A->weight);
        tensors.emplace_back(save_prefix + hf + ".lora_B.weight", lora->lora_B->weight);
      }
    }
    config["peft_type"] = "LORA";
    config["r"] = first.r();
    config["lora_alpha"] = detail::number(first.alpha());
    config["lora_dropout"] = first.dropout();
    config["use_rslora"] = first.rslora();
    config["target_modules"] = targets;
    config["bias"] = "none";
    config["fan_in_fan_out"] = false;
    config["use_dora"] = false;
    config["init_lora_weights"] = true;
    config["rank_pattern"] = nlohmann::json::object();
    config["alpha_pattern"] = nlohmann::json::object();
    config["layers_to_transform"] = nullptr;
    config["layers_pattern"] = nullptr;
  } else if (method == "prompt" || method == "ptuning" || method == "prefix") {
    save_prefix = "base_model.";
    const int64_t layers = static_cast<int64_t>(detail::attention_sites(model).size());
    const int64_t heads =
        bert != nullptr ? bert->config().num_attention_heads : detail::attention_heads(model);
    int64_t dim = 0, n = 0;
    if (method == "prompt" || method == "ptuning") {
      // P-tuning is saved as the virtual tokens its encoder produces now: plain prompt tuning,
      // which is how Hugging Face PEFT stores a P-tuning model for inference.
      check(methods.size() == 1, "save_adapter",
            "prompt adapter \"{}\" sits at {} sites; the file format holds one prompt", name,
            methods.size());
      auto rows = methods.front().second->prompt();
      tensors.emplace_back("prompt_embeddings", rows);
      n = rows.size(0);
      dim = rows.size(1);
      config["peft_type"] = "PROMPT_TUNING";
      config["prompt_tuning_init"] = "RANDOM";
      config["prompt_tuning_init_text"] = nullptr;
      config["tokenizer_name_or_path"] = nullptr;
    } else {
      // PEFT's layout: row t holds, layer after layer, that layer's key then value row.
      auto all = detail::attention_sites(model);
      check(methods.size() == all.size(), "save_adapter",
            "prefix adapter \"{}\" sits at {} of the model's {} attentions; the file format "
            "needs every layer",
            name, methods.size(), all.size());
      std::vector<torch::Tensor> columns;
      for (size_t i = 0; i < all.size(); ++i) {
        check(methods[i].first == all[i].path, "save_adapter",
              "prefix adapter \"{}\" is not at every attention in layer order (\"{}\" vs \"{}\")",
              name, methods[i].first, all[i].path);
        auto [k, v] = methods[i].second->prefix();
        if (!columns.empty()) {
          check(k.size(0) == columns.front().size(0), "save_adapter",
                "prefix at \"{}\" has {} rows, unlike the first layer's {}", methods[i].first,
                k.size(0), columns.front().size(0));
        }
        columns.push_back(k);
        columns.push_back(v);
      }
      auto rows = torch::cat(columns, 1);
      tensors.emplace_back("prompt_embeddings", rows);
      n = rows.size(0);
      dim = columns.front().size(1);
      config["peft_type"] = "PREFIX_TUNING";
      config["prefix_projection"] = false;
      config["encoder_hidden_size"] = dim;
    }
    config["num_virtual_tokens"] = n;
    config["token_dim"] = dim;
    config["num_transformer_submodules"] = 1;
    config["num_attention_heads"] = heads;
    config["num_layers"] = layers;
  } else if (method == "adapter") {
    auto first = std::dynamic_pointer_cast<AdapterImpl>(methods.front().second);
    const auto& o = first->options();
    std::vector<std::string> targets;
    for (auto& [path, m] : methods) {
      auto a = std::dynamic_pointer_cast<AdapterImpl>(m);
      check(a->options().kind() == o.kind() && a->options().activation() == o.activation() &&
                a->options().scaling() == o.scaling() &&
                a->adapter_down->weight.size(0) == first->adapter_down->weight.size(0),
            "save_adapter", "adapter at \"{}\" is set up unlike the one at \"{}\"", path,
            methods.front().first);
      targets.push_back(path);
      for (const auto& p : a->named_parameters())
        tensors.emplace_back(path + "." + p.key(), p.value());
    }
    config["peft_type"] = "BOTTLENECK_ADAPTER";
    config["adapter_kind"] = to_string(o.kind());
    config["bottleneck"] = first->adapter_down->weight.size(0);
    config["activation"] = o.activation();
    config["scaling"] = o.scaling();
    config["target_modules"] = targets;
  } else if (method == "bitfit") {
    std::vector<std::string> targets;
    for (auto& [path, m] : methods) {
      targets.push_back(path);
      tensors.emplace_back(path + ".bias", std::dynamic_pointer_cast<BitFitImpl>(m)->bias);
    }
    auto norms = detail::trainable_layer_norms(model);
    for (auto& p : detail::module_parameters(model, norms)) tensors.push_back(p);
    config["peft_type"] = "BITFIT";
    config["target_modules"] = targets;
    config["layer_norm_modules"] = norms;
  } else {
    fail("save_adapter", "adapter \"{}\" is a {}, which has no file format", name, method);
  }
  for (auto& [key, t] : detail::module_parameters(model, to_save)) {
    tensors.emplace_back(save_prefix + key, t);
  }
  for (auto& [key, t] : tensors) t = t.detach().to(torch::kCPU).contiguous();

  std::error_code ec;
  fs::create_directories(dir, ec);
  check(fs::is_directory(dir), "save_adapter", "cannot create folder {}", dir.string());
  io::save_safetensors(dir / detail::kAdapterWeights, tensors, {{"format", "pt"}});
  detail::write_text_atomically(dir / detail::kAdapterConfig, config.dump(2) + "\n");
}

/// Attaches the adapter in folder `dir` (written by save_adapter() or by Hugging Face PEFT's
/// save_pretrained) to `model` as `adapter_name`, with its weights, and loads its modules to save
/// into the model. Every key and shape is checked before the model is touched: a missing or
/// unexpected key, a shape mismatch or a setting peft does not support throws peft::Error naming
/// it, and leaves the model unchanged.
///
///     auto model = peft::models::BertForSequenceClassification::from_pretrained(base, 2);
///     peft::load_adapter(*model, "out/sst2-lora");
inline void load_adapter(torch::nn::Module& model, const std::filesystem::path& dir,
                         const std::string& adapter_name = "default") {
  namespace fs = std::filesystem;
  check(fs::is_directory(dir), "load_adapter", "adapter folder {} does not exist", dir.string());
  const auto config_path = dir / detail::kAdapterConfig;
  const auto weights_path = dir / detail::kAdapterWeights;
  check(fs::exists(config_path), "load_adapter", "{} not found", config_path.string());
  if (!fs::exists(weights_path)) {
    check(!fs::exists(dir / "adapter_model.bin"), "load_adapter",
          "{} has only adapter_model.bin; peft reads safetensors only", dir.string());
    fail("load_adapter", "{} not found", weights_path.string());
  }
  const std::string cfg_name = config_path.string();
  const auto config = io::read_json(config_path, "load_adapter");
  check(config.is_object(), "load_adapter", "{}: expected a JSON object", cfg_name);
  const auto peft_type = detail::config_value<std::string>(config, "peft_type", cfg_name);
  io::SafetensorsFile file(weights_path);

  auto [bert_path, bert] = detail::find_bert(model);
  auto sites = detail::sites_by_path(model);
  std::vector<detail::Slot> slots;
  // Each adapter type fills `slots` and `apply` (which attaches and returns the targets).
  std::function<void()> apply;
  std::string save_prefix;

  // Methods created by apply(), by site path, to resolve slots' targets afterwards.
  auto method_at = [&model, adapter_name](
                       const std::string& path,
                       const std::string& method) -> std::shared_ptr<MethodImpl> {
    for (auto& [p, m] : attached_methods(model)) {
      if (p == path && m->adapter() == adapter_name && m->method() == method) return m;
    }
    fail("load_adapter", "internal: no {} attached at \"{}\"", method, path);
  };

  if (peft_type == "LORA") {
    save_prefix = "base_model.model.";
    const auto bias = detail::config_value_or<std::string>(config, "bias", "none", cfg_name);
    check(bias == "none", "load_adapter", "{}: LoRA bias \"{}\" is not supported (only \"none\")",
          cfg_name, bias);
    check(!detail::config_value_or<bool>(config, "use_dora", false, cfg_name), "load_adapter",
          "{}: DoRA (use_dora) is not supported", cfg_name);
    check(!detail::config_value_or<bool>(config, "fan_in_fan_out", false, cfg_name), "load_adapter",
          "{}: fan_in_fan_out is not supported", cfg_name);
    for (const char* key : {"rank_pattern", "alpha_pattern"}) {
      auto it = config.find(key);
      check(it == config.end() || it->is_null() || it->empty(), "load_adapter",
            "{}: {} (per-module ranks or alphas) is not supported", cfg_name, key);
    }
    const auto r = detail::config_value<int64_t>(config, "r", cfg_name);
    const auto alpha = detail::config_value<double>(config, "lora_alpha", cfg_name);
    const auto dropout = detail::config_value_or<double>(config, "lora_dropout", 0.0, cfg_name);
    const auto rslora = detail::config_value_or<bool>(config, "use_rslora", false, cfg_name);
    auto options = LoRAOptions(r).alpha(alpha).dropout(dropout).rslora(rslora);
    options.adapter_name(adapter_name);
    try {
      options.validate();
    } catch (const Error& e) {
      fail("load_adapter", "{}: {}", cfg_name, e.what());
    }
    // The file's keys say which projections carry LoRA.
    std::map<std::string, std::string> ours;  // Hugging Face module path -> our site path
    for (auto& [path, site] : sites) {
      if (LoRAOptions::fits(*site))
        ours[detail::hf_module_path(path, bert_path, bert != nullptr)] = path;
    }
    std::vector<std::string> targets;
    for (const auto& key : file.names()) {
      if (key.compare(0, save_prefix.size(), save_prefix) != 0) continue;
      for (const char* suffix : {".lora_A.weight", ".lora_embedding_A"}) {
        const std::string s = suffix;
        if (key.size() <= save_prefix.size() + s.size() ||
            key.compare(key.size() - s.size(), s.size(), s) != 0) {
          continue;
        }
        const std::string module =
            key.substr(save_prefix.size(), key.size() - save_prefix.size() - s.size());
        auto it = ours.find(module);
        check(it != ours.end(), "load_adapter",
              "{}: key \"{}\" names module \"{}\", which is no projection of this model",
              file.path(), key, module);
        targets.push_back(it->second);
        auto site = sites[it->second];
        const bool embedding = site->kind() == SiteKind::Embedding;
        check(embedding == (s == ".lora_embedding_A"), "load_adapter",
              "{}: key \"{}\" does not fit the {} at \"{}\"", file.path(), key,
              to_string(site->kind()), it->second);
        const std::string stem = save_prefix + module;
        const std::string path = it->second;
        const int64_t in = site->in_features(), out = site->out_features();
        if (embedding) {
          slots.push_back({stem + ".lora_embedding_A", {r, in}, [&method_at, path] {
                             return std::dynamic_pointer_cast<LoRAImpl>(method_at(path, "lora"))
                                 ->lora_embedding_A;
                           }});
          slots.push_back({stem + ".lora_embedding_B", {out, r}, [&method_at, path] {
                             return std::dynamic_pointer_cast<LoRAImpl>(method_at(path, "lora"))
                                 ->lora_embedding_B;
                           }});
        } else {
          slots.push_back({stem + ".lora_A.weight", {r, in}, [&method_at, path] {
                             return std::dynamic_pointer_cast<LoRAImpl>(method_at(path, "lora"))
                                 ->lora_A->weight;
                           }});
          slots.push_back({stem + ".lora_B.weight", {out, r}, [&method_at, path] {
                             return std::dynamic_pointer_cast<LoRAImpl>(method_at(path, "lora"))
                                 ->lora_B->weight;
                           }});
        }
      }
    }
    check(!targets.empty(), "load_adapter", "{}: no LoRA weights (keys ending in .lora_A.weight)",
          file.path());
    options.targets(targets);
    apply = [&model, options] { attach(model, options); };
  } else if (peft_type == "PROMPT_TUNING" || peft_type == "PREFIX_TUNING") {
    save_prefix = "base_model.";
    const auto n = detail::config_value<int64_t>(config, "num_virtual_tokens", cfg_name);
    check(n > 0, "load_adapter", "{}: num_virtual_tokens must be positive, got {}", cfg_name, n);
    check(detail::config_value_or<int64_t>(config, "num_transformer_submodules", 1, cfg_name) == 1,
          "load_adapter", "{}: only encoder models (num_transformer_submodules 1) are supported",
          cfg_name);
    if (peft_type == "PROMPT_TUNING") {
      std::vector<SiteRef> inputs;
      for (auto& ref : find_sites(model)) {
        if (ref.site->kind() == SiteKind::Input) inputs.push_back(ref);
      }
      check(!inputs.empty(), "load_adapter", "{}: the model has no prompt site", cfg_name);
      SiteRef target = inputs.front();
      for (auto& ref : inputs) {
        if (ref.path == "prompt" || (bert != nullptr && ref.site.get() == bert->prompt.get())) {
          target = ref;
        }
      }
      const std::string path = target.path;
      slots.push_back({"prompt_embeddings", {n, target.site->out_features()}, [&method_at, path] {
                         return std::dynamic_pointer_cast<PromptImpl>(method_at(path, "prompt"))
                             ->prompt_embeddings;
                       }});
      auto options = PromptOptions(n);
      options.adapter_name(adapter_name);
      auto site = target.site;
      apply = [site, options] { attach_site(*site, options); };
    } else {
      check(!detail::config_value_or<bool>(config, "prefix_projection", false, cfg_name),
            "load_adapter",
            "{}: prefix_projection true is not supported (the file holds the MLP, not the rows)",
            cfg_name);
      auto all = detail::attention_sites(model);
      check(!all.empty(), "load_adapter", "{}: the model has no attention", cfg_name);
      const auto layers = detail::config_value<int64_t>(config, "num_layers", cfg_name);
      check(layers == static_cast<int64_t>(all.size()), "load_adapter",
            "{}: num_layers is {}, but the model has {} attentions", cfg_name, layers, all.size());
      const int64_t E = all.front().site->out_features();
      std::vector<std::string> paths;
      for (auto& ref : all) paths.push_back(ref.path);
      // The rows go to the prefixes after attaching; see the copy below.
      slots.push_back({"prompt_embeddings", {n, layers * 2 * E}, nullptr});
      auto options = PrefixOptions(n);
      options.adapter_name(adapter_name);
      options.targets(paths);
      apply = [&model, options] { attach(model, options); };
    }
  } else if (peft_type == "BOTTLENECK_ADAPTER") {
    const auto targets =
        detail::config_value<std::vector<std::string>>(config, "target_modules", cfg_name);
    const auto kind_name = detail::config_value<std::string>(config, "adapter_kind", cfg_name);
    AdapterKind kind = AdapterKind::Houlsby;
    if (kind_name == "pfeiffer") {
      kind = AdapterKind::Pfeiffer;
    } else if (kind_name == "parallel") {
      kind = AdapterKind::Parallel;
    } else {
      check(kind_name == "houlsby", "load_adapter",
            "{}: adapter_kind \"{}\" is unknown (houlsby, pfeiffer or parallel)", cfg_name,
            kind_name);
    }
    auto options =
        AdapterOptions(kind)
            .bottleneck(detail::config_value<int64_t>(config, "bottleneck", cfg_name))
            .activation(detail::config_value<std::string>(config, "activation", cfg_name))
            .scaling(detail::config_value<double>(config, "scaling", cfg_name));
    options.adapter_name(adapter_name);
    options.targets(targets);
    try {
      options.validate();
    } catch (const Error& e) {
      fail("load_adapter", "{}: {}", cfg_name, e.what());
    }
    const int64_t m = options.bottleneck();
    for (const auto& path : targets) {
      auto it = sites.find(path);
      check(it != sites.end() && AdapterOptions::fits(*it->second), "load_adapter",
            "{}: target \"{}\" is no block site of this model", cfg_name, path);
      const int64_t d = it->second->out_features();
      auto part = [&method_at, path](int which, bool weight) {
        return [&method_at, path, which, weight] {
          auto a = std::dynamic_pointer_cast<AdapterImpl>(method_at(path, "adapter"));
          auto& linear = which == 0 ? a->adapter_down : a->adapter_up;
          return weight ? linear->weight : linear->bias;
        };
      };
      slots.push_back({path + ".adapter_down.weight", {m, d}, part(0, true)});
      slots.push_back({path + ".adapter_down.bias", {m}, part(0, false)});
      slots.push_back({path + ".adapter_up.weight", {d, m}, part(1, true)});
      slots.push_back({path + ".adapter_up.bias", {d}, part(1, false)});
    }
    apply = [&model, options] { attach(model, options); };
  } else if (peft_type == "BITFIT") {
    const auto targets =
        detail::config_value<std::vector<std::string>>(config, "target_modules", cfg_name);
    const auto norms = detail::config_value_or<std::vector<std::string>>(
        config, "layer_norm_modules", {}, cfg_name);
    for (const auto& path : targets) {
      auto it = sites.find(path);
      check(it != sites.end() && BitFitOptions::fits(*it->second), "load_adapter",
            "{}: target \"{}\" is no projection site of this model", cfg_name, path);
      slots.push_back(
          {path + ".bias", {it->second->out_features()}, [&method_at, path] {
             return std::dynamic_pointer_cast<BitFitImpl>(method_at(path, "bitfit"))->bias;
           }});
    }
    auto modules = model.named_modules("", /*include_self=*/false);
    std::vector<torch::Tensor> norm_params;
    for (const auto& norm : norms) {
      check(modules.contains(norm) &&
                std::dynamic_pointer_cast<torch::nn::LayerNormImpl>(modules[norm]) != nullptr,
            "load_adapter",
            "{}: layer_norm_modules names \"{}\", which is no LayerNorm of this "
            "model",
            cfg_name, norm);
    }
    for (auto& [key, t] : detail::module_parameters(model, norms)) {
      auto tensor = t;
      slots.push_back({key, tensor.sizes().vec(), [tensor] { return tensor; }});
      norm_params.push_back(tensor);
    }
    auto options = BitFitOptions();
    options.adapter_name(adapter_name);
    options.targets(targets);
    apply = [&model, options, norm_params] {
      attach(model, options);
      for (auto t : norm_params) t.set_requires_grad(true);
    };
  } else {
    fail("load_adapter",
         "{}: peft_type \"{}\" is not supported (LORA, PREFIX_TUNING, "
         "PROMPT_TUNING, BOTTLENECK_ADAPTER, BITFIT)",
         cfg_name, peft_type);
  }

  // Modules to save: every parameter of each listed module the model has.
  std::vector<std::string> to_save;
  if (auto it = config.find("modules_to_save"); it != config.end() && !it->is_null()) {
    to_save = detail::config_value<std::vector<std::string>>(config, "modules_to_save", cfg_name);
  }
  std::sort(to_save.begin(), to_save.end());
  to_save.erase(std::unique(to_save.begin(), to_save.end()), to_save.end());
  for (auto& [key, t] : detail::module_parameters(model, to_save)) {
    auto tensor = t;
    slots.push_back({save_prefix + key, tensor.sizes().vec(), [tensor] { return tensor; }});
  }

  detail::check_slots(file, slots);
  std::vector<torch::Tensor> values;
  for (const auto& slot : slots) values.push_back(file.tensor(slot.key));

  apply();
  torch::NoGradGuard no_grad;
  for (size_t i = 0; i < slots.size(); ++i) {
    if (slots[i].target) {
      auto target = slots[i].target();
      target.copy_(values[i]);
      continue;
    }
    // Prefix rows: column block 2l holds layer l's keys, 2l + 1 its values.
    auto all = detail::attention_sites(model);
    const int64_t E = all.front().site->out_features();
    for (size_t l = 0; l < all.size(); ++l) {
      auto prefix = std::dynamic_pointer_cast<PrefixImpl>(method_at(all[l].path, "prefix"));
      prefix->prefix_keys.copy_(values[i].narrow(1, static_cast<int64_t>(2 * l) * E, E));
      prefix->prefix_values.copy_(values[i].narrow(1, static_cast<int64_t>(2 * l + 1) * E, E));
    }
  }
}

PEFT_NAMESPACE_END
