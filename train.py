"""The zoo's one entry point: python train.py model=<name> data=<name> trainer=<name> key=value ...

With no arguments it runs the embedded default (E2Rank from MiniLM on generated data).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from zoo.paths import REPO_ROOT

OmegaConf.register_new_resolver("zoo_root", lambda: str(REPO_ROOT), replace=True)


def _last_checkpoint(run_dir: Path) -> str:
    """`ckpt_path=last`: this run folder's last.ckpt, else the newest one of the same run name."""
    own = run_dir / "checkpoints" / "last.ckpt"
    if own.exists():
        return str(own)
    found = sorted(run_dir.parent.glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"ckpt_path=last: no checkpoints/last.ckpt under {run_dir.parent}/*/")
    return str(found[-1])


def _print_metrics(metrics: dict[str, float]) -> None:
    width = max((len(k) for k in metrics), default=0)
    for key in sorted(metrics):
        print(f"  {key:<{width}}  {metrics[key]:.4f}")


def run(cfg: DictConfig) -> dict[str, float]:
    import lightning as L
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import instantiate

    import zoo
    from zoo.hub import publish

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data, _convert_="all")
    model = zoo.load(cfg.pretrained) if cfg.pretrained else instantiate(cfg.model, _convert_="all")
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    logger = instantiate(cfg.logger) if cfg.get("logger") else False
    # Manual-optimisation modules (the RL entries) clip inside their own step (model.max_grad_norm).
    clipping = {} if model.automatic_optimization else {"gradient_clip_val": None}
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger, default_root_dir=str(run_dir), **clipping)
    if trainer.is_global_zero:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))

    ckpt_path = cfg.ckpt_path
    if ckpt_path == "last":
        ckpt_path = _last_checkpoint(run_dir)
        print(f"resuming from {ckpt_path}")
    metrics: dict[str, float] = {}
    mode = cfg.mode
    if mode == "fit" and type(model).training_step is L.LightningModule.training_step:
        print(f"{type(model).__name__} is training-free: mode=fit runs its evaluation (mode=test)")
        mode = "test"
    if mode == "fit":
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        if cfg.test_after_fit and not trainer.fast_dev_run:
            trainer.test(model, datamodule=datamodule)
            metrics = dict(getattr(model, "test_metrics", {}))
    elif mode == "test":
        trainer.test(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        metrics = dict(getattr(model, "test_metrics", {}))
    else:
        raise ValueError(f"unknown mode '{mode}'; choose fit or test")

    if not trainer.is_global_zero:
        return metrics
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    print(f"\nrun folder: {run_dir}")
    if metrics:
        print("final metrics:")
        _print_metrics(metrics)
    if mode == "fit" and cfg.save_model and not trainer.fast_dev_run:
        saved = model.save_pretrained(run_dir / "model", metrics=metrics, data=_describe_data(cfg))
        print(f"model saved to {saved}  (load with zoo.load('{saved}'))")
        if cfg.publish_as:
            entry, _, tag = str(cfg.publish_as).partition(":")
            print(f"published to {publish(saved, entry, tag or 'latest', overwrite=True)}")
    return metrics


def _describe_data(cfg: DictConfig) -> str:
    data = cfg.data
    where = data.get("path") or "generated in code"
    return f"{data.get('source')} ({where}), split {data.get('split')}, eval_fraction {data.get('eval_fraction')}"


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> None:
    from datamodules.readers import DataFormatError
    from zoo.backbones import BackboneError
    from zoo.hub import CheckpointError

    try:
        run(cfg)
    except (DataFormatError, BackboneError, CheckpointError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
