// peft-bench: the cost of one training step (forward, backward, AdamW) per fine-tuning method on a
// real pretrained BERT, and of inference with a merged LoRA. One method per process, so each
// process's peak memory belongs to one method; --all re-runs this program once per method.
//
//   peft-bench                         every training method, batch 32, sequence 128
//   peft-bench --method lora --batch 8 --seq 64 --steps 10 --warmup 3
//
// Prints one JSON line per method:
//   {"method":"lora","mode":"train","device":"cpu","precision":"fp32","batch":32,"seq":128,"step_ms":...,"peak_mb":...,
//    "base_mb":...,"trainable_params":...,"stored_bytes":...,"first_loss":...}
// step_ms is the median over the timed steps; peak_mb is the process's peak RSS (ru_maxrss) on
// CPU or the CUDA allocator's peak on a GPU; base_mb is the RSS (or allocated CUDA memory) once
// the model is ready, before the first step. stored_bytes is what the method saves: the adapter
// folder save_adapter writes (lst and lst-t5 — LST with the paper's T5 side blocks — included);
// for full the trainable tensors; for propetl the library's
// bit-packed storage (prototype + one bit per mask entry), with "layers", "sites" and
// "unshared_bytes" (the same adapter in every layer without sharing) added to its line, so
// stored_bytes / unshared_bytes can be checked against 1/layers + 1/32. Dropout is off (eval mode)
// so runs are deterministic and comparable with bench/hf_step.py. Training steps use
// peft::AdamW (fused kernel where LibTorch has one); --stock-adamw uses torch::optim::AdamW.
// BERT classifiers run their last layer for [CLS] alone unless --full-last-layer is given.
// --precision bf16|fp16 runs the forward and the loss under peft::AutocastGuard (fp16 with the
// trainer's loss scale, the gradients unscaled and checked before AdamW), as peft's trainer does.
//
//   peft-bench --method infer-interleaved   plain and merged-LoRA forward alternating in one
//                                           process: {"plain_ms","merged_ms","merged_vs_plain"}

#include <sys/resource.h>

#include <CLI/CLI.hpp>
#include <torch/csrc/autograd/profiler_legacy.h>
#include <torch/torch.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include <peft/peft.hpp>

#include "../examples/common/model_path.hpp"
#include "measure.hpp"

#ifdef PEFT_BENCH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#endif

namespace fs = std::filesystem;

namespace {

using bench::current_rss_mb;
using bench::median;
using bench::peak_rss_mb;

/// Every training setting: the measured baselines and variants, then every other registered method
/// (at its default options; AdapterFusion needs trained adapters and is left out).
const std::vector<std::string> kTrainMethods = [] {
  std::vector<std::string> out = {"full",   "lora",   "adapter", "adapterdrop", "bitfit",
                                  "prefix", "prompt", "propetl", "lst",         "lst-t5"};
  for (const auto& name : peft::method_names()) {
    if (name != "fusion" && std::find(out.begin(), out.end(), name) == out.end()) {
      out.push_back(name);
    }
  }
  return out;
}();
const std::vector<std::string> kInferMethods = {"infer-plain", "infer-lora", "infer-lora-merged"};

/// The measured settings' options, attached through the registry (the keys of each method's
/// adapter_config.json); every other registered method runs at its defaults. LoRA is r 8, alpha
/// 16 on query and value, as Hugging Face's side of bench/vs_hf.sh; ProPETL is one Pfeiffer
/// adapter prototype (one site per layer) shared by every layer, a mask per layer.
const std::map<std::string, nlohmann::json> kBenchOptions = {
    {"lora", {{"r", 8}, {"lora_alpha", 16}, {"target_modules", {"query", "value"}}}},
    {"adapter", {{"adapter_kind", "houlsby"}}},
    {"prefix", {{"num_virtual_tokens", 10}}},
    {"prompt", {{"num_virtual_tokens", 20}}},
    {"propetl", {{"base", "adapter"}}},
};

struct Settings {
  std::string method = "all";
  std::string model;
  std::string device = "cpu";
  std::string precision = "fp32";
  std::string inputs;
  std::string init_adapter;
  int64_t batch = 32;
  int64_t seq = 128;
  int64_t steps = 5;
  int64_t warmup = 2;
  std::string profile;
  bool stock_adamw = false;
  bool full_last_layer = false;
  int64_t threads = 0;
  int64_t seed = 1234;
  double lr = 1e-3;
};

/// Bytes of every regular file under `dir`.
int64_t folder_bytes(const fs::path& dir) {
  int64_t total = 0;
  for (const auto& entry : fs::recursive_directory_iterator(dir)) {
    if (entry.is_regular_file()) total += static_cast<int64_t>(entry.file_size());
  }
  return total;
}

int64_t parameter_bytes(const std::vector<torch::Tensor>& params) {
  int64_t bytes = 0;
  for (const auto& p : params) bytes += p.numel() * static_cast<int64_t>(p.element_size());
  return bytes;
}

/// The model under test: its root module (what is counted and optimised) and its forward.
struct Subject {
  std::shared_ptr<torch::nn::Module> root;
  std::function<torch::Tensor(const torch::Tensor&)> logits;
  int64_t stored_bytes = 0;
  /// Method-specific numbers appended to the JSON line.
  std::vector<std::pair<std::string, int64_t>> extra;
  /// "cls" or "full": which positions the last encoder layer ran for (BERT classifiers only).
  std::string last_layer;
};

/// The method's adapter written by save_adapter() into a fresh temporary folder: its size.
int64_t saved_adapter_bytes(torch::nn::Module& model) {
  auto dir = fs::temp_directory_path() / ("peft-bench-" + std::to_string(::getpid()));
  fs::remove_all(dir);
  peft::save_adapter(model, dir);
  const int64_t bytes = folder_bytes(dir);
  fs::remove_all(dir);
  return bytes;
}

Subject make_subject(const Settings& s, const fs::path& model_dir, const torch::Device& device) {
  Subject out;
  const std::string& m = s.method;
  if (m == "lst" || m == "lst-t5") {
    // The frozen BERT's embeddings and encoder feed a side network (of stock post-norm blocks,
    // or the paper's T5 blocks); the head reads its first position.
    auto model = peft::models::BertLadderForSequenceClassification::from_pretrained(
        model_dir, 2,
        peft::LadderOptions().block(m == "lst-t5" ? peft::LadderBlock::T5
                                                  : peft::LadderBlock::PostNorm));
    model->to(device);
    model->eval();
    out.root = model.ptr();
    out.logits = [model](const torch::Tensor& ids) mutable { return model->forward(ids); };
    // The folder save_adapter writes: side network, head and config.
    out.stored_bytes = saved_adapter_bytes(*model);
    return out;
  }
  auto model = peft::models::BertForSequenceClassification::from_pretrained(model_dir, 2);
  const bool lora = m == "lora" || m == "infer-lora" || m == "infer-lora-merged";
  if (!s.init_adapter.empty()) {
    // The adapter (and head) bench/hf_step.py saved, so both libraries start from one state.
    peft::load_adapter(*model, s.init_adapter);
  } else if (m == "adapterdrop") {
    // AdapterDrop: the same adapters, but none in the lower half of the layers, so the backward
    // pass stops at the first adapted layer.
    const int64_t L = model->bert->config().num_hidden_layers;
    peft::attach(*model, "adapter", {{"layers_to_transform", peft::layers_from(L / 2, L)}});
  } else if (const auto it = kBenchOptions.find(lora ? "lora" : m); it != kBenchOptions.end()) {
    peft::attach(*model, it->first, it->second);
  } else if (m == "full") {
    peft::unfreeze(*model);
  } else if (peft::find_method(m)) {
    peft::attach(*model, m);
  } else if (m != "infer-plain") {
    peft::fail("bench", "unknown --method \"{}\"", m);
  }
  if (m == "infer-lora-merged") peft::merge(*model);
  // Hugging Face computes the last layer for every position; peft only for [CLS] unless asked.
  model->cls_only_last_layer = !s.full_last_layer;
  out.last_layer = s.full_last_layer ? "full" : "cls";
  model->to(device);
  model->eval();
  if (m == "full") {
    out.stored_bytes = parameter_bytes(peft::trainable_parameters(*model));
  } else if (m == "propetl") {
    // The library's storage report, the prototype plus one bit per mask entry (no head, no
    // config), against the same adapter unshared in every layer; file_bytes is the whole folder
    // save_adapter writes (head and config included).
    const auto storage = peft::propetl_storage(*model);
    out.stored_bytes = storage.total();
    out.extra = {{"layers", model->bert->config().num_hidden_layers},
                 {"sites", storage.sites},
                 {"unshared_bytes", storage.unshared_bytes},
                 {"file_bytes", saved_adapter_bytes(*model)}};
  } else if (m != "infer-plain") {
    out.stored_bytes = saved_adapter_bytes(*model);
  }
  if (m == "adapterdrop")
    out.extra = {{"dropped_layers", model->bert->config().num_hidden_layers / 2}};
  out.root = model.ptr();
  out.logits = [model](const torch::Tensor& ids) mutable { return model->forward(ids); };
  return out;
}

/// input_ids [N, L] and labels [N]: from the safetensors file bench/hf_step.py writes, or random
/// ids above the special tokens (fixed seed) and random binary labels.
std::pair<torch::Tensor, torch::Tensor> make_inputs(const Settings& s, int64_t vocab) {
  if (!s.inputs.empty()) {
    peft::io::SafetensorsFile file(s.inputs);
    for (const char* key : {"input_ids", "labels"}) {
      peft::check(file.contains(key), "bench", "{}: no tensor \"{}\"", s.inputs, key);
    }
    auto ids = file.tensor("input_ids").to(torch::kLong).clone();
    auto labels = file.tensor("labels").to(torch::kLong).clone();
    peft::check(ids.dim() == 2 && labels.dim() == 1 && labels.size(0) == ids.size(0), "bench",
                "{}: input_ids {} and labels {} do not form a batch", s.inputs,
                peft::detail::shape(ids.sizes()), peft::detail::shape(labels.sizes()));
    return {ids, labels};
  }
  torch::manual_seed(static_cast<uint64_t>(s.seed));
  auto ids = torch::randint(1000, vocab, {s.batch, s.seq}, torch::kLong);
  auto labels = torch::randint(0, 2, {s.batch}, torch::kLong);
  return {ids, labels};
}

void synchronize(const torch::Device& device) {
#ifdef PEFT_BENCH_CUDA
  if (device.is_cuda()) c10::cuda::getCurrentCUDAStream().synchronize();
#else
  (void)device;
#endif
}

double device_memory_mb(const torch::Device& device, bool peak) {
#ifdef PEFT_BENCH_CUDA
  if (device.is_cuda()) {
    auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device.index());
    const auto& bytes = stats.allocated_bytes[0];  // aggregate over pools
    return static_cast<double>(peak ? bytes.peak : bytes.current) / (1024.0 * 1024.0);
  }
#else
  (void)device;
#endif
  return peak ? peak_rss_mb() : current_rss_mb();
}

/// Applies --threads and returns the --device, refusing cuda where LibTorch sees no GPU.
torch::Device prepare_device(const Settings& s) {
  if (s.threads > 0) torch::set_num_threads(static_cast<int>(s.threads));
  // The CPU without an index: LibTorch's tensors say "cpu", and to("cpu:0") would copy every
  // parameter (the 366 MiB embedding of multilingual-e5-small at once, the run's peak for LST).
  const auto device =
      s.device == "cuda" ? torch::Device(torch::kCUDA, 0) : torch::Device(torch::kCPU);
  peft::check(!device.is_cuda() || torch::cuda::is_available(), "bench",
              "--device cuda, but LibTorch sees no CUDA device");
  return device;
}

int run_one(const Settings& s) {
  const torch::Device device = prepare_device(s);
  const auto precision = peft::parse_precision(s.precision);
  peft::check_precision(precision, device);
  // fp16 scales the loss as peft's trainer does (its initial scale; no overflow at these sizes).
  const double loss_scale =
      precision == peft::Precision::fp16 ? peft::LossScaleOptions().initial : 1.0;
  const auto model_dir = examples::default_model_dir(s.model);
  Subject subject = make_subject(s, model_dir, device);
  const int64_t vocab = peft::models::BertConfig::from_file(model_dir / "config.json").vocab_size;
  auto [ids, labels] = make_inputs(s, vocab);
  ids = ids.to(device);
  labels = labels.to(device);
  const bool infer = s.method.rfind("infer-", 0) == 0;
  auto params = peft::trainable_parameters(*subject.root);
  int64_t trainable = 0;
  for (const auto& p : params) trainable += p.numel();

#ifdef PEFT_BENCH_CUDA
  if (device.is_cuda()) c10::cuda::CUDACachingAllocator::resetPeakStats(device.index());
#endif
  const double base_mb = device_memory_mb(device, false);
  std::unique_ptr<torch::optim::AdamW> optimizer;
  if (!infer) {
    // peft::AdamW (fused kernels where LibTorch has them), what peft's trainer uses; LibTorch's
    // own with --stock-adamw.
    optimizer =
        s.stock_adamw
            ? std::make_unique<torch::optim::AdamW>(params, torch::optim::AdamWOptions(s.lr))
            : std::make_unique<peft::AdamW>(params, torch::optim::AdamWOptions(s.lr));
  }
  std::vector<double> times;
  double first_loss = 0.0;
  int64_t overflow_steps = 0;
  // --profile: LibTorch's profiler records every op of the timed steps (its overhead is in
  // step_ms then) into a Chrome trace that bench/profile_ops.py sums per op.
  std::unique_ptr<torch::autograd::profiler::RecordProfile> profile;
  for (int64_t step = 0; step < s.warmup + s.steps; ++step) {
    if (step == s.warmup && !s.profile.empty()) {
      profile = std::make_unique<torch::autograd::profiler::RecordProfile>(s.profile);
    }
    const auto start = std::chrono::steady_clock::now();
    double loss_value = 0.0;
    if (infer) {
      torch::NoGradGuard no_grad;
      peft::AutocastGuard autocast(device, precision);
      loss_value = torch::cross_entropy_loss(subject.logits(ids), labels).item<double>();
    } else {
      // Gradients set to none, as torch.optim's zero_grad() does by default.
      for (auto& p : params) p.mutable_grad() = torch::Tensor();
      torch::Tensor loss;
      {
        peft::AutocastGuard autocast(device, precision);
        loss = torch::cross_entropy_loss(subject.logits(ids), labels);
      }
      if (loss_scale != 1.0) {
        // Scaled backward, then the gradients unscaled and checked, as GradScaler.step() does.
        (loss * loss_scale).backward();
        peft::unscale_gradients(params, loss_scale);
        torch::NoGradGuard no_grad;
        std::vector<torch::Tensor> norms;
        for (auto& p : params) {
          if (p.grad().defined()) norms.push_back(p.grad().norm());
        }
        if (torch::stack(norms).isfinite().all().item<bool>()) {
          optimizer->step();
        } else {
          ++overflow_steps;  // reported: a timing with skipped updates is not a full step's
        }
      } else {
        loss.backward();
        optimizer->step();
      }
      loss_value = loss.item<double>();
    }
    synchronize(device);
    const std::chrono::duration<double, std::milli> took = std::chrono::steady_clock::now() - start;
    if (step == 0) first_loss = loss_value;
    if (step >= s.warmup) times.push_back(took.count());
  }
  profile.reset();
  std::ostringstream line;
  line.precision(10);
  line << "{\"method\":\"" << s.method << "\",\"mode\":\"" << (infer ? "infer" : "train")
       << "\",\"device\":\"" << s.device << "\",\"precision\":\"" << s.precision
       << "\",\"batch\":" << ids.size(0) << ",\"seq\":" << ids.size(1)
       << ",\"threads\":" << torch::get_num_threads() << ",\"step_ms\":" << median(times)
       << ",\"peak_mb\":" << device_memory_mb(device, true) << ",\"base_mb\":" << base_mb
       << ",\"trainable_params\":" << trainable << ",\"stored_bytes\":" << subject.stored_bytes
       << ",\"first_loss\":" << first_loss;
  for (const auto& [key, value] : subject.extra) line << ",\"" << key << "\":" << value;
  if (!subject.last_layer.empty()) line << ",\"last_layer\":\"" << subject.last_layer << "\"";
  if (loss_scale != 1.0) line << ",\"overflow_steps\":" << overflow_steps;
  line << "}";
  std::cout << line.str() << std::endl;
  return 0;
}

/// --method infer-interleaved: the plain model and the merged-LoRA model in one process, their
/// forward passes alternating step by step (plain, merged, plain, ...), so that drift in the
/// machine's speed hits both alike. Prints the medians and their ratio; no peak memory (one
/// process holds both models).
int run_interleaved(const Settings& s) {
  peft::check(s.precision == "fp32", "bench", "--precision {} is not supported by {}", s.precision,
              "--method infer-interleaved");
  const torch::Device device = prepare_device(s);
  const auto model_dir = examples::default_model_dir(s.model);
  Settings plain_settings = s, merged_settings = s;
  plain_settings.method = "infer-plain";
  merged_settings.method = "infer-lora-merged";
  Subject plain = make_subject(plain_settings, model_dir, device);
  Subject merged = make_subject(merged_settings, model_dir, device);
  const int64_t vocab = peft::models::BertConfig::from_file(model_dir / "config.json").vocab_size;
  auto ids = make_inputs(s, vocab).first.to(device);
  std::vector<double> plain_ms, merged_ms;
  torch::NoGradGuard no_grad;
  for (int64_t step = 0; step < s.warmup + s.steps; ++step) {
    for (Subject* subject : {&plain, &merged}) {
      const auto start = std::chrono::steady_clock::now();
      subject->logits(ids);
      synchronize(device);
      const std::chrono::duration<double, std::milli> took =
          std::chrono::steady_clock::now() - start;
      if (step >= s.warmup) (subject == &plain ? plain_ms : merged_ms).push_back(took.count());
    }
  }
  std::ostringstream line;
  line.precision(10);
  line << "{\"method\":\"infer-interleaved\",\"mode\":\"infer\",\"device\":\"" << s.device
       << "\",\"batch\":" << ids.size(0) << ",\"seq\":" << ids.size(1)
       << ",\"threads\":" << torch::get_num_threads() << ",\"steps\":" << s.steps
       << ",\"plain_ms\":" << median(plain_ms) << ",\"merged_ms\":" << median(merged_ms)
       << ",\"merged_vs_plain\":" << median(merged_ms) / median(plain_ms) << "}";
  std::cout << line.str() << std::endl;
  return 0;
}

std::string shell_quote(const std::string& arg) {
  std::string out = "'";
  for (char c : arg) {
    if (c == '\'') {
      out += "'\\''";
    } else {
      out += c;
    }
  }
  return out + "'";
}

/// Runs this program once per method (a fresh process each, so peak memory is per method) and
/// passes their JSON lines through. Returns non-zero when any run failed.
int run_all(const std::vector<std::string>& args, const std::vector<std::string>& methods) {
  const auto self = fs::read_symlink("/proc/self/exe").string();
  int failures = 0;
  for (const auto& method : methods) {
    std::string command = shell_quote(self);
    for (size_t i = 1; i < args.size(); ++i) {
      if (args[i] == "--method") {
        ++i;  // replaced below
        continue;
      }
      if (args[i].rfind("--method=", 0) == 0) continue;
      command += ' ';
      command += shell_quote(args[i]);
    }
    // Appended piecewise: GCC 12 warns falsely (-Wrestrict) about "literal" + std::string here.
    command += " --method ";
    command += shell_quote(method);
    FILE* pipe = ::popen(command.c_str(), "r");
    peft::check(pipe != nullptr, "bench", "could not start {}", command);
    std::array<char, 4096> buffer{};
    while (std::fgets(buffer.data(), static_cast<int>(buffer.size()), pipe) != nullptr) {
      std::cout << buffer.data() << std::flush;
    }
    const int status = ::pclose(pipe);
    if (status != 0) {
      std::cerr << "[peft::bench] --method " << method << " failed (status " << status << ")\n";
      ++failures;
    }
  }
  return failures == 0 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  Settings s;
  CLI::App app{"peft-bench: training step time and peak memory per fine-tuning method"};
  std::vector<std::string> all = kTrainMethods;
  all.insert(all.end(), kInferMethods.begin(), kInferMethods.end());
  all.push_back("infer-interleaved");
  all.push_back("all");
  all.push_back("infer");
  app.add_option("--method", s.method,
                 "one method, \"all\" (every training method, one process each) or \"infer\" "
                 "(plain, LoRA and merged-LoRA forward)")
      ->check(CLI::IsMember(all));
  app.add_option("--model", s.model,
                 "Hugging Face model folder, or a name: " + std::string(examples::model_names()) +
                     " (default: minilm)");
  app.add_option("--device", s.device, "cpu or cuda")->check(CLI::IsMember({"cpu", "cuda"}));
  app.add_option("--precision", s.precision,
                 "fp32, or autocast to bf16 or fp16 (fp16 with a loss scale), as peft's trainer")
      ->check(CLI::IsMember(peft::enum_names<peft::Precision>()));
  app.add_option("--batch", s.batch, "batch size")->check(CLI::PositiveNumber);
  app.add_option("--seq", s.seq, "sequence length")->check(CLI::PositiveNumber);
  app.add_option("--steps", s.steps, "timed steps")->check(CLI::PositiveNumber);
  app.add_option("--warmup", s.warmup, "untimed steps first")->check(CLI::NonNegativeNumber);
  app.add_option("--profile", s.profile,
                 "write a Chrome trace of the timed steps' ops to this file (one method only)");
  app.add_option("--threads", s.threads, "intra-op threads (0: LibTorch's default)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--lr", s.lr, "AdamW learning rate");
  app.add_flag("--stock-adamw", s.stock_adamw,
               "LibTorch's torch::optim::AdamW instead of peft::AdamW (fused where available)");
  app.add_flag("--full-last-layer", s.full_last_layer,
               "run the last encoder layer for every position, as Hugging Face does (default: "
               "only for [CLS], the one position the classifier reads)");
  app.add_option("--seed", s.seed, "seed of the random token ids and labels");
  app.add_option("--inputs", s.inputs,
                 "safetensors file with input_ids [N, L] and labels [N] (overrides --batch/--seq)");
  app.add_option("--init-adapter", s.init_adapter,
                 "start from this adapter folder (Hugging Face PEFT or peft format) instead of a "
                 "fresh one");
  CLI11_PARSE(app, argc, argv);
  try {
    if (s.method == "all" || s.method == "infer") {
      return run_all(std::vector<std::string>(argv, argv + argc),
                     s.method == "all" ? kTrainMethods : kInferMethods);
    }
    if (s.method == "infer-interleaved") return run_interleaved(s);
    return run_one(s);
  } catch (const std::exception& e) {
    std::cerr << e.what() << "\n";
    return 1;
  }
}
