#!/usr/bin/env bash
# The guide's "difficult" recipe (configs/difficult.yaml).
# Usage: scripts/train_difficult.sh [MODEL] [DATASET] [extra flags ...]   (see scripts/_launch.sh)
exec "$(dirname "$0")/_launch.sh" difficult "$@"
