"""``emtile train``: train a U-Net on annotated slices (streaming, resumable)."""

import click

from emtile.cli._types import (LABELS_HELP, RAW_HELP, SliceList, amp_option, defaults,
                               device_option, progress_option)
from emtile.losses import AFFINITY_LOSSES, LOSSES
from emtile.training.settings import OPTIMIZERS, SCHEDULES, TARGETS, TrainSettings

_D = defaults(TrainSettings)


@click.command()
@click.option("--raw", required=True, help=RAW_HELP)
@click.option("--labels", required=True, help=LABELS_HELP)
@click.option("--out", required=True, help="Output folder: best/ and last/ model folders, train.csv.")
@click.option("--train-slices", type=SliceList(), required=True,
              help="Slices to train on, e.g. 0:25 or 0,2,4 (--ndim 3: one z range, e.g. 0:150).")
@click.option("--val-slices", type=SliceList(), default=_D.val_slices,
              help="Slices to validate on, e.g. 25:30 (--ndim 3: a z range, affinities scored by "
                   "VOI of its segmentation; default: no validation; best = last).")
@click.option("--ndim", type=int, default=_D.ndim, show_default=True,
              help="2: a 2-D network on slices; 3: a 3-D network on volumes (affinities, or "
                   "boundaries with z context).")
@click.option("--target", type=click.Choice(TARGETS), default=_D.target, show_default=True,
              help="boundaries (one channel: cell interior; binary labels or object ids; 2-D or "
                   "3-D) or affinities (3-D; object ids converted with --labels --ids: one output "
                   "channel per offset).")
@click.option("--offsets", default=_D.offsets,
              help="Affinity offsets dz,dy,dx separated by ';', e.g. \"-1,0,0;0,-1,0;0,0,-1;0,-3,0\" "
                   "[default: nearest neighbours and -3, -9 scaled by the voxel size].")
@click.option("--factors", default=_D.factors,
              help="3-D max-pool factors per level, e.g. \"1,2,2;2,2,2\" (sets --depth) "
                   "[default: from the voxel size].")
@click.option("--kernels", default=_D.kernels,
              help="3-D kernel sizes per resolution level (depth + 1), e.g. \"1,3,3;3,3,3;3,3,3\" "
                   "[default: 1 along axes a level pools less, else 3].")
@click.option("--affinity-loss", type=click.Choice(AFFINITY_LOSSES), default=_D.affinity_loss,
              show_default=True,
              help="Affinity loss: MALA-balanced BCE or torch-em's Dice of the boundary class.")
@click.option("--iterations", type=click.IntRange(min=1), default=_D.iterations, show_default=True,
              help="Total optimiser steps (a resumed run continues up to this number).")
@click.option("--base", type=click.IntRange(min=1), default=_D.base,
              help="Channels of the first level, doubled per level [default: 16, the CPU recipe "
                   "(8 for --ndim 3); 64 is the paper's size, ~16x the arithmetic; on --resume: "
                   "the run's].")
@click.option("--depth", type=click.IntRange(min=1), default=_D.depth,
              help="Number of poolings [default: 4 (2 for --ndim 3); on --resume: the run's].")
@click.option("--batch-norm/--no-batch-norm", default=_D.batch_norm,
              help="Batch normalisation after every convolution [default: on; on --resume: the "
                   "run's].")
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), default=_D.dropout, show_default=True,
              help="Dropout at the end of the contracting path (the paper: 0.5).")
@click.option("--bn-momentum", type=click.FloatRange(0, 1, min_open=True), default=_D.bn_momentum, show_default=True,
              help="Momentum of the batch-norm running statistics (PyTorch's default 0.1 follows the "
                   "last ~10 patches; 0.01 averages ~100).")
@click.option("--freeze-bn", type=click.FloatRange(0, 1), default=_D.freeze_bn, show_default=True,
              help="Fraction of the run after which batch norm is frozen (statistics recomputed, "
                   "then fixed), so the rest trains the network as prediction runs it; 1: never.")
@click.option("--tile", default=_D.tile,
              help="Training input patch size (a valid size for the network; Z,Y,X in 3-D); the "
                   "label patch is its output [default: 572 in 2-D; in 3-D about 32 voxels of "
                   "output along the finest axis, 72 at 10 nm].")
@click.option("--batch-size", type=click.IntRange(min=1), default=_D.batch_size, show_default=True, help="Patches per step.")
@click.option("--lr", type=float, default=_D.lr, show_default=True, help="Base learning rate.")
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default=_D.optimizer, show_default=True,
              help="Adam, or SGD with --momentum (the paper: SGD, momentum 0.99).")
@click.option("--momentum", type=float, default=_D.momentum, show_default=True, help="SGD momentum.")
@click.option("--weight-decay", type=float, default=_D.weight_decay, show_default=True, help="L2 weight decay.")
@click.option("--schedule", type=click.Choice(SCHEDULES), default=_D.schedule,
              show_default=True, help="Learning-rate schedule over --iterations (after warm-up).")
@click.option("--warmup", type=click.IntRange(min=0), default=_D.warmup,
              help="Linear warm-up iterations [default: 2% of --iterations, at most 200].")
@click.option("--loss", type=click.Choice(LOSSES), default=_D.loss, show_default=True,
              help="bce is weighted by the paper's border weight map (see --w0, --sigma).")
@click.option("--w0", type=float, default=_D.w0, show_default=True,
              help="Border weight amplitude between touching cells (0: off).")
@click.option("--sigma", type=float, default=_D.sigma, show_default=True, help="Border weight width in pixels.")
@click.option("--class-balance", type=click.FloatRange(0, 1), default=_D.class_balance, show_default=True,
              help="Exponent of the inverse-frequency class weights (from the training slices): "
                   "1 = balanced (the paper), 0 = off, 0.5 = halfway. With the border term "
                   "(--w0) they bias the output further towards membrane.")
@click.option("--workers", type=click.IntRange(min=0), default=_D.workers, show_default=True,
              help="DataLoader processes that read, augment and weight patches (0: in the main process).")
@device_option()
@amp_option(_D.amp, " Validation predicts in float32.")
@click.option("--clip", type=float, default=_D.clip, help="Clip the gradient norm to this value.")
@click.option("--val-every", type=click.IntRange(min=0), default=_D.val_every, show_default=True,
              help="Validate and save last/ every N iterations (and at the end).")
@click.option("--seed", type=int, default=_D.seed, show_default=True, help="Seed of the model initialisation and patches.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last/ checkpoint.")
@click.option("--overwrite", is_flag=True, help="Replace the run in --out.")
@click.option("--elastic/--no-elastic", default=_D.elastic, show_default=True,
              help="The paper's elastic deformation (3x3 grid, --elastic-sigma px).")
@click.option("--elastic-sigma", type=float, default=_D.elastic_sigma,
              help="Std of the coarse elastic displacements in pixels [default: 10 in 2-D, 4 "
                   "in 3-D (in-plane)].")
@click.option("--flip/--no-flip", default=_D.flip, show_default=True, help="Random flips and 90-degree rotations.")
@click.option("--intensity/--no-intensity", default=_D.intensity, show_default=True,
              help="Brightness, contrast and gamma jitter.")
@click.option("--noise", type=float, default=_D.noise, show_default=True,
              help="Largest std of additive Gaussian noise (0: off).")
@click.option("--blur", type=float, default=_D.blur, show_default=True, help="Largest Gaussian blur sigma (0: off).")
@click.option("--foreground", type=click.FloatRange(0, 1), default=_D.foreground,
              help="Fraction of patches placed on a foreground (label 1) pixel (default: uniform).")
@click.option("--channels-last/--no-channels-last", default=_D.channels_last, show_default=True,
              help="Channels-last memory layout (faster on CPU).")
@click.option("--normalize", default=_D.normalize, show_default=True,
              help="How raw pixels become the model's input, recorded in the model and applied "
                   "by predict: percentile (1st and 99.8th percentiles of a sample of the volume "
                   "-> 0 and 1; percentile:LOW,HIGH for others), minmax (the volume's minimum "
                   "and maximum), or dtype (integers / their type's maximum, floats as they "
                   "are).")
@click.option("--calibrate/--no-calibrate", default=_D.calibrate, show_default=True,
              help="Fit a logit scale and offset for best/ on the training slices so that "
                   "threshold 0.5 gives the lowest pixel error and 0.7 the best V-Rand (border "
                   "weights bias the output towards membrane); best/ keeps them unless the "
                   "validation V-Rand (best threshold) falls by more than 0.01.")
@click.option("--keep-calibrated", is_flag=True,
              help="Keep the calibrated best/ even when its validation V-Rand is lower.")
@click.option("--tune-segment/--no-tune-segment", default=_D.tune_segment, show_default=True,
              help="With --val-slices (2-D): segment the validation slices over a small grid of "
                   "thresholds and merge thresholds after training and record the best in "
                   "best/ (emtile info shows it; emtile segment --settings model uses it).")
@progress_option()
def train(raw, labels, out, resume, overwrite, progress, **settings):
    """Train a valid-convolution U-Net on annotated slices (or, with --ndim 3 --target affinities,
    on object ids in 3-D); write a model folder to --out.

    The defaults are the documented CPU recipe (base 16, depth 4, batch norm frozen for the last
    30%, lr 2e-3, no class balance, percentile normalisation, bf16 where native): about 30
    minutes on a quiet 2-core CPU with bf16 (3800 iterations). --base 64 gives the paper's model
    size.

    \b
    emtile train --raw vol.zarr --labels labels.zarr --out model/ \\
        --train-slices 0:25 --val-slices 25:30
    emtile train ... --resume              # continue after a crash or Ctrl-C
    emtile train --raw raw.zarr --labels ids.zarr --out aff/ --ndim 3 \\
        --target affinities --train-slices 0:150 --val-slices 150:250
    emtile train --raw vol.zarr --labels labels.zarr --out z/ --ndim 3 \\
        --factors "1,2,2;1,2,2;1,2,2;1,2,2" --kernels "1,3,3;1,3,3;1,3,3;1,3,3;3,3,3" \\
        --tile 5,380,380 --train-slices 0:25 --val-slices 25:30   # boundaries, z context
    emtile predict --model model/best ...  # the folder is all predict needs
    """
    from emtile.trainer import format_result, train as run
    from emtile.training.settings import TrainSettings

    result = run(raw, labels, out, TrainSettings(**settings), resume=resume, overwrite=overwrite,
                 progress=progress)
    click.echo(format_result(result))
