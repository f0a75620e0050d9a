#pragma once

// Training checkpoints: everything needed to continue a run bit-for-bit, in one folder.
//
//   <dir>/manifest.json           format, version, TrainingState, parameter names and shapes
//   <dir>/trainable.safetensors   the trainable parameters by dotted name (frozen ones are not
//                                 saved: they are the base model, loaded from elsewhere)
//   <dir>/optimizer.pt            the optimizer's state (torch::serialize archive)
//   <dir>/rng.safetensors         the default CPU generator's state ("cpu", uint8); a run of
//                                 several processes adds rank r's as "cpu.rank<r>"
//
// The folder is built as `<dir>.tmp-<random>`, every file and the folder are flushed to disk, and
// only then does it take the place of `<dir>` (an atomic exchange where the file system has one),
// so a crash or a failed save leaves the previous checkpoint as it was.
//
// Loading checks the manifest, every tensor name, shape and dtype and the optimizer archive
// before it changes anything, so a checkpoint that does not fit the model is refused with the
// key and both shapes, and the model, optimizer and RNG are left untouched.

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/Generator.h>
#include <torch/nn/module.h>
#include <torch/optim/adam.h>
#include <torch/optim/adamw.h>
#include <torch/optim/optimizer.h>
#include <torch/serialize/input-archive.h>
#include <torch/serialize/output-archive.h>
#include <torch/version.h>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <mutex>
#include <optional>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include <peft/config.hpp>
#include <peft/core/error.hpp>
#include <peft/core/parameters.hpp>
#include <peft/detail/json.hpp>
#include <peft/detail/shape.hpp>
#include <peft/io/safetensors.hpp>
#include <peft/train/schedule.hpp>

PEFT_NAMESPACE_BEGIN

/// Where a training run stands: what a checkpoint restores besides tensors.
struct TrainingState {
  int64_t global_step = 0;                ///< optimizer steps taken (skipped steps included)
  int64_t epoch = 0;                      ///< 0-based epoch the next batch belongs to
  int64_t batch_in_epoch = 0;             ///< index of the next batch within that epoch
  int64_t total_steps = 0;                ///< steps the run was planned for (the schedule's length)
  int64_t batches_per_epoch = 0;          ///< batches in one epoch of the run's data
  int64_t seed = 0;                       ///< seed of the run (also drives the batch order)
  int64_t skipped_steps = 0;              ///< steps skipped for a non-finite loss or gradient
  int64_t overflow_steps = 0;             ///< fp16 steps skipped for an overflowing loss scale
  double loss_scale = 0.0;                ///< fp16's dynamic loss scale (0: none)
  int64_t loss_scale_good_steps = 0;      ///< good fp16 steps since the scale last changed
  int64_t last_eval_step = -1;            ///< global_step of the latest evaluation, -1 before any
  SchedulerState scheduler;               ///< learning-rate scheduler position and base rates
  std::optional<double> best_metric;      ///< best value of the chosen metric so far
  int64_t best_step = -1;                 ///< global_step it was reached at
  int64_t evals_without_improvement = 0;  ///< for early stopping
  std::map<std::string, double> last_metrics;  ///< latest evaluation's metrics
  bool finished = false;                       ///< the run ended (all steps done or stopped early)
  int64_t world_size = 1;  ///< processes the run trained on (data parallel); resume needs as many
  nlohmann::json user = nlohmann::json::object();  ///< free-form data of the caller
};

namespace detail {

inline constexpr const char* kCheckpointFormat = "peft.training_checkpoint";
inline constexpr int kCheckpointVersion = 1;

inline std::string ckpt_shape(at::IntArrayRef shape) {
  return fmt::format("[{}]", fmt::join(shape, ", "));
}

// JSON has no NaN or infinity; metrics can legitimately be NaN (a Pearson of a constant), so they
// travel as strings and come back as numbers.
inline nlohmann::json ckpt_number(double v) {
  if (std::isfinite(v)) return v;
  return std::isnan(v) ? "nan" : (v > 0 ? "inf" : "-inf");
}

inline double ckpt_number_from(const nlohmann::json& j) {
  if (j.is_number()) return j.get<double>();
  const auto s = j.get<std::string>();
  if (s == "nan") return std::numeric_limits<double>::quiet_NaN();
  if (s == "inf") return std::numeric_limits<double>::infinity();
  if (s == "-inf") return -std::numeric_limits<double>::infinity();
  throw nlohmann::json::type_error::create(302, "expected a number, got \"" + s + "\"", &j);
}

inline nlohmann::json state_to_json(const TrainingState& s) {
  nlohmann::json metrics = nlohmann::json::object();
  for (const auto& [k, v] : s.last_metrics) metrics[k] = ckpt_number(v);
  nlohmann::json base_lrs = nlohmann::json::array();
  for (double lr : s.scheduler.base_lrs) base_lrs.push_back(ckpt_number(lr));
  return {{"global_step", s.global_step},
          {"epoch", s.epoch},
          {"batch_in_epoch", s.batch_in_epoch},
          {"total_steps", s.total_steps},
          {"batches_per_epoch", s.batches_per_epoch},
          {"seed", s.seed},
          {"skipped_steps", s.skipped_steps},
          {"overflow_steps", s.overflow_steps},
          {"loss_scale", ckpt_number(s.loss_scale)},
          {"loss_scale_good_steps", s.loss_scale_good_steps},
          {"last_eval_step", s.last_eval_step},
          {"scheduler", {{"step", s.scheduler.step}, {"base_lrs", base_lrs}}},
          {"best_metric", s.best_metric ? ckpt_number(*s.best_metric) : nlohmann::json(nullptr)},
          {"best_step", s.best_step},
          {"evals_without_improvement", s.evals_without_improvement},
          {"last_metrics", metrics},
          {"finished", s.finished},
          {"world_size", s.world_size},
          {"user", s.user}};
}

// j[key] as an int64 (`fallback` when missing, if given): a float or an integer beyond int64 is an
// error naming `source` and the key (nlohmann would convert it unchecked, and a float beyond the
// range is undefined behaviour).
inline int64_t ckpt_int(const nlohmann::json& j, const char* key, const std::string& source,
                        std::optional<int64_t> fallback = std::nullopt) {
  if (fallback) return detail::config_value_or<int64_t>(j, key, *fallback, source, "checkpoint");
  return detail::config_value<int64_t>(j, key, source, "checkpoint");
}

inline TrainingState state_from_json(const nlohmann::json& j,
                                     const std::string& source = "manifest.json") {
  TrainingState s;
  s.global_step = ckpt_int(j, "global_step", source);
  s.epoch = ckpt_int(j, "epoch", source);
  s.batch_in_epoch = ckpt_int(j, "batch_in_epoch", source);
  s.total_steps = ckpt_int(j, "total_steps", source);
  s.batches_per_epoch = ckpt_int(j, "batches_per_epoch", source);
  s.seed = ckpt_int(j, "seed", source);
  s.skipped_steps = ckpt_int(j, "skipped_steps", source);
  // Written since fp16 training came; absent from older checkpoints, which had no loss scale.
  s.overflow_steps = ckpt_int(j, "overflow_steps", source, 0);
  if (j.contains("loss_scale")) s.loss_scale = ckpt_number_from(j.at("loss_scale"));
  s.loss_scale_good_steps = ckpt_int(j, "loss_scale_good_steps", source, 0);
  s.last_eval_step = ckpt_int(j, "last_eval_step", source);
  s.scheduler.step = ckpt_int(j.at("scheduler"), "step", source);
  for (const auto& lr : j.at("scheduler").at("base_lrs")) {
    s.scheduler.base_lrs.push_back(ckpt_number_from(lr));
  }
  if (!j.at("best_metric").is_null()) s.best_metric = ckpt_number_from(j.at("best_metric"));
  s.best_step = ckpt_int(j, "best_step", source);
  s.evals_without_improvement = ckpt_int(j, "evals_without_improvement", source);
  for (const auto& [k, v] : j.at("last_metrics").items()) s.last_metrics[k] = ckpt_number_from(v);
  s.finished = j.at("finished").get<bool>();
  // Written since data-parallel training came; older checkpoints are from one process.
  s.world_size = ckpt_int(j, "world_size", source, 1);
  s.user = j.at("user");
  return s;
}

template <class... Args>
[[noreturn]] void ckpt_fail(const std::filesystem::path& dir, fmt::format_string<Args...> format,
                            Args&&... args) {
  fail("checkpoint", "{}: {}", dir.string(), fmt::format(format, std::forward<Args>(args)...));
}

// Writes `bytes` to `path` and flushes them to disk; a checkpoint is only complete once every
// byte is durable, or a power cut could promote a folder of empty files.
inline void ckpt_write_file(const std::filesystem::path& path, const std::string& bytes) {
  io::detail::Fd fd(::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666));
  if (fd.get() < 0) ckpt_fail(path, "cannot create: {}", std::strerror(errno));
  const char* p = bytes.data();
  size_t left = bytes.size();
  while (left > 0) {
    const ssize_t n = ::write(fd.get(), p, left);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) ckpt_fail(path, "cannot write: {}", std::strerror(errno));
    p += n;
    left -= static_cast<size_t>(n);
  }
  if (::fsync(fd.get()) != 0) ckpt_fail(path, "cannot flush: {}", std::strerror(errno));
  if (::close(fd.release()) != 0) ckpt_fail(path, "cannot close: {}", std::strerror(errno));
}

// Writes `archive` to `path` (LibTorch's zip writer streams each tensor to the file) and flushes
// the file to disk.
inline void ckpt_write_archive(const std::filesystem::path& path,
                               torch::serialize::OutputArchive& archive) {
  try {
    archive.save_to(path.string());
  } catch (const c10::Error& e) {
    ckpt_fail(path, "cannot write: {}", e.what_without_backtrace());
  }
  io::detail::Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (fd.get() < 0) ckpt_fail(path, "cannot open to flush: {}", std::strerror(errno));
  if (::fsync(fd.get()) != 0) ckpt_fail(path, "cannot flush: {}", std::strerror(errno));
}

inline void ckpt_sync_dir(const std::filesystem::path& dir) {
  io::detail::Fd fd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (fd.get() >= 0) ::fsync(fd.get());
}

inline std::string ckpt_read_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) ckpt_fail(path.parent_path(), "cannot open {}", path.filename().string());
  std::ostringstream text;
  text << in.rdbuf();
  if (in.bad()) ckpt_fail(path.parent_path(), "cannot read {}", path.filename().string());
  return text.str();
}

inline std::string ckpt_random_suffix() {
  std::random_device entropy;
  std::mt19937_64 rng((static_cast<uint64_t>(entropy()) << 32) ^ static_cast<uint64_t>(::getpid()));
  return fmt::format("{:016x}", rng());
}

// Builds a folder with `fill` and puts it at `target` only once it is complete. On failure the
// half-built folder is removed and `target` keeps its previous content.
inline void write_folder_atomically(const std::filesystem::path& target,
                                    const std::function<void(const std::filesystem::path&)>& fill) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const fs::path parent = target.has_parent_path() ? target.parent_path() : fs::path(".");
  fs::create_directories(parent, ec);
  if (ec) ckpt_fail(target, "cannot create the parent folder: {}", ec.message());
  fs::path tmp;
  for (int attempt = 0; attempt < 100; ++attempt) {
    tmp = target.string() + ".tmp-" + ckpt_random_suffix();
    if (::mkdir(tmp.c_str(), 0777) == 0) break;
    if (errno != EEXIST)
      ckpt_fail(target, "cannot create {}: {}", tmp.string(), std::strerror(errno));
    tmp.clear();
  }
  if (tmp.empty()) ckpt_fail(target, "cannot find a free temporary name");
  try {
    fill(tmp);
    ckpt_sync_dir(tmp);
  } catch (...) {
    fs::remove_all(tmp, ec);
    throw;
  }
  if (::rename(tmp.c_str(), target.c_str()) != 0) {
    if (errno != EEXIST && errno != ENOTEMPTY) {
      const std::string reason = std::strerror(errno);
      fs::remove_all(tmp, ec);
      ckpt_fail(target, "cannot move {} into place: {}", tmp.string(), reason);
    }
    // An existing checkpoint of the same name: swap the two in one step where the file system
    // can, so `target` is never missing; otherwise move the old one aside first.
    bool swapped = false;
#if defined(__linux__) && defined(RENAME_EXCHANGE)
    swapped = ::renameat2(AT_FDCWD, tmp.c_str(), AT_FDCWD, target.c_str(), RENAME_EXCHANGE) == 0;
#endif
    if (!swapped) {
      const fs::path old = target.string() + ".old-" + ckpt_random_suffix();
      if (::rename(target.c_str(), old.c_str()) != 0 ||
          ::rename(tmp.c_str(), target.c_str()) != 0) {
        const std::string reason = std::strerror(errno);
        if (!fs::exists(target)) ::rename(old.c_str(), target.c_str());
        fs::remove_all(tmp, ec);
        ckpt_fail(target, "cannot replace the previous checkpoint: {}", reason);
      }
      tmp = old;
    }
    fs::remove_all(tmp, ec);
  }
  ckpt_sync_dir(parent);
}

}  // namespace detail

/// Writes a checkpoint of `module`'s trainable parameters, `optimizer`'s state (when not null),
/// the default CPU generator's state and `state` to the folder `dir`, replacing a previous
/// checkpoint there only once the new one is complete on disk. Throws peft::Error naming the
/// folder and the problem; `dir` is then left as it was.
///
/// In a run of several processes, rank 0 saves and `rank_rngs` holds every rank's generator
/// state by rank (rank 0's is taken from this process, whatever index 0 holds).
inline void save_checkpoint(const std::filesystem::path& dir, const torch::nn::Module& module,
                            const torch::optim::Optimizer* optimizer, const TrainingState& state,
                            const std::vector<at::Tensor>& rank_rngs = {}) {
  const auto named = named_trainable_parameters(module);
  // The archive refers to the optimizer's state tensors and is written straight to the file:
  // through a string it cost twice the state's size in memory at once (1.4 GB more peak RSS
  // for full fine-tuning of multilingual-e5-small, whose AdamW state is 940 MB).
  torch::serialize::OutputArchive archive;
  if (optimizer != nullptr) optimizer->save(archive);
  at::Tensor rng;
  {
    auto gen = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(gen.mutex());
    rng = gen.get_state();
  }

  nlohmann::json params = nlohmann::json::array();
  for (const auto& [name, p] : named) {
    params.push_back({{"name", name},
                      {"shape", p.sizes().vec()},
                      {"dtype", std::string(c10::toString(p.scalar_type()))}});
  }
  nlohmann::json groups = nlohmann::json::array();
  if (optimizer != nullptr) {
    for (const auto& g : optimizer->param_groups()) groups.push_back(g.params().size());
  }
  const nlohmann::json manifest = {{"format", detail::kCheckpointFormat},
                                   {"version", detail::kCheckpointVersion},
                                   {"torch_version", TORCH_VERSION},
                                   {"state", detail::state_to_json(state)},
                                   {"parameters", params},
                                   {"optimizer", optimizer != nullptr},
                                   {"optimizer_group_sizes", groups}};

  detail::write_folder_atomically(dir, [&](const std::filesystem::path& tmp) {
    io::save_safetensors(tmp / "trainable.safetensors", named);
    std::vector<std::pair<std::string, at::Tensor>> rngs{{"cpu", rng}};
    for (size_t r = 1; r < rank_rngs.size(); ++r) {
      rngs.emplace_back(fmt::format("cpu.rank{}", r), rank_rngs[r]);
    }
    io::save_safetensors(tmp / "rng.safetensors", rngs);
    if (optimizer != nullptr) detail::ckpt_write_archive(tmp / "optimizer.pt", archive);
    // The manifest goes last: a folder that has one is complete.
    detail::ckpt_write_file(tmp / "manifest.json", manifest.dump(2) + "\n");
  });
}

namespace detail {

// The manifest of `dir`, its format and version checked.
inline nlohmann::json read_manifest(const std::filesystem::path& dir) {
  const auto path = dir / "manifest.json";
  if (!std::filesystem::is_regular_file(path)) ckpt_fail(dir, "no manifest.json");
  try {
    auto manifest = nlohmann::json::parse(ckpt_read_file(path));
    const auto format = manifest.at("format").get<std::string>();
    if (format != kCheckpointFormat) {
      ckpt_fail(dir, "manifest.json has format \"{}\", expected \"{}\"", format, kCheckpointFormat);
    }
    const auto version = ckpt_int(manifest, "version", path.string());
    if (version != kCheckpointVersion) {
      ckpt_fail(dir, "manifest.json has version {}, this build reads version {}", version,
                kCheckpointVersion);
    }
    state_from_json(manifest.at("state"), path.string());
    const auto& groups = manifest.at("optimizer_group_sizes");
    if (!groups.is_array())
      ckpt_fail(dir, "manifest.json: \"optimizer_group_sizes\" is not an array");
    for (const auto& g : groups) {
      if (!g.is_number_unsigned() && !(g.is_number_integer() && g.get<int64_t>() >= 0)) {
        ckpt_fail(dir, "manifest.json: \"optimizer_group_sizes\" holds {}, not a count", g.dump());
      }
    }
    return manifest;
  } catch (const nlohmann::json::exception& e) {
    ckpt_fail(dir, "manifest.json is malformed: {}", e.what());
  }
}

}  // namespace detail

/// Reads only the TrainingState of the checkpoint in `dir`. Throws peft::Error when the folder
/// holds no readable checkpoint.
inline TrainingState read_checkpoint_state(const std::filesystem::path& dir) {
  return detail::state_from_json(detail::read_manifest(dir).at("state"));
}

namespace detail {

/// Throws std::runtime_error when a loaded Adam or AdamW state does not fit its parameter
/// (moments of another shape, dtype or device, NaN or infinity, a negative step, AMSGrad without
/// max_exp_avg_sq):
/// torch's Optimizer::load() takes whatever tensors the archive holds, so a moment of another
/// shape or dtype would only fail (or broadcast) at the next step, and a NaN would spread into
/// the weights. Other optimizers' states are not checked.
/// The key of parameter `p` in an optimizer's state map: its TensorImpl's address, which
/// LibTorch 1.13 writes as a string and 2.x keeps as a pointer.
template <class Map>
typename Map::key_type optimizer_state_key(const torch::Tensor& p) {
  using Key = typename Map::key_type;
  if constexpr (std::is_same_v<Key, std::string>) {
    std::ostringstream address;
    address << static_cast<const void*>(p.unsafeGetTensorImpl());
    return address.str();
  } else {
    return p.unsafeGetTensorImpl();
  }
}

inline void check_optimizer_state(torch::optim::Optimizer& optimizer) {
  auto& state = optimizer.state();
  using Map = std::decay_t<decltype(state)>;
  size_t g = 0;
  for (auto& group : optimizer.param_groups()) {
    // AMSGrad's step reads max_exp_avg_sq, which a state saved without it lacks.
    const auto* adamw_options = dynamic_cast<const torch::optim::AdamWOptions*>(&group.options());
    const auto* adam_options = dynamic_cast<const torch::optim::AdamOptions*>(&group.options());
    const bool amsgrad = (adamw_options != nullptr && adamw_options->amsgrad()) ||
                         (adam_options != nullptr && adam_options->amsgrad());
    size_t i = 0;
    for (auto& p : group.params()) {
      auto it = state.find(optimizer_state_key<Map>(p));
      if (it == state.end()) {
        ++i;
        continue;
      }
      auto moment = [&](const torch::Tensor& t, const char* name, bool required) {
        if (!t.defined()) {
          if (!required) return;
          throw std::runtime_error(
              fmt::format("parameter {} of group {} has no {} in its state", i, g, name));
        }
        if (t.sizes() != p.sizes() || t.scalar_type() != p.scalar_type() ||
            t.device() != p.device()) {
          throw std::runtime_error(
              fmt::format("parameter {} of group {} ({} {} on {}): its {} is {} {} on {}", i, g,
                          c10::toString(p.scalar_type()), shape(p.sizes()), p.device().str(), name,
                          c10::toString(t.scalar_type()), shape(t.sizes()), t.device().str()));
        }
        if (!at::isfinite(t).all().item<bool>()) {
          throw std::runtime_error(
              fmt::format("parameter {} of group {}: its {} holds NaN or infinity", i, g, name));
        }
      };
      auto step = [&](int64_t value) {
        if (value < 0) {
          throw std::runtime_error(
              fmt::format("parameter {} of group {}: step {} is negative", i, g, value));
        }
      };
      if (auto* s = dynamic_cast<torch::optim::AdamWParamState*>(it->second.get())) {
        step(s->step());
        moment(s->exp_avg(), "exp_avg", true);
        moment(s->exp_avg_sq(), "exp_avg_sq", true);
        moment(s->max_exp_avg_sq(), "max_exp_avg_sq", amsgrad);
      } else if (auto* s = dynamic_cast<torch::optim::AdamParamState*>(it->second.get())) {
        step(s->step());
        moment(s->exp_avg(), "exp_avg", true);
        moment(s->exp_avg_sq(), "exp_avg_sq", true);
        moment(s->max_exp_avg_sq(), "max_exp_avg_sq", amsgrad);
      }
      ++i;
    }
    ++g;
  }
}

}  // namespace detail

/// Restores the checkpoint in `dir` into `module`'s trainable parameters, `optimizer` (when not
/// null) and, with `restore_rng`, the default CPU generator (rank `rank`'s state, in a run of
/// several processes), and returns its TrainingState.
///
/// Everything is checked first: the manifest, that the file holds exactly the trainable
/// parameters of `module` with the same shapes and dtypes, the generator state and the optimizer
/// archive. A mismatch throws peft::Error naming the key with the expected and found shapes, and
/// leaves the module, the optimizer and the generator unchanged.
inline TrainingState load_checkpoint(const std::filesystem::path& dir, torch::nn::Module& module,
                                     torch::optim::Optimizer* optimizer, bool restore_rng = true,
                                     int rank = 0) {
  const auto manifest = detail::read_manifest(dir);
  TrainingState state = detail::state_from_json(manifest.at("state"));
  const auto tensors_path = dir / "trainable.safetensors";
  const io::SafetensorsFile file(tensors_path);

  const auto named = named_trainable_parameters(module);
  std::unordered_map<std::string, const torch::Tensor*> expected;
  for (const auto& [name, p] : named) expected.emplace(name, &p);
  for (const auto& entry : file.entries()) {
    if (expected.count(entry.name) == 0) {
      detail::ckpt_fail(dir,
                        "trainable.safetensors holds \"{}\" (shape {}), which is not a trainable "
                        "parameter of the model",
                        entry.name, detail::ckpt_shape(entry.shape));
    }
  }
  for (const auto& [name, p] : named) {
    if (!file.contains(name)) {
      detail::ckpt_fail(dir, "trainable parameter \"{}\" (shape {}) is missing from {}", name,
                        detail::ckpt_shape(p.sizes()), tensors_path.filename().string());
    }
    const auto& entry = file.entry(name);
    if (at::IntArrayRef(entry.shape) != p.sizes()) {
      detail::ckpt_fail(dir, "parameter \"{}\": the model expects shape {}, the checkpoint has {}",
                        name, detail::ckpt_shape(p.sizes()), detail::ckpt_shape(entry.shape));
    }
    if (entry.dtype != p.scalar_type()) {
      detail::ckpt_fail(dir, "parameter \"{}\": the model expects dtype {}, the checkpoint has {}",
                        name, c10::toString(p.scalar_type()), c10::toString(entry.dtype));
    }
  }

  at::Tensor rng;
  if (restore_rng) {
    const io::SafetensorsFile rng_file(dir / "rng.safetensors");
    const auto key = rank == 0 ? std::string("cpu") : fmt::format("cpu.rank{}", rank);
    if (!rng_file.contains(key)) {
      detail::ckpt_fail(dir,
                        "rng.safetensors has no generator state for rank {} (the run that saved "
                        "it had {} process{})",
                        rank, state.world_size, state.world_size == 1 ? "" : "es");
    }
    rng = rng_file.tensor(key);
    const auto current = at::detail::getDefaultCPUGenerator().get_state();
    if (rng.scalar_type() != current.scalar_type() || rng.sizes() != current.sizes()) {
      detail::ckpt_fail(dir, "rng.safetensors: CPU generator state of shape {} {}, expected {} {}",
                        detail::ckpt_shape(rng.sizes()), c10::toString(rng.scalar_type()),
                        detail::ckpt_shape(current.sizes()), c10::toString(current.scalar_type()));
    }
    // The state's bytes must also be one the generator accepts (set_state checks the Mersenne
    // Twister's fields): tried on a scratch generator now, so that the load fails before the
    // model or the optimizer changes.
    try {
      auto probe = at::make_generator<at::CPUGeneratorImpl>();
      probe.set_state(rng);
    } catch (const c10::Error& e) {
      detail::ckpt_fail(dir, "rng.safetensors: \"{}\" is not a valid CPU generator state: {}", key,
                        e.what_without_backtrace());
    }
  }

  if (optimizer != nullptr) {
    const auto opt_path = dir / "optimizer.pt";
    if (!std::filesystem::is_regular_file(opt_path)) {
      detail::ckpt_fail(dir, "no optimizer.pt (the checkpoint was saved without an optimizer)");
    }
    const auto saved_sizes = manifest.at("optimizer_group_sizes").get<std::vector<size_t>>();
    std::vector<size_t> sizes;
    for (const auto& g : optimizer->param_groups()) sizes.push_back(g.params().size());
    if (sizes != saved_sizes) {
      detail::ckpt_fail(dir,
                        "the optimizer has parameter groups of sizes [{}], the checkpoint [{}]",
                        fmt::join(sizes, ", "), fmt::join(saved_sizes, ", "));
    }
    // Keep the optimizer's current state so that a load that fails half-way can be undone.
    torch::serialize::OutputArchive backup_archive;
    optimizer->save(backup_archive);
    std::ostringstream backup;
    backup_archive.save_to(backup);
    std::string problem;
    try {
      torch::serialize::InputArchive archive;
      archive.load_from(opt_path.string());
      // load() leaves the state of parameters the archive has none for (never stepped) as it
      // was; the checkpoint says they have none.
      optimizer->state().clear();
      optimizer->load(archive);
      detail::check_optimizer_state(*optimizer);
    } catch (const c10::Error& e) {
      problem = e.what_without_backtrace();
    } catch (const std::exception& e) {
      problem = e.what();
    }
    if (!problem.empty()) {
      std::istringstream in(backup.str());
      torch::serialize::InputArchive restore;
      restore.load_from(in);
      optimizer->state().clear();
      optimizer->load(restore);
      detail::ckpt_fail(dir, "optimizer.pt does not fit the optimizer: {}", problem);
    }
  }

  {
    torch::NoGradGuard no_grad;
    for (const auto& [name, p] : named) {
      p.copy_(file.tensor(name));
    }
  }
  if (restore_rng) {
    auto gen = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(gen.mutex());
    gen.set_state(rng);
  }
  return state;
}

/// Cleans what an interrupted writer left in `dir`: peft's atomic writers build a file or folder
/// under `<name>.tmp-<16 hex digits>` and, where the system cannot swap two folders in one
/// step, move the previous one aside as `<name>.old-<16 hex digits>` for an instant. A process
/// killed in between leaves these behind. Temporary entries are removed; an `.old-` entry whose
/// `<name>` is missing is the last complete version and is moved back, any other is removed.
/// Returns the names it removed or restored. Call it only while no other process writes to
/// `dir` (the Trainer does on resume(), on rank 0).
inline std::vector<std::string> clean_interrupted_writes(const std::filesystem::path& dir) {
  namespace fs = std::filesystem;
  std::vector<std::string> cleaned;
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return cleaned;
  const auto split = [](const std::string& name, const std::string& marker, std::string& base) {
    const auto at = name.rfind(marker);
    if (at == std::string::npos || at == 0 || name.size() != at + marker.size() + 16) return false;
    if (name.find_first_not_of("0123456789abcdef", at + marker.size()) != std::string::npos)
      return false;
    base = name.substr(0, at);
    return true;
  };
  std::vector<fs::path> entries;
  for (const auto& entry : fs::directory_iterator(dir, ec)) entries.push_back(entry.path());
  for (const auto& path : entries) {
    const std::string name = path.filename().string();
    std::string base;
    if (split(name, ".old-", base) && !fs::exists(dir / base, ec)) {
      if (::rename(path.c_str(), (dir / base).c_str()) == 0) {
        cleaned.push_back(name + " -> " + base);
        continue;
      }
    }
    if (split(name, ".tmp-", base) || split(name, ".old-", base)) {
      fs::remove_all(path, ec);
      if (!ec) cleaned.push_back(name);
    }
  }
  if (!cleaned.empty()) detail::ckpt_sync_dir(dir);
  return cleaned;
}

/// The `checkpoint-<step>` folder under `output_dir` with the highest step and a manifest, or
/// nothing when there is none. Unfinished `*.tmp-*` folders of an interrupted save are ignored.
inline std::optional<std::filesystem::path> latest_checkpoint(
    const std::filesystem::path& output_dir) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (!fs::is_directory(output_dir, ec)) return std::nullopt;
  std::optional<fs::path> best;
  int64_t best_step = -1;
  for (const auto& entry : fs::directory_iterator(output_dir, ec)) {
    const std::string name = entry.path().filename().string();
    const std::string prefix = "checkpoint-";
    if (name.rfind(prefix, 0) != 0 || name.size() == prefix.size()) continue;
    const std::string digits = name.substr(prefix.size());
    if (digits.find_first_not_of("0123456789") != std::string::npos || digits.size() > 18) continue;
    if (!fs::is_regular_file(entry.path() / "manifest.json", ec)) continue;
    const int64_t step = std::stoll(digits);
    if (step > best_step) {
      best_step = step;
      best = entry.path();
    }
  }
  return best;
}

PEFT_NAMESPACE_END
