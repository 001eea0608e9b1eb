#!/bin/bash
# Issue 16b: Gemma-3 decode-time bypass eval (16 decoded tokens checked), 20 items per set, gauss default vs decode-checked ratio
cd /work/wt/i16b
export UNSKILL_DATA_DIR=/work/shared/data
U=.venv/bin/unskill
run() {  # tag stats
  date -u +"%T eval-decode gemma $1"
  nice -n 5 $U eval --model /work/exp/gemma3 --tasks bypass:mbpp --stats mbpp=$2 --gen-limit 20 --bypass-decode 16 --no-cache --no-progress --out /work/scratch-16b/gemma/bypass-mbpp-decode16-$1.json
  date -u +"%T done gemma $1"
}
run default /work/scratch-16i/run-gemma3/mbpp.npz > /work/scratch-16b/gdec-default.log 2>&1 &
run decode /work/scratch-16b/gemma/mbpp.npz > /work/scratch-16b/gdec-decode.log 2>&1 &
wait
