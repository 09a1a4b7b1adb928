"""EntroDrop: step time with vs without it, and held-apart loss over many epochs with vs without it.

Step time: ``causal_lm`` (``--backbone``, default tiny-llama) trains through Lightning on one
fixed generated batch (``--batch-size`` x ``--block-size`` tokens) for ``--warmup`` + ``--steps``
steps, without the callback and with it at a constant ``p`` (the pre-pass runs at every step, as
it does under the default curriculum after step 0, where ``p(0) = 0`` skips it). A step is timed
from its ``on_train_batch_start`` (before EntroDrop's pre-pass) to its ``on_train_batch_end``.
Runs alternate; reported is the median over rounds of the per-round ratio (goal <= 1.4).

Curves (``--curves``): ``train.py experiment=entrodrop_baseline`` and ``entrodrop_multiepoch``
(input mode), plus a loss-mode arm, a stronger one, and random-dropout (gamma = 1) arms at the
same expected drop rates, for every ``--seeds``;
each run's lm_history.jsonl gives the validation loss per epoch on template and content tokens
(the generator's ground truth). Printed per arm (mean over seeds): final and minimum loss, the
epoch of the content-token minimum and the rebound after it; the figure goes to
benchmarks/figures/entrodrop_multiepoch.png.

    OMP_NUM_THREADS=1 python benchmarks/technique_entrodrop.py [--steps 20] [--rounds 5] [--device cpu|cuda]
                                                               [--backbone tiny-llama] [--curves --seeds 0 1 2]
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import add_common_args, parse, save_figure
from callbacks.entrodrop import EntroDrop
from datamodules.text import TextDataModule
from zoo.causal_lm import CausalLMModule

# name -> (experiment, extra overrides). The final expected drop fraction is gamma * p_max: each
# random-dropout arm (gamma = 1) matches one EntroDrop arm's rate, so selection is compared at equal strength.
ARMS = {
    "baseline": ("entrodrop_baseline", []),
    "EntroDrop input g.5 p.3": ("entrodrop_multiepoch", []),
    "EntroDrop loss g.5 p.3": ("entrodrop_multiepoch", ["callbacks.entrodrop.mode=loss"]),
    "random input g1 p.15": ("entrodrop_multiepoch",
                             ["callbacks.entrodrop.gamma=1.0", "callbacks.entrodrop.p_max=0.15"]),
    "EntroDrop input g.5 p.6": ("entrodrop_multiepoch", ["callbacks.entrodrop.p_max=0.6"]),
    "random input g1 p.3": ("entrodrop_multiepoch", ["callbacks.entrodrop.gamma=1.0"]),
}


class StepTimer(L.Callback):
    """Seconds per step over the steps after ``warmup``; put it first so it starts before EntroDrop."""

    def __init__(self, warmup: int, device: torch.device) -> None:
        self.warmup, self.device, self.times, self.start = warmup, device, [], 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self._sync()
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._sync()
        if batch_idx >= self.warmup:
            self.times.append(time.perf_counter() - self.start)


def time_steps(args: argparse.Namespace, batch: dict, initial: dict, with_entrodrop: bool) -> float:
    device = torch.device(args.device)
    torch.manual_seed(0)
    module = CausalLMModule(backbone=args.backbone, optimizer={"name": "AdamW", "lr": 1e-4})
    module.load_state_dict(initial)
    timer = StepTimer(args.warmup, device)
    callbacks = [timer] + ([EntroDrop(gamma=0.5, p_max=0.3, schedule="constant")] if with_entrodrop else [])
    trainer = L.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1,
                        precision="bf16-mixed" if args.device == "cuda" else "32-true",
                        max_steps=args.warmup + args.steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
    trainer.fit(module, train_dataloaders=DataLoader([batch] * (args.warmup + args.steps), batch_size=None))
    return statistics.median(timer.times)


def step_time(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    reference = CausalLMModule(backbone=args.backbone)
    data = TextDataModule(num_train=args.batch_size, num_val=1, num_test=1, block_size=args.block_size,
                          batch_size=args.batch_size)
    data.tokenizer = reference.tokenizer
    data.setup("fit")
    batch = {k: v for k, v in next(iter(data.train_dataloader())).items() if k != "token_kind"}
    initial = {k: v.clone() for k, v in reference.state_dict().items()}
    print(f"causal_lm {args.backbone}, batch {args.batch_size} x {args.block_size} tokens, device {args.device}, "
          f"{args.warmup} warm-up + {args.steps} timed steps, torch threads {torch.get_num_threads()}")
    print(f"{'round':>5} {'without ms':>11} {'with ms':>9} {'ratio':>7}")
    times = {"without": [], "with": []}
    ratios = []
    for round_ in range(1, args.rounds + 1):
        times["without"].append(time_steps(args, batch, initial, False))
        times["with"].append(time_steps(args, batch, initial, True))
        ratios.append(times["with"][-1] / times["without"][-1])
        print(f"{round_:>5} {times['without'][-1] * 1e3:>11.1f} {times['with'][-1] * 1e3:>9.1f} {ratios[-1]:>7.3f}",
              flush=True)
    ratio = statistics.median(ratios)
    print(f"median ms/step: without {statistics.median(times['without']) * 1e3:.1f}, "
          f"with {statistics.median(times['with']) * 1e3:.1f}")
    print(f"ratio with/without EntroDrop (median over rounds): {ratio:.3f} (goal <= 1.4)")
    return {"backbone": args.backbone, "batch_size": args.batch_size, "block_size": args.block_size,
            "device": args.device, "seconds_per_step": times, "ratios": ratios, "ratio": ratio}


def run_arm(experiment: str, overrides: list[str], seed: int, folder: Path) -> list[dict]:
    cmd = [sys.executable, str(ROOT / "train.py"), f"experiment={experiment}", f"seed={seed}", *overrides,
           "logger=none", "save_model=false", "test_after_fit=false", f"hydra.run.dir={folder}"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr[-3000:]}")
    return [json.loads(line) for line in (folder / "lm_history.jsonl").read_text().splitlines()]


def summarise(history: list[dict]) -> dict:
    content = [r["val/loss_content"] for r in history]
    best = min(range(len(content)), key=content.__getitem__)
    return {"final_loss": history[-1]["val/loss"], "min_loss": min(r["val/loss"] for r in history),
            "final_content": content[-1], "min_content": content[best], "min_content_epoch": best + 1,
            "content_rebound": content[-1] - content[best], "final_template": history[-1]["val/loss_template"]}


def curves(args: argparse.Namespace) -> dict:
    histories: dict[str, list[list[dict]]] = {name: [] for name in ARMS}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for index, (name, (experiment, overrides)) in enumerate(ARMS.items()):
                started = time.perf_counter()
                histories[name].append(run_arm(experiment, overrides, seed, Path(tmp) / f"s{seed}-{index}"))
                print(f"seed {seed} {name}: {time.perf_counter() - started:.0f} s", flush=True)
    keys = ("final_loss", "min_loss", "final_content", "min_content", "min_content_epoch", "content_rebound",
            "final_template")
    print(f"\nvalidation loss (nats/token), mean over seeds {args.seeds}")
    print(f"{'arm':<26}" + "".join(f"{k:>18}" for k in keys))
    table = {}
    for name, runs in histories.items():
        rows = [summarise(h) for h in runs]
        table[name] = {k: statistics.mean(r[k] for r in rows) for k in keys}
        table[name]["per_seed"] = rows
        print(f"{name:<26}" + "".join(f"{table[name][k]:>18.4f}" for k in keys))
    plot(histories, args.figure)
    return {"arms": table, "histories": histories}


def plot(histories: dict[str, list[list[dict]]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, key, title in zip(axes, ("val/loss", "val/loss_content", "val/loss_template"),
                              ("all tokens", "content tokens (high entropy)", "template tokens (low entropy)")):
        for name, runs in histories.items():
            epochs = [r["epoch"] + 1 for r in runs[0]]
            mean = [statistics.mean(run[i][key] for run in runs) for i in range(len(epochs))]
            ax.plot(epochs, mean, label=name)
        ax.set_title(f"held-apart loss, {title}")
        ax.set_xlabel("epoch")
        ax.set_ylabel("cross-entropy (nats/token)")
        if key == "val/loss_template":
            ax.set_yscale("log")
    axes[0].legend()
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="tiny-llama")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    parser.add_argument("--rounds", type=int, default=5, help="runs of each side, alternated")
    parser.add_argument("--curves", action="store_true", help="also run the multi-epoch evidence experiments")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--figure", type=Path, default=ROOT / "benchmarks" / "figures" / "entrodrop_multiepoch.png")
    add_common_args(parser)
    args = parse(parser)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")

    results = {"step_time": step_time(args)}
    if args.curves:
        results["curves"] = curves(args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
