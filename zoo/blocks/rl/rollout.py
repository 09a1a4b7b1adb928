"""Batched sampling from any causal LM with a KV cache, recording what policy-gradient training needs.

A rollout keeps the prompt left-padded and the response right-padded, so ``[prompt; response]``
has padding only at its two ends and one forward pass scores every response token.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import Tensor

# env(sequence_index, response_text_so_far) -> text to insert before the next turn, or None to end.
Environment = Callable[[int, str], "str | None"]


@dataclass
class Rollout:
    prompt_ids: Tensor          # [N, P] left-padded
    prompt_mask: Tensor         # [N, P]
    response_ids: Tensor        # [N, R] right-padded
    response_mask: Tensor       # [N, R] 1 on sampled tokens (the loss counts these); 0 on inserted text and padding
    response_attention: Tensor  # [N, R] 1 on every real response token, sampled or inserted
    logprobs: Tensor            # [N, R] log-probs of the sampled tokens under the sampling distribution
    texts: list[str]            # decoded responses, inserted text included
    finished: Tensor            # [N] bool: ended by EOS, a stop string or the environment, not the length cap
    turns: Tensor               # [N] generation turns taken
    allowed: Tensor | None = None      # [N, V] bool: tokens each sequence was restricted to
    entropy: Tensor | None = None      # [N, R] entropy of the sampling distribution
    topk_ids: Tensor | None = None     # [N, R, k] most probable tokens at each position
    topk_probs: Tensor | None = None   # [N, R, k] their probabilities
    choices: Tensor | None = None      # [N, R, A] token ids allowed at each response position (-1 pads;
                                       # a row of -1 leaves that position unrestricted): choice decoding

    def __len__(self) -> int:
        return self.response_ids.shape[0]

    @property
    def input_ids(self) -> Tensor:
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> Tensor:
        return torch.cat([self.prompt_mask, self.response_attention], dim=1)

    @property
    def prompt_width(self) -> int:
        return self.prompt_ids.shape[1]

    @property
    def lengths(self) -> Tensor:
        """Sampled tokens per response (what the policy produced)."""
        return self.response_mask.sum(-1)

    def select(self, index: Tensor | Sequence[int]) -> Rollout:
        index = torch.as_tensor(index, dtype=torch.long)
        picked = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                picked[f.name] = None
            elif isinstance(value, list):
                picked[f.name] = [value[i] for i in index.tolist()]
            else:
                picked[f.name] = value[index.to(value.device)]
        return Rollout(**picked)

    def to(self, device: torch.device | str) -> Rollout:
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if isinstance(getattr(self, f.name), Tensor)})

    @staticmethod
    def concat(rollouts: Sequence[Rollout], pad_id: int) -> Rollout:
        """One rollout from several (e.g. the transitions of different agent roles)."""
        prompt_width = max(r.prompt_width for r in rollouts)
        response_width = max(r.response_ids.shape[1] for r in rollouts)

        def left(t: Tensor, value: float) -> Tensor:
            return F.pad(t, (prompt_width - t.shape[1], 0), value=value)

        def right(t: Tensor, value: float) -> Tensor:
            pad = (0, 0) * (t.dim() - 2) + (0, response_width - t.shape[1])   # F.pad lists the last dim first
            return F.pad(t, pad, value=value)

        def optional(name: str, fill: Callable[[Rollout], Tensor]) -> Tensor | None:
            if all(getattr(r, name) is None for r in rollouts):
                return None
            return torch.cat([getattr(r, name) if getattr(r, name) is not None else fill(r) for r in rollouts])

        vocab = next((r.allowed.shape[1] for r in rollouts if r.allowed is not None), 0)
        allowed = optional("allowed", lambda r: torch.ones(len(r), vocab, dtype=torch.bool,
                                                           device=r.response_ids.device))
        choices = None
        if any(r.choices is not None for r in rollouts):
            width = max(r.choices.shape[2] for r in rollouts if r.choices is not None)
            choices = torch.cat([right(F.pad(r.choices, (0, width - r.choices.shape[2]), value=-1), -1)
                                 if r.choices is not None else
                                 torch.full((len(r), response_width, width), -1, dtype=torch.long,
                                            device=r.response_ids.device) for r in rollouts])
        stats = {}
        for name in ("entropy", "topk_ids", "topk_probs"):
            if all(getattr(r, name) is None for r in rollouts):
                stats[name] = None
            elif any(getattr(r, name) is None for r in rollouts):
                raise ValueError(f"cannot concatenate rollouts where only some record {name}")
            else:
                stats[name] = torch.cat([right(getattr(r, name), 0) for r in rollouts])
        return Rollout(
            prompt_ids=torch.cat([left(r.prompt_ids, pad_id) for r in rollouts]),
            prompt_mask=torch.cat([left(r.prompt_mask, 0) for r in rollouts]),
            response_ids=torch.cat([right(r.response_ids, pad_id) for r in rollouts]),
            response_mask=torch.cat([right(r.response_mask, 0) for r in rollouts]),
            response_attention=torch.cat([right(r.response_attention, 0) for r in rollouts]),
            logprobs=torch.cat([right(r.logprobs, 0) for r in rollouts]),
            texts=[t for r in rollouts for t in r.texts],
            finished=torch.cat([r.finished for r in rollouts]),
            turns=torch.cat([r.turns for r in rollouts]),
            allowed=allowed,
            choices=choices,
            **stats,
        )


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        if len(seq):
            ids[i, width - len(seq):] = torch.as_tensor(list(seq), dtype=torch.long)
            mask[i, width - len(seq):] = 1
    return ids.to(device), mask.to(device)


def position_ids(attention_mask: Tensor) -> Tensor:
    """Positions counted over real tokens only, so left padding does not shift them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def restrict(logits: Tensor, allowed: Tensor | None, choices: Tensor | None = None) -> Tensor:
    """Logits with the tokens outside ``allowed`` ([N, V], broadcast over positions) at -inf,
    and, where ``choices`` ([N, R, A] ids, -1 padded) lists tokens for a position, outside those.
    """
    if allowed is not None:
        logits = logits.masked_fill(~(allowed[:, None, :] if logits.dim() == 3 else allowed), float("-inf"))
    if choices is not None:
        listed = choices >= 0
        keep = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
        keep.scatter_(-1, choices.clamp(min=0), listed)
        keep |= ~listed.any(-1, keepdim=True)          # positions without a list stay unrestricted
        logits = logits.masked_fill(~keep, float("-inf"))
    return logits


def causal_lm_forward(model: torch.nn.Module, keep: int, **inputs):
    """The model's forward computing LM-head logits for the last ``keep`` positions only.

    The LM head over a long prompt is most of a prefill's cost and memory with a large
    vocabulary; models without ``logits_to_keep`` compute every position.
    """
    try:
        return model(**inputs, logits_to_keep=keep)
    except TypeError:
        return model(**inputs)


def response_logits(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor, prompt_width: int,
                    temperature: float = 1.0, allowed: Tensor | None = None,
                    output_hidden_states: bool = False, choices: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Float32 logits ([N, R, V], temperature applied, restricted to ``allowed`` and ``choices``) for each
    response position.

    With ``output_hidden_states`` also returns the last layer's hidden states at those positions
    (what a value head reads).
    """
    keep = input_ids.shape[1] - prompt_width + 1
    out = causal_lm_forward(model, keep, input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=position_ids(attention_mask), output_hidden_states=output_hidden_states,
                            use_cache=False)
    logits = out.logits[:, -keep:-1].float() / temperature
    hidden = out.hidden_states[-1][:, prompt_width - 1:-1] if output_hidden_states else None
    return restrict(logits, allowed, choices), hidden


def token_logprobs(logits: Tensor, tokens: Tensor) -> Tensor:
    """log softmax(logits)[tokens], computed without keeping a second [N, R, V] tensor alive.

    Positions whose token is outside a restricted set (padding) get 0, not -inf.
    """
    picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    logp = picked - torch.logsumexp(logits, dim=-1)
    return torch.where(torch.isfinite(picked), logp, torch.zeros_like(logp))


def entropy_from_logits(logits: Tensor) -> Tensor:
    logp = torch.log_softmax(logits, dim=-1)
    p = logp.exp()
    return -(p * logp.nan_to_num(neginf=0.0)).sum(-1)


class RolloutEngine:
    """Samples responses for a batch of prompts with one KV cache for the whole batch.

    - Sampling: temperature, top-k, top-p or greedy; per-sequence token budgets.
    - Stops: the tokenizer's EOS token, and any of ``stop`` strings (kept in the response).
    - Constrained decoding: ``allowed_token_ids`` restricts every position of a sequence to a
      token set, and the recorded log-probs are those of the renormalised distribution.
    - Multi-turn: when a sequence stops at a stop string, ``env`` may return text to insert;
      generation then continues after it. Inserted tokens are in the response but outside
      ``response_mask``, so no loss is taken on them.
    - Identical prompts (a GRPO group) are prefilled once and their cache is shared.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, *, max_new_tokens: int = 64, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, greedy: bool = False, stop: Sequence[str] = (),
                 max_turns: int = 1, record_stats_top_k: int = 0) -> None:
        if temperature <= 0 and not greedy:
            raise ValueError("temperature must be > 0; use greedy=True for argmax decoding")
        self.model = model
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.temperature = 1.0 if greedy else temperature
        self.top_k = top_k
        self.top_p = top_p
        self.greedy = greedy
        self.stop = tuple(stop)
        self.max_turns = max_turns
        self.record_stats_top_k = record_stats_top_k
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_id = tokenizer.eos_token_id

    # -- public ------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts: Sequence[str] | Sequence[Sequence[int]], *, allowed_token_ids: Sequence[int] | None = None,
                 max_new_tokens: int | Sequence[int] | None = None, generator: torch.Generator | None = None,
                 env: Environment | None = None) -> Rollout:
        device = next(self.model.parameters()).device
        prompt_ids = [self._encode(p) for p in prompts]
        n = len(prompt_ids)
        budget = max_new_tokens if max_new_tokens is not None else self.max_new_tokens
        budgets = [int(budget)] * n if isinstance(budget, int) else [int(b) for b in budget]
        allowed = None
        if allowed_token_ids is not None:
            allowed = torch.zeros(n, self._vocab_size(), dtype=torch.bool, device=device)
            allowed[:, torch.as_tensor(list(allowed_token_ids), device=device)] = True

        was_training = self.model.training
        self.model.eval()
        try:
            tokens: list[list[int]] = [[] for _ in range(n)]
            sampled: list[list[bool]] = [[] for _ in range(n)]
            logps: list[list[float]] = [[] for _ in range(n)]
            stats: list[list[tuple]] = [[] for _ in range(n)]
            finished = [False] * n
            turns = [0] * n
            pending = list(range(n))
            for _turn in range(max(self.max_turns, 1)):
                if not pending:
                    break
                result = self._sample([prompt_ids[i] + tokens[i] for i in pending],
                                      [budgets[i] - len(tokens[i]) for i in pending],
                                      None if allowed is None else allowed[pending], generator, device)
                still = []
                for j, i in enumerate(pending):
                    new_tokens, new_logps, new_stats, reason = result[j]
                    tokens[i] += new_tokens
                    sampled[i] += [True] * len(new_tokens)
                    logps[i] += new_logps
                    stats[i] += new_stats
                    turns[i] += 1
                    finished[i] = reason in ("eos", "stop")
                    if reason != "stop" or env is None or turns[i] >= self.max_turns:
                        continue
                    inserted = env(i, self.tokenizer.decode(tokens[i]))
                    if inserted is None:
                        continue
                    room = budgets[i] - len(tokens[i])
                    inserted_ids = self._encode(inserted)[:room]
                    tokens[i] += inserted_ids
                    sampled[i] += [False] * len(inserted_ids)
                    logps[i] += [0.0] * len(inserted_ids)
                    stats[i] += [None] * len(inserted_ids)
                    if room > len(inserted_ids):
                        still.append(i)
                    else:
                        finished[i] = False
                pending = still
        finally:
            self.model.train(was_training)
        return self._assemble(prompt_ids, tokens, sampled, logps, stats, finished, turns, allowed, device)

    # -- internals ---------------------------------------------------------------------------
    def _encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        return list(prompt)

    def _vocab_size(self) -> int:
        return self.model.get_output_embeddings().weight.shape[0]

    def _choose(self, logits: Tensor, allowed: Tensor | None, generator: torch.Generator | None):
        logits = restrict(logits / self.temperature, allowed)
        full_logp = torch.log_softmax(logits, dim=-1)
        record = None
        if self.record_stats_top_k:
            probs = full_logp.exp()
            entropy = -(probs * full_logp.nan_to_num(neginf=0.0)).sum(-1)
            top = probs.topk(min(self.record_stats_top_k, probs.shape[-1]), dim=-1)
            record = (entropy, top.indices, top.values)
        if self.greedy:
            token = logits.argmax(-1)
            return token, full_logp.gather(-1, token[:, None]).squeeze(-1), record
        sampling = logits
        if self.top_k:
            kth = sampling.topk(min(self.top_k, sampling.shape[-1]), dim=-1).values[:, -1:]
            sampling = sampling.masked_fill(sampling < kth, float("-inf"))
        if self.top_p < 1.0:
            sorted_logits, order = sampling.sort(dim=-1, descending=True)
            cumulative = sorted_logits.softmax(-1).cumsum(-1)
            drop_sorted = cumulative - sorted_logits.softmax(-1) >= self.top_p   # keep the token that crosses p
            drop = drop_sorted.scatter(-1, order, drop_sorted)
            sampling = sampling.masked_fill(drop, float("-inf"))
        logp = torch.log_softmax(sampling, dim=-1)
        token = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)
        return token, logp.gather(-1, token[:, None]).squeeze(-1), record

    def _prefill(self, prompt_ids: list[list[int]], device):
        """Forward the distinct prompts once and repeat their cache for duplicates."""
        distinct: dict[tuple, int] = {}
        owner = [distinct.setdefault(tuple(p), len(distinct)) for p in prompt_ids]
        unique = list(distinct)
        ids, mask = left_pad(unique, self.pad_id, device)
        out = causal_lm_forward(self.model, 1, input_ids=ids, attention_mask=mask, position_ids=position_ids(mask),
                                use_cache=True)
        cache, logits = out.past_key_values, out.logits[:, -1].float()
        index = torch.as_tensor(owner, device=device)
        if len(unique) != len(prompt_ids):
            counts = torch.bincount(index, minlength=len(unique))
            grouped = torch.equal(index, torch.repeat_interleave(torch.arange(len(unique), device=device), counts))
            if grouped and bool((counts == counts[0]).all()) and hasattr(cache, "batch_repeat_interleave"):
                cache.batch_repeat_interleave(int(counts[0]))
            else:   # duplicates not in equal consecutive runs: prefill every prompt
                ids, mask = left_pad(prompt_ids, self.pad_id, device)
                out = causal_lm_forward(self.model, 1, input_ids=ids, attention_mask=mask,
                                        position_ids=position_ids(mask), use_cache=True)
                return out.past_key_values, out.logits[:, -1].float(), mask
            logits, mask = logits[index], mask[index]
        return cache, logits, mask

    def _sample(self, prompt_ids: list[list[int]], budgets: list[int], allowed: Tensor | None,
                generator: torch.Generator | None, device) -> list[tuple[list[int], list[float], list[tuple], str]]:
        n = len(prompt_ids)
        cache, logits, mask = self._prefill(prompt_ids, device)
        positions = position_ids(mask)[:, -1:]
        budget = torch.as_tensor(budgets, device=device)
        active = budget > 0
        steps = int(budget.max()) if n else 0
        out_tokens = torch.full((n, max(steps, 1)), self.pad_id, dtype=torch.long, device=device)
        out_logps = torch.zeros((n, max(steps, 1)), device=device)
        lengths = torch.zeros(n, dtype=torch.long, device=device)
        reasons = ["length"] * n
        recorded: list[list[tuple]] = [[] for _ in range(n)]
        stop_window = max((len(self._encode(s)) for s in self.stop), default=0) + 2
        for t in range(steps):
            token, logp, record = self._choose(logits, allowed, generator)
            token = torch.where(active, token, torch.full_like(token, self.pad_id))
            out_tokens[:, t] = token
            out_logps[:, t] = torch.where(active, logp, torch.zeros_like(logp))
            lengths += active.long()
            if record is not None:
                for i in active.nonzero().flatten().tolist():
                    recorded[i].append((float(record[0][i]), record[1][i].tolist(), record[2][i].tolist()))
            if self.eos_id is not None:
                hit_eos = active & (token == self.eos_id)
                for i in hit_eos.nonzero().flatten().tolist():
                    reasons[i] = "eos"
                active = active & ~hit_eos
            if self.stop:
                for i in active.nonzero().flatten().tolist():
                    tail = self.tokenizer.decode(out_tokens[i, max(0, t + 1 - stop_window):t + 1].tolist())
                    if tail.endswith(self.stop):
                        reasons[i] = "stop"
                        active[i] = False
            active = active & (lengths < budget)
            if not bool(active.any()):
                break
            mask = torch.cat([mask, torch.ones((n, 1), dtype=mask.dtype, device=device)], dim=1)
            positions = positions + 1
            out = self.model(input_ids=token[:, None], attention_mask=mask, position_ids=positions,
                             past_key_values=cache, use_cache=True)
            cache, logits = out.past_key_values, out.logits[:, -1].float()
        results = []
        for i in range(n):
            k = int(lengths[i])
            results.append((out_tokens[i, :k].tolist(), out_logps[i, :k].tolist(), recorded[i], reasons[i]))
        return results

    def _assemble(self, prompt_ids, tokens, sampled, logps, stats, finished, turns, allowed, device) -> Rollout:
        n = len(prompt_ids)
        width = max(max((len(t) for t in tokens), default=0), 1)
        p_ids, p_mask = left_pad(prompt_ids, self.pad_id, device)
        r_ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        r_mask = torch.zeros((n, width), dtype=torch.long)
        r_attn = torch.zeros((n, width), dtype=torch.long)
        r_logp = torch.zeros((n, width))
        k = self.record_stats_top_k
        entropy = torch.zeros((n, width)) if k else None
        top_ids = torch.zeros((n, width, k), dtype=torch.long) if k else None
        top_probs = torch.zeros((n, width, k)) if k else None
        for i in range(n):
            length = len(tokens[i])
            if not length:
                continue
            r_ids[i, :length] = torch.as_tensor(tokens[i])
            r_mask[i, :length] = torch.as_tensor(sampled[i], dtype=torch.long)
            r_attn[i, :length] = 1
            r_logp[i, :length] = torch.as_tensor(logps[i])
            if k:
                for t, rec in enumerate(stats[i]):
                    if rec is not None:
                        entropy[i, t] = rec[0]
                        top_ids[i, t, :len(rec[1])] = torch.as_tensor(rec[1])
                        top_probs[i, t, :len(rec[2])] = torch.as_tensor(rec[2])
        texts = [self.tokenizer.decode(t, skip_special_tokens=True) for t in tokens]
        return Rollout(p_ids, p_mask, r_ids.to(device), r_mask.to(device), r_attn.to(device), r_logp.to(device), texts,
                       torch.as_tensor(finished, device=device), torch.as_tensor(turns, device=device), allowed,
                       None if entropy is None else entropy.to(device),
                       None if top_ids is None else top_ids.to(device),
                       None if top_probs is None else top_probs.to(device))


def pack(prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], pad_id: int,
         device: torch.device | str = "cpu", texts: Sequence[str] | None = None) -> Rollout:
    """A rollout from given token ids (teacher forcing, supervised warm starts, replays)."""
    p_ids, p_mask = left_pad(prompt_ids, pad_id, device)
    width = max(max((len(r) for r in response_ids), default=0), 1)
    r_ids = torch.full((len(response_ids), width), pad_id, dtype=torch.long)
    r_mask = torch.zeros((len(response_ids), width), dtype=torch.long)
    for i, response in enumerate(response_ids):
        if len(response):
            r_ids[i, :len(response)] = torch.as_tensor(list(response), dtype=torch.long)
            r_mask[i, :len(response)] = 1
    r_ids, r_mask = r_ids.to(device), r_mask.to(device)
    n = len(response_ids)
    return Rollout(p_ids, p_mask, r_ids, r_mask, r_mask.clone(), torch.zeros(r_ids.shape, device=device),
                   list(texts) if texts is not None else [""] * n,
                   torch.ones(n, dtype=torch.bool, device=device), torch.ones(n, dtype=torch.long, device=device))
