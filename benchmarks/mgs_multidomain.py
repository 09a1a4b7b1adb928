"""MGS against plain mixing (and global PCGrad) on multi-domain GRPO: generated arithmetic + Countdown.

The setting of ``mgs_multidomain`` (tiny character Llama, GRPO with group size 8, each sample
scored by its own task's checker): the policy is warm-started once per seed on mixed
demonstrations, then every arm trains from that same policy for ``--steps`` steps of
``--batch-size`` prompts drawn by weight from the two domains. Arms differ only in the ``mgs``
callback: ``mixed`` (``project: false``: the plain summed gradient, with the same per-domain
diagnostics), ``MGS`` (PCGrad inside every parameter tensor) and ``PCGrad`` (``partition:
global``).

Reported per arm: each domain's training reward (first / last 20 steps) and held-out mean@4 per
domain, the fraction of modules whose domain gradients have a negative cosine (over the steps
where both domains have a non-zero gradient), the whole-model cosine, projections per step, and
the modules most often in conflict. A PNG goes to benchmarks/figures/mgs_multidomain.png.

    OMP_NUM_THREADS=1 python benchmarks/mgs_multidomain.py [--steps 100] [--seeds 0]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    ROOT,
    add_common_args,
    compose_config,
    parse,
    quiet_trainer,
    save_figure,
    silence_lightning,
)
from callbacks.mgs import MGS

ARMS = {"mixed": {"project": False}, "MGS": {"partition": "param"}, "PCGrad": {"partition": "global"}}
PAIR = "arithmetic|countdown"


def compose(seed: int, steps: int, batch_size: int):
    return compose_config(["experiment=mgs_multidomain", f"seed={seed}", f"data.train_batches={steps}",
            f"data.batch_size={batch_size}", "data.eval_size=64"])


def build(cfg):
    from hydra.utils import instantiate

    datamodule = instantiate(cfg.data, _convert_="all")     # first: it registers the `domain` reward
    return instantiate(cfg.model, _convert_="all"), datamodule


def held_out(module, datamodule) -> dict[str, float]:
    module.eval()
    out = {}
    with torch.no_grad():
        for domain in datamodule.domains:
            module.evaluate_batch(datamodule.eval_samples(domain))
            out[domain] = module.eval_summary("test")["test/accuracy"]
    return out


def warm_policy(seed: int, steps: int, batch_size: int) -> dict:
    L.seed_everything(seed, workers=True)
    module, datamodule = build(compose(seed, steps, batch_size))
    quiet_trainer("mgs_multidomain_", max_epochs=1, limit_train_batches=0).fit(module, datamodule=datamodule)
    return {"weights": {k: v.clone() for k, v in module.policy.state_dict().items()},
            "held_out": held_out(module, datamodule)}


def run(arm: str, seed: int, steps: int, batch_size: int, warm: dict) -> dict:
    L.seed_everything(seed, workers=True)
    module, datamodule = build(compose(seed, steps, batch_size))
    module.policy.load_state_dict(warm["weights"])
    module.warm_started.fill_(1.0)
    callback = MGS(seed=seed, **ARMS[arm])
    start = time.perf_counter()
    quiet_trainer("mgs_multidomain_", [callback], max_epochs=1, limit_train_batches=steps).fit(module, datamodule=datamodule)
    seconds = time.perf_counter() - start
    history = callback.history
    both = [h for h in history if h.get(f"mgs/cos_global/{PAIR}", 0.0) != 0.0]
    return {"arm": arm, "seed": seed, "seconds": seconds, "held_out": held_out(module, datamodule),
            "reward": {d: [h.get(f"reward/{d}") for h in history] for d in datamodule.domains},
            "conflict_fraction": [h["mgs/conflict_fraction"] for h in both],
            "cos_global": [h[f"mgs/cos_global/{PAIR}"] for h in both],
            "projections": [h["mgs/projections"] for h in history],
            "steps_both": len(both), "steps": len(history),
            "top_conflicts": callback.conflict_counts.most_common(6)}


def window(values: list, part: slice) -> float:
    picked = [v for v in values[part] if v is not None]
    return statistics.mean(picked) if picked else float("nan")


def table(results: list[dict], warm: list[dict], domains: list[str]) -> str:
    head = ("arm", *(f"{d} rew first20" for d in domains), *(f"{d} rew last20" for d in domains),
            *(f"held-out {d}" for d in domains), "conflict frac", "cos global", "proj/step", "both/steps", "s/run")
    rows = [head, ("warm start", *("",) * (2 * len(domains)),
                   *(f"{statistics.mean(w['held_out'][d] for w in warm):.3f}" for d in domains), "", "", "", "", "")]
    for arm in ARMS:
        runs = [r for r in results if r["arm"] == arm]
        if not runs:
            continue

        def cell(fn, runs=runs):
            return f"{statistics.mean(fn(r) for r in runs):.3f}"

        rows.append((arm, *(cell(lambda r, d=d: window(r["reward"][d], slice(0, 20))) for d in domains),
                     *(cell(lambda r, d=d: window(r["reward"][d], slice(-20, None))) for d in domains),
                     *(cell(lambda r, d=d: r["held_out"][d]) for d in domains),
                     cell(lambda r: statistics.mean(r["conflict_fraction"] or [0.0])),
                     cell(lambda r: statistics.mean(r["cos_global"] or [0.0])),
                     cell(lambda r: statistics.mean(r["projections"])),
                     f"{sum(r['steps_both'] for r in runs)}/{sum(r['steps'] for r in runs)}",
                     f"{statistics.mean(r['seconds'] for r in runs):.0f}"))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot(results: list[dict], warm: list[dict], domains: list[str], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def smooth(values, width=10):
        out, seen = [], []
        for v in values:
            if v is not None:
                seen.append(v)
            out.append(statistics.mean(seen[-width:]) if seen else float("nan"))
        return out

    fig, axes = plt.subplots(1, len(domains) + 3, figsize=(5 * (len(domains) + 3), 4))
    for arm in ARMS:
        runs = [r for r in results if r["arm"] == arm]
        if not runs:
            continue
        for ax, domain in zip(axes, domains):
            curves = [smooth(r["reward"][domain]) for r in runs]
            ax.plot([statistics.mean(v) for v in zip(*curves)], label=arm)
            ax.set(title=f"{domain}: training reward (10-step mean)", xlabel="step")
        conflict = runs[0]["conflict_fraction"]
        axes[len(domains)].plot(smooth(conflict), label=arm)
        axes[len(domains) + 1].plot(smooth(runs[0]["cos_global"]), label=arm)
    axes[len(domains)].set(title="modules in conflict (fraction)", xlabel="step with both gradients")
    axes[len(domains) + 1].set(title="whole-model cosine of domain gradients", xlabel="step with both gradients")
    axes[0].legend(fontsize=8)
    ax = axes[-1]
    names = ["warm"] + [a for a in ARMS if any(r["arm"] == a for r in results)]
    width = 0.8 / len(domains)
    for i, domain in enumerate(domains):
        values = [statistics.mean(w["held_out"][domain] for w in warm)] + [
            statistics.mean(r["held_out"][domain] for r in results if r["arm"] == a) for a in names[1:]]
        ax.bar([x + i * width for x in range(len(names))], values, width=width, label=domain)
    ax.set_xticks([x + width * (len(domains) - 1) / 2 for x in range(len(names))], names)
    ax.set(title="held-out mean@4 per domain")
    ax.legend(fontsize=8)
    seeds = sorted({r["seed"] for r in results})
    fig.suptitle(f"MGS vs plain mixing: multi-domain GRPO (tiny char Llama), seeds {seeds}")
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--figure", type=Path, default=ROOT / "benchmarks" / "figures" / "mgs_multidomain.png")
    add_common_args(parser)
    args = parse(parser)
    silence_lightning()

    results, warm = [], []
    for seed in args.seeds:
        policy = warm_policy(seed, args.steps, args.batch_size)
        warm.append({"seed": seed, "held_out": policy["held_out"]})
        print(f"seed {seed}: warm start held-out {policy['held_out']}", flush=True)
        for arm in args.arms:
            result = run(arm, seed, args.steps, args.batch_size, policy)
            results.append(result)
            print(f"  {arm}: held-out {result['held_out']} conflict "
                  f"{statistics.mean(result['conflict_fraction'] or [0.0]):.3f} top {result['top_conflicts'][:3]} "
                  f"({result['seconds']:.0f}s)", flush=True)
    domains = list(results[0]["reward"])
    print(table(results, warm, domains))
    plot(results, warm, domains, args.figure)
    if args.json:
        args.json.write_text(json.dumps({"warm": warm, "runs": results}, indent=1))


if __name__ == "__main__":
    main()
