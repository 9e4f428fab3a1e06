"""Pictures of caches, runs and students (matplotlib Agg only: headless and deterministic).

* `clip2scene.viz.colors`: class colour maps (nuScenes-lidarseg 16, SemanticKITTI 19, ScanNet 20)
  and palettes for free-text queries.
* `clip2scene.viz.show`: `render_scan` draws one cached scan: every camera image with its
  projected points coloured by the teacher's pseudo-labels, the student's prediction and the
  ground truth, and a bird's-eye view with the same colourings.
* `clip2scene.viz.plot`: `plot_run` (loss curves and mIoU of a run folder) and
  `plot_confusion` (row-normalised confusion matrix).
* `clip2scene.viz.query`: `query_scan` scores every point of a scan against free-text queries
  with the checkpoint's own CLIP text tower (open-vocabulary heat maps).
* `clip2scene.viz.commands`: the typer command functions ``show``, ``plot`` and ``query``.

No module here selects a global matplotlib backend: figures are `matplotlib.figure.Figure`
objects rendered by an explicit Agg canvas, so importing clip2scene.viz never changes pyplot's
state in the caller's process.
"""
