#!/usr/bin/env bash
# Reproduce docs/results.md: export, stats, calibration, edits, evaluation and the report.
#
#   scripts/reproduce.sh                  the small run (SmolLM2; GSM8K <-> MBPP; < 1 hour on a 2-core CPU)
#   SIZE=full scripts/reproduce.sh smollm2-135m gemma3-270m     the published run (hours)
#   STEPS="eval report" scripts/reproduce.sh ...                some steps only
#
# Every step skips outputs that already exist and the evaluation caches per item, so a killed run resumes.
# Env: UNSKILL_DATA_DIR (benchmarks, default ../shared/data), WORK (default runs/), SIZE (small|full),
#      SETTINGS (default: gsm8k mbpp, plus the 7 XQuAD languages when SIZE=full), SP_RATIO (default 0.02),
#      NA_RATIOS, NA_VAL (calibrate-na candidates and items), MAIN_TASKS / EDITED_TASKS (eval task lists),
#      XMAX (token budget of XQuAD items, default 4096), GENERAL_TASKS (general set for the XQuAD edits).
set -euo pipefail
cd "$(dirname "$0")/.."
export UNSKILL_DATA_DIR=${UNSKILL_DATA_DIR:-$(cd .. && pwd)/shared/data}
U=${UNSKILL:-.venv/bin/unskill}
WORK=${WORK:-runs}
SIZE=${SIZE:-small}
STEPS=${STEPS:-"export stats calibrate edit eval report"}
LANGS="en es de ar hi vi zh"
if [ "$SIZE" = full ]; then
  PROBE=${PROBE:-200}; XPROBE=${XPROBE:-100}; LIMIT=${LIMIT:-200}; XLIMIT=${XLIMIT:-100}; GEN=${GEN:-50}
  XGEN=${XGEN:-50}; VAL=${VAL:-100}
  SETTINGS=${SETTINGS:-"gsm8k mbpp $(for l in $LANGS; do printf 'xquad-%s ' $l; done)"}
else
  PROBE=${PROBE:-100}; XPROBE=${XPROBE:-50}; LIMIT=${LIMIT:-60}; XLIMIT=${XLIMIT:-30}; GEN=${GEN:-12}
  XGEN=${XGEN:-10}; VAL=${VAL:-50}
  SETTINGS=${SETTINGS:-"gsm8k mbpp"}
fi
SP_RATIO=${SP_RATIO:-0.02}
XMAX=${XMAX:-4096}   # XQuAD contexts run long in Hindi/Arabic/Vietnamese/Chinese tokens: keep all 100 items
NA_RATIOS=${NA_RATIOS:-0.005,0.01,0.02,0.03}
NA_VAL=${NA_VAL:-40}
MODELS=${*:-smollm2-135m}
other() { [ "$1" = gsm8k ] && echo mbpp || echo gsm8k; }
xquad_others() { for o in $LANGS; do if [ "xquad-$o" != "$1" ]; then printf '%s\n' "$2/shard-$o.npz"; fi; done; }
xquad_val() { local s=""; for o in $LANGS; do if [ "xquad-$o" != "$1" ]; then s="$s+xquad-$o:train[$XPROBE:$((XPROBE + 20))]"; fi; done; echo "${s#+}"; }

for MODEL in $MODELS; do
  M=$WORK/$MODEL; S=$M/stats; R=$M/results; C=$M/calibration; mkdir -p "$S" "$R" "$C"
  for step in $STEPS; do case $step in
  export)
    [ -f "$M/onnx/unskill.json" ] || $U export --model "$MODEL" --out "$M/onnx" ;;
  stats)
    for s in $SETTINGS; do case $s in
      gsm8k|mbpp)
        [ -f "$S/$s.npz" ] || $U stats --model "$M/onnx" --forget "$s:train" --retain "$(other $s):train" \
          --limit $PROBE --skill "$s" --out "$S/$s.npz" ;;
      xquad-*)
        for l in $LANGS; do [ -f "$S/shard-$l.npz" ] || $U stats --model "$M/onnx" --forget "xquad-$l:train" \
          --text --limit $XPROBE --skill "xquad-$l" --out "$S/shard-$l.npz"; done
        [ -f "$S/$s.npz" ] || $U stats --compose "$S/shard-${s#xquad-}.npz" $(xquad_others "$s" "$S") --out "$S/$s.npz" ;;
    esac; done ;;
  calibrate)
    for s in $SETTINGS; do
      case $s in
        gsm8k|mbpp) retain="$(other $s):validation"; forget="$s:validation" ;;
        xquad-*) retain=$(xquad_val "$s"); forget="$s:train[$XPROBE:$((XPROBE + 100))]" ;;
      esac
      # KSD must not refuse general questions either: MMLU dev prompts join the retain side (never test items).
      [ -f "$C/ksd-$s.json" ] || $U calibrate --model "$M/onnx" --stats "$S/$s.npz" --retain "$retain+mmlu:dev" \
        --forget "$forget" --limit $VAL --out "$C/ksd-$s.json"
      [ -f "$C/na-$s.json" ] || $U calibrate-na --model "$M/onnx" --stats "$S/$s.npz" --retain "$retain" \
        --forget "$forget" --limit $NA_VAL --ratios $NA_RATIOS --keep "$M/na-$s" --out "$C/na-$s.json"
    done ;;
  edit)
    for s in $SETTINGS; do
      [ -f "$M/sp-$s/unskill.json" ] || $U edit prune --model "$M/onnx" --stats "$S/$s.npz" --ratio $SP_RATIO --out "$M/sp-$s"
    done ;;
  eval|eval-original|eval-xquad|eval-edited)
    # Every setting's stats (not the per-language shards): one pass records KSD entries for all of them.
    stats_args=$(for f in "$S"/*.npz; do n=$(basename "$f" .npz); [[ $n == shard-* ]] || printf -- '--stats %s=%s ' "$n" "$f"; done)
    main_tasks=${MAIN_TASKS:-"gsm8k:test,mbpp:test,mmlu:test,gen:gsm8k,gen:mbpp,gen:mmlu"}
    xq_tok=$(for l in $LANGS; do printf 'xquad-%s:test,' $l; done)
    xq_gen=$(for l in $LANGS; do printf 'gen:xquad-%s,' $l; done)
    [[ $step == eval-xquad || $step == eval-edited ]] || [ -f "$R/original.json" ] || $U eval --model "$M/onnx" --tasks "$main_tasks" $stats_args --limit $LIMIT \
      --gen-limit $GEN --out "$R/original.json"
    if [[ "$SETTINGS" == *xquad* && ( $step == eval || $step == eval-xquad ) ]]; then
      [ -f "$R/original-xquad.json" ] || $U eval --model "$M/onnx" --tasks "$xq_tok$xq_gen" $stats_args \
        --limit $XLIMIT --gen-limit $XGEN --max-tokens $XMAX --out "$R/original-xquad.json"
    fi
    for s in $SETTINGS; do for method in na sp; do
      [[ $step == eval || $step == eval-edited ]] && [ -d "$M/$method-$s" ] || continue
      case $s in
        gsm8k|mbpp) tasks=${EDITED_TASKS:-$main_tasks}; limit=$LIMIT; gen=$GEN; extra="" ;;
        xquad-*) tasks="${xq_tok%,}"; limit=$XLIMIT; gen=$XGEN; extra="--max-tokens $XMAX" ;;
      esac
      [ -f "$R/$method-$s.json" ] || $U eval --model "$M/$method-$s" --tasks "$tasks" --limit $limit \
        --gen-limit $gen $extra --method $method --setting "$s" --out "$R/$method-$s.json"
      # XQuAD settings: the general set on the original's sample size, so after / before compare the same items.
      if [[ $s == xquad-* ]]; then
        [ -f "$R/$method-$s-general.json" ] || $U eval --model "$M/$method-$s" --tasks "${GENERAL_TASKS:-mmlu:test}" \
          --limit $LIMIT --gen-limit $GEN --method $method --setting "$s" --out "$R/$method-$s-general.json"
      fi
    done; done ;;
  esac; done
done

if [[ "$STEPS" == *report* ]]; then
  results=$(for MODEL in $MODELS; do ls $WORK/$MODEL/results/*.json; done)
  calib=$(for MODEL in $MODELS; do ls $WORK/$MODEL/calibration/*.json 2>/dev/null || true; done)
  $U report --results $results --calibration $calib --out "${REPORT:-$WORK/results.md}" \
    --commands scripts/reproduce.sh
fi
