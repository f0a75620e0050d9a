#pragma once

#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <string>

#include <peft/config.hpp>

PEFT_NAMESPACE_BEGIN
namespace detail {

/// A shape as error messages print it: `[2, 3]`.
inline std::string shape(c10::ArrayRef<int64_t> sizes) {
  std::string out = "[";
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (i > 0) out += ", ";
    out += std::to_string(sizes[i]);
  }
  return out + "]";
}

}  // namespace detail
PEFT_NAMESPACE_END
