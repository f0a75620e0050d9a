#pragma once

// Readers for the GLUE benchmark's TSV files in the layout of the official distribution
// (glue_data/<Task>/{train,dev,test}.tsv).

#include <charconv>
#include <cmath>
#include <filesystem>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

#include <fmt/format.h>

#include <peft/config.hpp>
#include <peft/core/error.hpp>
#include <peft/data/example.hpp>

PEFT_NAMESPACE_BEGIN
namespace data {
namespace glue {
namespace detail {

struct Spec {
  TaskInfo info;
  std::string folder;  // directory name in the official distribution
  std::vector<std::string> splits;
  std::string text_a, text_b, label;  // header names; text_b empty for single-sentence tasks
  // Label cells as written in the files, in class-index order; empty for regression.
  std::vector<std::string> label_values;
  // CoLA's labelled files have no header: source, label, original-label marker, sentence.
  bool headerless_when_labeled = false;
};

inline const std::vector<Spec>& specs() {
  static const std::vector<Spec> all = [] {
    const std::vector<std::string> std_splits{"train", "dev", "test"};
    const std::vector<std::string> binary{"0", "1"};
    const std::vector<std::string> rte_values{"entailment", "not_entailment"};
    return std::vector<Spec>{
        {{"cola", 2, {"unacceptable", "acceptable"}, {"mcc", "accuracy"}, false},
         "CoLA",
         std_splits,
         "sentence",
         "",
         "",
         binary,
         true},
        {{"sst2", 2, {"negative", "positive"}, {"accuracy"}, false},
         "SST-2",
         std_splits,
         "sentence",
         "",
         "label",
         binary,
         false},
        {{"mrpc", 2, {"not_equivalent", "equivalent"}, {"f1", "accuracy"}, true},
         "MRPC",
         std_splits,
         "#1 String",
         "#2 String",
         "Quality",
         binary,
         false},
        {{"stsb", 1, {}, {"pearson", "spearman"}, true},
         "STS-B",
         std_splits,
         "sentence1",
         "sentence2",
         "score",
         {},
         false},
        {{"qqp", 2, {"not_duplicate", "duplicate"}, {"f1", "accuracy"}, true},
         "QQP",
         std_splits,
         "question1",
         "question2",
         "is_duplicate",
         binary,
         false},
        // The order of the reference implementations (alphabetical), which most published MNLI
        // checkpoints' heads follow.
        {{"mnli", 3, {"contradiction", "entailment", "neutral"}, {"accuracy"}, true},
         "MNLI",
         {"train", "dev_matched", "dev_mismatched", "test_matched", "test_mismatched"},
         "sentence1",
         "sentence2",
         "gold_label",
         {"contradiction", "entailment", "neutral"},
         false},
        {{"qnli", 2, rte_values, {"accuracy"}, true},
         "QNLI",
         std_splits,
         "question",
         "sentence",
         "label",
         rte_values,
         false},
        {{"rte", 2, rte_values, {"accuracy"}, true},
         "RTE",
         std_splits,
         "sentence1",
         "sentence2",
         "label",
         rte_values,
         false},
        {{"wnli", 2, {"not_entailment", "entailment"}, {"accuracy"}, true},
         "WNLI",
         std_splits,
         "sentence1",
         "sentence2",
         "label",
         binary,
         false},
    };
  }();
  return all;
}

inline const Spec& spec(std::string_view task) {
  const auto key = data::detail::task_key(task);
  std::vector<std::string> names;
  for (const auto& s : specs()) {
    if (s.info.name == key) return s;
    names.push_back(s.info.name);
  }
  fail("glue", "unknown task \"{}\"; known tasks: {}", task, data::detail::join(names));
}

inline float parse_label(const Spec& s, const data::detail::LineFile& file, std::size_t index,
                         std::string_view cell) {
  if (s.info.is_regression()) {
    float score = 0.0f;
    const char* end = cell.data() + cell.size();
    auto [ptr, ec] = std::from_chars(cell.data(), end, score);
    if (cell.empty() || ec != std::errc() || ptr != end || !std::isfinite(score))
      file.fail_at(index, "bad {} \"{}\": expected a number", s.label, cell);
    return score;
  }
  auto k = data::detail::index_of(s.label_values, cell);
  if (k < 0)
    file.fail_at(index, "bad {} \"{}\": expected {}", s.label.empty() ? "label" : s.label, cell,
                 data::detail::describe_values(s.label_values));
  return static_cast<float>(k);
}

}  // namespace detail

/// The GLUE tasks this reader knows, by canonical name: cola, sst2, mrpc, stsb, qqp, mnli, qnli,
/// rte, wnli.
inline std::vector<std::string> task_names() {
  std::vector<std::string> names;
  for (const auto& s : detail::specs()) names.push_back(s.info.name);
  return names;
}

/// Labels, metrics and pairing of a GLUE task. Names are matched case-insensitively without '-'
/// and '_', so "SST-2" works as well as "sst2".
inline TaskInfo task_info(std::string_view task) {
  return detail::spec(task).info;
}

/// The task's directory name in the official distribution, e.g. "SST-2" for sst2.
inline std::string folder_name(std::string_view task) {
  return detail::spec(task).folder;
}

/// Split names read() accepts: train, dev, test; for MNLI train, dev_matched, dev_mismatched,
/// test_matched, test_mismatched.
inline std::vector<std::string> split_names(std::string_view task) {
  return detail::spec(task).splits;
}

/// Reads one GLUE TSV file of `task` with any name. Columns are located by their header names
/// (CoLA's labelled files, which have none, by position). guids are `<task>-<file stem>-<n>`.
inline std::vector<Example> read_file(std::string_view task, const std::filesystem::path& path,
                                      const ReadOptions& options = {}) {
  const auto& s = detail::spec(task);
  const data::detail::LineFile file("glue", path);
  const bool labeled = options.labeled();
  const std::string stem = path.stem().string();

  // Column positions: by header where there is one.
  std::size_t num_fields = 4, col_a = 3, col_b = 0, col_label = 1;
  std::size_t first_row = 0;
  const bool has_b = !s.text_b.empty();
  if (!(s.headerless_when_labeled && labeled)) {
    if (file.size() == 0)
      fail("glue", "{}: empty file, expected a header line naming the columns", file.path());
    const auto header = data::detail::split_tabs(file[0]);
    auto find = [&](const std::string& name, bool is_label) {
      for (std::size_t i = 0; i < header.size(); ++i)
        if (header[i] == name) return i;
      std::vector<std::string> found(header.begin(), header.end());
      file.fail_at(0, "no column \"{}\" in the header (columns: {}){}", name,
                   data::detail::join(found),
                   is_label ? "; for a test file without labels read with labeled(false)" : "");
    };
    num_fields = header.size();
    col_a = find(s.text_a, false);
    if (has_b) col_b = find(s.text_b, false);
    if (labeled) col_label = find(s.label, true);
    first_row = 1;
  }

  std::vector<Example> out;
  for (std::size_t i = first_row; i < file.size(); ++i) {
    if (options.max_samples() && out.size() >= options.max_samples()) break;
    if (file[i].empty()) continue;
    const auto fields = data::detail::split_tabs(file[i]);
    if (fields.size() != num_fields)
      file.fail_at(i, "expected {} tab-separated fields, found {}", num_fields, fields.size());
    Example ex;
    ex.text_a = std::string(fields[col_a]);
    if (has_b) ex.text_b = std::string(fields[col_b]);
    ex.has_label = labeled;
    if (labeled) ex.label = detail::parse_label(s, file, i, fields[col_label]);
    ex.guid = fmt::format("{}-{}-{}", s.info.name, stem, out.size());
    ex.line = i + 1;
    out.push_back(std::move(ex));
  }
  return out;
}

/// Reads `<dir>/<split>.tsv`, where `dir` is the task's directory (e.g. glue_data/SST-2) and
/// `split` one of split_names(task). Test splits have no labels: pass
/// ReadOptions().labeled(false) for them.
inline std::vector<Example> read(std::string_view task, const std::filesystem::path& dir,
                                 std::string_view split, const ReadOptions& options = {}) {
  const auto& s = detail::spec(task);
  if (data::detail::index_of(s.splits, split) < 0)
    fail("glue", "unknown split \"{}\" for {}; splits: {}", split, s.info.name,
         data::detail::join(s.splits));
  data::detail::require_directory("glue", dir);
  return read_file(task, dir / (std::string(split) + ".tsv"), options);
}

}  // namespace glue
}  // namespace data
PEFT_NAMESPACE_END
