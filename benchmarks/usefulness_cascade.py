"""CLUE cascade vs a single-prompt labeller on generated session logs, and satisfaction prediction
from oracle labels vs CLUE labels vs behaviour alone.

Part 1 (agreement): every labeller labels the same generated queries; the table gives accuracy,
kappa, quadratic-weighted kappa, Pearson, Spearman and MAE against the users' (gold) usefulness,
LLM calls per query and seconds, and each cascade's weighted-kappa gain over the single-prompt
labeller with the same judge (measured in this run). Judges: oracle, the tiny random judge and
SmolLM2-135M-Instruct (pointwise yes/no stages, 5 seeded votes) on the first ``--smollm2-queries``
(CPU-heavy: about 4 CPU-seconds per prompt); ``--setwise-queries`` adds the official code's setwise
generation cascade with SmolLM2 on the first few queries.

Part 2 (satisfaction): a SatisfactionPredictor (MLP, 50 epochs) trained on half the queries with
features from each label source (+ behaviour), tested on the other half; behaviour-only as the
baseline. On the Part 1 queries (one 50/50 split) and averaged over ``--seeds`` generated logs of
``--sat-queries`` queries. SmolLM2 labels are too slow on CPU to label enough queries for this.

    python benchmarks/usefulness_cascade.py --threads 1 --json /tmp/usefulness.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (
    ROOT,
    add_common_args,
    parse,
    quiet_trainer,
    save_figure,
    silence_lightning,
)
from datamodules.usefulness import SatisfactionDataModule, generate_sessions
from zoo.usefulness_labels import CLUEModule, SatisfactionPredictor, agreement
from zoo.usefulness_labels.satisfaction import gbdt_baseline

COLUMNS = ("accuracy", "kappa", "weighted_kappa", "pearson", "spearman", "mae")


def label_all(judge: CLUEModule, queries: list[dict[str, Any]], batch_size: int = 8) -> tuple[list[list[int]], float]:
    calls = []
    labels: list[list[int]] = []
    for start in range(0, len(queries), batch_size):
        out = judge.label(queries[start:start + batch_size])
        labels += out["labels"]
        calls += out["calls"]
    return labels, sum(calls) / len(calls)


def agreement_of(labels: list[list[int]], queries: list[dict[str, Any]], levels: list[int]) -> dict[str, float]:
    pred = [p for row in labels for p in row]
    gold = [d["usefulness"] for q in queries for d in q["docs"]]
    return agreement(pred, gold, levels)


class GivenLabels(SatisfactionDataModule):
    """Satisfaction data whose usefulness labels come from a labeller run earlier."""

    def __init__(self, given: dict[str, list[int]], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.given = given

    def labels_for(self, queries: list[dict[str, Any]]) -> list[list[int]]:
        return [self.given[q["qid"]] for q in queries]


def satisfaction_scores(dm: SatisfactionDataModule, features: str, epochs: int, seed: int) -> dict[str, float]:
    dm.setup()
    model = SatisfactionPredictor(features=features, optimizer={"name": "Adam", "lr": 0.01}, seed=seed)
    trainer = quiet_trainer("usefulness_sat_", max_epochs=epochs)
    trainer.fit(model, datamodule=dm)
    trainer.test(model, datamodule=dm, verbose=False)
    return {k.split("/")[1]: v for k, v in model.test_metrics.items()}


def gbdt_scores(dm: SatisfactionDataModule, seed: int) -> dict[str, float]:
    from zoo.usefulness_labels.metrics import pearson, spearman

    dm.setup()
    x = {s: torch.cat([dm.sets[s]["label_features"], dm.sets[s]["behaviour_features"]], -1).numpy() for s in dm.sets}
    y = {s: dm.sets[s]["satisfaction"].numpy() for s in dm.sets}
    pred = gbdt_baseline(x["train"], y["train"], x["test"], seed=seed)
    return {"pearson": pearson(pred, y["test"]), "spearman": spearman(pred, y["test"]),
            "mae": float(np.abs(pred - y["test"]).mean())}


def run_judges(judges: list[tuple[str, dict]], queries: list[dict[str, Any]], levels: list[int], device: str,
               rows: dict[str, dict[str, Any]], labels_by: dict[str, dict[str, list[int]]]) -> None:
    for name, kwargs in judges:
        torch.manual_seed(0)
        judge = CLUEModule(levels=levels, **kwargs)
        if device == "cuda":
            judge = judge.cuda()
        start = time.perf_counter()
        labels, calls = label_all(judge, queries, batch_size=4 if kwargs.get("stage_classifier") == "setwise_generate"
                                  else 8)
        seconds = time.perf_counter() - start
        rows[name] = {**agreement_of(labels, queries, levels), "calls_per_query": calls, "seconds": seconds,
                      "queries": len(queries)}
        labels_by[name] = {q["qid"]: lab for q, lab in zip(queries, labels)}
        print(f"  {name}: {seconds:.1f} s", flush=True)


def print_agreement(rows: dict[str, dict[str, Any]], levels: list[int]) -> None:
    print(f"\nagreement with gold usefulness ({'/'.join(map(str, levels))})")
    print(f"{'labeller':<30}" + "".join(f"{c:>15}" for c in COLUMNS) + f"{'calls/q':>9}{'seconds':>9}{'queries':>8}")
    for name, r in rows.items():
        print(f"{name:<30}" + "".join(f"{r[c]:>15.3f}" for c in COLUMNS)
              + f"{r['calls_per_query']:>9.1f}{r['seconds']:>9.1f}{r['queries']:>8}")
    for judge in ("tiny", "smollm2"):
        if f"{judge} cascade" in rows and f"{judge} single-prompt" in rows:
            a, b = rows[f"{judge} cascade"], rows[f"{judge} single-prompt"]
            print(f"{judge}: cascade - single-prompt weighted kappa = {a['weighted_kappa'] - b['weighted_kappa']:+.3f}, "
                  f"Spearman {a['spearman'] - b['spearman']:+.3f}, MAE {a['mae'] - b['mae']:+.3f}", flush=True)


def draw(rows: dict[str, dict[str, Any]], multi: dict[str, list[float]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    names = list(rows)
    x = np.arange(len(names))
    for i, metric in enumerate(("weighted_kappa", "spearman", "accuracy")):
        left.bar(x + (i - 1) * 0.27, [rows[n][metric] for n in names], 0.27, label=metric)
    left.set_xticks(x, [f"{n}\n({rows[n]['queries']} q)" for n in names], rotation=25, ha="right", fontsize=8)
    left.set_title("agreement with gold usefulness (generated logs)")
    left.axhline(0, color="black", lw=0.6)
    left.legend(fontsize=8)
    names = list(multi)
    right.barh(np.arange(len(names)), [statistics.mean(multi[n]) for n in names],
               xerr=[statistics.stdev(multi[n]) if len(multi[n]) > 1 else 0.0 for n in names])
    right.set_yticks(np.arange(len(names)), names, fontsize=8)
    right.set_title(f"satisfaction prediction: test Pearson (mean +- sd, {len(next(iter(multi.values())))} logs)")
    right.axvline(0, color="black", lw=0.6)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--queries", type=int, default=40, help="generated queries for the oracle and tiny judges")
    parser.add_argument("--smollm2-queries", type=int, default=10, help="the first N of them for SmolLM2 (0 = skip)")
    parser.add_argument("--setwise-queries", type=int, default=0, help="queries for the SmolLM2 setwise cascade")
    parser.add_argument("--sat-queries", type=int, default=200)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--figure", default=str(ROOT / "benchmarks" / "figures" / "usefulness_cascade.png"))
    args = parse(parser)
    silence_lightning()
    levels = [0, 1, 2, 3, 4]
    queries = generate_sessions(args.queries, levels=levels, seed=0)
    print(f"{len(queries)} generated queries, {sum(len(q['docs']) for q in queries)} clicked documents")
    results: dict[str, Any] = {"agreement": {}, "satisfaction": {}, "satisfaction_multi_seed": {}}

    def dump() -> None:
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))

    # -- part 1: cheap judges on every query -----------------------------------------------------------
    rows, labels_by = results["agreement"], {}
    run_judges([("oracle cascade", dict(stage_classifier="oracle")),
                ("tiny cascade", dict(stage_classifier="pointwise_logit")),
                ("tiny single-prompt", dict(stage_classifier="pointwise_logit", method="single_prompt"))],
               queries, levels, args.device, rows, labels_by)
    print_agreement(rows, levels)
    dump()

    # -- part 2: satisfaction on the part-1 queries (one split) --------------------------------------
    common = dict(levels=levels, synthetic={"num_queries": args.queries}, seed=0)
    sat = results["satisfaction"]
    for name, given in {"gold labels + behaviour": None, "tiny cascade labels + behaviour": labels_by["tiny cascade"],
                        "tiny single-prompt labels + behaviour": labels_by["tiny single-prompt"]}.items():
        dm = SatisfactionDataModule(**common) if given is None else GivenLabels(given, **common)
        sat[name] = satisfaction_scores(dm, "all", args.epochs, seed=0)
    sat["gold labels only"] = satisfaction_scores(SatisfactionDataModule(**common), "labels", args.epochs, seed=0)
    sat["behaviour only"] = satisfaction_scores(SatisfactionDataModule(**common), "behaviour", args.epochs, seed=0)
    sat["GBDT gold labels + behaviour"] = gbdt_scores(SatisfactionDataModule(**common), seed=0)
    print(f"\nsatisfaction prediction, {args.queries} queries split 50/50 (test Pearson / Spearman / MAE)")
    base = sat["behaviour only"]["pearson"]
    for name, r in sat.items():
        print(f"{name:<40}{r['pearson']:>9.3f}{r['spearman']:>9.3f}{r['mae']:>9.3f}   Pearson - behaviour-only "
              f"{r['pearson'] - base:+.3f}")
    dump()

    # -- part 2b: the cheap label sources averaged over larger generated logs ----------------------------
    multi = results["satisfaction_multi_seed"]
    for name in ("gold labels + behaviour", "gold labels only", "tiny cascade labels + behaviour", "behaviour only"):
        multi[name] = []
    for seed in range(args.seeds):
        cfg = dict(levels=levels, synthetic={"num_queries": args.sat_queries}, seed=seed)
        multi["gold labels + behaviour"].append(
            satisfaction_scores(SatisfactionDataModule(**cfg), "all", args.epochs, seed)["pearson"])
        multi["gold labels only"].append(
            satisfaction_scores(SatisfactionDataModule(**cfg), "labels", args.epochs, seed)["pearson"])
        torch.manual_seed(seed)
        dm = SatisfactionDataModule(label_source="clue", clue={"stage_classifier": "pointwise_logit", "seed": seed},
                                    **cfg)
        multi["tiny cascade labels + behaviour"].append(satisfaction_scores(dm, "all", args.epochs, seed)["pearson"])
        multi["behaviour only"].append(
            satisfaction_scores(SatisfactionDataModule(**cfg), "behaviour", args.epochs, seed)["pearson"])
    print(f"\nsatisfaction test Pearson, {args.sat_queries} queries (50/50) x {args.seeds} seeds (mean +- sd)")
    for name, values in multi.items():
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"{name:<40}{statistics.mean(values):>9.3f} +- {sd:.3f}", flush=True)
    dump()
    draw(rows, multi, Path(args.figure))

    # -- part 3: SmolLM2-135M-Instruct as the judge on the first queries (CPU-heavy) --------------------
    if args.smollm2_queries:
        subset = queries[:args.smollm2_queries]
        for name in ("oracle cascade", "tiny cascade", "tiny single-prompt"):   # the same subset, for reference
            labels = [labels_by[name][q["qid"]] for q in subset]
            rows[f"{name} (subset)"] = {**agreement_of(labels, subset, levels), "queries": len(subset),
                                        "calls_per_query": rows[name]["calls_per_query"], "seconds": 0.0}
        smol = [("smollm2 single-prompt", dict(backbone="smollm2-135m", method="single_prompt")),
                ("smollm2 cascade", dict(backbone="smollm2-135m", stage_classifier="pointwise_logit"))]
        for judge in smol:
            run_judges([judge], subset, levels, args.device, rows, labels_by)
            dump()
        if args.setwise_queries:
            run_judges([("smollm2 setwise cascade", dict(backbone="smollm2-135m", stage_classifier="setwise_generate",
                                                         max_new_tokens=96))],
                       queries[:args.setwise_queries], levels, args.device, rows, labels_by)
        print_agreement(rows, levels)
        dump()
        draw(rows, multi, Path(args.figure))


if __name__ == "__main__":
    main()
