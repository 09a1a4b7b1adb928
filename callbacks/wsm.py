"""WSM (Warmup-Stable and Merge, arXiv 2507.17634): train at a constant LR after warmup and get the
"annealed" model by merging the last ``count`` checkpoints, taken every ``interval`` optimizer steps,
with coefficients that emulate a chosen decay curve (``zoo.blocks.merging``, Theorem 3.1).

Add it to a run with ``'callbacks=[default,wsm]'``. It needs nothing from the module but its state
dict; a module may define ``wsm_param_filter(name) -> bool`` to keep tensors out of the merge (those
come from the newest checkpoint, as do integer buffers). Training is never touched: the online
weights, their LR and optimizer state go on unchanged; the merged model is an artefact that is

- evaluated (``eval_merged``): after every validation, and at the end of training, Lightning's own
  validation loop runs once more on the merged weights, and what the module logs there is logged
  as ``wsm/<name>`` (``wsm/val/loss``); the online weights are then restored bit for bit;
- saved at the end of training as a zoo checkpoint (``<run>/wsm_merged``: ``save_pretrained`` files
  for a ZooModule, ``model.safetensors`` otherwise) with ``wsm.json`` (steps, coefficients, metrics).

Snapshots are CPU copies (``storage: memory``, kept in the Lightning checkpoint so a resumed run keeps
its window) or safetensors files under ``<run>/wsm_snapshots`` (``storage: disk``). Snapshots taken
while the LR still rises (warmup) are skipped unless ``include_warmup``: the merge-decay identity
assumes a constant LR inside the window; a falling LR gets a warning.

Several processes: under DDP every rank holds bitwise the same weights (same initial broadcast,
the same all-reduced gradients, the same optimizer arithmetic; buffers broadcast from rank 0), so
each rank's snapshots and merge are identical and need no communication. Rank 0 alone keeps them and
writes, unless the merged weights must be loaded on every rank (``eval_merged``,
``replace_weights_on_train_end``), when every rank merges its own copies. Under FSDP (or another
sharding strategy) a snapshot gathers the full state dict (a collective on every rank) to rank 0,
which merges and writes; loading the merged weights broadcasts them from rank 0 and re-shards.
"""
from __future__ import annotations

import contextlib
import json
import random
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from zoo.blocks.merging import (
    DECAY_SHAPES,
    coefficients_from_decay,
    linear,
    wsm_coefficients,
)

STORAGES = ("memory", "disk")
_RISING = 1e-9       # relative LR increase that counts as warmup


class WSM(L.Callback):
    def __init__(self, interval: int = 25, count: int | None = None, duration: int | None = None,
                 start_step: int = 0, shape: str = "linear", ema_alpha: float = 0.3,
                 coefficients: Sequence[float] | None = None, decay_weights: Sequence[float] | None = None,
                 storage: str = "memory", eval_merged: bool = False, save_dir: str | None = None,
                 include_warmup: bool = False, replace_weights_on_train_end: bool = False) -> None:
        """
        interval: optimizer steps between snapshots (the paper's checkpoint interval).
        count: snapshots merged (n, the oldest included); duration = count * interval may be given
            instead of either (default count 8).
        start_step: first step a snapshot may fall on; snapshots fall on start_step + m * interval.
        shape: the emulated decay: linear (= the plain mean), cosine, 1-sqrt, ema (with ema_alpha).
        coefficients / decay_weights: explicit c_0..c_{n-1} or w_1..w_{n-1} instead of a shape.
        """
        self.interval, self.count = _resolve_window(interval, count, duration)
        if start_step < 0:
            raise ValueError(f"WSM start_step must be >= 0, got {start_step}")
        if shape not in DECAY_SHAPES:
            raise ValueError(f"unknown WSM shape '{shape}'; choose one of {', '.join(DECAY_SHAPES)}")
        if storage not in STORAGES:
            raise ValueError(f"unknown WSM storage '{storage}'; choose one of {', '.join(STORAGES)}")
        self.start_step, self.shape, self.ema_alpha, self.storage = int(start_step), shape, float(ema_alpha), storage
        self.eval_merged, self.include_warmup = bool(eval_merged), bool(include_warmup)
        self.replace_weights_on_train_end = bool(replace_weights_on_train_end)
        self.save_dir = save_dir
        self.explicit = _explicit_coefficients(coefficients, decay_weights, self.count)
        wsm_coefficients(shape, self.count, self.ema_alpha)      # fail on a bad ema_alpha now, not at the end
        self.window: deque[Snapshot] = deque()
        self.history: list[dict[str, Any]] = []
        self.merged_metrics: dict[str, float] = {}
        self._evaluated: tuple[int, ...] | None = None
        self._seen_step: int | None = None
        self._last_lr: float | None = None
        self._peak_lr: float | None = None
        self._warned_decay = False
        self._in_merged_validation = False
        self._root = Path(".")

    @property
    def state_key(self) -> str:
        return self._generate_state_key(interval=self.interval, count=self.count, start_step=self.start_step,
                                        shape=self.shape, include_warmup=self.include_warmup)

    # -- the merge ---------------------------------------------------------------------------
    def coefficients(self, n: int) -> Tensor:
        """Merge coefficients for a window of n snapshots, oldest first."""
        if self.explicit is None:
            return wsm_coefficients(self.shape, n, self.ema_alpha)
        if n != self.count:
            raise ValueError(f"WSM was given {self.count} explicit coefficients but the window holds {n} "
                             "snapshots (training ended before the window filled)")
        return self.explicit

    def ready(self) -> bool:
        return bool(self.window) and (self.explicit is None or len(self.window) == self.count)

    def merge(self, module: L.LightningModule | None = None) -> dict[str, Tensor]:
        """The merged state dict of the current window (on a rank that holds the snapshots)."""
        states = [snapshot.state() for snapshot in self.window]
        merged = linear(states, self.coefficients(len(states)).tolist(), normalize=False, reference=-1)
        keep = getattr(module, "wsm_param_filter", None)
        if keep is not None:
            for key in merged:
                if not keep(key):
                    merged[key] = states[-1][key].detach().clone()
        return merged

    # -- snapshots ---------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._root = Path(trainer.default_root_dir)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._seen_step = trainer.global_step
        if self._last_lr is None and trainer.optimizers:     # the LR of the first step, to see warmup at step 1
            self._last_lr = float(trainer.optimizers[0].param_groups[0]["lr"])
        if not self._holds_snapshots(trainer):          # a resumed checkpoint brings rank 0's copies to every rank
            for snapshot in self.window:
                snapshot.tensors = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step, previous = trainer.global_step, self._seen_step
        if previous is None or step == previous:        # no optimizer step in this batch (gradient accumulation)
            return
        self._seen_step = step
        warming = self._track_lr(trainer, step)
        # A snapshot step lies in (previous, step]: several can pass in one batch under manual optimisation.
        if step < self.start_step or self._slot(step) == self._slot(previous):
            return
        if warming and not self.include_warmup:
            rank_zero_info(f"WSM: no snapshot at step {step}: the learning rate is still rising (warmup); "
                           "set include_warmup=true to keep it")
            return
        self._snapshot(trainer, step)

    def _slot(self, step: int) -> int:
        return (step - self.start_step) // self.interval

    def _track_lr(self, trainer: L.Trainer, step: int) -> bool:
        """Whether the LR (of the first parameter group) rose since the last step; warn once if it decays."""
        if not trainer.optimizers:
            return False
        lr = float(trainer.optimizers[0].param_groups[0]["lr"])
        rising = self._last_lr is not None and lr > self._last_lr * (1 + _RISING)
        self._last_lr = lr
        self._peak_lr = max(lr, self._peak_lr or lr)
        if not rising and lr < self._peak_lr * (1 - 1e-6) and not self._warned_decay:
            self._warned_decay = True
            rank_zero_warn(f"WSM: the learning rate fell to {lr:.3g} below its peak {self._peak_lr:.3g} at step {step}; "
                           "WSM assumes a constant LR after warmup (the merge replaces the decay)")
        return rising

    def _holds_snapshots(self, trainer: L.Trainer) -> bool:
        if _sharded(trainer):
            return trainer.is_global_zero
        return trainer.is_global_zero or self.eval_merged or self.replace_weights_on_train_end

    def _snapshot(self, trainer: L.Trainer, step: int) -> None:
        holds = self._holds_snapshots(trainer)
        if _sharded(trainer):
            state = gather_full_state(trainer.strategy.model)          # a collective: every rank calls it
        else:
            state = trainer.lightning_module.state_dict() if holds else {}
        snapshot = Snapshot(step)
        if self.storage == "disk":
            snapshot.path = self._root / "wsm_snapshots" / f"step_{step:09d}.safetensors"
            if trainer.is_global_zero:
                snapshot.path.parent.mkdir(parents=True, exist_ok=True)
                save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(snapshot.path))
        elif holds:
            snapshot.tensors = {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
        self.window.append(snapshot)
        if len(self.window) > self.count:
            evicted = self.window.popleft()
            if evicted.path is not None and trainer.is_global_zero:
                evicted.path.unlink(missing_ok=True)

    # -- merged evaluation and export --------------------------------------------------------
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.eval_merged and not trainer.sanity_checking and not self._in_merged_validation and self.ready():
            self._evaluate(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.ready():
            rank_zero_warn(f"WSM: {len(self.window)} snapshot(s) at the end of training (interval {self.interval}, "
                           f"count {self.count}, start_step {self.start_step}); nothing merged")
            return
        if self.eval_merged and self._evaluated != self._window_steps():
            self._evaluate(trainer, pl_module)
        trainer.strategy.barrier("wsm_snapshots_written")       # disk snapshots are written by rank 0 alone
        everywhere = self.replace_weights_on_train_end and not _sharded(trainer)
        merged = self.merge(pl_module) if trainer.is_global_zero or everywhere else None
        if trainer.is_global_zero:
            folder = self._save(pl_module, merged)
            rank_zero_info(f"WSM: merged steps {list(self._window_steps())} with {self._describe()} -> {folder}")
        if self.replace_weights_on_train_end:
            self._load_live(trainer, pl_module, merged)
        trainer.strategy.barrier("wsm_saved")

    def _window_steps(self) -> tuple[int, ...]:
        return tuple(snapshot.step for snapshot in self.window)

    def _describe(self) -> str:
        return "explicit coefficients" if self.explicit is not None else f"{self.shape} decay weights"

    def _evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Validation loss (and whatever else the module logs) of the merged weights, as ``wsm/*``."""
        if not is_overridden("validation_step", pl_module):
            rank_zero_warn("WSM: eval_merged needs a module with a validation_step; merged model not evaluated")
            self.eval_merged = False
            return
        trainer.strategy.barrier("wsm_snapshots_written")       # disk snapshots are written by rank 0 alone
        # Replicated weights: every rank merges its own (identical) snapshots; sharded: rank 0 merges.
        merged = self.merge(pl_module) if trainer.is_global_zero or not _sharded(trainer) else None
        online = self._load_live(trainer, pl_module, merged)
        try:
            with _random_streams_kept(trainer):     # a dataloader iterator draws a seed: keep the next epoch's shuffle
                metrics = self._validate(trainer)
        finally:
            self._load_live(trainer, pl_module, online)
        steps = self._window_steps()
        self._evaluated, self.merged_metrics = steps, {f"wsm/{k}": v for k, v in metrics.items()}
        self.history.append({"step": trainer.global_step, "window": list(steps), **self.merged_metrics})
        for logger in trainer.loggers:
            logger.log_metrics({**self.merged_metrics, "wsm/window_size": len(steps)}, step=trainer.global_step)

    def _load_live(self, trainer: L.Trainer, pl_module: L.LightningModule,
                   state: Mapping[str, Tensor] | None) -> dict[str, Tensor] | None:
        """Load ``state`` into the training weights; return the weights it replaced (a copy)."""
        if _sharded(trainer):
            previous = gather_full_state(trainer.strategy.model)
            scatter_full_state(trainer.strategy.model, state if trainer.is_global_zero else {})
            return previous
        previous = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        pl_module.load_state_dict(state, strict=True)
        return previous

    def _validate(self, trainer: L.Trainer) -> dict[str, float]:
        """Run Lightning's validation loop once as if ``trainer.validate`` were called, without touching the
        fit's logged metrics, loggers, checkpoint monitors or progress."""
        connector = trainer._logger_connector
        saved_metrics = (dict(connector._callback_metrics), dict(connector._logged_metrics),
                         dict(connector._progress_bar_metrics))
        saved_state = (trainer.state.fn, trainer.state.stage)
        loggers, loop = trainer.loggers, trainer.validate_loop
        verbose = loop.verbose
        self._in_merged_validation, trainer.loggers, loop.verbose = True, [], False
        try:
            trainer.state.fn, trainer.state.stage = TrainerFn.VALIDATING, RunningStage.VALIDATING
            outputs = loop.run()
        finally:
            trainer.state.fn, trainer.state.stage = saved_state
            self._in_merged_validation, trainer.loggers, loop.verbose = False, loggers, verbose
            connector._callback_metrics, connector._logged_metrics, connector._progress_bar_metrics = saved_metrics
        return {k: float(v) for output in outputs for k, v in output.items()}

    def _save(self, pl_module: L.LightningModule, merged: dict[str, Tensor]) -> Path:
        from zoo.base import ZooModule, plain
        folder = Path(self.save_dir) if self.save_dir else self._root / "wsm_merged"
        if isinstance(pl_module, ZooModule):
            # A fresh module from the same hyperparameters, so the live (possibly sharded) one is untouched;
            # building it must not move the run's random streams.
            with torch.random.fork_rng(devices=[]):
                fresh = type(pl_module)(**plain(dict(pl_module.hparams)))
            fresh.load_state_dict(merged, strict=True)
            fresh.save_pretrained(folder, metrics=self.merged_metrics or None)
        else:
            folder.mkdir(parents=True, exist_ok=True)
            save_file({k: v.detach().cpu().contiguous() for k, v in merged.items()}, str(folder / "model.safetensors"))
        manifest = {"shape": self.shape if self.explicit is None else "explicit", "ema_alpha": self.ema_alpha,
                    "interval": self.interval, "count": self.count, "steps": list(self._window_steps()),
                    "coefficients": self.coefficients(len(self.window)).tolist(),
                    "metrics": self.merged_metrics, "history": self.history}
        (folder / "wsm.json").write_text(json.dumps(manifest, indent=2))
        return folder

    # -- resume ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"steps": [s.step for s in self.window],
                "paths": [str(s.path) if s.path is not None else None for s in self.window],
                "tensors": [s.tensors for s in self.window] if self.storage == "memory" else None,
                "last_lr": self._last_lr, "peak_lr": self._peak_lr, "history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        tensors = state_dict.get("tensors") or [None] * len(state_dict["steps"])
        self.window = deque(Snapshot(step, Path(path) if path else None, t)
                            for step, path, t in zip(state_dict["steps"], state_dict["paths"], tensors))
        self._last_lr, self._peak_lr = state_dict["last_lr"], state_dict["peak_lr"]
        self.history = list(state_dict["history"])


class Snapshot:
    """One kept checkpoint: its optimizer step and its tensors, in memory or in a safetensors file."""

    def __init__(self, step: int, path: Path | None = None, tensors: dict[str, Tensor] | None = None) -> None:
        self.step, self.path, self.tensors = step, path, tensors

    def state(self) -> Mapping[str, Tensor]:
        if self.tensors is not None:
            return self.tensors
        if self.path is None:
            raise RuntimeError(f"WSM snapshot of step {self.step} is not held on this rank")
        return SafetensorsFile(self.path)


class SafetensorsFile(Mapping):
    """A safetensors file read one tensor at a time, so a merge holds one tensor per snapshot, not the model."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"WSM snapshot file not found: {self.path}")
        self._file = safe_open(str(self.path), framework="pt")
        self._keys = list(self._file.keys())

    def __getitem__(self, key: str) -> Tensor:
        if key not in self._keys:
            raise KeyError(f"{key} not in {self.path}")
        return self._file.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


@contextlib.contextmanager
def _random_streams_kept(trainer: L.Trainer) -> Iterator[None]:
    """Python, NumPy and torch (CPU and this rank's GPU) random states as they were before the block."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    device = trainer.strategy.root_device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        yield
    random.setstate(python_state)
    np.random.set_state(numpy_state)


# -- sharded models (FSDP) ---------------------------------------------------------------------


def _sharded(trainer: L.Trainer) -> bool:
    return isinstance(trainer.strategy, (FSDPStrategy, ModelParallelStrategy))


def gather_full_state(model: torch.nn.Module) -> dict[str, Tensor]:
    """The full (unsharded) state dict of an FSDP model; a collective. On GPUs only rank 0 receives it (on CPU)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )
    on_gpu = next(model.parameters()).device.type != "cpu"
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=on_gpu))


def scatter_full_state(model: torch.nn.Module, state: Mapping[str, Tensor]) -> None:
    """Load a full state dict held by rank 0 (other ranks pass {}) into an FSDP model; a collective."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
    )
    set_model_state_dict(model, dict(state), options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


# -- configuration and the offline merge -------------------------------------------------------


def _resolve_window(interval: int, count: int | None, duration: int | None) -> tuple[int, int]:
    if int(interval) < 1:
        raise ValueError(f"WSM interval must be >= 1 optimizer step, got {interval}")
    interval = int(interval)
    if duration is not None:
        if duration % interval:
            raise ValueError(f"WSM duration {duration} is not a multiple of interval {interval}")
        if count is not None and count * interval != duration:
            raise ValueError(f"WSM count * interval = {count * interval} but duration = {duration}; "
                             "give two of the three")
        count = duration // interval
    count = 8 if count is None else int(count)
    if count < 1:
        raise ValueError(f"WSM count must be >= 1 snapshot, got {count}")
    return interval, count


def _explicit_coefficients(coefficients: Sequence[float] | None, decay_weights: Sequence[float] | None,
                           count: int) -> Tensor | None:
    if coefficients is not None and decay_weights is not None:
        raise ValueError("WSM takes coefficients or decay_weights, not both")
    if decay_weights is not None:
        if len(decay_weights) != count - 1:
            raise ValueError(f"WSM decay_weights needs count - 1 = {count - 1} values (one per update between "
                             f"snapshots), got {len(decay_weights)}")
        return coefficients_from_decay(list(decay_weights))
    if coefficients is not None:
        c = torch.tensor([float(v) for v in coefficients], dtype=torch.float64)
        if len(c) != count or (c < 0).any() or abs(float(c.sum()) - 1) > 1e-6:
            raise ValueError(f"WSM coefficients must be {count} non-negative values summing to 1, got {c.tolist()}")
        return c
    return None


def read_state_dict(path: str | Path) -> Mapping[str, Tensor]:
    """Weights from a save_pretrained folder, a .safetensors file or a Lightning .ckpt (loaded weights-only)."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        return SafetensorsFile(path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if "state_dict" not in checkpoint:
        raise ValueError(f"{path} has no 'state_dict' (expected a Lightning checkpoint)")
    return checkpoint["state_dict"]


def merge_checkpoints(paths: Sequence[str | Path], shape: str = "linear", ema_alpha: float = 0.3,
                      coefficients: Sequence[float] | None = None,
                      decay_weights: Sequence[float] | None = None) -> dict[str, Tensor]:
    """WSM's offline merge of saved checkpoints (oldest first), without a Trainer."""
    c = _explicit_coefficients(coefficients, decay_weights, len(paths))
    if c is None:
        c = wsm_coefficients(shape, len(paths), ema_alpha)
    return linear([read_state_dict(p) for p in paths], c.tolist(), normalize=False, reference=-1)
