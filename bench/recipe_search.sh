#!/usr/bin/env bash
# Runs one fine-tuning program once per line of a settings file and appends every result, with
# the options that produced it, to a JSON-lines log: the record behind docs/RESULTS.md's per-task
# tables and the recipes in examples/common/finetune.hpp.
#
#   bench/recipe_search.sh PROGRAM DATA_DIR LOG < settings.txt
#
# PROGRAM is build/pip/examples/peft-glue or peft-clue; each line of settings.txt holds the
# options of one run (e.g. "--task stsb --method lora --epochs 2"); lines starting with # and
# empty lines are skipped. Each run's full output goes to LOG.d/<n>.log. A failed run is logged
# with its exit status and the search goes on.
set -uo pipefail
program=${1:?usage: recipe_search.sh PROGRAM DATA_DIR LOG < settings}
data=${2:?usage: recipe_search.sh PROGRAM DATA_DIR LOG < settings}
log=${3:?usage: recipe_search.sh PROGRAM DATA_DIR LOG < settings}
mkdir -p "$log.d"
n=$(find "$log.d" -name '*.log' | wc -l)
while IFS= read -r line; do
  [[ -z "${line// }" || "$line" == \#* ]] && continue
  n=$((n + 1))
  read -ra args <<<"$line"
  echo "[$n] $line" >&2
  "$program" --data-dir "$data" "${args[@]}" >"$log.d/$n.log" 2>&1
  status=$?
  result=$(tail -n 1 "$log.d/$n.log")
  if [[ $status -ne 0 || "$result" != \{* ]]; then
    result="{\"exit_status\":$status}"
  fi
  python3 -c 'import json,sys; r=json.loads(sys.argv[1]); r["options"]=sys.argv[2]; r["run"]=int(sys.argv[3]); print(json.dumps(r))' \
    "$result" "$line" "$n" >>"$log"
  tail -n 1 "$log" >&2
done
