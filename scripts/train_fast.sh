#!/usr/bin/env bash
# The guide's "fast" recipe (configs/fast.yaml).
# Usage: scripts/train_fast.sh [MODEL] [DATASET] [extra flags ...]   (see scripts/_launch.sh)
exec "$(dirname "$0")/_launch.sh" fast "$@"
