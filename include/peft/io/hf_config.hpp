#pragma once

// Reading Hugging Face model configurations (config.json) into typed options.

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <string>

#include <nlohmann/json.hpp>

#include <peft/config.hpp>
#include <peft/core/error.hpp>
#include <peft/detail/json.hpp>

PEFT_NAMESPACE_BEGIN
namespace io {

/// Parses the JSON file at `path`. Throws peft::Error naming the file (and, for a syntax error,
/// the byte where parsing stopped) when it cannot be read or is not JSON.
inline nlohmann::json read_json(const std::filesystem::path& path, const char* where = "io") {
  std::ifstream in(path, std::ios::binary);
  check(static_cast<bool>(in), where, "cannot open {}", path.string());
  try {
    return nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    fail(where, "{} is not valid JSON: {}", path.string(), e.what());
  }
}

}  // namespace io

namespace models {

/// The architecture of a BERT or RoBERTa encoder, as Hugging Face's config.json describes it.
struct BertConfig {
  std::string model_type = "bert";  ///< "bert" or "roberta"
  int64_t vocab_size = 30522;
  int64_t hidden_size = 768;
  int64_t num_hidden_layers = 12;
  int64_t num_attention_heads = 12;
  int64_t intermediate_size = 3072;
  std::string hidden_act = "gelu";
  double hidden_dropout_prob = 0.1;
  double attention_probs_dropout_prob = 0.1;
  /// Dropout in front of a classification head; negative (config null or absent): the head uses
  /// hidden_dropout_prob, as Hugging Face's BertForSequenceClassification does.
  double classifier_dropout = -1.0;
  int64_t max_position_embeddings = 512;
  int64_t type_vocab_size = 2;
  double layer_norm_eps = 1e-12;
  int64_t pad_token_id = 0;
  /// Where the name came from (the config file), for error messages and adapter files.
  std::string name_or_path;

  /// The dropout of a classification head's input (classifier_dropout, else hidden_dropout_prob).
  double head_dropout() const {
    return classifier_dropout >= 0 ? classifier_dropout : hidden_dropout_prob;
  }

  /// Whether position ids follow RoBERTa's scheme (counting from pad_token_id + 1, skipping pads).
  bool roberta() const { return model_type == "roberta" || model_type == "xlm-roberta"; }

  /// Checks that the numbers describe a model peft can build; throws peft::Error otherwise.
  void validate(const std::string& source = "config") const {
    auto positive = [&](int64_t value, const char* name) {
      check(value > 0, "models::bert", "{}: {} must be positive, got {}", source, name, value);
    };
    positive(vocab_size, "vocab_size");
    positive(hidden_size, "hidden_size");
    positive(num_hidden_layers, "num_hidden_layers");
    positive(num_attention_heads, "num_attention_heads");
    positive(intermediate_size, "intermediate_size");
    positive(max_position_embeddings, "max_position_embeddings");
    positive(type_vocab_size, "type_vocab_size");
    check(hidden_size % num_attention_heads == 0, "models::bert",
          "{}: hidden_size {} is not divisible by num_attention_heads {}", source, hidden_size,
          num_attention_heads);
    check(hidden_act == "gelu", "models::bert",
          "{}: hidden_act \"{}\" is not supported (only \"gelu\", the exact erf form)", source,
          hidden_act);
    check(model_type == "bert" || roberta(), "models::bert",
          "{}: model_type \"{}\" is not supported (expected bert or roberta)", source, model_type);
    check(layer_norm_eps > 0, "models::bert", "{}: layer_norm_eps must be positive, got {}", source,
          layer_norm_eps);
    check(hidden_dropout_prob >= 0 && hidden_dropout_prob < 1, "models::bert",
          "{}: hidden_dropout_prob must be in [0, 1), got {}", source, hidden_dropout_prob);
    check(attention_probs_dropout_prob >= 0 && attention_probs_dropout_prob < 1, "models::bert",
          "{}: attention_probs_dropout_prob must be in [0, 1), got {}", source,
          attention_probs_dropout_prob);
    check(classifier_dropout < 1, "models::bert", "{}: classifier_dropout must be below 1, got {}",
          source, classifier_dropout);
    check(pad_token_id >= 0 && pad_token_id < vocab_size, "models::bert",
          "{}: pad_token_id {} is outside the vocabulary of {}", source, pad_token_id, vocab_size);
  }

  /// Reads a parsed config.json; absent keys keep BERT-base defaults. `source` names the file in
  /// error messages.
  static BertConfig from_json(const nlohmann::json& j, const std::string& source = "config") {
    check(j.is_object(), "models::bert", "{}: expected a JSON object", source);
    BertConfig c;
    auto get = [&](const char* key, auto& out) {
      peft::detail::config_read(j, key, out, source, "models::bert");
    };
    get("model_type", c.model_type);
    get("vocab_size", c.vocab_size);
    get("hidden_size", c.hidden_size);
    get("num_hidden_layers", c.num_hidden_layers);
    get("num_attention_heads", c.num_attention_heads);
    get("intermediate_size", c.intermediate_size);
    get("hidden_act", c.hidden_act);
    get("hidden_dropout_prob", c.hidden_dropout_prob);
    get("attention_probs_dropout_prob", c.attention_probs_dropout_prob);
    get("classifier_dropout", c.classifier_dropout);
    get("max_position_embeddings", c.max_position_embeddings);
    get("type_vocab_size", c.type_vocab_size);
    get("layer_norm_eps", c.layer_norm_eps);
    get("pad_token_id", c.pad_token_id);
    std::string embedding_type = "absolute";
    get("position_embedding_type", embedding_type);
    check(embedding_type == "absolute", "models::bert",
          "{}: position_embedding_type \"{}\" is not supported (only \"absolute\")", source,
          embedding_type);
    c.name_or_path = source;
    c.validate(source);
    return c;
  }

  /// Reads `path` (a config.json).
  static BertConfig from_file(const std::filesystem::path& path) {
    return from_json(io::read_json(path, "models::bert"), path.string());
  }
};

}  // namespace models
PEFT_NAMESPACE_END
