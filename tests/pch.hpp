#pragma once
// Precompiled for the test executable only; the library itself includes narrow headers.
#include <torch/torch.h>
#include <catch2/catch.hpp>
