#!/bin/bash
# Issue 16b: decode-time bypass eval (every one of 16 decoded tokens checked), 20 items per set, both stored rules
cd /work/wt/i16b
export UNSKILL_DATA_DIR=/work/shared/data
U=.venv/bin/unskill
for tag in default decode; do
  ( date -u +"%T eval-decode $tag"
    nice -n 5 $U eval --model /work/exp/s12/sm-gqa --tasks bypass:mbpp --stats mbpp=/work/scratch-16b/$tag.npz --gen-limit 20 --bypass-decode 16 --no-cache --no-progress --out /work/scratch-16b/$tag/bypass-mbpp-decode16.json
    date -u +"%T done $tag" ) > /work/scratch-16b/$tag-dec.log 2>&1 &
done
wait
