#pragma once

// Reporting a training run: a progress display that redraws one line on a terminal and prints
// plain, grep-able lines everywhere else (CI logs, files, pipes), and a JSON-lines metrics log.

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <limits>
#include <map>
#include <optional>
#include <ostream>
#include <string>
#include <utility>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <peft/config.hpp>
#include <peft/core/error.hpp>

PEFT_NAMESPACE_BEGIN

/// Whether `out` is std::cout, std::cerr or std::clog attached to a terminal. Any other stream
/// (a file, a string stream) is not a terminal.
inline bool is_terminal(const std::ostream& out) {
  if (&out == &std::cout) return ::isatty(STDOUT_FILENO) == 1;
  if (&out == &std::cerr || &out == &std::clog) return ::isatty(STDERR_FILENO) == 1;
  return false;
}

/// "1:02:03" for 3723 seconds, "--:--" when unknown.
inline std::string format_duration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "--:--";
  const auto total = static_cast<int64_t>(std::llround(seconds));
  return fmt::format("{}:{:02}:{:02}", total / 3600, (total / 60) % 60, total % 60);
}

/// How a Progress display behaves.
struct ProgressOptions {
  /// Redraw one line with '\r' (a terminal) or print plain lines. Unset: is_terminal(out).
  std::optional<bool> tty;
  /// Plain mode: print a line at least every this many steps (0: never by count).
  int64_t every_steps = 50;
  /// Plain mode: print a line when this many seconds passed since the last one (0: never).
  double every_seconds = 30.0;
  /// Terminal mode: redraw at most this often, in seconds, so a fast loop does not flood it.
  double redraw_seconds = 0.1;
  /// Width of the bar in characters (terminal mode).
  int bar_width = 24;
};

/// A progress display for a run of `total` steps: step/total, the values passed to update()
/// (loss, lr, ...), steps per second and the estimated time left.
class Progress {
 public:
  using Clock = std::chrono::steady_clock;

  /// Reports to `out`, which must outlive the display. `first_step` is where a resumed run
  /// starts, so the rate counts only the steps this process ran.
  Progress(std::ostream& out, int64_t total, ProgressOptions options = {}, int64_t first_step = 0)
      : out_(out),
        total_(total),
        options_(options),
        tty_(options.tty.value_or(is_terminal(out))),
        first_step_(first_step),
        start_(Clock::now()),
        last_print_(start_),
        last_printed_step_(first_step) {}

  Progress(const Progress&) = delete;
  Progress& operator=(const Progress&) = delete;

  /// Whether this display redraws one line.
  bool tty() const { return tty_; }

  /// Reports that `step` steps of total are done, with named values shown in order
  /// ("loss 0.6931 lr 5.00e-04").
  void update(int64_t step, const std::vector<std::pair<std::string, double>>& values = {}) {
    const auto now = Clock::now();
    const double since_print = std::chrono::duration<double>(now - last_print_).count();
    const bool last = step >= total_;
    if (tty_) {
      if (!last && drawn_ && since_print < options_.redraw_seconds) return;
      out_ << '\r' << line(step, values, now, true) << "\x1b[K" << std::flush;
      drawn_ = true;
    } else {
      const bool by_steps =
          options_.every_steps > 0 && step - last_printed_step_ >= options_.every_steps;
      const bool by_time = options_.every_seconds > 0 && since_print >= options_.every_seconds;
      if (!last && !by_steps && !by_time) return;
      if (last && step == last_printed_step_ && printed_any_) return;
      out_ << line(step, values, now, false) << '\n' << std::flush;
      printed_any_ = true;
    }
    last_print_ = now;
    last_printed_step_ = step;
  }

  /// Prints a message on its own line (evaluation results, warnings) without breaking the bar.
  void message(const std::string& text) {
    if (tty_ && drawn_) out_ << "\r\x1b[K";
    out_ << text << '\n' << std::flush;
    drawn_ = false;
  }

  /// Ends the bar's line on a terminal; plain mode needs nothing.
  void finish() {
    if (tty_ && drawn_) out_ << '\n' << std::flush;
    drawn_ = false;
  }

 private:
  std::string line(int64_t step, const std::vector<std::pair<std::string, double>>& values,
                   Clock::time_point now, bool bar) const {
    const double elapsed = std::chrono::duration<double>(now - start_).count();
    const auto done = step - first_step_;
    const double rate = elapsed > 0 && done > 0 ? static_cast<double>(done) / elapsed : 0.0;
    const double eta = rate > 0 ? static_cast<double>(total_ - step) / rate
                                : std::numeric_limits<double>::quiet_NaN();
    std::string text;
    if (bar) {
      const double frac = total_ > 0 ? std::min(1.0, static_cast<double>(step) / total_) : 0.0;
      const int width = std::max(0, static_cast<int>(options_.bar_width));
      const int filled = std::clamp(static_cast<int>(frac * width), 0, width);
      text += '[';
      text.append(static_cast<size_t>(filled), '#');
      text.append(static_cast<size_t>(width - filled), '.');
      text += "] ";
    }
    text += fmt::format("step {}/{}", step, total_);
    for (const auto& [name, value] : values) {
      text += fmt::format(" {} {}", name, format_value(value));
    }
    text += fmt::format(" {:.2f} steps/s ETA {}", rate, format_duration(eta));
    return text;
  }

  static std::string format_value(double v) {
    if (!std::isfinite(v)) return fmt::format("{}", v);
    const double a = std::fabs(v);
    return a != 0 && (a < 1e-3 || a >= 1e5) ? fmt::format("{:.3e}", v) : fmt::format("{:.4f}", v);
  }

  std::ostream& out_;
  int64_t total_;
  ProgressOptions options_;
  bool tty_;
  int64_t first_step_;
  Clock::time_point start_;
  Clock::time_point last_print_;
  int64_t last_printed_step_;
  bool drawn_ = false;
  bool printed_any_ = false;
};

/// Appends one JSON object per line to a file, flushed after each, so a crashed run keeps every
/// record it wrote and `tail -f`/`jq` can follow it.
class MetricsLog {
 public:
  /// Opens `path` for appending (creating its folder); a resumed run continues the same log.
  /// Throws peft::Error when the file cannot be opened.
  explicit MetricsLog(const std::filesystem::path& path) : path_(path) {
    std::error_code ec;
    if (path.has_parent_path()) std::filesystem::create_directories(path.parent_path(), ec);
    out_.open(path, std::ios::out | std::ios::app);
    check(out_.is_open(), "progress", "{}: cannot open the metrics log for appending",
          path.string());
  }

  /// Writes `record` as one line. Non-finite numbers become null (JSON has no NaN).
  void write(const nlohmann::json& record) {
    check(record.is_object(), "progress", "{}: a metrics record must be a JSON object",
          path_.string());
    out_ << record.dump() << '\n';
    out_.flush();
    check(out_.good(), "progress", "{}: cannot write the metrics log", path_.string());
  }

  /// The file being written.
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
  std::ofstream out_;
};

PEFT_NAMESPACE_END
