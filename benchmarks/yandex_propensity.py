"""Position propensities fitted on real Yandex clicks (the WSCD 2011 sample), plotted.

The logged result lists of a query vary across its sessions, so a position-based model is
identified from the log alone. Three estimates of θ_k / θ_1:
* PBM fitted by EM (``fit_pbm_em``), with bootstrap standard errors over sessions;
* intervention harvesting (``harvest_propensity``): click rates of the same document at
  position k and at position 1, pooled with balanced weights;
* raw click-through rate by position (position bias and ranking quality confounded).
A held-out check: per-impression log-likelihood and perplexity of the fitted PBM on 20% of the
sessions against a position-only click model (P(click) = CTR_k).

    python benchmarks/yandex_propensity.py [--path DIR] [--bootstrap 20] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import add_common_args, parse, save_figure
from datamodules.ltr import read_yandex_clicks
from zoo.blocks.clicks import click_through_rate, fit_pbm_em, harvest_propensity
from zoo.paths import shared_data_dir

FIGURE = Path(__file__).resolve().parent / "figures" / "yandex_propensity.png"


def relative(theta: torch.Tensor) -> np.ndarray:
    return (theta / theta[..., :1]).numpy()


def log_likelihood(p: torch.Tensor, clicks: torch.Tensor) -> torch.Tensor:
    """Mean log-likelihood per position [K] and the overall perplexity 2^(-mean log2 likelihood)."""
    p = p.clamp(1e-6, 1 - 1e-6)
    return torch.where(clicks, p.log2(), (1 - p).log2()).mean(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--path", type=Path,
                        default=shared_data_dir() / "click-logs-yandex-wscd-sample" / "trainSample")
    parser.add_argument("--iters", type=int, default=300, help="EM iterations")
    parser.add_argument("--bootstrap", type=int, default=20, help="bootstrap resamples for EM's standard errors")
    parser.add_argument("--holdout", type=float, default=0.2, help="sessions held out for the likelihood check")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--figure", type=Path, default=FIGURE)
    add_common_args(parser)
    args = parse(parser)

    log = read_yandex_clicks(args.path)
    items, clicks = torch.from_numpy(log.items), torch.from_numpy(log.clicks)
    n_items, n_sessions = len(log.item_keys), len(log.query)
    print(f"{args.path}: {n_sessions} sessions, {len(log.queries)} queries, {n_items} (query, doc) pairs, "
          f"{int(clicks.sum())} clicked impressions, {log.unlisted_clicks} clicks on unlisted ids (ignored)")

    theta, _ = fit_pbm_em(items, clicks, n_items, n_iter=args.iters)
    em = relative(theta[0])
    rng = np.random.default_rng(args.seed)
    boot = []
    for _ in range(args.bootstrap):
        rows = torch.from_numpy(rng.integers(0, n_sessions, n_sessions))
        boot.append(relative(fit_pbm_em(items[rows], clicks[rows], n_items, n_iter=args.iters)[0][0]))
    em_se = np.std(boot, axis=0, ddof=1) if len(boot) > 1 else np.zeros_like(em)
    harvest = harvest_propensity(items, clicks, n_items).numpy()
    ctr = click_through_rate(clicks)
    ctr_rel = (ctr / ctr[0]).numpy()

    # Held-out likelihood: fit on the rest, unseen (query, doc) pairs back off to the mean relevance.
    order = torch.from_numpy(rng.permutation(n_sessions))
    n_test = int(args.holdout * n_sessions)
    test, train = order[:n_test], order[n_test:]
    t_theta, t_gamma = fit_pbm_em(items[train], clicks[train], n_items, n_iter=args.iters)
    seen = torch.bincount(items[train].reshape(-1), minlength=n_items) > 0
    gamma = torch.where(seen, t_gamma, t_gamma[seen].mean())
    pbm_ll = log_likelihood(t_theta[0] * gamma[items[test]], clicks[test])
    ctr_ll = log_likelihood(click_through_rate(clicks[train]).expand(n_test, -1), clicks[test])

    k = np.arange(1, len(em) + 1)
    print("\nposition | EM PBM θ_k/θ_1 (± bootstrap se) | harvesting θ_k/θ_1 | CTR_k/CTR_1 | CTR_k")
    for i in range(len(em)):
        print(f"{k[i]:>8} | {em[i]:.4f} ± {em_se[i]:.4f}{'':>15} | {harvest[i]:.4f}{'':>12} | {ctr_rel[i]:.4f}"
              f"{'':>5} | {float(ctr[i]):.4f}")
    pbm_ppl, ctr_ppl = 2 ** float(-pbm_ll.mean()), 2 ** float(-ctr_ll.mean())
    print(f"\nheld-out ({n_test} sessions) perplexity: PBM {pbm_ppl:.4f}, position-CTR model {ctr_ppl:.4f}")
    print(f"held-out log2-likelihood per impression: PBM {float(pbm_ll.mean()):.4f}, "
          f"position-CTR {float(ctr_ll.mean()):.4f}")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.errorbar(k, em, yerr=2 * em_se, marker="o", capsize=3, label="PBM, EM (±2 bootstrap se)")
    ax.plot(k, harvest, marker="s", label="intervention harvesting")
    ax.plot(k, ctr_rel, marker="^", linestyle="--", label="raw CTR (normalised)")
    ax.plot(k, 1 / k, color="grey", linestyle=":", label="1/k")
    ax.set_xlabel("position k")
    ax.set_ylabel("relative propensity θ_k / θ_1")
    ax.set_xticks(k)
    ax.set_title(f"Yandex WSCD sample: {n_sessions} sessions, {len(log.queries)} queries")
    ax.legend()
    save_figure(fig, args.figure)

    if args.json:
        args.json.write_text(json.dumps({
            "sessions": n_sessions, "em": em.tolist(), "em_se": em_se.tolist(), "harvest": harvest.tolist(),
            "ctr": ctr.tolist(), "held_apart_perplexity": {"pbm": pbm_ppl, "position_ctr": ctr_ppl},
        }, indent=2))


if __name__ == "__main__":
    main()
