"""LLM-QL: does query-likelihood pre-training help a tiny decoder retriever, at the same budget?

Same seed, same random initial decoder (tiny Llama over MiniLM's WordPiece), the generated collection
(configs/data/dense.yaml; held-apart queries for test):
  QL(N) -> CL(M)   Stage 1 for N steps (Attention Stop, corruption p), then Stage 2 for M steps
  CL(M)            Stage 2 for M steps from the random initial weights
  CL(N+M)          Stage 2 for N+M steps from the random initial weights (equal total steps)
Also: the Stage-1 model as a ranker (log P(q|d) on BM25 top-100) against Dirichlet QL and BM25, and
the held-apart query cross-entropy before/after Stage 1 with the loss curve.

    python benchmarks/llm_ql_pretrain.py --stage1-steps 200 --stage2-steps 200 --threads 1
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate

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


class LossCurve(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def held_apart_query_ce(module, datamodule, mismatched: bool = False) -> float:
    """Mean query CE of the held-apart pairs; ``mismatched`` pairs each query with the next query's
    passage, so the gap to the matched CE is what the model reads from the passage through [E]."""
    rows = [row for batch in datamodule.val_dataloader() for row in zip(batch["doc"], batch["query"])]
    docs, queries = [d for d, _ in rows], [q for _, q in rows]
    if mismatched:
        docs = docs[1:] + docs[:1]
    total = 0.0
    module.eval()
    with torch.no_grad():
        for start in range(0, len(rows), 32):
            batch = {"doc": docs[start:start + 32], "query": queries[start:start + 32]}
            total += float(module.compute_losses(batch)["query_ce"]) * len(batch["doc"])
    return total / len(rows)


def data_overrides(args) -> list[str]:
    """The same generated collection for both stages (more queries per topic: more Stage-1 pairs)."""
    return [f"data.synthetic.queries_per_topic={args.queries_per_topic}"]


def stage1(args, seed: int, work: Path) -> dict:
    cfg = compose_config(["experiment=llm_ql_default", f"seed={seed}", f"data.mask_prob={args.mask_prob}",
                          f"model.optimizer.lr={args.stage1_lr}", f"model.attention_stop={not args.no_attention_stop}", *data_overrides(args)])
    L.seed_everything(seed)
    datamodule = instantiate(cfg.data, _convert_="all")
    datamodule.setup("fit")
    module = instantiate(cfg.model, _convert_="all")
    module.export_decoder(work / "init")
    ce_before = held_apart_query_ce(module, datamodule)
    curve = LossCurve()
    start = time.perf_counter()
    trainer = quiet_trainer("llm_ql_s1", callbacks=[curve], max_steps=args.stage1_steps, max_epochs=-1)
    trainer.fit(module, datamodule)
    fit_s = time.perf_counter() - start
    ce_after = held_apart_query_ce(module, datamodule)
    ce_mismatched = held_apart_query_ce(module, datamodule, mismatched=True)
    trainer.test(module, datamodule, verbose=False)
    module.export_decoder(work / "ql")
    return {"query_ce_before": ce_before, "query_ce_after": ce_after, "query_ce_mismatched": ce_mismatched,
            "curve": curve.losses, "fit_s": fit_s,
            "ranking": {k: v for k, v in module.test_metrics.items() if "/" in k}}


def stage2(args, seed: int, backbone: Path, steps: int) -> dict:
    cfg = compose_config(["experiment=llm_ql_stage2", f"seed={seed}", f"model.backbone={backbone}",
                          *data_overrides(args)])
    L.seed_everything(seed)
    datamodule = instantiate(cfg.data, _convert_="all")
    module = instantiate(cfg.model, _convert_="all")
    start = time.perf_counter()
    trainer = quiet_trainer("llm_ql_s2", max_steps=steps, max_epochs=-1)
    trainer.fit(module, datamodule)
    fit_s = time.perf_counter() - start
    trainer.test(module, datamodule, verbose=False)
    return {**{k: v for k, v in module.test_metrics.items() if k.startswith(("retrieval/", "rerank_query/"))},
            "fit_s": fit_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--stage1-steps", type=int, default=200)
    parser.add_argument("--stage2-steps", type=int, default=200)
    parser.add_argument("--mask-prob", type=float, default=0.6)
    parser.add_argument("--stage1-lr", type=float, default=1e-3)
    parser.add_argument("--no-attention-stop", action="store_true", help="Stage 1 without the [E] bottleneck")
    parser.add_argument("--stage1-only", action="store_true")
    parser.add_argument("--queries-per-topic", type=int, default=4, help="generated queries per topic (50 topics)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--figure", type=Path, default=ROOT / "benchmarks" / "figures" / "llm_ql_pretrain.png")
    args = parse(parser)
    silence_lightning()
    n, m = args.stage1_steps, args.stage2_steps
    results = {}
    for seed in args.seeds:
        work = Path(tempfile.mkdtemp(prefix=f"llm_ql_{seed}_"))
        s1 = stage1(args, seed, work)
        arms = {} if args.stage1_only else {f"QL({n})->CL({m})": stage2(args, seed, work / "ql", m),
                                            f"CL({m})": stage2(args, seed, work / "init", m),
                                            f"CL({n + m})": stage2(args, seed, work / "init", n + m)}
        results[seed] = {"stage1": s1, "stage2": arms}
        print(f"\nseed {seed}: Stage 1 ({n} steps, p={args.mask_prob}, {s1['fit_s']:.0f}s): held-apart query CE "
              f"{s1['query_ce_before']:.3f} -> {s1['query_ce_after']:.3f} (mismatched passages "
              f"{s1['query_ce_mismatched']:.3f}); train loss first/last 10 steps "
              f"{sum(s1['curve'][:10]) / 10:.3f} -> {sum(s1['curve'][-10:]) / 10:.3f}")
        print("  reranking BM25 top-100 of the held-apart queries:")
        for system in ("ql", "dirichlet_ql", "first_stage"):
            r = s1["ranking"]
            print(f"    {system:<13} nDCG@10 {r[f'{system}/ndcg@10']:.4f}  MRR@10 {r[f'{system}/mrr@10']:.4f}")
        if not arms:
            continue
        base = arms[f"CL({m})"]
        print("  dense retrieval (whole corpus) after Stage 2:")
        for arm, r in arms.items():
            print(f"    {arm:<16} nDCG@10 {r['retrieval/ndcg@10']:.4f} (x{r['retrieval/ndcg@10'] / max(base['retrieval/ndcg@10'], 1e-9):.2f})"
                  f"  MRR@10 {r['retrieval/mrr@10']:.4f}  rerank-BM25 nDCG@10 {r['rerank_query/ndcg@10']:.4f}"
                  f"  fit {r['fit_s']:.0f}s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for seed, r in results.items():
        ax.plot(r["stage1"]["curve"], label=f"seed {seed}")
    ax.set_xlabel("Stage-1 step")
    ax.set_ylabel("query-token CE (train)")
    ax.set_title("LLM-QL Stage 1 (tiny Llama, generated data)")
    ax.legend()
    save_figure(fig, args.figure)


if __name__ == "__main__":
    main()
