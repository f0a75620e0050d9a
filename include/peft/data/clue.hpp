#pragma once

// Readers for the CLUE benchmark's JSON-lines files (clue/<task>/{train,dev,test}.json) and for
// ChnSentiCorp's `text<TAB>label` files.

#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <peft/config.hpp>
#include <peft/core/error.hpp>
#include <peft/data/example.hpp>

PEFT_NAMESPACE_BEGIN
namespace data {
namespace clue {
namespace detail {

enum class Layout { single, pair, csl, wsc, chnsenticorp };

struct Spec {
  TaskInfo info;
  Layout layout;
  std::string text_a, text_b;  // JSON field names for the single and pair layouts
  // Label values as written in the files, in class-index order.
  std::vector<std::string> label_values;
};

inline std::vector<std::string> numbered(int n) {
  std::vector<std::string> out;
  for (int i = 0; i < n; ++i) out.push_back(std::to_string(i));
  return out;
}

inline const std::vector<Spec>& specs() {
  static const std::vector<Spec> all = [] {
    const std::vector<std::string> nli{"contradiction", "entailment", "neutral"};
    const std::vector<std::string> acc{"accuracy"};
    return std::vector<Spec>{
        // TNEWS labels are category ids with gaps (no 105, 111), in the order of the official
        // labels.json.
        {{"tnews",
          15,
          {"news_story", "news_culture", "news_entertainment", "news_sports", "news_finance",
           "news_house", "news_car", "news_edu", "news_tech", "news_military", "news_travel",
           "news_world", "news_stock", "news_agriculture", "news_game"},
          acc,
          false},
         Layout::single,
         "sentence",
         "",
         {"100", "101", "102", "103", "104", "106", "107", "108", "109", "110", "112", "113", "114",
          "115", "116"}},
        {{"iflytek", 119, numbered(119), acc, false},
         Layout::single,
         "sentence",
         "",
         numbered(119)},
        {{"afqmc", 2, {"different", "same"}, acc, true},
         Layout::pair,
         "sentence1",
         "sentence2",
         numbered(2)},
        {{"cmnli", 3, nli, acc, true}, Layout::pair, "sentence1", "sentence2", nli},
        {{"ocnli", 3, nli, acc, true}, Layout::pair, "sentence1", "sentence2", nli},
        {{"csl", 2, {"false", "true"}, acc, true}, Layout::csl, "", "", numbered(2)},
        {{"cluewsc2020", 2, {"false", "true"}, acc, true}, Layout::wsc, "", "", {"false", "true"}},
        {{"chnsenticorp", 2, {"negative", "positive"}, acc, false},
         Layout::chnsenticorp,
         "",
         "",
         numbered(2)},
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
  fail("clue", "unknown task \"{}\"; known tasks: {}", task, data::detail::join(names));
}

inline float label_index(const Spec& s, const data::detail::LineFile& file, std::size_t index,
                         std::string_view value) {
  auto k = data::detail::index_of(s.label_values, value);
  if (k < 0)
    file.fail_at(index, "bad label \"{}\": expected {}", value,
                 data::detail::describe_values(s.label_values));
  return static_cast<float>(k);
}

inline const nlohmann::json& field(const data::detail::LineFile& file, std::size_t index,
                                   const nlohmann::json& object, const std::string& name) {
  auto it = object.find(name);
  if (it == object.end()) file.fail_at(index, "missing field \"{}\"", name);
  return *it;
}

inline std::string string_field(const data::detail::LineFile& file, std::size_t index,
                                const nlohmann::json& object, const std::string& name) {
  const auto& value = field(file, index, object, name);
  if (!value.is_string())
    file.fail_at(index, "field \"{}\" is {}, expected a string", name, value.type_name());
  return value.get<std::string>();
}

// CLUE writes labels as strings; integers are accepted too since re-exported copies often
// carry them.
inline std::string label_text(const data::detail::LineFile& file, std::size_t index,
                              const nlohmann::json& object) {
  const auto& value = field(file, index, object, "label");
  if (value.is_string()) return value.get<std::string>();
  if (value.is_number_integer()) return std::to_string(value.get<int64_t>());
  file.fail_at(index, "field \"label\" is {}, expected a string", value.type_name());
}

inline std::vector<Example> read_json_lines(const Spec& s, const data::detail::LineFile& file,
                                            const std::string& split, const ReadOptions& options) {
  std::vector<Example> out;
  for (std::size_t i = 0; i < file.size(); ++i) {
    if (options.max_samples() && out.size() >= options.max_samples()) break;
    if (file[i].find_first_not_of(" \t") == std::string_view::npos) continue;
    nlohmann::json row;
    try {
      row = nlohmann::json::parse(file[i]);
    } catch (const nlohmann::json::exception& e) {
      // parse_error, and out_of_range for a number too large for a double (1e400).
      file.fail_at(i, "bad JSON: {}", e.what());
    }
    if (!row.is_object()) file.fail_at(i, "expected a JSON object, found {}", row.type_name());

    Example ex;
    if (options.labeled()) {
      const auto value = label_text(file, i, row);
      // NLI annotators who did not agree leave "-": such rows have no gold label at all.
      if (value == "-" && (s.info.name == "cmnli" || s.info.name == "ocnli")) continue;
      ex.label = label_index(s, file, i, value);
    }
    ex.has_label = options.labeled();
    switch (s.layout) {
      case Layout::single:
        ex.text_a = string_field(file, i, row, s.text_a);
        break;
      case Layout::pair:
        ex.text_a = string_field(file, i, row, s.text_a);
        ex.text_b = string_field(file, i, row, s.text_b);
        break;
      case Layout::csl: {
        // The keyword list is the claim checked against the abstract, as in CLUE's baseline.
        const auto& keywords = field(file, i, row, "keyword");
        if (!keywords.is_array())
          file.fail_at(i, "field \"keyword\" is {}, expected an array of strings",
                       keywords.type_name());
        std::string joined;
        for (const auto& k : keywords) {
          if (!k.is_string())
            file.fail_at(i, "field \"keyword\" holds {}, expected strings", k.type_name());
          if (!joined.empty()) joined += ' ';
          joined += k.get<std::string>();
        }
        ex.text_a = std::move(joined);
        ex.text_b = string_field(file, i, row, "abst");
        break;
      }
      case Layout::wsc: {
        // A pair "<text>" / "<pronoun>指的是<candidate>" ("<pronoun> refers to <candidate>"), so
        // a sentence-pair classifier can judge the coreference claim.
        ex.text_a = string_field(file, i, row, "text");
        const auto& target = field(file, i, row, "target");
        if (!target.is_object())
          file.fail_at(i, "field \"target\" is {}, expected an object", target.type_name());
        ex.text_b = string_field(file, i, target, "span2_text") + "指的是" +
                    string_field(file, i, target, "span1_text");
        break;
      }
      case Layout::chnsenticorp:
        break;
    }
    ex.guid = fmt::format("{}-{}-{}", s.info.name, split, out.size());
    ex.line = i + 1;
    out.push_back(std::move(ex));
  }
  return out;
}

// `text<TAB>label` without a header (the common distribution); a header naming "label" and
// "text" or "text_a" (another common one) is recognised and its columns used.
inline std::vector<Example> read_tsv(const Spec& s, const data::detail::LineFile& file,
                                     const std::string& split, const ReadOptions& options) {
  const bool labeled = options.labeled();
  std::size_t num_fields = labeled ? 2 : 1, col_text = 0, col_label = 1, first_row = 0;
  if (file.size() > 0) {
    const auto header = data::detail::split_tabs(file[0]);
    std::vector<std::string> names(header.begin(), header.end());
    if (data::detail::index_of(names, "label") >= 0) {
      auto text = data::detail::index_of(names, "text");
      if (text < 0) text = data::detail::index_of(names, "text_a");
      if (text < 0)
        file.fail_at(0, "header has no column \"text\" or \"text_a\" (columns: {})",
                     data::detail::join(names));
      num_fields = names.size();
      col_text = static_cast<std::size_t>(text);
      col_label = static_cast<std::size_t>(data::detail::index_of(names, "label"));
      first_row = 1;
    }
  }
  std::vector<Example> out;
  for (std::size_t i = first_row; i < file.size(); ++i) {
    if (options.max_samples() && out.size() >= options.max_samples()) break;
    if (file[i].empty()) continue;
    const auto fields = data::detail::split_tabs(file[i]);
    if (fields.size() != num_fields)
      file.fail_at(i, "expected {} tab-separated field{}, found {}", num_fields,
                   num_fields == 1 ? "" : "s", fields.size());
    Example ex;
    ex.text_a = std::string(fields[col_text]);
    ex.has_label = labeled;
    if (labeled) ex.label = label_index(s, file, i, fields[col_label]);
    ex.guid = fmt::format("{}-{}-{}", s.info.name, split, out.size());
    ex.line = i + 1;
    out.push_back(std::move(ex));
  }
  return out;
}

}  // namespace detail

/// The tasks this reader knows: tnews, iflytek, afqmc, cmnli, ocnli, csl, cluewsc2020 and
/// chnsenticorp.
inline std::vector<std::string> task_names() {
  std::vector<std::string> names;
  for (const auto& s : detail::specs()) names.push_back(s.info.name);
  return names;
}

/// Labels, metrics and pairing of a task. For iflytek the label names are the class ids "0" to
/// "118". Pair layouts: csl is (keywords joined by spaces, abstract); cluewsc2020 is (text,
/// "<span2>指的是<span1>").
inline TaskInfo task_info(std::string_view task) {
  return detail::spec(task).info;
}

/// Reads one file of `task` with any name (JSON lines for CLUE tasks, TSV for chnsenticorp).
/// guids are `<task>-<file stem>-<n>`. Rows of cmnli/ocnli whose label is "-" are skipped.
inline std::vector<Example> read_file(std::string_view task, const std::filesystem::path& path,
                                      const ReadOptions& options = {}) {
  const auto& s = detail::spec(task);
  const data::detail::LineFile file("clue", path);
  const auto stem = path.stem().string();
  return s.layout == detail::Layout::chnsenticorp ? detail::read_tsv(s, file, stem, options)
                                                  : detail::read_json_lines(s, file, stem, options);
}

/// Reads split "train", "dev" or "test" from the task's directory: `<split>.json` for CLUE
/// tasks, `<split>.txt` (or `<split>.tsv`) for chnsenticorp. Test splits have no labels: pass
/// ReadOptions().labeled(false) for them.
inline std::vector<Example> read(std::string_view task, const std::filesystem::path& dir,
                                 std::string_view split, const ReadOptions& options = {}) {
  const auto& s = detail::spec(task);
  if (split != "train" && split != "dev" && split != "test")
    fail("clue", "unknown split \"{}\" for {}; splits: train, dev, test", split, s.info.name);
  data::detail::require_directory("clue", dir);
  const std::string name(split);
  if (s.layout != detail::Layout::chnsenticorp)
    return read_file(task, dir / (name + ".json"), options);
  std::error_code ec;
  if (std::filesystem::exists(dir / (name + ".tsv"), ec) &&
      !std::filesystem::exists(dir / (name + ".txt"), ec))
    return read_file(task, dir / (name + ".tsv"), options);
  return read_file(task, dir / (name + ".txt"), options);
}

}  // namespace clue
}  // namespace data
PEFT_NAMESPACE_END
