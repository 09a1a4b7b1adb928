"""Choice decoding: the policy picks one of a set of candidate strings, with exact token log-probs.

A tiny random model almost never writes parseable text, so the agentic-search demos let each
role choose among its valid outputs (the workflows, the document subsets, the entities).
Candidates are decoded token by token through their prefix tree: at each step only tokens that
continue some candidate are allowed, and the sampled token's log-prob is taken under that
renormalised distribution. The product over steps is a proper policy over the candidates, and
because the allowed sets are stored with the rollout (``Rollout.choices``), recomputed log-probs
during the update match the sampled ones exactly. Positions with a single continuation are forced:
they are kept out of ``response_mask`` (their log-prob is 0 whatever the weights).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from zoo.blocks.rl.rollout import Rollout, left_pad, pack


def _children(candidates: Sequence[Sequence[int]]) -> dict[tuple[int, ...], list[int]]:
    """Prefix -> allowed next tokens, in first-seen order (so greedy ties are deterministic)."""
    tree: dict[tuple[int, ...], list[int]] = {}
    for cand in candidates:
        for t in range(len(cand)):
            nxt = tree.setdefault(tuple(cand[:t]), [])
            if cand[t] not in nxt:
                nxt.append(cand[t])
    return tree


@torch.no_grad()
def sample_choices(model: torch.nn.Module, tokenizer, prompts: Sequence[Sequence[int]],
                   candidates: Sequence[Sequence[str]], *, temperature: float = 1.0, greedy: bool = False,
                   generator: torch.Generator | None = None) -> tuple[Rollout, list[int]]:
    """One candidate per prompt, decoded through the candidates' prefix tree with one KV cache.

    Each candidate is tokenized and closed with EOS (so a candidate that is a prefix of another
    is still a distinct choice). Returns the rollout and the index of each prompt's choice.
    """
    if len(prompts) != len(candidates):
        raise ValueError(f"{len(prompts)} prompts but {len(candidates)} candidate lists")
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    encoded = []
    for i, options in enumerate(candidates):
        if not options:
            raise ValueError(f"prompt {i} has no candidates to choose from")
        ids = [list(tokenizer(c, add_special_tokens=False)["input_ids"]) + [eos] for c in options]
        if len({tuple(x) for x in ids}) != len(ids):
            raise ValueError(f"prompt {i}: candidates tokenize identically: {list(options)}")
        encoded.append(ids)
    trees = [_children(ids) for ids in encoded]
    device = next(model.parameters()).device
    n = len(prompts)
    chosen: list[list[int]] = [[] for _ in range(n)]
    logps: list[list[float]] = [[] for _ in range(n)]
    decided: list[list[int]] = [[] for _ in range(n)]
    allowed_lists: list[list[list[int]]] = [[] for _ in range(n)]
    done = [False] * n

    was_training = model.training
    model.eval()
    try:
        ids, attention = left_pad(prompts, pad, device)
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=True)
        while True:
            logits = out.logits[:, -1].float() / (1.0 if greedy else temperature)
            step_tokens = torch.full((n,), pad, dtype=torch.long)
            for i in range(n):
                if done[i]:
                    continue
                options = trees[i][tuple(chosen[i])]
                index = torch.as_tensor(options, device=device)
                logp = torch.log_softmax(logits[i, index], dim=-1)
                if len(options) == 1:
                    pick = 0
                elif greedy:
                    pick = int(logp.argmax())
                else:
                    pick = int(torch.multinomial(logp.exp(), 1, generator=generator))
                token = options[pick]
                chosen[i].append(token)
                logps[i].append(float(logp[pick]) if len(options) > 1 else 0.0)
                decided[i].append(int(len(options) > 1))
                allowed_lists[i].append(options)
                step_tokens[i] = token
                done[i] = token == eos and chosen[i] in encoded[i]
            if all(done):
                break
            # a finished row is fed padding, masked out, until the longest candidate ends
            live = torch.as_tensor([not d for d in done], dtype=torch.long, device=device)
            attention = torch.cat([attention, live[:, None]], dim=1)
            positions = (attention.cumsum(-1) - 1).clamp(min=0)[:, -1:]
            out = model(input_ids=step_tokens[:, None].to(device), attention_mask=attention, position_ids=positions,
                        past_key_values=out.past_key_values, use_cache=True)
    finally:
        model.train(was_training)

    picks = [encoded[i].index(chosen[i]) for i in range(n)]
    texts = [candidates[i][picks[i]] for i in range(n)]
    rollout = pack(prompts, chosen, pad, device, texts=texts)
    width = rollout.response_ids.shape[1]
    most = max(len(a) for rows in allowed_lists for a in rows)
    choices = torch.full((n, width, most), -1, dtype=torch.long)
    mask = torch.zeros(n, width, dtype=torch.long)
    logprobs = torch.zeros(n, width)
    for i in range(n):
        for t, options in enumerate(allowed_lists[i]):
            choices[i, t, :len(options)] = torch.as_tensor(options)
        mask[i, :len(decided[i])] = torch.as_tensor(decided[i])
        logprobs[i, :len(logps[i])] = torch.as_tensor(logps[i])
    rollout.choices = choices.to(device)
    rollout.response_mask = mask.to(device)
    rollout.logprobs = logprobs.to(device)
    return rollout, picks
