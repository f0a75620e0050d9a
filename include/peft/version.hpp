#pragma once

/// peft's version as three integers and one comparable number (major * 10000 + minor * 100 +
/// patch).
#define PEFT_VERSION_MAJOR 0
#define PEFT_VERSION_MINOR 1
#define PEFT_VERSION_PATCH 0
#define PEFT_VERSION (PEFT_VERSION_MAJOR * 10000 + PEFT_VERSION_MINOR * 100 + PEFT_VERSION_PATCH)
#define PEFT_VERSION_STRING "0.1.0"
