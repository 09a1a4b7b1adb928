"""SCMA against GRPO with a plain length penalty (and alpha = 0 GRPO) on SCMA's chain_sum task.

    OMP_NUM_THREADS=1 python benchmarks/scma_vs_length_penalty.py [--steps 60] [--seeds 0 1] [--methods ...]

Every method starts from one warm-started policy (SCMA's warm start: reasoning, segmentation and
scoring demonstrations, so the GRPO runs carry the same weights), trains the same number of RL steps
on the same problems (16 per step, G = 4, lr and optimizer steps per RL step matched) from its
experiment config, once per seed (the seed sets the problem stream and the sampling), and is
evaluated on the held-out problems with 4 sampled responses each (temperature 1, as the configs'
eval_rollout): accuracy, mean response length in tokens, mean filler sentences per response, and the
method's own training reward (mean of its last 10 steps). The table gives the mean over seeds and,
after ±, their standard deviation. Every ``--eval-every`` RL steps a sampled evaluation on
``--curve-problems`` held-out problems traces the filler curve (figure: seed means).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import save_figure
from zoo.blocks.rl.rewards import boxed_match
from zoo.paths import REPO_ROOT
from zoo.scma.module import count_fillers

METHODS = {
    "grpo_alpha0": ("scma_vs_length_penalty_alpha0", []),
    "grpo_length_penalty": ("scma_vs_length_penalty", []),
    "scma": ("scma_default", []),
    "scma_oracle_scorer": ("scma_default", ["model.oracle_scorer=true"]),
    "scma_frozen_aux": ("scma_default", ["model.frozen_aux=true"]),
    "scma_acc_only": ("scma_default", ["model.aux_role_reward=acc_only"]),
}


OmegaConf.register_new_resolver("zoo_root", lambda: str(REPO_ROOT), replace=True)   # as train.py does


def build(experiment: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(REPO_ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"experiment={experiment}", *overrides])
    return instantiate(cfg.model, _convert_="all"), instantiate(cfg.data, _convert_="all")


SCRATCH = tempfile.TemporaryDirectory(prefix="scma_bench_")   # rl_history.jsonl goes here, not into the repo


def trainer(**kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", default_root_dir=SCRATCH.name, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                     num_sanity_val_steps=0, **kwargs)


@torch.no_grad()
def evaluate(module, samples: list[dict], per_problem: int, seed: int) -> dict[str, float]:
    """The reasoning policy's sampled responses: accuracy, length (tokens), filler sentences."""
    repeated = [s for s in samples for _ in range(per_problem)]
    rollout = module.engine(evaluation=True).generate([module.format_prompt(s) for s in repeated],
                                                      generator=torch.Generator().manual_seed(seed))
    n = len(repeated)
    return {"accuracy": sum(boxed_match(t, s) for t, s in zip(rollout.texts, repeated)) / n,
            "length": float(rollout.lengths.float().mean()),
            "fillers": sum(count_fillers(t, s["fillers"]) for t, s in zip(rollout.texts, repeated)) / n}


class Curve(L.Callback):
    """A small sampled evaluation every ``every`` RL steps."""

    def __init__(self, samples: list[dict], every: int) -> None:
        self.samples, self.every, self.points = samples, every, []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % self.every == 0:
            self.points.append({"step": batch_idx + 1, **evaluate(module, self.samples, 2, seed=batch_idx)})


def moving_average(values: list[float], window: int) -> list[float]:
    return [sum(values[max(0, i - window + 1):i + 1]) / len(values[max(0, i - window + 1):i + 1])
            for i in range(len(values))]


def seed_mean(runs: list[list[dict]], key: str) -> tuple[list[int], list[float]]:
    """Steps where every seed has ``key``, and the mean over seeds there."""
    steps = sorted(set.intersection(*({r["step"] for r in run if key in r} for run in runs)))
    by_step = [{r["step"]: r[key] for r in run if key in r} for run in runs]
    return steps, [statistics.mean(b[step] for b in by_step) for step in steps]


def cell(values: list[float], digits: int) -> str:
    spread = f"±{statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.{digits}f}{spread}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60, help="RL steps per method and seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--curve-problems", type=int, default=32)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "figures" / "scma_vs_length_penalty.png")
    parser.add_argument("--override", nargs="*", default=[], help="extra config overrides for every run")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    start = time.perf_counter()
    L.seed_everything(0)
    warm, datamodule = build("scma_default", args.override)
    trainer(max_steps=0).fit(warm, datamodule=datamodule)          # the warm start alone
    weights = {k: v.clone() for k, v in warm.policy.state_dict().items()}
    warm_seconds = time.perf_counter() - start
    eval_samples = datamodule.eval_samples()
    curve_samples = eval_samples[:args.curve_problems]
    results = {"warm_start": [{**evaluate(warm, eval_samples, 4, seed=7), "seconds": warm_seconds}]}
    step0 = {"step": 0, **evaluate(warm, curve_samples, 2, seed=10_000)}
    histories: dict[str, list[list[dict]]] = {}
    curves: dict[str, list[list[dict]]] = {}
    for name in args.methods:
        experiment, overrides = METHODS[name]
        for seed in args.seeds:
            L.seed_everything(seed)
            module, datamodule = build(experiment, [*overrides, *args.override, f"seed={seed}",
                                                    f"data.train_batches={args.steps}"])
            module.policy.load_state_dict(weights)
            module.warm_started.fill_(1.0)
            curve = Curve(curve_samples, args.eval_every)
            began = time.perf_counter()
            trainer(max_epochs=1, callbacks=[curve]).fit(module, datamodule=datamodule)
            seconds = time.perf_counter() - began
            history = [r for r in module.history if "reward" in r]
            result = {**evaluate(module, eval_samples, 4, seed=7),
                      "train_reward_last10": statistics.mean(r["reward"] for r in history[-10:]), "seconds": seconds}
            if any("score_on_fillers" in r for r in history):   # a learned scorer
                result["mean_score_last10"] = statistics.mean(r["mean_score"] for r in history[-10:])
            results.setdefault(name, []).append(result)
            histories.setdefault(name, []).append(history)
            curves.setdefault(name, []).append([step0, *curve.points])
            print(f"{name:>22} seed {seed}: done in {seconds:.0f} s", flush=True)

    header = (f"{'method':>22} | {'accuracy':>11} | {'length':>9} | {'fillers':>9} | {'train reward':>12} | "
              f"{'seconds':>7}")
    print(f"\nheld-out: {len(eval_samples)} problems x 4 sampled responses; {args.steps} RL steps per method; "
          f"seeds {args.seeds} (mean ± std)\n")
    print(header)
    print("-" * len(header))
    for name, runs in results.items():
        reward = cell([r["train_reward_last10"] for r in runs], 3) if "train_reward_last10" in runs[0] else "-"
        accuracy, length = cell([r["accuracy"] for r in runs], 3), cell([r["length"] for r in runs], 1)
        fillers, seconds = cell([r["fillers"] for r in runs], 2), statistics.mean(r["seconds"] for r in runs)
        print(f"{name:>22} | {accuracy:>11} | {length:>9} | {fillers:>9} | {reward:>12} | {seconds:7.0f}")
    scored = {n: cell([r["mean_score_last10"] for r in runs], 2) for n, runs in results.items()
              if "mean_score_last10" in runs[0]}
    if scored:
        print("\nlearned scorer, mean chunk score over the last 10 steps: "
              + ", ".join(f"{n} {v}" for n, v in scored.items()))
    print(f"total {time.perf_counter() - start:.0f} s")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 7.2))
    panels = [(axes[0, 0], "accuracy", "training accuracy (10-step mean)", "accuracy", True),
              (axes[0, 1], "length", "response tokens (10-step mean)", "length", True),
              (axes[0, 2], "fillers", "filler sentences / response", "held-out fillers (sampled)", False),
              (axes[1, 0], "accuracy", "accuracy", "held-out accuracy (sampled)", False),
              (axes[1, 1], "share_w5", "share of chunks scored 5", "learned scorer: all chunks", True),
              (axes[1, 2], "score_on_fillers", "mean score of filler-only chunks", "learned scorer: fillers", True)]
    for axis, key, ylabel, title, from_history in panels:
        for name in args.methods:
            runs = histories[name] if from_history else curves[name]
            if key in ("share_w5", "score_on_fillers") and "mean_score_last10" not in results[name][0]:
                continue
            steps, values = seed_mean(runs, key)
            if key in ("accuracy", "length") and from_history:
                values = moving_average(values, 10)
            axis.plot(steps, values, marker=None if from_history else "o", label=name)
        axis.set(xlabel="RL step", ylabel=ylabel, title=title)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    save_figure(fig, args.out)
    if args.json:
        args.json.write_text(json.dumps({"results": results, "curves": curves}, indent=2))


if __name__ == "__main__":
    main()
