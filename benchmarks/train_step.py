"""Lightning train step vs a plain PyTorch loop on MiniLM, measured in one run.

Both sides train the same model (all-MiniLM-L6-v2 through ``EmbeddingEncoder``, reset to the
same weights before every run) on the same pre-tokenized synthetic batch: queries with their
positive documents, InfoNCE over in-batch negatives (``InfoNCELoss``), AdamW, the same number
of steps after the same warm-up steps. Lightning time runs from the first timed batch's
``on_train_batch_start`` to the last one's ``on_train_batch_end``, so trainer startup is left
out; the plain loop is timed over the same span. Runs alternate (plain, lightning, ...) so
machine load hits both alike. Reported: median ms/step of each side and the median over rounds
of the per-round ratio lightning/plain.

    python benchmarks/train_step.py [--steps N] [--batch-size 32] [--device cpu|cuda]
                                    [--precision 32|bf16] [--json PATH]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import random
import statistics
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import add_common_args, parse
from zoo.backbones import build_backbone
from zoo.blocks.encoder import EmbeddingEncoder
from zoo.blocks.losses import InfoNCELoss

LR = 2e-5
TEMPERATURE = 0.05
WORDS = ["cell", "protein", "gene", "expression", "patients", "study", "risk", "treatment", "cancer", "disease", "clinical", "trial", "effect", "increased", "reduced", "mice", "human", "response", "levels", "analysis", "association", "model", "data", "receptor", "signaling", "pathway", "tumor", "infection", "immune", "therapy", "dose", "outcome", "mortality"]


def synthetic_batch(tokenizer, batch_size: int, query_length: int, doc_length: int) -> dict[str, Tensor]:
    """Queries and their positive documents, tokenized once and padded to fixed lengths."""
    rng = random.Random(0)

    def text(n_words: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n_words))

    def tokens(texts: list[str], length: int) -> tuple[Tensor, Tensor]:
        enc = tokenizer(texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    q_ids, q_mask = tokens([text(rng.randint(query_length // 4, query_length)) for _ in range(batch_size)],
                           query_length)
    d_ids, d_mask = tokens([text(rng.randint(doc_length // 2, doc_length)) for _ in range(batch_size)], doc_length)
    return {"query_ids": q_ids, "query_mask": q_mask, "doc_ids": d_ids, "doc_mask": d_mask}


class ContrastiveStep(nn.Module):
    """The computation both sides train: embed queries and documents, InfoNCE in-batch."""

    def __init__(self, encoder: EmbeddingEncoder) -> None:
        super().__init__()
        self.encoder = encoder
        self.loss = InfoNCELoss(TEMPERATURE)

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        queries = self.encoder(batch["query_ids"], batch["query_mask"])
        docs = self.encoder(batch["doc_ids"], batch["doc_mask"])
        return self.loss(queries, docs)


class LitContrastive(L.LightningModule):
    def __init__(self, step: ContrastiveStep) -> None:
        super().__init__()
        self.step = step

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self.step(batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=LR)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer(L.Callback):
    """Wall time from the start of batch ``warmup`` to the end of batch ``warmup + steps - 1``."""

    def __init__(self, warmup: int, steps: int, device: torch.device) -> None:
        self.first, self.last, self.device = warmup, warmup + steps - 1, device
        self.start = self.seconds = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if batch_idx == self.first:
            synchronize(self.device)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if batch_idx == self.last:
            synchronize(self.device)
            self.seconds = time.perf_counter() - self.start


def loader(batch: dict[str, Tensor], n: int) -> DataLoader:
    # batch_size=None hands each stored batch through as it is.
    return DataLoader([batch] * n, batch_size=None)


def run_lightning(step: ContrastiveStep, batch: dict[str, Tensor], args: argparse.Namespace,
                  device: torch.device) -> float:
    timer = StepTimer(args.warmup, args.steps, device)
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu", devices=1,
        precision="bf16-mixed" if args.precision == "bf16" else "32-true",
        max_steps=args.warmup + args.steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
    )
    trainer.fit(LitContrastive(step), train_dataloaders=loader(batch, args.warmup + args.steps))
    return timer.seconds / args.steps


def run_plain(step: ContrastiveStep, batch: dict[str, Tensor], args: argparse.Namespace,
              device: torch.device) -> float:
    step.to(device).train()
    optimizer = torch.optim.AdamW(step.parameters(), lr=LR)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16"
                else contextlib.nullcontext())
    first, last = args.warmup, args.warmup + args.steps - 1
    start = 0.0
    for i, cpu_batch in enumerate(loader(batch, args.warmup + args.steps)):
        batch_on_device = {k: v.to(device) for k, v in cpu_batch.items()}
        if i == first:
            synchronize(device)
            start = time.perf_counter()
        with autocast:
            loss = step(batch_on_device)
        # Lightning's order: zero the gradients, backward, then step.
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i == last:
            synchronize(device)
    return (time.perf_counter() - start) / args.steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    parser.add_argument("--rounds", type=int, default=5, help="runs of each side, alternated")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--query-length", type=int, default=16, help="query tokens (padded)")
    parser.add_argument("--doc-length", type=int, default=64, help="document tokens (padded)")
    parser.add_argument("--precision", choices=("32", "bf16"), default="32")
    add_common_args(parser)
    args = parse(parser)

    # Keep the table readable: Lightning's startup notes and dataloader hints are not results.
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")

    device = torch.device(args.device)
    backbone, tokenizer = build_backbone("minilm")
    step = ContrastiveStep(EmbeddingEncoder(backbone, tokenizer, pooling="mean", normalize=True))
    batch = synthetic_batch(tokenizer, args.batch_size, args.query_length, args.doc_length)
    initial = {k: v.clone() for k, v in step.state_dict().items()}

    sides = {"plain": run_plain, "lightning": run_lightning}
    per_step: dict[str, list[float]] = {name: [] for name in sides}
    print(f"MiniLM, batch {args.batch_size} (query {args.query_length} + doc {args.doc_length} tokens), "
          f"device {args.device}, precision {args.precision}, {args.warmup} warm-up + {args.steps} timed steps, "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'round':>5}  {'side':<10} {'ms/step':>9} {'L/plain':>8}")
    ratios = []
    for round_ in range(1, args.rounds + 1):
        for name, run in sides.items():
            step.load_state_dict(initial)
            torch.manual_seed(0)  # same dropout masks on both sides
            seconds = run(step, batch, args, device)
            per_step[name].append(seconds)
            ratio_col = ""
            if name == "lightning":
                ratios.append(seconds / per_step["plain"][-1])
                ratio_col = f"{ratios[-1]:>8.3f}"
            print(f"{round_:>5}  {name:<10} {seconds * 1e3:>9.1f} {ratio_col}", flush=True)

    median = {name: statistics.median(times) for name, times in per_step.items()}
    # Per-round ratios pair runs taken back to back, so load that drifts between rounds cancels.
    ratio = statistics.median(ratios)
    print(f"median ms/step: plain {median['plain'] * 1e3:.1f}, lightning {median['lightning'] * 1e3:.1f}")
    print(f"ratio lightning/plain (median over rounds): {ratio:.2f} (goal <= 1.02)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "batch_size": args.batch_size, "query_length": args.query_length, "doc_length": args.doc_length,
            "device": args.device, "precision": args.precision, "warmup": args.warmup, "steps": args.steps,
            "torch_threads": torch.get_num_threads(), "seconds_per_step": per_step,
            "median_seconds_per_step": median, "ratio_lightning_over_plain_per_round": ratios,
            "ratio_lightning_over_plain": ratio,
        }, indent=2))


if __name__ == "__main__":
    main()
