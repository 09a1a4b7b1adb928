"""ROSE against GRPO and Dr.GRPO on the same task, warm-started policy and generation budget.

For each seed the tiny character-level Llama is warm-started once (the core's supervised warm
start), then each method trains from that same policy for ``--steps`` steps of B=16 prompts x
G=4 responses, with the hyperparameters of its experiment config (``rose_default``,
``rose_vs_grpo_drgrpo``, ``rose_vs_grpo_grpo``). ROSE keeps dynamic sampling's filter but not
its refill (``max_gen_batches=1``), so every method generates exactly steps x B x G responses.
Reported per method (mean ± std over seeds): held-out pass@4 and mean@4 (4 samples, T=0.6,
top-p 0.95), mean held-out response length, training reward and length, and ROSE's branching
statistics. A PNG of the training curves and the held-out numbers goes to benchmarks/figures/.

    OMP_NUM_THREADS=1 python benchmarks/rose_vs_grpo.py [--seeds 0 1] [--steps 60] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import add_common_args, compose_config, parse, quiet_trainer

ROOT = Path(__file__).resolve().parents[1]
METHODS = {   # name -> (experiment config, extra overrides)
    "GRPO": ("rose_vs_grpo_grpo", []),
    "Dr.GRPO": ("rose_vs_grpo_drgrpo", []),
    "ROSE": ("rose_default", ["model.dynamic_sampling.max_gen_batches=1"]),
    "ROSE α=0": ("rose_default", ["model.dynamic_sampling.max_gen_batches=1", "model.advantage.alpha=0.0"]),
    "ROSE ε=1": ("rose_default", ["model.dynamic_sampling.max_gen_batches=1", "model.tree.epsilon=1.0"]),
}
TREE_STATS = ("branch_depth", "root_restart_fraction", "branch_se", "branch_se_positive")


def compose(experiment: str, overrides: list[str], seed: int, steps: int):
    return compose_config([f"experiment={experiment}", f"seed={seed}",
                            f"data.train_batches={steps}", *overrides])


def held_out(module, datamodule) -> dict[str, float]:
    module.eval()
    with torch.no_grad():
        module.evaluate_batch(datamodule.eval_samples())
    metrics = {k.split("/", 1)[1]: v for k, v in module.eval_summary("test").items()}
    metrics["mean@4"] = metrics["accuracy"]      # the mean correctness of the 4 samples (the core names it accuracy)
    return metrics


def warm_policy(seed: int, steps: int) -> tuple[dict, dict[str, float]]:
    """The core's supervised warm start, once per seed (a fit with no RL batches runs only on_fit_start)."""
    from hydra.utils import instantiate

    cfg = compose("rose_default", [], seed, steps)
    L.seed_everything(seed, workers=True)
    datamodule = instantiate(cfg.data, _convert_="all")
    module = instantiate(cfg.model, _convert_="all")
    quiet_trainer("rose_vs_grpo_", max_epochs=1, limit_train_batches=0).fit(module, datamodule=datamodule)
    return {k: v.clone() for k, v in module.policy.state_dict().items()}, held_out(module, datamodule)


def run(method: str, seed: int, steps: int, warm: dict) -> dict:
    from hydra.utils import instantiate

    experiment, overrides = METHODS[method]
    cfg = compose(experiment, overrides, seed, steps)
    L.seed_everything(seed, workers=True)
    datamodule = instantiate(cfg.data, _convert_="all")
    module = instantiate(cfg.model, _convert_="all")
    module.policy.load_state_dict(warm)
    module.warm_started.fill_(1.0)          # on_fit_start then copies the policy into the KL reference
    start = time.perf_counter()
    quiet_trainer("rose_vs_grpo_", max_epochs=1, limit_train_batches=steps).fit(module, datamodule=datamodule)
    seconds = time.perf_counter() - start
    steps_seen = [r for r in module.history if "reward" in r and "step" in r]
    result = {"method": method, "seed": seed, "seconds": seconds, **held_out(module, datamodule),
              "train_reward": [r["reward"] for r in steps_seen],
              "train_length": [r["length"] for r in steps_seen],
              "generated": sum(r.get("generated", module.hparams.group_size * datamodule.hparams.batch_size)
                               for r in steps_seen),
              "skipped": sum(r.get("skipped", 0.0) for r in steps_seen)}
    for key in TREE_STATS:
        values = [r[key] for r in steps_seen if key in r]
        if values:
            result[key] = sum(values) / len(values)
    return result


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f}±{statistics.stdev(values):.3f}"


def table(results: list[dict], warm: list[dict]) -> str:
    head = ("method", "pass@4", "mean@4", "eval len", "train rew (first10)", "train rew (last10)",
            "train len (last10)", "generated", "depth", "restart", "SE@branch", "SE>0", "s/run")
    rows = [head, ("warm start", mean_std([w["pass@4"] for w in warm]), mean_std([w["mean@4"] for w in warm]),
                   mean_std([w["length"] for w in warm])) + ("",) * (len(head) - 4)]
    for method in dict.fromkeys(r["method"] for r in results):
        runs = [r for r in results if r["method"] == method]

        def cell(key, runs=runs):
            return mean_std([r[key] for r in runs]) if all(key in r for r in runs) else "-"

        rows.append((method, cell("pass@4"), cell("mean@4"), cell("length"),
                     mean_std([statistics.mean(r["train_reward"][:10]) for r in runs]),
                     mean_std([statistics.mean(r["train_reward"][-10:]) for r in runs]),
                     mean_std([statistics.mean(r["train_length"][-10:]) for r in runs]),
                     str(int(statistics.mean(r["generated"] for r in runs))),
                     cell("branch_depth"), cell("root_restart_fraction"), cell("branch_se"),
                     cell("branch_se_positive"), f"{statistics.mean(r['seconds'] for r in runs):.0f}"))
    rows += paired(results)
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def paired(results: list[dict], baseline: str = "Dr.GRPO") -> list[tuple]:
    """Per-seed differences to the baseline (same warm start), mean ± std over seeds."""
    base = {r["seed"]: r for r in results if r["method"] == baseline}
    rows = []
    for method in dict.fromkeys(r["method"] for r in results):
        runs = [r for r in results if r["method"] == method and r["seed"] in base]
        if method == baseline or not runs:
            continue
        deltas = [mean_std([r[key] - base[r["seed"]][key] for r in runs]) for key in ("pass@4", "mean@4", "length")]
        rows.append((f"Δ {method} - {baseline}", *deltas, *("",) * 9))
    return rows


def plot(results: list[dict], warm: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r["method"] for r in results))
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))

    def smooth(values, width=5):
        return [statistics.mean(values[max(0, i - width + 1):i + 1]) for i in range(len(values))]

    for method in methods:
        runs = [r for r in results if r["method"] == method]
        for ax, key in ((axes[0], "train_reward"), (axes[1], "train_length")):
            curve = [statistics.mean(v) for v in zip(*(r[key] for r in runs))]
            ax.plot(range(1, len(curve) + 1), smooth(curve), label=method)
    axes[0].set(title="training reward (5-step mean)", xlabel="step")
    axes[1].set(title="training response length (tokens)", xlabel="step")
    axes[0].legend(fontsize=8)
    names = ["warm"] + methods
    for ax, key, title in ((axes[2], "pass@4", "held-out pass@4 / mean@4"), (axes[3], "length", "held-out length")):
        means = [statistics.mean(w[key] for w in warm)] + [
            statistics.mean(r[key] for r in results if r["method"] == m) for m in methods]
        ax.bar(range(len(names)), means, color="tab:blue", label=key)
        if key == "pass@4":
            second = [statistics.mean(w["mean@4"] for w in warm)] + [
                statistics.mean(r["mean@4"] for r in results if r["method"] == m) for m in methods]
            ax.bar(range(len(names)), second, color="tab:orange", width=0.5, label="mean@4")
            ax.legend(fontsize=8)
        ax.set_xticks(range(len(names)), names, rotation=30, fontsize=8)
        ax.set_title(title)
    seeds = sorted({r["seed"] for r in results})
    fig.suptitle(f"ROSE vs GRPO: tiny char Llama, additions 0-29, B=16 x G=4, {len(results[0]['train_reward'])} "
                 f"steps, mean over seeds {seeds}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--figure", type=Path, default=ROOT / "benchmarks" / "figures" / "rose_vs_grpo.png")
    add_common_args(parser)
    args = parse(parser)
    if args.device != "cpu":
        raise SystemExit("this benchmark runs the CPU demo only (--device cpu)")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    results, warm_metrics = [], []
    for seed in args.seeds:
        warm, metrics = warm_policy(seed, args.steps)
        warm_metrics.append(metrics)
        print(f"seed {seed}: warm start {metrics}", flush=True)
        for method in args.methods:
            result = run(method, seed, args.steps, warm)
            results.append(result)
            print(f"seed {seed} {method}: pass@4 {result['pass@4']:.3f} mean@4 {result['mean@4']:.3f} "
                  f"length {result['length']:.2f} ({result['seconds']:.0f}s)", flush=True)
    print()
    print(table(results, warm_metrics))
    plot(results, warm_metrics, args.figure)
    print(f"\nfigure: {args.figure}")
    if args.json:
        args.json.write_text(json.dumps({"warm": warm_metrics, "runs": results}, indent=2))


if __name__ == "__main__":
    main()
