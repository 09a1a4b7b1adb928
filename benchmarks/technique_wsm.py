"""Step time with the WSM callback against the same training without it, measured in one run.

The model, data and optimizer are the ``wsm_causal_lm`` experiment's (tiny Llama, batches of 32 x 64
tokens; ``--set key=value`` takes further Hydra overrides, e.g. ``model.backbone=smollm2-135m``).
WSM keeps a snapshot every ``--interval`` steps in a window of ``--count`` (merged evaluation off:
that is an evaluation cost, not a step cost). Two measurements:

- in-run accounting (the headline): the time spent inside WSM's hooks during the WSM run, amortised
  over its steps: ratio = run time / (run time - WSM time). Load on the machine hits both terms alike;
- side by side: rounds alternate (plain, WSM, plain, ...), each timed from the first timed batch's
  start to the last batch's end; the median over rounds of the per-round ratio WSM / plain.

Also printed: the cost of one snapshot, and the one-off merge + save at the end of training.

    OMP_NUM_THREADS=1 python benchmarks/technique_wsm.py [--steps 300] [--rounds 3] [--interval 25]
                                                       [--count 8] [--set KEY=VALUE ...] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import add_common_args, parse
from callbacks.wsm import WSM

ROOT = Path(__file__).resolve().parents[1]
SKIP = 10      # untimed steps at the start of each run (allocator, first-batch costs)


class StepClock(L.Callback):
    def __init__(self) -> None:
        self.start = self.end = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == SKIP:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.end = time.perf_counter()


class TimedWSM(WSM):
    """WSM with the time spent in its per-step hook and in its end-of-training merge recorded."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.hook_seconds, self.snapshot_seconds, self.end_seconds = 0.0, [], 0.0

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        started = time.perf_counter()
        super().on_train_batch_end(trainer, pl_module, *args)
        spent = time.perf_counter() - started
        if trainer.global_step > SKIP:
            self.hook_seconds += spent
        if self.window and self.window[-1].step == trainer.global_step:
            self.snapshot_seconds.append(spent)

    def on_train_end(self, trainer, pl_module) -> None:
        started = time.perf_counter()
        super().on_train_end(trainer, pl_module)
        self.end_seconds = time.perf_counter() - started


def build(overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    import train  # noqa: F401  (registers the zoo_root resolver)
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["experiment=wsm_causal_lm", *overrides])
    L.seed_everything(0, verbose=False)
    return instantiate(cfg.model, _convert_="all"), instantiate(cfg.data, _convert_="all")


def timed_run(overrides: list[str], steps: int, device: str, wsm: TimedWSM | None) -> float:
    module, data = build(overrides)
    clock = StepClock()
    callbacks = [wsm, clock] if wsm else [clock]
    with tempfile.TemporaryDirectory(prefix="technique_wsm_") as root:
        L.Trainer(accelerator=device, devices=1, max_steps=steps, max_epochs=-1, limit_val_batches=0, logger=False,
                  enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                  default_root_dir=root, callbacks=callbacks).fit(module, datamodule=data)
    return clock.end - clock.start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--interval", type=int, default=25)
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--set", nargs="*", default=[], help="extra Hydra overrides for the run")
    add_common_args(parser)
    args = parse(parser)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    overrides = ["model.scheduler=null", "data.num_train=2048", *args.set]     # constant LR: no warmup skips
    timed_steps = args.steps - SKIP
    rounds = []
    for _ in range(args.rounds):
        plain = timed_run(overrides, args.steps, args.device, None)
        wsm = TimedWSM(interval=args.interval, count=args.count)
        with_wsm = timed_run(overrides, args.steps, args.device, wsm)
        rounds.append({"plain_s": plain, "wsm_s": with_wsm, "wsm_hook_s": wsm.hook_seconds,
                       "snapshot_ms": 1000 * statistics.median(wsm.snapshot_seconds), "end_merge_s": wsm.end_seconds,
                       "snapshots": len(wsm.snapshot_seconds)})
        print(f"round: plain {1000 * plain / timed_steps:.2f} ms/step, WSM {1000 * with_wsm / timed_steps:.2f} ms/step, "
              f"WSM hooks {1000 * wsm.hook_seconds:.1f} ms in {timed_steps} steps", flush=True)
    in_run = [r["wsm_s"] / (r["wsm_s"] - r["wsm_hook_s"]) for r in rounds]
    side_by_side = [r["wsm_s"] / r["plain_s"] for r in rounds]
    summary = {
        "ms_per_step_plain": 1000 * statistics.median(r["plain_s"] for r in rounds) / timed_steps,
        "ms_per_step_wsm": 1000 * statistics.median(r["wsm_s"] for r in rounds) / timed_steps,
        "snapshot_ms": statistics.median(r["snapshot_ms"] for r in rounds),
        "end_merge_and_save_s": statistics.median(r["end_merge_s"] for r in rounds),
        "ratio_in_run": statistics.median(in_run), "ratio_side_by_side": statistics.median(side_by_side),
    }
    print(f"\nWSM (interval {args.interval}, count {args.count}) over {timed_steps} timed steps, {args.rounds} rounds"
          f"{' with ' + ' '.join(args.set) if args.set else ''}")
    print(f"  step time: plain {summary['ms_per_step_plain']:.2f} ms, with WSM {summary['ms_per_step_wsm']:.2f} ms")
    print(f"  one snapshot: {summary['snapshot_ms']:.2f} ms; merge + save at the end: {summary['end_merge_and_save_s']:.2f} s")
    print(f"  amortised ratio in one run (WSM / without its hooks): {summary['ratio_in_run']:.4f}x (goal <= 1.02x)")
    print(f"  side-by-side ratio (median of rounds, WSM / plain):  {summary['ratio_side_by_side']:.4f}x")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "rounds": rounds,
                                         "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
