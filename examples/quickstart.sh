#!/usr/bin/env bash
# The embedded default end to end: export the packaged SmolLM2, probe it with the built-in math set,
# then show a math prompt refused and a coding prompt answered. Outputs land in out/.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
bash scripts/install.sh
. .venv/bin/activate
[ -f out/smollm2/unskill.json ] || unskill export --model smollm2-135m --out out/smollm2
unskill stats --model out/smollm2 --forget builtin:math --out out/math.npz
ksd-run --onnx out/smollm2/model.onnx --stats out/math.npz --max-new-tokens 64 \
  --prompt "A baker makes 24 muffins and sells 3/4 of them. How many muffins are left?" \
  --prompt "Write a python function to reverse a string."
