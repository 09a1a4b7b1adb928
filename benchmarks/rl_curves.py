"""Train the RL embedded defaults through train.py and plot their curves from rl_history.jsonl.

    python benchmarks/rl_curves.py --experiments grpo_default ppo_default --out benchmarks/figures/grpo_default.png

Each experiment runs in its own process (same seed, same data, same budget); the figure shows
the training reward (moving average) and held-out greedy accuracy against the RL step.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.common import save_figure


def run(experiment: str, folder: Path, overrides: list[str], threads: int | None) -> tuple[list[dict], dict, float]:
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    start = time.perf_counter()
    subprocess.run([sys.executable, str(REPO / "train.py"), f"experiment={experiment}", f"hydra.run.dir={folder}",
                    "logger=none", *overrides], cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    history = [json.loads(line) for line in (folder / "rl_history.jsonl").read_text().splitlines()]
    metrics = json.loads((folder / "metrics.json").read_text())
    return history, metrics, seconds


def moving_average(values: list[float], window: int) -> list[float]:
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1):i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiments", nargs="+", default=["grpo_default", "ppo_default"])
    parser.add_argument("--override", nargs="*", default=[], help="extra train.py overrides for every run")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "figures" / "grpo_default.png")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    summary = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.experiments:
            history, metrics, seconds = run(name, Path(tmp) / name, args.override, args.threads)
            train = [r for r in history if "reward" in r]
            val = [r for r in history if "val/accuracy" in r]
            left.plot([r["step"] for r in train], moving_average([r["reward"] for r in train], args.window), label=name)
            right.plot([r["step"] for r in val], [r["val/accuracy"] for r in val], marker="o", label=name)
            summary[name] = {"seconds": round(seconds, 1), "val_accuracy_start": val[0]["val/accuracy"],
                             "val_accuracy_end": val[-1]["val/accuracy"], "val_length_start": val[0]["val/length"],
                             "val_length_end": val[-1]["val/length"], "rl_steps": train[-1]["step"],
                             "train_reward_first10": sum(r["reward"] for r in train[:10]) / min(10, len(train)),
                             "train_reward_last10": sum(r["reward"] for r in train[-10:]) / min(10, len(train)),
                             **{k: v for k, v in metrics.items()}}
            print(f"{name:>16}: val accuracy {summary[name]['val_accuracy_start']:.3f} -> "
                  f"{summary[name]['val_accuracy_end']:.3f}, train reward (first/last 10 steps) "
                  f"{summary[name]['train_reward_first10']:.3f} -> {summary[name]['train_reward_last10']:.3f}, "
                  f"{seconds:.0f} s")
    left.set(xlabel="RL step", ylabel=f"training reward ({args.window}-step mean)", title="reward")
    right.set(xlabel="RL step", ylabel="held-out accuracy (model.eval_rollout)", title="accuracy (step 0 = warm start)")
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend()
    save_figure(fig, args.out)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
