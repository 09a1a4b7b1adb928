"""MGS's cost: the policy-gradient update with modular gradient surgery against the plain update, in one run.

The module of ``mgs_multidomain`` (tiny character Llama; ``--hidden`` / ``--layers`` grow it)
updates on one fixed batch of ``--prompts`` x group-size responses of ``--length`` tokens
(random characters, random 0/1 rewards, half the prompts in each of the two domains). Each
round times ``module.update`` once per arm in a rotating order: the plain update (one forward
and backward over the mini-batch), MGS with per-tensor PCGrad, global PCGrad, and MGS's
per-domain path without projection (the diagnostics only). The MGS arms do one forward and
backward per domain over that domain's rows, all-reduce nothing (one process), then the Gram
matrices and the combination. Reported: median ms per update and the median over rounds of
each arm's ratio to the plain update of the same round; the goal is at most D (= 2) times.

    OMP_NUM_THREADS=1 python benchmarks/technique_mgs.py [--rounds 9] [--hidden 256 --layers 4] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import add_common_args, parse
from benchmarks.technique_tre import (
    alternating_medians,
    build_timed_module,
    compose,
    fixed_batch,
    module_options,
    run_in_fit,
)
from callbacks.mgs import MGS

ARMS = {"plain": None, "MGS (param)": {"partition": "param"}, "PCGrad (global)": {"partition": "global"},
        "per-domain, no projection": {"project": False}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=None)
    parser.add_argument("--layers", type=int, default=None)
    add_common_args(parser)
    args = parse(parser)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    from hydra.utils import instantiate

    from zoo.policy_gradient.module import GRPOModule

    cfg = compose("mgs_multidomain", ["data.batch_size=8"])
    L.seed_everything(0)
    datamodule = instantiate(cfg.data, _convert_="all")
    options = module_options(cfg, None)
    if args.hidden:
        options["backbone_overrides"] = {**options["backbone_overrides"], "hidden_size": args.hidden,
                                         "intermediate_size": 2 * args.hidden}
    if args.layers:
        options["backbone_overrides"] = {**options["backbone_overrides"], "num_hidden_layers": args.layers}
    module = build_timed_module(GRPOModule)(**options)
    domains = datamodule.domains
    results: dict[str, dict] = {}

    def benchmark(mod) -> None:
        batch = fixed_batch(mod, args.prompts, args.length)
        per_prompt = torch.arange(args.prompts) % len(domains)
        batch["domain"] = per_prompt.repeat_interleave(mod.hparams.group_size)
        callbacks = {name: MGS(domains=domains, **spec) for name, spec in ARMS.items() if spec}

        def timed(name: str) -> Callable[[], float]:
            def once() -> float:
                callback = callbacks.get(name)
                if callback is not None:
                    callback.attach(mod, mod.trainer)
                start = time.perf_counter()
                mod.update(batch)
                seconds = time.perf_counter() - start
                if callback is not None:
                    callback.detach(mod)
                return seconds
            return once

        results.update(alternating_medians({name: timed(name) for name in ARMS}, args.rounds, "plain"))

    run_in_fit(module, benchmark, datamodule)
    params = sum(p.numel() for p in module.parameters() if p.requires_grad)
    tensors = sum(1 for p in module.parameters() if p.requires_grad)
    tokens = args.prompts * module.hparams.group_size * args.length
    print(f"MGS overhead: GRPO update on {tokens} response tokens, {len(domains)} domains, {params:,} parameters "
          f"in {tensors} tensors, {results['plain']['rounds']} rounds, torch threads {torch.get_num_threads()}")
    for name, row in results.items():
        print(f"  {name:<26} {row['ms']:8.1f} ms   x{row['ratio']:.3f} vs plain (goal <= x{len(domains)})")
    if args.json:
        args.json.write_text(json.dumps({"params": params, "tokens": tokens, "results": results}, indent=1))


if __name__ == "__main__":
    main()
