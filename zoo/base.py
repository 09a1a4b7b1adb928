"""ZooModule: the LightningModule every paper builds on.

Hyperparameters are plain values (checked at construction), so Lightning checkpoints load
with ``weights_only=True``; ``save_pretrained`` writes config.yaml + model.safetensors + a
model card, and ``from_pretrained`` rebuilds the module exactly from that folder.
"""
from __future__ import annotations

import datetime as _dt
import inspect
import math
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch
from lightning.pytorch.utilities.enums import GradClipAlgorithmType
import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from safetensors.torch import load_file, save_file

from zoo import __version__
from zoo.backbones import loading_saved_backbone, save_backbone_files
from zoo.registry import get as registry_get
from zoo.registry import import_object

PLAIN_TYPES = (str, int, float, bool, type(None))


def check_plain(value: Any, where: str = "hparams") -> None:
    """Raise TypeError naming the key of the first value that is not plain data."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where}: key {key!r} is not a string")
            check_plain(item, f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            check_plain(item, f"{where}[{i}]")
    elif not isinstance(value, PLAIN_TYPES):
        raise TypeError(f"{where} is a {type(value).__name__}; zoo hyperparameters must be plain values "
                        "(str, int, float, bool, None, lists and dicts of them)")


def plain(value: Any) -> Any:
    """OmegaConf containers and tuples as plain dicts and lists."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


class ZooModule(L.LightningModule):
    """Base of every zoo module. Subclasses set ``zoo_name`` and call ``save_hyperparameters()``.

    ``optimizer`` and ``scheduler`` hyperparameters are plain dicts, e.g.
    ``{"name": "AdamW", "lr": 2e-5, "weight_decay": 0.01}`` and
    ``{"name": "linear", "warmup_ratio": 0.03}`` (any torch.optim class; any Transformers
    schedule name, or ``constant``).
    """

    zoo_name: ClassVar[str] = ""
    card_notes: ClassVar[str] = ""

    def save_hyperparameters(self, *args: Any, ignore: Any = None, frame: Any = None, logger: bool = True) -> None:
        """Lightning's, plus a check that every value is plain data."""
        super().save_hyperparameters(*args, ignore=ignore, frame=frame or inspect.currentframe().f_back,
                                     logger=logger)
        check_plain(dict(self.hparams))

    # -- optimisation ------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        opt_cfg = dict(self.hparams.get("optimizer") or {"name": "AdamW", "lr": 2e-5})
        name = opt_cfg.pop("name", "AdamW")
        if not hasattr(torch.optim, name):
            raise ValueError(f"unknown optimizer '{name}': use a class name from torch.optim")
        no_decay = ("bias", "LayerNorm.weight", "layer_norm.weight", "norm.weight")
        decay = opt_cfg.get("weight_decay", 0.0)
        params = [p for p in self.named_parameters() if p[1].requires_grad]
        groups = [
            {"params": [p for n, p in params if not n.endswith(no_decay)], "weight_decay": decay},
            {"params": [p for n, p in params if n.endswith(no_decay)], "weight_decay": 0.0},
        ]
        optimizer = getattr(torch.optim, name)([g for g in groups if g["params"]], **opt_cfg)
        sched_cfg = dict(self.hparams.get("scheduler") or {"name": "constant"})
        sched_name = sched_cfg.pop("name", "constant")
        if sched_name == "constant" and not sched_cfg.get("warmup_steps") and not sched_cfg.get("warmup_ratio"):
            return optimizer
        from transformers import get_scheduler
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = sched_cfg.pop("warmup_steps", None)
        if warmup is None:
            warmup = math.ceil(total * sched_cfg.pop("warmup_ratio", 0.0))
        sched_cfg.pop("warmup_ratio", None)
        if sched_name == "constant":
            sched_name = "constant_with_warmup"
        scheduler = get_scheduler(sched_name, optimizer, num_warmup_steps=warmup,
                                  num_training_steps=total, scheduler_specific_kwargs=sched_cfg or None)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: Any = None,
                                    gradient_clip_algorithm: Any = None) -> None:
        # A module whose hyperparameters carry ``grad_clip`` (its paper's clip norm) uses it under
        # any trainer config; others follow the trainer's gradient_clip_val.
        own = self.hparams.get("grad_clip")
        if own is None:
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        self.trainer.precision_plugin.clip_gradients(optimizer, own, GradClipAlgorithmType.NORM)

    # -- evaluation ----------------------------------------------------------------------
    def accumulate_metrics(self, sums: dict[str, Any], count: Any) -> None:
        """Add one batch's metric sums and how many items they cover; see ``reduce_metrics``."""
        totals = getattr(self, "_metric_sums", None) or {}
        for name, value in {**sums, "count": count}.items():
            totals[name] = totals.get(name, 0) + torch.as_tensor(value, dtype=torch.float64).detach().cpu()
        self._metric_sums = totals

    def reduce_metrics(self, prefix: str, prog_bar: str | None = None) -> dict[str, float]:
        """Means of the accumulated metrics over every item of every rank, logged as ``prefix/name``."""
        totals, self._metric_sums = getattr(self, "_metric_sums", None) or {}, {}
        sums = {k: self.trainer.strategy.reduce(v.to(self.device), reduce_op="sum") for k, v in totals.items()}
        count = float(sums.pop("count", 0.0))
        metrics = {f"{prefix}/{k}": float(v) / max(count, 1.0) for k, v in sums.items()}
        for key, value in metrics.items():
            self.log(key, value, prog_bar=key == f"{prefix}/{prog_bar}")
        return metrics

    # -- checkpoints ---------------------------------------------------------------------
    def backbone_parts(self) -> tuple[Any, Any] | None:
        """(HF model, tokenizer) whose config and tokenizer are saved beside the weights."""
        return None

    def save_pretrained(self, folder: str | Path, metrics: dict[str, float] | None = None,
                        data: str | None = None) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        cls = type(self)
        config = {
            "zoo_version": __version__,
            "entry": self.zoo_name,
            "class": f"{cls.__module__}.{cls.__qualname__}",
            "hparams": plain(dict(self.hparams)),
        }
        (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        # safetensors refuses shared storage: save each tensor once, contiguous.
        state = {k: v.detach().contiguous().clone() for k, v in self.state_dict().items()}
        save_file(state, str(folder / "model.safetensors"), metadata={"zoo_version": __version__})
        parts = self.backbone_parts()
        if parts is not None:
            save_backbone_files(parts[0], parts[1], folder / "backbone")
        (folder / "README.md").write_text(self.model_card(metrics or {}, data))
        return folder

    def model_card(self, metrics: dict[str, float], data: str | None) -> str:
        entry = registry_get(self.zoo_name) if self.zoo_name else None
        lines = [f"# {self.zoo_name or type(self).__name__} (zoo {__version__})", ""]
        if entry is not None:
            arxiv = f" (arXiv [{entry.arxiv}](https://arxiv.org/abs/{entry.arxiv}))" if entry.arxiv else ""
            lines += [f"- Paper: {entry.paper}{arxiv}"]
        lines += [f"- Class: `{type(self).__module__}.{type(self).__qualname__}`",
                  f"- Data: {data or 'not recorded'}",
                  f"- Saved: {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}", ""]
        if metrics:
            lines += ["## Metrics", "", "| metric | value |", "|---|---|"]
            lines += [f"| {k} | {v:.4f} |" for k, v in sorted(metrics.items())]
            lines.append("")
        lines += ["## Hyperparameters", "", "```yaml", yaml.safe_dump(plain(dict(self.hparams)), sort_keys=False).rstrip(),
                  "```", ""]
        if self.card_notes:
            lines += ["## Notes", "", self.card_notes.strip(), ""]
        return "\n".join(lines)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, map_location: str = "cpu") -> ZooModule:
        """Rebuild a module saved by save_pretrained: a folder, or a store/index name (entry:tag)."""
        from zoo.hub import resolve
        folder = resolve(str(name_or_path))
        config = yaml.safe_load((folder / "config.yaml").read_text())
        target = cls if cls is not ZooModule else import_object(config["class"])
        if not issubclass(target, ZooModule):
            raise TypeError(f"{folder}/config.yaml names {config['class']}, which is not a ZooModule")
        backbone_dir = folder / "backbone"
        if backbone_dir.is_dir():
            with loading_saved_backbone(backbone_dir):
                module = target(**config["hparams"])
        else:
            module = target(**config["hparams"])
        state = load_file(str(folder / "model.safetensors"), device=map_location)
        module.load_state_dict(state, strict=True)
        return module.eval()
