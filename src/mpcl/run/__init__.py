"""What runs around the training loop: the command line, config checks, checkpoints and
resuming, the guards, the run log, how the run was launched.

- ``cli``: ``run_cli`` (the console commands around Hydra) and ``report_error`` (one line and
  an exit status for bad input, divergence, interrupts; ``mpcl.errors``).
- ``config``: config values checked before anything is built.
- ``build``: data module, LightningModule and Trainer from a config (every entry point).
- ``checkpoint``: atomic, final, self-describing checkpoints; strict weight loading.
- ``resume``: the checkpoint a run continues from, read once.
- ``guards``: divergence and SIGINT/SIGTERM guards (callbacks).
- ``runlog``: the run's log file, progress lines and the progress bar.
- ``launch``: the multirun + DDP check, SLURM requeue, each sweep job's record (a failed job
  does not end the sweep).
- ``rundir``: one run per run directory (a lock holding pid@host).
- ``sync_batchnorm``: union-batch BatchNorm for CPU ranks.
"""
