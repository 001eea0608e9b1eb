#!/bin/bash
# Quiet re-run of issue 18's headline benchmarks (coordinator, session 12). Run from /work/main.
set -x
cd /work/main/benchmarks
P=/work/main/.venv/bin/python
E=/work/exp/s12
uptime
$P fused.py /work/exp/sm-new $E/sm-gqa --new-tokens 128 --runs 5 --threads 2 --out results/fused_smollm2_gqa_quiet.json
uptime
$P memory.py --model-dir $E/sm-gqa --tokens 6000 --settings default --out results/memory_smollm2_fused_quiet.json
uptime
$P edited.py /work/exp/sm-new $E/sm-gqa $E/sm-gqa-q4 $E/q4-rtn --new-tokens 128 --runs 5 --threads 1 --out results/int4_gqa_edited_smollm2_quiet.json
uptime
$P decode.py --model-dir $E/sm-gqa --hf smollm2-135m --engines unskill,unskill-int4,llama.cpp --int4-dir $E/sm-gqa-q4 --threads 1 --new-tokens 128 --runs 3 --out results/int4_gqa_decode_smollm2_t1_quiet.json
uptime
$P decode.py --model-dir $E/sm-gqa --hf smollm2-135m --engines unskill,unskill-int4,llama.cpp --int4-dir $E/sm-gqa-q4 --threads 2 --new-tokens 128 --runs 3 --out results/int4_gqa_decode_smollm2_t2_quiet.json
uptime
