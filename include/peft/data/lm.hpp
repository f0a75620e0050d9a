#pragma once

// Data for causal language-model tuning: prompt/completion pairs read from JSON lines, rendered
// with a chat template and tokenised, labelled on the completion only, and padded into batches.

#include <torch/types.h>

#include <algorithm>
#include <cstdint>
#include <fstream>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include <peft/config.hpp>
#include <peft/core/error.hpp>

PEFT_NAMESPACE_BEGIN
namespace data {

/// One prompt/completion pair as it appears in a JSON-lines file.
struct PromptCompletion {
  std::string prompt;
  std::string completion;
  int64_t line = 0;  ///< 1-based line in the file it came from (0: not from a file)
};

/// Reads `{"prompt": "...", "completion": "..."}` lines (other keys ignored, blank lines
/// skipped). Throws peft::Error naming the file and line of the first bad one; nothing is
/// returned then.
inline std::vector<PromptCompletion> read_prompt_completion_jsonl(const std::string& path) {
  std::ifstream in(path);
  check(static_cast<bool>(in), "data::lm", "cannot open {}", path);
  std::vector<PromptCompletion> out;
  std::string line;
  for (int64_t number = 1; std::getline(in, line); ++number) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(line);
    } catch (const nlohmann::json::exception& e) {
      fail("data::lm", "{}:{}: not JSON: {}", path, number, e.what());
    }
    check(j.is_object() && j.contains("prompt") && j["prompt"].is_string() &&
              j.contains("completion") && j["completion"].is_string(),
          "data::lm", "{}:{}: expected {{\"prompt\": \"...\", \"completion\": \"...\"}}", path,
          number);
    out.push_back({j["prompt"].get<std::string>(), j["completion"].get<std::string>(), number});
  }
  check(!out.empty(), "data::lm", "{} holds no examples", path);
  return out;
}

/// A tokenised training sequence: ids and their labels (-100 where no loss is taken).
struct LmExample {
  std::vector<int64_t> input_ids;
  std::vector<int64_t> labels;
};

/// The ids of a prompt (its rendering, e.g. a chat template's user turn and the opening of the
/// assistant's) followed by the completion's ids and `end_ids` (an end-of-turn or eos token);
/// labels are -100 on the prompt, so the loss covers the answer only. Throws peft::Error naming
/// `where` when the result is longer than `max_length`.
inline LmExample make_lm_example(std::vector<int64_t> prompt_ids,
                                 const std::vector<int64_t>& completion_ids,
                                 const std::vector<int64_t>& end_ids, int64_t max_length,
                                 const std::string& where) {
  check(!completion_ids.empty() || !end_ids.empty(), "data::lm",
        "{}: nothing to learn (empty completion and no end token)", where);
  LmExample e;
  e.labels.assign(prompt_ids.size(), -100);
  e.input_ids = std::move(prompt_ids);
  for (const auto* part : {&completion_ids, &end_ids}) {
    e.input_ids.insert(e.input_ids.end(), part->begin(), part->end());
    e.labels.insert(e.labels.end(), part->begin(), part->end());
  }
  check(static_cast<int64_t>(e.input_ids.size()) <= max_length, "data::lm",
        "{}: {} tokens, more than the maximum length {}", where, e.input_ids.size(), max_length);
  return e;
}

/// A padded causal-LM batch: [N, L] int64 each; padding on the right (input_ids = pad id,
/// attention_mask = 0, labels = -100). Packed batches (pack_lm_batches) also carry
/// position_ids, each example's tokens numbered from 0 (models::LlamaImpl::forward takes them).
struct LmBatch {
  torch::Tensor input_ids;
  torch::Tensor attention_mask;
  torch::Tensor labels;
  torch::Tensor position_ids;  ///< undefined unless packed
  /// The batch on `device` (what peft::Trainer calls to move it).
  LmBatch to(const torch::Device& device) const {
    return {input_ids.to(device), attention_mask.to(device), labels.to(device),
            position_ids.defined() ? position_ids.to(device) : position_ids};
  }
};

/// The examples at `rows` padded to the longest of them.
inline LmBatch lm_batch(const std::vector<LmExample>& examples, const std::vector<size_t>& rows,
                        int64_t pad_id) {
  check(!rows.empty(), "data::lm", "a batch needs at least one example");
  size_t L = 0;
  for (auto r : rows) {
    check(r < examples.size(), "data::lm", "row {} is outside the {} examples", r, examples.size());
    L = std::max(L, examples[r].input_ids.size());
  }
  const auto n = static_cast<int64_t>(rows.size());
  const auto len = static_cast<int64_t>(L);
  LmBatch b{torch::full({n, len}, pad_id, torch::kLong), torch::zeros({n, len}, torch::kLong),
            torch::full({n, len}, -100, torch::kLong), torch::Tensor()};
  for (int64_t i = 0; i < n; ++i) {
    const auto& e = examples[rows[static_cast<size_t>(i)]];
    const auto k = static_cast<int64_t>(e.input_ids.size());
    if (k == 0) continue;
    b.input_ids[i].narrow(0, 0, k).copy_(torch::tensor(e.input_ids, torch::kLong));
    b.labels[i].narrow(0, 0, k).copy_(torch::tensor(e.labels, torch::kLong));
    b.attention_mask[i].narrow(0, 0, k).fill_(1);
  }
  return b;
}

/// Consecutive batches of `batch_size` over `rows` (the last may be smaller).
inline std::vector<LmBatch> lm_batches(const std::vector<LmExample>& examples,
                                       const std::vector<size_t>& rows, int64_t batch_size,
                                       int64_t pad_id) {
  check(batch_size > 0, "data::lm", "batch size must be positive, got {}", batch_size);
  std::vector<LmBatch> out;
  for (size_t at = 0; at < rows.size(); at += static_cast<size_t>(batch_size)) {
    const auto end = std::min(rows.size(), at + static_cast<size_t>(batch_size));
    out.push_back(lm_batch(examples,
                           std::vector<size_t>(rows.begin() + static_cast<std::ptrdiff_t>(at),
                                               rows.begin() + static_cast<std::ptrdiff_t>(end)),
                           pad_id));
  }
  return out;
}

/// Packed batches: the examples at `rows`, in order, laid back to back in rows of at most
/// `max_length` tokens (an example goes to the next row when it does not fit the current one),
/// `batch_size` rows to a batch, padded on the right. position_ids count each example's tokens
/// from 0 (0 on padding); each example's first token gets label -100 (alone it has no
/// predecessor; packed, the previous example's last token must not learn to predict it). With a
/// model that takes position_ids, every example's logits and the batch's mean loss over its
/// labelled tokens are those of the same examples unpacked, with less padding.
inline std::vector<LmBatch> pack_lm_batches(const std::vector<LmExample>& examples,
                                            const std::vector<size_t>& rows, int64_t max_length,
                                            int64_t batch_size, int64_t pad_id) {
  check(batch_size > 0, "data::lm", "batch size must be positive, got {}", batch_size);
  check(max_length > 0, "data::lm", "max_length must be positive, got {}", max_length);
  // The packed rows as examples of their own (ids and labels back to back), and the positions.
  std::vector<LmExample> packed;
  std::vector<std::vector<int64_t>> positions;
  for (auto r : rows) {
    check(r < examples.size(), "data::lm", "row {} is outside the {} examples", r, examples.size());
    const auto& e = examples[r];
    const auto k = static_cast<int64_t>(e.input_ids.size());
    check(k <= max_length, "data::lm", "example {} has {} tokens, more than the row length {}", r,
          k, max_length);
    if (k == 0) continue;
    if (packed.empty() || static_cast<int64_t>(packed.back().input_ids.size()) + k > max_length) {
      packed.emplace_back();
      positions.emplace_back();
    }
    auto& row = packed.back();
    row.input_ids.insert(row.input_ids.end(), e.input_ids.begin(), e.input_ids.end());
    row.labels.push_back(-100);
    row.labels.insert(row.labels.end(), e.labels.begin() + 1, e.labels.end());
    for (int64_t t = 0; t < k; ++t) positions.back().push_back(t);
  }
  // Padded as ordinary rows (lm_batch), with the positions beside them (0 on padding).
  std::vector<size_t> all(packed.size());
  for (size_t i = 0; i < all.size(); ++i) all[i] = i;
  auto out = lm_batches(packed, all, batch_size, pad_id);
  size_t next = 0;
  for (auto& b : out) {
    b.position_ids = torch::zeros_like(b.input_ids);
    for (int64_t i = 0; i < b.input_ids.size(0); ++i, ++next) {
      const auto& p = positions[next];
      b.position_ids[i]
          .narrow(0, 0, static_cast<int64_t>(p.size()))
          .copy_(torch::tensor(p, torch::kLong));
    }
  }
  return out;
}

}  // namespace data
PEFT_NAMESPACE_END
