"""ROSE: tree rollouts that branch at semantic-entropy peaks, restart from the root with probability ε,
and score segments with a length-aware advantage (Zhao et al., ACL 2026, arXiv 2601.05053).

One training step: grow a tree of ``group_size`` responses per prompt (``TreeRolloutSampler``),
reward them, drop prompt groups whose rewards are all equal and refill from the train data
(DAPO dynamic sampling), compute segment advantages with length calibration
(``tree_segment``), then the core's PPO update with the dual-clip surrogate and the Dr. GRPO
constant normaliser. Everything else (warm start, KL reference, evaluation) is ``GRPOModule``'s.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from zoo.blocks.rl.rollout import Rollout
from zoo.blocks.rl.tree import (
    BRANCH_METRICS,
    ENTROPY_KINDS,
    MEMBERSHIP,
    SD_VARIANTS,
    RolloutTree,
    TreeRolloutSampler,
)
from zoo.policy_gradient.module import GRPOModule

DEFAULT_TREE = {"epsilon": 0.5, "metric": "semantic_entropy", "top_k": 20, "sd_variant": "paper",
                "sd_include_diagonal": False, "entropy": "full", "exclude_used_branch_points": False, "interval": 8}
DEFAULT_DYNAMIC = {"enabled": True, "max_gen_batches": 8, "min_kept_fraction": 1.0}
ROSE_ADVANTAGE = {"name": "tree_segment", "alpha": 1.0, "membership": "prefix"}
ROSE_LOSS = {"name": "dual_clip", "clip_low": 0.2, "clip_high": 0.2, "dual_clip": 3.0, "agg": "seq_sum_const_norm",
             "max_length": None}
ROSE_EVAL = {"greedy": False, "samples": 8, "temperature": 0.6, "top_p": 0.95}


def varied_groups(rewards: Tensor, group_size: int) -> Tensor:
    """[groups] bool: the groups whose rewards are not all equal (the only ones with a learning signal)."""
    grouped = rewards.view(-1, group_size)
    return (grouped != grouped[:, :1]).any(dim=1)


def tree_stats(trees: Sequence[RolloutTree]) -> dict[str, float]:
    """Branching statistics: mean depth, root-restart fraction, SE at the branch points and its signs."""
    depths = [tree.depth(i) for tree in trees for i in range(len(tree))]
    later = [tree.parents[i] for tree in trees for i in range(1, len(tree))]   # the first response is always a root
    se = [s for tree in trees for s in tree.branch_se if s is not None]
    stats = {"branch_depth": sum(depths) / max(len(depths), 1),
             "root_restart_fraction": sum(p < 0 for p in later) / max(len(later), 1)}
    if se:
        stats.update({"branch_se": sum(se) / len(se), "branch_se_positive": sum(s > 0 for s in se) / len(se),
                      "branch_se_negative": sum(s < 0 for s in se) / len(se),
                      "branch_se_zero": sum(s == 0 for s in se) / len(se)})
    return stats


class ROSEModule(GRPOModule):
    """ROSE on the zoo's policy-gradient core (tree rollouts + segment advantages + length calibration)."""

    zoo_name = "rose"
    card_notes = (
        "ROSE (arXiv 2601.05053) on the zoo's policy-gradient core. Choices where the paper is ambiguous "
        "(each a config switch): SD is the paper/reference form -Σ_{i≠j} p_i p_j cos with full-softmax, "
        "unrenormalised top-k probabilities (`tree.sd_variant: paper`; `dissimilarity` = Σ_{i≠j} p_i p_j (1-cos); "
        "`tree.sd_include_diagonal` keeps i=j); entropy over the full vocabulary (`tree.entropy: full`; `topk` = the "
        "reference's truncated form over the recorded top-k only, without the sampled token); nodes come from the "
        "explicit tree and membership is exact token-prefix equality (`advantage.membership: prefix`; `tree` = only "
        "the lineage that physically shares the tokens), so the reference's position-keyed merge and its "
        "ancestor-position bug are absent; a used branch point may be chosen again "
        "(`tree.exclude_used_branch_points`); the high-SE token is resampled, the node sits before it; dynamic "
        "sampling refills with random train prompts drawn by a generator seeded by (seed, step, rank), so an "
        "epoch keeps its length and resume is exact, until `min_kept_fraction` of the batch has a reward spread "
        "or `max_gen_batches` generation batches ran, and skips the step when no group survives; loss = dual-clip PPO with the constant normaliser "
        "(`policy_loss.max_length`, default the response budget). The k3 KL term uses the core's token-mean "
        "aggregation, not the constant normaliser of Eq. 9 (β = 0.001, so the difference is small).")

    def __init__(self, *args: Any, tree: dict[str, Any] | None = None,
                 dynamic_sampling: dict[str, Any] | None = None, **kwargs: Any) -> None:
        kwargs["advantage"] = kwargs.get("advantage") or dict(ROSE_ADVANTAGE)
        kwargs["policy_loss"] = kwargs.get("policy_loss") or dict(ROSE_LOSS)
        kwargs["eval_rollout"] = kwargs.get("eval_rollout") or dict(ROSE_EVAL)
        super().__init__(*args, **kwargs)
        self.save_hyperparameters()
        self.tree_cfg = {**DEFAULT_TREE, **(tree or {})}
        self.dynamic_cfg = {**DEFAULT_DYNAMIC, **(dynamic_sampling or {})}
        checks = {"metric": BRANCH_METRICS, "sd_variant": SD_VARIANTS, "entropy": ENTROPY_KINDS}
        for key, allowed in checks.items():
            if self.tree_cfg[key] not in allowed:
                raise ValueError(f"tree.{key} must be one of {', '.join(allowed)}, not '{self.tree_cfg[key]}'")
        if self.advantage_cfg.get("membership", "prefix") not in MEMBERSHIP:
            raise ValueError(f"advantage.membership must be one of {', '.join(MEMBERSHIP)}")
        if not 0.0 < self.dynamic_cfg["min_kept_fraction"] <= 1.0 or self.dynamic_cfg["max_gen_batches"] < 1:
            raise ValueError("dynamic_sampling needs 0 < min_kept_fraction <= 1 and max_gen_batches >= 1")

    # -- hooks -------------------------------------------------------------------------------
    def sampler(self) -> TreeRolloutSampler:
        options = {k: v for k, v in self.tree_cfg.items() if k != "top_k"}
        return TreeRolloutSampler(self.engine(record_stats_top_k=self.tree_cfg["top_k"]), **options)

    def rollout(self, samples: Sequence[Mapping[str, Any]], stream: int = 0) -> tuple[Rollout, list[RolloutTree]]:
        """One tree of ``group_size`` responses per prompt; rows grouped by prompt."""
        prompts = [self.format_prompt(s) for s in samples]
        return self.sampler().sample(prompts, self.hparams.group_size, generator=self.generator(stream))

    # -- dynamic sampling --------------------------------------------------------------------
    def refill_batch(self, index: int) -> list[dict[str, Any]]:
        """A batch of random train prompts, drawn by a generator seeded by (seed, step, rank, index).

        Stateless, so a resumed run refills exactly as the uninterrupted one.
        """
        loader = self.trainer.train_dataloader
        seed = int(self.generator(stream=10 + index).initial_seed())
        order = torch.randperm(len(loader.dataset), generator=torch.Generator().manual_seed(seed))
        return [loader.dataset[i] for i in order[:loader.batch_size].tolist()]

    def collect(self, batch: list[dict[str, Any]]) -> dict[str, Any]:
        """Generate, reward and filter groups until the quota is met or the generation budget is spent."""
        group = self.hparams.group_size
        dynamic = self.dynamic_cfg["enabled"]
        need = math.ceil(self.dynamic_cfg["min_kept_fraction"] * len(batch)) if dynamic else len(batch)
        kept: list[tuple[Rollout, list[RolloutTree], Tensor, Tensor]] = []
        trees_seen: list[RolloutTree] = []
        first: dict[str, float] = {}
        samples, generated, groups_seen, kept_groups, batches = batch, 0, 0, 0, 0
        while True:
            rollout, trees = self.rollout(samples, stream=0 if not batches else 100 + batches)
            rewards, parts = self.reward(rollout, [s for s in samples for _ in range(group)])
            batches += 1
            generated += len(rollout)
            groups_seen += len(samples)
            trees_seen += trees
            if not first:
                first = {"reward": float(rewards.mean()), "accuracy": float(parts["accuracy"].mean()),
                         "length": float(rollout.lengths.float().mean())}
            keep = varied_groups(rewards, group) if dynamic else torch.ones(len(samples), dtype=torch.bool)
            groups = keep.nonzero().flatten().tolist()
            if groups:
                rows = torch.tensor([g * group + j for g in groups for j in range(group)])
                kept.append((rollout.select(rows), [trees[g] for g in groups], rewards[rows.to(rewards.device)],
                             parts["accuracy"][rows.to(rewards.device)]))
                kept_groups += len(groups)
            if kept_groups >= need or batches >= self.dynamic_cfg["max_gen_batches"]:
                break
            samples = self.refill_batch(batches)
        stats = {**first, "kept_fraction": kept_groups / groups_seen, "gen_batches": float(batches),
                 "generated": float(generated), **tree_stats(trees_seen)}
        if not kept:
            return {"stats": {**stats, "groups_trained": 0.0, "skipped": 1.0}}
        trees = [t for _, ts, _, _ in kept for t in ts][:len(batch)]
        rows = len(trees) * group
        rollout = Rollout.concat([r for r, _, _, _ in kept], self.tokenizer.pad_token_id).select(torch.arange(rows))
        rewards = torch.cat([r for _, _, r, _ in kept])[:rows]
        correct = torch.cat([c for _, _, _, c in kept])[:rows]
        stats.update(groups_trained=float(len(trees)), skipped=0.0)
        return {"rollout": rollout, "trees": trees, "rewards": rewards, "correct": correct, "stats": stats}

    # -- Lightning ---------------------------------------------------------------------------
    def training_step(self, batch: list[dict[str, Any]], batch_idx: int) -> None:
        collected = self.collect(batch)
        stats = collected["stats"]
        if not stats["skipped"]:
            trees = collected["trees"]
            scored = self.score_batch(collected["rollout"], collected["rewards"],
                                      self.group_ids(len(trees), self.hparams.group_size, self.device),
                                      trees=trees, correct=collected["correct"])
            stats.update(self.update(scored))
        self._rl_steps += 1
        record = {"step": self._rl_steps, **stats}
        self.history.append(record)
        self.log_dict({f"train/{k}": v for k, v in record.items() if k != "step"}, prog_bar=False,
                      batch_size=len(batch))
        self.log("train/reward_mean", record["reward"], prog_bar=True, batch_size=len(batch))

    def eval_summary(self, stage: str) -> dict[str, float]:
        """The core's metrics plus mean@k (the mean correctness of the k samples, = accuracy)."""
        metrics = super().eval_summary(stage)
        k = int(self.eval_cfg.get("samples", 1))
        if metrics and k > 1:
            metrics[f"{stage}/mean@{k}"] = metrics[f"{stage}/accuracy"]
        return metrics
