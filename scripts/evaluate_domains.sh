#!/usr/bin/env bash
# Every figure of the digital-mammogram acceptance table in two evaluate.py runs (see RESULTS.md):
#   1. the workspace's validation split (film tissue + CDD-CESM DM/CM lesions), VinDr dense-tissue masks, and the
#      CSAW-S patients kept out of training (pectoral Dice, lesions);
#   2. the two NYU full-field 16-bit images (lesions).
# Usage: bash scripts/evaluate_domains.sh STAGE1 STAGE2 OUTPUT_DIR [WORKSPACE] [CSAW_PATIENTS] [extra evaluate.py flags]
# STAGE1 / STAGE2: checkpoints (.pth) or shipped weights (.safetensors); WORKSPACE defaults to workspace_v2,
# CSAW_PATIENTS to 002 (the hold-out of prepare_to_train.py --csaw-holdout). Data from ../shared/data.
set -euo pipefail
cd "$(dirname "$0")/.."
stage1=$1; stage2=$2; out=$3; workspace=${4:-workspace_v2}; csaw_patients=${5:-002}
shift $(( $# < 5 ? $# : 5 ))
data=${MAMMO_SHARED_DATA:-../shared/data}
python=${PYTHON:-.venv/bin/python}
"$python" evaluate.py --stage1-weights "$stage1" --stage2-weights "$stage2" --split val \
    --tissue-csv "$workspace/tissue_dataset.csv" --lesion-csv "$workspace/unified_segmentation_dataset.csv" \
    --density-dir "$data/vindr_density_dev" --csaw-dir "$data/csaw_s_dev" --csaw-patients "$csaw_patients" \
    --output-dir "$out/validation" --overwrite --no-plots "$@"
"$python" evaluate.py --stage1-weights "$stage1" --stage2-weights "$stage2" \
    --lesion-dir "$data/nyu_16bit" --output-dir "$out/nyu" --overwrite --no-plots "$@"
