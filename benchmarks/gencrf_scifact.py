"""GenCRF vs the raw query with MiniLM dense retrieval on SciFact held-apart queries.

SmolLM2-135M-Instruct reformulates (3 prompts x N=2 samples), clusters and scores once per query;
every aggregator (DC, FW, SimDW, ScoreDW) is then applied to the same Q_final, and the q_init
baseline is the same retriever on the raw query, in the same run. Prints nDCG@10 / Recall@100 per
mode with the ratio to q_init, per-query wins/losses, LLM calls and seconds per query.

    python benchmarks/gencrf_scifact.py --queries 40 --threads 1 --figure
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, add_common_args, parse, save_figure
from datamodules.gencrf import GenCRFDataModule
from zoo.gencrf.module import GenCRFModule
from zoo.paths import shared_data_dir

MODES = ["q_init", "dc", "fw", "simdw", "scoredw"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_common_args(parser)
    parser.add_argument("--queries", type=int, default=40, help="first n of the 162 held-apart queries")
    parser.add_argument("--llm", default="smollm2-135m")
    parser.add_argument("--retriever", default="minilm")
    parser.add_argument("--modes", nargs="+", default=MODES, choices=MODES)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--cluster-max-new-tokens", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=4, help="queries per clustering / scoring call batch")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds: stop after the batch that passes it and evaluate the queries done")
    parser.add_argument("--figure", action="store_true")
    args = parse(parser)

    data = GenCRFDataModule(source="beir", path=str(shared_data_dir() / "beir-scifact"), split="train",
                            eval_fraction=0.2, max_eval_queries=args.queries, seed=0)
    data.setup()
    qids = data.eval_qids
    module = GenCRFModule(mode="scoredw", llm=args.llm, retriever=args.retriever, sim_encoder=args.retriever,
                          max_new_tokens=args.max_new_tokens, cluster_max_new_tokens=args.cluster_max_new_tokens,
                          score_max_new_tokens=16, max_text_words=40).to(args.device).eval()
    start = time.perf_counter()
    module.prepare_index(data.retrieval_data("test"))
    index_s = time.perf_counter() - start

    rows, start = [], time.perf_counter()
    for i in range(0, len(qids), args.batch_size):
        batch = qids[i:i + args.batch_size]
        rows += module.run_round(batch, [data.data.queries[q] for q in batch], 0, args.modes)
        print(f"  {len(rows)}/{len(qids)} queries, {time.perf_counter() - start:.0f} s", flush=True)
        if args.time_budget and time.perf_counter() - start > args.time_budget:
            print(f"  time budget reached: evaluating the first {len(rows)} queries")
            break
    pipeline_s = time.perf_counter() - start

    results = {}
    for mode in args.modes:
        values = [module.ndcg(r["qid"], r["runs"][mode]) for r in rows]
        results[mode] = {m: sum(v[m] for v in values) / len(values) for m in ("ndcg@10", "recall@100")}
        results[mode]["per_query"] = [v["ndcg@10"] for v in values]
    base = results["q_init"]["ndcg@10"] if "q_init" in results else None
    n = len(rows)
    print(f"\nSciFact held-apart queries: {n} | LLM {args.llm} | retriever {args.retriever} | "
          f"corpus {len(data.data.corpus)} docs (index {index_s:.0f} s)")
    print(f"{'mode':<10} {'nDCG@10':>8} {'vs q_init':>9} {'R@100':>7} {'wins/ties/losses':>17}")
    for mode, res in results.items():
        ratio = f"{res['ndcg@10'] / base:.3f}x" if base else "-"
        if "q_init" in results and mode != "q_init":
            pairs = list(zip(res["per_query"], results["q_init"]["per_query"]))
            wtl = f"{sum(a > b for a, b in pairs)}/{sum(a == b for a, b in pairs)}/{sum(a < b for a, b in pairs)}"
        else:
            wtl = "-"
        print(f"{mode:<10} {res['ndcg@10']:>8.4f} {ratio:>9} {res['recall@100']:>7.4f} {wtl:>17}")
    calls = sum(r["calls"] for r in rows) / n
    clusters = sum(len(r.get("finals", [])) for r in rows) / n
    print(f"LLM calls per query: {calls:.1f} (shared by every mode) | clusters per query: {clusters:.2f} | "
          f"fallbacks: clustering {module.fallbacks['cluster']}/{n}, scoring {module.fallbacks['score']}/{n}")
    print(f"pipeline time: {pipeline_s:.0f} s ({pipeline_s / n:.1f} s per query)")
    if rows and "finals" in rows[0]:
        print(f"\nexample: {rows[0]['query']!r}\n  Q_final: {rows[0]['finals']}\n  scores: {rows[0]['scores']}")

    if args.json:
        args.json.write_text(json.dumps({"results": results, "seconds_per_query": pipeline_s / n,
                                         "llm_calls_per_query": calls, "fallbacks": module.fallbacks,
                                         "rows": [{k: v for k, v in r.items() if k != "runs"} for r in rows]},
                                        indent=1))
    if args.figure:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 3.2))
        names = list(results)
        ax.bar(names, [results[m]["ndcg@10"] for m in names], color=["grey"] + ["tab:blue"] * (len(names) - 1))
        ax.set_ylabel("nDCG@10")
        ax.set_title(f"GenCRF on SciFact ({n} held-apart queries, {args.llm})")
        save_figure(fig, ROOT / "benchmarks" / "figures" / "gencrf_scifact.png")


if __name__ == "__main__":
    main()
