#pragma once
// Fixtures shared by the training tests (test_trainer, test_schedule, test_checkpoint,
// test_precision): a small classifier, batches, a temporary folder, parameter snapshots.

#include <peft/core/parameters.hpp>

#include <catch2/catch.hpp>
#include <torch/torch.h>

#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace train_testing {

namespace fs = std::filesystem;

// Where the device-aware cases (the mixed-precision ones) train: $PEFT_TEST_DEVICE ("cuda" on a
// GPU machine, bench/gpu_check.sh), else the CPU.
inline torch::Device test_device() {
  const char* env = std::getenv("PEFT_TEST_DEVICE");
  if (env == nullptr || *env == '\0') return torch::kCPU;
  const torch::Device device(env);
  if (device.is_cuda() && !torch::cuda::is_available()) {
    throw std::runtime_error(std::string("PEFT_TEST_DEVICE=") + env + " but no CUDA device");
  }
  return device;
}

// A small classifier with a frozen first layer, dropout (so the RNG matters for resuming), a
// LayerNorm (excluded from weight decay) and a head.
struct NetImpl : torch::nn::Module {
  explicit NetImpl(int64_t classes = 3) {
    body = register_module("body", torch::nn::Linear(6, 12));
    drop = register_module("drop", torch::nn::Dropout(0.3));
    hidden = register_module("hidden", torch::nn::Linear(12, 12));
    norm = register_module("norm", torch::nn::LayerNorm(torch::nn::LayerNormOptions({12})));
    head = register_module("head", torch::nn::Linear(12, classes));
    peft::freeze(*body);
  }
  torch::Tensor forward(torch::Tensor x) {
    x = drop(torch::relu(body(x)));
    return head(norm(torch::gelu(hidden(x))));
  }
  torch::nn::Linear body{nullptr}, hidden{nullptr}, head{nullptr};
  torch::nn::Dropout drop{nullptr};
  torch::nn::LayerNorm norm{nullptr};
};
TORCH_MODULE(Net);

inline Net make_net(uint64_t seed = 1, int64_t classes = 3) {
  torch::manual_seed(seed);
  return Net(classes);
}

struct Batch {
  torch::Tensor x, y;
  Batch to(const torch::Device& device) const { return {x.to(device), y.to(device)}; }
};

inline std::vector<Batch> make_batches(int64_t count, uint64_t seed = 123) {
  torch::manual_seed(seed);
  std::vector<Batch> out;
  for (int64_t i = 0; i < count; ++i) {
    auto x = torch::randn({4, 6});
    out.push_back({x, (x.sum(1) > 0).to(torch::kLong) + (x.select(1, 0) > 1).to(torch::kLong)});
  }
  return out;
}

inline torch::Tensor loss_of(Net& net, const Batch& b) {
  return torch::nn::functional::cross_entropy(net->forward(b.x), b.y);
}

// A fresh folder under the temp directory, removed with everything in it at scope exit.
struct TempDir {
  TempDir() {
    static std::atomic<int> counter{0};
    path = fs::temp_directory_path() /
           ("peft_trainer_test_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    fs::remove_all(path);
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
  fs::path path;
};

// A copy on the CPU whatever the device (`.cpu()` of a CPU tensor is the tensor itself).
inline torch::Tensor host_copy(const torch::Tensor& t) {
  return t.detach().to(torch::kCPU, /*non_blocking=*/false, /*copy=*/true);
}

inline std::map<std::string, torch::Tensor> snapshot(const torch::nn::Module& m) {
  std::map<std::string, torch::Tensor> out;
  // On the CPU, whatever the module's device, so that snapshots compare across devices.
  for (const auto& item : m.named_parameters()) {
    out[item.key()] = host_copy(item.value());
  }
  return out;
}

inline bool same_as(const torch::nn::Module& m, const std::map<std::string, torch::Tensor>& saved) {
  for (const auto& item : m.named_parameters()) {
    if (!torch::equal(item.value(), saved.at(item.key()))) return false;
  }
  return true;
}

inline std::vector<nlohmann::json> read_json_lines(const fs::path& path) {
  std::ifstream in(path);
  std::vector<nlohmann::json> out;
  std::string line;
  while (std::getline(in, line)) out.push_back(nlohmann::json::parse(line));
  return out;
}

struct Crash : std::runtime_error {
  Crash() : std::runtime_error("simulated crash") {}
};

}  // namespace train_testing
