"""BOOM's merged model against full-shuffle training, single subset models and zero-shot MiniLM.

Every arm uses the ``boom_scifact`` experiment's hyperparameters (MiniLM, 1 epoch, batch 8, group 8,
AdamW 2e-5 with linear decay, max_doc_length 128, training seed 0) on the 80% SciFact train-split
queries, from the same base weights; only the training subset differs:

- ``sub<r>-s<seed>``: one sub-model on a seeded ``r`` subset; ``sub1-s*`` is full-shuffle training on
  100% (the ``dense_scifact`` baseline's setting);
- ``boom``: the Multi-SLERP merge (equal weights, no base) of the sub-models named by ``--ratios`` (and
  ``--seeds``), reported as ``boom[<sub-models>]``;
- ``zero_shot``: MiniLM untouched.

Each model is tested on the 162 held-apart SciFact queries (in-domain) and on Cranfield's 225
queries (out of domain): nDCG@10 of full-corpus dense retrieval, plus training cost (sum of steps).
Sub-model weights and each arm's metrics are cached under ``--work`` so arms can run in separate
processes (run the sub-model arms first, then ``--arms boom zero_shot`` and ``--report``). The measured
run (CPU time) added ``--overrides model.max_doc_length=64`` to every command.

    OMP_NUM_THREADS=1 python benchmarks/boom_scifact.py --ratios 0.5 1.0 --arms sub1-s1
    OMP_NUM_THREADS=1 python benchmarks/boom_scifact.py --ratios 0.5 1.0 --arms sub0.5-s0 zero_shot
    OMP_NUM_THREADS=1 python benchmarks/boom_scifact.py --ratios 0.5 1.0 --arms boom --report
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L
from safetensors.torch import load_file, save_file

from benchmarks.common import (
    ROOT,
    add_common_args,
    compose_config,
    parse,
    save_figure,
    silence_lightning,
)
from zoo.boom.runner import SubModel, SubsetSpec, runner_from_config, training_cost

DATASETS = {"scifact": "in-domain: SciFact, 162 held-apart queries",
            "cranfield": "out-of-domain: Cranfield, 225 queries"}


class StepPrinter(L.Callback):
    def __init__(self, every: int = 10) -> None:
        self.every, self.start = every, time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % self.every == 0:
            print(f"  step {trainer.global_step}, {time.perf_counter() - self.start:.0f} s", flush=True)


def with_progress(build_trainer):
    def build(folder):
        trainer = build_trainer(folder)
        trainer.callbacks.append(StepPrinter())
        return trainer
    return build


def arm_name(spec: SubsetSpec) -> str:
    return f"sub{spec.ratio:g}-s{spec.seed}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_common_args(parser)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 1.0], help="BOOM's sub-model ratios")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="subset seeds (default: 0, 1, ...)")
    parser.add_argument("--arms", nargs="*", default=None,
                        help="arms to run (default: every sub-model, boom, zero_shot)")
    parser.add_argument("--report", action="store_true", help="print the table, write the JSON and figure")
    parser.add_argument("--work", type=Path, default=ROOT / "outputs" / "boom_scifact_bench")
    parser.add_argument("--overrides", nargs="*", default=[], help="extra train.py overrides")
    parser.add_argument("--figure", type=Path, default=ROOT / "benchmarks" / "figures" / "boom_scifact.png")
    args = parse(parser)
    silence_lightning()

    seeds = [f"boom.seeds=[{','.join(map(str, args.seeds))}]"] if args.seeds else []
    cfg = compose_config(["experiment=boom_scifact", f"boom.ratios=[{','.join(map(str, args.ratios))}]", *seeds,
                          *args.overrides])
    cranfield = compose_config(["experiment=boom_scifact", "data=cranfield"]).data
    from hydra.utils import instantiate
    args.work.mkdir(parents=True, exist_ok=True)
    runner = runner_from_config(cfg, root=args.work / "lightning")
    runner.build_trainer = with_progress(runner.build_trainer)
    # built once per process: BM25 over SciFact's corpus is a minute of CPU
    eval_data = {"scifact": instantiate(cfg.data, _convert_="all"),
                 "cranfield": instantiate(cranfield, _convert_="all")}
    specs = {arm_name(s): s for s in runner.specs}
    arms = args.arms if args.arms is not None else [*specs, "boom", "zero_shot"]

    def sub_model(name: str) -> SubModel:
        weights, info = args.work / f"{name}.safetensors", args.work / f"{name}.train.json"
        if not weights.exists():
            start = time.perf_counter()
            sub = runner.train(specs[name])
            info.write_text(json.dumps({"steps": sub.steps, "examples": sub.examples,
                                        "train_s": time.perf_counter() - start}))
            save_file(sub.state, str(weights))
            print(f"{name}: trained {sub.steps} steps on {sub.examples} queries", flush=True)
        meta = json.loads(info.read_text())
        return SubModel(specs[name], load_file(str(weights)), meta["steps"], meta["examples"])

    for arm in arms:
        name = f"boom[{'+'.join(specs)}]" if arm == "boom" else arm
        out = args.work / f"{name}.metrics.json"
        if out.exists():
            continue
        if arm in specs:
            sub = sub_model(arm)
            module, steps = runner.merged_module([sub], sub.state), sub.steps
        elif arm == "boom":
            subs = [sub_model(name) for name in specs]
            module, steps = runner.merged_module(subs), training_cost(subs, 1)["steps"]
        elif arm == "zero_shot":
            module, steps = runner.build_module().eval(), 0
        else:
            raise SystemExit(f"unknown arm '{arm}'; choose from {', '.join([*specs, 'boom', 'zero_shot'])}")
        result = {"steps": steps}
        for data_name, data in eval_data.items():
            start = time.perf_counter()
            metrics = runner.evaluate(module, data)
            result[data_name] = {k: v for k, v in metrics.items() if k.startswith("retrieval/")}
            result[f"{data_name}_eval_s"] = time.perf_counter() - start
            print(f"{arm} {data_name}: nDCG@10 {metrics['retrieval/ndcg@10']:.4f}", flush=True)
        if arm == "boom":
            module.save_pretrained(args.work / f"{name}.model", metrics=result["scifact"],
                                   data="SciFact train-split queries, 80%")
        out.write_text(json.dumps(result, indent=2))

    if args.report:
        report(args)


def report(args: argparse.Namespace) -> None:
    """Every arm measured under ``--work``: sub-models, then merges, then zero-shot."""
    files = sorted(args.work.glob("*.metrics.json"), key=lambda p: (p.name.startswith("zero_shot"),
                                                                    p.name.startswith("boom"), p.name))
    results = {p.name.removesuffix(".metrics.json"): json.loads(p.read_text()) for p in files}
    full = next((a for a in results if a.startswith("sub1-")), None)
    print(f"{'arm':<36} {'steps':>6} {'SciFact nDCG@10':>16} {'Cranfield nDCG@10':>18}  ratios to full-shuffle")
    for arm, r in results.items():
        sci, cran = r["scifact"]["retrieval/ndcg@10"], r["cranfield"]["retrieval/ndcg@10"]
        ratio = ""
        if full:
            ratio = (f"{sci / results[full]['scifact']['retrieval/ndcg@10']:.3f} / "
                     f"{cran / results[full]['cranfield']['retrieval/ndcg@10']:.3f}")
        print(f"{arm:<36} {r['steps']:>6} {sci:>16.4f} {cran:>18.4f}  {ratio}")
    summary = {"baseline": full, "datasets": DATASETS, "arms": results}
    path = args.json or ROOT / "benchmarks" / "figures" / "boom_scifact.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2))
    print(f"json: {path}")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    names = list(results)
    for ax, data_name in zip(axes, DATASETS):
        values = [results[a][data_name]["retrieval/ndcg@10"] for a in names]
        colors = ["C1" if a.startswith("boom") else "C7" if a == "zero_shot" else "C0" for a in names]
        bars = ax.bar(range(len(names)), values, color=colors)
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
        labels = [f"{a.replace('+', '+ ')}\n{results[a]['steps']} steps" for a in names]
        ax.set_xticks(range(len(names)), labels, fontsize=7, rotation=35, ha="right")
        ax.set_title(DATASETS[data_name], fontsize=9)
        ax.set_ylabel("nDCG@10")
        ax.set_ylim(min(values) * 0.9, max(values) * 1.05)
    fig.suptitle("BOOM (Multi-SLERP, equal weights) vs single models, MiniLM on SciFact", fontsize=10)
    save_figure(fig, args.figure)


if __name__ == "__main__":
    main()
