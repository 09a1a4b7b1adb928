"""Agentic-R on the synthetic world with distractors: a retriever trained on agent utility against the same
encoder trained on relevance or similarity labels, and against the bag-of-words baseline.

    OMP_NUM_THREADS=1 python benchmarks/agentic_r_utility.py [--query-styles entity relation] [--seeds 0 1]

Every trained retriever is the same tiny word-level encoder (2 layers, d = 64, mean pooling, "query: Q [SEP]
q" input, temperature 0.05), from the same initial weights, trained the same way (8 epochs, 16 groups of 8
per step, AdamW 1e-3) on groups labelled from the same scripted-agent trajectories over the training
questions, retrieved with the bag-of-words baseline (iteration 0). Only the labels differ:

- ``similarity``: positives = the passages most similar to the query (the heuristic judge without
  sub-answers), no answer check: a relevance retriever's usual weak labels;
- ``relevance``: local relevance only (judge with the gold sub-answer; the paper's "without GAC");
- ``utility``: Agentic-R's lexicographic (GAC, LR) rule, GAC by replaying the agent;
- ``utility_it2``: a second iteration, labelled through the iteration-1 retriever with its Q [SEP] q input.

The scripted agent then answers the questions the labels never came from (validation + test splits)
through each retriever; EM / F1 at top-3 (the paper's setting) and top-1 passages per search, and per
search whether the rank-1 passage is the hop's support passage (useful@1) or a distractor. Ratios are
against the bag-of-words retriever (query q alone, the paper's iteration-0 E5 input) measured in the run.
``--query-styles``: ``relation`` searches "relation words + entity"; ``entity`` the bare entity, an
under-specified query whose intent only the original question carries.
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
from benchmarks.common import add_common_args, parse, save_figure
from datamodules.agentic_qa import AgenticQADataModule
from zoo.agentic_r.agents import (
    ScriptedSearchAgent,
    SearchTool,
    evaluate_agent,
    mean_metrics,
)
from zoo.agentic_r.iterate import AgenticRIteration
from zoo.agentic_r.labeling import HeuristicJudge
from zoo.agentic_r.module import AgenticRetrieverModule
from zoo.blocks.search_env import SearchEnvironment, passages_from_records

WORLD = {"people": 100, "cities": 30, "countries": 8, "companies": 20, "distractors_per_person": 3, "seed": 0}
ENCODER = {"backbone": "tiny-llama-world", "temperature": 0.05, "max_query_length": 48, "max_passage_length": 32,
           "optimizer": {"name": "AdamW", "lr": 1e-3, "weight_decay": 0.01},
           "scheduler": {"name": "linear", "warmup_ratio": 0.1}}
LABELS = {
    "similarity": (HeuristicJudge(use_sub_answers=False), {"selection": "relevance", "lr_threshold": 0.0}),
    "relevance": (HeuristicJudge(), {"selection": "relevance"}),
    "utility": (HeuristicJudge(), {"selection": "lexicographic"}),
}
KS = (3, 1)


def evaluate(agent, env: SearchEnvironment, query_format: str, questions) -> dict[str, float]:
    out = {}
    for k in KS:
        metrics = mean_metrics(evaluate_agent(agent, SearchTool(env, query_format, k), questions))
        out.update({f"{name}@k{k}": value for name, value in metrics.items() if name != "searches_per_question"})
    return out


def run_style(style: str, seed: int, epochs: int) -> dict[str, dict[str, float]]:
    qa = AgenticQADataModule(source="world", world=WORLD, train_fraction=0.6, seed=0)
    corpus = qa.load()[1]
    train, unseen = qa.samples("train"), qa.samples("val") + qa.samples("test")
    agent = ScriptedSearchAgent(query_style=style)
    results: dict[str, dict[str, float]] = {}
    bow = SearchEnvironment(*passages_from_records(corpus), retriever="bow")
    results["bow(q)"] = evaluate(agent, bow, "q", unseen)
    results["bow(Q+q)"] = evaluate(agent, bow, "Q+q", unseen)
    L.seed_everything(seed, verbose=False)
    untrained = AgenticRetrieverModule(**ENCODER).search_tool(corpus)
    results["untrained"] = evaluate(agent, untrained.env, "Q+q", unseen)
    for name, (judge, labeler) in LABELS.items():
        started = time.perf_counter()
        runner = AgenticRIteration(corpus, train, module=ENCODER, data={"group_size": 8, "batch_size": 16},
                                   labeler=labeler, trainer={"max_epochs": epochs}, agent={"query_style": style},
                                   judge=judge, iterations=2 if name == "utility" else 1, seed=seed)
        for record in runner.run():
            label = name if record.iteration == 0 else f"{name}_it{record.iteration + 1}"
            results[label] = {**evaluate(agent, record.tool.env, "Q+q", unseen), "groups": len(record.groups)}
        print(f"  [{style} seed {seed}] {name}: {time.perf_counter() - started:.0f}s", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--query-styles", nargs="+", default=["entity", "relation"], choices=["entity", "relation"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--figure", type=Path, default=Path(__file__).parent / "figures" / "agentic_r_utility.png")
    add_common_args(parser)
    args = parse(parser)
    started = time.perf_counter()
    table: dict[str, dict[str, dict[str, list[float]]]] = {}
    for style in args.query_styles:
        for seed in args.seeds:
            for arm, metrics in run_style(style, seed, args.epochs).items():
                for name, value in metrics.items():
                    table.setdefault(style, {}).setdefault(arm, {}).setdefault(name, []).append(value)
    columns = ["em@k3", "f1@k3", "em@k1", "useful_at_1@k3", "distractor_at_1@k3", "groups"]
    summary = {}
    for style, arms in table.items():
        base = statistics.mean(arms["bow(q)"]["em@k1"])
        print(f"\nquery style '{style}': mean over seeds {args.seeds} (± std); EM ratio vs bow(q) at top-1")
        print(f"{'retriever':<14}" + "".join(f"{c:>20}" for c in columns) + f"{'EM@k1 ratio':>14}")
        for arm, metrics in arms.items():
            cells = []
            for c in columns:
                values = metrics.get(c)
                if not values:
                    cells.append(f"{'-':>20}")
                    continue
                spread = statistics.pstdev(values) if len(values) > 1 else 0.0
                cells.append(f"{statistics.mean(values):>13.3f} ±{spread:.3f}")
            ratio = statistics.mean(metrics["em@k1"]) / base if base else float("nan")
            print(f"{arm:<14}" + "".join(cells) + f"{ratio:>14.2f}")
            summary.setdefault(style, {})[arm] = {c: statistics.mean(v) for c, v in metrics.items()}
    print(f"\ntotal {time.perf_counter() - started:.0f}s")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    plot(summary, args.figure)


def plot(summary: dict[str, dict[str, dict[str, float]]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(summary), figsize=(6.5 * len(summary), 4), squeeze=False)
    for ax, (style, arms) in zip(axes[0], summary.items()):
        names = list(arms)
        x = torch.arange(len(names)).float()
        for offset, (metric, label) in zip((-0.27, 0.0, 0.27), (("em@k3", "EM, top-3"), ("em@k1", "EM, top-1"),
                                                                 ("distractor_at_1@k3", "distractor at rank 1"))):
            ax.bar(x + offset, [arms[n][metric] for n in names], width=0.27, label=label)
        ax.set_xticks(x.tolist(), names, rotation=30, ha="right")
        ax.set_ylim(0, 1.05)
        ax.set_title(f"scripted agent, '{style}' queries, unseen questions")
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.32), ncol=3)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
