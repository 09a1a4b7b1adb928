"""LLM building blocks for rankers, judges and interpretability: label scoring, chat prompts, activation hooks.

- ``label_logprobs``: log P(label | prompt) for each prompt and each candidate label ("yes"/"no",
  document identifiers, grades), batched, with single-token labels read from one forward pass and
  multi-token labels teacher-forced; an optional ``ScoreCache`` skips prompts already scored.
- ``chat_prompt``: a user turn (plus system prompt) through the tokenizer's chat template, or plain
  text for tokenizers without one; ``chat_prompt_with_spans`` also returns the token span of each
  named segment of the user turn (from the tokenizer's offset mapping).
- ``ActivationHooks``: capture and patch activations of a Llama-style decoder (``model.model.layers``)
  with plain PyTorch hooks, by site, layer, position and head. Patches carry a boolean mask per batch
  row, so one batched forward can run many different patches (one per row).

Sites: ``resid_pre`` (a layer's input), ``resid_post`` (its output), ``attn_out`` (self-attention
output), ``mlp_out``, ``z`` (per-head attention values before the output projection, [B, T, H, d_head])
and ``q`` (per-head queries before the rotary embedding, [B, T, H, d_head]).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from zoo.blocks.rl.rollout import left_pad, position_ids

SITES = ("resid_pre", "resid_post", "attn_out", "mlp_out", "z", "q")
HEAD_SITES = ("z", "q")


# -- prompts ---------------------------------------------------------------------------------
def chat_messages(tokenizer: Any, messages: Sequence[dict[str, str]]) -> str:
    """The text a chat model sees before it answers a conversation (``role``/``content`` dicts);
    tokenizers without a chat template get the contents one per line."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    return "\n".join(m["content"] for m in messages) + "\n"


def chat_prompt(tokenizer: Any, user: str, system: str | None = None, assistant_prefix: str = "") -> str:
    """The text a chat model sees before it answers (``assistant_prefix`` starts the answer)."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return chat_messages(tokenizer, messages) + assistant_prefix


def chat_prompt_with_spans(tokenizer: Any, segments: Sequence[tuple[str | None, str]], system: str | None = None
                           ) -> tuple[list[int], dict[str, tuple[int, int]]]:
    """Token ids of ``chat_prompt`` over the concatenated segments, and the token span [start, end)
    of every named segment. A token belongs to a span when its characters overlap it; segments that
    would share a token (a merge across their border) raise, since their positions cannot be told apart."""
    user = "".join(text for _, text in segments)
    text = chat_prompt(tokenizer, user, system=system)
    offset = text.rindex(user)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    char_spans, cursor = {}, offset
    for name, part in segments:
        if name is not None:
            if name in char_spans:
                raise ValueError(f"segment name '{name}' used twice")
            char_spans[name] = (cursor, cursor + len(part))
        cursor += len(part)
    spans = token_spans(encoded["offset_mapping"], char_spans)
    return list(encoded["input_ids"]), spans


def token_spans(offsets: Sequence[tuple[int, int]], char_spans: dict[str, tuple[int, int]]
                ) -> dict[str, tuple[int, int]]:
    """Token span [start, end) covering each character span [a, b), from a tokenizer's offset mapping."""
    spans: dict[str, tuple[int, int]] = {}
    owner: dict[int, str] = {}
    for name, (a, b) in char_spans.items():
        hits = [t for t, (s, e) in enumerate(offsets) if s < b and e > a and e > s]
        if not hits:
            raise ValueError(f"segment '{name}' (characters {a}-{b}) covers no token")
        for t in hits:
            if t in owner:
                raise ValueError(f"segments '{owner[t]}' and '{name}' share token {t}; separate them")
            owner[t] = name
        spans[name] = (hits[0], hits[-1] + 1)
    return spans


# -- label scoring ---------------------------------------------------------------------------
class ScoreCache(dict):
    """(prompt, labels) -> label log-probs; counts what it saved."""

    hits = 0


@torch.no_grad()
def label_logprobs(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], labels: Sequence[str], *,
                   batch_size: int = 16, cache: ScoreCache | None = None) -> Tensor:
    """[N, L] log P(labels[j] | prompts[i]) under ``model`` (the label's tokens follow the prompt directly).

    Single-token labels cost one forward per batch of prompts; longer labels are scored by
    teacher forcing every (prompt, label) pair.
    """
    label_ids = [tokenizer(label, add_special_tokens=False)["input_ids"] for label in labels]
    if any(not ids for ids in label_ids):
        raise ValueError(f"a label tokenizes to nothing: {list(labels)}")
    key_labels = tuple(labels)
    out = torch.empty(len(prompts), len(labels))
    todo = []
    for i, prompt in enumerate(prompts):
        if cache is not None and (prompt, key_labels) in cache:
            out[i] = cache[(prompt, key_labels)]
            cache.hits += 1
        else:
            todo.append(i)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    single = all(len(ids) == 1 for ids in label_ids)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(todo), batch_size):
            rows = todo[start:start + batch_size]
            encoded = [tokenizer(prompts[i], add_special_tokens=False)["input_ids"] for i in rows]
            if single:
                ids, mask = left_pad(encoded, pad, device)
                logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits[:, -1]
                logp = torch.log_softmax(logits.float(), dim=-1)[:, [ids_[0] for ids_ in label_ids]]
            else:
                logp = _teacher_forced(model, encoded, label_ids, pad, device)
            for row, i in enumerate(rows):
                out[i] = logp[row].cpu()
                if cache is not None:
                    cache[(prompts[i], key_labels)] = out[i].clone()
    finally:
        model.train(was_training)
    return out


def _teacher_forced(model: torch.nn.Module, prompts: list[list[int]], label_ids: list[list[int]], pad: int,
                    device: torch.device) -> Tensor:
    pairs = [(p, lab) for p in prompts for lab in label_ids]
    ids, mask = left_pad([p + lab for p, lab in pairs], pad, device)
    logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits.float(),
                             dim=-1)
    width = ids.shape[1]
    scores = torch.empty(len(pairs), device=device)
    for r, (_, lab) in enumerate(pairs):
        positions = torch.arange(width - len(lab), width, device=device)
        scores[r] = logp[r, positions - 1, torch.as_tensor(lab, device=device)].sum()
    return scores.view(len(prompts), len(label_ids))


# -- activation hooks ------------------------------------------------------------------------
@dataclass
class Patch:
    """Replace ``site`` of ``layer`` by ``value`` wherever ``mask`` is true.

    ``value`` has the site's shape ([B, T, D], or [B, T, H, d_head] for ``z`` and ``q``); ``mask`` is
    [B, T] (every head of a position) or, for ``z`` and ``q``, [B, T, H].
    """

    site: str
    layer: int
    value: Tensor
    mask: Tensor


class ActivationHooks:
    """Capture and patch the activations of a Llama-style decoder's layers."""

    def __init__(self, model: torch.nn.Module) -> None:
        base = getattr(model, "model", model)
        if not hasattr(base, "layers"):
            raise TypeError(f"{type(model).__name__} has no decoder layers at .model.layers")
        self.model = model
        self.layers = list(base.layers)
        config = model.config
        self.heads = config.num_attention_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads

    def _module(self, site: str, layer: int) -> tuple[torch.nn.Module, bool]:
        """The module to hook and whether the site is its input (pre-hook) rather than its output."""
        if site not in SITES:
            raise ValueError(f"unknown site '{site}'; choose one of {SITES}")
        if not 0 <= layer < len(self.layers):
            raise IndexError(f"layer {layer} out of range (the model has {len(self.layers)})")
        block = self.layers[layer]
        return {"resid_pre": (block, True), "resid_post": (block, False), "attn_out": (block.self_attn, False),
                "mlp_out": (block.mlp, False), "z": (block.self_attn.o_proj, True),
                "q": (block.self_attn.q_proj, False)}[site]

    def _to_site(self, site: str, tensor: Tensor) -> Tensor:
        return tensor.view(*tensor.shape[:2], self.heads, self.head_dim) if site in HEAD_SITES else tensor

    @contextmanager
    def _hooked(self, sites: Sequence[tuple[str, int]], capture: dict | None,
                patches: Sequence[Patch]) -> Iterator[None]:
        handles = []
        wanted = {(s, layer) for s, layer in sites} | {(p.site, p.layer) for p in patches}
        for site, layer in wanted:
            module, is_input = self._module(site, layer)
            mine = [p for p in patches if (p.site, p.layer) == (site, layer)]
            keep = capture is not None and (site, layer) in set(sites)

            def edit(tensor: Tensor, site=site, layer=layer, mine=mine, keep=keep) -> Tensor:
                view = self._to_site(site, tensor)
                for p in mine:
                    mask = p.mask.to(view.device)
                    while mask.dim() < view.dim():
                        mask = mask.unsqueeze(-1)
                    view = torch.where(mask, p.value.to(view.dtype).to(view.device), view)
                if keep:
                    capture[(site, layer)] = view.detach().clone()
                return view.reshape(tensor.shape)

            if is_input:
                def pre(mod, args, kwargs, edit=edit):
                    if args:
                        return (edit(args[0]), *args[1:]), kwargs
                    kwargs = dict(kwargs)
                    kwargs["hidden_states"] = edit(kwargs["hidden_states"])
                    return args, kwargs
                handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            else:
                def post(mod, args, output, edit=edit):
                    if isinstance(output, tuple):
                        return (edit(output[0]), *output[1:])
                    return edit(output)
                handles.append(module.register_forward_hook(post))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @torch.no_grad()
    def run(self, input_ids: Tensor, attention_mask: Tensor, *, capture: Sequence[tuple[str, int]] = (),
            patches: Sequence[Patch] = (), start_layer: int = 0, start_resid: Tensor | None = None
            ) -> tuple[Tensor, dict[tuple[str, int], Tensor]]:
        """Logits [B, T, V] of one forward with ``patches`` applied, and the ``capture``d sites
        (after patching) keyed by (site, layer).

        ``start_layer`` > 0 skips the layers below it: ``start_resid`` (that layer's ``resid_pre``,
        [B, T, D], e.g. captured from an unpatched run) enters layer ``start_layer`` directly. Patches
        at or above that layer then cost only the layers they can change. This needs a decoder whose
        forward feeds ``inputs_embeds`` unchanged to its layers (Llama, Qwen2, Mistral).
        """
        cached: dict[tuple[str, int], Tensor] = {}
        position = position_ids(attention_mask)
        if start_layer == 0:
            with self._hooked(list(capture), cached, list(patches)):
                logits = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position).logits
            return logits.float(), cached
        if start_resid is None:
            raise ValueError("start_layer > 0 needs start_resid, the resid_pre of that layer")
        below = [f"{site}@{layer}" for site, layer in [*capture, *((p.site, p.layer) for p in patches)]
                 if layer < start_layer]
        if below:
            raise ValueError(f"sites {below} lie below start_layer={start_layer} and would never run")
        base = getattr(self.model, "model", self.model)
        full = base.layers
        base.layers = torch.nn.ModuleList(self.layers[start_layer:])
        try:
            with self._hooked(list(capture), cached, list(patches)):
                logits = self.model(inputs_embeds=start_resid, attention_mask=attention_mask,
                                    position_ids=position).logits
        finally:
            base.layers = full
        return logits.float(), cached

    def all_sites(self, site: str) -> list[tuple[str, int]]:
        return [(site, layer) for layer in range(len(self.layers))]
