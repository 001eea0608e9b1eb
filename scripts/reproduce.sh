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
#      NA_RATIOS, NA_VAL (calibrate-na candidates and items), MAIN_TASKS / EDITED_TASKS (eval task lists; edited
#      models skip the generation tasks the original scored 0 on unless EDITED_TASKS is given),
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
# TASKS minus the generation tasks the original scored 0 on: after / before is undefined there (the report
# prints "—"), and on the small models GSM8K 8-shot and MBPP pass@1 are 0 — a third of the small run's time.
measurable() { ${PYTHON:-python3} -c 'import json, sys
scores = {n: t["score"] for n, t in json.load(open(sys.argv[2]))["tasks"].items()}
print(",".join(t for t in sys.argv[1].split(",") if t and not (t.startswith("gen:") and scores.get(t) == 0)))' "$1" "$2"; }
val_spec() { case $1 in xquad-*) echo "$1:train[$XPROBE:$((XPROBE + 100))]" ;; *) echo "$1:validation" ;; esac; }
ksd_group() {   # SETTING...: calibrate KSD for all of them in one pass unless each already has its JSON
  local args=() need="" s
  for s in "$@"; do [ -f "$C/ksd-$s.json" ] || need=1; args+=(--stats "$s=$S/$s.npz" --forget "$s=$(val_spec "$s")"); done
  [ -z "$need" ] || $U calibrate --model "$M/onnx" "${args[@]}" --retain mmlu:dev --limit $VAL --out-dir "$C"
}
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
        # every language's composed stats, not only $s's: KSD calibrates all seven cubes in one pass
        for l in $LANGS; do [ -f "$S/xquad-$l.npz" ] || $U stats --compose "$S/shard-$l.npz" \
          $(xquad_others "xquad-$l" "$S") --out "$S/xquad-$l.npz"; done ;;
    esac; done ;;
  calibrate)
    # KSD, one pass per group (GSM8K + MBPP; the seven XQuAD languages): each validation prompt is prefilled once
    # and scored against every cube; a setting's retain set is the other settings' validation prompts plus MMLU
    # dev prompts (KSD must not refuse general questions either). Never test items.
    pair=$(for s in $SETTINGS; do case $s in gsm8k|mbpp) printf '%s ' $s ;; esac; done)
    case "$pair" in
      *" "*" "*) ksd_group gsm8k mbpp ;;
      ?*) s=${pair% }; [ -f "$C/ksd-$s.json" ] || $U calibrate --model "$M/onnx" --stats "$S/$s.npz" \
            --retain "$(other $s):validation+mmlu:dev" --forget "$s:validation" --limit $VAL --out "$C/ksd-$s.json" ;;
    esac
    if [[ "$SETTINGS" == *xquad* ]]; then ksd_group $(for l in $LANGS; do printf 'xquad-%s ' $l; done); fi
    for s in $SETTINGS; do
      case $s in
        gsm8k|mbpp) retain="$(other $s):validation" ;;
        xquad-*) retain=$(xquad_val "$s") ;;
      esac
      [ -f "$C/na-$s.json" ] || $U calibrate-na --model "$M/onnx" --stats "$S/$s.npz" --retain "$retain" \
        --forget "$(val_spec $s)" --limit $NA_VAL --ratios $NA_RATIOS --keep "$M/na-$s" --out "$C/na-$s.json"
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
        gsm8k|mbpp) tasks=${EDITED_TASKS:-$(measurable "$main_tasks" "$R/original.json")}; limit=$LIMIT; gen=$GEN; extra="" ;;
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
