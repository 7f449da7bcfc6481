#!/usr/bin/env bash
# Train the two-stage cascade with the documented recipe, or run a quick demo on the synthetic set.
#
# Usage:
#   bash train.sh [training flags ...]          the documented recipe on a prepared workspace
#   bash train.sh --demo [training flags ...]   synthetic workspace in demo/, tiny training, inference (minutes, CPU)
#
# The recipe (defaults of cascade_segmentation_model.py; see its --help): stage 1 30 epochs at 512 px, batch 8,
# lr 1e-3 (T_0 10); stage 2 150 epochs at 384 px on the stage-1 FGT crops, batch 12, lr 3e-4 (T_0 15); AdamW with
# weight decay 1e-4, cosine warm restarts (T_mult 2), L1 5e-5, best checkpoint by validation Dice.
# Training flags given here are appended last, so they override the defaults, e.g.
#   bash train.sh --epochs-stage1 50 --encoder-weights none --resume
#
# Environment (default in brackets):
#   WORKSPACE    [workspace]     folder written by prepare_to_train.py (tissue_dataset.csv,
#                                unified_segmentation_dataset.csv)
#   CHECKPOINTS  [checkpoints]   checkpoints go to $CHECKPOINTS/stage1 and $CHECKPOINTS/stage2
#   LOGDIR       [runs/cascade]  TensorBoard logs ($LOGDIR/stage1, $LOGDIR/stage2)
#   STAGES       [both]          both, 1 or 2
#   NPROC        [1]             processes (GPUs) on this machine; more than 1 starts torchrun (DDP)
#   PYTHON       [.venv/bin/python, created by scripts/setup_env.sh when missing]
#   DEMO_DIR     [demo]          where --demo writes everything
set -euo pipefail
cd "$(dirname "$0")"

usage() {
    cat <<'EOF'
usage: bash train.sh [training flags ...]          train the cascade on a prepared workspace ($WORKSPACE)
       bash train.sh --demo [training flags ...]   synthetic workspace, tiny training, inference (minutes, CPU)
environment: WORKSPACE [workspace] CHECKPOINTS [checkpoints] LOGDIR [runs/cascade] STAGES [both|1|2] NPROC [1]
             PYTHON [.venv/bin/python] DEMO_DIR [demo] DEVICE [auto]   (see the top of train.sh)
training flags: python cascade_segmentation_model.py --help
EOF
}

demo=0
case "${1:-}" in
    -h|--help) usage; exit 0 ;;
    --demo) demo=1; shift ;;
esac

# what the run needs, checked before the environment is set up (minutes on a first run)
case "${NPROC:-1}" in
    ''|*[!0-9]*|0) echo "error: NPROC must be a positive number of processes, not '${NPROC}'" >&2; exit 2 ;;
esac
workspace="${WORKSPACE:-workspace}"
if [ "$demo" = 0 ]; then
    case "${STAGES:-both}" in
        both) stage_flag=--train-both ;;
        1) stage_flag=--train-stage1 ;;
        2) stage_flag=--train-stage2 ;;
        *) echo "error: STAGES must be both, 1 or 2, not '${STAGES}'" >&2; exit 2 ;;
    esac
    for table in tissue_dataset.csv unified_segmentation_dataset.csv; do
        if [ ! -f "$workspace/$table" ]; then
            echo "error: $workspace/$table not found. Prepare a workspace first, e.g." >&2
            echo "  ${PYTHON:-.venv/bin/python} prepare_to_train.py --tissue-dir ../shared/data/tissue/train_valid \\" >&2
            echo "      --lesion-dir ../shared/data/lesion_cdd_cesm --workspace $workspace" >&2
            echo "or set WORKSPACE=/path/to/workspace (or try: bash train.sh --demo; bash train.sh --help)." >&2
            exit 2
        fi
    done
fi

if [ -z "${PYTHON:-}" ]; then
    bash scripts/setup_env.sh
    PYTHON=.venv/bin/python
fi

run_training() {  # run cascade_segmentation_model.py with one or NPROC processes
    if [ "${NPROC:-1}" -gt 1 ]; then
        "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" cascade_segmentation_model.py "$@"
    else
        "$PYTHON" cascade_segmentation_model.py "$@"
    fi
}

if [ "$demo" = 1 ]; then
    out="${DEMO_DIR:-demo}"
    echo "[demo] synthetic workspace in $out/workspace (a smoke test: not data to judge the models by)"
    "$PYTHON" prepare_to_train.py --synthetic 16 --workspace "$out/workspace"
    echo "[demo] training both stages briefly"
    run_training --train-both \
        --tissue-csv "$out/workspace/tissue_dataset.csv" \
        --cancer-csv "$out/workspace/unified_segmentation_dataset.csv" \
        --stage1-checkpoint-dir "$out/checkpoints/stage1" --stage2-checkpoint-dir "$out/checkpoints/stage2" \
        --logdir "$out/runs" \
        --epochs-stage1 2 --epochs-stage2 2 --img-size-stage1 128 64 --img-size-stage2 64 \
        --batch-size-stage1 4 --batch-size-stage2 4 --max-batches-per-epoch 4 --num-workers 0 --keep-epoch-checkpoints 0 \
        --encoder-weights none --overwrite "$@"
    if [ -f cascade_inference.py ]; then
        echo "[demo] inference on two synthetic images"
        samples="$out/sample_images"
        mkdir -p "$samples"
        find "$out/workspace/lesion" -path '*/images/*.png' | sort | head -n 2 | while read -r image; do
            cp "$image" "$samples/"
        done
        "$PYTHON" cascade_inference.py --stage1-weights "$out/checkpoints/stage1/best_stage1.pth" \
            --stage2-weights "$out/checkpoints/stage2/best_stage2.pth" --image-dir "$samples" \
            --output-dir "$out/predictions" --device "${DEVICE:-auto}" --overwrite
    fi
    echo "[demo] done: checkpoints in $out/checkpoints, TensorBoard: $PYTHON -m tensorboard.main --logdir $out/runs"
    exit 0
fi

checkpoints="${CHECKPOINTS:-checkpoints}"
run_training "$stage_flag" \
    --tissue-csv "$workspace/tissue_dataset.csv" \
    --cancer-csv "$workspace/unified_segmentation_dataset.csv" \
    --stage1-checkpoint-dir "$checkpoints/stage1" --stage2-checkpoint-dir "$checkpoints/stage2" \
    --logdir "${LOGDIR:-runs/cascade}" "$@"
