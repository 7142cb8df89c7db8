"""Optimization driver: gradient descent on torch parameters with logs, plots and checkpoints.

:func:`optimize` runs one *stage* of an optimization (a pipeline calls it once per stage with a
different ``stage`` name and the same ``out_dir``). It implements contracts 9 and 10 of docs/architecture.md:

* everything goes to one folder: ``log.csv`` or ``log.jsonl`` (all stages, column ``stage``),
  ``loss.png`` (total loss and every term, stages one after another) and ``checkpoints/{stage}.pt``;
* progress (iteration, loss, it/s, ETA) is shown with a rich progress bar on a terminal, and as
  a plain line every few iterations elsewhere (CI logs, batch jobs);
* a NaN/Inf in the loss, a loss term, a gradient or a parameter value stops the run *before* the
  optimizer steps, names the stage, the iteration and the quantity, writes the loss plot and
  leaves the last good checkpoint untouched (:class:`NonFiniteError`).

Checkpoints are written atomically (temporary file + ``os.replace``), so a crash never leaves a
corrupt one. ``resume=True`` continues from the stage's checkpoint; a resumed run reproduces an
uninterrupted run bit for bit on CPU (parameters, optimizer state, learning-rate schedule and
torch's RNG state are all restored). A checkpoint marked ``done`` makes :func:`optimize` copy its
parameters into the given tensors and return at once, so a multi-stage pipeline resumes past its
finished stages.

Log file layout (one file for every stage of a run folder):

* JSONL: one JSON object per iteration, keys as in :attr:`OptimizeResult.history`.
* CSV: one header for the whole file, the fixed columns ``stage, iteration, loss, lr,
  grad_norm, time_s`` followed by every loss term seen so far, in first-seen order; a row leaves
  the terms it lacks empty. When a row brings a term the header does not have yet (typically
  the first row of a new stage), the file is rewritten once with the widened header (atomically).

A fresh (non-resumed) run of a stage removes that stage's old rows from the log; a resumed run
removes the rows past the checkpoint it resumes from (they were written after the checkpoint and
are about to be recomputed). Rows of other stages are kept.

The driver keeps no module-level state. Its randomness is isolated: it runs inside
``torch.random.fork_rng`` seeded with ``settings.seed``, so the caller's global RNG is the same
before and after the call, and ``loss_fn`` sees the same random numbers for the same seed.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

import torch

from diffworld.engine.files import atomic_write

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "NonFiniteError",
    "OptimizeResult",
    "OptimizerSettings",
    "loss_figure",
    "lr_factor",
    "optimize",
    "status",
    "write_loss_plot",
]

OPTIMIZERS = ("adam", "adamw", "sgd", "lbfgs")
SCHEDULES = ("constant", "cosine", "exponential", "step")
LOG_FORMATS = ("csv", "jsonl")
LINE_SEARCHES = ("strong_wolfe", "none")
FIXED_COLUMNS = ("stage", "iteration", "loss", "lr", "grad_norm", "time_s")
CHECKPOINT_FORMAT = 1
_STAGE_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
_GROUP_KEYS = ("params", "lr", "weight_decay")


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


@dataclass
class OptimizerSettings:
    """Settings of one optimization stage. Validated on construction and again by :func:`optimize`.

    Attributes:
        name: Optimizer: ``"adam"``, ``"adamw"``, ``"sgd"`` or ``"lbfgs"``.
        lr: Base learning rate (> 0), in parameter units per gradient unit. A parameter group
            may override it with its own ``"lr"``; schedules scale every group's base rate.
        iterations: Number of optimizer steps of the stage (>= 0). For LBFGS one iteration is
            one ``optimizer.step(closure)``, which may evaluate ``loss_fn`` several times.
        momentum: SGD momentum, in [0, 1).
        betas: Adam/AdamW coefficients ``(beta1, beta2)``, each in [0, 1).
        weight_decay: L2 penalty (decoupled for AdamW), >= 0. Not supported by LBFGS.
        schedule: Learning-rate schedule; the rate used at iteration ``i`` (0-based) of a stage of
            ``N = iterations`` steps is ``lr * f(i)`` with

            * ``"constant"``: ``f(i) = 1``;
            * ``"cosine"``: ``f(i) = 0.5 * (1 + cos(pi * i / N))`` (annealed towards 0 at ``i = N``);
            * ``"exponential"``: ``f(i) = schedule_gamma ** (i / N)`` (reaches ``schedule_gamma``
              at ``i = N``, the end of the run);
            * ``"step"``: ``f(i) = schedule_gamma ** (i // schedule_step)``.
        schedule_gamma: Exponential: final factor over the run; step: factor per step. > 0.
        schedule_step: Iterations per step of the ``"step"`` schedule (>= 1).
        clip_grad_norm: If set (> 0), gradients are rescaled so that their global 2-norm is at
            most this value. Applied after ``clip_grad_value``.
        clip_grad_value: If set (> 0), every gradient component is clamped to
            ``[-clip_grad_value, clip_grad_value]``.
        checkpoint_every: Write the stage's checkpoint every this many iterations (>= 0; 0 means
            only at the end). The end of the stage is always checkpointed.
        log_format: ``"csv"`` (``log.csv``) or ``"jsonl"`` (``log.jsonl``).
        seed: Seed of torch's RNG for the stage (the caller's RNG state is not touched).
        lbfgs_max_iter: LBFGS inner iterations per step (>= 1).
        lbfgs_line_search: LBFGS line search: ``"strong_wolfe"`` or ``"none"``.
        print_every: Without a terminal (and ``progress=True``), print a plain progress line
            every this many iterations; 0 picks about ten lines per stage.
    """

    name: str = "adam"
    lr: float = 1e-2
    iterations: int = 200
    momentum: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    schedule: str = "constant"
    schedule_gamma: float = 0.1
    schedule_step: int = 100
    clip_grad_norm: float | None = None
    clip_grad_value: float | None = None
    checkpoint_every: int = 50
    log_format: str = "csv"
    seed: int = 0
    lbfgs_max_iter: int = 20
    lbfgs_line_search: str = "strong_wolfe"
    print_every: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.betas, list):
            self.betas = tuple(self.betas)
        self.validate()

    def validate(self) -> None:
        """Check every field.

        Raises:
            TypeError: A field has the wrong type (names the field, expected and given).
            ValueError: A field has an invalid value (names the field, expected and given).
        """
        for name, check in FIELD_CHECKS.items():
            check(getattr(self, name))
        if self.name == "lbfgs" and self.weight_decay != 0:
            raise ValueError(
                f"OptimizerSettings.weight_decay: expected 0 with name='lbfgs' (LBFGS has no weight "
                f"decay; add a penalty term to the loss), got {self.weight_decay!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain-data copy of the settings (stored in checkpoints)."""
        return dataclasses.asdict(self)


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if not isinstance(value, str):
        raise TypeError(f"OptimizerSettings.{name}: expected a str, one of {list(choices)}, got {value!r}")
    if value not in choices:
        raise ValueError(f"OptimizerSettings.{name}: expected one of {list(choices)}, got {value!r}")


def _check_real(name: str, value: Any, *, low: float | None = None, high: float | None = None,
                low_open: bool = False, none_ok: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        kind = "a number or None" if none_ok else "a number"
        raise TypeError(f"OptimizerSettings.{name}: expected {kind}, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise ValueError(f"OptimizerSettings.{name}: expected a finite number, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        op = ">" if low_open else ">="
        raise ValueError(f"OptimizerSettings.{name}: expected a number {op} {low}, got {value!r}")
    if high is not None and value >= high:
        raise ValueError(f"OptimizerSettings.{name}: expected a number < {high}, got {value!r}")


def _check_int(name: str, value: Any, *, low: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"OptimizerSettings.{name}: expected an int, got {value!r} ({type(value).__name__})")
    if low is not None and value < low:
        raise ValueError(f"OptimizerSettings.{name}: expected an int >= {low}, got {value!r}")


def _check_betas(betas: Any) -> None:
    if not isinstance(betas, tuple) or len(betas) != 2:
        raise TypeError(f"OptimizerSettings.betas: expected a tuple of 2 floats, got {betas!r}")
    for k, b in enumerate(betas):
        _check_real(f"betas[{k}]", b, low=0.0, high=1.0)


# The one definition of what each setting accepts: OptimizerSettings.validate and the scene
# format's optimizer section (diffworld.engine.config.schema) both run these.
FIELD_CHECKS: dict[str, Callable[[Any], None]] = {
    "name": lambda v: _check_choice("name", v, OPTIMIZERS),
    "lr": lambda v: _check_real("lr", v, low=0.0, low_open=True),
    "iterations": lambda v: _check_int("iterations", v, low=0),
    "momentum": lambda v: _check_real("momentum", v, low=0.0, high=1.0),
    "betas": _check_betas,
    "weight_decay": lambda v: _check_real("weight_decay", v, low=0.0),
    "schedule": lambda v: _check_choice("schedule", v, SCHEDULES),
    "schedule_gamma": lambda v: _check_real("schedule_gamma", v, low=0.0, low_open=True),
    "schedule_step": lambda v: _check_int("schedule_step", v, low=1),
    "clip_grad_norm": lambda v: v is None or _check_real("clip_grad_norm", v, low=0.0, low_open=True, none_ok=True),
    "clip_grad_value": lambda v: v is None or _check_real("clip_grad_value", v, low=0.0, low_open=True, none_ok=True),
    "checkpoint_every": lambda v: _check_int("checkpoint_every", v, low=0),
    "log_format": lambda v: _check_choice("log_format", v, LOG_FORMATS),
    "seed": lambda v: _check_int("seed", v),
    "lbfgs_max_iter": lambda v: _check_int("lbfgs_max_iter", v, low=1),
    "lbfgs_line_search": lambda v: _check_choice("lbfgs_line_search", v, LINE_SEARCHES),
    "print_every": lambda v: _check_int("print_every", v, low=0),
}
CHOICES = {"name": OPTIMIZERS, "schedule": SCHEDULES, "log_format": LOG_FORMATS, "lbfgs_line_search": LINE_SEARCHES}


def lr_factor(settings: OptimizerSettings, iteration: int) -> float:
    """Learning-rate factor of the schedule at a 0-based iteration (see :class:`OptimizerSettings`).

    Args:
        settings: The stage's settings.
        iteration: 0-based iteration index.

    Returns:
        The factor ``f(iteration)`` that multiplies every group's base learning rate.
    """
    n = max(settings.iterations, 1)
    if settings.schedule == "constant":
        return 1.0
    if settings.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * iteration / n))
    if settings.schedule == "exponential":
        return float(settings.schedule_gamma) ** (iteration / n)
    if settings.schedule == "step":
        return float(settings.schedule_gamma) ** (iteration // settings.schedule_step)
    raise ValueError(f"OptimizerSettings.schedule: expected one of {list(SCHEDULES)}, got {settings.schedule!r}")


# --------------------------------------------------------------------------------------------
# Results and errors
# --------------------------------------------------------------------------------------------


class NonFiniteError(RuntimeError):
    """A loss, loss term, gradient or parameter value became NaN/Inf; the run was stopped.

    For a loss, term or gradient the optimizer did not step (LBFGS's inner moves are undone);
    a non-finite parameter value is found after the step and projection. In every case the loss
    plot was written and the last good checkpoint (if any) was left as it was.

    Attributes:
        stage: Stage name.
        iteration: 0-based iteration at which the value was found.
        quantity: What was non-finite, e.g. ``"loss term 'chamfer'"``, ``"total loss"``,
            ``"gradient of parameter 'sdf'"`` or ``"value of parameter 'sdf'"``.
        checkpoint: Path of the last good checkpoint of this stage, or None if there is none.
        checkpoint_iteration: Number of iterations that checkpoint holds, or None.
    """

    def __init__(self, stage: str, iteration: int, quantity: str, checkpoint: Path | None = None,
                 checkpoint_iteration: int | None = None) -> None:
        self.stage = stage
        self.iteration = iteration
        self.quantity = quantity
        self.checkpoint = checkpoint
        self.checkpoint_iteration = checkpoint_iteration
        if checkpoint is not None:
            where = (f"last good checkpoint: {checkpoint} (after {checkpoint_iteration} iterations; "
                     f"resume=True continues from it)")
        else:
            where = "no checkpoint of this stage has been written by this run"
        if quantity.startswith("value of parameter"):
            what = "the parameters in memory hold it (produced by the step or the projection)"
        else:
            what = "the optimizer did not step"
        super().__init__(f"non-finite {quantity} at stage '{stage}', iteration {iteration}; {what}; {where}")

    def __reduce__(self):  # keep the exception picklable (multiprocessing, pytest-xdist)
        return (type(self), (self.stage, self.iteration, self.quantity, self.checkpoint,
                             self.checkpoint_iteration))


@dataclass(frozen=True)
class OptimizeResult:
    """Result of one :func:`optimize` stage.

    Attributes:
        history: One row per completed iteration of this stage (resumed rows included), keys
            ``stage, iteration, loss, <terms...>, lr, grad_norm, time_s``: ``loss`` is the loss at
            the start of the iteration (for LBFGS the last closure value), ``lr`` the first
            parameter group's learning rate, ``grad_norm`` the global gradient 2-norm before
            clipping, ``time_s`` the stage's wall time [s] so far (summed over resumed runs).
        final_loss: ``loss`` of the last history row (NaN when there is none).
        best_loss: Smallest ``loss`` in the history (NaN when there is none).
        iterations_done: Number of completed iterations of the stage.
        resumed_from: Iterations held by the checkpoint this run resumed from, or None.
        out_dir: Run folder, or None when nothing was written.
        checkpoint: The stage's final checkpoint, or None without ``out_dir``.
    """

    history: list[dict[str, Any]]
    final_loss: float
    best_loss: float
    iterations_done: int
    resumed_from: int | None
    out_dir: Path | None
    checkpoint: Path | None = field(default=None)


# --------------------------------------------------------------------------------------------
# Parameters and optimizer
# --------------------------------------------------------------------------------------------

ParamsArg = Mapping[str, torch.Tensor] | Sequence[Mapping[str, Any]]


def _normalize_params(params: Any) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    """Return (torch param groups, name -> tensor) for a dict of tensors or a list of groups."""
    if isinstance(params, Mapping):
        raw_groups = [{"params": params}]
    elif isinstance(params, (list, tuple)):
        raw_groups = list(params)
        if not raw_groups:
            raise ValueError("params: expected a non-empty dict of tensors or list of groups, got []")
    else:
        raise TypeError(f"params: expected a dict name -> tensor or a list of group dicts, got {type(params).__name__}")

    named: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}
    groups: list[dict[str, Any]] = []
    for gi, group in enumerate(raw_groups):
        where = "params" if isinstance(params, Mapping) else f"params[{gi}]"
        if not isinstance(params, Mapping):
            if not isinstance(group, Mapping):
                raise TypeError(f"{where}: expected a dict with key 'params', got {type(group).__name__}")
            unknown = sorted(set(group) - set(_GROUP_KEYS))
            if unknown or "params" not in group:
                raise ValueError(f"{where}: expected keys 'params' (required), 'lr', 'weight_decay'; "
                                 f"got {sorted(group)}")
            tensors = group["params"]
        else:
            tensors = group["params"]
        if not isinstance(tensors, Mapping):
            raise TypeError(f"{where}['params'] : expected a dict name -> tensor, got {type(tensors).__name__}")
        if not tensors:
            raise ValueError(f"{where}: expected at least one parameter, got an empty dict")
        for name, t in tensors.items():
            if not isinstance(name, str) or not name:
                raise TypeError(f"{where}: expected non-empty str parameter names, got {name!r}")
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"parameter '{name}': expected a torch.Tensor, got {type(t).__name__}")
            if not t.is_floating_point():
                raise TypeError(f"parameter '{name}': expected a floating-point tensor, got dtype {t.dtype}")
            if not t.is_leaf or not t.requires_grad:
                raise ValueError(f"parameter '{name}': expected a leaf tensor with requires_grad=True, "
                                 f"got is_leaf={t.is_leaf}, requires_grad={t.requires_grad}")
            if name in named:
                raise ValueError(f"parameter '{name}': expected unique names across groups, got it twice")
            if id(t) in seen:
                raise ValueError(f"parameter '{name}': expected distinct tensors, got the same tensor as "
                                 f"'{seen[id(t)]}'")
            seen[id(t)] = name
            named[name] = t
        tg: dict[str, Any] = {"params": list(tensors.values())}
        for key in ("lr", "weight_decay"):
            if key in group:
                value = group[key]
                ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                if not ok or value < 0 or (key == "lr" and value == 0):
                    op = "> 0" if key == "lr" else ">= 0"
                    raise ValueError(f"{where}['{key}']: expected a finite number {op}, got {value!r}")
                tg[key] = float(value)
        groups.append(tg)
    return groups, named


def _build_optimizer(groups: list[dict[str, Any]], s: OptimizerSettings) -> torch.optim.Optimizer:
    if s.name == "adam":
        return torch.optim.Adam(groups, lr=s.lr, betas=s.betas, weight_decay=s.weight_decay)
    if s.name == "adamw":
        return torch.optim.AdamW(groups, lr=s.lr, betas=s.betas, weight_decay=s.weight_decay)
    if s.name == "sgd":
        return torch.optim.SGD(groups, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
    if len(groups) != 1 or set(groups[0]) != {"params"}:
        raise ValueError("params: expected a single group without per-group options with name='lbfgs' "
                         f"(torch LBFGS supports one group), got {len(groups)} group(s)")
    ls = None if s.lbfgs_line_search == "none" else s.lbfgs_line_search
    return torch.optim.LBFGS(groups, lr=s.lr, max_iter=s.lbfgs_max_iter, line_search_fn=ls)


def _cuda_devices(named: Mapping[str, torch.Tensor]) -> list[int]:
    return sorted({t.device.index or 0 for t in named.values() if t.device.type == "cuda"})


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def _save_checkpoint(path: Path, *, stage: str, iteration: int, done: bool, named: Mapping[str, torch.Tensor],
                     optimizer: torch.optim.Optimizer, base_lrs: list[float], settings: OptimizerSettings,
                     history: list[dict[str, Any]], cuda_devices: list[int],
                     state: dict[str, Any] | None = None) -> None:
    state_dict = {
        "format": CHECKPOINT_FORMAT,
        "stage": stage,
        "iteration": iteration,
        "done": done,
        "params": {k: t.detach() for k, t in named.items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": {"schedule": settings.schedule, "base_lrs": list(base_lrs),
                      "factor": lr_factor(settings, iteration)},
        "settings": settings.to_dict(),
        "history": history,
        "rng_state": torch.get_rng_state(),
        "cuda_rng_state": {d: torch.cuda.get_rng_state(d) for d in cuda_devices},
    }
    if state is not None:
        state_dict["state"] = state
    atomic_write(path, lambda f: torch.save(state_dict, f))


def _load_checkpoint(path: Path, named: Mapping[str, torch.Tensor], settings: OptimizerSettings,
                     stage: str) -> dict[str, Any]:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with the path
        raise ValueError(f"checkpoint {path}: could not be read ({exc})") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        got = f"format {ckpt.get('format')!r}" if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"checkpoint {path}: expected a diffworld driver checkpoint (format "
                         f"{CHECKPOINT_FORMAT}), got {got}")
    saved = ckpt["params"]
    if set(saved) != set(named):
        raise ValueError(f"checkpoint {path}: expected parameters {sorted(named)}, got {sorted(saved)}")
    for k, t in named.items():
        if tuple(saved[k].shape) != tuple(t.shape):
            raise ValueError(f"checkpoint {path}: parameter '{k}' expected shape {tuple(t.shape)}, "
                             f"got {tuple(saved[k].shape)}")
    saved_name = ckpt["settings"].get("name")
    if not ckpt["done"] and saved_name != settings.name:
        raise ValueError(f"checkpoint {path}: settings.name expected {saved_name!r} (the optimizer "
                         f"the checkpoint was written with), got {settings.name!r}")
    if ckpt.get("stage") != stage:
        raise ValueError(f"checkpoint {path}: expected stage {stage!r}, got {ckpt.get('stage')!r}")
    return ckpt


def _copy_params(named: Mapping[str, torch.Tensor], values: Mapping[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for k, t in named.items():
            t.copy_(values[k])


# --------------------------------------------------------------------------------------------
# Log file and plot
# --------------------------------------------------------------------------------------------


class _RunLog:
    """The run folder's log file (all stages), kept in memory too for the loss plot."""

    def __init__(self, out_dir: Path, fmt: str) -> None:
        self.fmt = fmt
        self.path = out_dir / f"log.{fmt}"
        self.rows: list[dict[str, Any]] = []
        self.columns: list[str] = list(FIXED_COLUMNS)
        self._fh: io.TextIOBase | None = None
        self._writer: Any = None
        self._stale_header = False  # the CSV on disk lacks columns we write: rewrite at next append
        if self.path.exists():
            self._read()

    def _read(self) -> None:
        with open(self.path, newline="", encoding="utf-8") as f:
            if self.fmt == "jsonl":
                for line in f:
                    line = line.strip()
                    if not line:
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut by a crash; dropped at the next rewrite
                    if isinstance(row, dict):
                        self.rows.append(row)
                        self._add_columns(row)
            else:
                reader = csv.DictReader(f)
                on_disk = list(reader.fieldnames or [])
                self.columns = on_disk + [c for c in FIXED_COLUMNS if c not in on_disk]
                self._stale_header = self.columns != on_disk
                for row in reader:
                    self.rows.append({k: _parse_cell(k, v) for k, v in row.items() if k is not None and v not in ("", None)})

    def _add_columns(self, row: Mapping[str, Any]) -> bool:
        new = [k for k in row if k not in self.columns]
        self.columns.extend(new)
        return bool(new)

    def drop_stage_rows(self, stage: str, from_iteration: int) -> None:
        """Remove rows of ``stage`` whose iteration is >= ``from_iteration`` (rewrites if any)."""
        keep = [r for r in self.rows if not (r.get("stage") == stage and int(r.get("iteration", 0)) >= from_iteration)]
        if len(keep) != len(self.rows):
            self.rows = keep
            self._rewrite()

    def _rewrite(self) -> None:
        self.close()

        def write(fb):
            text = io.TextIOWrapper(fb, encoding="utf-8", newline="")
            if self.fmt == "jsonl":
                for r in self.rows:
                    text.write(json.dumps(r) + "\n")
            else:
                w = csv.DictWriter(text, fieldnames=self.columns, restval="")
                w.writeheader()
                w.writerows(self.rows)
            text.flush()
            text.detach()

        atomic_write(self.path, write)

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        widened = self._add_columns(row)
        if self.fmt == "csv" and (widened or self._stale_header) and self.path.exists() \
                and self.path.stat().st_size > 0:
            self._rewrite()  # new term column: widen the header once
            self._stale_header = False
            return
        if self._fh is None:
            fresh = not self.path.exists() or self.path.stat().st_size == 0
            self._fh = open(self.path, "a", newline="", encoding="utf-8")
            if self.fmt == "csv":
                self._writer = csv.DictWriter(self._fh, fieldnames=self.columns, restval="")
                if fresh:
                    self._writer.writeheader()
        if self.fmt == "jsonl":
            self._fh.write(json.dumps(row) + "\n")
        else:
            self._writer.writerow(row)
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
        self._fh = None
        self._writer = None


def _parse_cell(key: str, value: str) -> Any:
    if key == "stage":
        return value
    try:
        return int(value) if key == "iteration" else float(value)
    except ValueError:
        return value


def loss_figure(rows: Sequence[Mapping[str, Any]]) -> Figure:
    """The loss curves of a run as a matplotlib ``Figure`` (what :func:`write_loss_plot` saves).

    One axes: the total loss (black) and every loss term (one colour per term, the same in every
    stage), the stages one after another on a shared iteration axis, separated by dotted lines and
    named along the top. The legend sits below the axes, never over the curves, and the figure
    grows by its rows (constrained layout), so many terms never squeeze the axes. The y axis is
    logarithmic when every total-loss value is positive; a term's values <= 0 are then left out
    (a log axis cannot show them).

    Args:
        rows: Log rows (see :attr:`OptimizeResult.history`), any number of stages, in the order
            stages first appear; non-numeric or missing values are skipped.

    Returns:
        A ``matplotlib.figure.Figure`` (Agg canvas, no pyplot state); each curve's ``gid`` is its
        column name (``"loss"`` or the term).
    """
    from matplotlib.figure import Figure  # noqa: F811 - Agg canvas, no pyplot global state

    stages = list(dict.fromkeys(r.get("stage") for r in rows))
    terms = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in FIXED_COLUMNS]
    series = ["loss", *terms]
    colors = dict(zip(series, ["black", *_term_colors(len(terms))]))
    totals = [r["loss"] for r in rows if _is_number(r.get("loss"))]
    log_y = bool(totals) and all(v > 0 for v in totals)

    legend_rows = math.ceil(len(series) / 5)  # at most 5 entries a row (fit 9 in), rows balanced
    ncol = math.ceil(len(series) / legend_rows)
    fig = Figure(figsize=(9.0, 4.5 + 0.25 * legend_rows), dpi=100, layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    drawn: dict[str, Any] = {}
    offset, spans = 0, []
    for stage in stages:
        srows = sorted((r for r in rows if r.get("stage") == stage), key=lambda r: int(r["iteration"]))
        its = [offset + int(r["iteration"]) for r in srows]
        for key in series:
            pts = [(x, float(r[key])) for x, r in zip(its, srows)
                   if _is_number(r.get(key)) and (not log_y or r[key] > 0)]
            if pts:
                line, = ax.plot([x for x, _ in pts], [y for _, y in pts], color=colors[key], gid=key,
                                lw=1.8 if key == "loss" else 1.1, zorder=3 if key == "loss" else 2)
                drawn.setdefault(key, line)
        if its:
            if spans:
                ax.axvline(offset - 0.5, color="0.55", lw=0.8, ls=":")
            spans.append((stage, (offset + its[-1]) / 2))
            offset = its[-1] + 1
    if log_y:
        ax.set_yscale("log")
    if not drawn:
        ax.text(0.5, 0.5, "no iterations logged", ha="center", va="center", transform=ax.transAxes)
    if len(spans) > 1:  # name the stages along the top, where no curve or legend is
        top = ax.secondary_xaxis("top")
        top.set_xticks([x for _, x in spans], labels=[str(name) for name, _ in spans], fontsize=8)
        top.tick_params(length=0)
    ax.set_xlabel("iteration (stages one after another)")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    if drawn:
        keys = [k for k in series if k in drawn]
        fig.legend([drawn[k] for k in keys], keys, loc="outside lower center", ncol=min(len(keys), ncol),
                   fontsize=8, frameon=False)
    return fig


def _term_colors(n: int) -> list[tuple[float, float, float, float]]:
    """``n`` distinct colours: tab10, tab20 past 10 terms, evenly spread turbo past 20."""
    from matplotlib import colormaps

    if n <= 10:
        return [colormaps["tab10"](i) for i in range(n)]
    if n <= 20:
        return [colormaps["tab20"](i) for i in range(n)]
    return [colormaps["turbo"](0.05 + 0.9 * i / (n - 1)) for i in range(n)]


def write_loss_plot(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Write :func:`loss_figure` of ``rows`` as a PNG, atomically.

    Args:
        rows: Log rows of one run (see :func:`loss_figure`).
        path: Output PNG path.
    """
    fig = loss_figure(rows)
    atomic_write(path, lambda f: fig.savefig(f, format="png"))


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# --------------------------------------------------------------------------------------------
# Progress display
# --------------------------------------------------------------------------------------------


class _Progress:
    """rich progress bar on a terminal; plain lines on stderr otherwise; nothing when disabled."""

    def __init__(self, enabled: bool, stage: str, start: int, total: int, print_every: int) -> None:
        self.stage, self.start, self.total = stage, start, total
        self.mode = "off"
        self._bar = None
        self._task = None
        self._t0 = time.perf_counter()
        if not enabled:
            return
        from rich.console import Console

        console = Console(stderr=True)
        if console.is_terminal or console.is_jupyter:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)
            from rich.text import Text

            class RateColumn(ProgressColumn):
                def render(self, task):  # noqa: D102
                    speed = task.speed
                    return Text("-- it/s" if speed is None else f"{speed:.2f} it/s")

            self._bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("loss {task.fields[loss]}"), RateColumn(), TimeElapsedColumn(),
                                 TextColumn("ETA"), TimeRemainingColumn(), console=console)
            self._bar.start()
            self._task = self._bar.add_task(stage, total=total, completed=start, loss="--")
            self.mode = "bar"
        else:
            self.mode = "lines"
            self.every = print_every or max(1, math.ceil(max(total - start, 1) / 10))

    def update(self, done: int, loss: float, lr: float) -> None:
        if self.mode == "bar":
            self._bar.update(self._task, completed=done, loss=f"{loss:.4e}")
        elif self.mode == "lines" and ((done - self.start) % self.every == 0 or done == self.total):
            elapsed = time.perf_counter() - self._t0
            rate = (done - self.start) / elapsed if elapsed > 0 else float("inf")
            eta = (self.total - done) / rate if rate > 0 else float("inf")
            eta_s = time.strftime("%H:%M:%S", time.gmtime(eta)) if math.isfinite(eta) else "--:--:--"
            print(f"[{self.stage}] iteration {done}/{self.total}  loss {loss:.4e}  lr {lr:.3e}  "
                  f"{rate:.2f} it/s  ETA {eta_s}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


@contextlib.contextmanager
def status(message: str, enabled: bool = True) -> Iterator[None]:
    """Say what a long step without iterations is doing (metrics, renders) while it runs.

    On a terminal a rich spinner with ``message`` while the block runs, then one line with its
    duration; elsewhere (CI logs, batch jobs) one plain line on stderr before and one after;
    nothing when disabled.

    Args:
        message: What the block does, e.g. ``"computing metrics"``.
        enabled: False shows nothing (``progress=False``).
    """
    if not enabled:
        yield
        return
    from rich.console import Console

    console = Console(stderr=True)
    t0 = time.perf_counter()
    if console.is_terminal or console.is_jupyter:
        with console.status(f"{message}..."):
            yield
        console.print(f"{message}: done in {time.perf_counter() - t0:.1f} s", highlight=False)
    else:
        print(f"{message}...", file=sys.stderr, flush=True)
        yield
        print(f"{message}: done in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------

LossOutput = torch.Tensor | tuple[torch.Tensor, Mapping[str, torch.Tensor | float]]


def _split_loss(out: Any, iteration: int) -> tuple[torch.Tensor, dict[str, float]]:
    if isinstance(out, tuple):
        if len(out) != 2 or not isinstance(out[1], Mapping):
            raise TypeError(f"loss_fn({iteration}): expected a tensor or a (tensor, dict of terms) tuple, "
                            f"got a tuple of {len(out)} items")
        loss, raw_terms = out
    else:
        loss, raw_terms = out, {}
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"loss_fn({iteration}): expected the loss as a torch.Tensor, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise ValueError(f"loss_fn({iteration}): expected a scalar loss, got shape {tuple(loss.shape)}")
    if not loss.requires_grad:
        raise ValueError(f"loss_fn({iteration}): expected a loss connected to the parameters "
                         f"(requires_grad=True), got requires_grad=False")
    terms: dict[str, float] = {}
    for name, v in raw_terms.items():
        if not isinstance(name, str) or name in FIXED_COLUMNS:
            raise ValueError(f"loss_fn({iteration}): loss term name expected a str other than "
                             f"{list(FIXED_COLUMNS)}, got {name!r}")
        if isinstance(v, torch.Tensor):
            if v.numel() != 1:
                raise ValueError(f"loss_fn({iteration}): loss term '{name}' expected a scalar, "
                                 f"got shape {tuple(v.shape)}")
            terms[name] = float(v.detach())
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            terms[name] = float(v)
        else:
            raise TypeError(f"loss_fn({iteration}): loss term '{name}' expected a tensor or float, "
                            f"got {type(v).__name__}")
    return loss.reshape(()), terms


def _first_nonfinite(items: Sequence[tuple[str, torch.Tensor]]) -> str | None:
    """Name of the first tensor holding a NaN/Inf (one host sync per device)."""
    by_device: dict[torch.device, list[int]] = {}
    for idx, (_, t) in enumerate(items):
        by_device.setdefault(t.device, []).append(idx)
    bad: list[int] = []
    with torch.no_grad():
        for idxs in by_device.values():
            ok = torch.stack([torch.isfinite(items[j][1]).all() for j in idxs]).cpu()
            bad.extend(j for j, good in zip(idxs, ok.tolist()) if not good)
    return items[min(bad)][0] if bad else None


def _nonfinite_grad(named: Mapping[str, torch.Tensor]) -> str | None:
    return _first_nonfinite([(k, t.grad) for k, t in named.items() if t.grad is not None])


def _nonfinite_value(named: Mapping[str, torch.Tensor]) -> str | None:
    return _first_nonfinite([(k, t.detach()) for k, t in named.items()])


def _grad_norm_and_clip(named: Mapping[str, torch.Tensor], s: OptimizerSettings) -> float:
    """Global gradient 2-norm before clipping; then clip by value, then by norm (in place)."""
    with_grad = [t for t in named.values() if t.grad is not None]
    if not with_grad:
        return 0.0
    total = torch.nn.utils.get_total_norm([t.grad for t in with_grad])
    total_value = float(total)
    if s.clip_grad_value is not None:
        torch.nn.utils.clip_grad_value_(with_grad, s.clip_grad_value)
        if s.clip_grad_norm is not None:
            total = torch.nn.utils.get_total_norm([t.grad for t in with_grad])
    if s.clip_grad_norm is not None:
        torch.nn.utils.clip_grads_with_norm_(with_grad, s.clip_grad_norm, total)
    return total_value


def optimize(
    params: ParamsArg,
    loss_fn: Callable[[int], LossOutput],
    settings: OptimizerSettings,
    out_dir: str | Path | None = None,
    *,
    stage: str = "main",
    resume: bool = False,
    progress: bool = True,
    callback: Callable[[int, dict[str, Any]], bool | None] | None = None,
    projection: Callable[[], None] | None = None,
    state: Callable[[], dict[str, Any]] | None = None,
    load_state: Callable[[dict[str, Any]], None] | None = None,
) -> OptimizeResult:
    """Run one optimization stage: minimize ``loss_fn`` over ``params`` with a torch optimizer.

    Each iteration ``i`` (0-based): set the scheduled learning rate; evaluate ``loss_fn(i)``;
    check the loss and its terms are finite; backpropagate; check every gradient is finite;
    record the gradient norm and clip; step; call ``projection()`` under ``no_grad``; check
    every parameter value is finite; log the row; checkpoint if due; call ``callback(i, row)``.

    Args:
        params: Either a dict ``name -> tensor`` (leaf tensors with ``requires_grad=True``,
            optimized in place) or a list of parameter groups ``{"params": {name: tensor},
            "lr": float (optional), "weight_decay": float (optional)}``. Names must be unique;
            they appear in error messages and checkpoints.
        loss_fn: ``loss_fn(iteration) -> loss`` or ``-> (loss, terms)`` where ``loss`` is a
            scalar tensor connected to the parameters and ``terms`` maps term names to scalar
            tensors or floats (logged as extra columns). LBFGS may call it several times per
            iteration with the same index.
        settings: Optimizer, schedule, clipping, checkpoint and log settings.
        out_dir: Run folder for the log, ``loss.png`` and ``checkpoints/``; None writes nothing.
        stage: Stage name (letters, digits, ``_ . -``), used for the log column and the
            checkpoint file ``checkpoints/{stage}.pt``.
        resume: Continue from ``checkpoints/{stage}.pt`` if it exists (requires ``out_dir``).
            A checkpoint marked done copies its parameters into ``params`` and returns at once.
        progress: Show progress (rich bar on a terminal, plain lines on stderr otherwise).
        callback: ``callback(iteration, row)`` after each iteration (after the checkpoint);
            return True to stop the stage early (it is then checkpointed as done).
        projection: Called under ``torch.no_grad()`` after every step, e.g. to clamp parameters
            into bounds in place.
        state: Returns the caller's state that the numbers depend on beyond the parameters and
            torch's global RNG (e.g. a private ``torch.Generator``'s ``get_state()``); saved in
            every checkpoint (tensors, numbers, strings, lists and dicts of them).
        load_state: Restores that state from a checkpoint on resume (also when the checkpoint
            is of a finished stage), so a resumed run continues with the numbers of the
            uninterrupted one.

    Returns:
        An :class:`OptimizeResult`.

    Raises:
        TypeError: Wrong argument types, or ``loss_fn`` returned something else than documented.
        ValueError: Invalid settings, parameters, stage name, or an incompatible checkpoint.
        NonFiniteError: A loss, loss term, gradient or parameter value became NaN/Inf.
    """
    if not isinstance(settings, OptimizerSettings):
        raise TypeError(f"settings: expected OptimizerSettings, got {type(settings).__name__}")
    settings.validate()
    if not callable(loss_fn):
        raise TypeError(f"loss_fn: expected a callable loss_fn(iteration), got {type(loss_fn).__name__}")
    for arg_name, fn in (("callback", callback), ("projection", projection), ("state", state),
                         ("load_state", load_state)):
        if fn is not None and not callable(fn):
            raise TypeError(f"{arg_name}: expected a callable or None, got {type(fn).__name__}")
    if not isinstance(stage, str) or not _STAGE_RE.match(stage):
        raise ValueError(f"stage: expected a name of letters, digits, '_', '.', '-' (not starting with "
                         f"'.' or '-'), got {stage!r}")
    groups, named = _normalize_params(params)
    out = Path(out_dir) if out_dir is not None else None
    if resume and out is None:
        raise ValueError("resume: expected out_dir to be set when resume=True, got out_dir=None")
    ckpt_path = out / "checkpoints" / f"{stage}.pt" if out is not None else None

    ckpt = None
    if resume and ckpt_path is not None and ckpt_path.exists():
        ckpt = _load_checkpoint(ckpt_path, named, settings, stage)
        if load_state is not None and "state" in ckpt:
            load_state(ckpt["state"])
        if ckpt["done"]:
            _copy_params(named, ckpt["params"])
            done = int(ckpt["iteration"])
            if settings.iterations > done:
                print(f"diffworld: stage '{stage}' already finished after {done} iterations ({ckpt_path}); kept as "
                      f"it is: a finished stage is not extended to {settings.iterations} (its schedule ended). Run "
                      f"into a new --out for more iterations.", file=sys.stderr)
            return _result(ckpt["history"], done, done, out, ckpt_path)

    optimizer = _build_optimizer(groups, settings)
    base_lrs = [float(g["lr"]) for g in optimizer.param_groups]
    cuda_devices = _cuda_devices(named)
    with torch.random.fork_rng(devices=cuda_devices):
        torch.random.default_generator.manual_seed(settings.seed)
        for d in cuda_devices:
            torch.cuda.default_generators[d].manual_seed(settings.seed)
        return _run(named, optimizer, base_lrs, loss_fn, settings, out, ckpt_path, ckpt, stage, progress,
                    callback, projection, cuda_devices, state)


def _result(history: list[dict[str, Any]], done: int, resumed_from: int | None, out: Path | None,
            ckpt_path: Path | None) -> OptimizeResult:
    losses = [float(r["loss"]) for r in history]
    return OptimizeResult(
        history=history,
        final_loss=losses[-1] if losses else math.nan,
        best_loss=min(losses) if losses else math.nan,
        iterations_done=done,
        resumed_from=resumed_from,
        out_dir=out,
        checkpoint=ckpt_path,
    )


def _run(named: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, base_lrs: list[float],
         loss_fn: Callable[[int], Any], settings: OptimizerSettings, out: Path | None, ckpt_path: Path | None,
         ckpt: dict[str, Any] | None, stage: str, progress: bool,
         callback: Callable[[int, dict[str, Any]], bool | None] | None, projection: Callable[[], None] | None,
         cuda_devices: list[int], state: Callable[[], dict[str, Any]] | None = None) -> OptimizeResult:
    start = 0
    history: list[dict[str, Any]] = []
    resumed_from: int | None = None
    good_ckpt: int | None = None  # iterations held by the last good checkpoint of this run
    if ckpt is not None:
        _copy_params(named, ckpt["params"])
        optimizer.load_state_dict(ckpt["optimizer"])
        base_lrs = [float(x) for x in ckpt["scheduler"]["base_lrs"]]
        torch.set_rng_state(ckpt["rng_state"])
        for d, st in ckpt.get("cuda_rng_state", {}).items():
            if d in cuda_devices:
                torch.cuda.set_rng_state(st, d)
        start = resumed_from = good_ckpt = int(ckpt["iteration"])
        history = list(ckpt["history"])
    time_offset = float(history[-1]["time_s"]) if history else 0.0

    log = None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        log = _RunLog(out, settings.log_format)
        log.drop_stage_rows(stage, start)

    def checkpoint(done_iters: int, done: bool) -> None:
        nonlocal good_ckpt
        if ckpt_path is None:
            return
        _save_checkpoint(ckpt_path, stage=stage, iteration=done_iters, done=done, named=named, optimizer=optimizer,
                         base_lrs=base_lrs, settings=settings, history=history, cuda_devices=cuda_devices,
                         state=state() if state is not None else None)
        good_ckpt = done_iters

    def fail(iteration: int, quantity: str) -> NonFiniteError:
        return NonFiniteError(stage, iteration, quantity, ckpt_path if good_ckpt is not None else None, good_ckpt)

    def plot() -> None:
        if out is not None and log is not None:
            write_loss_plot(log.rows, out / "loss.png")

    bar = _Progress(progress, stage, start, settings.iterations, settings.print_every)
    t0 = time.perf_counter()
    done_iters = start
    try:
        bad = _nonfinite_value(named)
        if bad is not None:
            raise fail(start, f"value of parameter '{bad}'")
        for i in range(start, settings.iterations):
            factor = lr_factor(settings, i)
            for g, base in zip(optimizer.param_groups, base_lrs):
                g["lr"] = base * factor
            last: dict[str, Any] = {}

            def closure(i: int = i, last: dict[str, Any] = last) -> torch.Tensor:
                optimizer.zero_grad(set_to_none=True)
                with torch.enable_grad():
                    loss, terms = _split_loss(loss_fn(i), i)
                for name, v in terms.items():
                    if not math.isfinite(v):
                        raise fail(i, f"loss term '{name}'")
                loss_value = float(loss.detach())
                if not math.isfinite(loss_value):
                    raise fail(i, "total loss")
                loss.backward()
                bad_grad = _nonfinite_grad(named)
                if bad_grad is not None:
                    raise fail(i, f"gradient of parameter '{bad_grad}'")
                last.update(loss=loss_value, terms=terms, grad_norm=_grad_norm_and_clip(named, settings))
                return loss.detach()

            if settings.name == "lbfgs":
                # LBFGS moves the parameters during its inner iterations: keep them to undo a
                # failed step, so that "the optimizer did not step" holds for it too.
                saved = {k: t.detach().clone() for k, t in named.items()}
                try:
                    optimizer.step(closure)
                except NonFiniteError:
                    _copy_params(named, saved)
                    raise
            else:
                closure()
                optimizer.step()
            if projection is not None:
                with torch.no_grad():
                    projection()
            bad = _nonfinite_value(named)
            if bad is not None:
                raise fail(i, f"value of parameter '{bad}'")

            row: dict[str, Any] = {"stage": stage, "iteration": i, "loss": last["loss"], **last["terms"],
                                   "lr": float(optimizer.param_groups[0]["lr"]), "grad_norm": last["grad_norm"],
                                   "time_s": time_offset + (time.perf_counter() - t0)}
            history.append(row)
            done_iters = i + 1
            if log is not None:
                log.append(dict(row))
            bar.update(done_iters, row["loss"], row["lr"])
            if settings.checkpoint_every and done_iters % settings.checkpoint_every == 0 \
                    and done_iters < settings.iterations:
                checkpoint(done_iters, done=False)
            if callback is not None and callback(i, dict(row)):
                break
        checkpoint(done_iters, done=True)
    except BaseException:
        bar.close()
        if log is not None:
            log.close()
        try:
            plot()
        except Exception as plot_exc:  # noqa: BLE001 - never mask the original error
            print(f"diffworld.driver: could not write the loss plot: {plot_exc}", file=sys.stderr)
        raise
    bar.close()
    if log is not None:
        log.close()
    plot()
    return _result(history, done_iters, resumed_from, out, ckpt_path)
