"""M-ASK: turn-level ΔF1 rewards against the outcome-only reward, same budget, seeds and initial weights.

    OMP_NUM_THREADS=1 python benchmarks/mask_turn_vs_final.py [--steps 300] [--seeds 0 1] [--eval-every 50]

Each method trains from its experiment config (``mask_default``: turn-level; ``mask_final_only``: every
call gets F1_last plus its own format penalty) for the same number of PPO steps on the same question
stream; a seed sets the initial weights (identical for both methods), the question order and the
sampling. Held-out = the generated world's validation and test questions, decoded greedily. The table gives, before and
after training (mean over seeds ± std): F1, first_reward (F1_0, the Planning agent's parametric answer),
last_reward (F1 of the final answer), turns (searches per question), the share of questions stopped by
``<end>``, and the Update agent's add / update rates; plus the ratio of the methods' final held-out F1.
The figure shows held-out F1 every ``--eval-every`` steps and the training F1 (20-step moving average).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import save_figure
from zoo.paths import REPO_ROOT

METHODS = {"turn_level": "mask_default", "final_only": "mask_final_only"}
COLUMNS = ("f1", "first_reward", "last_reward", "turns", "ended", "add_rate", "update_rate")

OmegaConf.register_new_resolver("zoo_root", lambda: str(REPO_ROOT), replace=True)   # as train.py does
SCRATCH = tempfile.TemporaryDirectory(prefix="mask_bench_")


def build(experiment: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(REPO_ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"experiment={experiment}", *overrides])
    return instantiate(cfg.model, _convert_="all"), instantiate(cfg.data, _convert_="all")


@torch.no_grad()
def evaluate(module, samples: list[dict], batch_size: int = 32) -> dict[str, float]:
    """Greedy rollouts of every held-out question: outcome metrics, turns and Update-agent choices."""
    sums: dict[str, float] = defaultdict(float)
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        outcomes, _, _ = module.run_episodes(chunk, evaluation=True)
        for outcome, sample in zip(outcomes, chunk):
            sums["f1"] += module.score(outcome["prediction"], sample)["f1"]
            for key in ("first_reward", "last_reward", "ended", "adds", "updates"):
                sums[key] += outcome["metrics"][key]
            sums["turns"] += outcome["stats"].turns
    n = len(samples)
    decisions = max(sums["adds"] + sums["updates"], 1.0)
    return {"f1": sums["f1"] / n, "first_reward": sums["first_reward"] / n, "last_reward": sums["last_reward"] / n,
            "turns": sums["turns"] / n, "ended": sums["ended"] / n, "add_rate": sums["adds"] / decisions,
            "update_rate": sums["updates"] / decisions}


class Curve(L.Callback):
    def __init__(self, samples: list[dict], every: int) -> None:
        self.samples, self.every, self.points = samples, every, []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % self.every == 0:
            self.points.append({"step": batch_idx + 1, **evaluate(module, self.samples)})


def cell(values: list[float], digits: int = 3) -> str:
    spread = f"±{statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.{digits}f}{spread}"


def moving_average(values: list[float], window: int) -> list[float]:
    return [statistics.mean(values[max(0, i - window + 1):i + 1]) for i in range(len(values))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="PPO steps per method and seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--override", nargs="*", default=[], help="extra config overrides for every run")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "figures" / "mask_turn_vs_final.png")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    began = time.perf_counter()
    results: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    curves: dict[str, list[list[dict]]] = defaultdict(list)
    histories: dict[str, list[list[dict]]] = defaultdict(list)
    for seed in args.seeds:
        for name, experiment in METHODS.items():
            L.seed_everything(seed)
            module, datamodule = build(experiment, [f"seed={seed}", f"data.train_batches={args.steps}",
                                                    *args.override])
            module.env = datamodule.environment()
            held_out = datamodule.samples("val") + datamodule.samples("test")
            before = evaluate(module, held_out)
            curve = Curve(held_out, args.eval_every)
            start = time.perf_counter()
            L.Trainer(accelerator="cpu", default_root_dir=SCRATCH.name, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                      num_sanity_val_steps=0, max_epochs=1, callbacks=[curve]).fit(module, datamodule=datamodule)
            seconds = time.perf_counter() - start
            after = evaluate(module, held_out)
            results[name]["before"].append(before)
            results[name]["after"].append({**after, "seconds": seconds})
            curves[name].append([{"step": 0, **before}, *curve.points])
            histories[name].append([r for r in module.history if "f1" in r])
            print(f"{name:>11} seed {seed}: held-out F1 {before['f1']:.3f} -> {after['f1']:.3f} in {seconds:.0f} s",
                  flush=True)

    print(f"\nheld-out: {len(held_out)} generated-world val+test questions, greedy; {args.steps} PPO steps of "
          f"8 questions; seeds {args.seeds} (mean ± std)\n")
    header = f"{'method':>11} | {'when':>6} | " + " | ".join(f"{c:>13}" for c in COLUMNS) + f" | {'seconds':>7}"
    print(header)
    print("-" * len(header))
    for name in METHODS:
        for when in ("before", "after"):
            runs = results[name][when]
            seconds = f"{statistics.mean(r['seconds'] for r in runs):7.0f}" if when == "after" else f"{'':>7}"
            print(f"{name:>11} | {when:>6} | " + " | ".join(f"{cell([r[c] for r in runs]):>13}" for c in COLUMNS)
                  + f" | {seconds}")
    final = {name: statistics.mean(r["f1"] for r in results[name]["after"]) for name in METHODS}
    print(f"\nheld-out F1 after training, turn_level / final_only: {final['turn_level']:.3f} / "
          f"{final['final_only']:.3f} = {final['turn_level'] / max(final['final_only'], 1e-9):.2f}x")
    print(f"total {time.perf_counter() - began:.0f} s")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for name in METHODS:
        steps = [p["step"] for p in curves[name][0]]
        for axis, key in ((axes[0], "f1"), (axes[2], "turns")):
            axis.plot(steps, [statistics.mean(run[i][key] for run in curves[name]) for i in range(len(steps))],
                      marker="o", label=name)
        length = min(len(h) for h in histories[name])
        train_f1 = [statistics.mean(h[i]["f1"] for h in histories[name]) for i in range(length)]
        axes[1].plot(range(1, length + 1), moving_average(train_f1, 20), label=name)
    for axis, title in zip(axes, ("held-out F1 (greedy)", "training F1 (20-step moving average)",
                                  "held-out searches per question")):
        axis.set(xlabel="PPO step", title=title)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    save_figure(fig, args.out)
    if args.json:
        args.json.write_text(json.dumps({"results": results, "curves": curves}, indent=2))


if __name__ == "__main__":
    main()
