"""MA4DIV: search result diversification as a one-step cooperative multi-agent game
(Chen et al., WWW 2025, arXiv 2403.17421).

Every candidate document is an agent that picks an integer score; the list is the documents
sorted by score. All agents share one reward, α-NDCG of that list, and learn with QMIX: a
shared agent network gives each agent's utilities Q_i(o_i, ·) and a monotone mixer (weights
from hypernetworks of the state, made non-negative with abs) combines the chosen utilities
into Q_tot, regressed on the reward. Monotonicity makes each agent's own arg-max the joint
arg-max, so inference is one forward pass and a sort.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.base import ZooModule
from zoo.blocks.diversity import (
    ERR_IA_WEIGHTS,
    alpha_ndcg,
    err_ia,
    greedy_ideal,
    s_recall,
)

__all__ = ["AgentNet", "EpsilonSchedule", "MA4DIVModule", "QMixer", "ReplayBuffer", "SelfAttention"]

VARIANTS = ("reference", "pooled")
TIE_BREAKS = ("input", "q_value")
NORMALISERS = ("greedy", "given")


class SelfAttention(nn.Module):
    """The reference attention block: bias-free K, Q, V projections (in -> heads·head_dim), queries and
    keys each divided by head_dim^(1/4), softmax per head, heads concatenated; no output projection,
    residual or norm. Padded tokens (mask False) receive no attention."""

    def __init__(self, in_dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.keys = nn.Linear(in_dim, heads * head_dim, bias=False)
        self.queries = nn.Linear(in_dim, heads * head_dim, bias=False)
        self.values = nn.Linear(in_dim, heads * head_dim, bias=False)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        b, t, _ = x.shape

        def split(proj: Tensor) -> Tensor:
            return proj.view(b, t, self.heads, self.head_dim).transpose(1, 2)

        scale = self.head_dim ** 0.25
        q, k, v = split(self.queries(x)) / scale, split(self.keys(x)) / scale, split(self.values(x))
        logits = q @ k.transpose(-1, -2)
        if mask is not None:
            logits = logits.masked_fill(~mask[:, None, None, :], float("-inf"))
        return (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, t, self.heads * self.head_dim)


def _token_mask(doc_mask: Tensor) -> Tensor:
    return torch.cat([torch.ones_like(doc_mask[:, :1]), doc_mask], dim=1)


def _masked_mean(tokens: Tensor, mask: Tensor) -> Tensor:
    weights = mask.to(tokens.dtype)[..., None]
    return (tokens * weights).sum(1) / weights.sum(1).clamp_min(1)


class AgentNet(nn.Module):
    """Shared agent network: Q_i(o_i, ·) [B, N, M] for every document agent.

    Own branch: attention over the single token [q; d_i] (= its value projection) -> Linear -> ReLU.
    Context branch: attention over the state [q; d_1..d_N], applied twice with tied weights, then
    ``reference``: flattened into a dense layer (order-dependent, fixed N) or ``pooled``: the masked
    mean of the tokens beside the agent's own token (permutation-equivariant).
    """

    def __init__(self, dim: int, n_docs: int, n_actions: int, own_heads: int, own_head_dim: int, ctx_heads: int,
                 ctx_head_dim: int, hidden: int, variant: str = "reference") -> None:
        super().__init__()
        if ctx_heads * ctx_head_dim != dim:
            raise ValueError(f"the context attention is applied twice, so ctx_heads*ctx_head_dim "
                             f"({ctx_heads}*{ctx_head_dim}) must equal the feature width {dim}")
        self.variant = variant
        self.own_attention = SelfAttention(2 * dim, own_heads, own_head_dim)
        self.own_fc = nn.Linear(own_heads * own_head_dim, hidden)
        self.ctx_attention = SelfAttention(dim, ctx_heads, ctx_head_dim)
        self.ctx_fc = nn.Linear((n_docs + 1) * dim if variant == "reference" else 2 * dim, hidden)
        self.head = nn.Linear(2 * hidden, n_actions)

    def forward(self, feats: Tensor, doc_mask: Tensor) -> Tensor:
        b, n = doc_mask.shape
        query, docs = feats[:, :1], feats[:, 1:]
        pairs = torch.cat([query.expand(-1, n, -1), docs], dim=-1).reshape(b * n, 1, -1)
        own = F.relu(self.own_fc(self.own_attention(pairs).view(b, n, -1)))
        tokens_mask = _token_mask(doc_mask)
        ctx = self.ctx_attention(self.ctx_attention(feats, tokens_mask), tokens_mask)
        ctx = ctx * tokens_mask[..., None].to(ctx.dtype)
        if self.variant == "reference":
            shared = F.relu(self.ctx_fc(ctx.flatten(1)))[:, None, :].expand(-1, n, -1)
        else:
            pooled = _masked_mean(ctx, tokens_mask)[:, None, :].expand(-1, n, -1)
            shared = F.relu(self.ctx_fc(torch.cat([pooled, ctx[:, 1:]], dim=-1)))
        return self.head(torch.cat([own, shared], dim=-1))


class QMixer(nn.Module):
    """Monotone mixing: h = ELU(Qᵀ|W1(z)| + b1(z)), Q_tot = hᵀ|w2(z)| + b2(z), the weights from
    hypernetworks of an attention encoding z of the state. Padded agents get zero Q and W1 rows.
    ``reference``: z is the flattened attention output; ``pooled``: z is its masked mean and W1's
    row for agent i comes from [z; token_i]."""

    def __init__(self, dim: int, n_docs: int, heads: int, head_dim: int, embed: int, hypernet: int,
                 variant: str = "reference") -> None:
        super().__init__()
        self.variant, self.embed, self.n_docs = variant, embed, n_docs
        width = heads * head_dim
        z_dim = (n_docs + 1) * width if variant == "reference" else width
        self.attention = SelfAttention(dim, heads, head_dim)
        w1_in, w1_out = (z_dim, n_docs * embed) if variant == "reference" else (2 * width, embed)
        self.hyper_w1 = nn.Sequential(nn.Linear(w1_in, hypernet), nn.ReLU(), nn.Linear(hypernet, w1_out))
        self.hyper_b1 = nn.Linear(z_dim, embed)
        self.hyper_w2 = nn.Sequential(nn.Linear(z_dim, hypernet), nn.ReLU(), nn.Linear(hypernet, embed))
        self.hyper_b2 = nn.Sequential(nn.Linear(z_dim, embed), nn.ReLU(), nn.Linear(embed, 1))

    def forward(self, chosen_q: Tensor, feats: Tensor, doc_mask: Tensor) -> Tensor:
        b, n = doc_mask.shape
        tokens_mask = _token_mask(doc_mask)
        tokens = self.attention(feats, tokens_mask) * tokens_mask[..., None].to(feats.dtype)
        if self.variant == "reference":
            z = tokens.flatten(1)
            w1 = self.hyper_w1(z).view(b, n, self.embed)
        else:
            z = _masked_mean(tokens, tokens_mask)
            w1 = self.hyper_w1(torch.cat([z[:, None, :].expand(-1, n, -1), tokens[:, 1:]], dim=-1))
        real = doc_mask[..., None].to(w1.dtype)
        w1 = w1.abs() * real
        q = chosen_q * doc_mask.to(chosen_q.dtype)
        hidden = F.elu(torch.einsum("bn,bne->be", q, w1) + self.hyper_b1(z))
        return (hidden * self.hyper_w2(z).abs()).sum(-1) + self.hyper_b2(z).squeeze(-1)


class EpsilonSchedule:
    """ε(t) = max(end, start - (start - end)·t/anneal), t counted in episodes."""

    def __init__(self, start: float = 1.0, end: float = 0.1, anneal_episodes: int = 300_000) -> None:
        self.start, self.end, self.anneal = start, end, anneal_episodes

    def __call__(self, episodes: int) -> float:
        if self.anneal <= 0:
            return self.end
        return max(self.end, self.start - (self.start - self.end) * episodes / self.anneal)


class ReplayBuffer:
    """FIFO ring buffer of transitions, stored as tensors allocated on the first push."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.storage: dict[str, Tensor] = {}
        self.size = 0
        self.cursor = 0

    def __len__(self) -> int:
        return self.size

    def push(self, transitions: dict[str, Tensor]) -> None:
        n = next(iter(transitions.values())).shape[0]
        if not self.storage:
            self.storage = {k: v.new_zeros((self.capacity, *v.shape[1:])) for k, v in transitions.items()}
        slots = (self.cursor + torch.arange(n)) % self.capacity
        for key, value in transitions.items():
            self.storage[key][slots.to(value.device)] = value.detach()
        self.cursor = int((self.cursor + n) % self.capacity)
        self.size = min(self.capacity, self.size + n)

    def sample(self, n: int) -> dict[str, Tensor]:
        rows = torch.randint(self.size, (n,))
        return {k: v[rows.to(v.device)] for k, v in self.storage.items()}


class MA4DIVModule(ZooModule):
    """Hooks to override: ``q_values``, ``act``, ``rank``, ``reward``, ``mix``, ``td_loss``."""

    zoo_name = "ma4div"
    card_notes = (
        "Measured (benchmarks/ma4div_dudiv.py): DU-DIV, 894 test queries (seeded 80/20 split, 3,579 train), "
        "synthetic 32-d features from the released subtopic ids (the real 1024-d features are not public), "
        "6,000 updates, alpha = 0.5, greedy-ideal normaliser: alpha-NDCG@5 / @10 = 0.8450 / 0.8751 (reference "
        "architecture), 0.8568 / 0.8826 (pooled, permutation-equivariant variant); random order 0.6806 / 0.7515 "
        "(the spec's anchor over all 4,473 queries: 0.682 / 0.753); relevance-only <q,d> 0.7144 / 0.7475; MMR "
        "greedy 0.7539 / 0.7959; greedy coverage on the true labels 1.0000 (the normaliser itself). With the "
        "reference's stored-permutation normaliser: MA4DIV 0.9172 / 0.9428, random 0.7404 / 0.8109. "
        "Embedded default (generated, 8 candidates, 3k updates): 0.9619 / 0.9775 vs random 0.7506 / 0.8298. "
        "Readings that differ from the reference, each a switch: the reward is alpha-NDCG@N + alpha-NDCG@5 "
        "(`reward_terms`); the normaliser is the greedy ideal (`normaliser=given` for the stored permutation); "
        "ERR-IA intents are uniform (`err_ia_weights=reference`); ties keep the shuffled input order "
        "(`tie_break=q_value`). For a CPU budget: small widths, Adam lr 1e-3 (reference 1e-4), epsilon annealed "
        "over 20k episodes (reference 300k). The reference's '10 x Q/256 updates after each pass' is replaced by "
        "one update of `replay_batch_size` episodes from the FIFO buffer after each collected batch. Validation "
        "monitors the test queries (nothing is selected on it). The replay buffer is not saved in checkpoints "
        "(a resumed run refills it; the epsilon schedule resumes). No TREC source: ClueWeb09 features are not "
        "available, so the TREC qrels serve the metric tests only."
    )

    def __init__(
        self,
        n_docs: int = 8,
        feature_dim: int = 32,
        n_actions: int | None = None,
        variant: str = "reference",
        agent: dict | None = None,
        mixer: dict | None = None,
        alpha: float = 0.5,
        reward_terms: dict | None = None,
        epsilon: dict | None = None,
        replay_capacity: int = 6000,
        replay_batch_size: int | None = 64,
        tie_break: str = "input",
        normaliser: str = "greedy",
        err_ia_weights: str = "uniform",
        metrics_at: list[int] | None = None,
        grad_clip: float | None = 10.0,
        optimizer: dict | None = None,
        scheduler: dict | None = None,
    ) -> None:
        super().__init__()
        for name, value, valid in [("variant", variant, VARIANTS), ("tie_break", tie_break, TIE_BREAKS),
                                   ("normaliser", normaliser, NORMALISERS),
                                   ("err_ia_weights", err_ia_weights, ERR_IA_WEIGHTS)]:
            if value not in valid:
                raise ValueError(f"unknown {name} '{value}'; choose one of {', '.join(valid)}")
        self.save_hyperparameters()
        agent = {"own_heads": 2, "own_head_dim": 16, "ctx_heads": 2, "ctx_head_dim": 16, "hidden": 64, **(agent or {})}
        mixer = {"heads": 2, "head_dim": 16, "embed": 16, "hypernet": 32, **(mixer or {})}
        self.n_actions = n_actions or n_docs
        self.agent = AgentNet(feature_dim, n_docs, self.n_actions, variant=variant, **agent)
        self.mixer = QMixer(feature_dim, n_docs, variant=variant, **mixer)
        self.reward_terms = self._parse_terms(reward_terms or {"N": 1.0, "5": 1.0}, n_docs)
        self.epsilon = EpsilonSchedule(**(epsilon or {"start": 1.0, "end": 0.1, "anneal_episodes": 20000}))
        self.buffer = ReplayBuffer(replay_capacity) if replay_batch_size else None
        self.metrics_at = tuple(metrics_at or (5, 10))
        self.episodes = 0
        self.test_metrics: dict[str, float] = {}

    @staticmethod
    def _parse_terms(terms: dict, n_docs: int) -> list[tuple[int, float]]:
        """``{"N": 1.0, "5": 1.0}`` -> [(n_docs, 1.0), (5, 1.0)]: the reward's α-NDCG cutoffs and weights."""
        parsed = []
        for key, weight in terms.items():
            if str(key) != "N" and not str(key).isdigit():
                raise ValueError(f"reward_terms key {key!r} must be 'N' (the list length) or a cutoff like '5'")
            parsed.append((n_docs if str(key) == "N" else int(key), float(weight)))
        return parsed

    # -- hooks ---------------------------------------------------------------------------
    def q_values(self, batch: dict[str, Tensor]) -> Tensor:
        return self.agent(batch["feats"], batch["doc_mask"])

    def act(self, q: Tensor, epsilon: float) -> Tensor:
        """ε-greedy per agent: each flips its own coin for a uniform random action."""
        greedy = q.argmax(-1)
        if epsilon <= 0:
            return greedy
        explore = torch.rand(greedy.shape, device=q.device) < epsilon
        return torch.where(explore, torch.randint_like(greedy, self.n_actions), greedy)

    def rank(self, actions: Tensor, q: Tensor, doc_mask: Tensor) -> Tensor:
        """Documents by action, descending, with a stable sort: ties keep the (shuffled) input order, or
        with tie_break=q_value the larger max-Q first. Padded documents go last."""
        order = torch.arange(actions.shape[1], device=actions.device).expand_as(actions)
        if self.hparams.tie_break == "q_value":
            order = torch.sort(q.amax(-1), dim=1, descending=True, stable=True).indices
        key = actions.gather(1, order).masked_fill(~doc_mask.gather(1, order), -1)
        return order.gather(1, torch.sort(key, dim=1, descending=True, stable=True).indices)

    def reward(self, batch: dict[str, Tensor], ranking: Tensor) -> Tensor:
        """Σ_k w_k α-NDCG@k of the ranking (the reference: α-NDCG@N + α-NDCG@5)."""
        ideal = self.ideal(batch)
        total = torch.zeros(ranking.shape[0], dtype=torch.float64, device=ranking.device)
        for k, weight in self.reward_terms:
            total = total + weight * alpha_ndcg(batch["cov"], ranking, k, self.hparams.alpha, ideal)
        return total.float()

    def mix(self, chosen_q: Tensor, batch: dict[str, Tensor]) -> Tensor:
        return self.mixer(chosen_q, batch["feats"], batch["doc_mask"])

    def td_loss(self, q_tot: Tensor, reward: Tensor) -> Tensor:
        """One-step episodes end at once, so the TD(λ) target is the reward itself."""
        return 0.5 * F.mse_loss(q_tot, reward)

    # -- pieces ----------------------------------------------------------------------------
    def ideal(self, batch: dict[str, Tensor]) -> Tensor:
        """The normalising ranking: greedy on the full candidate set, or the dataset's stored permutation."""
        if self.hparams.normaliser == "given":
            given = batch.get("given")
            if given is None or bool((given[batch["doc_mask"]] < 0).any()):
                raise ValueError("normaliser='given' needs a stored permutation for every query (DU-DIV has one)")
            return given.clamp_min(0)
        return greedy_ideal(batch["cov"], self.hparams.alpha, batch["doc_mask"])

    def greedy_ranking(self, batch: dict[str, Tensor]) -> Tensor:
        q = self.q_values(batch)
        return self.rank(self.act(q, 0.0), q, batch["doc_mask"])

    # -- training --------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        epsilon = self.epsilon(self.episodes)
        with torch.no_grad():
            q = self.q_values(batch)
            actions = self.act(q, epsilon)
            reward = self.reward(batch, self.rank(actions, q, batch["doc_mask"]))
        self.episodes += actions.shape[0]
        fresh = {"feats": batch["feats"], "doc_mask": batch["doc_mask"], "actions": actions, "reward": reward}
        sample = fresh
        if self.buffer is not None:
            self.buffer.push(fresh)
            if len(self.buffer) >= self.hparams.replay_batch_size:
                sample = self.buffer.sample(self.hparams.replay_batch_size)
        chosen = self.q_values(sample).gather(-1, sample["actions"][..., None]).squeeze(-1)
        q_tot = self.mix(chosen, sample)
        loss = self.td_loss(q_tot, sample["reward"])
        n = actions.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log("train/reward", reward.mean(), prog_bar=True, batch_size=n)
        self.log("train/epsilon", epsilon, batch_size=n)
        self.log("train/q_tot", q_tot.mean().detach(), batch_size=n)
        return loss

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The ε schedule resumes where it was; the replay buffer is not saved (it refills from new episodes).
        checkpoint["ma4div_episodes"] = self.episodes

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.episodes = int(checkpoint.get("ma4div_episodes", 0))

    # -- evaluation ------------------------------------------------------------------------
    def evaluate(self, batch: dict[str, Tensor], ranking: Tensor, ideal: Tensor | None = None) -> dict[str, Tensor]:
        """Per-query α-NDCG@k, ERR-IA@k and S-recall@k of a ranking."""
        cov, alpha = batch["cov"], self.hparams.alpha
        ideal = self.ideal(batch) if ideal is None else ideal
        out = {}
        for k in self.metrics_at:
            out[f"alpha_ndcg@{k}"] = alpha_ndcg(cov, ranking, k, alpha, ideal)
            out[f"err_ia@{k}"] = err_ia(cov, ranking, k, self.hparams.err_ia_weights, batch["topic_mask"],
                                        batch["doc_mask"])
            out[f"s_recall@{k}"] = s_recall(cov, ranking, k, batch["topic_mask"])
        return out

    def _eval_step(self, batch: dict[str, Tensor]) -> None:
        with torch.no_grad():
            ranking = self.greedy_ranking(batch)
        ideal = self.ideal(batch)
        metrics = self.evaluate(batch, ranking, ideal)
        # The input order is a random shuffle: scoring it gives the random-order baseline alongside.
        identity = torch.arange(ranking.shape[1], device=ranking.device).expand_as(ranking)
        for k in self.metrics_at:
            metrics[f"random/alpha_ndcg@{k}"] = alpha_ndcg(batch["cov"], identity, k, self.hparams.alpha, ideal)
        self.accumulate_metrics({name: values.sum() for name, values in metrics.items()}, ranking.shape[0])

    def _finish_eval(self, prefix: str) -> dict[str, float]:
        return self.reduce_metrics(prefix, prog_bar="alpha_ndcg@5")

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        self._finish_eval("val")

    def on_test_epoch_end(self) -> None:
        self.test_metrics = self._finish_eval("test")

