#!/bin/bash
# Quiet re-run, session 13 (coordinator). Helper jobs paused with SIGSTOP.
set -x
cd /work/main/benchmarks
source /work/main/.venv/bin/activate
export UNSKILL_DATA_DIR=/work/shared/data HF_HUB_OFFLINE=1
E=/work/exp/s13
uptime
python decode.py --model-dir $E/sm-gqa --hf smollm2-135m --engines unskill,unskill-int4,llama.cpp --int4-dir $E/sm-gqa-q4 --threads 1 --new-tokens 128 --runs 3 --out results/int4_decode_smollm2_t1_s13_quiet.json
uptime
python decode.py --model-dir $E/sm-gqa --hf smollm2-135m --engines unskill,unskill-int4,llama.cpp --int4-dir $E/sm-gqa-q4 --threads 2 --new-tokens 128 --runs 3 --out results/int4_decode_smollm2_t2_s13_quiet.json
uptime
python fused.py /work/exp/sm-new $E/sm-gqa $E/sm-inop --new-tokens 128 --runs 5 --threads 2 --out results/fused_smollm2_s13_quiet.json
uptime
python edited.py /work/exp/sm-new $E/sm-gqa /work/exp/s12/sm-gqa-q4 $E/sm-gqa-q4 $E/sm-inop-q4 --new-tokens 128 --runs 5 --threads 1 --out results/int4_edited_smollm2_s13_quiet.json
uptime
python decode.py --model-dir $E/gemma3-gqa --hf gemma3-270m --engines unskill,unskill-int4,llama.cpp --int4-dir $E/gemma3-gqa-q4 --threads 1 --new-tokens 128 --runs 3 --out results/int4_decode_gemma3_t1_s13_quiet.json
uptime
python decode.py --model-dir $E/gemma3-gqa --hf gemma3-270m --engines unskill,unskill-int4,llama.cpp --int4-dir $E/gemma3-gqa-q4 --threads 2 --new-tokens 128 --runs 3 --out results/int4_decode_gemma3_t2_s13_quiet.json
uptime
