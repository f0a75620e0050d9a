#pragma once

// Data-parallel training on PyTorch's own c10d: one process per device, a TCP store for the
// rendezvous, Gloo for the collectives on CPU.
//
//   auto group = peft::init_distributed();      // RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
//   auto rows = peft::shard_for_rank(shuffled_rows, group->world_size(), group->rank());
//   peft::Trainer<Batch> trainer(model, loss, options.collective(group));
//
// The Trainer then starts every rank from rank 0's trainable state, averages the gradients after
// each backward pass, reduces the logged loss, and lets rank 0 alone write logs and checkpoints.
//
// c10d is compiled into the pip wheel's LibTorch, but the wheel lacks the headers of Gloo that
// ProcessGroupGloo.hpp includes; peft's CMake finds them (Debian's libgloo-dev) and defines
// PEFT_WITH_C10D on the target peft::distributed when a probe that uses this header's c10d calls
// compiles and links. Without it, this header still compiles: distributed_available() is false
// and init_distributed() throws a peft::Error saying why (peft_distributed_unavailable_reason).
//
// Failures end in a peft::Error, never a hang: a rank that dies closes its sockets, so the others'
// next collective fails at once, and they then name the ranks that stopped answering (through
// the store: every rank that sees a failure reports it there, the silent ones are the dead).
// A rank that hangs is caught by the collective timeout (DistributedOptions::timeout).

#include <chrono>
#include <csignal>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <torch/arg.h>

#include <peft/config.hpp>
#include <peft/core/error.hpp>
#include <peft/train/collective.hpp>

#if defined(PEFT_WITH_C10D)
#ifndef USE_C10D_GLOO
#define USE_C10D_GLOO 1
#endif
#include <c10/util/Exception.h>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#endif

PEFT_NAMESPACE_BEGIN

/// Where this process stands in a run of several, as the launcher (peft's --nproc, torchrun, a
/// job scheduler) describes it in the environment.
struct LaunchEnv {
  int rank = 0;                           ///< RANK: this process, in [0, world_size)
  int world_size = 1;                     ///< WORLD_SIZE: processes in the run
  int local_rank = 0;                     ///< LOCAL_RANK: this process on its machine
  std::string master_addr = "127.0.0.1";  ///< MASTER_ADDR: the machine of rank 0
  int master_port = 29500;                ///< MASTER_PORT: where rank 0's store listens
  bool from_env = false;                  ///< WORLD_SIZE was set
};

namespace detail {

inline int launch_env_int(const char* name, int fallback, int lo, int hi) {
  const char* raw = std::getenv(name);
  if (raw == nullptr || *raw == '\0') return fallback;
  char* end = nullptr;
  const long v = std::strtol(raw, &end, 10);
  check(end != raw && *end == '\0' && v >= lo && v <= hi, "distributed",
        "environment variable {}=\"{}\" is not an integer in [{}, {}]", name, raw, lo, hi);
  return static_cast<int>(v);
}

/// Makes writes to a closed socket fail with EPIPE instead of killing the process with SIGPIPE,
/// as Python does at start-up (so torch.distributed never meets it). Gloo writes to its peers
/// with writev, which cannot ask for MSG_NOSIGNAL: without this, a rank writing to a dead peer
/// died silently of SIGPIPE before it could name the rank that stopped answering. Leaves a
/// handler the program installed itself alone. Returns whether SIGPIPE is now ignored or
/// handled (always true off POSIX, where there is no SIGPIPE).
inline bool ignore_sigpipe() {
#if defined(SIGPIPE)
  struct sigaction current {};
  if (::sigaction(SIGPIPE, nullptr, &current) != 0) return false;
  if (current.sa_handler != SIG_DFL) return true;
  struct sigaction ignore {};
  ignore.sa_handler = SIG_IGN;
  sigemptyset(&ignore.sa_mask);
  return ::sigaction(SIGPIPE, &ignore, nullptr) == 0;
#else
  return true;
#endif
}

}  // namespace detail

/// Reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT (the torchrun convention).
/// Without WORLD_SIZE the run is a single process. Throws peft::Error naming a malformed variable.
inline LaunchEnv launch_env() {
  LaunchEnv env;
  env.from_env = std::getenv("WORLD_SIZE") != nullptr;
  env.world_size = detail::launch_env_int("WORLD_SIZE", 1, 1, 1 << 20);
  env.rank = detail::launch_env_int("RANK", 0, 0, env.world_size - 1);
  env.local_rank = detail::launch_env_int("LOCAL_RANK", env.rank, 0, 1 << 20);
  env.master_port = detail::launch_env_int("MASTER_PORT", 29500, 1, 65535);
  if (const char* addr = std::getenv("MASTER_ADDR"); addr != nullptr && *addr != '\0') {
    env.master_addr = addr;
  }
  return env;
}

/// Settings of init_distributed(); unset fields come from the environment (launch_env()).
struct DistributedOptions {
  /// Rank of this process; -1: RANK.
  TORCH_ARG(int, rank) = -1;
  /// Processes in the run; -1: WORLD_SIZE.
  TORCH_ARG(int, world_size) = -1;
  /// Address of rank 0's store; empty: MASTER_ADDR (default 127.0.0.1).
  TORCH_ARG(std::string, master_addr) = {};
  /// Port of rank 0's store; 0: MASTER_PORT (default 29500).
  TORCH_ARG(int, master_port) = 0;
  /// How long the rendezvous waits for every rank to join.
  TORCH_ARG(std::chrono::milliseconds, connect_timeout) = std::chrono::seconds(120);
  /// How long one collective may wait for the other ranks (a hung rank fails the run after this).
  TORCH_ARG(std::chrono::milliseconds, timeout) = std::chrono::seconds(300);
  /// After a failed collective, how long a rank waits for the others to report theirs before it
  /// names the ranks that did not (the dead ones).
  TORCH_ARG(std::chrono::milliseconds, report_grace) = std::chrono::seconds(3);
};

/// Whether this build of peft can train on several processes (c10d and Gloo were found).
inline bool distributed_available() {
#if defined(PEFT_WITH_C10D)
  return true;
#else
  return false;
#endif
}

/// Why distributed training is unavailable ("" when it is available).
inline std::string distributed_unavailable_reason() {
#if defined(PEFT_WITH_C10D)
  return {};
#elif defined(PEFT_C10D_MISSING)
  return PEFT_C10D_MISSING;
#else
  return "peft/train/distributed.hpp was compiled without PEFT_WITH_C10D (link the CMake target "
         "peft::distributed, which defines it where LibTorch has c10d and Gloo's headers exist)";
#endif
}

#if defined(PEFT_WITH_C10D)

/// A Collective on a c10d process group (Gloo), with errors that name the rank that failed.
class ProcessGroup : public Collective {
 public:
  ProcessGroup(c10::intrusive_ptr<c10d::Store> store, c10::intrusive_ptr<c10d::Backend> backend,
               int rank, int world, DistributedOptions options, std::string where)
      : store_(std::move(store)),
        backend_(std::move(backend)),
        rank_(rank),
        world_(world),
        options_(std::move(options)),
        where_(std::move(where)) {}

  int rank() const override { return rank_; }
  int world_size() const override { return world_; }
  /// The c10d backend, for collectives this class does not wrap.
  c10::intrusive_ptr<c10d::Backend> backend() const { return backend_; }
  /// "MASTER_ADDR:MASTER_PORT" of the store.
  const std::string& store_address() const { return where_; }

  void all_reduce_sum(std::vector<torch::Tensor>& tensors, const std::string& what) override {
    count_reduced(tensors);
    const auto start = std::chrono::steady_clock::now();
    guarded(what, [&] {
      c10d::AllreduceOptions o;
      o.reduceOp = c10d::ReduceOp::SUM;
      backend_->allreduce(tensors, o)->wait();
    });
    count_reduce_time(
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }

  void broadcast(std::vector<torch::Tensor>& tensors, int root, const std::string& what) override {
    guarded(what, [&] {
      for (auto& t : tensors) {
        std::vector<torch::Tensor> one{t};
        c10d::BroadcastOptions o;
        o.rootRank = root;
        backend_->broadcast(one, o)->wait();
      }
    });
  }

  std::vector<torch::Tensor> all_gather(const torch::Tensor& tensor,
                                        const std::string& what) override {
    std::vector<std::vector<torch::Tensor>> out(1);
    for (int r = 0; r < world_; ++r) out[0].push_back(torch::empty_like(tensor));
    std::vector<torch::Tensor> in{tensor.contiguous()};
    guarded(what, [&] { backend_->allgather(out, in)->wait(); });
    return out[0];
  }

  void barrier(const std::string& what) override {
    guarded(what, [&] { backend_->barrier()->wait(); });
  }

 private:
  template <class F>
  void guarded(const std::string& what, F&& op) {
    std::string problem;
    try {
      op();
      return;
    } catch (const c10::Error& e) {
      problem = e.what_without_backtrace();
    } catch (const std::exception& e) {
      problem = e.what();
    }
    failed(what, problem);
  }

  // Reports this rank's failure in the store, waits a little for the others to report theirs,
  // and throws naming the ranks that stayed silent.
  [[noreturn]] void failed(const std::string& what, std::string problem) {
    if (auto cut = problem.find('\n'); cut != std::string::npos) problem.resize(cut);
    std::string who;
    try {
      store_->set(fmt::format("peft/failed/{}", rank_), problem);
      std::vector<int> silent;
      const auto deadline = std::chrono::steady_clock::now() + options_.report_grace();
      while (true) {
        silent.clear();
        for (int r = 0; r < world_; ++r) {
          if (r != rank_ && !store_->check({fmt::format("peft/failed/{}", r)})) silent.push_back(r);
        }
        if (silent.empty() || std::chrono::steady_clock::now() >= deadline) break;
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
      }
      who = silent.empty() ? "every other rank reported a failure too"
                           : fmt::format("rank{} {} stopped answering (killed, crashed or hung)",
                                         silent.size() == 1 ? "" : "s", fmt::join(silent, ", "));
    } catch (const std::exception&) {
      who = rank_ == 0 ? "the store is unreachable"
                       : fmt::format(
                             "rank 0 stopped answering (killed, crashed or hung): its "
                             "store at {} is unreachable",
                             where_);
    }
    fail("distributed", "rank {} of {}: {} failed: {}; {}", rank_, world_, what, problem, who);
  }

  c10::intrusive_ptr<c10d::Store> store_;
  c10::intrusive_ptr<c10d::Backend> backend_;
  int rank_ = 0;
  int world_ = 1;
  DistributedOptions options_;
  std::string where_;
};

/// Joins the run the environment (or `options`) describes: rank 0 opens a TCP store at
/// MASTER_ADDR:MASTER_PORT, every rank connects to it, and a Gloo process group forms over them.
/// Returns nullptr for a single process (WORLD_SIZE unset or 1). Throws peft::Error when the
/// port is in use, rank 0 cannot be reached, or not every rank joins within connect_timeout.
///
/// SIGPIPE is ignored from here on unless the program handles it itself (detail::ignore_sigpipe):
/// a write to a dead rank then fails with an error naming it instead of killing this process.
///
/// Gloo uses the network interface named by GLOO_SOCKET_IFNAME when it is set; otherwise the
/// loopback interface when MASTER_ADDR is a loopback address, and the one the host name resolves
/// to when it is not (set GLOO_SOCKET_IFNAME when that is not the interface the machines share).
inline std::shared_ptr<Collective> init_distributed(DistributedOptions options = {}) {
  const auto env = launch_env();
  const int world = options.world_size() > 0 ? options.world_size() : env.world_size;
  const int rank = options.rank() >= 0 ? options.rank() : env.rank;
  const auto addr = options.master_addr().empty() ? env.master_addr : options.master_addr();
  const int port = options.master_port() > 0 ? options.master_port() : env.master_port;
  check(rank >= 0 && rank < world, "distributed", "rank {} is not within a world of {} processes",
        rank, world);
  if (world <= 1) return nullptr;
  detail::ignore_sigpipe();
  const auto where = fmt::format("{}:{}", addr, port);
  const auto seconds = [](std::chrono::milliseconds ms) { return ms.count() / 1000.0; };

  c10::intrusive_ptr<c10d::Store> store;
  try {
    c10d::TCPStoreOptions so;
    so.port = static_cast<std::uint16_t>(port);
    so.isServer = rank == 0;
    so.numWorkers = static_cast<std::size_t>(world);
    so.waitWorkers = true;
    so.timeout = options.connect_timeout();
    store = c10::make_intrusive<c10d::TCPStore>(addr, so);
  } catch (const std::exception& e) {
    const auto* ce = dynamic_cast<const c10::Error*>(&e);
    std::string problem = ce != nullptr ? ce->what_without_backtrace() : e.what();
    if (auto cut = problem.find('\n'); cut != std::string::npos) problem.resize(cut);
    if (rank == 0 && (problem.find("EADDRINUSE") != std::string::npos ||
                      problem.find("already in use") != std::string::npos)) {
      fail("distributed",
           "rank 0 cannot listen on {} (MASTER_ADDR:MASTER_PORT): the port is in use, by an "
           "earlier run or another program; choose another port with MASTER_PORT (or "
           "--master-port): {}",
           where, problem);
    }
    if (rank == 0) {
      fail("distributed",
           "rank 0 could not open the store at {} (MASTER_ADDR:MASTER_PORT), or not all {} ranks "
           "joined it within {:g} s: {}",
           where, world, seconds(options.connect_timeout()), problem);
    }
    fail("distributed",
         "rank {} could not reach rank 0's store at {} (MASTER_ADDR:MASTER_PORT) within {:g} s: "
         "is rank 0 running, and is MASTER_ADDR an address of its machine that this one can "
         "reach? {}",
         rank, where, seconds(options.connect_timeout()), problem);
  }

  c10::intrusive_ptr<c10d::Backend> backend;
  try {
    auto gloo = c10d::ProcessGroupGloo::Options::create(options.timeout());
    if (const char* ifname = std::getenv("GLOO_SOCKET_IFNAME"); ifname && *ifname) {
      std::string names = ifname;
      size_t start = 0;
      while (start <= names.size()) {
        const auto comma = names.find(',', start);
        const auto name =
            names.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
        if (!name.empty()) {
          gloo->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(name));
        }
        if (comma == std::string::npos) break;
        start = comma + 1;
      }
    } else if (addr == "127.0.0.1" || addr == "localhost" || addr == "::1") {
      gloo->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
    } else {
      gloo->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
    }
    backend = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, gloo);
  } catch (const std::exception& e) {
    const auto* ce = dynamic_cast<const c10::Error*>(&e);
    std::string problem = ce != nullptr ? ce->what_without_backtrace() : e.what();
    if (auto cut = problem.find('\n'); cut != std::string::npos) problem.resize(cut);
    fail("distributed",
         "rank {} of {}: the Gloo process group did not form through the store at {}: {} (on "
         "several machines, set GLOO_SOCKET_IFNAME to the network interface they share)",
         rank, world, where, problem);
  }
  return std::make_shared<ProcessGroup>(store, backend, rank, world, options, where);
}

#else

/// A Collective on a c10d process group; this build has none (see distributed_available()).
class ProcessGroup;

/// Without c10d: nullptr for a single process, and for several a peft::Error saying why
/// distributed training is unavailable in this build.
inline std::shared_ptr<Collective> init_distributed(DistributedOptions options = {}) {
  const auto env = launch_env();
  const int world = options.world_size() > 0 ? options.world_size() : env.world_size;
  if (world <= 1) return nullptr;
  fail("distributed",
       "a run of {} processes was asked for, but distributed training is "
       "unavailable in this build: {}",
       world, distributed_unavailable_reason());
}

#endif

PEFT_NAMESPACE_END
