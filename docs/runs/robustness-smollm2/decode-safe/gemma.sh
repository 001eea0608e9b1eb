#!/bin/bash
# Issue 16b: Gemma-3 forget MBPP, decode-checked calibration with both rules, prefill bypass eval (30 items per set)
cd /work/wt/i16b
export UNSKILL_DATA_DIR=/work/shared/data
U=.venv/bin/unskill
mkdir -p /work/scratch-16b/gemma; cp /work/scratch-16i/run-gemma3/mbpp.npz /work/scratch-16b/gemma/mbpp.npz
date -u +"%T calibrate gemma"
nice -n 5 $U calibrate --model /work/exp/gemma3 --stats /work/scratch-16b/gemma/mbpp.npz --retain gsm8k:validation --forget mbpp:validation --out /work/scratch-16b/gemma/ksd-mbpp.json --no-progress --rules gauss ratio
date -u +"%T eval gemma"
nice -n 5 $U eval --model /work/exp/gemma3 --tasks bypass:mbpp --stats mbpp=/work/scratch-16b/gemma/mbpp.npz --gen-limit 30 --no-cache --no-progress --out /work/scratch-16b/gemma/bypass-mbpp.json
date -u +"%T done gemma"
