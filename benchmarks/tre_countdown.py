"""TRE-K / TRE-P against the global entropy bonus and no bonus, on Countdown with the same budget.

The setting of ``grpo_countdown`` (tiny character Llama, compact 3-number problems, 40-token
responses, group size 8): the policy is warm-started once per seed, then every arm trains from
that same policy for ``--steps`` GRPO steps of ``--batch-size`` prompts with the ``tre`` callback
in one mode (``none`` keeps only its diagnostics). Every arm shares one coefficient ``alpha``
per run (the spec's CPU demo: one shared alpha on the scaled values), for each ``--alphas``.

Reported per arm: training reward (first / last 10 steps), the invalid-token rate (fraction of
sampled response tokens that never occur in a reference solution: not a digit, operator,
parenthesis or a character of the answer tags, nor EOS), the tail mass outside the top-5
tokens and the full entropy at the sampled positions, and held-out mean@4 / pass@4 on 128
problems. A PNG of the curves goes to benchmarks/figures/tre_countdown.png.

    OMP_NUM_THREADS=1 python benchmarks/tre_countdown.py [--steps 60] [--alphas 0.01 0.05] [--seeds 0]
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
from callbacks.tre import TRE
from zoo.blocks.entropy import invalid_token_rate
from zoo.policy_gradient.module import GRPOModule

ARMS = {"none": {"mode": "none"}, "global": {"mode": "global"}, "TRE-K(2)": {"mode": "tre_k", "k": 2},
        "TRE-P(0.9)": {"mode": "tre_p", "p": 0.9}}


class InvalidTokenGRPO(GRPOModule):
    """GRPO recording, at every training rollout, the fraction of sampled tokens outside ``valid_ids``."""

    valid_ids: list[int]          # set by build(): the characters of reference solutions, and EOS
    invalid_rates: list[float]

    def rollout(self, samples):
        rollout = super().rollout(samples)
        rate = invalid_token_rate(rollout.response_ids, rollout.response_mask, self.valid_ids, len(self.tokenizer))
        self.invalid_rates.append(float(rate))
        return rollout


def compose(seed: int, steps: int, batch_size: int):
    return compose_config(["experiment=grpo_countdown", f"seed={seed}", f"data.train_batches={steps}",
            f"data.batch_size={batch_size}", "data.eval_size=128"])


def build(cfg) -> tuple[InvalidTokenGRPO, L.LightningDataModule]:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    options = OmegaConf.to_container(cfg.model, resolve=True)
    options.pop("_target_")
    datamodule = instantiate(cfg.data, _convert_="all")
    module = InvalidTokenGRPO(**options)
    module.invalid_rates = []
    solutions = datamodule.demonstrations(512, seed=0)
    chars = {c for s in solutions for c in s["solution"]}
    module.valid_ids = sorted({module.tokenizer.convert_tokens_to_ids(c) for c in chars} |
                              {module.tokenizer.eos_token_id})
    return module, datamodule


def held_out(module, datamodule) -> dict[str, float]:
    module.eval()
    with torch.no_grad():
        module.evaluate_batch(datamodule.eval_samples())
    return {k.split("/", 1)[1]: v for k, v in module.eval_summary("test").items()}


def warm_policy(seed: int, steps: int, batch_size: int) -> dict:
    L.seed_everything(seed, workers=True)
    module, datamodule = build(compose(seed, steps, batch_size))
    quiet_trainer("tre_countdown_", max_epochs=1, limit_train_batches=0).fit(module, datamodule=datamodule)
    return {"weights": {k: v.clone() for k, v in module.policy.state_dict().items()},
            **held_out(module, datamodule)}


def run(arm: str, alpha: float, seed: int, steps: int, batch_size: int, warm: dict) -> dict:
    L.seed_everything(seed, workers=True)
    module, datamodule = build(compose(seed, steps, batch_size))
    module.policy.load_state_dict(warm["weights"])
    module.warm_started.fill_(1.0)
    callback = TRE(coef=alpha, tail_k=5, **ARMS[arm])
    start = time.perf_counter()
    quiet_trainer("tre_countdown_", [callback], max_epochs=1, limit_train_batches=steps).fit(module, datamodule=datamodule)
    seconds = time.perf_counter() - start
    records = [r for r in module.history if "reward" in r and "step" in r]
    return {"arm": arm, "alpha": alpha, "seed": seed, "seconds": seconds, **held_out(module, datamodule),
            "train_reward": [r["reward"] for r in records], "invalid_rate": list(module.invalid_rates),
            "tail_mass": [h["tail_mass@5"] for h in callback.history],
            "entropy": [h["entropy"] for h in callback.history]}


def table(results: list[dict], warm: list[dict]) -> str:
    head = ("alpha", "arm", "reward first10", "reward last10", "invalid last10", "tail@5 last10", "entropy last10",
            "held-out mean@4", "pass@4", "s/run")
    rows = [head, ("-", "warm start", "", "", "", "", "", f"{statistics.mean(w['accuracy'] for w in warm):.3f}",
                   f"{statistics.mean(w['pass@4'] for w in warm):.3f}", "")]

    def last(values, n=10):
        return statistics.mean(values[-n:])

    for alpha in dict.fromkeys(r["alpha"] for r in results):
        for arm in ARMS:
            runs = [r for r in results if r["alpha"] == alpha and r["arm"] == arm]
            if not runs:
                continue

            def cell(fn, runs=runs):
                return f"{statistics.mean(fn(r) for r in runs):.3f}"

            rows.append((str(alpha), arm, cell(lambda r: statistics.mean(r["train_reward"][:10])),
                         cell(lambda r: last(r["train_reward"])), cell(lambda r: last(r["invalid_rate"])),
                         cell(lambda r: last(r["tail_mass"])), cell(lambda r: last(r["entropy"])),
                         cell(lambda r: r["accuracy"]), cell(lambda r: r["pass@4"]),
                         f"{statistics.mean(r['seconds'] for r in runs):.0f}"))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(head))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def smooth(values, width=5):
        return [statistics.mean(values[max(0, i - width + 1):i + 1]) for i in range(len(values))]

    alphas = list(dict.fromkeys(r["alpha"] for r in results))
    keys = (("train_reward", "training reward"), ("invalid_rate", "invalid-token rate (sampled)"),
            ("tail_mass", "tail mass outside top-5"), ("entropy", "full entropy (nats)"))
    fig, axes = plt.subplots(len(alphas), len(keys), figsize=(18, 3.6 * len(alphas)), squeeze=False)
    for row, alpha in enumerate(alphas):
        for arm in ARMS:
            runs = [r for r in results if r["alpha"] == alpha and r["arm"] == arm]
            if not runs:
                continue
            for col, (key, title) in enumerate(keys):
                curve = [statistics.mean(v) for v in zip(*(r[key] for r in runs))]
                axes[row, col].plot(range(1, len(curve) + 1), smooth(curve), label=arm)
                axes[row, col].set(title=f"{title}, alpha={alpha}", xlabel="step")
        axes[row, 0].legend(fontsize=8)
    seeds = sorted({r["seed"] for r in results})
    fig.suptitle(f"TRE on Countdown (tiny char Llama, grpo_countdown setting), 5-step means, seeds {seeds}")
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.01, 0.05])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--figure", type=Path, default=ROOT / "benchmarks" / "figures" / "tre_countdown.png")
    add_common_args(parser)
    args = parse(parser)
    silence_lightning()

    results, warm = [], []
    for seed in args.seeds:
        policy = warm_policy(seed, args.steps, args.batch_size)
        warm.append({k: v for k, v in policy.items() if k != "weights"})
        print(f"seed {seed}: warm start held-out mean@4 {policy['accuracy']:.3f}", flush=True)
        for alpha in args.alphas:
            for arm in args.arms:
                if arm == "none" and alpha != args.alphas[0]:
                    done = next(r for r in results if r["arm"] == "none" and r["seed"] == seed)
                    results.append({**done, "alpha": alpha})   # no bonus does not depend on alpha
                    continue
                result = run(arm, alpha, seed, args.steps, args.batch_size, policy)
                results.append(result)
                print(f"  alpha {alpha} {arm}: reward last10 {statistics.mean(result['train_reward'][-10:]):.3f} "
                      f"invalid {statistics.mean(result['invalid_rate'][-10:]):.3f} "
                      f"tail {statistics.mean(result['tail_mass'][-10:]):.3f} held-out {result['accuracy']:.3f} "
                      f"({result['seconds']:.0f}s)", flush=True)
    print(table(results, warm))
    plot(results, args.figure)
    if args.json:
        args.json.write_text(json.dumps({"warm": warm, "runs": results}, indent=1))


if __name__ == "__main__":
    main()
