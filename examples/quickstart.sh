#!/usr/bin/env bash
# The embedded default end to end: export the packaged SmolLM2, make a KSD guard for the built-in math set
# (probe, calibrate against the built-in coding and chat sets, store the rule), then show a math prompt refused
# and a coding prompt answered. Outputs land in out/.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
bash scripts/install.sh
. .venv/bin/activate
[ -f out/smollm2/unskill.json ] || unskill export --model smollm2-135m --out out/smollm2
# --limit 60 keeps this quick on a 2-core box; the default (200) and benchmark retain sets ($UNSKILL_DATA_DIR:
# real user requests, MMLU) make a stronger guard
unskill guard --model out/smollm2 --forget builtin:math --limit 60 --out out/math.npz
ksd-run --onnx out/smollm2/model.onnx --stats out/math.npz --max-new-tokens 64 \
  --prompt "A baker makes 24 muffins and sells 3/4 of them. How many muffins are left?" \
  --prompt "Write a python function to reverse a string."
