#!/usr/bin/env bash
# The default draft adapter, end to end: self-distilled chat data (templated requests plus requests the
# model writes itself), adapter training, export in bfloat16, held-out evaluation and the acceptance curve.
#
# Every size is an environment variable whose default is the shipped run's (README, "The default draft
# adapter"). Finished stages are skipped and training resumes from its checkpoint, so a killed run is
# continued by running this again. Usage (from the repository root): `make draft-adapter`, or e.g.
#   TRIDLM="python3 -m tridlm" DEVICE=cuda DISTILL_BATCH=1024 bench/draft_adapter.sh
set -euo pipefail

TRIDLM=${TRIDLM:-.venv/bin/tridlm}        # the command line to run (word-split: "python3 -m tridlm" works)
DEVICE=${DEVICE:-cpu}
DRAFT=${DRAFT:-out/draft}                 # distilled data
RUN=${RUN:-$DRAFT/run}                    # the training run: checkpoint.pt, adapters/step-N snapshots
EXPORT=${EXPORT:-src/tridlm/adapters/smollm2-135m-instruct}
CURVE=${CURVE:-bench/results/draft-curve} # .jsonl and .png of accepted length vs training tokens
MIXED=${MIXED:-2304}                      # templated prompts (tridlm distill --source mixed)
MAGPIE=${MAGPIE:-9216}                    # prompts the model writes itself (--source magpie)
DISTILL_BATCH=${DISTILL_BATCH:-1024}      # rows generated together; the magpie prompts depend on it
RANK=${RANK:-8}
STEPS=${STEPS:-540}                       # length of the learning-rate schedule
UNTIL=${UNTIL:-360}                       # the step the shipped run stopped at (device time ran out)
BATCH=${BATCH:-32}
WARMUP=${WARMUP:-30}
EVERY=${EVERY:-90}                        # held-out loss and checkpoint (curve point) interval
EVAL=${EVAL:-1}                           # 0: stop after the export (evaluate the snapshots elsewhere)

model=(--device "$DEVICE" --dtype float32)
distill() {  # distill SOURCE COUNT: written aside and renamed, so a partial file is never taken as done
    local out="$DRAFT/$1.jsonl"
    if [ ! -s "$out" ]; then
        mkdir -p "$DRAFT"
        $TRIDLM distill "${model[@]}" --adapter none --source "$1" --prompts "$2" --batch "$DISTILL_BATCH" \
            --max-tokens 128 --out "$out.tmp"
        mv "$out.tmp" "$out"
    fi
}
distill mixed "$MIXED"
distill magpie "$MAGPIE"

$TRIDLM train "${model[@]}" --adapter none --data "$DRAFT/mixed.jsonl" "$DRAFT/magpie.jsonl" --out "$RUN" \
    --regime adapter --lora-rank "$RANK" --lora-alpha $((2 * RANK)) \
    --lora-targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj --block-size 8 --suffix-fraction 0.5 \
    --batch-size "$BATCH" --seq-len 256 --lr 1e-3 --warmup-steps "$WARMUP" --steps "$STEPS" --until "$UNTIL" \
    --eval-every "$EVERY" --checkpoint-every "$EVERY"
$TRIDLM export-adapter "$EXPORT" "${model[@]}" --adapter "$RUN/linear_spec_lora"
[ "$EVAL" = 1 ] || exit 0
$TRIDLM eval-draft "${model[@]}" --adapter "$EXPORT" --modes ar,spec,diffusion --block-sizes 4,8 \
    | tee "$CURVE.final.json"
$TRIDLM eval-draft "${model[@]}" --snapshots "$RUN/adapters" --modes spec --block-sizes 8 \
    --plot "$CURVE.png" | tee "$CURVE.jsonl"
