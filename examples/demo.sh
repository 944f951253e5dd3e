#!/usr/bin/env bash
# The end-to-end walkthrough on the ISBI 2012 data: install, convert, inspect.
#   bash examples/demo.sh [--data DIR] [--out DIR]
# DIR defaults to $EMTILE_ISBI_DIR, else ../shared/data/isbi2012 beside the repository.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${EMTILE_ISBI_DIR:-../shared/data/isbi2012}
OUT=demo-out
while [ $# -gt 0 ]; do
  case "$1" in
    --data) DATA=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    *) echo "unknown argument $1 (expected --data DIR or --out DIR)" >&2; exit 2 ;;
  esac
done
[ -f "$DATA/train-volume.tif" ] || { echo "ISBI data not found in $DATA (use --data DIR or EMTILE_ISBI_DIR)" >&2; exit 1; }
bash .ci/setup
mkdir -p "$OUT"
E=.venv/bin/emtile
set -x
$E convert "$DATA/train-volume.tif" "$OUT/train.zarr" --levels 2 --overwrite
$E convert "$DATA/train-labels.tif" "$OUT/labels.zarr" --labels --overwrite
$E info "$OUT/train.zarr" --stats
