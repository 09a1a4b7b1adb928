"""Tree-structured rollouts: responses to one prompt that share prefixes, and what they give the advantage.

A group is a ``RolloutTree``: response ``i`` is a token list with a ``parent`` (-1 for a rollout
from the root) and a ``branch_pos`` ``k``: it copies ``parent.tokens[:k]`` and samples its own
tokens from position ``k`` on. A branch at ``k`` creates a *node* between tokens ``k-1`` and
``k``; the node's members (Ω) are the responses that pass through it, its value is their mean
reward, and the tokens between consecutive nodes on a path (a *segment*) get the difference of
the two node values (ROSE, arXiv 2601.05053, Eqs. 4-8).

Membership (a config switch, ``membership``):

- ``prefix`` (default): a response passes through a node when its tokens up to the node equal
  the node's prefix (paper Eq. 5, "share the exact prefix"); nodes with equal prefixes are one node.
- ``tree``: only the lineage that physically shares the tokens: a child whose resampled token
  happens to equal its parent's still diverges at its branch position.

``TreeRolloutSampler`` grows one tree per prompt with the core ``RolloutEngine``, one batched
generation call per iteration: each new response either restarts from the root (probability
ε) or continues the prefix before the position with the highest branching score among all
positions of all responses of its prompt. Metrics: ``entropy`` (FR3E-like),
``semantic_divergence``, ``semantic_entropy`` (ROSE), ``random``, ``fixed_interval`` (TreePO-like).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from zoo.blocks.rl.advantages import register_advantage
from zoo.blocks.rl.rollout import Rollout, RolloutEngine, pack

BRANCH_METRICS = ("entropy", "semantic_divergence", "semantic_entropy", "random", "fixed_interval")
MEMBERSHIP = ("prefix", "tree")
SD_VARIANTS = ("paper", "dissimilarity")
ENTROPY_KINDS = ("full", "topk")


# -- per-position statistics ---------------------------------------------------------------
def semantic_divergence(probs: Tensor, ids: Tensor, embeddings: Tensor, variant: str = "paper",
                        include_diagonal: bool = False) -> Tensor:
    """SD over the top-k candidates ([..., k] probabilities and token ids) with input embeddings [V, d].

    - ``paper``: ``-Σ_{i≠j} p_i p_j cos(e_i, e_j)`` in closed form ``-(‖Σ p ê‖² - Σ p²)``; with
      ``include_diagonal`` the double sum keeps ``i = j`` (a further ``-Σ p²``).
    - ``dissimilarity``: ``Σ_{i≠j} p_i p_j (1 - cos)`` = ``(Σ p)² - ‖Σ p ê‖²``, never negative
      (the diagonal adds nothing).

    Probabilities are the full-softmax ones, not renormalised over the candidates; zero-probability
    padding slots add nothing.
    """
    if variant not in SD_VARIANTS:
        raise ValueError(f"unknown sd_variant '{variant}'; choose one of {', '.join(SD_VARIANTS)}")
    dtype = torch.promote_types(probs.dtype, torch.float32)            # float64 stays float64
    probs = probs.to(dtype)
    unit = F.normalize(embeddings.to(dtype), dim=-1)[ids]             # [..., k, d]
    mixed = (probs.unsqueeze(-1) * unit).sum(-2)
    cross = mixed.pow(2).sum(-1)                                      # Σ_ij p_i p_j cos_ij, diagonal included
    if variant == "dissimilarity":
        return probs.sum(-1).pow(2) - cross
    return -cross if include_diagonal else -(cross - probs.pow(2).sum(-1))


def truncated_entropy(probs: Tensor) -> Tensor:
    """-Σ p log p over the recorded top-k probabilities only (the reference's vLLM-logprob form)."""
    probs = probs.float()
    return -(probs * probs.clamp_min(1e-30).log()).sum(-1)


# -- the tree ------------------------------------------------------------------------------
@dataclass
class RolloutTree:
    """One prompt's responses with parent pointers and branch positions (see the module docstring)."""

    tokens: list[list[int]] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    branch_pos: list[int] = field(default_factory=list)
    branch_se: list[float | None] = field(default_factory=list)   # SE at the branch point; None for roots

    def add(self, tokens: Sequence[int], parent: int = -1, branch_pos: int = 0, branch_se: float | None = None) -> int:
        tokens = list(tokens)
        if parent < 0:
            if branch_pos != 0:
                raise ValueError("a root rollout has branch_pos 0")
        else:
            if parent >= len(self.tokens):
                raise ValueError(f"parent {parent} does not exist (tree has {len(self.tokens)} responses)")
            source = self.tokens[parent]
            if not 0 <= branch_pos <= len(source):
                raise ValueError(f"branch_pos {branch_pos} outside the parent's {len(source)} tokens")
            if tokens[:branch_pos] != source[:branch_pos]:
                raise ValueError("a child must copy its parent's prefix up to branch_pos exactly")
        self.tokens.append(tokens)
        self.parents.append(parent)
        self.branch_pos.append(branch_pos)
        self.branch_se.append(branch_se)
        return len(self.tokens) - 1

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def lengths(self) -> list[int]:
        return [len(t) for t in self.tokens]

    def depth(self, i: int) -> int:
        """Number of ancestors (0 for a root rollout)."""
        depth = 0
        while self.parents[i] >= 0:
            i, depth = self.parents[i], depth + 1
        return depth

    def owner(self, i: int, t: int) -> int:
        """The response that sampled token ``t`` of response ``i`` (itself or an ancestor)."""
        while t < self.branch_pos[i]:
            i = self.parents[i]
        return i

    def _key(self, i: int, k: int, membership: str) -> object:
        """What identifies the node at position ``k`` on response ``i``'s path."""
        if k == 0:
            return ()
        return tuple(self.tokens[i][:k]) if membership == "prefix" else self.owner(i, k - 1)

    def nodes(self, membership: str = "prefix") -> list[tuple[int, object]]:
        """Distinct branch nodes ``(position, key)`` with position > 0 (position 0 is the root)."""
        if membership not in MEMBERSHIP:
            raise ValueError(f"unknown membership '{membership}'; choose one of {', '.join(MEMBERSHIP)}")
        found = {(k, self._key(p, k, membership)) for p, k in zip(self.parents, self.branch_pos) if p >= 0 and k > 0}
        return sorted(found, key=lambda node: node[0])

    def members(self, node: tuple[int, object], membership: str = "prefix") -> list[int]:
        """Ω: the responses that pass through ``node`` (all of them for the root)."""
        k, key = node
        return [j for j in range(len(self)) if len(self.tokens[j]) >= k and self._key(j, k, membership) == key]

    def path(self, i: int, membership: str = "prefix") -> list[tuple[int, object]]:
        """The interior nodes response ``i`` passes through, by position (root and leaf excluded)."""
        length = len(self.tokens[i])
        return [(k, key) for k, key in self.nodes(membership) if k < length and self._key(i, k, membership) == key]

    def node_values(self, rewards: Sequence[float], membership: str = "prefix") -> dict[tuple[int, object], float]:
        """V(node) = mean reward over Ω(node), for the root ``(0, ())`` and every branch node."""
        values = {(0, ()): sum(rewards) / len(rewards)}
        for node in self.nodes(membership):
            members = self.members(node, membership)
            values[node] = sum(rewards[j] for j in members) / len(members)
        return values

    def segment_advantages(self, rewards: Sequence[float], membership: str = "prefix") -> list[Tensor]:
        """Per response, one advantage per token: V(segment end) - V(segment start) (Eq. 7)."""
        rewards = [float(r) for r in rewards]
        if len(rewards) != len(self):
            raise ValueError(f"{len(rewards)} rewards for a tree of {len(self)} responses")
        values = self.node_values(rewards, membership)
        out = []
        for i, tokens in enumerate(self.tokens):
            nodes = self.path(i, membership)
            bounds = [0] + [k for k, _ in nodes] + [len(tokens)]
            levels = [values[(0, ())]] + [values[n] for n in nodes] + [rewards[i]]
            adv = torch.zeros(len(tokens), dtype=torch.float64)
            for j in range(1, len(bounds)):
                adv[bounds[j - 1]:bounds[j]] = levels[j] - levels[j - 1]
            out.append(adv)
        return out

    def divergence(self, i: int, j: int, membership: str = "prefix") -> int:
        """Position of the deepest node both responses pass through (0 if only the root)."""
        shared = set(self.path(i, membership)) & set(self.path(j, membership))
        return max((k for k, _ in shared), default=0)


def length_calibration(tree: RolloutTree, advantages: Sequence[Tensor], correct: Sequence[bool], alpha: float,
                       membership: str = "prefix") -> list[Tensor]:
    """Eq. 8: shrink positive and amplify negative advantages of longer correct responses.

    For each correct response ``c`` other than the shortest correct one ``s``, with ``b`` their
    divergence node, tokens from ``b`` on get ``A - |A| (1 - ((|s| - b) / (|c| - b))^α)``.
    """
    out = [a.clone() for a in advantages]
    right = [i for i in range(len(tree)) if correct[i]]
    if alpha == 0 or len(right) < 2:
        return out
    lengths = tree.lengths
    shortest = min(right, key=lambda i: (lengths[i], i))
    for c in right:
        if c == shortest:
            continue
        b = tree.divergence(shortest, c, membership)
        ratio = (lengths[shortest] - b) / (lengths[c] - b)
        tail = out[c][b:]
        out[c][b:] = tail - tail.abs() * (1.0 - ratio ** alpha)
    return out


@register_advantage("tree_segment")
def tree_segment(rewards: Tensor, mask: Tensor, *, trees: Sequence[RolloutTree], correct: Tensor | None = None,
                 alpha: float = 1.0, membership: str = "prefix", **_: object) -> tuple[Tensor, Tensor]:
    """ROSE's advantage: segment advantages over each tree, then length-aware calibration.

    Rows are the trees' responses in order (tree 0's responses first). ``correct`` defaults to
    ``rewards >= 1``. No division by the reward std (Dr. GRPO style).
    """
    if sum(len(t) for t in trees) != rewards.shape[0]:
        raise ValueError(f"trees hold {sum(len(t) for t in trees)} responses but there are {rewards.shape[0]} rewards")
    correct = (rewards >= 1.0) if correct is None else correct.bool()
    out = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    row = 0
    for tree in trees:
        rows = slice(row, row + len(tree))
        adv = tree.segment_advantages(rewards[rows].tolist(), membership)
        adv = length_calibration(tree, adv, correct[rows].tolist(), alpha, membership)
        for j, a in enumerate(adv):
            out[row + j, :len(a)] = a.to(out)
        row += len(tree)
    out = out * mask.to(out.dtype)
    return out, out


# -- sampling ------------------------------------------------------------------------------
@dataclass
class _Trace:
    """What the sampler keeps per response to branch from it and to assemble the rollout."""
    logprobs: Tensor      # [L]
    entropy: Tensor       # [L] the entropy the metric uses (full or top-k)
    topk_ids: Tensor      # [L, k]
    topk_probs: Tensor    # [L, k]
    sd: Tensor            # [L]
    finished: bool

    @property
    def se(self) -> Tensor:
        return self.sd * self.entropy

    def prefix(self, k: int) -> _Trace:
        return _Trace(self.logprobs[:k], self.entropy[:k], self.topk_ids[:k], self.topk_probs[:k], self.sd[:k],
                      self.finished)

    def extend(self, tail: _Trace) -> _Trace:
        cat = lambda a, b: torch.cat([a, b])
        return _Trace(cat(self.logprobs, tail.logprobs), cat(self.entropy, tail.entropy),
                      cat(self.topk_ids, tail.topk_ids), cat(self.topk_probs, tail.topk_probs), cat(self.sd, tail.sd),
                      tail.finished)


class TreeRolloutSampler:
    """Grows ``group_size`` responses per prompt as a tree, iteration by iteration, batched across prompts.

    The engine must record per-position statistics (``record_stats_top_k`` = the candidate set
    size for SD). The copied prefix keeps its parent's statistics; the continuation's are fresh.
    Where no position qualifies (``fixed_interval`` on responses shorter than the interval, or
    every point used with ``exclude_used_branch_points``) the response restarts from the root.
    """

    def __init__(self, engine: RolloutEngine, *, epsilon: float = 0.5, metric: str = "semantic_entropy",
                 sd_variant: str = "paper", sd_include_diagonal: bool = False, entropy: str = "full",
                 exclude_used_branch_points: bool = False, interval: int = 8) -> None:
        if not engine.record_stats_top_k:
            raise ValueError("TreeRolloutSampler needs an engine with record_stats_top_k > 0")
        if metric not in BRANCH_METRICS:
            raise ValueError(f"unknown branching metric '{metric}'; choose one of {', '.join(BRANCH_METRICS)}")
        if sd_variant not in SD_VARIANTS:
            raise ValueError(f"unknown sd_variant '{sd_variant}'; choose one of {', '.join(SD_VARIANTS)}")
        if entropy not in ENTROPY_KINDS:
            raise ValueError(f"unknown entropy '{entropy}'; choose one of {', '.join(ENTROPY_KINDS)}")
        if not 0.0 <= epsilon <= 1.0:
            raise ValueError(f"epsilon must lie in [0, 1], got {epsilon}")
        if interval < 1:
            raise ValueError(f"interval must be >= 1, got {interval}")
        self.engine = engine
        self.epsilon = epsilon
        self.metric = metric
        self.sd_variant = sd_variant
        self.sd_include_diagonal = sd_include_diagonal
        self.entropy = entropy
        self.exclude_used = exclude_used_branch_points
        self.interval = interval

    def _encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.engine.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        return list(prompt)

    def _rand(self, n: int, generator: torch.Generator | None) -> Tensor:
        device = generator.device if generator is not None else "cpu"
        return torch.rand(n, generator=generator, device=device).cpu()

    def _scores(self, tree: RolloutTree, traces: list[_Trace], used: list[tuple[int, list[int]]],
                generator: torch.Generator | None) -> Tensor:
        """Branching score of every (response, position), flattened; -inf where branching is not allowed."""
        scores = []
        for i, trace in enumerate(traces):
            length = len(tree.tokens[i])
            if self.metric == "entropy":
                s = trace.entropy.clone()
            elif self.metric == "semantic_divergence":
                s = trace.sd.clone()
            elif self.metric == "semantic_entropy":
                s = trace.se
            else:   # random: uniform over positions; fixed_interval: uniform over segment boundaries
                s = self._rand(length, generator)
                if self.metric == "fixed_interval":
                    on_grid = torch.arange(length) % self.interval == 0
                    on_grid[0] = False
                    s = s.masked_fill(~on_grid, float("-inf"))
            for k, prefix in used:   # the same context gives the same distribution: exclude it everywhere
                if k < length and tree.tokens[i][:k] == prefix:
                    s[k] = float("-inf")
            scores.append(s.float())
        return torch.cat(scores)

    def _choose(self, tree: RolloutTree, traces: list[_Trace], used: list[tuple[int, list[int]]],
                generator: torch.Generator | None) -> tuple[int, int] | None:
        scores = self._scores(tree, traces, used, generator)
        if not bool(torch.isfinite(scores).any()):
            return None
        flat = int(scores.argmax())
        for i, tokens in enumerate(tree.tokens):
            if flat < len(tokens):
                return i, flat
            flat -= len(tokens)
        raise AssertionError("argmax outside the candidates")

    @torch.no_grad()
    def sample(self, prompts: Sequence[str] | Sequence[Sequence[int]], group_size: int,
               generator: torch.Generator | None = None) -> tuple[Rollout, list[RolloutTree]]:
        """``group_size`` responses per prompt; rows are grouped by prompt, in generation order."""
        engine = self.engine
        embeddings = engine.model.get_input_embeddings().weight.detach()
        prompt_ids = [self._encode(p) for p in prompts]
        trees = [RolloutTree() for _ in prompts]
        traces: list[list[_Trace]] = [[] for _ in prompts]
        used: list[list[tuple[int, list[int]]]] = [[] for _ in prompts]
        for iteration in range(group_size):
            draws = self._rand(len(prompts), generator).tolist()
            plans = []
            for b, tree in enumerate(trees):
                branch = None
                if iteration and draws[b] >= self.epsilon:
                    branch = self._choose(tree, traces[b], used[b], generator)
                plans.append(branch or (-1, 0))
            requests = [prompt_ids[b] + trees[b].tokens[i][:k] if i >= 0 else prompt_ids[b]
                        for b, (i, k) in enumerate(plans)]
            budgets = [engine.max_new_tokens - k for _, k in plans]
            out = engine.generate(requests, max_new_tokens=budgets, generator=generator)
            lengths = out.response_attention.sum(-1).tolist()
            sd = semantic_divergence(out.topk_probs, out.topk_ids, embeddings.to(out.topk_ids.device),
                                     self.sd_variant, self.sd_include_diagonal).cpu()
            entropy = (out.entropy if self.entropy == "full" else truncated_entropy(out.topk_probs)).cpu()
            for b, (i, k) in enumerate(plans):
                n = int(lengths[b])
                new = out.response_ids[b, :n].tolist()
                tail = _Trace(out.logprobs[b, :n].cpu(), entropy[b, :n], out.topk_ids[b, :n].cpu(),
                              out.topk_probs[b, :n].cpu(), sd[b, :n], bool(out.finished[b]))
                if i < 0:
                    trees[b].add(new)
                    traces[b].append(tail)
                    continue
                parent = traces[b][i]
                trees[b].add(trees[b].tokens[i][:k] + new, parent=i, branch_pos=k, branch_se=float(parent.se[k]))
                traces[b].append(parent.prefix(k).extend(tail))
                if self.exclude_used:
                    used[b].append((k, trees[b].tokens[i][:k]))
        return self._assemble(prompt_ids, trees, traces), trees

    def _assemble(self, prompt_ids: list[list[int]], trees: list[RolloutTree], traces: list[list[_Trace]]) -> Rollout:
        device = next(self.engine.model.parameters()).device
        tokenizer = self.engine.tokenizer
        rows = [(b, j) for b, tree in enumerate(trees) for j in range(len(tree))]
        responses = [trees[b].tokens[j] for b, j in rows]
        texts = [tokenizer.decode(t, skip_special_tokens=True) for t in responses]
        rollout = pack([prompt_ids[b] for b, _ in rows], responses, self.engine.pad_id, device, texts)
        n, width = rollout.response_ids.shape
        k = traces[0][0].topk_ids.shape[-1]
        logprobs, entropy = torch.zeros(n, width), torch.zeros(n, width)
        topk_ids, topk_probs = torch.zeros(n, width, k, dtype=torch.long), torch.zeros(n, width, k)
        for r, (b, j) in enumerate(rows):
            trace, length = traces[b][j], len(responses[r])
            logprobs[r, :length] = trace.logprobs
            entropy[r, :length] = trace.entropy
            topk_ids[r, :length] = trace.topk_ids
            topk_probs[r, :length] = trace.topk_probs
        finished = torch.tensor([traces[b][j].finished for b, j in rows], device=device)
        return replace(rollout, logprobs=logprobs.to(device), finished=finished, entropy=entropy.to(device),
                       topk_ids=topk_ids.to(device), topk_probs=topk_probs.to(device))
