#!/usr/bin/env bash
# The miniature's full recipe: the shipped weights/mini from nothing, on a CPU (mini/README.md has the results).
#
#     bash mini/recipe.sh                 # every stage (independent ones side by side)
#     bash mini/recipe.sh sft-segment     # one stage (or several, in the order given)
#     nohup bash mini/recipe.sh > runs/mini/recipe.log 2>&1 &
#
# Stages: clip, vae, sft-segment, sft-truncate, reward (ω = 0, 0.3, 1; or reward-OMEGA), ship, eval; and for
# LongAlign §4 with a separate judge: scorer, tables, curves (ω = 0, 0.3, 0.5, 1; or curves-OMEGA), curves-eval.
# With no arguments: clip ∥ vae, sft-segment ∥ sft-truncate, the three rewards, scorer, the four curves (two
# at a time), ship, eval, curves-eval, tables.
# Every stage is resumable: it runs with --resume, so rerunning the script after a stop continues from the
# last checkpoint, and a finished stage only re-exports its outputs. Each stage logs to runs/mini/<stage>.log
# and records its wall time in runs/mini/times.txt.
#
# Training runs at fp32 in runs/mini/*; `ship` writes weights/mini as fp16 (the pipeline sample.py loads
# by default, plus scorer/ with its direction.safetensors, and the sampling settings in longalign.json);
# `eval` writes runs/mini/eval.md.
# The step counts below take about 9 h 30 min on 2 shared CPU cores (SFT about 7 h 10 min, scorer 1 h 30 min).
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${RUNS:-runs/mini}
CLIP_STEPS=${CLIP_STEPS:-440}
VAE_STEPS=${VAE_STEPS:-300}
SFT_STEPS=${SFT_STEPS:-22000}
SFT_DECAY_FROM=${SFT_DECAY_FROM:-19000}  # constant lr to here, then a linear fall to zero at SFT_STEPS
REWARD_STEPS=${REWARD_STEPS:-40}
REWARD_LR=${REWARD_LR:-5e-5}  # 2e-4 and above cost facts (mini/README.md: the reward table)
EVAL_SCENES=${EVAL_SCENES:-500}
# How the table's images are sampled (DPM-Solver++); `ship` records them in weights/mini/longalign.json, so
# sample.py with no flags samples the shipped model the way it was measured.
SAMPLE_STEPS=${SAMPLE_STEPS:-10}
SAMPLE_CFG=${SAMPLE_CFG:-3}
SHIP_FROM=${SHIP_FROM:-curves/reward-0.3}  # ships as weights/mini: LongAlign S+R at the paper's ω, 400 steps
PIPE=$RUNS/pipeline  # the fp32 pipeline folder the stages assemble
# The separate scorer and the long reward runs of Figure 5 (mini/README.md: "A judge that can see").
SCORER_STEPS=${SCORER_STEPS:-4000}
SCORER=${SCORER:-$RUNS/scorer/scorer}
SFT_PIPELINE=${SFT_PIPELINE:-$RUNS/sft-segment/pipeline}  # the segment-SFT UNet the long rewards start from
CURVE_STEPS=${CURVE_STEPS:-400}  # 10× the shipped reward's 40 steps
CURVE_EVERY=${CURVE_EVERY:-100}  # a LoRA copy, and so a point of the curves, every this many steps
CURVE_OMEGAS=${CURVE_OMEGAS:-0 0.3 0.5 1}
# Threads per process. Two stages that do not depend on each other (clip and vae; the two SFT runs) can run
# side by side with THREADS=1 each, which keeps 2 cores busier than one 2-thread process with small models.
export OMP_NUM_THREADS=${THREADS:-2}

mkdir -p "$RUNS"

run() {  # run NAME COMMAND...: log to $RUNS/NAME.log and record the wall time
    local name=$1; shift
    echo "== $name: $*"
    local start=$SECONDS
    "$@" > "$RUNS/$name.log" 2>&1 || { echo "$name failed; see $RUNS/$name.log"; tail -5 "$RUNS/$name.log"; exit 1; }
    echo "$name $((SECONDS - start)) s" | tee -a "$RUNS/times.txt"
}

stage_clip() {  # scorer + frozen text encoder, contrastive on sentences, segment means and truncated captions
    run clip python -m mini.pretrain --stage clip --data shapes --from-scratch mini --steps "$CLIP_STEPS" \
        --batch-size 64 --lr 1e-3 --warmup 25 --save-every 50 --workers 0 \
        --out "$RUNS/clip" --export "$PIPE" --resume
}

stage_vae() {  # 64×64 images <-> 16×16×4 latents
    run vae python -m mini.pretrain --stage vae --data shapes --from-scratch mini --steps "$VAE_STEPS" \
        --batch-size 16 --lr 2e-3 --warmup 20 --save-every 50 --sample-every 100 --workers 0 \
        --out "$RUNS/vae" --export "$PIPE" --resume
}

sft() {  # sft ENCODING: the UNet from scratch; segment is LongAlign's encoding, truncate the 77-token baseline
    local encoding=$1 name=sft-$1
    run "$name" python train.py --stage sft --data shapes --weights "$PIPE" --from-scratch mini --full \
        --encoding "$encoding" --steps "$SFT_STEPS" --batch-size 16 --lr 1e-3 --warmup 50 \
        --decay-from "$SFT_DECAY_FROM" --grad-clip 1 --ema 0.99 \
        --save-every 50 --sample-every 200 --val-steps 10 --cfg 3 --workers 0 \
        --out "$RUNS/$name" --export "$RUNS/$name/pipeline" --resume
}

reward() {  # reward OMEGA: a fresh LoRA on the segment-SFT UNet ascends the ω-reweighted scorer score
    local omega=$1
    run "reward-$omega" python train.py --stage reward --data shapes --weights "$RUNS/sft-segment/pipeline" \
        --scorer "$PIPE/scorer" --direction "$PIPE/scorer/direction.safetensors" --omega "$omega" \
        --steps "$REWARD_STEPS" --batch-size 8 --lr "$REWARD_LR" --warmup 5 --lora-rank 8 --rollout-steps 10 \
        --grad-stride 5 --cfg 3 --lora-dropout 0 --save-every 10 --sample-every 0 --workers 0 \
        --out "$RUNS/reward-$omega" --export "$RUNS/reward-$omega/pipeline" --resume
}

stage_scorer() {  # the separate judge (mini/scorer.py); each save checks it on 500 held-out val renders
    run scorer python -m mini.pretrain --stage scorer --data shapes --from-scratch mini --steps "$SCORER_STEPS" \
        --batch-size 64 --lr 1e-3 --warmup 100 --decay-from $((SCORER_STEPS * 4 / 5)) --ema 0.99 --save-every 250 \
        --heldout 500 --workers 0 --out "$RUNS/scorer" --resume
}

stage_tables() {  # Tables 1 and 4, η and the error tables for the first scorer and the separate one
    run tables python -m mini.tables --scorer "first=$PIPE/scorer" --scorer "separate=$SCORER" \
        --heldout-log "$RUNS/scorer/heldout.jsonl" -o "$RUNS/tables.md" --figures "$RUNS/figures"
}

curve() {  # curve OMEGA: a long reward run with the separate scorer, its LoRA kept every CURVE_EVERY steps
    local omega=$1 out=$RUNS/curves/reward-$1 step
    local common=(--stage reward --data shapes --weights "$SFT_PIPELINE" --scorer "$SCORER" --omega "$omega"
                  --batch-size 8 --lr "$REWARD_LR" --warmup 5 --lora-rank 8 --rollout-steps 10 --grad-stride 5
                  --cfg 3 --lora-dropout 0 --save-every 20 --sample-every 0 --workers 0 --out "$out" --resume)
    for ((step = CURVE_EVERY; step <= CURVE_STEPS; step += CURVE_EVERY)); do
        [ -f "$out/lora_step_$step.safetensors" ] && continue
        run "curve-$omega-$step" python train.py "${common[@]}" --steps "$step"
        cp "$out/lora.safetensors" "$out/lora_step_$step.safetensors"
    done
    # the finished run as a pipeline, merged into the SFT UNet (`ship` takes ω = 0.3's); training is done, so
    # this only exports
    run "curve-$omega-export" python train.py "${common[@]}" --steps "$CURVE_STEPS" --export "$out/pipeline"
}

stage_curves_eval() {  # every kept LoRA on the 500 test scenes, two noise seeds side by side; then the curves
    local seed omega step rows
    for seed in 0 1; do
        rows=(--row "SFT step 0=$SFT_PIPELINE")
        for omega in $CURVE_OMEGAS; do
            for ((step = CURVE_EVERY; step <= CURVE_STEPS; step += CURVE_EVERY)); do
                rows+=(--row "ω=$omega step $step=$RUNS/curves/reward-$omega/lora_step_$step.safetensors")
            done
        done
        OMP_NUM_THREADS=1 run "curves-eval-$seed" python -m mini.evaluate --scenes "$EVAL_SCENES" \
            --sample-steps "$SAMPLE_STEPS" --cfg "$SAMPLE_CFG" --seed "$seed" --scorer "$SCORER" \
            --lora-base "$SFT_PIPELINE" "${rows[@]}" -o "$RUNS/curves/seed$seed.md" &
    done
    wait
    run curves python -m mini.curves --seed-rows "0=$RUNS/curves/seed0.md.rows" \
        --seed-rows "1=$RUNS/curves/seed1.md.rows" -o "$RUNS/curves.md" --figures "$RUNS/figures"
}

stage_ship() {  # weights/mini: the $SHIP_FROM pipeline and both scorers, every weight file in fp16
    rm -rf weights/mini.tmp
    mkdir -p weights/mini.tmp
    cp -r "$RUNS/$SHIP_FROM/pipeline/." weights/mini.tmp/
    cp -r "$PIPE/scorer" weights/mini.tmp/scorer
    if [ -d "$SCORER" ]; then  # the judge of the §4 runs, with its held-out check log
        cp -r "$SCORER" weights/mini.tmp/separate_scorer
        local log=$(dirname "$SCORER")/heldout.jsonl
        if [ -f "$log" ]; then cp "$log" weights/mini.tmp/separate_scorer/; fi
    fi
    python - weights/mini.tmp "$SAMPLE_STEPS" "$SAMPLE_CFG" <<'PY'
import json
import sys
from pathlib import Path

from model.weights import read_state_dict, save_state_dict

folder, steps, cfg = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
for path in folder.glob("*/*.safetensors"):
    if path.name != "direction.safetensors":  # V is 64 floats; it stays fp32
        save_state_dict({k: v.half() if v.is_floating_point() else v for k, v in read_state_dict(path).items()}, path)
record = json.loads((folder / "longalign.json").read_text())
# fp32: the precision the README image and the tests' pixel checks were made in, on every CPU
record["sampling"] = {"sampler": "dpm", "steps": steps, "cfg": cfg, "dtype": "fp32"}
(folder / "longalign.json").write_text(json.dumps(record, indent=2) + "\n")
PY
    rm -rf weights/mini
    mv weights/mini.tmp weights/mini
    du -ab weights/mini | sort -n | tail -12
}

stage_eval() {  # the evaluation table: facts, Fréchet distance, Table 1 and η, on held-out scenes
    local common=(--scenes "$EVAL_SCENES" --sample-steps "$SAMPLE_STEPS" --cfg "$SAMPLE_CFG"
                  --scorer "$PIPE/scorer" -o "$RUNS/eval.md")
    local rows=("truncate SFT=$RUNS/sft-truncate/pipeline:truncate"
                "segment SFT=$RUNS/sft-segment/pipeline"
                "segment SFT + reward ω=0=$RUNS/reward-0/pipeline"
                "segment SFT + reward ω=0.3=$RUNS/reward-0.3/pipeline"
                "segment SFT + reward ω=1=$RUNS/reward-1/pipeline"
                "segment SFT + reward ω=0.3, 400 steps, separate scorer=$RUNS/curves/reward-0.3/pipeline")
    # Two one-thread processes share the rows (each row's numbers are cached beside eval.md); the last call
    # finds every row cached and writes the table.
    OMP_NUM_THREADS=1 python -m mini.evaluate "${common[@]}" --row "${rows[0]}" --row "${rows[2]}" --row "${rows[4]}" \
        > "$RUNS/eval-a.log" 2>&1 &
    OMP_NUM_THREADS=1 python -m mini.evaluate "${common[@]}" --row "${rows[1]}" --row "${rows[3]}" --row "${rows[5]}" \
        > "$RUNS/eval-b.log" 2>&1
    wait
    local all=()
    for row in "${rows[@]}"; do all+=(--row "$row"); done
    run eval python -m mini.evaluate "${common[@]}" "${all[@]}"
    cat "$RUNS/eval.md"
}

stage() {
    case $1 in
        clip) stage_clip ;;
        vae) stage_vae ;;
        sft-segment) sft segment ;;
        sft-truncate) sft truncate ;;
        reward) reward 0; reward 0.3; reward 1 ;;
        reward-*) reward "${1#reward-}" ;;
        ship) stage_ship ;;
        eval) stage_eval ;;
        scorer) stage_scorer ;;
        tables) stage_tables ;;
        curves) for omega in $CURVE_OMEGAS; do curve "$omega"; done ;;
        curves-eval) stage_curves_eval ;;
        curves-*) curve "${1#curves-}" ;;
        *) echo "unknown stage $1 (clip, vae, sft-segment, sft-truncate, reward, reward-OMEGA, ship, eval, scorer," \
                "tables, curves, curves-OMEGA, curves-eval)"; exit 2 ;;
    esac
}

side_by_side() {  # independent stages as one-thread processes at once; fails if any of them fails
    local pids=()
    for name in "$@"; do
        THREADS=1 bash "$0" "$name" &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid"; done
}

if [ $# -eq 0 ]; then
    side_by_side clip vae
    side_by_side sft-segment sft-truncate
    side_by_side reward-0 reward-0.3 reward-1
    stage scorer
    side_by_side curves-0 curves-0.3
    side_by_side curves-0.5 curves-1
    stage ship
    stage eval
    stage curves-eval
    stage tables
    exit 0
fi
for name in "$@"; do
    stage "$name"
done
