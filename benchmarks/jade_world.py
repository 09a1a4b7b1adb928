"""JADE on the generated world: the trained policy against the untrained one on held-out questions.

For each seed the ``jade_default`` experiment (tiny word-level Llama, choice decoding, k = 3, max 2
rounds, alpha = beta = 0) builds a policy; the untrained policy is evaluated greedily on the
questions never trained on (validation + test splits), then it trains ``--steps`` PPO steps of 8
questions and is evaluated again on the same questions. Printed per seed and averaged: answer F1 and
EM (all, one-hop, two-hop), the ratio trained / untrained, transitions and retrievals per question,
and the top-level workflow distribution before and after. A PNG goes to benchmarks/figures/.

    OMP_NUM_THREADS=1 python benchmarks/jade_world.py [--seeds 0 1 2] [--steps 300] [--lr 1e-3]
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
from collections import Counter
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import add_common_args, compose_config, parse, save_figure

ROOT = Path(__file__).resolve().parents[1]


def compose(seed: int, steps: int, overrides: list[str]):
    return compose_config(["experiment=jade_default", f"seed={seed}",
                            f"data.train_batches={steps}", *overrides])


def evaluate(module, samples: list[dict]) -> dict:
    """Greedy episodes on ``samples``: F1/EM overall and by hops, calls and searches, workflows."""
    module.eval()
    with torch.no_grad():
        outcomes, transitions, _ = module.run_episodes(samples, evaluation=True)
    scores = [module.score(o["prediction"], s) for o, s in zip(outcomes, samples)]
    result = {"f1": statistics.mean(x["f1"] for x in scores), "em": statistics.mean(x["em"] for x in scores),
              "transitions": statistics.mean(len(t) for t in transitions),
              "retrievals": statistics.mean(o["retrievals"] for o in outcomes),
              "workflows": dict(Counter(o["workflow"] for o in outcomes))}
    for hops in (1, 2):
        chosen = [x["f1"] for x, s in zip(scores, samples) if s["hops"] == hops]
        result[f"f1_{hops}hop"] = statistics.mean(chosen) if chosen else float("nan")
    return result


def run(seed: int, steps: int, overrides: list[str]) -> dict:
    from hydra.utils import instantiate

    cfg = compose(seed, steps, overrides)
    L.seed_everything(seed, workers=True)
    datamodule = instantiate(cfg.data, _convert_="all")
    module = instantiate(cfg.model, _convert_="all")
    held_out = datamodule.samples("val") + datamodule.samples("test")
    module.env = datamodule.environment()
    before = evaluate(module, held_out)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, default_root_dir=tempfile.mkdtemp(prefix="jade_world_"))
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    seconds = time.perf_counter() - start
    after = evaluate(module, held_out)
    curve = [r["f1"] for r in module.history if "f1" in r and "actor_loss" in r]
    return {"seed": seed, "steps": steps, "questions": len(held_out), "train_seconds": seconds,
            "before": before, "after": after, "train_f1": curve}


def report(results: list[dict]) -> str:
    keys = ("f1", "em", "f1_1hop", "f1_2hop", "transitions", "retrievals")
    lines = [f"{'seed':>4}  {'phase':<9}" + "".join(f"{k:>12}" for k in keys) + "  workflows"]
    for r in results:
        for phase in ("before", "after"):
            row = r[phase]
            flows = ", ".join(f"{w}:{n}" for w, n in sorted(row["workflows"].items(), key=lambda kv: -kv[1]))
            lines.append(f"{r['seed']:>4}  {phase:<9}" + "".join(f"{row[k]:>12.3f}" for k in keys) + f"  {flows}")
    f1_before = statistics.mean(r["before"]["f1"] for r in results)
    f1_after = statistics.mean(r["after"]["f1"] for r in results)
    ratio = f1_after / f1_before if f1_before else float("inf")
    lines.append(f"mean held-out F1: untrained {f1_before:.3f}  trained {f1_after:.3f}  ratio trained/untrained "
                 f"{ratio:.2f}  ({results[0]['questions']} questions, {results[0]['steps']} steps, "
                 f"{statistics.mean(r['train_seconds'] for r in results):.0f} s training per seed)")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    width = 5
    for r in results:
        curve = r["train_f1"]
        smooth = [statistics.mean(curve[max(0, i - width + 1):i + 1]) for i in range(len(curve))]
        axes[0].plot(range(1, len(curve) + 1), smooth, label=f"seed {r['seed']}")
    axes[0].set(title="training answer F1 (5-step mean)", xlabel="PPO step")
    axes[0].legend(fontsize=8)
    groups = ("f1", "f1_1hop", "f1_2hop")
    for offset, phase in ((-0.2, "before"), (0.2, "after")):
        means = [statistics.mean(r[phase][g] for r in results) for g in groups]
        axes[1].bar([i + offset for i in range(len(groups))], means, width=0.4,
                    label="untrained" if phase == "before" else "trained")
    axes[1].set_xticks(range(len(groups)), ["all", "1-hop", "2-hop"])
    axes[1].set(title="held-out answer F1 (greedy)")
    axes[1].legend(fontsize=8)
    flows = sorted({w for r in results for p in ("before", "after") for w in r[p]["workflows"]})
    bottom = [0.0, 0.0]
    for flow in flows:
        shares = [statistics.mean(r[p]["workflows"].get(flow, 0) / r["questions"] for r in results)
                  for p in ("before", "after")]
        axes[2].bar([0, 1], shares, bottom=bottom, label=flow)
        bottom = [b + s for b, s in zip(bottom, shares)]
    axes[2].set_xticks([0, 1], ["untrained", "trained"])
    axes[2].set(title="top-level workflow (share of questions)")
    axes[2].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle(f"JADE, generated world, choice decoding, {results[0]['steps']} steps x 8 questions, "
                 f"seeds {[r['seed'] for r in results]}")
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=None, help="actor learning rate (default: the config's)")
    parser.add_argument("--critic-lr", type=float, default=None)
    parser.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides")
    parser.add_argument("--figure", type=Path, default=ROOT / "benchmarks" / "figures" / "jade_world.png")
    add_common_args(parser)
    args = parse(parser)
    logging.getLogger("lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    overrides = list(args.override)
    if args.lr is not None:
        overrides.append(f"model.optimizer.lr={args.lr}")
    if args.critic_lr is not None:
        overrides.append(f"model.critic_lr={args.critic_lr}")
    results = [run(seed, args.steps, overrides) for seed in args.seeds]
    print(report(results))
    plot(results, args.figure)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
