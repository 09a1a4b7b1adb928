"""Rollout tokens per second: the zoo's RolloutEngine vs a plain `model.generate` loop.

    python benchmarks/rollout.py --backbone tiny-llama-char --prompts 16 --group 4 --new-tokens 48
    python benchmarks/rollout.py --backbone smollm2-135m --prompts 8 --group 4 --new-tokens 64

Same model, prompts, sampling settings and token budget in one process. The baseline is the
plain loop an RL script writes: one `generate(num_return_sequences=G)` call per prompt. A
second baseline batches every prompt into one left-padded `generate` call. EOS is disabled so
every sequence generates the full budget and the token counts are equal.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import add_common_args, parse
from zoo.backbones import build_backbone
from zoo.blocks.rl.rollout import RolloutEngine

PROBLEMS = ["Q:12+7=", "Natalia sold clips to 48 of her friends in April, and then half as many in May. How many?",
            "Using the numbers [3, 5, 7], create an equation that equals 22.", "Q:3+29=",
            "Weng earns $12 an hour for babysitting. Yesterday she did 50 minutes. How much did she earn?"]


def timed(fn, repeats: int) -> float:
    fn()                                            # warm-up (allocations, kernel selection)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="tiny-llama-char")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    add_common_args(parser)
    args = parse(parser)

    torch.manual_seed(0)
    overrides = {"hidden_size": 128, "intermediate_size": 256} if args.backbone.startswith("tiny") else None
    model, tokenizer = build_backbone(args.backbone, causal_lm=True, padding_side="left", config_overrides=overrides)
    model = model.to(args.device).eval()
    prompts = [PROBLEMS[i % len(PROBLEMS)] + " " * (i // len(PROBLEMS)) for i in range(args.prompts)]
    engine = RolloutEngine(model, tokenizer, max_new_tokens=args.new_tokens, temperature=1.0)
    engine.eos_id = None                              # full budget for every sequence, as in the baselines
    tokens = args.prompts * args.group * args.new_tokens
    common = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "max_new_tokens": args.new_tokens,
              "min_new_tokens": args.new_tokens, "pad_token_id": tokenizer.pad_token_id}

    def zoo_engine():
        engine.generate([p for p in prompts for _ in range(args.group)], generator=torch.Generator(args.device).manual_seed(0))

    @torch.no_grad()
    def generate_loop():
        for prompt in prompts:
            batch = tokenizer([prompt], return_tensors="pt", add_special_tokens=False).to(args.device)
            model.generate(**batch, num_return_sequences=args.group, **common)

    @torch.no_grad()
    def generate_batched():
        batch = tokenizer([p for p in prompts for _ in range(args.group)], return_tensors="pt", padding=True,
                          add_special_tokens=False).to(args.device)
        model.generate(**batch, **common)

    results = {name: tokens / timed(fn, args.repeats) for name, fn in
               [("engine", zoo_engine), ("generate_loop", generate_loop), ("generate_batched", generate_batched)]}
    print(f"{args.backbone}: {args.prompts} prompts x {args.group} samples x {args.new_tokens} tokens on {args.device}")
    for name, rate in results.items():
        print(f"  {name:<17} {rate:10.0f} tokens/s")
    print(f"  engine / generate loop    {results['engine'] / results['generate_loop']:.2f}x  (goal >= 2x)")
    print(f"  engine / batched generate {results['engine'] / results['generate_batched']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"config": vars(args) | {"json": str(args.json)}, "tokens_per_s": results}, indent=2))


if __name__ == "__main__":
    main()
