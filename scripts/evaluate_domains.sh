#!/usr/bin/env bash
# Every figure of the digital-mammogram acceptance table in two evaluate.py runs (see RESULTS.md):
#   1. the workspace's validation split (film tissue + CDD-CESM DM/CM lesions), VinDr dense-tissue masks, and the
#      CSAW-S patients kept out of training (pectoral Dice, lesions);
#   2. the two NYU full-field 16-bit images (lesions).
# Usage: bash scripts/evaluate_domains.sh STAGE1 STAGE2 OUTPUT_DIR [WORKSPACE] [CSAW_PATIENTS] [extra evaluate.py flags]
# STAGE1 / STAGE2: checkpoints (.pth) or shipped weights (.safetensors); WORKSPACE defaults to workspace_v2,
# CSAW_PATIENTS to 002 (the hold-out of prepare_to_train.py --csaw-holdout); the first argument starting with '-'
# ends the optional ones. Data from ../shared/data. Without STAGE1 STAGE2 OUTPUT_DIR: the usage, exit status 2.
set -euo pipefail
usage() {
    cat <<'EOF'
usage: bash scripts/evaluate_domains.sh STAGE1 STAGE2 OUTPUT_DIR [WORKSPACE] [CSAW_PATIENTS] [evaluate.py flags ...]
  STAGE1, STAGE2  stage checkpoints (.pth) or shipped weights (.safetensors), e.g. weights/stage1.safetensors
  OUTPUT_DIR      gets validation/ and nyu/ (metrics.json, per_image.csv)
  WORKSPACE       prepare_to_train.py workspace (default: workspace_v2); CSAW_PATIENTS default: 002
  data: $MAMMO_SHARED_DATA (default ../shared/data); python: $PYTHON (default .venv/bin/python)
EOF
}
case "${1:-}" in
    -h|--help) usage; exit 0 ;;
esac
if [ $# -lt 3 ]; then
    echo "error: STAGE1, STAGE2 and OUTPUT_DIR are required ($# argument(s) given)" >&2
    usage >&2
    exit 2
fi
cd "$(dirname "$0")/.."
stage1=$1; stage2=$2; out=$3
shift 3
workspace=workspace_v2; csaw_patients=002  # optional positionals, until the first evaluate.py flag
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then workspace=$1; shift; fi
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then csaw_patients=$1; shift; fi
data=${MAMMO_SHARED_DATA:-../shared/data}
python=${PYTHON:-.venv/bin/python}
"$python" evaluate.py --stage1-weights "$stage1" --stage2-weights "$stage2" --split val \
    --tissue-csv "$workspace/tissue_dataset.csv" --lesion-csv "$workspace/unified_segmentation_dataset.csv" \
    --density-dir "$data/vindr_density_dev" --csaw-dir "$data/csaw_s_dev" --csaw-patients "$csaw_patients" \
    --output-dir "$out/validation" --overwrite --no-plots "$@"
"$python" evaluate.py --stage1-weights "$stage1" --stage2-weights "$stage2" \
    --lesion-dir "$data/nyu_16bit" --output-dir "$out/nyu" --overwrite --no-plots "$@"
