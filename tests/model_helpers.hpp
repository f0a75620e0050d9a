#pragma once
// Shared fixtures for the model tests: a tiny BERT config and a temporary folder.

#include <peft/models/bert.hpp>

#include <unistd.h>

#include <cstdint>
#include <filesystem>
#include <string>

namespace testing {

/// A BERT small enough to build in a test: hidden 8, 2 heads, FFN 16, 30 tokens, 32 positions,
/// named "tiny-bert".
inline peft::models::BertConfig tiny_bert_config(int64_t layers) {
  peft::models::BertConfig c;
  c.hidden_size = 8;
  c.num_hidden_layers = layers;
  c.num_attention_heads = 2;
  c.intermediate_size = 16;
  c.vocab_size = 30;
  c.max_position_embeddings = 32;
  c.name_or_path = "tiny-bert";
  return c;
}

/// A folder under the system's temporary directory, unique per process and object, removed
/// (with everything in it) when the object goes; created at once when `create` is set.
struct TempDir {
  std::filesystem::path path;
  explicit TempDir(const std::string& prefix = "peft_test", bool create = false) {
    static int counter = 0;
    path = std::filesystem::temp_directory_path() /
           (prefix + "_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    std::filesystem::remove_all(path);
    if (create) std::filesystem::create_directories(path);
  }
  ~TempDir() { std::filesystem::remove_all(path); }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
};

}  // namespace testing
