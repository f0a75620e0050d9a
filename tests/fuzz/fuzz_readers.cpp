// libFuzzer targets for every reader of files other people make.
//
// One binary holds them all (one translation unit with LibTorch's headers costs ~15 s to
// compile); PEFT_FUZZ_TARGET picks the reader:
//
//   safetensors  bytes as a .safetensors file: header parsed, every tensor loaded
//   gguf         bytes as a .gguf file: header, metadata and tensor table parsed, every tensor
//                dequantised, the tokenizer in the metadata built and run
//   config       bytes as a model folder's config.json (BERT)
//   adapter      a LoRA adapter folder of which one file is the bytes (the first byte picks
//                adapter_config.json or adapter_model.safetensors; the other is a valid one):
//                loaded into a tiny BERT, which must be left exactly as it was when loading fails
//   tokenizer    bytes as vocab.txt, tokenizer.json or tokenizer_config.json beside a valid
//                vocab (the first byte picks), then the tokenizer encodes two sentences
//   glue, clue   bytes as a data file of the task the first byte picks, with or without labels
//                (TSV or JSON lines)
//   checkpoint   a training checkpoint folder of which one file is the bytes (the first byte
//                picks which; with its high bit set the checkpoint has AdamW's optimizer.pt):
//                loaded into a tiny BERT with LoRA (and a fresh AdamW), which, with the random
//                generator and the optimizer, must be left exactly as it was when loading
//                fails; an optimizer that loaded must then take a step
//   sharded      bytes as a sharded checkpoint's model.safetensors.index.json beside two valid
//                shards: opened, then every tensor it lists copied out as float32
//
// A reader must return or throw peft::Error: any other exception, a crash, a sanitizer report,
// a hang (-timeout) or an allocation beyond -malloc_limit_mb is a finding. scripts/fuzz.sh runs
// the targets; docs/HARDENING.md has what they found. Two more variables serve the tests:
// PEFT_FUZZ_WRITE_SEEDS=DIR writes the seeds only peft's writers make (and, with
// PEFT_FUZZ_DATA=tests/data, the GLUE/CLUE samples) and exits; PEFT_FUZZ_EXPECT_VALID makes a
// peft::Error a failure too (fuzz.seeds: the valid inputs are read).

#include <peft/core/attach.hpp>
#include <peft/core/error.hpp>
#include <peft/core/parameters.hpp>
#include <peft/data/clue.hpp>
#include <peft/data/glue.hpp>
#include <peft/io/adapter_format.hpp>
#include <peft/io/gguf.hpp>
#include <peft/io/hf_config.hpp>
#include <peft/io/safetensors.hpp>
#include <peft/io/sharded.hpp>
#include <peft/methods/lora.hpp>
#include <peft/models/bert.hpp>
#include <peft/models/heads.hpp>
#include <peft/text/gguf_tokenizer.hpp>
#include <peft/text/load.hpp>
#include <peft/train/checkpoint.hpp>

#include "../model_helpers.hpp"

#include <torch/torch.h>

#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

namespace fs = std::filesystem;

namespace {

// A folder of this process under /dev/shm (memory, fast) or the temporary directory.
const fs::path& work_dir() {
  static const fs::path dir = [] {
    fs::path base = fs::is_directory("/dev/shm") ? fs::path("/dev/shm") : fs::temp_directory_path();
    auto d = base / ("peft_fuzz_" + std::to_string(::getpid()));
    fs::remove_all(d);
    fs::create_directories(d);
    std::atexit([] { fs::remove_all(work_dir()); });
    return d;
  }();
  return dir;
}

void write(const fs::path& path, std::string_view bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  if (!out) {
    std::fprintf(stderr, "fuzz: cannot write %s\n", path.c_str());
    std::abort();
  }
}

std::string slurp(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

// A fresh empty folder for one input.
fs::path fresh(const std::string& name) {
  auto d = work_dir() / name;
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

// ---- targets ----------------------------------------------------------------------------------

void fuzz_safetensors(std::string_view bytes) {
  const auto path = work_dir() / "input.safetensors";
  write(path, bytes);
  const peft::io::SafetensorsFile file(path);
  for (const auto& entry : file.entries()) (void)file.tensor(entry.name).sum();
}

// The two shards a fuzzed model.safetensors.index.json may name: valid files, written once.
const fs::path& shard_dir() {
  static const fs::path dir = [] {
    auto d = work_dir() / "sharded";
    fs::create_directories(d);
    peft::io::save_safetensors(d / "model-00001-of-00002.safetensors",
                               {{"a", torch::arange(6, torch::kFloat).view({2, 3})},
                                {"b", torch::ones({4}, torch::kHalf)}},
                               {{"format", "pt"}});
    peft::io::save_safetensors(d / "model-00002-of-00002.safetensors",
                               {{"c", torch::arange(3, torch::kLong)}}, {{"format", "pt"}});
    return d;
  }();
  return dir;
}

// A sharded checkpoint's index (its shards valid): opened, then every tensor it lists copied out.
void fuzz_sharded(std::string_view bytes) {
  const auto index = shard_dir() / "model.safetensors.index.json";
  write(index, bytes);
  const peft::io::SafetensorsCheckpoint weights(index);
  for (const auto& name : weights.names()) {
    auto target = torch::empty(weights.shape(name), torch::kFloat);
    weights.copy_to(name, target);
  }
}

void fuzz_gguf(std::string_view bytes) {
  const auto path = work_dir() / "input.gguf";
  write(path, bytes);
  const peft::io::GgufFile gguf(path);
  for (const auto& info : gguf.tensors()) (void)gguf.tensor(info.name).sum();
  if (gguf.has("tokenizer.ggml.tokens")) {
    const auto tok = peft::text::bpe_from_gguf(gguf);
    (void)tok.encode_ids("Hello, world! 你好 \xF0\x9F\x98\x80");
  }
}

void fuzz_config(std::string_view bytes) {
  const auto dir = fresh("config");
  write(dir / "config.json", bytes);
  (void)peft::models::BertConfig::from_file(dir / "config.json");
}

// The same random tiny BERT with a head of 3 labels every call.
peft::models::BertForSequenceClassification tiny_model() {
  torch::manual_seed(7);
  auto model = peft::models::BertForSequenceClassification(
      peft::models::Bert(testing::tiny_bert_config(2)), 3);
  model->eval();
  return model;
}

peft::models::BertForSequenceClassification tiny_lora_model() {
  auto model = tiny_model();
  peft::attach(*model, peft::LoRAOptions(2).alpha(4).targets({"query", "value"}));
  return model;
}

// Every tensor of the model (parameters and buffers) by name, copied.
std::map<std::string, torch::Tensor> snapshot(torch::nn::Module& model) {
  std::map<std::string, torch::Tensor> out;
  for (const auto& p : model.named_parameters()) out[p.key()] = p.value().detach().clone();
  for (const auto& b : model.named_buffers()) out[b.key()] = b.value().detach().clone();
  return out;
}

// Aborts unless `model`'s tensors equal `before` (a failed load must leave it as it was).
void check_unchanged(torch::nn::Module& model, const std::map<std::string, torch::Tensor>& before,
                     const char* what) {
  const auto after = snapshot(model);
  bool same = after.size() == before.size();
  for (const auto& [name, t] : before) {
    const auto it = after.find(name);
    if (it == after.end() || !torch::equal(it->second, t)) {
      std::fprintf(stderr, "fuzz: a failed %s changed %s\n", what, name.c_str());
      same = false;
    }
  }
  if (!same) std::abort();
}

void fuzz_adapter(std::string_view bytes) {
  // A valid adapter, saved once, provides the file that is not fuzzed.
  static const auto valid = [] {
    auto model = tiny_lora_model();
    torch::NoGradGuard no_grad;
    for (auto& p : peft::trainable_parameters(*model)) p.normal_(0.0, 0.3);
    const auto dir = work_dir() / "valid_adapter";
    peft::save_adapter(*model, dir);
    return std::make_pair(slurp(dir / "adapter_config.json"),
                          slurp(dir / "adapter_model.safetensors"));
  }();
  if (bytes.empty()) return;
  const bool fuzz_config_file = (static_cast<unsigned char>(bytes[0]) & 1) == 0;
  bytes.remove_prefix(1);
  const auto dir = fresh("adapter");
  write(dir / "adapter_config.json", fuzz_config_file ? bytes : std::string_view(valid.first));
  write(dir / "adapter_model.safetensors",
        fuzz_config_file ? std::string_view(valid.second) : bytes);

  // load_adapter attaches the method itself, into the bare model.
  auto model = tiny_model();
  const auto before = snapshot(*model);
  try {
    peft::load_adapter(*model, dir);
  } catch (const peft::Error&) {
    check_unchanged(*model, before, "load_adapter");
    throw;
  }
}

void fuzz_tokenizer(std::string_view bytes) {
  if (bytes.empty()) return;
  const int which = static_cast<unsigned char>(bytes[0]) % 3;
  bytes.remove_prefix(1);
  const auto dir = fresh("tokenizer");
  if (which == 0) {
    write(dir / "vocab.txt", bytes);
  } else if (which == 1) {
    write(dir / "tokenizer.json", bytes);
  } else {
    write(dir / "vocab.txt", "[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nhello\nworld\n##s\n,\n!\n");
    write(dir / "tokenizer_config.json", bytes);
  }
  const auto tok = peft::text::load_tokenizer(dir);
  (void)tok->encode_batch({"Hello, worlds! Ünïcödé 你好", "a\tb  c"});
}

// The first byte picks the task (its low 7 bits) and whether the file has labels (its high bit
// clear; set for test files).
template <class ReadFile>
void fuzz_task_file(std::string_view bytes, const std::vector<std::string>& tasks, const char* name,
                    ReadFile read_file) {
  if (bytes.empty()) return;
  const auto selector = static_cast<unsigned char>(bytes[0]);
  const auto& task = tasks[(selector & 0x7f) % tasks.size()];
  bytes.remove_prefix(1);
  const auto path = work_dir() / (std::string(name) + "_input.txt");
  write(path, bytes);
  (void)read_file(task, path, peft::data::ReadOptions().labeled((selector & 0x80) == 0));
}

// AdamW over the trainable parameters of `model`, as the Trainer makes it.
torch::optim::AdamW tiny_optimizer(torch::nn::Module& model) {
  return torch::optim::AdamW(peft::trainable_parameters(model),
                             torch::optim::AdamWOptions(1e-3).weight_decay(0.01));
}

// One optimizer step on a fixed batch; a state that does not fit its parameter throws here.
void take_step(peft::models::BertForSequenceClassification& model, torch::optim::AdamW& optimizer) {
  optimizer.zero_grad();
  const auto ids = torch::tensor({{2, 5, 7, 3}}, torch::kLong);
  model->forward(ids, torch::ones_like(ids)).sum().backward();
  optimizer.step();
}

// A valid checkpoint folder of tiny_lora_model(), saved once, without and with AdamW's state
// after one step: file name -> bytes.
const std::map<std::string, std::string>& valid_checkpoint(bool with_optimizer) {
  auto make = [](bool optimizer) {
    auto model = tiny_lora_model();
    {
      torch::NoGradGuard no_grad;
      for (auto& p : peft::trainable_parameters(*model)) p.normal_(0.0, 0.3);
    }
    auto adamw = tiny_optimizer(*model);
    if (optimizer) take_step(model, adamw);
    peft::TrainingState state;
    state.global_step = 3;
    state.total_steps = 10;
    state.batches_per_epoch = 5;
    state.last_metrics["accuracy"] = 0.5;
    const auto dir = work_dir() / (optimizer ? "valid_checkpoint_adamw" : "valid_checkpoint");
    peft::save_checkpoint(dir, *model, optimizer ? &adamw : nullptr, state);
    std::map<std::string, std::string> out;
    for (const auto& entry : fs::directory_iterator(dir)) {
      out[entry.path().filename().string()] = slurp(entry.path());
    }
    return out;
  };
  static const auto plain = make(false);
  static const auto adamw = make(true);
  return with_optimizer ? adamw : plain;
}

// The optimizer's state as bytes (its archive), to compare before and after.
std::string optimizer_bytes(const torch::optim::Optimizer& optimizer) {
  torch::serialize::OutputArchive archive;
  optimizer.save(archive);
  std::ostringstream out;
  archive.save_to(out);
  return out.str();
}

void fuzz_checkpoint(std::string_view bytes) {
  if (bytes.empty()) return;
  // The first byte: its high bit picks the checkpoint with an optimizer, the rest the file
  // replaced by the rest of the input.
  const auto selector = static_cast<unsigned char>(bytes[0]);
  const bool with_optimizer = (selector & 0x80) != 0;
  const auto& valid = valid_checkpoint(with_optimizer);
  auto fuzzed = valid.begin();
  std::advance(fuzzed, (selector & 0x7f) % valid.size());
  bytes.remove_prefix(1);
  const auto dir = fresh("checkpoint");
  for (const auto& [name, content] : valid) {
    write(dir / name, name == fuzzed->first ? bytes : std::string_view(content));
  }
  auto model = tiny_lora_model();
  auto adamw = tiny_optimizer(*model);
  const auto before = snapshot(*model);
  const auto optimizer_before = optimizer_bytes(adamw);
  const auto rng_before = at::detail::getDefaultCPUGenerator().get_state();
  try {
    (void)peft::load_checkpoint(dir, *model, with_optimizer ? &adamw : nullptr,
                                /*restore_rng=*/true);
  } catch (const peft::Error&) {
    check_unchanged(*model, before, "load_checkpoint");
    if (!torch::equal(at::detail::getDefaultCPUGenerator().get_state(), rng_before)) {
      std::fprintf(stderr, "fuzz: a failed load_checkpoint changed the generator state\n");
      std::abort();
    }
    if (optimizer_bytes(adamw) != optimizer_before) {
      std::fprintf(stderr, "fuzz: a failed load_checkpoint changed the optimizer\n");
      std::abort();
    }
    throw;
  }
  // What loaded must train: a state that does not fit its parameter would throw c10::Error here
  // (a finding: load_checkpoint must refuse it).
  if (with_optimizer) take_step(model, adamw);
}

// Seeds that only peft's own writers make: written under `dir`/<target>/ for the targets
// safetensors, adapter, checkpoint and sharded (scripts/fuzz.sh adds real files for the others).
void write_seeds(const fs::path& dir) {
  for (const char* t : {"safetensors", "adapter", "checkpoint", "sharded"}) {
    fs::create_directories(dir / t);
  }
  write(
      dir / "sharded" / "index",
      R"({"metadata": {"total_size": 56}, "weight_map": {"a": "model-00001-of-00002.safetensors",)"
      R"( "b": "model-00001-of-00002.safetensors", "c": "model-00002-of-00002.safetensors"}})");
  const auto adapter = work_dir() / "seed_adapter";
  {
    auto model = tiny_lora_model();
    peft::save_adapter(*model, adapter);
  }
  const auto config = slurp(adapter / "adapter_config.json");
  const auto tensors = slurp(adapter / "adapter_model.safetensors");
  write(dir / "safetensors" / "lora_adapter", tensors);
  peft::io::save_safetensors(dir / "safetensors" / "dtypes",
                             {{"f32", torch::arange(6, torch::kFloat).view({2, 3})},
                              {"f16", torch::ones({3}, torch::kHalf)},
                              {"bf16", torch::ones({2, 1}, torch::kBFloat16)},
                              {"i64", torch::arange(4, torch::kLong)},
                              {"empty", torch::zeros({0, 4}, torch::kFloat)}},
                             {{"format", "pt"}});
  write(dir / "adapter" / "config", std::string(1, '\0') + config);
  write(dir / "adapter" / "tensors", std::string(1, '\1') + tensors);
  for (const bool optimizer : {false, true}) {
    int i = optimizer ? 0x80 : 0;
    for (const auto& [name, content] : valid_checkpoint(optimizer)) {
      write(dir / "checkpoint" / ((optimizer ? "adamw_" : "") + name),
            std::string(1, static_cast<char>(i++)) + content);
    }
  }
  // The test suite's GLUE and CLUE samples, each behind the byte that picks its task.
  const char* data = std::getenv("PEFT_FUZZ_DATA");
  if (data == nullptr) return;
  const auto task_seeds = [&](const std::string& target, const std::vector<std::string>& tasks,
                              const std::function<std::string(const std::string&)>& folder) {
    fs::create_directories(dir / target);
    for (size_t t = 0; t < tasks.size(); ++t) {
      const auto from = fs::path(data) / target / folder(tasks[t]);
      if (!fs::is_directory(from)) continue;
      for (const auto& e : fs::directory_iterator(from)) {
        // Test files have no labels.
        const bool labeled = e.path().filename().string().rfind("test", 0) != 0;
        write(dir / target / (tasks[t] + "_" + e.path().filename().string()),
              std::string(1, static_cast<char>(t | (labeled ? 0 : 0x80))) + slurp(e.path()));
      }
    }
  };
  task_seeds("glue", peft::data::glue::task_names(),
             [](const std::string& t) { return peft::data::glue::folder_name(t); });
  task_seeds("clue", peft::data::clue::task_names(), [](const std::string& t) { return t; });
}

using Target = std::function<void(std::string_view)>;

const Target& selected_target() {
  static const Target target = []() -> Target {
    const char* env = std::getenv("PEFT_FUZZ_TARGET");
    const std::string name = env ? env : "";
    static const std::map<std::string, Target> targets = {
        {"safetensors", fuzz_safetensors},
        {"gguf", fuzz_gguf},
        {"config", fuzz_config},
        {"adapter", fuzz_adapter},
        {"tokenizer", fuzz_tokenizer},
        {"glue",
         [](std::string_view b) {
           fuzz_task_file(
               b, peft::data::glue::task_names(), "glue",
               [](const std::string& t, const fs::path& p, const peft::data::ReadOptions& o) {
                 return peft::data::glue::read_file(t, p, o);
               });
         }},
        {"clue",
         [](std::string_view b) {
           fuzz_task_file(
               b, peft::data::clue::task_names(), "clue",
               [](const std::string& t, const fs::path& p, const peft::data::ReadOptions& o) {
                 return peft::data::clue::read_file(t, p, o);
               });
         }},
        {"checkpoint", fuzz_checkpoint},
        {"sharded", fuzz_sharded},
    };
    const auto it = targets.find(name);
    if (it == targets.end()) {
      std::string names;
      for (const auto& [k, v] : targets) names += (names.empty() ? "" : ", ") + k;
      std::fprintf(stderr, "fuzz: set PEFT_FUZZ_TARGET to one of: %s (got \"%s\")\n", names.c_str(),
                   name.c_str());
      std::exit(2);
    }
    return it->second;
  }();
  return target;
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  torch::set_num_threads(1);
  if (const char* seeds = std::getenv("PEFT_FUZZ_WRITE_SEEDS")) {
    write_seeds(seeds);
    std::exit(0);
  }
  (void)selected_target();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view bytes(reinterpret_cast<const char*>(data), size);
  try {
    selected_target()(bytes);
  } catch (const peft::Error& e) {
    // The expected way to reject bad input, except where the input is known to be valid.
    if (std::getenv("PEFT_FUZZ_EXPECT_VALID") != nullptr) {
      std::fprintf(stderr, "fuzz: a valid input was rejected: %s\n", e.what());
      std::abort();
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "fuzz: %s threw a %s that is not a peft::Error: %s\n",
                 std::getenv("PEFT_FUZZ_TARGET"), typeid(e).name(), e.what());
    std::abort();
  }
  return 0;
}
