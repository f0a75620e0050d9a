#!/bin/sh
# The fuzz targets' valid inputs are read without error: the seeds peft's own writers make
# (safetensors, adapter, checkpoint, sharded) and the test suite's GLUE/CLUE samples. A target that
# rejected its valid inputs would fuzz nothing but its first check.
#   check_seeds.sh PEFT_FUZZ_REPLAY DATA_DIR WORK_DIR
set -eu
replay="$1"
data="$2"
out="$3"
rm -rf "$out"
PEFT_FUZZ_WRITE_SEEDS="$out" PEFT_FUZZ_DATA="$data" PEFT_FUZZ_TARGET=safetensors "$replay"
for target in safetensors adapter checkpoint sharded glue clue; do
  PEFT_FUZZ_EXPECT_VALID=1 PEFT_FUZZ_TARGET="$target" "$replay" "$out/$target" >/dev/null
done
echo "seeds: every valid input read"
