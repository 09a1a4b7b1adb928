"""Relevance patching of SmolLM2-135M-Instruct's pointwise yes/no judgments on TREC DL19 pairs.

Every DL19 query with a relevant passage (qrel >= 2) and a judged non-relevant BM25 candidate gives
one clean/corrupted pair; all are judged (LD clean/corrupted, accuracy), the first --pairs that pass
--filter are patched: resid_post / attn_out / mlp_out per layer x position group and z per layer x
head at the last position. Prints the identity check (patching a whole residual stream restores
LD_clean), the largest effects and timings, and the ratio of sweep time with and without skipping
the layers below each patch (same sweep, same pair, measured in this run). Writes heatmaps to
benchmarks/figures/relevance_patching_dl19.png.

    python benchmarks/relevance_patching.py --pairs 8 --threads 2
"""
from __future__ import annotations

import argparse
import json
import time

from benchmarks.common import (
    ROOT,
    add_common_args,
    parse,
    quiet_trainer,
    save_figure,
    silence_lightning,
)
from datamodules.relevance_pairs import RelevancePairsDataModule
from zoo.relevance_interp.module import RelevancePatchingModule

DATA = ROOT.parent / "shared" / "data" / "trec-dl-passage-bm25-top100"
GROUPS = ["last", "query_all", "doc_all", "inst_all"]


def plot(module: RelevancePatchingModule, path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grids = module.results["grids"]
    names = ["resid_post_layer", "attn_out_layer", "mlp_out_layer", "z_head"]
    fig, axes = plt.subplots(1, 4, figsize=(19, 6), gridspec_kw={"width_ratios": [1, 1, 1, 1.6]})
    for ax, name in zip(axes, names):
        effect = grids[name]["effect"]
        if effect.dim() == 3:
            effect, xlabels, xtitle = effect[..., 0], list(range(effect.shape[1])), "head (z at last position)"
        else:
            xlabels, xtitle = module.results["groups"][name], "position group"
        bound = float(effect.abs().max()) or 1.0
        image = ax.imshow(effect.numpy(), aspect="auto", cmap="RdBu", vmin=-bound, vmax=bound, origin="lower")
        ax.set_xticks(range(len(xlabels)), xlabels, rotation=45, ha="right")
        ax.set_xlabel(xtitle)
        ax.set_ylabel("layer")
        ax.set_title(name.rsplit("_", 1)[0])
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.suptitle(title)
    save_figure(fig, path)


def time_sweep(module: RelevancePatchingModule, row: dict, skip: bool) -> float:
    module.hparams.skip_unchanged_layers = skip
    pair = module.prompt_pair(row)
    runs = module.judge(pair)
    start = time.perf_counter()
    module.sweep({"site": "mlp_out", "groups": GROUPS}, pair, runs["clean_cache"], runs["corrupt_cache"])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--pairs", type=int, default=8, help="pairs to patch (all pairs are judged)")
    parser.add_argument("--filter", choices=("none", "ordered", "strict"), default="ordered")
    parser.add_argument("--judged", type=int, default=None, help="judge only the first N DL19 pairs")
    parser.add_argument("--max-doc-tokens", type=int, default=64)
    parser.add_argument("--format", choices=("pointwise", "pairwise"), default="pointwise")
    parser.add_argument("--layout", default="DQI")
    parser.add_argument("--batch-size", type=int, default=30, help="patched variants per forward")
    parser.add_argument("--figure", default="relevance_patching_dl19.png")
    args = parse(parser)
    silence_lightning()
    # "all" only for the residual stream, where it is the identity check (spec, property 1).
    experiments = [{"site": "resid_post", "groups": ["all", *GROUPS]}]
    experiments += [{"site": s, "groups": GROUPS} for s in ("attn_out", "mlp_out")]
    experiments.append({"site": "z", "groups": ["last"]})
    module = RelevancePatchingModule(backbone="smollm2-135m", format=args.format, layout=args.layout,
                                     experiments=experiments, filter=args.filter, max_patched_pairs=args.pairs,
                                     max_doc_tokens=args.max_doc_tokens, patch_batch_size=args.batch_size)
    data = RelevancePairsDataModule(source="file", path=str(DATA / "bm25_dl19_top100.jsonl"),
                                    qrels=str(DATA / "qrels_dl19.txt"), max_pairs=args.judged)
    data.setup()
    module.to(args.device)

    start = time.perf_counter()
    trainer = quiet_trainer("relevance_")
    trainer.test(module, datamodule=data, verbose=False)
    total = time.perf_counter() - start
    summary = module.results["summary"]
    print(json.dumps(summary, indent=1))
    patched = summary["patched_pairs"]
    print(f"pairs judged: {summary['pairs']}, patched: {patched}; total {total:.0f} s "
          f"({total / max(patched, 1):.0f} s per patched pair incl. judging all pairs)")
    tops = {name: module.top_effects(name, 6) for name in module.results["grids"]}
    for name, top in tops.items():
        print(f"top {name}: " + ", ".join(f"{label} {value:+.3f}" for label, value in top))

    row = data.rows[0]
    skipped, full = time_sweep(module, row, True), time_sweep(module, row, False)
    print(f"mlp_out sweep (every layer x 4 groups, one pair): skip-below-patch {skipped:.1f} s, "
          f"full forwards {full:.1f} s, ratio {full / skipped:.2f}x")
    plot(module, ROOT / "benchmarks" / "figures" / args.figure,
         f"SmolLM2-135M-Instruct, {args.format} {args.layout}, DL19: {patched} pairs, normalised patching effect "
         f"(LD_clean {summary['patched_ld_clean']:.2f}, LD_corr {summary['patched_ld_corrupt']:.2f})")
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "top": tops, "seconds": total,
                                         "sweep_seconds": {"skip": skipped, "full": full}}, indent=1))


if __name__ == "__main__":
    main()
