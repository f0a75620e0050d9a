#pragma once

// The task-independent shape every data reader returns, plus the line-oriented file handling the
// GLUE and CLUE readers share. No LibTorch here: reading text needs none.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <fmt/format.h>

#include <peft/config.hpp>
#include <peft/core/error.hpp>

PEFT_NAMESPACE_BEGIN
namespace data {

/// One labelled (or, for test files, unlabelled) text or text pair.
struct Example {
  /// The first (or only) text.
  std::string text_a;
  /// The second text of a pair task; empty for single-sentence tasks.
  std::optional<std::string> text_b;
  /// Class index in TaskInfo::label_names order for classification, the score for regression.
  /// Meaningless when has_label is false.
  float label = 0.0f;
  /// False for rows of test files, which carry no gold label.
  bool has_label = true;
  /// `<task>-<split>-<n>`, n counting the examples returned from 0.
  std::string guid;
  /// 1-based line of the source file the example came from, for tracing a prediction back.
  std::size_t line = 0;
};

/// What a model head and the evaluation need to know about a task.
struct TaskInfo {
  /// Canonical lower-case name, e.g. "sst2", "mnli", "tnews".
  std::string name;
  /// Number of classes; 1 for a regression task.
  int64_t num_labels = 2;
  /// Human-readable class names, indexed by Example::label; empty for regression.
  std::vector<std::string> label_names;
  /// Names accepted by peft::metrics::evaluate, the first being the one a task is ranked by.
  std::vector<std::string> metrics;
  /// Whether examples carry text_b.
  bool is_pair = false;

  /// True for a task whose label is a real-valued score (STS-B).
  bool is_regression() const { return num_labels == 1; }
};

/// Options shared by the GLUE and CLUE readers.
class ReadOptions {
 public:
  /// Stop after this many examples; 0 reads the whole file.
  ReadOptions& max_samples(std::size_t n) {
    max_samples_ = n;
    return *this;
  }
  std::size_t max_samples() const { return max_samples_; }

  /// Set to false for test files, which have no label column (or label field); their examples
  /// come back with has_label false.
  ReadOptions& labeled(bool on) {
    labeled_ = on;
    return *this;
  }
  bool labeled() const { return labeled_; }

 private:
  std::size_t max_samples_ = 0;
  bool labeled_ = true;
};

namespace detail {

/// Canonical task key: lower case with '-' and '_' removed, so "SST-2", "sst_2" and "sst2" agree.
inline std::string task_key(std::string_view name) {
  std::string key;
  for (char c : name) {
    if (c == '-' || c == '_') continue;
    key += (c >= 'A' && c <= 'Z') ? static_cast<char>(c - 'A' + 'a') : c;
  }
  return key;
}

inline std::string join(const std::vector<std::string>& items, std::string_view sep = ", ") {
  std::string out;
  for (std::size_t i = 0; i < items.size(); ++i) {
    if (i) out += sep;
    out += items[i];
  }
  return out;
}

/// A whole file split into lines: a leading UTF-8 byte-order mark removed, "\r\n" and "\n" both
/// accepted, no interpretation of quotes (GLUE strings contain unbalanced `"`).
class LineFile {
 public:
  LineFile(std::string_view where, const std::filesystem::path& path)
      : where_(where), path_(path.string()) {
    std::error_code ec;
    if (!std::filesystem::exists(path, ec)) fail(where, "{}: no such file", path_);
    if (std::filesystem::is_directory(path, ec))
      fail(where, "{}: is a directory, not a file", path_);
    std::ifstream in(path, std::ios::binary);
    if (!in) fail(where, "{}: cannot open for reading", path_);
    std::ostringstream buffer;
    buffer << in.rdbuf();
    if (in.bad()) fail(where, "{}: read error", path_);
    text_ = std::move(buffer).str();
    std::string_view rest(text_);
    if (rest.substr(0, 3) == "\xEF\xBB\xBF") rest.remove_prefix(3);
    while (!rest.empty()) {
      auto end = rest.find('\n');
      auto line = rest.substr(0, end);
      if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
      lines_.push_back(line);
      if (end == std::string_view::npos) break;
      rest.remove_prefix(end + 1);
    }
  }
  LineFile(const LineFile&) = delete;
  LineFile& operator=(const LineFile&) = delete;

  std::size_t size() const { return lines_.size(); }
  /// Line i (0-based) without its terminator.
  std::string_view operator[](std::size_t i) const { return lines_[i]; }
  const std::string& path() const { return path_; }

  /// Throws `[peft::<where>] <path>:<line>: <message>` for the 0-based line index.
  template <class... Args>
  [[noreturn]] void fail_at(std::size_t index, fmt::format_string<Args...> format,
                            Args&&... args) const {
    fail(where_, "{}:{}: {}", path_, index + 1, fmt::format(format, std::forward<Args>(args)...));
  }

 private:
  std::string where_;
  std::string path_;
  std::string text_;
  std::vector<std::string_view> lines_;
};

inline std::vector<std::string_view> split_tabs(std::string_view line) {
  std::vector<std::string_view> fields;
  while (true) {
    auto tab = line.find('\t');
    fields.push_back(line.substr(0, tab));
    if (tab == std::string_view::npos) return fields;
    line.remove_prefix(tab + 1);
  }
}

/// Index of `value` in `values`, or -1.
inline int64_t index_of(const std::vector<std::string>& values, std::string_view value) {
  auto it = std::find(values.begin(), values.end(), value);
  return it == values.end() ? -1 : static_cast<int64_t>(it - values.begin());
}

/// Label values shown in an error message, abbreviated when a task has many classes.
inline std::string describe_values(const std::vector<std::string>& values) {
  if (values.size() <= 16) return "one of " + join(values);
  return fmt::format("one of {} ... {} ({} values)", join({values.begin(), values.begin() + 3}),
                     values.back(), values.size());
}

inline std::filesystem::path require_directory(std::string_view where,
                                               const std::filesystem::path& dir) {
  std::error_code ec;
  if (!std::filesystem::exists(dir, ec)) fail(where, "{}: no such directory", dir.string());
  if (!std::filesystem::is_directory(dir, ec))
    fail(where, "{}: is a file, expected the task's directory", dir.string());
  return dir;
}

}  // namespace detail
}  // namespace data
PEFT_NAMESPACE_END
