"""Zoo encoding vs sentence-transformers on all-MiniLM-L6-v2, measured in one run.

Both encode the same real texts (the first N SciFact documents, title + " " + text) with the
same weights, max_seq_length, batch size and device. Both are warmed up first, then run in
alternation (zoo, ST, zoo, ST, ...) so machine load hits both alike. Reported: median texts/s
of each side and the median over rounds of the per-round speed ratio zoo/ST.

    python benchmarks/encode.py [--n 1000] [--corpus PATH] [--batch-size 32] [--device cpu|cuda] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from sentence_transformers import SentenceTransformer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import add_common_args, parse
from zoo.backbones import build_backbone, minilm_path
from zoo.blocks.encoder import EmbeddingEncoder
from zoo.paths import shared_data_dir

MAX_SEQ_LENGTH = 256
AGREEMENT = 1e-4


def read_texts(path: Path, n: int) -> list[str]:
    texts = []
    with path.open() as f:
        for line in f:
            doc = json.loads(line)
            texts.append(doc.get("title", "") + " " + doc.get("text", ""))
            if len(texts) == n:
                break
    return texts


def timed(fn, device: torch.device) -> tuple[float, torch.Tensor]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=None,
                        help="BEIR corpus.jsonl (default: SciFact under the shared data folder)")
    parser.add_argument("--n", type=int, default=1000, help="number of documents to encode")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="timed runs of each side, alternated")
    add_common_args(parser)
    args = parse(parser)

    corpus = args.corpus or shared_data_dir() / "beir-scifact" / "corpus.jsonl"
    texts = read_texts(corpus, args.n)
    device = torch.device(args.device)

    backbone, tokenizer = build_backbone("minilm")
    zoo = EmbeddingEncoder(backbone, tokenizer, pooling="mean", normalize=True,
                           max_length=MAX_SEQ_LENGTH).to(device)
    st = SentenceTransformer(str(minilm_path()), device=args.device)
    st.max_seq_length = MAX_SEQ_LENGTH

    sides = {
        "zoo": lambda items: zoo.encode(items, batch_size=args.batch_size),
        "sentence-transformers": lambda items: st.encode(items, batch_size=args.batch_size,
                                                         convert_to_tensor=True).cpu(),
    }
    warmup = texts[: 2 * args.batch_size]
    for encode in sides.values():
        encode(warmup)

    seconds: dict[str, list[float]] = {name: [] for name in sides}
    embeddings: dict[str, torch.Tensor] = {}
    print(f"{len(texts)} texts from {corpus}, batch {args.batch_size}, max_seq_length {MAX_SEQ_LENGTH}, "
          f"device {args.device}, torch threads {torch.get_num_threads()}")
    print(f"{'round':>5}  {'side':<22} {'seconds':>8} {'texts/s':>8} {'zoo/ST':>7}")
    ratios = []
    for round_ in range(1, args.rounds + 1):
        for name, encode in sides.items():
            elapsed, embeddings[name] = timed(lambda encode=encode: encode(texts), device)
            seconds[name].append(elapsed)
            ratio_col = ""
            if name == "sentence-transformers":
                ratios.append(elapsed / seconds["zoo"][-1])
                ratio_col = f"{ratios[-1]:>7.2f}"
            print(f"{round_:>5}  {name:<22} {elapsed:>8.2f} {len(texts) / elapsed:>8.1f} {ratio_col}", flush=True)

    speed = {name: len(texts) / statistics.median(times) for name, times in seconds.items()}
    # Per-round ratios pair runs taken back to back, so load that drifts between rounds cancels.
    ratio = statistics.median(ratios)
    diff = (embeddings["zoo"] - embeddings["sentence-transformers"]).abs().max().item()
    print(f"median texts/s: zoo {speed['zoo']:.1f}, sentence-transformers {speed['sentence-transformers']:.1f}")
    print(f"max abs diff of embeddings: {diff:.2e} (must be < {AGREEMENT:g})")
    print(f"ratio zoo/sentence-transformers (median over rounds): {ratio:.2f} (goal >= 1.2)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "n_texts": len(texts), "corpus": str(corpus), "batch_size": args.batch_size,
            "max_seq_length": MAX_SEQ_LENGTH, "device": args.device, "torch_threads": torch.get_num_threads(),
            "seconds": seconds, "median_texts_per_s": speed, "ratio_zoo_over_st_per_round": ratios,
            "ratio_zoo_over_st": ratio,
            "max_abs_diff": diff,
        }, indent=2))
    if diff >= AGREEMENT:
        sys.exit(f"embeddings disagree: max abs diff {diff:.2e} >= {AGREEMENT:g}")


if __name__ == "__main__":
    main()
