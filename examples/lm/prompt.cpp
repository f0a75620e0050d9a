// peft-lm prompt: few-shot and zero-shot classification with the decoder's language-model head.
//
//   peft-lm prompt --task sst2 --shots 0                      # zero-shot, built-in template
//   peft-lm prompt --task sst2                                # 16 per class, LoRA, 5 seeds,
//                                                             # random demonstrations
//   peft-lm prompt --task mrpc --demos none                   # without demonstrations
//   peft-lm prompt --task rte --mode head                     # classification head, same shots
//   peft-lm prompt --task sst2 --mode pet                     # PET: ensemble -> soft labels
//   peft-lm prompt --task sst2 --template "{sentence} Overall: {mask}"
//       --verbalizer "negative=bad|awful,positive=good" --seeds 1 --out out/sst2-prompt
//
// Every run prints one JSON object: per-seed metrics on the validation rows and their mean and
// standard deviation.

#include "prompt.hpp"

#include <peft/core/attach.hpp>
#include <peft/core/parameters.hpp>
#include <peft/data/clue.hpp>
#include <peft/data/glue.hpp>
#include <peft/data/split.hpp>
#include <peft/methods/lora.hpp>
#include <peft/models/llama.hpp>
#include <peft/tasks/prompting.hpp>
#include <peft/train/metrics.hpp>
#include <peft/train/trainer.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <iostream>
#include <map>
#include <numeric>
#include <string>
#include <vector>

#include "../common/model_path.hpp"

namespace lm {
namespace {

namespace fs = std::filesystem;
namespace pp = peft::prompting;
using peft::data::Example;

// Validation rows carved from train when a task has no dev file: as peft-glue carves them.
constexpr double kHoldoutFraction = 0.15;
constexpr std::size_t kHoldoutCap = 1000;

struct Task {
  std::string name, eval_split;
  peft::data::TaskInfo info;
  std::vector<std::string> fields;
  std::vector<Example> train, eval;
  bool regression() const { return info.num_labels == 1; }
};

bool is_glue(const std::string& task) {
  const auto names = peft::data::glue::task_names();
  return std::find(names.begin(), names.end(), task) != names.end();
}

Task load_task(const PromptArgs& a) {
  Task t;
  const bool glue = is_glue(a.task);
  t.info = glue ? peft::data::glue::task_info(a.task) : peft::data::clue::task_info(a.task);
  t.name = t.info.name;
  t.fields = pp::task_fields(t.name, t.info.is_pair);
  const fs::path root = !a.data_dir.empty() ? fs::path(a.data_dir)
                        : glue              ? fs::path("../shared/data/glue")
                                            : fs::path("../shared/data/clue");
  // The folder holding the task's folder, or the task's folder itself.
  fs::path dir = root / (glue ? peft::data::glue::folder_name(t.name) : t.name);
  if (!fs::is_directory(dir) && (fs::exists(root / "train.tsv") ||
                                 fs::exists(root / "train.json") || fs::exists(root / "train.txt")))
    dir = root;
  auto read = [&](const char* split) {
    return glue ? peft::data::glue::read(t.name, dir, split)
                : peft::data::clue::read(t.name, dir, split);
  };
  t.train = read("train");
  const bool has_dev = glue ? fs::exists(dir / "dev.tsv")
                            : (fs::exists(dir / "dev.json") || fs::exists(dir / "dev.tsv") ||
                               fs::exists(dir / "dev.txt"));
  if (has_dev) {
    t.eval = read("dev");
    t.eval_split = "dev";
  } else {
    std::tie(t.train, t.eval) = peft::data::split_holdout(
        t.train, peft::data::holdout_size(t.train.size(), kHoldoutFraction, kHoldoutCap), 0);
    t.eval_split = "holdout";
  }
  if (a.eval_max > 0 && t.eval.size() > static_cast<size_t>(a.eval_max)) {
    // A fixed sample (seed 0) of the validation rows, the same for every run.
    const auto order = peft::data::shuffled_order(t.eval.size(), 0);
    std::vector<size_t> keep(order.begin(), order.begin() + a.eval_max);
    std::sort(keep.begin(), keep.end());
    std::vector<Example> sample;
    for (auto i : keep) sample.push_back(t.eval[i]);
    t.eval = std::move(sample);
    t.eval_split += fmt::format(" (sample of {})", a.eval_max);
  }
  return t;
}

// `shots` examples of each class (regression: 2 * shots examples) drawn with `seed`, then the
// next `unlabeled` rows of the same order as the unlabelled pool.
std::pair<std::vector<size_t>, std::vector<size_t>> sample_rows(const Task& t, int64_t shots,
                                                                int64_t unlabeled, uint64_t seed) {
  const auto order = peft::data::shuffled_order(t.train.size(), seed);
  std::vector<size_t> picked, rest;
  std::map<int64_t, int64_t> taken;
  const int64_t classes = t.regression() ? 1 : t.info.num_labels;
  const int64_t per_class = t.regression() ? 2 * shots : shots;
  for (auto i : order) {
    const auto c = t.regression() ? 0 : static_cast<int64_t>(t.train[i].label);
    if (taken[c] < per_class) {
      ++taken[c];
      picked.push_back(i);
    } else if (static_cast<int64_t>(rest.size()) < unlabeled) {
      rest.push_back(i);
    }
    if (static_cast<int64_t>(picked.size()) == classes * per_class &&
        static_cast<int64_t>(rest.size()) >= unlabeled)
      break;
  }
  return {picked, rest};
}

std::vector<pp::Fields> fields_of(const Task& t, const std::vector<Example>& rows,
                                  const std::vector<size_t>& idx) {
  std::vector<pp::Fields> out;
  for (auto i : idx) out.push_back(pp::fields_of(t.fields, rows[i]));
  return out;
}

std::vector<size_t> all_rows(size_t n) {
  std::vector<size_t> v(n);
  std::iota(v.begin(), v.end(), 0);
  return v;
}

nlohmann::json lora_options(const PromptArgs& a) {
  if (!a.options.empty()) return nlohmann::json::parse(a.options);
  if (a.method != "lora") return nlohmann::json::object();
  return {{"r", 8},
          {"lora_alpha", 16},
          {"target_modules",
           {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}}};
}

peft::TrainerOptions trainer_options(const PromptArgs& a, double lr, uint64_t seed) {
  return peft::TrainerOptions()
      .epochs(a.epochs)
      .lr(lr)
      .warmup_ratio(0.1)
      .seed(seed)
      .grad_clip(1.0)
      .shuffle(false)
      .progress(false);
}

std::map<std::string, double> score(const Task& t, const std::vector<double>& predictions) {
  std::vector<double> labels;
  for (const auto& e : t.eval) labels.push_back(e.label);
  return peft::metrics::evaluate(t.info.metrics, predictions, labels);
}

// Trains the attached method of `clf` on `fields`/`targets` (classes, values or soft labels
// [N, C]), demonstrations re-drawn every epoch.
void fit_prompt(pp::PromptClassifier& clf, const std::vector<pp::Fields>& fields,
                const torch::Tensor& targets, const PromptArgs& a, uint64_t seed) {
  struct Batch {
    std::vector<pp::PromptInput> inputs;
    torch::Tensor targets;
  };
  const auto n = static_cast<int64_t>(fields.size());
  peft::BatchSource<Batch> source;
  source.batches_per_epoch = (n + a.batch_size - 1) / a.batch_size;
  std::vector<size_t> order;
  int64_t order_epoch = -1;
  source.batch = [&](int64_t epoch, int64_t index) {
    if (epoch != order_epoch) {
      order = peft::data::shuffled_order(fields.size(), seed * 1000 + static_cast<uint64_t>(epoch));
      order_epoch = epoch;
    }
    const auto start = index * a.batch_size, end = std::min(n, start + a.batch_size);
    std::vector<pp::Fields> f;
    std::vector<int64_t> rows;
    for (auto k = start; k < end; ++k) {
      f.push_back(fields[order[static_cast<size_t>(k)]]);
      rows.push_back(static_cast<int64_t>(order[static_cast<size_t>(k)]));
    }
    Batch b;
    b.inputs = clf.inputs(f, static_cast<uint64_t>(epoch) + 1, rows);
    b.targets = targets.index_select(0, torch::tensor(rows));
    return b;
  };
  peft::Trainer<Batch> trainer(
      clf.model(), [&](const Batch& b) { return clf.loss(b.inputs, b.targets); },
      trainer_options(a, a.lr, seed));
  trainer.fit(source);
}

// Token ids of an input for the classification head: its fields joined by newlines.
std::vector<int64_t> head_ids(const pp::PromptClassifier& clf, const pp::Fields& f,
                              const std::vector<std::string>& names, int64_t max_length) {
  std::string text;
  for (const auto& name : names) text += (text.empty() ? "" : "\n") + f.at(name);
  auto ids = clf.tokenizer().encode_ids(text);
  if (static_cast<int64_t>(ids.size()) > max_length) ids.resize(static_cast<size_t>(max_length));
  if (ids.empty()) ids.push_back(0);
  return ids;
}

std::pair<torch::Tensor, torch::Tensor> pad_ids(const std::vector<std::vector<int64_t>>& seqs,
                                                int64_t pad) {
  size_t longest = 0;
  for (const auto& s : seqs) longest = std::max(longest, s.size());
  auto ids = torch::full({static_cast<int64_t>(seqs.size()), static_cast<int64_t>(longest)}, pad,
                         torch::kLong);
  auto mask = torch::zeros_like(ids);
  for (size_t i = 0; i < seqs.size(); ++i) {
    const auto k = static_cast<int64_t>(seqs[i].size());
    ids[static_cast<int64_t>(i)].narrow(0, 0, k).copy_(torch::tensor(seqs[i]));
    mask[static_cast<int64_t>(i)].narrow(0, 0, k).fill_(1);
  }
  return {ids, mask};
}

// The decoder's classification head (LlamaForSequenceClassification on the same frozen base,
// with the same method) trained on `fields` with classes, values or soft labels [N, C]; returns
// its predictions on the validation rows.
std::vector<double> head_run(pp::PromptClassifier& clf, const Task& t,
                             const std::vector<pp::Fields>& fields, const torch::Tensor& targets,
                             const PromptArgs& a, uint64_t seed) {
  torch::manual_seed(seed);
  const int64_t outputs = t.regression() ? 1 : t.info.num_labels;
  auto head = peft::models::LlamaForSequenceClassification(clf.model(), outputs);
  peft::attach(*head, a.method, lora_options(a));
  const int64_t pad = clf.tokenizer().pad_id() >= 0 ? clf.tokenizer().pad_id() : 0;
  struct Batch {
    torch::Tensor ids, mask, targets;
  };
  const auto n = static_cast<int64_t>(fields.size());
  peft::BatchSource<Batch> source;
  source.batches_per_epoch = (n + a.batch_size - 1) / a.batch_size;
  source.batch = [&](int64_t epoch, int64_t index) {
    const auto order =
        peft::data::shuffled_order(fields.size(), seed * 1000 + static_cast<uint64_t>(epoch));
    const auto start = index * a.batch_size, end = std::min(n, start + a.batch_size);
    std::vector<std::vector<int64_t>> seqs;
    std::vector<int64_t> rows;
    for (auto k = start; k < end; ++k) {
      const auto r = order[static_cast<size_t>(k)];
      seqs.push_back(head_ids(clf, fields[r], t.fields, a.max_length));
      rows.push_back(static_cast<int64_t>(r));
    }
    auto [ids, mask] = pad_ids(seqs, pad);
    return Batch{ids, mask, targets.index_select(0, torch::tensor(rows))};
  };
  peft::Trainer<Batch> trainer(
      head,
      [&](const Batch& b) {
        auto logits = head->forward(b.ids, b.mask);
        if (t.regression()) return torch::mse_loss(logits.view({-1}), b.targets.to(torch::kFloat));
        if (b.targets.dim() == 2)
          return -(b.targets * torch::log_softmax(logits, -1)).sum(1).mean();
        return torch::nll_loss(torch::log_softmax(logits, -1), b.targets);
      },
      trainer_options(a, a.head_lr, seed));
  trainer.fit(source);

  torch::NoGradGuard no_grad;
  head->eval();
  std::vector<double> predictions;
  for (size_t start = 0; start < t.eval.size(); start += static_cast<size_t>(a.eval_batch)) {
    const auto end = std::min(t.eval.size(), start + static_cast<size_t>(a.eval_batch));
    std::vector<std::vector<int64_t>> seqs;
    for (size_t i = start; i < end; ++i)
      seqs.push_back(head_ids(clf, pp::fields_of(t.fields, t.eval[i]), t.fields, a.max_length));
    auto [ids, mask] = pad_ids(seqs, pad);
    auto logits = head->forward(ids, mask);
    for (int64_t i = 0; i < logits.size(0); ++i) {
      predictions.push_back(t.regression()
                                ? logits[i][0].item<double>()
                                : static_cast<double>(logits[i].argmax().item<int64_t>()));
    }
  }
  peft::delete_adapter(*head, "default");
  return predictions;
}

torch::Tensor targets_of(const Task& t, const std::vector<size_t>& rows) {
  std::vector<double> v;
  for (auto i : rows) v.push_back(t.train[i].label);
  auto out = torch::tensor(v);
  return t.regression() ? out.to(torch::kFloat) : out.to(torch::kLong);
}

std::vector<pp::PromptSpec> prompts_of(const Task& t, const PromptArgs& a) {
  auto specs = pp::builtin_prompts(t.name, t.info.label_names);
  if (!a.template_text.empty() || !a.verbalizer.empty()) {
    auto s = specs.front();
    if (!a.template_text.empty()) s.pattern = pp::Template(a.template_text);
    if (!a.verbalizer.empty())
      s.verbalizer = pp::Verbalizer::parse(a.verbalizer, s.verbalizer.labels);
    specs = {s};
  }
  for (auto& s : specs) {
    s.word_score = pp::word_score_from_string(a.word_score);
    s.max_length = a.max_length;
    s.pattern.check_fields(t.fields, "--template");
  }
  return specs;
}

}  // namespace

void add_prompt_options(CLI::App* p, PromptArgs& a) {
  p->add_option("--task", a.task, "GLUE or CLUE task: sst2, mrpc, rte, cola, stsb, afqmc, ...")
      ->required();
  p->add_option("--data-dir", a.data_dir,
                "the task's folder, or the folder holding it (default ../shared/data/glue or "
                "../shared/data/clue)");
  p->add_option("--mode", a.mode,
                "prompt (the LM head at the blank), head (a classification head on the same "
                "shots) or pet (prompts -> soft labels on unlabelled rows -> head)")
      ->capture_default_str()
      ->check(CLI::IsMember({"prompt", "head", "pet"}));
  p->add_option("--template", a.template_text,
                "template with the task's fields and one {mask}, e.g. \"{sentence} It was "
                "{mask}\" (default: the task's built-in one)");
  p->add_option("--verbalizer", a.verbalizer,
                "words per label: \"negative=bad|awful,positive=good\" or \"bad,good\" in label "
                "order (default: the built-in one)");
  p->add_option("--word-score", a.word_score,
                "score of a word of several tokens: sum (its log-probability) or mean")
      ->capture_default_str()
      ->check(CLI::IsMember(peft::enum_names<pp::WordScore>()));
  p->add_option("--demos", a.demos,
                "LM-BFF demonstrations in front of each input: none, random or similar")
      ->capture_default_str()
      ->check(CLI::IsMember(peft::enum_names<pp::DemoMode>()));
  // random is the default: on SST-2 (3 seeds, docs/PROMPTING.md) it beat none by 3.4 points.
  p->add_flag("--calibrate,!--no-calibrate", a.calibrate,
              "contextual calibration: divide by the label probabilities of content-free inputs "
              "(N/A, empty, [MASK])");
  p->add_option("--shots", a.shots, "training examples per class (0 = zero-shot)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  p->add_option("--seeds", a.seeds, "runs, each with its own sample of shots")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  p->add_option("--first-seed", a.first_seed)->capture_default_str();
  p->add_option("--method", a.method,
                "PEFT method trained on the shots: " +
                    fmt::format("{}", fmt::join(peft::method_names(), ", ")))
      ->check(CLI::IsMember(peft::method_names()))
      ->capture_default_str();
  p->add_option("--options", a.options,
                "method options as JSON (default for lora: r 8, alpha 16, "
                "every projection)");
  p->add_option("--epochs", a.epochs)->capture_default_str()->check(CLI::PositiveNumber);
  p->add_option("--batch-size", a.batch_size)->capture_default_str()->check(CLI::PositiveNumber);
  p->add_option("--lr", a.lr, "learning rate of the prompt model")->capture_default_str();
  p->add_option("--head-lr", a.head_lr, "learning rate of the classification head's run")
      ->capture_default_str();
  p->add_option("--unlabeled", a.unlabeled, "PET: unlabelled training rows given soft labels")
      ->capture_default_str();
  p->add_option("--pet-temperature", a.pet_temperature, "PET: softmax temperature of the ensemble")
      ->capture_default_str();
  p->add_option("--eval-max", a.eval_max,
                "evaluate on a fixed sample of this many validation rows (0 = all)")
      ->capture_default_str();
  p->add_option("--eval-batch", a.eval_batch)->capture_default_str();
  p->add_option("--max-length", a.max_length, "longest scored text in tokens")
      ->capture_default_str();
  p->add_option("--out", a.out,
                "save the first seed's prompt model here (adapter + "
                "prompt_config.json)");
}

int run_prompt(const std::string& model_path, const PromptArgs& a) {
  const auto file = model_path.empty() ? examples::smollm2_model_file() : fs::path(model_path);
  const auto task = load_task(a);
  const auto specs = prompts_of(task, a);
  std::cerr << fmt::format(
      "[peft-lm prompt] {}: {} training rows, {} {} rows; mode {}, {} shots "
      "per class, demonstrations {}\n",
      task.name, task.train.size(), task.eval.size(), task.eval_split, a.mode, a.shots,
      a.shots > 0 && a.mode == "prompt" ? a.demos : "none");
  auto clf = pp::PromptClassifier::from_pretrained(file, specs.front());
  // Demonstrations need labelled examples and belong to the prompt mode: zero-shot, head and
  // PET runs have none.
  const auto demos =
      a.shots > 0 && a.mode == "prompt" ? pp::demo_mode_from_string(a.demos) : pp::DemoMode::none;
  peft::check(a.shots > 0 || a.mode == "prompt", "peft-lm",
              "--shots 0 (zero-shot) works with --mode prompt only");
  peft::check(a.mode != "pet" || a.method != "none", "peft-lm",
              "PET trains; --method none is "
              "for the prompt mode");

  nlohmann::ordered_json report = {{"task", task.name},
                                   {"mode", a.mode},
                                   {"validation", task.eval_split},
                                   {"validation_rows", task.eval.size()},
                                   {"shots_per_class", a.shots},
                                   {"demonstrations", pp::to_string(demos)},
                                   {"calibrated", a.calibrate},
                                   {"method", a.shots > 0 ? a.method : "none"},
                                   {"prompt", specs.front().to_json()}};
  std::map<std::string, std::vector<double>> per_metric;
  report["runs"] = nlohmann::ordered_json::array();
  const int64_t runs = a.shots == 0 ? 1 : a.seeds;
  const auto start = std::chrono::steady_clock::now();
  for (int64_t r = 0; r < runs; ++r) {
    const auto seed = static_cast<uint64_t>(a.first_seed + r);
    auto [shot_rows, rest_rows] =
        sample_rows(task, a.shots, a.mode == "pet" ? a.unlabeled : 0, seed);
    const auto shots = fields_of(task, task.train, shot_rows);
    const auto targets = targets_of(task, shot_rows);
    std::vector<double> shot_labels;
    for (auto i : shot_rows) shot_labels.push_back(task.train[i].label);
    const auto eval_fields = fields_of(task, task.eval, all_rows(task.eval.size()));
    std::vector<double> predictions;
    nlohmann::ordered_json run = {{"seed", seed}};

    if (a.mode == "head") {
      predictions = head_run(clf, task, shots, targets, a, seed);
    } else if (a.mode == "prompt") {
      if (a.shots > 0) {
        torch::manual_seed(seed);
        if (a.method != "none") peft::attach(*clf.model(), a.method, lora_options(a));
        clf.set_demonstrations(pp::Demonstrations(demos, shots, shot_labels,
                                                  clf.spec().num_labels(), clf.spec().regression));
        if (a.method != "none") fit_prompt(clf, shots, targets, a, seed);
      }
      if (a.calibrate) clf.calibrate();
      predictions = clf.values(clf.predict_proba(eval_fields, a.eval_batch));
      if (r == 0 && !a.out.empty()) {
        clf.save(a.out);
        run["saved"] = a.out;
      }
      clf.uncalibrate();
      if (a.shots > 0 && a.method != "none") peft::delete_adapter(*clf.model(), "default");
    } else {  // PET
      const auto unlabeled = fields_of(task, task.train, rest_rows);
      std::vector<torch::Tensor> log_probs;
      for (const auto& spec : specs) {
        pp::PromptClassifier member(clf.model(), clf.tokenizer_ptr(), spec);
        torch::manual_seed(seed);
        peft::attach(*member.model(), a.method, lora_options(a));
        fit_prompt(member, shots, targets, a, seed);
        if (a.calibrate) member.calibrate();
        auto probs = member.predict_proba(unlabeled, a.eval_batch);
        log_probs.push_back(probs.clamp_min(1e-12).log());
        peft::delete_adapter(*member.model(), "default");
      }
      auto soft = pp::ensemble_soft_labels(log_probs, a.pet_temperature);
      // The final model learns the ensemble's soft labels (regression: its expected values)
      // together with the labelled shots.
      std::vector<pp::Fields> final_fields = shots;
      final_fields.insert(final_fields.end(), unlabeled.begin(), unlabeled.end());
      torch::Tensor final_targets;
      if (task.regression()) {
        const auto [lo, hi] = *clf.spec().regression;
        final_targets = torch::cat({targets, lo + (hi - lo) * soft.select(1, 1)});
      } else {
        final_targets = torch::cat({torch::one_hot(targets, task.info.num_labels).to(torch::kFloat),
                                    soft.to(torch::kFloat)});
      }
      run["ensemble"] = specs.size();
      run["unlabeled"] = unlabeled.size();
      auto final_args = a;
      final_args.epochs = std::max<int64_t>(1, a.epochs / 5);
      predictions = head_run(clf, task, final_fields, final_targets, final_args, seed);
    }
    const auto scores = score(task, predictions);
    for (const auto& [k, v] : scores) {
      run[k] = v;
      per_metric[k].push_back(v);
    }
    std::cerr << "[peft-lm prompt] seed " << seed << ": " << run.dump() << "\n";
    report["runs"].push_back(run);
  }
  for (const auto& [k, v] : per_metric) {
    const double mean = std::accumulate(v.begin(), v.end(), 0.0) / static_cast<double>(v.size());
    double var = 0;
    for (auto x : v) var += (x - mean) * (x - mean);
    report[k + "_mean"] = mean;
    report[k + "_std"] = v.size() > 1 ? std::sqrt(var / static_cast<double>(v.size() - 1)) : 0.0;
  }
  report["truncated_inputs"] = clf.truncated();
  report["seconds"] =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::cout << report.dump() << std::endl;
  return 0;
}

}  // namespace lm
