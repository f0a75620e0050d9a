#pragma once

#include <peft/version.hpp>

// Everything lives in an inline versioned namespace so two incompatible releases linked into one
// program fail at link time instead of mixing layouts silently.
#define PEFT_NAMESPACE_BEGIN \
  namespace peft {           \
  inline namespace v0 {
#define PEFT_NAMESPACE_END \
  }                        \
  }
