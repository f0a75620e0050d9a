#pragma once

// A user's own labelled data: a CSV or TSV file with a header row naming a text column, an
// optional second text column (sentence pairs) and a label column. Labels are class names
// (mapped to indices in order of first appearance, or in a given order) or, for regression,
// numbers. CSV fields may be quoted ("a, b" and "say ""hi""" as RFC 4180); TSV fields are taken
// as they are. Every error names the file and the line.
//
//     auto train = peft::data::read_table("reviews/train.csv");
//     auto dev = peft::data::read_table("reviews/dev.csv",
//                                       peft::data::TableOptions().labels(train.labels));

#include <torch/arg.h>

#include <cstdint>
#include <filesystem>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include <peft/config.hpp>
#include <peft/core/error.hpp>
#include <peft/data/example.hpp>

PEFT_NAMESPACE_BEGIN
namespace data {

/// How read_table() reads a file.
struct TableOptions {
  /// The column holding the (first) text.
  TORCH_ARG(std::string, text_column) = "text";
  /// The column holding the second text of a pair; empty: single texts.
  TORCH_ARG(std::string, text_b_column) = "";
  /// The column holding the label.
  TORCH_ARG(std::string, label_column) = "label";
  /// Field separator; '\0': tab for .tsv files, comma otherwise.
  TORCH_ARG(char, delimiter) = '\0';
  /// The class names in index order (e.g. the training file's); empty: in order of first
  /// appearance. With a list, a label outside it is an error.
  TORCH_ARG(std::vector<std::string>, labels) = {};
  /// Labels are numbers (one score per row) rather than class names.
  TORCH_ARG(bool, regression) = false;
};

/// The rows of a table as examples, with what a model needs to know about them.
struct Table {
  std::vector<Example> examples;
  /// Class names in index order (empty for regression).
  std::vector<std::string> labels;
  bool is_pair = false;
  bool regression = false;
  /// Outputs a classifier needs: the number of classes, or 1 for regression.
  int64_t num_labels() const { return regression ? 1 : static_cast<int64_t>(labels.size()); }
};

namespace detail {

/// Splits one line into fields: `delimiter`-separated; with '"' quoting when `quoted` (a quoted
/// field may hold the delimiter and "" for a quote). Throws on an unterminated quote.
inline std::vector<std::string> split_fields(std::string_view line, char delimiter, bool quoted,
                                             const std::string& where) {
  std::vector<std::string> fields(1);
  bool in_quotes = false;
  bool was_quoted = false;
  for (size_t i = 0; i < line.size(); ++i) {
    const char c = line[i];
    if (quoted && in_quotes) {
      if (c == '"' && i + 1 < line.size() && line[i + 1] == '"') {
        fields.back() += '"';
        ++i;
      } else if (c == '"') {
        in_quotes = false;
      } else {
        fields.back() += c;
      }
    } else if (quoted && c == '"' && fields.back().empty() && !was_quoted) {
      in_quotes = was_quoted = true;
    } else if (c == delimiter) {
      fields.emplace_back();
      was_quoted = false;
    } else {
      check(!(quoted && was_quoted), "data", "{}: text after a closing quote", where);
      fields.back() += c;
    }
  }
  check(!in_quotes, "data", "{}: a quoted field is not closed on this line", where);
  return fields;
}

}  // namespace detail

/// Reads a labelled CSV or TSV file (see the top of this header). Throws peft::Error naming the
/// file and line on a missing file or column, a row with the wrong number of fields, an empty
/// text, a label outside `options.labels()` or a non-numeric regression label.
inline Table read_table(const std::filesystem::path& path, const TableOptions& options = {}) {
  const std::string file = path.string();
  const char delimiter = options.delimiter() != '\0'  ? options.delimiter()
                         : path.extension() == ".tsv" ? '\t'
                                                      : ',';
  const bool quoted = delimiter != '\t';
  detail::LineFile lines("data", path);
  check(lines.size() > 0, "data", "{}: the file is empty (a header row is needed)", file);
  const auto header = detail::split_fields(lines[0], delimiter, quoted, file + ":1");
  auto column = [&](const std::string& name) -> int64_t {
    for (size_t i = 0; i < header.size(); ++i) {
      if (header[i] == name) return static_cast<int64_t>(i);
    }
    fail("data", "{}:1: no column \"{}\" in the header ({})", file, name, detail::join(header));
  };
  const int64_t text = column(options.text_column());
  const int64_t label = column(options.label_column());
  // -1: single texts.
  const int64_t text_b = options.text_b_column().empty() ? -1 : column(options.text_b_column());

  Table table;
  table.labels = options.labels();
  table.is_pair = text_b >= 0;
  table.regression = options.regression();
  const bool fixed_labels = !table.labels.empty();
  for (size_t n = 1; n < lines.size(); ++n) {
    const auto line = lines[n];
    if (line.empty()) continue;
    const std::string where = fmt::format("{}:{}", file, n + 1);
    const auto fields = detail::split_fields(line, delimiter, quoted, where);
    check(fields.size() == header.size(), "data", "{}: {} fields, but the header has {}", where,
          fields.size(), header.size());
    Example example;
    example.line = n + 1;
    example.guid = fmt::format("{}-{}", path.stem().string(), table.examples.size());
    example.text_a = fields[static_cast<size_t>(text)];
    check(!example.text_a.empty(), "data", "{}: the text is empty", where);
    if (text_b >= 0) example.text_b = fields[static_cast<size_t>(text_b)];
    const auto& value = fields[static_cast<size_t>(label)];
    if (table.regression) {
      try {
        size_t used = 0;
        example.label = std::stof(value, &used);
        check(used == value.size(), "data", "{}: label \"{}\" is not a number", where, value);
      } catch (const std::logic_error&) {
        fail("data", "{}: label \"{}\" is not a number", where, value);
      }
    } else {
      int64_t index = detail::index_of(table.labels, value);
      if (index < 0) {
        check(!fixed_labels, "data", "{}: label \"{}\" is not {}", where, value,
              detail::describe_values(table.labels));
        table.labels.push_back(value);
        index = static_cast<int64_t>(table.labels.size()) - 1;
      }
      example.label = static_cast<float>(index);
    }
    table.examples.push_back(std::move(example));
  }
  check(!table.examples.empty(), "data", "{}: no rows after the header", file);
  check(table.regression || table.labels.size() >= 2, "data",
        "{}: only one class (\"{}\"); a classifier needs at least two", file,
        detail::join(table.labels));
  return table;
}

}  // namespace data
PEFT_NAMESPACE_END
