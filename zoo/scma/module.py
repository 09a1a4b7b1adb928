"""SCMA (Chen et al., arXiv 2601.21919): a reasoning model learns to shorten its chain of thought because
two agents sharing its weights cut each response into chunks and score each chunk's importance, which
sets an importance-weighted length penalty. Multi-agent GRPO on the zoo's policy-gradient core.

One step: the Reasoning Agent samples G responses per problem; the Segmentation Agent (one sample
per response) cuts each into chunks; the Scoring Agent (one sample per valid segmentation) gives each
chunk w in 1..5. Then

    P(y) = sum_i g(w_i) l_i / L_norm            g(w) = (5 - w) / 4  (or 1[w <= tau])
    R_reason = R_acc - alpha * P * 1[R_acc = 1]  (penalty_on = correct_only)
    r_seg = R_reason + p_seg,  r_score = R_reason + p_score   (aux_role_reward = team)

with l_i the chunk lengths in tokens of y (they sum to |y|) and p in {0, format_penalty}; a failed
format check falls back to the uniform penalty |y| / L_norm. Advantages are GRPO's, normalised per
(problem, role); the three roles' transitions form one buffer and one clipped-surrogate update of
the shared weights. Evaluation and ``generate`` use the Reasoning Agent only.

Decode modes of the two auxiliary roles:
- ``choice``: constrained decoding with exact renormalised log-probs. The role's input is shown in
  the response, and the agent samples one token at each decision slot: after every sentence but the
  last, cut (``|``) or keep going (``_``); after every chunk ``[chunk]``, a score digit 1..5. The
  segmentation is lossless by construction.
- ``free``: free text with the whole input in the prompt, ``<seg>..</seg>`` / ``<score>w</score>``
  tags parsed, and the lossless check applied.
"""
from __future__ import annotations

import copy
import math
import random
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from zoo.blocks.rl.losses import aggregate
from zoo.blocks.rl.rollout import Rollout, left_pad, pack
from zoo.policy_gradient.module import GRPOModule

__all__ = ["SCMAModule", "chunk_token_lengths", "importance_penalty", "lossless", "parse_scores", "parse_segments",
           "redundancy", "role_rewards", "sample_slots", "split_sentences"]

SLOT = -1                      # a template position the agent samples (everything else is given text)
ROLES = ("reason", "seg", "score")
CUT, KEEP = "|", "_"
SCORE_DIGITS = "12345"
DECODE_MODES = ("choice", "free")
G_MAPS = ("linear", "threshold")
NORMS = ("max_len", "group_mean", "self")
PENALTY_ON = ("correct_only", "all")
AUX_REWARDS = ("team", "acc_only")

SEG_PROMPT = ("Split the following reasoning into consecutive, logically complete chunks without changing, adding "
              "or deleting any characters; wrap each chunk in <seg></seg>.\n")
SCORE_PROMPT = ("For each numbered chunk, rate how essential it is for reaching the final answer on a 1-5 scale "
                "(1 = redundant, 5 = indispensable); output one <score></score> per chunk in order.\n")


# -- formats -------------------------------------------------------------------------------
def split_sentences(text: str) -> list[str]:
    """Sentences of a response, each keeping its trailing space, so they concatenate back to ``text``."""
    return [s for s in re.split(r"(?<=\. )", text) if s]


def _squash(text: str) -> str:
    return "".join(text.split())


_SEG = re.compile(r"<seg>(.*?)</seg>", re.DOTALL)
_SCORE = re.compile(r"<score>(.*?)</score>", re.DOTALL)


def parse_segments(text: str) -> list[str] | None:
    """The chunks of a ``<seg>..</seg>`` sequence, or None if anything but whitespace lies outside the tags."""
    chunks = _SEG.findall(text)
    if not chunks or _SEG.sub("", text).strip():
        return None
    return chunks


def lossless(chunks: Sequence[str] | None, response: str) -> bool:
    """The chunks reproduce the response in order, whitespace aside (n >= 1)."""
    return bool(chunks) and _squash("".join(chunks)) == _squash(response)


def parse_scores(text: str, n: int) -> list[int] | None:
    """Exactly ``n`` ``<score>w</score>`` tags with integer w in 1..5 and nothing else, or None."""
    values = _SCORE.findall(text)
    if len(values) != n or _SCORE.sub("", text).strip():
        return None
    values = [v.strip() for v in values]
    if not all(v in SCORE_DIGITS and len(v) == 1 for v in values):
        return None
    return [int(v) for v in values]


def merge_sentences(sentences: Sequence[str], cuts: Sequence[bool]) -> list[str]:
    """Chunks from sentences and one cut/keep decision per boundary."""
    chunks = [sentences[0]] if sentences else []
    for sentence, cut in zip(sentences[1:], cuts):
        if cut:
            chunks.append(sentence)
        else:
            chunks[-1] += sentence
    return chunks


def chunk_token_lengths(pieces: Sequence[str], chunks: Sequence[str]) -> list[int]:
    """Tokens of y per chunk, from the tokens' decoded ``pieces``; the lengths sum to ``len(pieces)``.

    A token belongs to the chunk holding its first non-whitespace character; a token without one
    (a space, EOS) goes with the token before it.
    """
    owner = [i for i, chunk in enumerate(chunks) for ch in chunk if not ch.isspace()]
    counts = [0] * len(chunks)
    cursor, current = 0, 0
    for piece in pieces:
        visible = sum(not ch.isspace() for ch in piece)
        if visible:
            current = owner[min(cursor, len(owner) - 1)]
            cursor += visible
        counts[current] += 1
    return counts


# -- penalty and rewards -------------------------------------------------------------------
def redundancy(score: int, g: str = "linear", threshold: int = 2) -> float:
    """g(w): (5 - w) / 4, or 1 for w <= threshold and 0 above (penalise only redundant chunks)."""
    if g == "linear":
        return (5 - score) / 4
    if g == "threshold":
        return float(score <= threshold)
    raise ValueError(f"g must be one of {G_MAPS}, not '{g}'")


def importance_penalty(lengths: Sequence[int], scores: Sequence[int], norm: float, g: str = "linear",
                       threshold: int = 2) -> float:
    """P(y) = sum_i g(w_i) l_i / L_norm."""
    return sum(redundancy(w, g, threshold) * n for n, w in zip(lengths, scores)) / max(norm, 1e-8)


def role_rewards(accuracy: Tensor, penalty: Tensor, alpha: float, seg_valid: Tensor, score_valid: Tensor, *,
                 penalty_on: str = "correct_only", aux_role_reward: str = "team",
                 format_penalty: float = -1.0) -> dict[str, Tensor]:
    """Per-response rewards of the three roles ([N] each; score entries matter where a score was sampled)."""
    gate = (accuracy >= 1).float() if penalty_on == "correct_only" else torch.ones_like(accuracy)
    reason = accuracy - alpha * penalty * gate
    base = reason if aux_role_reward == "team" else accuracy
    return {"reason": reason,
            "seg": base + format_penalty * (~seg_valid).float(),
            "score": base + format_penalty * (~score_valid).float()}


# -- constrained decoding at slots ---------------------------------------------------------
@torch.no_grad()
def sample_slots(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[Sequence[int]],
                 templates: Sequence[Sequence[int]], allowed_ids: Sequence[int], *, temperature: float = 1.0,
                 generator: torch.Generator | None = None) -> Rollout:
    """Responses that are given text except at ``SLOT`` positions, where one token is sampled from
    ``allowed_ids`` (renormalised; log-probs recorded). One KV cache: each forward feeds the given
    text up to every sequence's next slot. The rollout restricts its rows to ``allowed_ids``
    and marks only the slots in ``response_mask``, so recomputed log-probs match the sampled ones.
    """
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    n = len(prompts)
    filled = [list(t) for t in templates]
    logps = [[0.0] * len(t) for t in templates]
    slots = [[j for j, tok in enumerate(t) if tok == SLOT] for t in templates]
    vocab = model.get_output_embeddings().weight.shape[0]
    allowed = torch.zeros(n, vocab, dtype=torch.bool, device=device)
    allowed[:, torch.as_tensor(list(allowed_ids), device=device)] = True
    prompt_ids, prompt_mask = left_pad(prompts, pad, device)
    was_training = model.training
    model.eval()
    try:
        cache, attention, starts = None, prompt_mask[:, :0], [0] * n
        for k in range(max((len(s) for s in slots), default=0)):
            pieces = [filled[i][starts[i]:slots[i][k]] if k < len(slots[i]) else [] for i in range(n)]
            ids, mask = left_pad([p[::-1] for p in pieces], pad, device)   # right-padded, built reversed
            ids, mask = ids.flip(1), mask.flip(1)
            last = torch.as_tensor([len(p) - 1 for p in pieces], device=device)
            if k == 0:
                ids, mask = torch.cat([prompt_ids, ids], 1), torch.cat([prompt_mask, mask], 1)
                last = last + prompt_ids.shape[1]
            attention = torch.cat([attention, mask], 1)
            positions = (attention.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]
            out = model(input_ids=ids, attention_mask=attention, position_ids=positions, past_key_values=cache,
                        use_cache=True)
            cache = out.past_key_values
            rows = [i for i in range(n) if k < len(slots[i])]
            index = torch.as_tensor(rows, device=device)
            logits = out.logits[index, last[index]].float() / temperature
            logp = torch.log_softmax(logits.masked_fill(~allowed[index], float("-inf")), dim=-1)
            tokens = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)
            picked = logp.gather(-1, tokens[:, None]).squeeze(-1)
            for row, token, lp in zip(rows, tokens.tolist(), picked.tolist()):
                filled[row][slots[row][k]] = token
                logps[row][slots[row][k]] = lp
                starts[row] = slots[row][k]
    finally:
        model.train(was_training)
    rollout = pack(prompts, filled, pad, device, texts=[tokenizer.decode(f) for f in filled])
    width = rollout.response_ids.shape[1]
    slot_mask = torch.zeros(n, width, dtype=torch.long)
    logprobs = torch.zeros(n, width)
    for i in range(n):
        slot_mask[i, slots[i]] = 1
        logprobs[i, :len(logps[i])] = torch.as_tensor(logps[i])
    rollout.response_mask = slot_mask.to(device)
    rollout.logprobs = logprobs.to(device)
    rollout.allowed = allowed
    return rollout


class SCMAModule(GRPOModule):
    """SCMA: reasoning, segmentation and scoring roles of one policy, trained by multi-agent GRPO."""

    zoo_name = "scma"
    card_notes = (
        "The paper body was unreadable when this was written; everything below follows the zoo spec's "
        "[interpretation] choices. Penalty P = sum g(w_i) l_i / L_norm with g linear (5-w)/4 (switch: "
        "g=threshold, tau=threshold), L_norm the reasoning max_new_tokens (norm: max_len | group_mean | self); "
        "penalty only on correct responses (penalty_on: correct_only | all); seg/score rewards = R_reason + own "
        "format penalty (aux_role_reward: team | acc_only); failed format checks fall back to the uniform "
        "penalty |y|/L_norm; one seg and one score sample per response, GRPO normalised per (problem, role); the "
        "whole response is segmented. Lossless check: equality after removing all whitespace. Chunk lengths: "
        "each token of y goes to the chunk of its first non-whitespace character (whitespace-only tokens and "
        "EOS to the previous token's chunk). decode_mode=choice (the embedded default) shows the role's input "
        "in the response and samples only the decisions (cut/keep after each sentence, a digit per chunk), so "
        "each decision sees its input up to that point, not the whole response; decode_mode=free is the spec's "
        "prompt-then-tagged-text form. The auxiliary roles' warm start uses the task's sentence labels with "
        "aux_label_noise of them replaced at random (a stand-in for an LLM's zero-shot judgement; 1.0 = no "
        "prior). frozen_aux samples seg/score from a frozen copy of the warm-started policy and leaves their "
        "transitions out of the update; oracle_scorer scores a chunk 1 if all its sentences are the task's "
        "fillers, else 5. The collusion monitor warns when more than collusion_share of learned scores are 5.")

    def __init__(self, *, alpha: float = 0.2, decode_mode: str = "choice", g: str = "linear", threshold: int = 2,
                 norm: str = "max_len", penalty_on: str = "correct_only", aux_role_reward: str = "team",
                 format_penalty: float = -1.0, oracle_scorer: bool = False, frozen_aux: bool = False,
                 seg_prompt: str = SEG_PROMPT, score_prompt: str = SCORE_PROMPT, aux_max_new_tokens: int = 512,
                 aux_label_noise: float = 0.3, aux_demo_share: float = 0.25, collusion_share: float = 0.95,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters()
        for key, value, options in (("decode_mode", decode_mode, DECODE_MODES), ("g", g, G_MAPS),
                                    ("norm", norm, NORMS), ("penalty_on", penalty_on, PENALTY_ON),
                                    ("aux_role_reward", aux_role_reward, AUX_REWARDS)):
            if value not in options:
                raise ValueError(f"scma {key} must be one of {', '.join(options)}, not '{value}'")
        if not 1 <= threshold <= 5:
            raise ValueError(f"scma threshold must be a score in 1..5, not {threshold}")
        self.aux_policy = copy.deepcopy(self.policy).requires_grad_(False).eval() if frozen_aux else None
        self.role_calls: Counter[str] = Counter({role: 0 for role in ROLES})
        self._label_rng = random.Random(self.hparams.seed)

    # -- prompts (the only difference between the roles) --------------------------------------
    def format_prompt(self, sample: Mapping[str, Any]) -> str:
        self.role_calls["reason"] += 1
        return super().format_prompt(sample)

    def seg_prompt(self, response: str) -> str:
        self.role_calls["seg"] += 1
        if self.hparams.decode_mode == "choice":
            return self.hparams.seg_prompt
        return f"{self.hparams.seg_prompt}{response}\n"

    def score_prompt(self, chunks: Sequence[str]) -> str:
        self.role_calls["score"] += 1
        if self.hparams.decode_mode == "choice":
            return self.hparams.score_prompt
        return self.hparams.score_prompt + "".join(f"{k}. {chunk.strip()}\n" for k, chunk in enumerate(chunks, 1))

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def token_id(self, char: str) -> int:
        ids = self.encode(char)
        if len(ids) != 1:
            raise ValueError(f"decode_mode=choice needs '{char}' to be one token of this tokenizer")
        return ids[0]

    def seg_template(self, sentences: Sequence[str]) -> list[int]:
        """Sentences with a cut/keep slot between each pair."""
        out: list[int] = []
        for k, sentence in enumerate(sentences):
            out += self.encode(sentence) + ([SLOT] if k < len(sentences) - 1 else [])
        return out

    def score_template(self, chunks: Sequence[str]) -> list[int]:
        """``[chunk]`` then a score slot, for every chunk."""
        return [tok for chunk in chunks for tok in self.encode(f"[{chunk}]") + [SLOT]]

    def fill_slots(self, template: Sequence[int], choices: Sequence[str]) -> tuple[list[int], list[int]]:
        """The template with its slots filled by ``choices`` in order, and the slot positions."""
        positions = [j for j, tok in enumerate(template) if tok == SLOT]
        ids = list(template)
        for j, choice in zip(positions, choices, strict=True):
            ids[j] = self.token_id(choice)
        return ids, positions

    # -- roles --------------------------------------------------------------------------------
    def aux_model(self) -> torch.nn.Module:
        return self.aux_policy if self.aux_policy is not None else self.policy

    def aux_free_text(self, prompts: Sequence[str], budgets: Sequence[int], stream: int) -> Rollout:
        engine = self.engine(stop=[], max_turns=1)
        engine.model = self.aux_model()
        cap = self.hparams.aux_max_new_tokens
        return engine.generate(prompts, max_new_tokens=[max(1, min(b, cap)) for b in budgets],
                               generator=self.generator(stream=stream))

    def aux_slots(self, prompts: Sequence[str], templates: Sequence[Sequence[int]], choices: str,
                  stream: int) -> Rollout:
        return sample_slots(self.aux_model(), self.tokenizer, [self.encode(p) for p in prompts], templates,
                            [self.token_id(c) for c in choices], temperature=self.rollout_cfg.get("temperature", 1.0),
                            generator=self.generator(stream=stream))

    def segment(self, texts: Sequence[str]) -> tuple[Rollout, list[list[str] | None]]:
        """One segmentation per response: the seg transitions and each response's chunks (None: invalid)."""
        if self.hparams.decode_mode == "choice":
            sentences = [split_sentences(t) for t in texts]
            rollout = self.aux_slots([self.seg_prompt(t) for t in texts], [self.seg_template(s) for s in sentences],
                                     CUT + KEEP, stream=3)
            cut = self.token_id(CUT)
            chunks = []
            for i, sents in enumerate(sentences):
                decisions = rollout.response_ids[i][rollout.response_mask[i].bool()].tolist()
                chunks.append(merge_sentences(sents, [d == cut for d in decisions]) if sents else None)
            return rollout, chunks
        tag_cost = len(self.encode("<seg></seg>"))
        budgets = [len(self.encode(t)) + tag_cost * (len(split_sentences(t)) + 1) for t in texts]
        rollout = self.aux_free_text([self.seg_prompt(t) for t in texts], budgets, stream=3)
        parsed = [parse_segments(out) for out in rollout.texts]
        return rollout, [c if lossless(c, t) else None for c, t in zip(parsed, texts)]

    def rate(self, chunks: Sequence[Sequence[str]], samples: Sequence[Mapping[str, Any]]
             ) -> tuple[Rollout | None, list[list[int] | None]]:
        """One scoring per segmentation: the score transitions (None for the oracle) and the scores (None: invalid)."""
        if self.hparams.oracle_scorer:
            return None, [oracle_scores(c, s) for c, s in zip(chunks, samples)]
        prompts = [self.score_prompt(c) for c in chunks]
        if self.hparams.decode_mode == "choice":
            rollout = self.aux_slots(prompts, [self.score_template(c) for c in chunks], SCORE_DIGITS, stream=4)
            return rollout, [[int(self.tokenizer.decode([t])) for t in
                              rollout.response_ids[i][rollout.response_mask[i].bool()].tolist()]
                             for i in range(len(chunks))]
        tag_cost = len(self.encode("<score>5</score>"))
        rollout = self.aux_free_text(prompts, [tag_cost * len(c) + 2 for c in chunks], stream=4)
        return rollout, [parse_scores(out, len(c)) for out, c in zip(rollout.texts, chunks)]

    def response_pieces(self, rollout: Rollout, i: int) -> list[str]:
        """The decoded text of each sampled token of response ``i`` (exact for any tokenizer)."""
        ids = rollout.response_ids[i][rollout.response_mask[i].bool()].tolist()
        pieces = [self.tokenizer.decode([t], skip_special_tokens=True) for t in ids]
        if "".join(pieces) == rollout.texts[i]:
            return pieces
        prefixes = [self.tokenizer.decode(ids[:k], skip_special_tokens=True) for k in range(len(ids) + 1)]
        return [prefixes[k + 1][len(prefixes[k]):] for k in range(len(ids))]

    def penalty(self, rollout: Rollout, chunks: Sequence[list[str] | None], scores: Sequence[list[int] | None],
                group_ids: Tensor) -> tuple[Tensor, Tensor]:
        """P(y) per response ([N]) and whether it is importance-weighted (False: the uniform fallback)."""
        lengths = rollout.lengths.float()
        if self.hparams.norm == "max_len":
            norm = torch.full_like(lengths, float(self.rollout_cfg["max_new_tokens"]))
        elif self.hparams.norm == "group_mean":
            _, index = torch.unique(group_ids, return_inverse=True)
            means = torch.zeros(int(index.max()) + 1).index_add_(0, index.cpu(), lengths.cpu())
            norm = (means / torch.bincount(index.cpu()).float())[index.cpu()].to(lengths.device)
        else:
            norm = lengths.clamp(min=1)
        values, weighted = [], []
        for i in range(len(rollout)):
            ok = chunks[i] is not None and scores[i] is not None
            if ok:
                token_lengths = chunk_token_lengths(self.response_pieces(rollout, i), chunks[i])
                values.append(importance_penalty(token_lengths, scores[i], float(norm[i]), self.hparams.g,
                                                 self.hparams.threshold))
            else:
                values.append(float(lengths[i] / norm[i]))
            weighted.append(ok)
        return (torch.tensor(values, device=self.device),
                torch.tensor(weighted, dtype=torch.bool, device=self.device))

    # -- training -----------------------------------------------------------------------------
    def collect(self, batch: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """One multi-agent rollout of a batch of problems.

        Returns the mixed buffer (``rollout``; ``rewards`` and ``group_ids`` = role * B + problem, one per
        row; reasoning rows first, then segmentation, then scoring), the per-response ``penalty``, the
        ``learned_scores`` (scores sampled from the policy) and the step's ``metrics``.
        """
        group, n_problems = self.hparams.group_size, len(batch)
        reasoning = self.rollout(batch)
        samples = [s for s in batch for _ in range(group)]
        problem = self.group_ids(n_problems, group, self.device)
        accuracy = self.reward(reasoning, samples)[1]["accuracy"]
        seg_rollout, chunks = self.segment(reasoning.texts)
        rated = [i for i, c in enumerate(chunks) if c is not None]
        score_rollout, rated_scores = self.rate([chunks[i] for i in rated], [samples[i] for i in rated]) \
            if rated else (None, [])
        scores: list[list[int] | None] = [None] * len(chunks)
        for i, s in zip(rated, rated_scores):
            scores[i] = s
        seg_valid = torch.tensor([c is not None for c in chunks], device=self.device)
        score_valid = torch.tensor([s is not None for s in scores], device=self.device)
        penalty, weighted = self.penalty(reasoning, chunks, scores, problem)
        rewards = role_rewards(accuracy, penalty, self.hparams.alpha, seg_valid, score_valid,
                               penalty_on=self.hparams.penalty_on, aux_role_reward=self.hparams.aux_role_reward,
                               format_penalty=self.hparams.format_penalty)

        rated_index = torch.as_tensor(rated, dtype=torch.long, device=self.device)
        parts = [(reasoning, rewards["reason"], problem)]
        if self.aux_policy is None:   # frozen agents contribute no transitions
            parts.append((seg_rollout, rewards["seg"], problem + n_problems))
            if score_rollout is not None:
                parts.append((score_rollout, rewards["score"][rated_index], problem[rated_index] + 2 * n_problems))

        flat = [w for s in scores if s is not None for w in s]
        metrics = {
            "reward": float(rewards["reason"].mean()), "accuracy": float(accuracy.mean()),
            "length": float(reasoning.lengths.float().mean()), "penalty": float(penalty.mean()),
            "weighted_share": float(weighted.float().mean()),     # responses not on the uniform fallback
            "seg_valid": float(seg_valid.float().mean()),
            "score_valid": float(score_valid[rated_index].float().mean()) if rated else 0.0,
            "chunks": sum(len(chunks[i]) for i in rated) / max(len(rated), 1),
            "mean_score": sum(flat) / max(len(flat), 1),
            "share_w1": flat.count(1) / max(len(flat), 1), "share_w5": flat.count(5) / max(len(flat), 1),
            "reward/seg": float(rewards["seg"].mean()),
            "reward/score": float(rewards["score"][rated_index].mean()) if rated else 0.0,
        }
        if all("fillers" in s for s in samples):   # the task marks its redundant sentences: measure against them
            metrics["fillers"] = sum(count_fillers(t, s["fillers"]) for t, s in zip(reasoning.texts, samples)) \
                / len(samples)
            on_fillers = [w for i in rated if scores[i] is not None and score_rollout is not None
                          for w, o in zip(scores[i], oracle_scores(chunks[i], samples[i])) if o == 1]
            if on_fillers:   # inflation shows here first: a filler-only chunk deserves 1
                metrics["score_on_fillers"] = sum(on_fillers) / len(on_fillers)
        return {"rollout": Rollout.concat([p[0] for p in parts], self.tokenizer.pad_token_id),
                "rewards": torch.cat([p[1] for p in parts]), "group_ids": torch.cat([p[2] for p in parts]),
                "penalty": penalty, "learned_scores": flat if score_rollout is not None else [], "metrics": metrics}

    def training_step(self, batch: list[dict[str, Any]], batch_idx: int) -> None:
        collected = self.collect(batch)
        stats = self.update(self.score_batch(collected["rollout"], collected["rewards"], collected["group_ids"]))
        self._rl_steps += 1
        colluding = self.monitor_collusion(collected["learned_scores"])
        record = {"step": self._rl_steps, **collected["metrics"], "collusion": float(colluding), **stats}
        self.history.append(record)
        self.log_dict({f"train/{k}": v for k, v in record.items() if k != "step"}, batch_size=len(batch))
        self.log("train/reward_mean", record["reward"], prog_bar=True, batch_size=len(batch))

    def monitor_collusion(self, learned_scores: Sequence[int]) -> bool:
        """Warn when the learned scorer rates more than ``collusion_share`` of chunks 5 (score inflation)."""
        share = learned_scores.count(5) / len(learned_scores) if learned_scores else 0.0
        colluding = share > self.hparams.collusion_share
        if colluding:
            rank_zero_warn(f"SCMA collusion monitor: more than {self.hparams.collusion_share:.0%} of chunks score 5; "
                           "the scorer may be inflating scores to erase the penalty (try aux_role_reward=acc_only)")
        return colluding

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.aux_policy is not None and not self._rl_steps:
            self.aux_policy.load_state_dict(self.policy.state_dict())   # frozen agents = the warm-started policy

    # -- warm start ---------------------------------------------------------------------------
    def supervised_loss(self, samples: Sequence[Mapping[str, Any]], completions: Sequence[str]) -> Tensor:
        """The reasoning demonstrations' loss, plus the segmentation and scoring roles' on samples with
        labelled sentences (``steps``)."""
        loss = super().supervised_loss(samples, completions)
        labelled = [(s, c) for s, c in zip(samples, completions) if "steps" in s]
        labelled = labelled[:math.ceil(self.hparams.aux_demo_share * len(labelled))]   # the aux roles learn fast
        if labelled:
            loss = loss + self.aux_supervised_loss([s for s, _ in labelled], [c for _, c in labelled])
        return loss

    def aux_demonstration(self, sample: Mapping[str, Any], response: str) -> tuple[list[str], list[bool], list[int]]:
        """Sentences, cut decisions and chunk scores for one demonstration: a cut at every sentence and
        scores 5 (a chunk with an essential sentence) or 1, each label redrawn at random with
        probability ``aux_label_noise``."""
        sentences = split_sentences(response)
        kinds = [kind for _, kind in sample["steps"]]
        if len(kinds) != len(sentences):
            raise ValueError(f"sample steps do not match the sentences of its solution: {response!r}")
        noise, rng = self.hparams.aux_label_noise, self._label_rng
        cuts = [rng.random() >= noise or rng.random() < 0.5 for _ in sentences[1:]]
        essential, k = [kinds[0] == "essential"], 0
        for cut, kind in zip(cuts, kinds[1:]):
            if cut:
                essential.append(False)
                k += 1
            essential[k] = essential[k] or kind == "essential"
        scores = [(5 if e else 1) if rng.random() >= noise else rng.randint(1, 5) for e in essential]
        return sentences, cuts, scores

    def aux_supervised_loss(self, samples: Sequence[Mapping[str, Any]], responses: Sequence[str]) -> Tensor:
        choice = self.hparams.decode_mode == "choice"
        eos = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        prompts, targets, slots = [], [], []
        for sample, response in zip(samples, responses):
            sentences, cuts, scores = self.aux_demonstration(sample, response)
            chunks = merge_sentences(sentences, cuts)
            prompts += [self.encode(self.seg_prompt(response)), self.encode(self.score_prompt(chunks))]
            if choice:
                for template, picks, options in (
                        (self.seg_template(sentences), [CUT if c else KEEP for c in cuts], CUT + KEEP),
                        (self.score_template(chunks), [str(w) for w in scores], SCORE_DIGITS)):
                    ids, positions = self.fill_slots(template, picks)
                    targets.append(ids)
                    slots.append((positions, options))
            else:
                targets += [self.encode("".join(f"<seg>{c}</seg>" for c in chunks)) + eos,
                            self.encode("".join(f"<score>{w}</score>" for w in scores)) + eos]
        batch = pack(prompts, targets, self.tokenizer.pad_token_id, self.device)
        if choice:   # only the decisions are the agent's; the given text is context
            batch.response_mask = torch.zeros_like(batch.response_mask)
            batch.allowed = torch.zeros(len(batch), self.policy.get_output_embeddings().weight.shape[0],
                                        dtype=torch.bool, device=self.device)
            for row, (positions, options) in enumerate(slots):
                batch.response_mask[row, positions] = 1
                batch.allowed[row, [self.token_id(c) for c in options]] = True
        logprobs, _, _ = self.policy_outputs(batch)
        return -aggregate(logprobs, batch.response_mask)

    # -- deployment ---------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, problems: Sequence[str | Mapping[str, Any]]) -> list[str]:
        """Responses of the Reasoning Agent alone (the evaluation decoding), as deployed."""
        samples = [{"prompt": p} if isinstance(p, str) else p for p in problems]
        engine = self.engine(evaluation=True)
        return engine.generate([self.format_prompt(s) for s in samples], generator=self.generator(stream=2)).texts


def oracle_scores(chunks: Sequence[str], sample: Mapping[str, Any]) -> list[int]:
    """1 for a chunk made only of the task's filler sentences, else 5."""
    if "fillers" not in sample:
        raise ValueError("oracle_scorer needs samples with a 'fillers' list (the chain_sum task provides one)")
    fillers = {f.strip() for f in sample["fillers"]}
    return [1 if all(s.strip() in fillers for s in split_sentences(c)) else 5 for c in chunks]


def count_fillers(text: str, fillers: Sequence[str]) -> int:
    """Sentences of a response that are one of the task's filler sentences."""
    known = {f.strip() for f in fillers}
    return sum(s.strip() in known for s in split_sentences(text))
