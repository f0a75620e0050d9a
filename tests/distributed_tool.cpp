// The data-parallel checks CTest runs (tests/CMakeLists.txt), each a mode of this program:
//
//   parity  --method M --out DIR   trains a small BERT with method M in one process on global
//                                  batches of 8, then in 2 processes on the loopback address
//                                  (4 rows each), and compares the trained tensors (<= 1e-5)
//   resume  --out DIR              a 2-process run that crashes after its step-6 checkpoint
//                                  resumes to the same tensors as an uninterrupted one
//   kill    --out DIR              rank 1 is killed mid-run: rank 0 must stop with an error that
//                                  names rank 1, within 60 s
//   port                           rank 0 on a port already in use: a clear error
//   unreachable                    rank 1 with nobody at MASTER_ADDR:MASTER_PORT: a clear error
//
// The modes start their own ranks (peft::launch_local) and run them under `--rank-of MODE`;
// each rank writes its error, if any, to DIR/rank<r>.err for the parent to check.
//
// Without c10d (PEFT_WITH_C10D undefined) every mode but `unavailable` reports that distributed
// training is unavailable, which the `distributed.unavailable` test checks.

#include <peft/peft.hpp>
#include <peft/models/bert.hpp>
#include <peft/models/heads.hpp>
#include <peft/train/distributed.hpp>
#include <peft/train/launch.hpp>

#include <torch/torch.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

namespace fs = std::filesystem;

namespace {

constexpr int64_t kRows = 64, kGlobalBatch = 8, kSeqLen = 12, kLabels = 3;

struct Batch {
  torch::Tensor ids, mask, labels;
  Batch to(const torch::Device& d) const { return {ids.to(d), mask.to(d), labels.to(d)}; }
};

// A 2-layer BERT with random weights, frozen, dropout off, with `method` attached and a new head.
peft::models::BertForSequenceClassification make_model(const std::string& method) {
  torch::manual_seed(7);
  const nlohmann::json config = {{"model_type", "bert"},
                                 {"hidden_size", 32},
                                 {"num_hidden_layers", 2},
                                 {"num_attention_heads", 2},
                                 {"intermediate_size", 64},
                                 {"hidden_act", "gelu"},
                                 {"layer_norm_eps", 1e-12},
                                 {"vocab_size", 50},
                                 {"max_position_embeddings", 32},
                                 {"type_vocab_size", 2},
                                 {"hidden_dropout_prob", 0.0},
                                 {"attention_probs_dropout_prob", 0.0},
                                 {"pad_token_id", 0}};
  peft::models::Bert bert(peft::models::BertConfig::from_json(config));
  peft::freeze(*bert);
  peft::models::BertForSequenceClassification model(bert, kLabels);
  nlohmann::json options = nlohmann::json::object();
  if (method == "lora")
    options = {{"r", 4}, {"lora_alpha", 8}, {"target_modules", {"query", "value"}}};
  peft::attach(*model, method, options);
  return model;
}

// kRows rows of random tokens with padded tails and random labels, the same in every process.
std::vector<Batch> rows() {
  torch::manual_seed(123);
  auto ids = torch::randint(1, 50, {kRows, kSeqLen}, torch::kLong);
  auto lengths = torch::randint(4, kSeqLen + 1, {kRows}, torch::kLong);
  auto mask = (torch::arange(kSeqLen).unsqueeze(0) < lengths.unsqueeze(1)).to(torch::kLong);
  ids = ids * mask;
  auto labels = torch::randint(0, kLabels, {kRows}, torch::kLong);
  std::vector<Batch> out;
  for (int64_t i = 0; i < kRows; ++i) {
    out.push_back({ids[i].unsqueeze(0), mask[i].unsqueeze(0), labels[i].unsqueeze(0)});
  }
  return out;
}

std::vector<Batch> batch_rows(const std::vector<Batch>& rows, int64_t size) {
  std::vector<Batch> out;
  for (size_t i = 0; i < rows.size(); i += static_cast<size_t>(size)) {
    std::vector<torch::Tensor> ids, mask, labels;
    for (size_t j = i; j < std::min(rows.size(), i + static_cast<size_t>(size)); ++j) {
      ids.push_back(rows[j].ids);
      mask.push_back(rows[j].mask);
      labels.push_back(rows[j].labels);
    }
    out.push_back({torch::cat(ids), torch::cat(mask), torch::cat(labels)});
  }
  return out;
}

struct RunOptions {
  std::string method = "lora";
  fs::path output;
  int64_t save_every = 0;
  bool resume = false;
  int64_t crash_at_call = 0;  // throw from the loss function at this call (1-based)
  int64_t kill_at_call = 0;   // rank 1 kills itself at this call
  // Gradient accumulation over this many batches, and a loss weighted by every rank's rows
  // (peft::mean_over_ranks, a collective inside the loss function); rank 0 (or the single
  // process) returns a NaN loss at call nan_at_call, skipped with NanPolicy::skip.
  int64_t accumulation = 1;
  bool weighted_loss = false;
  int64_t nan_at_call = 0;
};

// What a run leaves: the trained tensors and the steps it skipped.
struct Trained {
  std::vector<std::pair<std::string, torch::Tensor>> tensors;
  int64_t skipped_steps = 0;
};

// Trains (in this process, as one rank of `group` or alone).
Trained train(const RunOptions& run, const std::shared_ptr<peft::Collective>& group) {
  auto model = make_model(run.method);
  const int world = group ? group->world_size() : 1;
  const int rank = group ? group->rank() : 0;
  auto mine = group ? peft::shard_for_rank(rows(), world, rank) : rows();
  const auto batches = batch_rows(mine, kGlobalBatch / world);
  const auto eval_rows = peft::shard_for_evaluation(rows(), world, rank);
  int64_t calls = 0;
  auto loss = [&](const Batch& b) {
    ++calls;
    if (run.crash_at_call > 0 && calls == run.crash_at_call) {
      throw std::runtime_error("deliberate crash (resume test)");
    }
    if (run.kill_at_call > 0 && rank == 1 && calls == run.kill_at_call) ::raise(SIGKILL);
    auto loss = torch::nn::functional::cross_entropy(model(b.ids, b.mask), b.labels);
    if (run.weighted_loss) loss = peft::mean_over_ranks(loss, b.labels.size(0), group.get());
    if (run.nan_at_call > 0 && rank == 0 && calls == run.nan_at_call) {
      loss = loss * std::numeric_limits<double>::quiet_NaN();
    }
    return loss;
  };
  std::ostringstream quiet;
  peft::Trainer<Batch> trainer(
      model, loss,
      peft::TrainerOptions()
          .epochs(2)
          .grad_accumulation(run.accumulation)
          .nan_policy(run.nan_at_call > 0 ? peft::NanPolicy::skip : peft::NanPolicy::stop)
          .lr(1e-2)
          .weight_decay(0.01)
          .warmup_ratio(0.1)
          .grad_clip(1.0)
          .seed(42)
          .save_every(run.save_every)
          .keep_checkpoints(0)
          .output_dir(run.output)
          .metric("accuracy")
          .progress_stream(&quiet)
          .collective(group));
  // Accuracy over every row, each rank scoring its share (exercises the gather).
  trainer.evaluate_with([&] {
    std::vector<double> hits;
    for (const auto& b : eval_rows) {
      hits.push_back(model(b.ids, b.mask).argmax(-1).eq(b.labels).item<bool>() ? 1.0 : 0.0);
    }
    if (group) hits = peft::gather_values(*group, hits, "evaluation");
    double sum = 0;
    for (double h : hits) sum += h;
    if (static_cast<int64_t>(hits.size()) != kRows) {
      throw std::runtime_error("the evaluation did not see every row once");
    }
    return std::map<std::string, double>{{"accuracy", sum / static_cast<double>(hits.size())}};
  });
  if (run.resume) trainer.resume();
  const auto result = trainer.fit(batches);
  return {peft::named_trainable_parameters(*model), result.skipped_steps};
}

void write_tensors(const fs::path& path,
                   const std::vector<std::pair<std::string, torch::Tensor>>& tensors) {
  peft::io::save_safetensors(path, tensors);
}

// The largest elementwise difference between two sets of named tensors.
double max_diff(const std::vector<std::pair<std::string, torch::Tensor>>& a,
                const std::vector<std::pair<std::string, torch::Tensor>>& b) {
  if (a.size() != b.size()) throw std::runtime_error("different tensor counts");
  double most = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (a[i].first != b[i].first) throw std::runtime_error("different tensor names");
    most = std::max(most, (a[i].second - b[i].second).abs().max().item<double>());
  }
  return most;
}

std::vector<std::pair<std::string, torch::Tensor>> read_tensors(const fs::path& path) {
  return peft::io::load_safetensors(path);
}

std::string read_text(const fs::path& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

std::string arg(const std::vector<std::string>& args, const std::string& name,
                const std::string& fallback = "") {
  for (size_t i = 0; i + 1 < args.size(); ++i) {
    if (args[i] == name) return args[i + 1];
  }
  return fallback;
}

// Runs this program's rank mode `mode` on 2 local processes; returns the launcher's status.
int launch(const std::string& mode, const std::vector<std::string>& extra) {
  std::vector<std::string> args{"/proc/self/exe", "--rank-of", mode};
  args.insert(args.end(), extra.begin(), extra.end());
  return peft::launch_local(
      args, peft::LaunchOptions().nproc(2).threads(1).grace(std::chrono::seconds(20)));
}

int fail_check(const std::string& what) {
  std::cout << "distributed " << what << ": FAILED\n";
  return 1;
}

// One rank of a launched run.
int rank_main(const std::string& mode, const std::vector<std::string>& args) {
  const fs::path out = arg(args, "--out");
  const auto env = peft::launch_env();
  try {
    auto group = peft::init_distributed();
    RunOptions run;
    run.method = arg(args, "--method", "lora");
    if (mode == "parity") {
      run.output = out / ("dist-" + run.method);
      const auto trained = train(run, group).tensors;
      if (group->is_main()) write_tensors(out / ("dist-" + run.method + ".safetensors"), trained);
    } else if (mode == "nan") {
      run.accumulation = 2;
      run.weighted_loss = true;
      run.nan_at_call = 3;
      const auto trained = train(run, group);
      // Both ranks write: their tensors must be identical, and both must have skipped the step.
      write_tensors(out / fmt::format("nan-rank{}.safetensors", group->rank()), trained.tensors);
      std::ofstream(out / fmt::format("nan-rank{}.skipped", group->rank()))
          << trained.skipped_steps;
    } else if (mode == "resume-crash") {
      run.output = out / "resumed";
      run.save_every = 3;
      run.crash_at_call = 8;
      train(run, group);
    } else if (mode == "resume-finish") {
      run.output = out / "resumed";
      run.save_every = 3;
      run.resume = true;
      const auto trained = train(run, group).tensors;
      if (group->is_main()) write_tensors(out / "resumed.safetensors", trained);
    } else if (mode == "kill") {
      run.kill_at_call = 5;
      train(run, group);
    }
    group->barrier("the end of the run");
    return 0;
  } catch (const std::exception& e) {
    std::ofstream(out / fmt::format("rank{}.err", env.rank)) << e.what();
    std::cerr << fmt::format("rank {}: {}\n", env.rank, e.what());
    return 1;
  }
}

int parity(const fs::path& out, const std::string& method) {
  fs::remove_all(out);
  fs::create_directories(out);
  const auto start = make_model(method);
  const auto before = peft::named_trainable_parameters(*start);
  RunOptions run;
  run.method = method;
  run.output = out / ("single-" + method);
  const auto single = train(run, nullptr).tensors;
  if (launch("parity", {"--method", method, "--out", out.string()}) != 0) {
    return fail_check("parity " + method + " (a rank failed)");
  }
  const auto dist = read_tensors(out / ("dist-" + method + ".safetensors"));
  const double diff = max_diff(single, dist);
  const double moved = max_diff(single, before);
  std::cout << fmt::format(
      "{}: 2 ranks x 4 rows vs 1 process x 8 rows, 16 steps: max |difference| {:.3g} over {} "
      "tensors; training moved them by up to {:.3g}\n",
      method, diff, dist.size(), moved);
  // The run must have trained (or equality would prove nothing), and both runs must agree.
  if (!(moved > 1e-3) || !(diff <= 1e-5)) return fail_check("parity " + method);
  std::cout << "distributed parity " << method << ": passed\n";
  return 0;
}

// A NaN loss on rank 0 at the first batch of an accumulation window, with a loss function that
// itself calls a collective: rank 0 must still compute the window's second loss (else the ranks'
// collectives go out of step and the run hangs or fails), both ranks skip the step, and the
// result equals one process that skips the same step.
int nan_skip(const fs::path& out) {
  fs::remove_all(out);
  fs::create_directories(out);
  const auto before = peft::named_trainable_parameters(*make_model("lora"));
  RunOptions run;
  run.accumulation = 2;
  run.weighted_loss = true;
  run.nan_at_call = 3;
  const auto single = train(run, nullptr);
  if (launch("nan", {"--out", out.string()}) != 0) return fail_check("nan (a rank failed)");
  const auto rank0 = read_tensors(out / "nan-rank0.safetensors");
  const auto rank1 = read_tensors(out / "nan-rank1.safetensors");
  const auto skipped0 = read_text(out / "nan-rank0.skipped");
  const auto skipped1 = read_text(out / "nan-rank1.skipped");
  const double diff = max_diff(single.tensors, rank0);
  const double between = max_diff(rank0, rank1);
  const double moved = max_diff(single.tensors, before);
  std::cout << fmt::format(
      "NaN at rank 0's first batch of step 2 (accumulation 2): skipped steps single {}, rank 0 "
      "{}, rank 1 {}; max |difference| single vs rank 0 {:.3g}, rank 0 vs rank 1 {:.3g}; moved "
      "{:.3g}\n",
      single.skipped_steps, skipped0, skipped1, diff, between, moved);
  if (single.skipped_steps != 1 || skipped0 != "1" || skipped1 != "1") {
    return fail_check("nan (every run must skip exactly the one step)");
  }
  if (!(moved > 1e-3) || !(diff <= 1e-5) || between != 0.0) return fail_check("nan");
  std::cout << "distributed nan: passed\n";
  return 0;
}

int resume(const fs::path& out) {
  fs::remove_all(out);
  fs::create_directories(out);
  if (launch("parity", {"--method", "lora", "--out", out.string()}) != 0) {
    return fail_check("resume (the uninterrupted run failed)");
  }
  if (launch("resume-crash", {"--out", out.string()}) == 0) {
    return fail_check("resume (the crashing run did not fail)");
  }
  if (!fs::exists(out / "resumed" / "checkpoint-6")) return fail_check("resume (no checkpoint-6)");
  if (launch("resume-finish", {"--out", out.string()}) != 0) {
    return fail_check("resume (the resumed run failed)");
  }
  const double diff = max_diff(read_tensors(out / "dist-lora.safetensors"),
                               read_tensors(out / "resumed.safetensors"));
  std::cout << fmt::format("resumed from checkpoint-6 of 2 ranks: max |difference| {:.3g}\n", diff);
  if (diff != 0.0) return fail_check("resume");
  std::cout << "distributed resume: passed\n";
  return 0;
}

int kill(const fs::path& out) {
  fs::remove_all(out);
  fs::create_directories(out);
  const auto t0 = std::chrono::steady_clock::now();
  const int rc = launch("kill", {"--out", out.string()});
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const auto error = read_text(out / "rank0.err");
  std::cout << fmt::format("launcher status {} after {:.1f} s; rank 0 said: {}\n", rc, seconds,
                           error);
  if (rc == 0 || seconds > 60 || error.find("rank 1 stopped answering") == std::string::npos) {
    return fail_check("kill");
  }
  std::cout << "distributed kill: passed\n";
  return 0;
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "(no error)";
}

int port() {
  // Hold a port the way another program would, then ask rank 0 to listen there.
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(addr);
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 || ::listen(fd, 1) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    return fail_check("port (could not hold a port)");
  }
  const int held = ntohs(addr.sin_port);
  const auto error = error_of([&] {
    peft::init_distributed(
        peft::DistributedOptions().rank(0).world_size(2).master_port(held).connect_timeout(
            std::chrono::seconds(5)));
  });
  ::close(fd);
  std::cout << error << "\n";
  if (error.find("in use") == std::string::npos ||
      error.find(std::to_string(held)) == std::string::npos) {
    return fail_check("port");
  }
  std::cout << "distributed port: passed\n";
  return 0;
}

int unreachable() {
  const int free_port = peft::free_local_port();
  const auto t0 = std::chrono::steady_clock::now();
  const auto error = error_of([&] {
    peft::init_distributed(
        peft::DistributedOptions().rank(1).world_size(2).master_port(free_port).connect_timeout(
            std::chrono::seconds(3)));
  });
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::cout << error << fmt::format("\n(after {:.1f} s)\n", seconds);
  if (error.find("could not reach rank 0's store") == std::string::npos || seconds > 30) {
    return fail_check("unreachable");
  }
  std::cout << "distributed unreachable: passed\n";
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  const std::vector<std::string> args(argv + 1, argv + argc);
  if (args.empty()) {
    std::cerr << "usage: peft_distributed_tool parity|resume|kill|port|unreachable|unavailable "
                 "[--method M] [--out DIR]\n";
    return 2;
  }
  try {
    if (args[0] == "--rank-of" && args.size() >= 2) return rank_main(args[1], args);
    const std::string mode = args[0];
    if (mode == "unavailable") {
      // Without c10d: a run of 2 must be refused with the reason.
      const auto error = error_of(
          [] { peft::init_distributed(peft::DistributedOptions().rank(0).world_size(2)); });
      std::cout << error << "\n";
      if (peft::distributed_available() ||
          error.find("unavailable in this build") == std::string::npos) {
        return fail_check("unavailable");
      }
      std::cout << "distributed unavailable: passed\n";
      return 0;
    }
    if (!peft::distributed_available()) {
      std::cout << "distributed training is unavailable: " << peft::distributed_unavailable_reason()
                << "\n";
      return 1;
    }
    const fs::path out =
        arg(args, "--out", (fs::temp_directory_path() / "peft_distributed").string());
    if (mode == "parity") return parity(out, arg(args, "--method", "lora"));
    if (mode == "resume") return resume(out);
    if (mode == "nan") return nan_skip(out);
    if (mode == "kill") return kill(out);
    if (mode == "port") return port();
    if (mode == "unreachable") return unreachable();
    std::cerr << "unknown mode " << mode << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << e.what() << "\n";
    return 1;
  }
}
