"""The parts of training, one concern per module; :func:`emtile.train` (in :mod:`emtile.trainer`)
puts them together.

- :mod:`~emtile.training.settings`: ``TrainSettings``, the settings of a run (light to import);
- :mod:`~emtile.training.loop`: ``fit``, the loop, and ``Callback``, its hooks;
- :mod:`~emtile.training.logs`: ``train.csv``, TensorBoard and progress-bar callbacks;
- :mod:`~emtile.training.batchnorm`: precise batch-norm statistics and the ``FreezeNorm`` callback;
- :mod:`~emtile.training.validation`: ``predict_slices`` and the ``Validator``;
- :mod:`~emtile.training.calibration`: the logit offset folded into ``best/``;
- :mod:`~emtile.training.run`: the run folder, its state files and the ``Checkpoint`` callback.
"""
