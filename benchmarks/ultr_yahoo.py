"""User-aware ULTR on the Yahoo LTR sample with simulated users: test nDCG of rankers trained on
user-aware IPS, straightforward (per-user) IPS, IPS-PBM (user-oblivious), raw clicks, and the
full-information skyline (true relevance of every document).

Per seed: a seeded train/valid/test split of the 201 queries (60/20/20), a logging ranker
(ridge regression on the labels of 10% of the training queries) whose top 10 is shown, users
and sessions allocated as the reference (U users with the reference η, activity 1.25^-i, each
preferring half the queries) and user-aware PBM clicks. Every estimator trains the same MLP
(same seed) with the listwise softmax loss; the weights with the best validation nDCG@5 are
tested on expert labels. Reported: mean ± std over seeds, the paired difference to user-aware
(mean ± standard error), and the training-label error (MAE of γ̂ against the true γ on the
shown top 10).

With ``--data synthetic`` the same comparison runs on the embedded default instead (300 generated
queries, 200/50/50, a noisy copy of the true weights as the logger).

    python benchmarks/ultr_yahoo.py [--data yahoo|synthetic] [--seeds 20] [--sessions 200000] [--users 10]
                                    [--steps 300] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import add_common_args, parse, save_figure
from datamodules.ltr import ClickLTRDataModule, collate_lists
from zoo.blocks.ltr import has_relevant, list_metrics
from zoo.paths import shared_data_dir
from zoo.ultr_user_aware.module import UserAwareULTRModule

ESTIMATORS = ("true", "user_aware", "straightforward", "ips_pbm", "naive")
NAMES = {"true": "skyline (true labels)", "user_aware": "user-aware IPS", "straightforward": "per-user IPS (SF)",
         "ips_pbm": "IPS-PBM", "naive": "raw clicks", "logger": "logging ranker"}
METRICS = ("ndcg@1", "ndcg@3", "ndcg@5", "ndcg@10", "err@10")
FIGURE = Path(__file__).resolve().parent / "figures" / "ultr_yahoo.png"


def logger_metrics(dm: ClickLTRDataModule) -> dict[str, float]:
    """The logging ranker's own test metrics (what the shown lists were ranked by)."""
    scores = torch.from_numpy(dm.logger_scores)
    batch = collate_lists([dm.list_item(q) for q in dm.splits["test"]])
    padded = torch.full(batch["mask"].shape, float("-inf"), dtype=torch.float64)
    for i, q in enumerate(dm.splits["test"]):
        rows = dm.data.rows(q)
        padded[i, : rows.stop - rows.start] = scores[rows]
    valid = has_relevant(batch["labels"], batch["mask"])
    metrics = list_metrics(padded, batch["labels"], batch["mask"], (1, 3, 5, 10))
    return {m: float(metrics[m][valid].mean()) for m in METRICS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=("yahoo", "synthetic"), default="yahoo")
    parser.add_argument("--path", type=Path, default=shared_data_dir() / "ltr-yahoo-sample-lightgbm" / "rank.train")
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--sessions", type=int, default=200_000)
    parser.add_argument("--users", type=int, default=10)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--estimators", nargs="+", default=list(ESTIMATORS), choices=ESTIMATORS)
    parser.add_argument("--figure", type=Path, default=FIGURE)
    add_common_args(parser)
    args = parse(parser)
    import lightning as L
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    results = {e: {m: [] for m in (*METRICS, "label_mae")} for e in (*args.estimators, "logger")}
    start = time.perf_counter()
    for seed in range(args.seeds):
        if args.data == "yahoo":
            source = {"source": "svmlight", "path": str(args.path), "n_features": 300,
                      "logging_policy": "ridge"}
        else:
            source = {"source": "synthetic", "n_features": 16, "split": [0.6667, 0.1667, 0.1666]}
        dm = ClickLTRDataModule(**source, users=args.users, sessions=args.sessions, seed=seed,
                                simulation_seed=seed + 1)
        dm.setup("fit")
        for name, value in logger_metrics(dm).items():
            results["logger"][name].append(value)
        for estimator in args.estimators:
            L.seed_everything(seed, verbose=False)
            module = UserAwareULTRModule(n_features=dm.hparams.n_features, estimator=estimator,
                                         optimizer={"name": "Adagrad", "lr": args.lr})
            trainer = L.Trainer(max_steps=args.steps, max_epochs=-1, accelerator=args.device, devices=1,
                                logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                enable_model_summary=False, check_val_every_n_epoch=2, num_sanity_val_steps=0)
            trainer.fit(module, datamodule=dm)
            trainer.test(module, datamodule=dm, verbose=False)
            for name in METRICS:
                results[estimator][name].append(module.test_metrics[f"test/{name}"])
            if module.label_mae is not None:
                results[estimator]["label_mae"].append(module.label_mae)
        print(f"seed {seed}: " + ", ".join(f"{e} {results[e]['ndcg@10'][-1]:.4f}" for e in args.estimators)
              + f"  ({time.perf_counter() - start:.0f}s)", flush=True)

    title = "Yahoo LTR sample" if args.data == "yahoo" else "generated LTR data (embedded default)"
    print(f"\n{title}, {args.seeds} seeds, U={args.users}, S={args.sessions} sessions, "
          f"{args.steps} steps; test nDCG/ERR on expert labels (mean ± std over seeds)")
    header = f"{'system':<24}" + "".join(f"{m:>17}" for m in METRICS) + f"{'label MAE':>12}"
    print(header)
    for e in (*args.estimators, "logger"):
        row = f"{NAMES[e]:<24}" + "".join(f"{np.mean(results[e][m]):>9.4f} ± {np.std(results[e][m]):.4f}"
                                           for m in METRICS)
        mae = results[e]["label_mae"]
        row += f"{np.mean(mae):>12.4f}" if mae else f"{'-':>12}"
        print(row)
    paired = {}
    if "user_aware" in args.estimators:
        print("\npaired difference in test nDCG@10, user-aware minus each (mean ± se over seeds; wins/seeds)")
        ua = np.array(results["user_aware"]["ndcg@10"])
        for e in (*args.estimators, "logger"):
            if e == "user_aware":
                continue
            diff = ua - np.array(results[e]["ndcg@10"])
            se = diff.std(ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else 0.0
            paired[e] = {"mean": float(diff.mean()), "se": float(se), "wins": int((diff > 0).sum())}
            print(f"  vs {NAMES[e]:<24} {diff.mean():+.4f} ± {se:.4f}   {int((diff > 0).sum())}/{len(diff)}")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    systems = [*args.estimators, "logger"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    means = [np.mean(results[e]["ndcg@10"]) for e in systems]
    ses = [np.std(results[e]["ndcg@10"], ddof=1) / np.sqrt(args.seeds) if args.seeds > 1 else 0 for e in systems]
    ax1.bar(range(len(systems)), means, yerr=ses, capsize=4, color="tab:blue")
    ax1.set_xticks(range(len(systems)), [NAMES[e] for e in systems], rotation=30, ha="right")
    ax1.set_ylim(min(means) - 0.03, max(means) + 0.02)
    ax1.set_ylabel("test nDCG@10 (mean ± se)")
    with_mae = [e for e in systems if results[e]["label_mae"]]
    ax2.bar(range(len(with_mae)), [np.mean(results[e]["label_mae"]) for e in with_mae], color="tab:orange")
    ax2.set_xticks(range(len(with_mae)), [NAMES[e] for e in with_mae], rotation=30, ha="right")
    ax2.set_ylabel("training-label MAE vs true γ (top 10)")
    fig.suptitle(f"{title}, simulated users (U={args.users}, S={args.sessions}, {args.seeds} seeds)")
    save_figure(fig, args.figure)
    if args.json:
        args.json.write_text(json.dumps({"config": {k: str(v) for k, v in vars(args).items()},
                                         "results": results, "paired_vs_user_aware": paired}, indent=2))


if __name__ == "__main__":
    main()
