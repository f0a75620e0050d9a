#pragma once

// Umbrella header: everything public in peft.

#include <peft/version.hpp>
#include <peft/config.hpp>
#include <peft/core/error.hpp>
#include <peft/core/parameters.hpp>
#include <peft/core/site.hpp>
#include <peft/core/targets.hpp>
#include <peft/core/attach.hpp>
#include <peft/core/tuned.hpp>
#include <peft/functional/attention.hpp>
#include <peft/methods/adapter.hpp>
#include <peft/methods/bitfit.hpp>
#include <peft/methods/lora.hpp>
#include <peft/methods/prefix.hpp>
#include <peft/methods/prompt.hpp>
#include <peft/nn/attention.hpp>
#include <peft/nn/embedding.hpp>
#include <peft/nn/encoder.hpp>
#include <peft/nn/encoder_layer.hpp>
#include <peft/nn/linear.hpp>
#include <peft/io/safetensors.hpp>
#include <peft/data/example.hpp>
#include <peft/data/glue.hpp>
#include <peft/data/clue.hpp>
#include <peft/train/metrics.hpp>
#include <peft/train/schedule.hpp>
#include <peft/train/checkpoint.hpp>
#include <peft/train/progress.hpp>
#include <peft/train/trainer.hpp>
#include <peft/text/unicode.hpp>
#include <peft/text/wordpiece.hpp>
