"""TourRank vs BM25 vs pointwise yes/no vs sliding window on a slice of TREC DL19 (BM25 candidates).

nDCG@10 (trec_eval semantics), LLM calls per query and wall time per method, all with one LLM loaded
once; ratios are against BM25 (nDCG) measured in the same run.

    python benchmarks/tourrank_dl19.py --queries 8 --top-k 20 --threads 1
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, add_common_args, parse, save_figure
from datamodules.trec_rerank import TrecRerankDataModule
from zoo.paths import shared_data_dir
from zoo.tourrank.module import TourRankModule

# name -> hparams switched on the one loaded module
SYSTEMS = {
    "bm25": {"method": "bm25"},
    "pointwise": {"method": "pointwise"},
    "sliding_window": {"method": "sliding_window", "selector": "listwise"},
    "tourrank_r1": {"method": "tourrank", "selector": "listwise", "num_tournaments": 1},
    "tourrank_r2": {"method": "tourrank", "selector": "listwise", "num_tournaments": 2},
    "tourrank_pointwise_r1": {"method": "tourrank", "selector": "pointwise", "num_tournaments": 1},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_common_args(parser)
    parser.add_argument("--backbone", default="smollm2-135m")
    parser.add_argument("--queries", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--stride", type=int, default=5)
    parser.add_argument("--passage-words", type=int, default=100)
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=list(SYSTEMS))
    parser.add_argument("--figure", action="store_true")
    args = parse(parser)
    folder = shared_data_dir() / "trec-dl-passage-bm25-top100"
    data = TrecRerankDataModule(source="file", path=str(folder / "bm25_dl19_top100.jsonl"),
                                qrels=str(folder / "qrels_dl19.txt"), top_k=args.top_k, max_queries=args.queries)
    data.setup("test")
    model = TourRankModule(backbone=args.backbone, window=args.window, stride=args.stride,
                           passage_max_words=args.passage_words).to(args.device)
    results = {}
    for name in args.systems:
        model.hparams.update(SYSTEMS[name])
        model.cache.clear()
        start, ndcgs, calls = time.perf_counter(), [], []
        for row in data.rows:
            out = model.rerank(row)
            ndcgs.append(model._ndcg(row, out["ranking"]))
            calls.append(out["calls"])
        seconds = time.perf_counter() - start
        results[name] = {"ndcg@10": sum(ndcgs) / len(ndcgs), "calls_per_query": sum(calls) / len(calls),
                         "seconds": seconds}
        print(f"{name}: {results[name]}", flush=True)
    base = results.get("bm25", {}).get("ndcg@10")
    print(f"DL19 slice: {len(data.rows)} queries x top-{args.top_k} BM25 candidates, backbone {args.backbone}")
    print(f"{'system':24s} {'nDCG@10':>8s} {'vs bm25':>8s} {'calls/q':>8s} {'wall s':>8s}")
    for name, r in results.items():
        ratio = f"{r['ndcg@10'] / base:8.3f}" if base else f"{'-':>8s}"
        print(f"{name:24s} {r['ndcg@10']:8.4f} {ratio} {r['calls_per_query']:8.1f} {r['seconds']:8.1f}")
    if args.json:
        args.json.write_text(json.dumps({"queries": len(data.rows), "top_k": args.top_k, **results}, indent=2))
    if args.figure:
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3))
        ax.bar(list(results), [r["ndcg@10"] for r in results.values()])
        ax.set_ylabel("nDCG@10")
        ax.set_title(f"DL19, {len(data.rows)} queries x top-{args.top_k}, {args.backbone}")
        ax.tick_params(axis="x", rotation=30)
        save_figure(fig, ROOT / "benchmarks" / "figures" / "tourrank_dl19.png")


if __name__ == "__main__":
    main()
