#pragma once

// Umbrella header: everything public in peft.

#include <peft/version.hpp>
#include <peft/config.hpp>
#include <peft/core/error.hpp>
#include <peft/core/parameters.hpp>
#include <peft/data/example.hpp>
#include <peft/data/glue.hpp>
#include <peft/data/clue.hpp>
#include <peft/train/metrics.hpp>
#include <peft/text/unicode.hpp>
#include <peft/text/wordpiece.hpp>
