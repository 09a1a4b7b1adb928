"""WSM's merged model against a real LR decay and against the constant-LR model, at equal steps.

For each seed, two runs of the generic causal LM from the same seed, data and optimizer (the
experiment configs ``wsm_causal_lm`` and ``wsm_wsd_control``: tiny Llama, AdamW 3e-3, 50 warmup
steps, 1,200 steps of 32 x 64 tokens):

- constant LR after warmup with the WSM callback: snapshots every 25 steps; the last 8 merged with
  linear-decay weights (their mean) and validated after every validation (the merged curve). The
  callback leaves training untouched, so this run's online weights are the constant-LR baseline;
- warmup-stable-decay: the LR falls to 0 along 1 - sqrt over the last 200 steps (the WSM window).

From the constant-LR run's last 16 snapshots the script also merges, offline: the other decay
shapes over 8 snapshots (cosine, 1-sqrt, EMA a = 0.3), the granularity ablation at a fixed 200-step
duration (interval 25/50/100/200) and the window ablation at interval 25 (n = 2/4/8/16).
Reported: final validation loss (token mean over 256 held-out blocks), mean ± std over seeds, a
table and a figure (curves and final losses) in benchmarks/figures/wsm_vs_decay.png.

    OMP_NUM_THREADS=1 python benchmarks/wsm_vs_decay.py [--seeds 0 1 2] [--steps 1200] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import add_common_args, compose_config, parse, save_figure
from callbacks.wsm import WSM
from zoo.blocks.merging import linear, wsm_coefficients

ROOT = Path(__file__).resolve().parents[1]
INTERVAL = 25
SHAPES = {"WSM linear n=8 (mean)": ("linear", 8), "WSM cosine n=8": ("cosine", 8), "WSM 1-sqrt n=8": ("1-sqrt", 8),
          "EMA a=0.3 n=8": ("ema", 8)}


def compose(experiment: str, seed: int, steps: int, extra: list[str] | None = None):
    overrides = [f"experiment={experiment}", f"seed={seed}", f"trainer.max_steps={steps}", *(extra or [])]
    return compose_config(overrides)


class OnlineCurve(L.Callback):
    """The fit's own validation loss at each validation (not the merged pass, which runs as a validate)."""

    def __init__(self) -> None:
        self.points: list[tuple[int, float]] = []

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self.points.append((trainer.global_step, float(trainer.callback_metrics["val/loss"])))


def fit(experiment: str, seed: int, steps: int, root: Path, extra_callbacks: list) -> tuple:
    from hydra.utils import instantiate
    cfg = compose(experiment, seed, steps)
    L.seed_everything(seed, workers=True)
    datamodule = instantiate(cfg.data, _convert_="all")
    module = instantiate(cfg.model, _convert_="all")
    curve = OnlineCurve()
    callbacks = [curve, *([instantiate(cfg.callbacks.wsm)] if cfg.callbacks.get("wsm") else []), *extra_callbacks]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(root))
    trainer.fit(module, datamodule=datamodule)
    wsm = next((c for c in callbacks if isinstance(c, WSM) and c.eval_merged), None)
    return module, datamodule, curve.points, wsm


def validation_loss(module, datamodule, state) -> float:
    online = {k: v.clone() for k, v in module.state_dict().items()}
    module.load_state_dict(state)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    loss = trainer.validate(module, datamodule=datamodule, verbose=False)[0]["val/loss"]
    module.load_state_dict(online)
    return float(loss)


def merged_loss(module, datamodule, snapshots: dict[int, dict], last: int, interval: int, n: int, shape: str) -> float:
    steps = [last - interval * j for j in reversed(range(n))]
    states = [snapshots[s] for s in steps]
    return validation_loss(module, datamodule, linear(states, wsm_coefficients(shape, n).tolist(), normalize=False,
                                                      reference=-1))


def run_seed(seed: int, steps: int, root: Path) -> dict:
    record = WSM(interval=INTERVAL, count=16, save_dir=str(root / f"s{seed}_wsm16"))
    started = time.perf_counter()
    module, datamodule, online_curve, wsm = fit("wsm_causal_lm", seed, steps, root / f"wsm{seed}", [record])
    snapshots = {s.step: s.state() for s in record.window}
    last = max(snapshots)
    results = {"Constant LR (last checkpoint)": online_curve[-1][1]}
    for name, (shape, n) in SHAPES.items():
        results[name] = merged_loss(module, datamodule, snapshots, last, INTERVAL, n, shape)
    # The callback's own merged evaluation must agree with the offline merge of the same window.
    results["check: callback wsm/val/loss"] = wsm.merged_metrics["wsm/val/loss"]
    for interval in (25, 50, 100, 200):
        results[f"granularity: interval {interval} x n={200 // interval}"] = merged_loss(
            module, datamodule, snapshots, last, interval, 200 // interval, "linear")
    for n in (2, 4, 8, 16):
        results[f"window: interval 25 x n={n}"] = merged_loss(module, datamodule, snapshots, last, INTERVAL, n, "linear")
    wsm_seconds = time.perf_counter() - started
    started = time.perf_counter()
    _, _, wsd_curve, _ = fit("wsm_wsd_control", seed, steps, root / f"wsd{seed}", [])
    results["WSD 1-sqrt decay over the last 200 steps"] = wsd_curve[-1][1]
    merged_curve = [(h["step"], h["wsm/val/loss"]) for h in wsm.history]
    print(f"seed {seed}: constant-LR run {wsm_seconds:.0f} s, WSD run {time.perf_counter() - started:.0f} s", flush=True)
    return {"results": results, "curves": {"constant LR (online)": online_curve, "WSD": wsd_curve,
                                           "WSM merged (linear, n=8)": merged_curve}}


def plot(per_seed: list[dict], summary: dict[str, tuple[float, float]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    colours = {"constant LR (online)": "tab:gray", "WSD": "tab:blue", "WSM merged (linear, n=8)": "tab:red"}
    for name, colour in colours.items():
        for i, seed in enumerate(per_seed):
            xs, ys = zip(*seed["curves"][name])
            left.plot(xs, ys, color=colour, alpha=0.8, label=name if i == 0 else None)
    finals = [summary[n][0] for n in summary]
    left.set_ylim(min(finals) - 0.01, max(finals) + 0.04)      # the last few hundred steps, where they differ
    left.set_xlabel("optimizer step")
    left.set_ylabel("validation loss (nats/token)")
    left.set_title("Validation loss during training (each seed)")
    left.legend()
    names = [n for n in summary if not n.startswith(("check", "granularity", "window"))]
    means = [summary[n][0] for n in names]
    errors = [summary[n][1] for n in names]
    right.barh(range(len(names)), means, xerr=errors, color="tab:red", alpha=0.7)
    right.set_yticks(range(len(names)), names, fontsize=8)
    pad = max(0.002, (max(means) - min(means)) * 0.6)
    right.set_xlim(min(means) - pad, max(means) + pad)
    right.set_xlabel(f"final validation loss, mean ± std over {len(per_seed)} seed(s)")
    right.invert_yaxis()
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--figure", type=Path, default=ROOT / "benchmarks" / "figures" / "wsm_vs_decay.png")
    add_common_args(parser)
    args = parse(parser)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="wsm_vs_decay_") as scratch:
        per_seed = [run_seed(seed, args.steps, Path(scratch)) for seed in args.seeds]
    names = list(per_seed[0]["results"])
    summary = {}
    for name in names:
        values = [s["results"][name] for s in per_seed]
        summary[name] = (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
    print(f"\nvalidation loss after {args.steps} steps (seeds {args.seeds})")
    print(f"{'':50s} {'mean':>7s} {'std':>7s}   per seed")
    for name in names:
        mean, std = summary[name]
        print(f"{name:50s} {mean:7.4f} {std:7.4f}   " + " ".join(f"{s['results'][name]:.4f}" for s in per_seed))
    plot(per_seed, summary, args.figure)
    if args.json:
        args.json.write_text(json.dumps({"steps": args.steps, "seeds": args.seeds, "summary": summary,
                                         "per_seed": per_seed}, indent=2))


if __name__ == "__main__":
    main()
