"""What a practitioner watches during a training run: TensorBoard (and wandb) scalars, periodic
validation with `best.pt`, and an ETA for the whole run.

Four small pieces, each called from a training loop at an obvious point (after every optimiser
step, after every epoch); none of them changes what the run computes:

- `RunLogger`: scalars -> TensorBoard event files in the run folder (`tensorboard --logdir runs/`),
  and to wandb when the config asks for it (`--wandb`; the package must be installed).
  Tags: ``train/<term>`` (loss, each loss term, lr, grad_norm, ...), ``perf/scans_per_s``,
  ``perf/points_per_s``, ``train/epoch_loss`` and ``val/<metric>``.
- `Validator`: scores the model on a cache split (`--val-split`) every `--val-every` epochs and
  after the last one. Distillation: ground-truth mIoU of the student's text-embedding argmax
  (``val/miou``, the `clip2scene evaluate` protocol) when the cache has labels; always the
  agreement with the teacher on camera-visible points (``val/teacher_miou``: mIoU over the
  prompt classes of the student's argmax against the teacher's per-point argmax as truth, and
  ``val/teacher_accuracy``: the fraction of points where they agree). The score `best.pt` is
  kept by is ``miou`` when the cache has labels, else ``teacher_miou``. Fine-tuning / linear
  probe: ground-truth mIoU of the classifier's argmax (``miou``).
- `BestKeeper`: remembers the best score (restored from a resumed checkpoint) and writes `best.pt`.
- `Eta`: remaining time of the whole run from the steps done so far in this process.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader

from clip2scene.errors import CacheError, ConfigError
from clip2scene.storage import Cache
from clip2scene.train.data import ScanDataset, collate
from clip2scene.train.evaluate import _num, score_split
from clip2scene.train.loss import text_logits
from clip2scene.train.metrics import ConfusionMatrix
from clip2scene.train.predict import eval_labels, forward_points

log = logging.getLogger(__name__)

BEST_FILE = "best.pt"
VAL_FILE = "val.jsonl"
_NOT_SCALARS = ("step", "epoch", "diverged", "loss_median", "points", "seconds")
_PERF = ("scans_per_s", "points_per_s")


# ------------------------------------------------------------------------------ scalars
class RunLogger:
    """Scalars of one run: TensorBoard event files in `out` (always), wandb when `wandb`.

    `resumed_at`: the step a run resumed in place continues after; TensorBoard drops the
    earlier files' events after it (the interrupted part of the run), as `metrics.jsonl` does.
    Use only on the process that writes the run folder (rank 0)."""

    def __init__(self, out: str | os.PathLike, config: dict, wandb: bool = False, resumed_at: int = 0):
        from torch.utils.tensorboard import SummaryWriter  # ~2 s import: only when a run starts

        self.out = Path(out)
        # purge_step: the reader drops every earlier event at or after this step
        self.writer = SummaryWriter(log_dir=str(self.out), purge_step=resumed_at + 1 if resumed_at else None)
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```",
                             global_step=resumed_at + 1)  # not before the purge step (it would purge more)
        self.wandb = None
        if wandb:
            import wandb as wandb_module  # TrainConfig / FinetuneConfig checked that it is installed

            self.wandb = wandb_module.init(project=os.environ.get("WANDB_PROJECT", "clip2scene"), name=self.out.name,
                                           dir=str(self.out), config=config)

    def scalars(self, step: int, values: dict[str, float | None]) -> None:
        """Log tag -> value at `step` (None values are skipped)."""
        values = {k: float(v) for k, v in values.items() if v is not None}
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, global_step=step)
        if self.wandb is not None and values:
            self.wandb.log(values, step=step)

    def train_step(self, step: int, row: dict) -> None:
        """One metrics.jsonl row of a training step: its loss terms, lr, grad_norm as train/...,
        throughput as perf/scans_per_s and perf/points_per_s."""
        values: dict[str, float | None] = {}
        for key, value in row.items():
            if key in _NOT_SCALARS or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            values[f"perf/{key}" if key in _PERF else f"train/{key}"] = value
        if row.get("points") and row.get("seconds"):
            values["perf/points_per_s"] = row["points"] / max(row["seconds"], 1e-9)
        self.scalars(step, values)

    def flush(self) -> None:
        self.writer.flush()

    def __enter__(self) -> "RunLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


# ------------------------------------------------------------------------------ validation
@torch.no_grad()
def distill_scores(model: torch.nn.Module, loader, text: torch.Tensor, prompt_to_eval: np.ndarray | None,
                   voxel_size: float, device: torch.device) -> dict:
    """Scores of a distillation student (`forward_points` -> (N, D) text-space features).

    text: (C, D) float32 text embeddings on `device`. prompt_to_eval: (C,) int prompt class ->
    evaluation label (0 = none), or None when the cache has no labels. Returns teacher_miou /
    teacher_accuracy (student argmax over the C prompt classes vs the teacher's argmax of its
    cached logits, on camera-visible points, teacher = truth) and, with labels, miou (argmax over
    the prompt classes that map to an evaluation class, mapped, against the labels; devkit
    mIoU). Undefined scores (nothing to compare) are None."""
    C = text.shape[0]
    agree = ConfusionMatrix(C, ignore_index=None)
    gt = None
    if prompt_to_eval is not None:
        to_eval = torch.as_tensor(np.asarray(prompt_to_eval), dtype=torch.int64)
        gt = ConfusionMatrix(int(to_eval.max()) + 1, 0)
    points = visible = 0
    for batch in loader:
        logits = text_logits(forward_points(model, batch, voxel_size, device).float(), text)
        student = logits.argmax(dim=1).cpu()
        pp = batch["pair_point"]
        if len(pp) and "pair_logits" in batch:
            agree.update(batch["pair_logits"].float().argmax(dim=1).numpy(), student[pp].numpy())
            visible += len(pp)
        if gt is not None:
            gt.update(batch["label"].numpy(), eval_labels(logits, to_eval).numpy())
        points += len(student)
    m = agree.matrix
    scores = dict(teacher_miou=_num(agree.miou()),
                  teacher_accuracy=float(np.trace(m) / m.sum()) if m.sum() else None, points=points,
                  visible_points=visible)
    if gt is not None:
        scores["miou"] = _num(gt.miou())
    return scores


class Validator:
    """Validation of a run on `split` of `cache` every `every` epochs (and after the last one).

    kind "distill": `distill_scores` (needs `text`, (C, D) float32); "segmenter": the
    ground-truth mIoU of the classifier's argmax (`evaluate.score_split`, as
    `evaluate_segmenter`). `metric` is the score `best.pt` is kept by. ConfigError (before any
    work) when the split has no scans."""

    def __init__(self, cache: Cache, split: str, every: int, kind: str, voxel_size: float, device: torch.device,
                 text: torch.Tensor | None = None, views: str = "border"):
        indices = cache.indices(split)
        if len(indices) == 0:
            counts = ", ".join(f"{k}={int((cache.split == k).sum())}" for k in sorted(set(cache.split.tolist())))
            raise ConfigError(f"--val-split {split!r}: cache {cache.path} has no scans in it (it has {counts})")
        self.split, self.every, self.kind = split, every, kind
        self.voxel_size, self.device, self.text = voxel_size, device, text
        self.scans = len(indices)
        self.cache, self.indices = cache, indices
        self.loader = DataLoader(ScanDataset(cache, indices, augment=False, views=views), batch_size=1,
                                 shuffle=False, collate_fn=collate)
        if kind == "distill":
            mapped = cache.has_labels and bool((np.asarray(cache.prompt_to_eval) > 0).any())
            self.prompt_to_eval = np.asarray(cache.prompt_to_eval) if mapped else None
            self.metric = "miou" if mapped else "teacher_miou"
        elif kind == "segmenter":
            if not cache.has_labels:
                raise CacheError(f"cache {cache.path} has no ground-truth labels to validate against")
            self.num_classes = len(cache.eval_class_names)
            self.metric = "miou"
        else:
            raise ValueError(f"validator kind {kind!r}")

    def due(self, epochs_done: int, last: bool) -> bool:
        """Validate after epoch `epochs_done` (1-based)?"""
        return bool(self.every) and (last or epochs_done % self.every == 0)

    def __call__(self, model: torch.nn.Module) -> dict:
        """Scores of `model` (put in eval mode for the pass, then back in its previous mode)."""
        was = model.training
        model.eval()
        try:
            if self.kind == "distill":
                scores = distill_scores(model, self.loader, self.text, self.prompt_to_eval, self.voxel_size, self.device)
            else:
                cm, _, points = score_split(model, self.voxel_size, None, torch.arange(1, self.num_classes + 1),
                                            self.cache, self.indices, self.device, progress=False)
                scores = dict(miou=_num(cm.miou()), points=points)
        finally:
            model.train(was)
        return dict(scores, split=self.split, scans=self.scans, metric=self.metric, score=scores.get(self.metric))


def val_scalars(scores: dict) -> dict[str, float | None]:
    """The val/... TensorBoard tags of a Validator result."""
    return {f"val/{k}": scores.get(k) for k in ("miou", "teacher_miou", "teacher_accuracy") if k in scores}


class BestKeeper:
    """The best validation score of a run and its `best.pt` (higher is better; None never wins).

    `state` from a resumed checkpoint (`BestKeeper.state()` saved in it) is taken over when it
    kept the same best.pt (the run continues in place) by the same metric on the same split,
    and that best.pt is still the one of the state's epoch (a resume from an earlier
    checkpoint_epochK.pt finds a later one); otherwise the best restarts (a line in the log)."""

    def __init__(self, out: str | os.PathLike, metric: str, split: str, state: dict | None = None):
        self.path = Path(out) / BEST_FILE
        self.metric, self.split = metric, split
        self.score: float | None = None
        self.epoch: int | None = None
        if state and state.get("score") is not None:
            same = Path(state.get("path") or "").resolve() == self.path.resolve()  # resumed in place
            if same and state.get("metric") == metric and state.get("split") == split:
                if _epoch_of(self.path) == int(state["epoch"]):
                    self.score, self.epoch = float(state["score"]), int(state["epoch"])
                else:  # gone, or written later in the run than the checkpoint resumed from
                    log.info("%s is not the best of the resumed checkpoint (epoch %s): the best restarts",
                             self.path, state["epoch"])
            else:
                log.info("the resumed run kept %s by %s on %r; this run keeps %s by %s on %r: the best restarts",
                         state.get("path"), state.get("metric"), state.get("split"), self.path, metric, split)

    def update(self, score: float | None, epoch: int) -> bool:
        """True when `score` (of epoch `epoch`) is the new best."""
        if score is None or math.isnan(score) or (self.score is not None and score <= self.score):
            return False
        self.score, self.epoch = float(score), epoch
        return True

    def state(self) -> dict:
        return dict(metric=self.metric, split=self.split, score=self.score, epoch=self.epoch, path=str(self.path))



def _epoch_of(checkpoint: Path) -> int | None:
    """The `epoch` a checkpoint file records (None when missing or unreadable)."""
    try:
        return int(torch.load(checkpoint, map_location="cpu", weights_only=True)["epoch"])
    except Exception:  # missing, torn or foreign: not the best the state speaks of
        return None


def copy_checkpoint(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """dst := a copy of the checkpoint file src (atomically: temp file, then rename); best.pt."""
    tmp = Path(dst).with_suffix(".pt.tmp")
    shutil.copyfile(src, tmp)
    tmp.replace(dst)


def append_val(path: Path, row: dict) -> None:
    """One validation as a strict-JSON line of `path` (val.jsonl)."""
    with path.open("a") as f:
        f.write(json.dumps(row, allow_nan=False) + "\n")


# ------------------------------------------------------------------------------ the loop's hooks
class RunWatch:
    """Everything above for one training loop, behind four calls (on the process that writes
    the run folder):

        watch = RunWatch(out, config_dict, wandb=..., validator=..., total_steps=N, start_step=s)
        eta = watch.step(step, row)               # after every optimiser step (row = metrics.jsonl's)
        improved = watch.epoch_end(model, step, epochs_done, last, epoch_loss)
        ...save the checkpoint (with `best_state()` in it); if improved, write best_path...
        watch.close()                             # in `finally`

    `validator` None = no validation. `best_state` is a resumed checkpoint's `best_state()`."""

    def __init__(self, out: str | os.PathLike, config: dict, *, wandb: bool, validator: Validator | None,
                 total_steps: int, start_step: int = 0, best_state: dict | None = None):
        self.out = Path(out)
        self.validator = validator
        self.logger = RunLogger(out, config, wandb=wandb, resumed_at=start_step)
        self.keeper = BestKeeper(out, validator.metric, validator.split, best_state) if validator else None
        self.eta = Eta(total_steps, done=start_step)
        self.last_val: dict | None = None  # the latest validation's scores

    @property
    def best_path(self) -> Path:
        return self.out / BEST_FILE

    def step(self, step: int, row: dict) -> str:
        """Log one step's row; returns the run's ETA for the progress bar."""
        self.logger.train_step(step, row)
        self.eta.update(step)
        return self.eta.text()

    def epoch_end(self, model: torch.nn.Module, step: int, epochs_done: int, last: bool, epoch_loss: float,
                  validate: bool = True) -> bool:
        """Log the epoch's mean loss, validate when due (`validate=False` defers it, e.g. until
        after precise BatchNorm: call `validate_now`); True when this epoch is the new best."""
        self.logger.scalars(step, {"train/epoch_loss": epoch_loss})
        improved = False
        if validate and self.validator is not None and self.validator.due(epochs_done, last):
            improved = self.validate_now(model, step, epochs_done)
        self.logger.flush()
        log.info("epoch %d: mean loss %.4f; %s elapsed, run ETA %s", epochs_done, epoch_loss,
                 duration(self.eta.elapsed()), self.eta.text())
        return improved

    def validate_now(self, model: torch.nn.Module, step: int, epochs_done: int) -> bool:
        """Validate `model` now (after epoch `epochs_done`, at `step`); True when it is the new best."""
        val = self.validator(model)
        improved = self.keeper.update(val["score"], epochs_done)
        self.logger.scalars(step, val_scalars(val))
        append_val(self.out / VAL_FILE, dict(step=step, epoch=epochs_done, **val, best=improved))
        log.info("validation after epoch %d on %r: %s %s (best %s at epoch %s)", epochs_done, val["split"],
                 val["metric"], val["score"], self.keeper.score, self.keeper.epoch)
        self.last_val = val
        return improved

    def best_state(self) -> dict | None:
        return self.keeper.state() if self.keeper else None

    def close(self) -> None:
        self.logger.flush()
        self.logger.close()

    def __enter__(self) -> "RunWatch":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------------------------ ETA
def duration(seconds: float | None) -> str:
    """H:MM:SS (or "?" when unknown)."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = int(round(max(seconds, 0.0)))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Eta:
    """Remaining time of a whole run of `total` steps: the mean wall time per step done so far in
    this process (validation and checkpoint time included) x the steps left. `done` is the step
    the process starts at (a resumed run)."""

    def __init__(self, total: int, done: int = 0, clock: Callable[[], float] = time.perf_counter):
        self.total, self.start_step, self.done = total, done, done
        self.clock = clock
        self.t0 = clock()

    def update(self, done: int) -> None:
        self.done = done

    def elapsed(self) -> float:
        return self.clock() - self.t0

    def remaining(self) -> float | None:
        """Seconds left (None before the first step of this process)."""
        steps = self.done - self.start_step
        if steps <= 0:
            return None
        return self.elapsed() / steps * max(self.total - self.done, 0)

    def text(self) -> str:
        return duration(self.remaining())
