#pragma once

// Batching of labelled texts: tokenised once, kept unpadded, and padded into batches on demand;
// batches of examples of similar length formed again every epoch (length_grouped_source), and
// evaluation in length order (length_sorted_batches). TextClassifier and the GLUE/CLUE programs
// batch with these; data-parallel runs shard every global batch across ranks.

#include <torch/types.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include <peft/config.hpp>
#include <peft/core/error.hpp>
#include <peft/data/example.hpp>
#include <peft/data/split.hpp>
#include <peft/text/tokenizer.hpp>
#include <peft/train/collective.hpp>
#include <peft/train/trainer.hpp>

PEFT_NAMESPACE_BEGIN

/// Tokenised, padded texts of a few examples and their labels (int64 classes, or float scores
/// for regression).
struct TextBatch {
  torch::Tensor input_ids, token_type_ids, attention_mask, labels;

  /// The same batch on `device` (the trainer moves batches with this).
  TextBatch to(const torch::Device& device) const {
    return {input_ids.to(device), token_type_ids.to(device), attention_mask.to(device),
            labels.to(device)};
  }
};

/// Examples tokenised once, kept as unpadded encodings with their labels, so that batches can be
/// formed again each epoch (length_grouped_batches) without tokenising again.
struct EncodedExamples {
  std::vector<text::Encoding> encodings;
  std::vector<float> labels;
  bool regression = false;  ///< labels are float scores (else int64 classes)
  int64_t pad_id = 0;       ///< the tokenizer's padding id

  size_t size() const { return encodings.size(); }
  /// The tokens of example `i`, special tokens included.
  size_t length(size_t i) const { return encodings[i].input_ids.size(); }

  /// Examples `rows`, in that order, padded on the right to the longest of them.
  TextBatch collate(const std::vector<size_t>& rows) const {
    check(!rows.empty(), "batching", "a batch needs at least one example");
    size_t length = 0;
    for (auto r : rows) {
      check(r < encodings.size(), "batching", "row {} is beyond the {} examples", r,
            encodings.size());
      length = std::max(length, encodings[r].input_ids.size());
    }
    auto enc = text::pad_encodings(
        rows.size(), [&](size_t i) -> const text::Encoding& { return encodings[rows[i]]; }, length,
        pad_id);
    std::vector<float> values;
    values.reserve(rows.size());
    for (auto r : rows) values.push_back(labels[r]);
    auto y = torch::tensor(values, torch::kFloat);
    if (!regression) y = y.to(torch::kLong);
    return {enc.input_ids, enc.token_type_ids, enc.attention_mask, y};
  }

  /// Every example in order, in chunks of `batch_size` (the last may be smaller).
  std::vector<TextBatch> batches(int64_t batch_size) const {
    std::vector<size_t> rows(size());
    for (size_t i = 0; i < rows.size(); ++i) rows[i] = i;
    return batches_of(rows, batch_size);
  }

  /// Examples `rows`, in that order, in chunks of `batch_size` (the last may be smaller).
  std::vector<TextBatch> batches_of(const std::vector<size_t>& rows, int64_t batch_size) const {
    check(batch_size > 0, "batching", "batch_size must be positive, got {}", batch_size);
    std::vector<TextBatch> out;
    for (size_t start = 0; start < rows.size(); start += static_cast<size_t>(batch_size)) {
      const size_t end = std::min(rows.size(), start + static_cast<size_t>(batch_size));
      out.push_back(collate(std::vector<size_t>(rows.begin() + static_cast<std::ptrdiff_t>(start),
                                                rows.begin() + static_cast<std::ptrdiff_t>(end))));
    }
    return out;
  }
};

/// Tokenises examples `rows` of `examples`, in that order (at most `max_len` tokens each; sentence
/// pairs when `pair`), without copying the texts.
inline EncodedExamples encode_examples(const std::vector<data::Example>& examples,
                                       const std::vector<size_t>& rows,
                                       const text::Tokenizer& tokenizer, int64_t max_len, bool pair,
                                       bool regression) {
  const auto options = text::EncodeOptions().max_length(max_len);
  EncodedExamples out;
  out.regression = regression;
  out.pad_id = tokenizer.pad_id();
  out.encodings.reserve(rows.size());
  out.labels.reserve(rows.size());
  for (auto r : rows) {
    const auto& e = examples.at(r);
    out.encodings.push_back(pair ? tokenizer.encode(e.text_a, e.text_b.value_or(""), options)
                                 : tokenizer.encode(e.text_a, options));
    out.labels.push_back(e.label);
  }
  return out;
}

/// Tokenises `examples` once, in their order (at most `max_len` tokens each; sentence pairs when
/// `pair`).
inline EncodedExamples encode_examples(const std::vector<data::Example>& examples,
                                       const text::Tokenizer& tokenizer, int64_t max_len, bool pair,
                                       bool regression) {
  std::vector<size_t> rows(examples.size());
  for (size_t i = 0; i < rows.size(); ++i) rows[i] = i;
  return encode_examples(examples, rows, tokenizer, max_len, pair, regression);
}

/// Tokenises `examples` once, in their order, in chunks of `batch_size` padded to the longest
/// encoding of the chunk (at most `max_len` tokens); sentence pairs when `pair`.
inline std::vector<TextBatch> make_text_batches(const std::vector<data::Example>& examples,
                                                const text::Tokenizer& tokenizer,
                                                int64_t batch_size, int64_t max_len, bool pair,
                                                bool regression) {
  check(batch_size > 0, "batching", "batch_size must be positive, got {}", batch_size);
  return encode_examples(examples, tokenizer, max_len, pair, regression).batches(batch_size);
}

/// The batches (lists of row indices) of one epoch with examples of similar length together,
/// so that little of each batch is padding: the rows are shuffled (from `seed` and `epoch`), cut
/// into groups of `group` batches' worth, each group is sorted by length and cut into batches
/// of `batch_size` (the last may be smaller), and the batches' order is shuffled. Every row is
/// in exactly one batch; the same arguments give the same batches on every platform.
inline std::vector<std::vector<size_t>> length_grouped_batches(const std::vector<size_t>& lengths,
                                                               int64_t batch_size, int64_t seed,
                                                               int64_t epoch, int64_t group = 50) {
  check(batch_size > 0, "batching", "batch_size must be positive, got {}", batch_size);
  check(group > 0, "batching", "the group must hold at least one batch, got {}", group);
  const auto n = static_cast<int64_t>(lengths.size());
  const auto order = detail::epoch_order(n, seed, epoch, /*shuffle=*/true);
  const auto span = static_cast<size_t>(batch_size * group);
  std::vector<std::vector<size_t>> batches;
  for (size_t start = 0; start < order.size(); start += span) {
    const size_t end = std::min(order.size(), start + span);
    std::vector<size_t> rows(order.begin() + static_cast<std::ptrdiff_t>(start),
                             order.begin() + static_cast<std::ptrdiff_t>(end));
    // Stable, so ties keep the shuffled order.
    std::stable_sort(rows.begin(), rows.end(),
                     [&](size_t a, size_t b) { return lengths[a] > lengths[b]; });
    for (size_t i = 0; i < rows.size(); i += static_cast<size_t>(batch_size)) {
      batches.emplace_back(rows.begin() + static_cast<std::ptrdiff_t>(i),
                           rows.begin() + static_cast<std::ptrdiff_t>(std::min(
                                              rows.size(), i + static_cast<size_t>(batch_size))));
    }
  }
  // A different stream from the rows' shuffle: the epoch number offset past any real epoch.
  const auto shuffled = detail::epoch_order(static_cast<int64_t>(batches.size()), seed,
                                            epoch + (int64_t{1} << 40), /*shuffle=*/true);
  std::vector<std::vector<size_t>> out;
  out.reserve(batches.size());
  for (auto i : shuffled) out.push_back(std::move(batches[static_cast<size_t>(i)]));
  return out;
}

/// A BatchSource for Trainer::fit over `examples`, re-forming length-grouped batches
/// (length_grouped_batches of `batch_size` rows) every epoch; ceil(n / batch_size) batches in
/// each (only the last of a group can be smaller).
///
/// Data parallel: every rank passes all the examples (the same on every rank), the global batch
/// size, its `rank` and the `world` size, and gets its share of each global batch: the rows at
/// positions rank, rank + world, ... after the batch is padded with its first rows to a multiple
/// of `world` (shard_for_rank's rule, so every rank has rows). The ranks' batches k together are
/// then batch k of one process, and the averaged gradient is its gradient.
inline BatchSource<TextBatch> length_grouped_source(std::shared_ptr<const EncodedExamples> examples,
                                                    int64_t batch_size, int64_t seed,
                                                    int64_t group = 50, int world = 1,
                                                    int rank = 0) {
  check(examples && examples->size() > 0, "batching", "no examples to batch");
  check(batch_size > 0, "batching", "batch_size must be positive, got {}", batch_size);
  check(world >= 1 && rank >= 0 && rank < world, "batching",
        "rank {} is not within a world of {} processes", rank, world);
  std::vector<size_t> lengths(examples->size());
  for (size_t i = 0; i < lengths.size(); ++i) lengths[i] = examples->length(i);
  struct Cache {
    int64_t epoch = -1;
    std::vector<std::vector<size_t>> batches;
  };
  auto cache = std::make_shared<Cache>();
  BatchSource<TextBatch> source;
  // Every group but the last is a whole number of batches: ceil(n / batch_size) in all.
  source.batches_per_epoch = (static_cast<int64_t>(lengths.size()) + batch_size - 1) / batch_size;
  source.batch = [examples, lengths = std::move(lengths), batch_size, seed, group, world, rank,
                  cache](int64_t epoch, int64_t index) {
    if (epoch != cache->epoch) {
      cache->batches = length_grouped_batches(lengths, batch_size, seed, epoch, group);
      cache->epoch = epoch;
    }
    check(index >= 0 && index < static_cast<int64_t>(cache->batches.size()), "batching",
          "batch {} of an epoch of {}", index, cache->batches.size());
    const auto& global = cache->batches[static_cast<size_t>(index)];
    return examples->collate(world == 1 ? global : shard_for_rank(global, world, rank));
  };
  return source;
}

/// Evaluation batches of `examples` sorted by length (longest first) so that padding is minimal;
/// `order`, when given, receives the example index of each row in batch order (to put
/// predictions back in the examples' order). Metrics that do not depend on the order of the
/// rows (all of peft::metrics) can be computed on these batches directly.
inline std::vector<TextBatch> length_sorted_batches(const EncodedExamples& examples,
                                                    int64_t batch_size,
                                                    std::vector<size_t>* order = nullptr) {
  check(batch_size > 0, "batching", "batch_size must be positive, got {}", batch_size);
  std::vector<size_t> rows(examples.size());
  for (size_t i = 0; i < rows.size(); ++i) rows[i] = i;
  std::stable_sort(rows.begin(), rows.end(),
                   [&](size_t a, size_t b) { return examples.length(a) > examples.length(b); });
  auto out = examples.batches_of(rows, batch_size);
  if (order != nullptr) *order = std::move(rows);
  return out;
}

PEFT_NAMESPACE_END
