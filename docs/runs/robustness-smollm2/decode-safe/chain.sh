#!/bin/bash
# Issue 16b: calibrate (current default vs decode-checked gauss+ratio) -> bypass eval, SmolLM2 forget MBPP, retain GSM8K
cd /work/wt/i16b
export UNSKILL_DATA_DIR=/work/shared/data
U=.venv/bin/unskill
chain() {  # tag, calibrate options...
  local tag=$1; shift
  local S=/work/scratch-16b/$tag.npz R=/work/scratch-16b/$tag
  mkdir -p $R; cp /work/scratch-16b/mbpp-base.npz $S
  date -u +"%T calibrate $tag"
  nice -n 5 $U calibrate --model /work/exp/s12/sm-gqa --stats $S --retain gsm8k:validation --forget mbpp:validation --out $R/ksd-mbpp.json --no-progress "$@"
  date -u +"%T eval $tag"
  nice -n 5 $U eval --model /work/exp/s12/sm-gqa --tasks bypass:mbpp --stats mbpp=$S --gen-limit 50 --no-cache --no-progress --out $R/bypass-mbpp.json
  date -u +"%T done $tag"
}
chain default --rules gauss --decode-check 0 > /work/scratch-16b/default.log 2>&1 &
chain decode --rules gauss ratio > /work/scratch-16b/decode.log 2>&1 &
wait
