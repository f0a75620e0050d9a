#pragma once

// BERT and RoBERTa encoders built from stock torch::nn modules (embeddings, LayerNorm, a stock
// TransformerEncoder run by peft's wrapper), loadable from a Hugging Face folder.

#include <torch/nn/modules/dropout.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/normalization.h>
#include <torch/nn/modules/transformercoder.h>
#include <torch/nn/modules/transformerlayer.h>
#include <torch/nn/pimpl.h>
#include <torch/types.h>

#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include <peft/config.hpp>
#include <peft/core/error.hpp>
#include <peft/core/parameters.hpp>
#include <peft/core/hub.hpp>
#include <peft/core/site.hpp>
#include <peft/detail/shape.hpp>
#include <peft/io/hf_config.hpp>
#include <peft/io/safetensors.hpp>
#include <peft/io/sharded.hpp>
#include <peft/nn/encoder.hpp>

PEFT_NAMESPACE_BEGIN
namespace models {

/// Edits a model's config after it is read and before the model is built
/// (BertImpl::from_pretrained's `adjust`).
using ConfigAdjust = std::function<void(BertConfig&)>;

/// A BERT/RoBERTa encoder. Children: `word_embeddings`, `position_embeddings`,
/// `token_type_embeddings`, `embeddings_norm`, `encoder` (peft::nn::TransformerEncoder over a
/// stock TransformerEncoder: sites `encoder.layers.<i>.self_attn.query` ...), `pooler` and the
/// Input site `prompt`.
///
/// Prompt rows go where Hugging Face PEFT puts them: in front of the word embeddings, before the
/// position and token type embeddings and the embedding LayerNorm. The encoder wrapper's own
/// prompt site is taken out of the module tree, so target "prompt" selects only this one.
///
/// The whole backbone is frozen; only attached methods (and heads built on top) train.
class BertImpl : public torch::nn::Module, public HubModel {
 public:
  explicit BertImpl(BertConfig config) : torch::nn::Module("peft::models::Bert"), config_(config) {
    config_.validate(config_.name_or_path.empty() ? "config" : config_.name_or_path);
    const int64_t H = config_.hidden_size;
    auto embedding = [&](int64_t count) {
      return torch::nn::Embedding(torch::nn::EmbeddingOptions(count, H));
    };
    word_embeddings = register_module("word_embeddings", embedding(config_.vocab_size));
    position_embeddings =
        register_module("position_embeddings", embedding(config_.max_position_embeddings));
    token_type_embeddings =
        register_module("token_type_embeddings", embedding(config_.type_vocab_size));
    embeddings_norm = register_module(
        "embeddings_norm",
        torch::nn::LayerNorm(torch::nn::LayerNormOptions({H}).eps(config_.layer_norm_eps)));
    embeddings_dropout =
        register_module("embeddings_dropout", torch::nn::Dropout(config_.hidden_dropout_prob));

    auto layer_options = torch::nn::TransformerEncoderLayerOptions(H, config_.num_attention_heads)
                             .dim_feedforward(config_.intermediate_size)
                             .dropout(config_.hidden_dropout_prob)
                             .activation(torch::kGELU);
    torch::nn::TransformerEncoder stock(torch::nn::TransformerEncoderOptions(
        torch::nn::TransformerEncoderLayer(layer_options), config_.num_hidden_layers));
    // The stock layer fixes its LayerNorms' eps at 1e-5; BERT uses the config's. Both the typed
    // member (what forward reads) and the child (what parameters() lists) must change.
    for (size_t i = 0; i < stock->layers->size(); ++i) {
      auto l = stock->layers->ptr<torch::nn::TransformerEncoderLayerImpl>(i);
      auto norm = [&] {
        return torch::nn::LayerNorm(torch::nn::LayerNormOptions({H}).eps(config_.layer_norm_eps));
      };
      l->norm1 = l->replace_module("norm1", norm());
      l->norm2 = l->replace_module("norm2", norm());
    }
    // Batch-first, as the embeddings come out and as Hugging Face's BERT runs: no transposes, and
    // attention's gradients arrive contiguous (nn::TransformerEncoder's batch_first).
    encoder = register_module("encoder", peft::nn::TransformerEncoder(stock, /*batch_first=*/true));
    encoder->unregister_module("prompt");
    set_dropout(config_.hidden_dropout_prob, config_.attention_probs_dropout_prob);

    pooler = register_module("pooler", torch::nn::Linear(H, H));
    prompt = register_module("prompt", Site(SiteKind::Input, "prompt", H, H));
    prompt->set_vocabulary(word_embeddings->weight);
    freeze(*this);
  }

  /// Loads `folder/config.json` and `folder/model.safetensors` (or the shards that
  /// `model.safetensors.index.json` lists) of a Hugging Face BertModel, BertFor*, RobertaModel
  /// or RobertaFor* checkpoint into a frozen model. `adjust`, when given,
  /// edits the config before the model is built, as transformers' `from_pretrained(folder,
  /// **kwargs)` does: dropout rates, or fewer layers (num_hidden_layers: the first ones are
  /// loaded and the rest of the checkpoint ignored). The adjusted config is checked again; a
  /// change the weights cannot fill (another width) fails with the tensor's key and shapes.
  static std::shared_ptr<BertImpl> from_pretrained(const std::filesystem::path& folder,
                                                   const ConfigAdjust& adjust = nullptr) {
    namespace fs = std::filesystem;
    check(fs::is_directory(folder), "models::bert", "model folder {} does not exist",
          folder.string());
    const auto config_file = folder / "config.json";
    check(fs::exists(config_file), "models::bert", "{} not found", config_file.string());
    auto config = BertConfig::from_file(config_file);
    config.name_or_path = folder.string();
    if (adjust) {
      adjust(config);
      config.validate(config_file.string() + " as adjusted");
    }
    const auto weights = io::SafetensorsCheckpoint::find(folder, "models::bert");
    auto model = std::make_shared<BertImpl>(config);
    model->load_weights(weights);
    return model;
  }

  /// Copies a Hugging Face checkpoint's tensors (a .safetensors file, or a
  /// model.safetensors.index.json and its shards) into the frozen weights. Names may carry a
  /// "bert." or "roberta." prefix; other tensors in the file (heads, buffers) are ignored. Every
  /// expected tensor is checked before anything is copied: a missing one or a wrong shape throws
  /// peft::Error naming the key and both shapes, and the model is left as it was.
  void load_weights(const std::filesystem::path& file) {
    const io::SafetensorsCheckpoint st(file);
    std::string prefix;
    for (const char* p : {"bert.", "roberta."}) {
      if (st.contains(std::string(p) + "embeddings.word_embeddings.weight")) prefix = p;
    }
    auto plan = weight_map();
    std::vector<std::pair<torch::Tensor, std::string>> copies;
    for (const auto& [name, target] : plan) {
      const std::string key = prefix + name;
      check(st.contains(key), "models::bert", "{}: missing tensor \"{}\" (expected shape {})",
            file.string(), key, peft::detail::shape(target.sizes()));
      auto shape = st.shape(key);
      check(c10::IntArrayRef(shape) == target.sizes(), "models::bert",
            "{}: tensor \"{}\" has shape {}, expected {}", file.string(), key,
            peft::detail::shape(shape), peft::detail::shape(target.sizes()));
      check(c10::isFloatingType(st.dtype(key)), "models::bert",
            "{}: tensor \"{}\" has dtype {}, expected a floating-point type", file.string(), key,
            st.entry(key).dtype_name);
      copies.emplace_back(target, key);
    }
    // A slice at a time, each slice's pages of the file released once copied: the load's peak
    // memory is the model, not the model and the file.
    torch::NoGradGuard no_grad;
    for (auto& [target, key] : copies) st.copy_to(key, target);
  }

  /// input_ids [N, L]; attention_mask [N, L] (1 = token, 0 = padding; all ones if undefined);
  /// token_type_ids [N, L] (zeros if undefined). Returns the last hidden state [N, n + L, H],
  /// where n is prompt_length(). With prefix tuning, positions count from prefix_length(), as
  /// Hugging Face's BERT does with PEFT's prefixes (they arrive as a key/value cache).
  torch::Tensor forward(const torch::Tensor& input_ids, const torch::Tensor& attention_mask = {},
                        const torch::Tensor& token_type_ids = {}) {
    check_inputs(input_ids, attention_mask, "attention_mask");
    auto x = embed(input_ids, token_type_ids);
    return encoder->forward(x, {}, key_padding_mask(attention_mask, x.size(1) - input_ids.size(1)));
  }

  /// forward()'s first `rows` positions only, [N, rows, H]: the last layer computes queries, FFN
  /// and norms for those positions alone (every position still serves as key and value). What a
  /// reader of the [CLS] position needs (pool()), for about 5/6 of the last layer's work less.
  /// Equal to forward().narrow(1, 0, rows) up to float rounding. Prompt positions come first.
  torch::Tensor forward_first(const torch::Tensor& input_ids, int64_t rows,
                              const torch::Tensor& attention_mask = {},
                              const torch::Tensor& token_type_ids = {}) {
    check_inputs(input_ids, attention_mask, "attention_mask");
    auto x = embed(input_ids, token_type_ids);
    return encoder->forward_first(x, rows, {},
                                  key_padding_mask(attention_mask, x.size(1) - input_ids.size(1)));
  }

  /// The embedding output [N, n + L, H] the encoder reads: word, position and token type
  /// embeddings, LayerNorm and dropout, with the n = prompt_length() prompt rows in front of the
  /// words (positions numbered as forward() describes). A model that runs its own network over
  /// BERT's embeddings (Ladder Side-Tuning) starts here.
  torch::Tensor embed(const torch::Tensor& input_ids, const torch::Tensor& token_type_ids = {}) {
    check_inputs(input_ids, token_type_ids, "token_type_ids");
    const int64_t N = input_ids.size(0), L = input_ids.size(1);
    auto x = word_embeddings(input_ids);
    auto types = token_type_ids.defined() ? token_type_ids : torch::zeros_like(input_ids);
    auto rows = prompt->prompt_rows();
    const int64_t n = rows.defined() ? rows.size(0) : 0;
    // Hugging Face runs prefix tuning through the key/value cache, so BERT numbers the real
    // tokens after the cached prefix rows; PEFT-trained prefixes expect that.
    const int64_t past = prefix_length();
    torch::Tensor positions;
    if (n > 0) {
      x = torch::cat({rows.unsqueeze(0).expand({N, n, rows.size(1)}).to(x.scalar_type()), x}, 1);
      types = torch::cat({torch::zeros({N, n}, types.options()), types}, 1);
      // With a prompt Hugging Face PEFT passes inputs_embeds, whose positions simply count up.
      positions =
          torch::arange(past, past + n + L, input_ids.options()).unsqueeze(0).expand({N, n + L});
      if (config_.roberta()) positions = positions + (config_.pad_token_id + 1);
    } else if (config_.roberta()) {
      auto tokens = input_ids.ne(config_.pad_token_id).to(torch::kLong);
      positions = (torch::cumsum(tokens, 1) + past) * tokens + config_.pad_token_id;
    } else {
      positions = torch::arange(past, past + L, input_ids.options()).unsqueeze(0).expand({N, L});
    }
    const int64_t max_position = positions.numel() > 0 ? positions.max().item<int64_t>() : 0;
    check(max_position < config_.max_position_embeddings, "models::bert",
          "sequence of {} positions (prefix {} + prompt {} + input {}) needs position {}, but the "
          "model has {} position embeddings",
          past + n + L, past, n, L, max_position, config_.max_position_embeddings);
    x = x + position_embeddings(positions) + token_type_embeddings(types);
    return embeddings_dropout(embeddings_norm(x));
  }

  /// Puts dropout where Hugging Face's BertModel has it: `hidden` after the embeddings and on
  /// each attention and feed-forward output (before the residual add), `attention` on the
  /// attention probabilities. The stock encoder layer also drops inside its feed-forward block
  /// (between the activation and the second Linear), where BERT has no dropout; that one stays at
  /// 0, so training draws the same masks in the same places as Hugging Face's BERT. The
  /// constructor calls this with the config's hidden_dropout_prob and
  /// attention_probs_dropout_prob; config() reports the values set last.
  void set_dropout(double hidden, double attention) {
    check(hidden >= 0 && hidden < 1 && attention >= 0 && attention < 1, "models::bert",
          "dropout probabilities must be in [0, 1), got hidden {} and attention {}", hidden,
          attention);
    config_.hidden_dropout_prob = hidden;
    config_.attention_probs_dropout_prob = attention;
    embeddings_dropout->options.p(hidden);
    for (size_t i = 0; i < encoder->layers->size(); ++i) {
      auto l = encoder_layer(i);
      l->dropout->options.p(0.0);
      l->dropout1->options.p(hidden);
      l->dropout2->options.p(hidden);
      l->self_attn->options.dropout(attention);
    }
  }

  /// The encoder's key padding mask [N, extra + L] (true = padding) for an attention_mask [N, L]
  /// (1 = token), with `extra` positions in front that are never padding (prompt rows); undefined
  /// when attention_mask is.
  static torch::Tensor key_padding_mask(const torch::Tensor& attention_mask, int64_t extra = 0) {
    if (!attention_mask.defined()) return {};
    auto padding = attention_mask.eq(0);
    if (extra == 0) return padding;
    return torch::cat({torch::zeros({padding.size(0), extra}, padding.options()), padding}, 1);
  }

  /// BERT's pooled output: tanh(dense(hidden[:, 0])), from a last hidden state [N, L, H].
  torch::Tensor pool(const torch::Tensor& hidden) {
    return torch::tanh(pooler(hidden.select(1, 0)));
  }

  /// Positions the active prompts add in front of the sequence.
  int64_t prompt_length() {
    auto rows = prompt->prompt_rows();
    return rows.defined() ? rows.size(0) : 0;
  }

  /// Key/value rows the active prefixes put in front of the first layer's attention.
  int64_t prefix_length() {
    if (encoder->layers->size() == 0) return 0;
    auto rows = encoder->layer(0)->self_attn->prefix->prefix_rows();
    return rows.first.defined() ? rows.first.size(0) : 0;
  }

  const BertConfig& config() const { return config_; }

  /// Hugging Face BertModel's name for one of our modules: the encoder's layers and their
  /// projections ("encoder.layers.3.self_attn.query" -> "encoder.layer.3.attention.self.query");
  /// other paths unchanged. Adapter files use these names (Python's PEFT expects them).
  std::string hub_module_path(const std::string& path) const override {
    const std::string layers = "encoder.layers.";
    if (path.compare(0, layers.size(), layers) != 0) return path;
    const size_t dot = path.find('.', layers.size());
    if (dot == std::string::npos) return path;
    static const std::map<std::string, std::string> names = {
        {"self_attn.query", "attention.self.query"},
        {"self_attn.key", "attention.self.key"},
        {"self_attn.value", "attention.self.value"},
        {"self_attn.out_proj", "attention.output.dense"},
        {"linear1", "intermediate.dense"},
        {"linear2", "output.dense"}};
    auto it = names.find(path.substr(dot + 1));
    if (it == names.end()) return path;
    return "encoder.layer." + path.substr(layers.size(), dot - layers.size()) + "." + it->second;
  }
  std::string hub_name_or_path() const override { return config_.name_or_path; }
  int64_t hub_attention_heads() const override { return config_.num_attention_heads; }

  /// The stock layer i (its typed members hold the frozen weights).
  torch::nn::TransformerEncoderLayer encoder_layer(size_t i) {
    return torch::nn::TransformerEncoderLayer(
        encoder->base->layers->ptr<torch::nn::TransformerEncoderLayerImpl>(i));
  }

  /// Hugging Face tensor names (without the "bert." prefix) and the tensors they load into.
  std::vector<std::pair<std::string, torch::Tensor>> weight_map() {
    std::vector<std::pair<std::string, torch::Tensor>> out;
    const int64_t H = config_.hidden_size;
    out.emplace_back("embeddings.word_embeddings.weight", word_embeddings->weight);
    out.emplace_back("embeddings.position_embeddings.weight", position_embeddings->weight);
    out.emplace_back("embeddings.token_type_embeddings.weight", token_type_embeddings->weight);
    out.emplace_back("embeddings.LayerNorm.weight", embeddings_norm->weight);
    out.emplace_back("embeddings.LayerNorm.bias", embeddings_norm->bias);
    for (int64_t i = 0; i < config_.num_hidden_layers; ++i) {
      auto l = encoder_layer(static_cast<size_t>(i));
      const std::string p = "encoder.layer." + std::to_string(i) + ".";
      const char* qkv[] = {"query", "key", "value"};
      for (int64_t j = 0; j < 3; ++j) {
        out.emplace_back(p + "attention.self." + qkv[j] + ".weight",
                         l->self_attn->in_proj_weight.narrow(0, j * H, H));
        out.emplace_back(p + "attention.self." + qkv[j] + ".bias",
                         l->self_attn->in_proj_bias.narrow(0, j * H, H));
      }
      out.emplace_back(p + "attention.output.dense.weight", l->self_attn->out_proj->weight);
      out.emplace_back(p + "attention.output.dense.bias", l->self_attn->out_proj->bias);
      out.emplace_back(p + "attention.output.LayerNorm.weight", l->norm1->weight);
      out.emplace_back(p + "attention.output.LayerNorm.bias", l->norm1->bias);
      out.emplace_back(p + "intermediate.dense.weight", l->linear1->weight);
      out.emplace_back(p + "intermediate.dense.bias", l->linear1->bias);
      out.emplace_back(p + "output.dense.weight", l->linear2->weight);
      out.emplace_back(p + "output.dense.bias", l->linear2->bias);
      out.emplace_back(p + "output.LayerNorm.weight", l->norm2->weight);
      out.emplace_back(p + "output.LayerNorm.bias", l->norm2->bias);
    }
    out.emplace_back("pooler.dense.weight", pooler->weight);
    out.emplace_back("pooler.dense.bias", pooler->bias);
    return out;
  }

  torch::nn::Embedding word_embeddings{nullptr}, position_embeddings{nullptr},
      token_type_embeddings{nullptr};
  torch::nn::LayerNorm embeddings_norm{nullptr};
  torch::nn::Dropout embeddings_dropout{nullptr};
  peft::nn::TransformerEncoder encoder{nullptr};
  torch::nn::Linear pooler{nullptr};
  Site prompt{nullptr};

 private:
  /// Checks input_ids [N, L] and an optional tensor of its shape.
  static void check_inputs(const torch::Tensor& input_ids, const torch::Tensor& t,
                           const char* name) {
    check(input_ids.dim() == 2, "models::bert", "input_ids has shape {}, expected [N, L]",
          peft::detail::shape(input_ids.sizes()));
    check(!t.defined() || t.sizes() == input_ids.sizes(), "models::bert",
          "{} has shape {}, expected {} like input_ids", name, peft::detail::shape(t.sizes()),
          peft::detail::shape(input_ids.sizes()));
  }

  BertConfig config_;
};

/// Module holder of BertImpl, with from_pretrained():
///
///     auto bert = peft::models::Bert::from_pretrained("models/all-MiniLM-L6-v2");
///     auto hidden = bert(batch.input_ids, batch.attention_mask, batch.token_type_ids);
class Bert : public torch::nn::ModuleHolder<BertImpl> {
 public:
  using torch::nn::ModuleHolder<BertImpl>::ModuleHolder;
  using torch::nn::ModuleHolder<BertImpl>::get;

  /// Loads a Hugging Face folder (config.json + model.safetensors), its config edited by
  /// `adjust` if given; see BertImpl::from_pretrained.
  static Bert from_pretrained(const std::filesystem::path& folder,
                              const ConfigAdjust& adjust = nullptr) {
    return Bert(BertImpl::from_pretrained(folder, adjust));
  }
};

}  // namespace models
PEFT_NAMESPACE_END
