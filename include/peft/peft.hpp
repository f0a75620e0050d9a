#pragma once

// Umbrella header: everything public in peft.

#include <peft/version.hpp>
#include <peft/config.hpp>
#include <peft/core/error.hpp>
#include <peft/core/parameters.hpp>
