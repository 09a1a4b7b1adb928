"""Disj-InfoNCE vs InfoNCE (one random positive) vs Conj-InfoNCE under controlled false positives, and the
real annotation pipeline with a small LLM on SciFact.

    # retriever arms: MiniLM on SciFact (80% of the train-split queries; test on the 162 held apart);
    # the budget of the reported numbers (a CPU shared by many jobs): 20 steps of 8 queries x 4 documents,
    # 64 tokens, lr 5e-5, evaluated on the judged documents plus 200 others
    OMP_NUM_THREADS=1 python benchmarks/utility_disj_infonce.py train --corrupt 0.5 0.0 \
        --losses infonce_single conj disj --zero-shot --max-steps 20 --group-size 4 --max-doc-length 64 \
        --lr 5e-5 --corpus-limit 200 --json utility.json
    python benchmarks/utility_disj_infonce.py plot --json utility.json
    # annotation: SmolLM2-135M-Instruct on a few SciFact training queries, compared with the qrels
    OMP_NUM_THREADS=1 python benchmarks/utility_disj_infonce.py annotate --queries 8 --pool 8 --words 80

Every trained arm starts from the same MiniLM weights and sees the same groups in the same order (data
config ``utility_annotation_scifact``: human qrels plus, with ``--corrupt c``, top BM25 non-relevant
documents labelled positive so that a fraction c of the positives is false; defaults 1 epoch, batch 8,
group 8, lr 2e-5, documents cut at ``--max-doc-length`` tokens); only the loss differs. Ratios are against
InfoNCE at the same corruption, measured in the run. ``--json`` results accumulate across invocations
(one key per arm), so arms can run in separate processes; ``plot`` draws the figure from that file.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

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

METRICS = ("ndcg@10", "mrr@10")


def build(overrides: list[str]):
    import lightning as L
    from hydra.utils import instantiate

    cfg = compose_config(["experiment=utility_annotation_scifact", *overrides])
    L.seed_everything(cfg.seed, verbose=False)
    return cfg, instantiate(cfg.model, _convert_="all"), instantiate(cfg.data, _convert_="all")


def record(results: dict, key: str, values: dict, path: Path | None) -> None:
    results[key] = values
    print(key, json.dumps(values))
    if path is not None:
        stored = json.loads(path.read_text()) if path.exists() else {}
        stored[key] = values
        path.write_text(json.dumps(stored, indent=2, sort_keys=True))


def evaluate(module, datamodule) -> dict[str, float]:
    trainer = quiet_trainer("utility_eval_")
    trainer.test(module, datamodule, verbose=False)
    return {f"{system}/{m}": round(module.test_metrics[f"{system}/{m}"], 4)
            for system in ("retrieval", "rerank_query") for m in METRICS}


def train_arms(args) -> None:
    import lightning as L

    common = [f"model.max_doc_length={args.max_doc_length}", f"trainer.max_epochs={args.epochs}",
              f"data.group_size={args.group_size}", f"model.optimizer.lr={args.lr}", *args.override]
    if args.corpus_limit:
        common.append(f"data.corpus_limit={args.corpus_limit}")
    if args.max_steps:
        common.append(f"trainer.max_steps={args.max_steps}")
    results: dict = {}
    datamodule = None
    if args.zero_shot:
        start = time.perf_counter()
        _, module, datamodule = build([*common, "data.corrupt_fraction=0.0"])
        datamodule.setup("test")
        values = evaluate(module, datamodule)
        values["seconds"] = round(time.perf_counter() - start, 1)
        record(results, "zero_shot", values, args.json)
    for corrupt in args.corrupt:
        for loss in args.losses:
            start = time.perf_counter()
            cfg, module, fresh = build([*common, f"data.corrupt_fraction={corrupt}", f"model.loss={loss}"])
            if datamodule is None or datamodule.hparams.corrupt_fraction != corrupt:
                datamodule = fresh
                datamodule.setup("fit")
            n_false = sum(len(v) for v in datamodule.false_positives.values())
            n_pos = sum(len(v) for v in datamodule.positives.values() if v)
            L.seed_everything(cfg.seed, verbose=False)
            trainer = quiet_trainer("utility_fit_", max_epochs=cfg.trainer.max_epochs,
                                    max_steps=cfg.trainer.get("max_steps", -1))
            trainer.fit(module, datamodule)
            values = evaluate(module, datamodule)
            values.update(steps=trainer.global_step, false_positives=n_false, positives=n_pos,
                          train_queries=len(datamodule.train_rows), seconds=round(time.perf_counter() - start, 1))
            record(results, f"{loss}@{corrupt}", values, args.json)
    stored = json.loads(args.json.read_text()) if args.json and args.json.exists() else results
    report(stored)


def report(stored: dict) -> None:
    print("\narm                    retrieval nDCG@10  MRR@10   rerank nDCG@10  (ratio nDCG@10 vs InfoNCE, same c)")
    for key, v in sorted(stored.items()):
        base = stored.get(f"infonce_single@{key.split('@')[1]}") if "@" in key else None
        ratio = f"{v['retrieval/ndcg@10'] / base['retrieval/ndcg@10']:.3f}" if base else "-"
        print(f"{key:22s} {v['retrieval/ndcg@10']:.4f}            {v['retrieval/mrr@10']:.4f}   "
              f"{v['rerank_query/ndcg@10']:.4f}          {ratio}")


def plot(args) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stored = json.loads(args.json.read_text())
    arms = sorted(k for k in stored if "@" in k)
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.bar(range(len(arms)), [stored[k]["retrieval/ndcg@10"] for k in arms], color="tab:blue")
    if "zero_shot" in stored:
        ax.axhline(stored["zero_shot"]["retrieval/ndcg@10"], color="gray", ls="--", label="zero-shot MiniLM")
        ax.legend(loc="lower right")
    ax.set_xticks(range(len(arms)), arms, rotation=20)
    ax.set_ylabel("nDCG@10, 162 SciFact q")
    lo = min(stored[k]["retrieval/ndcg@10"] for k in stored) - 0.03
    ax.set_ylim(lo, None)
    save_figure(fig, ROOT / "benchmarks" / "figures" / "utility_disj_infonce.png")


def annotate(args) -> None:
    from datamodules.utility_annotation import UtilityAnnotationDataModule
    from zoo.utility_annotation.annotator import (
        Candidates,
        CausalLMBackend,
        UtilityAnnotator,
    )

    cfg = compose_config(["experiment=utility_annotation_scifact"])
    dm = UtilityAnnotationDataModule(source="beir", path=cfg.data.path, split="train", eval_fraction=0.2,
                                     candidate_pool=args.pool, seed=cfg.seed)
    dm.setup("fit")
    qids, _ = dm._split(dm.data)
    items = [Candidates(q, dm.data.queries[q], *dm.candidate_pool(q)) for q in qids[: args.queries]]
    backend = CausalLMBackend(args.backbone, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                              greedy=args.greedy, device=args.device)
    out = args.out or Path(tempfile.mkdtemp(prefix="utility_annotations_")) / "annotations.jsonl"
    start = time.perf_counter()
    records = UtilityAnnotator(backend, passage_words=args.words, batch_size=args.batch_size).run(items, out)
    seconds = time.perf_counter() - start
    summary = {"queries": len(records), "pool": args.pool, "words": args.words, "model": backend.name,
               "seconds_per_query_this_run": round(seconds / len(records), 2),
               "seconds_per_query_recorded": [r["seconds"] for r in records]}
    for field in ("relevance_ids", "utility_ids"):
        tp = fp = fn = 0
        for r in records:
            gold = {d for d, v in dm.data.qrels[r["query_id"]].items() if v > 0}
            chosen = set(r[field])
            tp, fp, fn = tp + len(gold & chosen), fp + len(chosen - gold), fn + len(gold - chosen)
        summary[field] = {"selected_per_query": round((tp + fp) / len(records), 2),
                          "precision": round(tp / (tp + fp), 3) if tp + fp else None,
                          "recall": round(tp / (tp + fn), 3) if tp + fn else None}
    # a random selection of the same size has precision = positives / pool
    summary["random_precision"] = round(sum(len([d for d, v in dm.data.qrels[r["query_id"]].items() if v > 0])
                                            for r in records) / sum(len(r["candidate_ids"]) for r in records), 3)
    for step in ("relevance", "utility_selection", "utility_ranking"):
        asked = len(records) if step == "relevance" else sum(bool(r["relevance_ids"]) for r in records)
        failed = sum(step in r["parse_failures"] for r in records)
        summary[f"parse_failure_{step}"] = f"{failed}/{asked}"
    print(json.dumps(summary, indent=2))
    print(f"annotations: {out}")
    for r in records[:2]:
        print(json.dumps({k: r[k] for k in ("query_id", "relevance_ids", "pseudo_answer", "utility_ids")})[:600])
    if args.json:
        stored = json.loads(args.json.read_text()) if args.json.exists() else {}
        stored["annotation"] = summary
        args.json.write_text(json.dumps(stored, indent=2, sort_keys=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("train", "annotate", "plot"))
    parser.add_argument("--losses", nargs="*", default=["infonce_single", "conj", "disj"])
    parser.add_argument("--corrupt", nargs="+", type=float, default=[0.5])
    parser.add_argument("--zero-shot", action="store_true")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=0, help="cap on optimizer steps (0: the epoch)")
    parser.add_argument("--max-doc-length", type=int, default=128)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--corpus-limit", type=int, default=0,
                        help="evaluate on the judged documents plus this many others (0: the whole corpus)")
    parser.add_argument("--override", nargs="*", default=[], help="more Hydra overrides for every arm")
    parser.add_argument("--queries", type=int, default=8)
    parser.add_argument("--pool", type=int, default=8)
    parser.add_argument("--words", type=int, default=80)
    parser.add_argument("--backbone", default="smollm2-135m")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--greedy", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="annotation JSONL to write or resume")
    add_common_args(parser)
    args = parse(parser)
    silence_lightning()
    {"train": train_arms, "annotate": annotate, "plot": plot}[args.command](args)


if __name__ == "__main__":
    main()
