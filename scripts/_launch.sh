#!/usr/bin/env bash
# Shared launcher of the train_*.sh recipes.
#   scripts/train_<recipe>.sh [MODEL] [DATASET] [extra flags for pretrain_npt_improved.py ...]
# MODEL: hub id or local folder ("" or "default": the embedded teacher).
# DATASET: hub dataset name, or a local file/folder ("" or "default": the embedded corpus).
# Environment: OUTPUT_DIR (default runs/<recipe>-<date>), LAUNCHER (default "python"; e.g.
# "accelerate launch" or "torchrun --nproc_per_node 8"), TENSORBOARD=0 to not start TensorBoard,
# TB_PORT (default 6006).
set -euo pipefail
recipe="$1"; shift
cd "$(dirname "$0")/.."
model="${1:-}"; [ $# -gt 0 ] && shift
dataset="${1:-}"; [ $# -gt 0 ] && shift
out="${OUTPUT_DIR:-runs/${recipe}-$(date +%Y%m%d-%H%M%S)}"
args=(--config "configs/${recipe}.yaml" --output_dir "$out")
if [ -n "$model" ] && [ "$model" != default ]; then args+=(--model_name "$model"); fi
if [ -n "$dataset" ] && [ "$dataset" != default ]; then
  if [ -e "$dataset" ]; then args+=(--data_files "$dataset"); else args+=(--dataset_name "$dataset"); fi
fi
if [ "${TENSORBOARD:-1}" != 0 ] && command -v tensorboard >/dev/null 2>&1; then
  mkdir -p "$out/tensorboard"
  tensorboard --logdir "$out/tensorboard" --port "${TB_PORT:-6006}" >"$out/tensorboard.log" 2>&1 &
  tb_pid=$!
  trap 'kill $tb_pid 2>/dev/null || true' EXIT
  echo "TensorBoard: http://localhost:${TB_PORT:-6006}  (log dir $out/tensorboard)"
fi
# shellcheck disable=SC2086
${LAUNCHER:-python} pretrain_npt_improved.py "${args[@]}" "$@"
