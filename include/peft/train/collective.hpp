#pragma once

// What data-parallel training needs from a group of processes, and the steps built on it.
//
// A Collective is the group: its rank and size and four operations (sum, broadcast, gather,
// barrier). peft/train/distributed.hpp implements it on PyTorch's c10d (Gloo on CPU); the
// Trainer uses it through TrainerOptions::collective() and knows nothing of c10d, so this header
// stays light and builds on every LibTorch.
//
// On top of the four operations, this header has what a data-parallel step does:
//   - broadcast_module_state(): rank 0's trainable parameters and buffers to every rank;
//   - GradientAverager: the trainable parameters' gradients averaged over the ranks, packed into
//     a few flat buffers (one reduction each) instead of one reduction per tensor;
//   - shard_for_rank() and shard_for_evaluation(): which rows a rank trains and evaluates on;
//   - gather_values(): every rank's values, concatenated, for metrics over the whole split.

#include <torch/nn/module.h>
#include <torch/types.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include <fmt/format.h>

#include <peft/config.hpp>
#include <peft/core/error.hpp>
#include <peft/core/parameters.hpp>

PEFT_NAMESPACE_BEGIN

/// A group of processes that train one model together, one process per device.
///
/// Every operation is collective: all ranks call it, in the same order, with tensors of the same
/// shapes and dtypes. `what` names the operation in the error a failure raises (for example
/// "gradients of step 12"). Implementations throw peft::Error when a rank fails or stops
/// answering, within a bounded time.
class Collective {
 public:
  virtual ~Collective() = default;

  /// This process's rank, in [0, world_size()).
  virtual int rank() const = 0;
  /// Processes in the group.
  virtual int world_size() const = 0;
  /// Rank 0: the one that writes checkpoints, adapters and logs.
  bool is_main() const { return rank() == 0; }

  /// Replaces each tensor by its elementwise sum over the ranks (contiguous tensors).
  virtual void all_reduce_sum(std::vector<torch::Tensor>& tensors, const std::string& what) = 0;
  /// Replaces each tensor by rank `root`'s (contiguous tensors).
  virtual void broadcast(std::vector<torch::Tensor>& tensors, int root,
                         const std::string& what) = 0;
  /// Every rank's `tensor` (the same shape and dtype on every rank), indexed by rank.
  virtual std::vector<torch::Tensor> all_gather(const torch::Tensor& tensor,
                                                const std::string& what) = 0;
  /// Returns once every rank has called it.
  virtual void barrier(const std::string& what) = 0;

  /// Bytes this process has handed to all_reduce_sum() so far (the payload; how many bytes a
  /// reduction puts on the wire depends on the algorithm, see docs/DISTRIBUTED.md).
  int64_t reduced_bytes() const { return reduced_bytes_; }
  /// Seconds this process has spent in all_reduce_sum() so far, waiting for slower ranks
  /// included: the most that overlapping the reductions with the backward pass could save.
  double reduce_seconds() const { return reduce_seconds_; }

 protected:
  /// Implementations add the payload of every all_reduce_sum() here.
  void count_reduced(const std::vector<torch::Tensor>& tensors) {
    for (const auto& t : tensors)
      reduced_bytes_ += t.numel() * static_cast<int64_t>(t.element_size());
  }
  /// Implementations add the time every all_reduce_sum() took here.
  void count_reduce_time(double seconds) { reduce_seconds_ += seconds; }

 private:
  int64_t reduced_bytes_ = 0;
  double reduce_seconds_ = 0.0;
};

namespace detail {

// Tensors packed into flat buffers: consecutive tensors of one dtype and device share a buffer
// until it would exceed `bucket_bytes` (a tensor larger than that gets a buffer of its own).
struct FlatBuckets {
  struct Bucket {
    std::vector<size_t> members;  // indices into the tensor list
    int64_t numel = 0;
    torch::TensorOptions options;
  };
  std::vector<Bucket> buckets;

  FlatBuckets(const std::vector<torch::Tensor>& tensors, int64_t bucket_bytes) {
    for (size_t i = 0; i < tensors.size(); ++i) {
      const auto& t = tensors[i];
      const int64_t bytes = t.numel() * static_cast<int64_t>(t.element_size());
      const bool fits =
          !buckets.empty() && buckets.back().options.dtype() == t.dtype() &&
          buckets.back().options.device() == t.device() &&
          (buckets.back().numel * static_cast<int64_t>(t.element_size()) + bytes <= bucket_bytes);
      if (!fits) {
        buckets.push_back({});
        buckets.back().options = torch::TensorOptions().dtype(t.dtype()).device(t.device());
      }
      buckets.back().members.push_back(i);
      buckets.back().numel += t.numel();
    }
  }
};

}  // namespace detail

/// Copies rank `root`'s trainable parameters and buffers (all of them: a method's frozen random
/// matrices are buffers, and they must match) into every rank's `module`, so that every rank
/// starts from the same state whatever its seed. Frozen parameters are not sent: every rank
/// loads them from the same pretrained files.
inline void broadcast_module_state(Collective& group, torch::nn::Module& module, int root = 0,
                                   int64_t bucket_bytes = int64_t{64} << 20) {
  if (group.world_size() <= 1) return;
  std::vector<torch::Tensor> tensors = trainable_parameters(module);
  for (const auto& b : module.buffers()) tensors.push_back(b);
  const detail::FlatBuckets plan(tensors, bucket_bytes);
  torch::NoGradGuard no_grad;
  for (const auto& bucket : plan.buckets) {
    std::vector<torch::Tensor> parts;
    for (auto i : bucket.members) parts.push_back(tensors[i].detach().reshape({-1}));
    std::vector<torch::Tensor> flat{torch::cat(parts)};
    group.broadcast(flat, root, "the initial parameters and buffers");
    int64_t offset = 0;
    for (auto i : bucket.members) {
      auto& t = tensors[i];
      t.copy_(flat[0].narrow(0, offset, t.numel()).view(t.sizes()));
      offset += t.numel();
    }
  }
}

/// Averages the gradients of a fixed list of parameters over the ranks of a Collective.
///
/// The gradients travel in a few flat buffers (at most `bucket_bytes` each, 64 MiB by default:
/// LoRA on MiniLM fits in one), one reduction per buffer. A parameter without a gradient on a
/// rank (unused by its batch) counts as zeros there; one without a gradient on every rank keeps
/// none, as in a single process, so the optimizer skips it the same way. Which parameters have
/// one is agreed in a small reduction that also carries the caller's values (the loss, a flag
/// for a non-finite loss), so a step costs two reductions whatever the model.
class GradientAverager {
 public:
  GradientAverager(std::vector<torch::Tensor> params, int64_t bucket_bytes = int64_t{64} << 20)
      : params_(std::move(params)), plan_(params_, bucket_bytes) {}

  /// Sums `values` over the ranks (returned) and replaces every gradient by its mean over the
  /// ranks. `what` names the step in errors.
  std::vector<double> average(Collective& group, const std::vector<double>& values,
                              const std::string& what) {
    const int world = group.world_size();
    const size_t n = params_.size();
    // values, then one "has a gradient" count per parameter.
    auto status = torch::zeros({static_cast<int64_t>(values.size() + n)}, torch::kDouble);
    auto* s = status.data_ptr<double>();
    for (size_t i = 0; i < values.size(); ++i) s[i] = values[i];
    for (size_t i = 0; i < n; ++i) s[values.size() + i] = params_[i].grad().defined() ? 1.0 : 0.0;
    if (world > 1) {
      std::vector<torch::Tensor> one{status};
      group.all_reduce_sum(one, what);
      status = one[0];
      s = status.data_ptr<double>();
    }
    std::vector<double> summed(s, s + values.size());
    if (world <= 1) return summed;
    torch::NoGradGuard no_grad;
    for (const auto& bucket : plan_.buckets) {
      bool any = false;
      for (auto i : bucket.members) any = any || s[values.size() + i] > 0;
      if (!any) continue;
      auto flat = torch::zeros({bucket.numel}, bucket.options);
      int64_t offset = 0;
      for (auto i : bucket.members) {
        const auto& p = params_[i];
        if (p.grad().defined()) flat.narrow(0, offset, p.numel()).copy_(p.grad().reshape({-1}));
        offset += p.numel();
      }
      std::vector<torch::Tensor> one{flat};
      group.all_reduce_sum(one, what);
      one[0].div_(static_cast<double>(world));
      offset = 0;
      for (auto i : bucket.members) {
        auto& p = params_[i];
        if (s[values.size() + i] > 0) {
          auto mean = one[0].narrow(0, offset, p.numel()).view(p.sizes());
          if (p.grad().defined()) {
            p.mutable_grad().copy_(mean);
          } else {
            p.mutable_grad() = mean.clone();
          }
        }
        offset += p.numel();
      }
    }
    return summed;
  }

  /// Buffers the gradients travel in.
  size_t buckets() const { return plan_.buckets.size(); }
  /// Bytes of gradients one step reduces when every parameter has one.
  int64_t bytes_per_step() const {
    int64_t bytes = 0;
    for (const auto& p : params_) bytes += p.numel() * static_cast<int64_t>(p.element_size());
    return bytes;
  }

 private:
  std::vector<torch::Tensor> params_;
  detail::FlatBuckets plan_;
};

/// The rows rank `rank` of `world` trains on, in the order it should batch them. Rows are
/// dealt out in turn (row i to rank i % world) after the list is padded with its first rows to
/// a multiple of `world`, so every rank has as many rows. With a global batch of B rows (B a
/// multiple of world) and local batches of B / world, batch k on every rank holds exactly the
/// rows of batch k of a single process, split between the ranks: the averaged gradient is the
/// single process's one. Shuffle `rows` first, the same way on every rank.
template <class Row>
std::vector<Row> shard_for_rank(const std::vector<Row>& rows, int world, int rank) {
  check(world >= 1 && rank >= 0 && rank < world, "distributed",
        "rank {} is not within a world of {} processes", rank, world);
  check(!rows.empty(), "distributed", "there are no rows to share between {} ranks", world);
  const size_t padded = (rows.size() + world - 1) / world * world;
  std::vector<Row> out;
  out.reserve(padded / world);
  for (size_t i = static_cast<size_t>(rank); i < padded; i += static_cast<size_t>(world)) {
    out.push_back(rows[i % rows.size()]);
  }
  return out;
}

/// The rows rank `rank` evaluates: row i goes to rank i % world, without padding (a rank may
/// have one row fewer), so gathering every rank's predictions counts each row once.
template <class Row>
std::vector<Row> shard_for_evaluation(const std::vector<Row>& rows, int world, int rank) {
  check(world >= 1 && rank >= 0 && rank < world, "distributed",
        "rank {} is not within a world of {} processes", rank, world);
  std::vector<Row> out;
  for (size_t i = static_cast<size_t>(rank); i < rows.size(); i += static_cast<size_t>(world)) {
    out.push_back(rows[i]);
  }
  return out;
}

/// Every rank's `values`, concatenated in rank order (ranks may hold different counts).
inline std::vector<double> gather_values(Collective& group, const std::vector<double>& values,
                                         const std::string& what) {
  if (group.world_size() <= 1) return values;
  const auto counts = group.all_gather(
      torch::full({1}, static_cast<int64_t>(values.size()), torch::kLong), what + " (counts)");
  int64_t most = 0;
  for (const auto& c : counts) most = std::max(most, c.item<int64_t>());
  auto mine = torch::zeros({std::max<int64_t>(most, 1)}, torch::kDouble);
  std::copy(values.begin(), values.end(), mine.data_ptr<double>());
  const auto all = group.all_gather(mine, what);
  std::vector<double> out;
  for (size_t r = 0; r < all.size(); ++r) {
    const auto* p = all[r].data_ptr<double>();
    out.insert(out.end(), p, p + counts[r].item<int64_t>());
  }
  return out;
}

/// Sums `values` over the ranks.
inline std::vector<double> all_reduce_sum(Collective& group, const std::vector<double>& values,
                                          const std::string& what) {
  if (group.world_size() <= 1 || values.empty()) return values;
  auto t = torch::tensor(values, torch::kDouble);
  std::vector<torch::Tensor> one{t};
  group.all_reduce_sum(one, what);
  const auto* p = one[0].data_ptr<double>();
  return {p, p + values.size()};
}

/// For a loss that is the mean over this rank's `count` items (labelled tokens, say) when the
/// ranks hold different counts: `loss` scaled by count * world / (every rank's count), so that
/// the Trainer's averaging of gradients over the ranks gives the gradient of the mean over every
/// rank's items, as one process with the whole batch computes it. (Averaging per-rank means
/// instead weighs a token of a rank with few tokens more.) One all_reduce of one number per call:
/// every rank must call it for every batch it computes a loss on (with gradient accumulation
/// too), in the same order. peft::Trainer keeps that order when a rank's loss is not finite:
/// it still computes the losses of the rest of the accumulation window on that rank. A rank with
/// `count` 0 must still call it, with a finite `loss` (its gradient is multiplied by 0). Without a
/// group or with one rank, `loss` as it is. `global_mean`, when given, receives the loss over every
/// rank's items (the value one process with the whole batch would log; 0 when no rank has an item),
/// carried by the same reduction (of two numbers then: every rank must pass it, or none).
inline torch::Tensor mean_over_ranks(const torch::Tensor& loss, int64_t count, Collective* group,
                                     double* global_mean = nullptr) {
  if (group == nullptr || group->world_size() <= 1) {
    if (global_mean != nullptr) *global_mean = loss.item<double>();
    return loss;
  }
  // With global_mean, the loss's value times its count travels in the same reduction.
  std::vector<double> sums{static_cast<double>(count)};
  if (global_mean != nullptr) sums.push_back(loss.item<double>() * static_cast<double>(count));
  sums = all_reduce_sum(*group, sums, "the loss's item count");
  const double total = sums.front();
  if (global_mean != nullptr) *global_mean = total > 0 ? sums[1] / total : 0.0;
  if (total <= 0) return loss * 0.0;
  return loss * (static_cast<double>(count) * group->world_size() / total);
}

/// Rank `root`'s metrics on every rank (the keys must be the same on every rank).
inline std::map<std::string, double> broadcast_metrics(Collective& group,
                                                       const std::map<std::string, double>& metrics,
                                                       int root, const std::string& what) {
  if (group.world_size() <= 1) return metrics;
  const auto sizes = group.all_gather(
      torch::full({1}, static_cast<int64_t>(metrics.size()), torch::kLong), what + " (counts)");
  for (size_t r = 0; r < sizes.size(); ++r) {
    check(sizes[r].item<int64_t>() == static_cast<int64_t>(metrics.size()), "distributed",
          "{}: rank {} has {} metrics, rank {} has {}; every rank's evaluation must return the "
          "same names",
          what, r, sizes[r].item<int64_t>(), group.rank(), metrics.size());
  }
  std::vector<double> values;
  for (const auto& [k, v] : metrics) values.push_back(v);
  if (values.empty()) return metrics;
  auto t = torch::tensor(values, torch::kDouble);
  std::vector<torch::Tensor> one{t};
  group.broadcast(one, root, what);
  std::map<std::string, double> out;
  size_t i = 0;
  for (const auto& [k, v] : metrics) out[k] = one[0].data_ptr<double>()[i++];
  return out;
}

PEFT_NAMESPACE_END
