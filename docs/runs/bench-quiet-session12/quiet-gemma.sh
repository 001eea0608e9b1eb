#!/bin/bash
set -x
cd /work/main/benchmarks
P=/work/main/.venv/bin/python
E=/work/exp/s12
G=/work/scratch-18a/gemma3
uptime
$P fused.py /work/exp/gemma3 $G --new-tokens 64 --runs 3 --threads 2 --out results/fused_gemma3_gqa_quiet.json
uptime
$P decode.py --model-dir $G --hf gemma3-270m --engines unskill,unskill-int4,llama.cpp --int4-dir $E/gemma3-gqa-q4 --threads 1 --new-tokens 128 --runs 3 --out results/int4_gqa_decode_gemma3_t1_quiet.json
uptime
