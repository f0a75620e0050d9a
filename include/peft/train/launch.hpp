#pragma once

// Starting a data-parallel run on one machine: N copies of a program, each told its place by the
// environment torchrun uses (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), watched
// until they end. When one fails, the others get `grace` to notice (their next collective fails
// and they report which rank died), then they are stopped; the launcher never waits forever on
// a run that cannot finish.
//
//   if (nproc > 1 && !peft::launch_env().from_env) return peft::launch_local(argv_of_self, opts);
//
// POSIX only (fork/exec, waitpid, kill).

#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <iostream>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include <fmt/format.h>

#include <torch/arg.h>

#include <peft/config.hpp>
#include <peft/core/error.hpp>

extern char** environ;

PEFT_NAMESPACE_BEGIN

/// Settings of launch_local().
struct LaunchOptions {
  /// The stream type of log (TORCH_ARG needs a single-token-safe type).
  using OstreamPtr = std::ostream*;
  /// Processes to start.
  TORCH_ARG(int, nproc) = 2;
  /// MASTER_ADDR given to them.
  TORCH_ARG(std::string, master_addr) = "127.0.0.1";
  /// MASTER_PORT given to them; 0: a port that is free now (found by binding port 0).
  TORCH_ARG(int, master_port) = 0;
  /// Intra-op threads of each process (OMP_NUM_THREADS, unless the environment sets it);
  /// 0: the machine's cores divided by nproc, at least 1.
  TORCH_ARG(int, threads) = 0;
  /// After the first process fails, how long the others may run on (to report what they saw)
  /// before they are sent SIGTERM, then SIGKILL.
  TORCH_ARG(std::chrono::milliseconds, grace) = std::chrono::seconds(15);
  /// Where the launcher's own messages go.
  TORCH_ARG(OstreamPtr, log) = &std::cerr;
};

/// A TCP port on 127.0.0.1 that nothing listens on now (the kernel picks it).
inline int free_local_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  check(fd >= 0, "launch", "socket(): {}", std::strerror(errno));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  socklen_t len = sizeof(addr);
  const bool ok = ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0 &&
                  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0;
  const int saved = errno;
  ::close(fd);
  check(ok, "launch", "could not find a free port: {}", std::strerror(saved));
  return ntohs(addr.sin_port);
}

/// Runs `args` (args[0] is the program; "/proc/self/exe" runs this one) `nproc` times with
/// RANK = 0..nproc-1 and the rest of the environment above, and waits for all of them. Returns 0
/// when every process succeeded, otherwise the first failure's exit status (128 + signal for a
/// process killed by one). Every failure is reported on `log` with its rank.
inline int launch_local(const std::vector<std::string>& args, const LaunchOptions& options = {}) {
  check(!args.empty(), "launch", "no program to launch");
  check(options.nproc() >= 1, "launch", "--nproc must be at least 1, got {}", options.nproc());
  const int port = options.master_port() > 0 ? options.master_port() : free_local_port();
  const unsigned cores = std::max(1u, std::thread::hardware_concurrency());
  const int threads = options.threads() > 0
                          ? options.threads()
                          : std::max(1, static_cast<int>(cores) / options.nproc());
  auto& log = *options.log();

  std::vector<pid_t> pids;
  std::map<pid_t, int> rank_of;
  auto stop_all = [&](int sig) {
    for (auto pid : pids) {
      if (pid > 0) ::kill(pid, sig);
    }
  };
  for (int rank = 0; rank < options.nproc(); ++rank) {
    std::map<std::string, std::string> env;
    for (char** e = environ; *e != nullptr; ++e) {
      const std::string kv = *e;
      const auto eq = kv.find('=');
      if (eq != std::string::npos) env[kv.substr(0, eq)] = kv.substr(eq + 1);
    }
    env["RANK"] = std::to_string(rank);
    env["LOCAL_RANK"] = std::to_string(rank);
    env["WORLD_SIZE"] = std::to_string(options.nproc());
    env["LOCAL_WORLD_SIZE"] = std::to_string(options.nproc());
    env["MASTER_ADDR"] = options.master_addr();
    env["MASTER_PORT"] = std::to_string(port);
    if (env.count("OMP_NUM_THREADS") == 0) env["OMP_NUM_THREADS"] = std::to_string(threads);
    std::vector<std::string> env_strings;
    for (const auto& [k, v] : env) env_strings.push_back(k + "=" + v);
    std::vector<char*> envp;
    for (auto& s : env_strings) envp.push_back(s.data());
    envp.push_back(nullptr);
    std::vector<std::string> argv_strings = args;
    std::vector<char*> argv;
    for (auto& s : argv_strings) argv.push_back(s.data());
    argv.push_back(nullptr);
    pid_t pid = -1;
    const int rc = ::posix_spawn(&pid, argv[0], nullptr, nullptr, argv.data(), envp.data());
    if (rc != 0) {
      stop_all(SIGKILL);
      for (auto p : pids) ::waitpid(p, nullptr, 0);
      fail("launch", "could not start rank {} ({}): {}", rank, args[0], std::strerror(rc));
    }
    pids.push_back(pid);
    rank_of[pid] = rank;
  }
  log << fmt::format("[launch] {} processes on {}:{}, {} thread{} each\n", options.nproc(),
                     options.master_addr(), port, threads, threads == 1 ? "" : "s")
      << std::flush;

  int first_failure = 0;
  size_t running = pids.size();
  std::chrono::steady_clock::time_point deadline{};
  bool termed = false;
  while (running > 0) {
    int status = 0;
    const pid_t pid = ::waitpid(-1, &status, first_failure != 0 ? WNOHANG : 0);
    if (pid < 0) {
      if (errno == EINTR) continue;
      break;
    }
    if (pid == 0) {
      // Someone failed; the others are still running.
      const auto now = std::chrono::steady_clock::now();
      if (now >= deadline) {
        if (!termed) {
          log << fmt::format("[launch] stopping the {} process{} still running\n", running,
                             running == 1 ? "" : "es");
          stop_all(SIGTERM);
          termed = true;
          deadline = now + std::chrono::seconds(5);
        } else {
          stop_all(SIGKILL);
        }
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      continue;
    }
    --running;
    const int rank = rank_of[pid];
    for (auto& p : pids) {
      if (p == pid) p = -1;
    }
    int code = 0;
    std::string how;
    if (WIFEXITED(status)) {
      code = WEXITSTATUS(status);
      how = fmt::format("exited with status {}", code);
    } else if (WIFSIGNALED(status)) {
      code = 128 + WTERMSIG(status);
      how = fmt::format("was killed by signal {} ({})", WTERMSIG(status),
                        ::strsignal(WTERMSIG(status)));
    }
    if (code != 0) {
      // Processes the launcher stopped itself are not the failure.
      if (!termed) log << fmt::format("[launch] rank {} {}\n", rank, how) << std::flush;
      if (first_failure == 0) {
        first_failure = code;
        deadline = std::chrono::steady_clock::now() + options.grace();
      }
    }
  }
  return first_failure;
}

PEFT_NAMESPACE_END
