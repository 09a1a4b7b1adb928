"""TRE's cost: the policy-gradient update with the TRE term against the same update without it, in one run.

The module of ``grpo_countdown`` (tiny character Llama; ``--vocab`` widens its LM head to show a
realistic vocabulary, the tokens used stay characters) updates on one fixed batch of
``--prompts`` x group-size responses of ``--length`` tokens (random characters, random 0/1
rewards, scored once). Each round times ``module.update`` once per arm, in a rotating order
so machine load hits all arms alike: no term, TRE-K(2), TRE-P(0.99) and the global entropy
(all with diagnostics off: the technique's own cost), and TRE-K(2) with its diagnostics on.
Reported: median ms per update, and the median over rounds of each arm's ratio to the no-term
update of the same round. With ``--rollout`` (character vocabulary only) it also samples one
real rollout per round and reports the ratio for a whole RL step (rollout + update).

    OMP_NUM_THREADS=1 python benchmarks/technique_tre.py [--rounds 9] [--vocab 32000] [--json PATH]
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
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import add_common_args, compose_config, parse
from callbacks.tre import TRE
from zoo.blocks.rl.rollout import pack

ROOT = Path(__file__).resolve().parents[1]
ARMS = {"none": None, "TRE-K(2)": {"mode": "tre_k", "k": 2}, "TRE-P(0.99)": {"mode": "tre_p", "p": 0.99},
        "global entropy": {"mode": "global"}, "TRE-K(2)+diagnostics": {"mode": "tre_k", "k": 2, "diagnostics": True}}


def compose(experiment: str, overrides: list[str]):
    return compose_config([f"experiment={experiment}", *overrides])


def module_options(cfg, vocab: int | None) -> dict:
    from omegaconf import OmegaConf

    options = OmegaConf.to_container(cfg.model, resolve=True)
    options.pop("_target_")
    options["warm_start"] = {"steps": 0}
    if vocab:
        options["backbone_overrides"] = {**(options.get("backbone_overrides") or {}), "vocab_size": vocab}
    return options


def fixed_batch(module, n_prompts: int, length: int, seed: int = 0) -> dict:
    """A scored batch of random character responses with random 0/1 rewards (valid ids only)."""
    gen = torch.Generator().manual_seed(seed)
    group = module.hparams.group_size
    chars = len(module.tokenizer)
    prompts = [torch.randint(4, chars, (12,), generator=gen).tolist() for _ in range(n_prompts) for _ in range(group)]
    responses = [torch.randint(4, chars, (length,), generator=gen).tolist() for _ in prompts]
    rollout = pack(prompts, responses, module.tokenizer.pad_token_id, module.device)
    rewards = torch.randint(0, 2, (len(prompts),), generator=gen).float()
    return module.score_batch(rollout, rewards, module.group_ids(n_prompts, group))


def alternating_medians(arms: dict[str, Callable[[], float]], rounds: int, baseline: str) -> dict[str, dict]:
    """Run every arm once per round in a rotating order (round 0 warms up and is dropped).

    Each arm returns the seconds it measured. Returns per arm the median ms and the median
    over rounds of its ratio to ``baseline`` in the same round.
    """
    names = list(arms)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds + 1):
        order = names[r % len(names):] + names[:r % len(names)]
        measured = {name: arms[name]() for name in order}
        if r:
            for name, seconds in measured.items():
                times[name].append(seconds)
    return {name: {"ms": 1000 * statistics.median(times[name]),
                   "ratio": statistics.median(t / b for t, b in zip(times[name], times[baseline])),
                   "rounds": len(times[name])} for name in names}


def build_timed_module(base: type):
    class Timed(base):
        """Runs the benchmark inside one training step, where manual optimisation is available."""

        benchmark: Callable[[L.LightningModule], None]

        def training_step(self, batch, batch_idx):
            self.benchmark(self)

    return Timed


def run_in_fit(module, benchmark: Callable[[L.LightningModule], None], datamodule, callbacks=()) -> None:
    module.benchmark = benchmark
    L.Trainer(accelerator="cpu", devices=1, max_steps=1, limit_train_batches=1, logger=False,
              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
              num_sanity_val_steps=0, limit_val_batches=0, callbacks=list(callbacks),
              default_root_dir=tempfile.mkdtemp(prefix="technique_")).fit(module, datamodule=datamodule)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--length", type=int, default=40)
    parser.add_argument("--vocab", type=int, default=None, help="LM-head width (default: the character vocabulary)")
    parser.add_argument("--rollout", action="store_true", help="also time one real rollout per round")
    add_common_args(parser)
    args = parse(parser)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    from hydra.utils import instantiate

    from zoo.policy_gradient.module import GRPOModule

    cfg = compose("grpo_countdown", ["data.batch_size=8"])
    L.seed_everything(0)
    datamodule = instantiate(cfg.data, _convert_="all")
    module = build_timed_module(GRPOModule)(**module_options(cfg, args.vocab))
    results: dict[str, dict] = {}

    def benchmark(mod) -> None:
        batch = fixed_batch(mod, args.prompts, args.length)
        prompts = datamodule.train_samples()[:args.prompts]
        terms = {name: TRE(coef=0.001, **{"diagnostics": False, **spec}) for name, spec in ARMS.items() if spec}

        def timed(name: str) -> Callable[[], float]:
            def once() -> float:
                mod.loss_terms.clear()
                if name in terms:
                    mod.loss_terms["tre"] = terms[name]
                start = time.perf_counter()
                mod.update(batch)
                return time.perf_counter() - start
            return once

        arms = {name: timed(name) for name in ARMS}
        if args.rollout:
            def rollout() -> float:
                start = time.perf_counter()
                with torch.no_grad():
                    mod.rollout(prompts)
                return time.perf_counter() - start
            arms["rollout"] = rollout
        results.update(alternating_medians(arms, args.rounds, "none"))
        mod.loss_terms.clear()

    run_in_fit(module, benchmark, datamodule)
    vocab = module.policy.config.vocab_size
    tokens = args.prompts * module.hparams.group_size * args.length
    print(f"TRE overhead: GRPO update on {tokens} response tokens, |V| = {vocab}, "
          f"{results['none']['rounds']} rounds, torch threads {torch.get_num_threads()}")
    for name, row in results.items():
        line = f"  {name:<22} {row['ms']:8.1f} ms"
        if name != "rollout":
            line += f"   x{row['ratio']:.3f} vs no term"
        print(line)
    if "rollout" in results:
        base = results["rollout"]["ms"] + results["none"]["ms"]
        for name in ARMS:
            if name != "none":
                ratio = (results["rollout"]["ms"] + results[name]["ms"]) / base
                print(f"  whole step (rollout + update) with {name}: x{ratio:.3f}")
    if args.json:
        args.json.write_text(json.dumps({"vocab": vocab, "tokens": tokens, "results": results}, indent=1))


if __name__ == "__main__":
    main()
