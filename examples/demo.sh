#!/usr/bin/env bash
# The end-to-end walkthrough on the ISBI 2012 data, sized for a 2-core CPU (about 3 minutes after set-up):
# install, convert, train a small U-Net on slices 0-24, predict the volume tile by tile,
# score slices 25-29 as the challenge does, and draw the comparison figure.
#   bash examples/demo.sh [--data DIR] [--out DIR] [--iterations N]
# DIR defaults to $EMTILE_ISBI_DIR, else ../shared/data/isbi2012 beside the repository.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${EMTILE_ISBI_DIR:-../shared/data/isbi2012}
OUT=demo-out
ITER=400
while [ $# -gt 0 ]; do
  case "$1" in
    --data) DATA=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --iterations) ITER=$2; shift 2 ;;
    *) echo "unknown argument $1 (expected --data DIR, --out DIR or --iterations N)" >&2; exit 2 ;;
  esac
done
[ -f "$DATA/train-volume.tif" ] || { echo "ISBI data not found in $DATA (use --data DIR or EMTILE_ISBI_DIR)" >&2; exit 1; }
bash .ci/setup
mkdir -p "$OUT"
E=.venv/bin/emtile
set -x
# 1. any stack -> chunked OME-Zarr (opens in napari / neuroglancer). ISBI 2012 voxels are 4 x 4 nm
#    in plane and 50 nm apart; its TIFFs record no voxel size (resolution 1/1, no unit), so it is
#    given here (convert reads OME-XML, ImageJ or TIFF resolution metadata when a file has it)
$E convert "$DATA/train-volume.tif" "$OUT/train.zarr" --voxel-size 50,4,4 --levels 2 --overwrite
$E convert "$DATA/train-labels.tif" "$OUT/labels.zarr" --labels --voxel-size 50,4,4 --overwrite
$E info "$OUT/train.zarr"
# 2. train the CPU recipe's U-Net (train's defaults: base 16, depth 4, batch norm frozen for the
#    last 30%, percentile normalisation) on slices 0-24, validating on 25-29, for a short run
$E train --raw "$OUT/train.zarr" --labels "$OUT/labels.zarr" --out "$OUT/model" --overwrite \
    --train-slices 0:25 --val-slices 25:30 --iterations "$ITER" --val-every 100
$E info "$OUT/model/best"
# 3. predict the whole volume tile by tile (572 -> 388, mirrored borders), with a mask
$E predict --model "$OUT/model/best" --tile 572 "$OUT/train.zarr" "$OUT/pred.zarr" \
    --threshold 0.5 --overwrite
# 4. the ISBI scores on the held-out slices, and the pictures
$E evaluate "$OUT/pred.zarr" "$OUT/labels.zarr" --slices 25:30 --sweep \
    --json "$OUT/scores.json" --csv "$OUT/scores.csv"
$E show "$OUT/train.zarr" --pred "$OUT/pred.zarr" --labels "$OUT/labels.zarr" --slices 25,27 \
    -o "$OUT/compare.png"
$E show --log "$OUT/model" -o "$OUT/training.png"
# 5. labelled cells from the probability map (seeded watershed, blockwise, the same labels for any
#    block size), scored as a segmentation and drawn in colour over the raw slice
$E segment "$OUT/pred.zarr" "$OUT/seg.zarr" --overwrite
$E evaluate "$OUT/seg.zarr" "$OUT/labels.zarr" --slices 25:30 --json "$OUT/seg-scores.json"
$E show "$OUT/train.zarr" --seg "$OUT/seg.zarr" --labels "$OUT/labels.zarr" --slices 27 \
    -o "$OUT/segmentation.png"
