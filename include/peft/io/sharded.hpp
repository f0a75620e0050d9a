#pragma once

// A Hugging Face checkpoint's weights, stored as one `model.safetensors` or split into shards
// that `model.safetensors.index.json` lists (`{"metadata": {...}, "weight_map": {tensor: shard
// file}}`, what transformers' save_pretrained writes past max_shard_size), read through one
// interface. The model loaders take either.
//
//     io::SafetensorsCheckpoint weights(io::SafetensorsCheckpoint::find(folder, "models::bert"));
//     weights.copy_to("embeddings.word_embeddings.weight", target);

#include <ATen/ATen.h>

#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include <peft/config.hpp>
#include <peft/core/error.hpp>
#include <peft/io/hf_config.hpp>
#include <peft/io/safetensors.hpp>

PEFT_NAMESPACE_BEGIN
namespace io {

class SafetensorsCheckpoint {
 public:
  /// The weights file of a model folder: `model.safetensors`, else
  /// `model.safetensors.index.json`. Throws from `where`, naming the folder, when it has
  /// neither (and saying so when it holds only PyTorch's pickled `pytorch_model.bin`).
  static std::filesystem::path find(const std::filesystem::path& folder, const char* where) {
    namespace fs = std::filesystem;
    // error_code overloads: a path the system refuses (too long, a loop) is "not there", not a
    // std::filesystem_error.
    std::error_code ec;
    for (const char* name : {"model.safetensors", "model.safetensors.index.json"}) {
      if (fs::exists(folder / name, ec)) return folder / name;
    }
    for (const char* name : {"pytorch_model.bin", "pytorch_model.bin.index.json"}) {
      check(!fs::exists(folder / name, ec), where,
            "{} has only {}; peft reads safetensors only (convert it with "
            "safetensors.torch.save_file or save_pretrained(safe_serialization=True))",
            folder.string(), name);
    }
    fail(where, "{}: no model.safetensors or model.safetensors.index.json", folder.string());
  }

  /// `path`: a `.safetensors` file, or an index (`*.json`) whose shards sit in its folder. Every
  /// shard is opened (and its header checked) here; a malformed index, a shard named with a
  /// folder, a missing shard, or an index entry the shard does not hold throws naming the files.
  explicit SafetensorsCheckpoint(const std::filesystem::path& path) : path_(path.string()) {
    if (path.extension() != ".json") {
      auto file = std::make_shared<SafetensorsFile>(path);
      for (const auto& name : file->names()) files_[name] = file;
      return;
    }
    const auto index = read_json(path, "io");
    const auto map = index.find("weight_map");
    check(index.is_object() && map != index.end() && map->is_object() && !map->empty(), "io",
          "{}: expected an object with a non-empty \"weight_map\" (tensor name -> shard file)",
          path_);
    std::map<std::string, std::shared_ptr<SafetensorsFile>> shards;
    for (const auto& [tensor, shard] : map->items()) {
      check(shard.is_string(), "io", "{}: \"weight_map\"[\"{}\"] is {}, not a file name", path_,
            tensor, shard.dump());
      const auto name = shard.get<std::string>();
      const std::filesystem::path shard_path(name);
      check(!name.empty() && shard_path.filename() == shard_path && name != "." && name != "..",
            "io", "{}: shard \"{}\" (for \"{}\") must be a file name in the index's folder", path_,
            name, tensor);
      auto& file = shards[name];
      if (!file) {
        const auto full = path.parent_path() / shard_path;
        std::error_code ec;
        check(std::filesystem::is_regular_file(full, ec), "io", "{}: shard {} (for \"{}\") {}",
              path_, full.string(), tensor,
              ec ? "cannot be opened: " + ec.message() : std::string("not found or not a file"));
        file = std::make_shared<SafetensorsFile>(full);
      }
      check(file->contains(tensor), "io", "{}: the index puts \"{}\" in {}, which does not hold it",
            path_, tensor, file->path());
      files_[tensor] = file;
    }
  }

  /// The file or index this was opened from.
  const std::string& path() const { return path_; }
  /// Every tensor name (for an index: those its weight_map lists).
  std::vector<std::string> names() const {
    std::vector<std::string> out;
    out.reserve(files_.size());
    for (const auto& item : files_) out.push_back(item.first);
    return out;
  }
  bool contains(const std::string& name) const { return files_.count(name) != 0; }
  /// The file that holds tensor `name`; throws naming the checkpoint when none does.
  const SafetensorsFile& file_of(const std::string& name) const {
    const auto it = files_.find(name);
    check(it != files_.end(), "io", "{}: no tensor \"{}\"", path_, name);
    return *it->second;
  }
  const SafetensorsEntry& entry(const std::string& name) const { return file_of(name).entry(name); }
  at::ScalarType dtype(const std::string& name) const { return entry(name).dtype; }
  const std::vector<int64_t>& shape(const std::string& name) const { return entry(name).shape; }
  /// SafetensorsFile::copy_to on the shard that holds `name`.
  void copy_to(const std::string& name, at::Tensor target) const {
    file_of(name).copy_to(name, std::move(target));
  }

 private:
  std::string path_;
  std::map<std::string, std::shared_ptr<SafetensorsFile>> files_;
};

}  // namespace io
PEFT_NAMESPACE_END
