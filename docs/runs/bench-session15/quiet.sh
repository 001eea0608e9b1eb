#!/bin/bash
# Session 15 run (coordinator alone on the box): the defaults as they stand (packed export, packed int4,
# LM head 8-bit/128), all targets of issue 18 side by side. Log: docs/runs/bench-session15/quiet.log
set -x
cd /work/main/benchmarks
source /work/main/.venv/bin/activate
export UNSKILL_DATA_DIR=/work/shared/data HF_HUB_OFFLINE=1
E=/work/exp/s14
R=/work/main/docs/runs/bench-session15
uptime
python fused.py /work/exp/sm-new $E/sm --new-tokens 128 --runs 5 --threads 2 --out results/fused_smollm2_s15.json
uptime
python interleaved.py $E/sm $E/sm-q4-final --hf smollm2-135m --threads 1 --rounds 5 --out $R/il_smollm2_t1.json
uptime
python interleaved.py $E/sm $E/sm-q4-final --hf smollm2-135m --threads 2 --rounds 5 --out $R/il_smollm2_t2.json
uptime
python decode.py --model-dir $E/sm --hf smollm2-135m --engines unskill,unskill-int4,llama.cpp --int4-dir $E/sm-q4-final --threads 2 --new-tokens 128 --runs 3 --out results/int4_decode_smollm2_t2_s15.json
uptime
python fused.py /work/exp/gemma3 $E/gemma3 --new-tokens 128 --runs 3 --threads 2 --out results/fused_gemma3_s15.json
uptime
python interleaved.py $E/gemma3 $E/gemma3-q4-final --hf gemma3-270m --threads 1 --rounds 3 --out $R/il_gemma3_t1.json
uptime
python interleaved.py $E/gemma3 $E/gemma3-q4-final --hf gemma3-270m --threads 2 --rounds 3 --out $R/il_gemma3_t2.json
uptime
python decode.py --model-dir $E/gemma3 --hf gemma3-270m --engines unskill,unskill-int4,llama.cpp --int4-dir $E/gemma3-q4-final --threads 2 --new-tokens 128 --runs 3 --out results/int4_decode_gemma3_t2_s15.json
uptime
python memory.py --model-dir $E/sm --tokens 6000 --settings default --out results/memory_smollm2_s15.json
uptime
python fused.py /work/exp/sm-new $E/sm --new-tokens 128 --runs 5 --threads 2 --out results/fused_smollm2_s15_end.json
uptime
