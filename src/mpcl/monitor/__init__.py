"""What a user watches: W&B dashboards, figures, debug images, the end-of-run report and the
sweep summary. Callbacks here read the training step's ``outputs`` and the module's declared
attributes; they never change the module.

- ``dashboard``: W&B run config, name, group, step alignment; per-class IoU tables, artifacts.
- ``figures``: predictions, prototype t-SNE (Fig. 8) and activation maps (Fig. 7) after each
  validation.
- ``debug_images``: the training step's intermediates every N steps.
- ``viz``: the t-SNE and activation-map renderers; ``images``: tensor-to-picture conversions.
- ``report``: the IoU table and paths printed at the end of a run.
- ``summary``: the table of a multirun (``mpcl-summarize``).
"""
