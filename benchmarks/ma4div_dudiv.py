"""MA4DIV on DU-DIV: α-NDCG@5/@10 of the trained agents against random order, relevance-only and
MMR greedy rankings of the same features, and the greedy coverage ranking on the true labels.

DU-DIV's real 1024-d features are not public, so documents get synthetic features from their
subtopic ids (``dudiv_queries``: per-query random subtopic vectors, summed, plus noise; the
query is the mean of its documents). Split: seeded 80/20 of the 4,473 queries (3,579 / 894);
each test query is scored once in a fixed random shuffle. α = 0.5. Two normalisers are shown:
the greedy ideal (ndeval's, the default) and the dataset's stored permutation (the MA4DIV
reference code's; its values can exceed 1).

    python benchmarks/ma4div_dudiv.py [--steps 6000] [--variants reference pooled] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import add_common_args, parse, save_figure
from datamodules.diversity import DiversificationDataModule
from zoo.blocks.diversity import alpha_ndcg, err_ia, greedy_ideal, s_recall
from zoo.ma4div.module import MA4DIVModule
from zoo.paths import shared_data_dir

FIGURE = Path(__file__).resolve().parent / "figures" / "ma4div_dudiv.png"
ALPHA = 0.5


def relevance_ranking(batch: dict) -> torch.Tensor:
    """Documents by ⟨q, d⟩: relevance only, no diversity."""
    feats = batch["feats"]
    scores = torch.einsum("bd,bnd->bn", feats[:, 0], feats[:, 1:]).masked_fill(~batch["doc_mask"], float("-inf"))
    return torch.sort(scores, dim=1, descending=True, stable=True).indices


def mmr_ranking(batch: dict, lam: float = 0.5) -> torch.Tensor:
    """Maximal marginal relevance: greedily λ·cos(q, d) - (1-λ)·max_{s chosen} cos(d, s)."""
    feats = torch.nn.functional.normalize(batch["feats"], dim=-1)
    query, docs = feats[:, 0], feats[:, 1:]
    relevance = torch.einsum("bd,bnd->bn", query, docs)
    similarity = docs @ docs.transpose(1, 2)
    b, n = relevance.shape
    chosen = torch.zeros(b, n, dtype=torch.bool)
    redundancy = torch.full((b, n), float("-inf"))
    ranking = torch.empty(b, n, dtype=torch.long)
    rows = torch.arange(b)
    for j in range(n):
        score = relevance if j == 0 else lam * relevance - (1 - lam) * redundancy
        # Padding goes after every real document; a chosen document is never picked again.
        score = score.masked_fill(~batch["doc_mask"], -1e30).masked_fill(chosen, float("-inf"))
        pick = score.argmax(1)
        ranking[:, j] = pick
        chosen[rows, pick] = True
        redundancy = torch.maximum(redundancy, similarity[rows, pick])
    return ranking


def scores(batch: dict, ranking: torch.Tensor) -> dict[str, float]:
    cov, out = batch["cov"], {}
    greedy = greedy_ideal(cov, ALPHA, batch["doc_mask"])
    for k in (5, 10):
        out[f"alpha_ndcg@{k}"] = float(alpha_ndcg(cov, ranking, k, ALPHA, greedy).mean())
        out[f"alpha_ndcg@{k} (given)"] = float(alpha_ndcg(cov, ranking, k, ALPHA, batch["given"]).mean())
        out[f"err_ia@{k}"] = float(err_ia(cov, ranking, k, "uniform", batch["topic_mask"], batch["doc_mask"]).mean())
        out[f"s_recall@{k}"] = float(s_recall(cov, ranking, k, batch["topic_mask"]).mean())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--path", type=Path, default=shared_data_dir() / "diversity-du-div-sample")
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--variants", nargs="+", default=["reference", "pooled"], choices=["reference", "pooled"])
    parser.add_argument("--batch-size", type=int, default=64, help="episodes collected per step")
    parser.add_argument("--replay-batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--anneal", type=int, default=20000, help="episodes over which ε falls from 1.0 to 0.1")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--figure", type=Path, default=FIGURE)
    add_common_args(parser)
    args = parse(parser)
    import lightning as L
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    dm = DiversificationDataModule(source="dudiv", path=str(args.path), n_docs=15, feature_dim=32,
                                   batch_size=args.batch_size, seed=args.seed)
    dm.setup("fit")
    test = dm.dataset("test")
    batch = {k: torch.stack([test[i][k] for i in range(len(test))]) for k in ("feats", "cov", "doc_mask",
                                                                            "topic_mask", "given")}
    print(f"DU-DIV: {len(dm.train_queries)} train / {len(dm.test_queries)} test queries, 15 documents, "
          f"up to {dm.n_topics} subtopics; synthetic 32-d features")
    n = batch["cov"].shape[0]
    results = {
        "random order": scores(batch, torch.arange(15).expand(n, -1)),
        "relevance ⟨q,d⟩": scores(batch, relevance_ranking(batch)),
        "MMR greedy (λ=0.5)": scores(batch, mmr_ranking(batch)),
    }
    times = {}
    for variant in args.variants:
        L.seed_everything(args.seed, verbose=False)
        module = MA4DIVModule(n_docs=15, feature_dim=32, variant=variant, replay_capacity=10 * len(dm.train_queries),
                              replay_batch_size=args.replay_batch_size, optimizer={"name": "Adam", "lr": args.lr},
                              epsilon={"start": 1.0, "end": 0.1, "anneal_episodes": args.anneal})
        trainer = L.Trainer(max_steps=args.steps, max_epochs=-1, accelerator=args.device, devices=1, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            limit_val_batches=0, num_sanity_val_steps=0)
        start = time.perf_counter()
        trainer.fit(module, datamodule=dm)
        times[variant] = time.perf_counter() - start
        module.eval()
        with torch.no_grad():
            ranking = module.greedy_ranking({k: v.to(module.device) for k, v in batch.items()}).cpu()
        results[f"MA4DIV ({variant})"] = scores(batch, ranking)
        print(f"MA4DIV {variant}: {args.steps} steps in {times[variant]:.0f}s", flush=True)
    results["greedy coverage (true labels)"] = scores(batch, greedy_ideal(batch["cov"], ALPHA, batch["doc_mask"]))

    columns = ["alpha_ndcg@5", "alpha_ndcg@10", "err_ia@5", "err_ia@10", "s_recall@5", "s_recall@10",
               "alpha_ndcg@5 (given)", "alpha_ndcg@10 (given)"]
    print(f"\nDU-DIV test ({n} queries), α = {ALPHA}; greedy-ideal normaliser unless marked (given = the stored "
          "permutation of the reference)")
    print(f"{'system':<32}" + "".join(f"{c:>22}" for c in columns))
    for name, values in results.items():
        print(f"{name:<32}" + "".join(f"{values[c]:>22.4f}" for c in columns))
    print("spec anchor, random order over all 4,473 queries: 0.682 / 0.753 (greedy), 0.740 / 0.811 (given)")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(results)
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.38
    for i, k in enumerate((5, 10)):
        ax.bar([x + (i - 0.5) * width for x in range(len(names))], [results[s][f"alpha_ndcg@{k}"] for s in names],
               width, label=f"α-NDCG@{k}")
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
    ax.set_ylim(0.5, 1.02)
    ax.set_ylabel("test α-NDCG (greedy-ideal normaliser)")
    ax.set_title(f"DU-DIV ({n} test queries, synthetic features), MA4DIV after {args.steps} steps")
    ax.legend()
    save_figure(fig, args.figure)
    if args.json:
        args.json.write_text(json.dumps({"results": results, "train_seconds": times,
                                         "config": {k: str(v) for k, v in vars(args).items()}}, indent=2))


if __name__ == "__main__":
    main()
