#pragma once

#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>

#include <fmt/format.h>

#include <peft/config.hpp>

PEFT_NAMESPACE_BEGIN

/// Every error peft raises. The message starts with where it comes from, e.g.
/// `[peft::lora] rank must be positive, got r=0`.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// Throws peft::Error with the message `[peft::<where>] <formatted message>`.
template <class... Args>
[[noreturn]] void fail(std::string_view where, fmt::format_string<Args...> format, Args&&... args) {
  throw Error(
      fmt::format("[peft::{}] {}", where, fmt::format(format, std::forward<Args>(args)...)));
}

/// Throws like fail() unless `condition` holds.
template <class... Args>
void check(bool condition, std::string_view where, fmt::format_string<Args...> format,
           Args&&... args) {
  if (!condition) fail(where, format, std::forward<Args>(args)...);
}

PEFT_NAMESPACE_END
