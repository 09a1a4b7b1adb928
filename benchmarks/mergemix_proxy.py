"""MergeMix's proxy against real mixture training, on the embedded default's generated domains.

Runs ``experiment=mergemix_default``'s search (tiny char-level Llama; addition / reversal / sorting):
base on the uniform mixture -> 3 experts (constant LR) -> 15 seed merges scored by greedy exact match
on 200 held-out prompts per domain -> one quadratic-ridge surrogate per capability -> grid (step
0.05) + Dirichlet search of U = mean of min-max-normalised scores -> alpha* verified by a real merge.
Then it trains one model per validation mixture (the interior of the step-1/5 grid: 6 mixtures,
``expert_steps`` each from the base) and reports Spearman's rho between the merge proxy's utility
(a real merge at alpha = lambda; and the surrogate's prediction) and the trained models' utility.
With ``--final`` it also trains on lambda* and on the uniform mixture (same steps) and compares them.

Prints alpha*, the verified utility, the best seed utility, the uniform-alpha utility and rho; saves a
scatter plot (proxy vs trained utility) to benchmarks/figures/mergemix_proxy.png.

    OMP_NUM_THREADS=1 python benchmarks/mergemix_proxy.py [--seed 0] [--base-steps 1200]
        [--expert-steps 150] [--expert-lr LR] [--base-cache PATH] [--final] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    ROOT,
    add_common_args,
    compose_config,
    parse,
    save_figure,
    silence_lightning,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base-steps", type=int, default=None, help="default: the experiment's search.base_steps")
    parser.add_argument("--expert-steps", type=int, default=None, help="default: search.expert_steps")
    parser.add_argument("--expert-lr", type=float, default=None, help="default: search.expert_lr (the model's LR)")
    parser.add_argument("--base-cache", type=Path, default=None,
                        help="a safetensors file: the base is loaded from it if present, else trained and saved there")
    parser.add_argument("--final", action="store_true", help="also train on lambda* and on the uniform mixture")
    parser.add_argument("--figure", type=Path, default=ROOT / "benchmarks" / "figures" / "mergemix_proxy.png")
    args = parse(parser)
    silence_lightning()

    from omegaconf import OmegaConf
    from safetensors.torch import load_file, save_file

    from zoo.mergemix.search import MergeMixSearch
    from zoo.mergemix.simplex import simplex_grid

    cfg = compose_config(["experiment=mergemix_default", f"seed={args.seed}"])
    search_cfg = OmegaConf.to_container(cfg.search, resolve=True)
    validation_grid = search_cfg.pop("validation_grid")
    if args.base_steps is not None:
        search_cfg["base_steps"] = args.base_steps
    if args.expert_steps is not None:
        search_cfg["expert_steps"] = args.expert_steps
    if args.expert_lr is not None:
        search_cfg["expert_lr"] = args.expert_lr
    search = MergeMixSearch(OmegaConf.to_container(cfg.model, resolve=True),
                            OmegaConf.to_container(cfg.data, resolve=True), **search_cfg)
    start = time.perf_counter()
    if args.base_cache is not None and args.base_cache.exists():
        search.pretrain(load_file(str(args.base_cache)))
    else:
        search.pretrain()
        if args.base_cache is not None:
            args.base_cache.parent.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in search.base.items()}, str(args.base_cache))
    result = search.run()
    mixtures = simplex_grid(len(search.domains), validation_grid, interior=True)
    validation = search.validate(mixtures)
    final = None
    if args.final:
        uniform = np.full(len(search.domains), 1.0 / len(search.domains))
        trained = search.validate(np.stack([result.lambda_star, uniform]))["trained_utility"]
        final = {"lambda_star_trained_utility": float(trained[0]), "uniform_trained_utility": float(trained[1])}
    elapsed = time.perf_counter() - start

    print(f"\ndomains {search.domains}; base {search_cfg['base_steps']} steps, experts {search_cfg['expert_steps']} "
          f"steps (LR {search_cfg.get('expert_lr') or cfg.model.optimizer.lr}), {len(result.seed_alphas)} seeds; "
          f"seed {args.seed}; {elapsed:.0f}s in all")
    print(f"seed capability scores (min / max over seeds): {result.seed_scores.min(0).round(3).tolist()} / "
          f"{result.seed_scores.max(0).round(3).tolist()}; "
          f"surrogate LOO RMSE {np.round(result.surrogate_loo_rmse, 4).tolist()}")
    print(f"alpha* = {result.proposed_alpha.round(3).tolist()}  predicted U {result.predicted_utility:.3f}  "
          f"verified U {result.verified_utility:.3f} (scores {result.verified_scores.round(3).tolist()})")
    print(f"best seed U {result.best_seed_utility:.3f} at {result.best_seed_alpha.round(3).tolist()}; "
          f"uniform-alpha U {result.uniform_utility:.3f}; verified - uniform = "
          f"{result.verified_utility - result.uniform_utility:+.3f}; lambda* = {result.lambda_star.round(3).tolist()}")
    print("\nmixture lambda        merged-proxy U  surrogate U  trained U   trained scores")
    for lam, merged, predicted, trained, scores in zip(mixtures, validation["merged_utility"],
                                                       validation["predicted_utility"], validation["trained_utility"],
                                                       validation["trained_scores"]):
        print(f"{lam.round(2).tolist()!s:<22}{merged:>14.3f}{predicted:>13.3f}{trained:>11.3f}   "
              f"{scores.round(3).tolist()}")
    print(f"Spearman rho (merged proxy vs trained) = {validation['spearman_merged']:.3f}; "
          f"(surrogate vs trained) = {validation['spearman_predicted']:.3f}; per capability (merged vs trained) "
          f"{np.round(validation['spearman_per_capability'], 3).tolist()}; by normalisation "
          f"{ {k: round(v, 3) for k, v in validation['spearman_by_normalisation'].items()} }")
    if final:
        print(f"trained on lambda*: U {final['lambda_star_trained_utility']:.3f}; on uniform: "
              f"U {final['uniform_trained_utility']:.3f}")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    ax.scatter(validation["merged_utility"], validation["trained_utility"], label="real merge at alpha = lambda")
    ax.scatter(validation["predicted_utility"], validation["trained_utility"], marker="x", label="surrogate f(lambda)")
    for lam, x, y in zip(mixtures, validation["merged_utility"], validation["trained_utility"]):
        ax.annotate("/".join(f"{v:.1f}" for v in lam), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("proxy utility (min-max normalised over the seed merges)")
    ax.set_ylabel("trained-mixture utility (same normalisation)")
    ax.set_title(f"MergeMix proxy vs mixture training (rho = {validation['spearman_merged']:.2f})")
    ax.legend(fontsize=8)
    save_figure(fig, args.figure)

    if args.json:
        numbers = {**result.summary(), "seed": args.seed, "seconds": elapsed,
                   "base_steps": search_cfg["base_steps"], "expert_steps": search_cfg["expert_steps"],
                   "validation": {k: v if isinstance(v, dict) else np.asarray(v).round(4).tolist()
                                  for k, v in validation.items()},
                   "final": final}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(numbers, indent=2))


if __name__ == "__main__":
    main()
