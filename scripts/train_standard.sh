#!/usr/bin/env bash
# The guide's "standard" recipe (configs/standard.yaml).
# Usage: scripts/train_standard.sh [MODEL] [DATASET] [extra flags ...]   (see scripts/_launch.sh)
exec "$(dirname "$0")/_launch.sh" standard "$@"
