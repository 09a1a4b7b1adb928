"""Generic policy-gradient entries: ``grpo`` (critic-free, group baselines) and ``ppo`` (value head + GAE).

One training step: rollout -> reward -> advantage -> ``ppo_epochs`` passes over shuffled
mini-batches of the clipped surrogate (+ KL to a frozen reference, + technique terms).
Each stage is a hook a subclass overrides: ``format_prompt``, ``rollout``, ``reward``,
``advantage``, ``policy_loss`` (and ``actor_loss`` around it).

Techniques read per-token logits and the response mask: every term in ``self.loss_terms``
is called as ``term(logits, mask, module)`` inside the actor loss and added to it. Token-batch
techniques (EntroDrop) edit the supervised warm start's batches: every ``self.batch_transforms``
entry is called as ``transform(batch, module, step, total_steps)`` on each of them.
"""
from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from zoo.backbones import build_backbone
from zoo.base import ZooModule
from zoo.blocks.metrics import pass_at_k
from zoo.blocks.rl.advantages import get_advantage
from zoo.blocks.rl.losses import aggregate, get_policy_loss, kl_penalty, value_loss
from zoo.blocks.rl.rewards import get_reward
from zoo.blocks.rl.rollout import (
    Rollout,
    RolloutEngine,
    entropy_from_logits,
    pack,
    response_logits,
    token_logprobs,
)

DEFAULT_ROLLOUT = {"max_new_tokens": 32, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "stop": [], "max_turns": 1}
DEFAULT_EVAL = {"greedy": True, "samples": 1, "temperature": 1.0, "top_p": 1.0}
DEFAULT_LOSS = {"name": "clipped", "clip_low": 0.2, "clip_high": 0.2, "dual_clip": None, "agg": "token_mean",
                "max_length": None}
DEFAULT_KL = {"coef": 0.0, "kind": "k3", "in_reward": False}
DEFAULT_WARM_START = {"steps": 0, "lr": 1.0e-3, "batch_size": 32}

LossTerm = Callable[[Tensor, Tensor, "GRPOModule"], Tensor]


def _merged(default: Mapping[str, Any], given: Mapping[str, Any] | None) -> dict[str, Any]:
    return {**default, **dict(given or {})}


class GRPOModule(ZooModule):
    """Group Relative Policy Optimization over any causal LM (DeepSeekMath, arXiv 2402.03300)."""

    zoo_name = "grpo"
    card_notes = ("Generic GRPO entry of the zoo's policy-gradient core. Advantage estimator, policy loss, "
                  "KL estimator and rewards are chosen by name in the config.")

    def __init__(
        self,
        backbone: str = "tiny-llama-char",
        backbone_overrides: dict[str, Any] | None = None,
        dtype: str = "float32",
        prompt_template: str = "{prompt}",
        chat_template: bool = False,
        system_prompt: str | None = None,
        group_size: int = 4,
        rollout: dict[str, Any] | None = None,
        eval_rollout: dict[str, Any] | None = None,
        rewards: list[dict[str, Any]] | None = None,
        advantage: dict[str, Any] | None = None,
        policy_loss: dict[str, Any] | None = None,
        kl: dict[str, Any] | None = None,
        entropy_coef: float = 0.0,
        ppo_epochs: int = 1,
        mini_batch_size: int = 16,
        max_grad_norm: float | None = 1.0,
        warm_start: dict[str, Any] | None = None,
        seed: int = 0,
        gradient_checkpointing: bool = False,
        optimizer: dict[str, Any] | None = None,
        scheduler: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.rollout_cfg = _merged(DEFAULT_ROLLOUT, rollout)
        self.eval_cfg = _merged(DEFAULT_EVAL, eval_rollout)
        self.loss_cfg = _merged(DEFAULT_LOSS, policy_loss)
        self.kl_cfg = _merged(DEFAULT_KL, kl)
        self.advantage_cfg = dict(advantage or {"name": "grpo", "norm": "group"})
        self.reward_cfg = [dict(r) for r in (rewards or [{"name": "boxed_match"}])]
        self.warm_cfg = _merged(DEFAULT_WARM_START, warm_start)
        get_advantage(self.advantage_cfg["name"])          # fail at construction on unknown names
        get_policy_loss(self.loss_cfg["name"])
        for r in self.reward_cfg:
            get_reward(r["name"])

        self.policy, self.tokenizer = build_backbone(backbone, causal_lm=True, padding_side="left",
                                                     config_overrides=backbone_overrides, dtype=dtype)
        if gradient_checkpointing:
            self.policy.gradient_checkpointing_enable()
        self.ref_policy = None
        if self.kl_cfg["coef"]:
            self.ref_policy = copy.deepcopy(self.policy).requires_grad_(False).eval()
        self.register_buffer("warm_started", torch.tensor(0.0))
        self.loss_terms: dict[str, LossTerm] = {}
        self.batch_transforms: dict[str, Callable[..., None]] = {}
        self._sft_progress = (0, 1)                # (step, steps) of the supervised warm start
        self.history: list[dict[str, float]] = []
        self._rl_steps = 0
        self._eval_records: list[tuple[float, float, float]] = []
        self.test_metrics: dict[str, float] = {}

    def train(self, mode: bool = True) -> GRPOModule:
        super().train(mode)
        if self.ref_policy is not None:
            self.ref_policy.eval()          # the frozen reference never runs dropout
        return self

    # -- hooks -------------------------------------------------------------------------------
    def format_prompt(self, sample: Mapping[str, Any]) -> str:
        text = self.hparams.prompt_template.format(**sample)
        if not self.hparams.chat_template:
            return text
        messages = ([{"role": "system", "content": self.hparams.system_prompt}] if self.hparams.system_prompt else [])
        messages.append({"role": "user", "content": text})
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def engine(self, evaluation: bool = False, **overrides: Any) -> RolloutEngine:
        cfg = dict(self.rollout_cfg)
        if evaluation:
            cfg.update({k: v for k, v in self.eval_cfg.items() if k != "samples"})
        cfg.update(overrides)
        return RolloutEngine(self.policy, self.tokenizer, max_new_tokens=cfg["max_new_tokens"],
                             temperature=cfg.get("temperature", 1.0), top_k=cfg.get("top_k", 0),
                             top_p=cfg.get("top_p", 1.0), greedy=cfg.get("greedy", False), stop=cfg.get("stop", ()),
                             max_turns=cfg.get("max_turns", 1), record_stats_top_k=cfg.get("record_stats_top_k", 0))

    def generator(self, stream: int = 0) -> torch.Generator:
        """A sampling generator seeded by (seed, step, rank, stream): rollouts are reproducible."""
        rank = self.global_rank if self._trainer is not None else 0
        seed = (self.hparams.seed * 1_000_003 + self._rl_steps * 9_973 + rank * 101 + stream) % (2 ** 63)
        return torch.Generator(device=self.device).manual_seed(seed)

    def rollout(self, samples: Sequence[Mapping[str, Any]]) -> Rollout:
        """``group_size`` responses per prompt, the copies of a prompt adjacent."""
        prompts = [self.format_prompt(s) for s in samples for _ in range(self.hparams.group_size)]
        return self.engine().generate(prompts, generator=self.generator())

    def reward(self, rollout: Rollout, samples: Sequence[Mapping[str, Any]]) -> tuple[Tensor, dict[str, Tensor]]:
        """Weighted sum of the configured rewards; the first one is the task's correctness.

        An entry with ``gate: correct`` only counts on responses the first reward marks correct.
        Returns the total [N] and each part [N] (``accuracy`` among them).
        """
        lengths = rollout.lengths.tolist()
        max_tokens = self.rollout_cfg["max_new_tokens"]
        parts: dict[str, list[float]] = {}
        for cfg in self.reward_cfg:
            name = cfg.get("key", cfg["name"])
            options = {k: v for k, v in cfg.items() if k not in ("name", "weight", "gate", "key")}
            fn = get_reward(cfg["name"])
            parts[name] = [fn(text, sample, num_tokens=n, max_tokens=max_tokens, **options)
                           for text, sample, n in zip(rollout.texts, samples, lengths)]
        first = self.reward_cfg[0].get("key", self.reward_cfg[0]["name"])
        correct = torch.tensor(parts[first], device=self.device) >= 1.0
        total = torch.zeros(len(rollout), device=self.device)
        for cfg in self.reward_cfg:
            value = torch.tensor(parts[cfg.get("key", cfg["name"])], device=self.device, dtype=torch.float32)
            if cfg.get("gate") == "correct":
                value = value * correct
            total = total + cfg.get("weight", 1.0) * value
        out = {k: torch.tensor(v, device=self.device, dtype=torch.float32) for k, v in parts.items()}
        out["accuracy"] = correct.float()
        return total, out

    def advantage(self, rewards: Tensor, rollout: Rollout, group_ids: Tensor, **extra: Any) -> tuple[Tensor, Tensor]:
        options = {k: v for k, v in self.advantage_cfg.items() if k != "name"}
        return get_advantage(self.advantage_cfg["name"])(rewards, rollout.response_mask, group_ids=group_ids,
                                                         **options, **extra)

    def policy_loss(self, logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor,
                    mask: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        options = {k: v for k, v in self.loss_cfg.items() if k != "name"}
        if options.get("agg") == "seq_sum_const_norm" and not options.get("max_length"):
            options["max_length"] = self.rollout_cfg["max_new_tokens"]
        return get_policy_loss(self.loss_cfg["name"])(logprobs, old_logprobs, advantages, mask, **options)

    # -- pieces ------------------------------------------------------------------------------
    def policy_outputs(self, rollout: Rollout, model: torch.nn.Module | None = None,
                       hidden: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
        """(log-probs of the response tokens, their logits, last hidden states) under ``model``."""
        logits, states = response_logits(model or self.policy, rollout.input_ids, rollout.attention_mask,
                                         rollout.prompt_width, self.rollout_cfg.get("temperature", 1.0),
                                         rollout.allowed, output_hidden_states=hidden, choices=rollout.choices)
        return token_logprobs(logits, rollout.response_ids), logits, states

    @torch.no_grad()
    def score_batch(self, rollout: Rollout, rewards: Tensor, group_ids: Tensor, **advantage_extra: Any) -> dict[str, Any]:
        """Everything the update needs that does not change during it: old/ref log-probs, values, advantages.

        ``advantage_extra`` reaches the advantage estimator (e.g. ROSE's rollout trees).
        """
        old_logprobs, _, hidden = self.policy_outputs(rollout, hidden=self.uses_values)
        ref_logprobs = self.policy_outputs(rollout, self.ref_policy)[0] if self.ref_policy is not None else None
        old_values = self.values(hidden) * rollout.response_mask if self.uses_values else None
        extra: dict[str, Any] = dict(advantage_extra) if old_values is None else {**advantage_extra, "values": old_values}
        if ref_logprobs is not None and self.kl_cfg.get("in_reward"):
            extra.update(token_kl=kl_penalty(old_logprobs, ref_logprobs, self.kl_cfg["kind"]),
                         kl_coef=self.kl_cfg["coef"])
        advantages, returns = self.advantage(rewards, rollout, group_ids, **extra)
        return {"rollout": rollout, "old_logprobs": old_logprobs, "ref_logprobs": ref_logprobs,
                "old_values": old_values, "advantages": advantages, "returns": returns}

    def actor_loss(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        """Policy loss + KL to the reference + entropy bonus + technique terms (+ the critic's loss)."""
        rollout: Rollout = batch["rollout"]
        mask = rollout.response_mask
        logprobs, logits, hidden = self.policy_outputs(rollout, hidden=self.uses_values)
        loss, stats = self.policy_loss(logprobs, batch["old_logprobs"], batch["advantages"], mask)
        if batch["ref_logprobs"] is not None:
            kl = aggregate(kl_penalty(logprobs, batch["ref_logprobs"], self.kl_cfg["kind"]), mask)
            stats["kl"] = kl.detach()
            if not self.kl_cfg.get("in_reward"):
                loss = loss + self.kl_cfg["coef"] * kl
        if self.hparams.entropy_coef:
            entropy = aggregate(entropy_from_logits(logits), mask)
            loss = loss - self.hparams.entropy_coef * entropy
            stats["entropy"] = entropy.detach()
        for name, term in self.loss_terms.items():
            value = term(logits, mask, self)
            stats[f"term/{name}"] = value.detach()
            loss = loss + value
        if self.uses_values:
            critic = self.critic_loss(self.values(hidden), batch)
            stats["value_loss"] = critic.detach()
            loss = loss + critic
        return loss, stats

    # Critic-free; PPOModule turns these on.
    uses_values = False

    def values(self, hidden: Tensor) -> Tensor:
        raise NotImplementedError("this module has no value head")

    def critic_loss(self, values: Tensor, batch: dict[str, Any]) -> Tensor:
        raise NotImplementedError("this module has no value head")

    def update(self, batch: dict[str, Any]) -> dict[str, float]:
        """``ppo_epochs`` passes over shuffled mini-batches; one optimizer step per mini-batch."""
        optimizer = self.optimizers()
        n = len(batch["rollout"])
        totals: dict[str, float] = {}
        count = 0
        order_gen = self.generator(stream=1)
        for _epoch in range(self.hparams.ppo_epochs):
            order = torch.randperm(n, generator=torch.Generator().manual_seed(int(order_gen.initial_seed()) + _epoch))
            for chunk in order.split(self.hparams.mini_batch_size):
                mini = {k: (None if v is None else v.select(chunk) if isinstance(v, Rollout) else v[chunk.to(v.device)])
                        for k, v in batch.items()}
                loss, stats = self.actor_loss(mini)
                self.manual_backward(loss)
                if self.hparams.max_grad_norm:
                    self.clip_gradients(optimizer, gradient_clip_val=self.hparams.max_grad_norm,
                                        gradient_clip_algorithm="norm")
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                for key, value in {"loss": loss.detach(), **stats}.items():
                    totals[key] = totals.get(key, 0.0) + float(value)
                count += 1
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        return {k: v / max(count, 1) for k, v in totals.items()}

    @staticmethod
    def group_ids(n_prompts: int, group_size: int, device: torch.device | str = "cpu") -> Tensor:
        return torch.arange(n_prompts, device=device).repeat_interleave(group_size)

    # -- Lightning ---------------------------------------------------------------------------
    def training_step(self, batch: list[dict[str, Any]], batch_idx: int) -> None:
        started = time.perf_counter()
        rollout = self.rollout(batch)
        rolled = time.perf_counter()
        samples = [s for s in batch for _ in range(len(rollout) // len(batch))]
        rewards, parts = self.reward(rollout, samples)
        scored = self.score_batch(rollout, rewards, self.group_ids(len(batch), len(rollout) // len(batch),
                                                                   self.device))
        stats = self.update(scored)
        self._rl_steps += 1
        record = {"step": self._rl_steps, "reward": float(rewards.mean()),
                  "accuracy": float(parts["accuracy"].mean()), "length": float(rollout.lengths.float().mean()),
                  **{f"reward/{k}": float(v.mean()) for k, v in parts.items() if k != "accuracy"}, **stats,
                  "seconds/rollout": rolled - started, "seconds/step": time.perf_counter() - started}
        self.history.append(record)
        self.log_dict({f"train/{k}": v for k, v in record.items() if k != "step"}, prog_bar=False,
                      batch_size=len(batch))
        self.log("train/reward_mean", record["reward"], prog_bar=True, batch_size=len(batch))

    def on_fit_start(self) -> None:
        self.policy.train()                 # from_pretrained hands models over in eval mode
        if self.warm_cfg["steps"] and not bool(self.warm_started):
            self.supervised_warm_start()
        if self.ref_policy is not None and not self._rl_steps:
            self.ref_policy.load_state_dict(self.policy.state_dict())   # the reference is the warm-started policy

    def supervised_warm_start(self) -> None:
        """Teacher-forced training on the datamodule's demonstrations, before any RL step.

        Every rank draws the same demonstrations and starts from the same weights, so the
        ranks stay identical without gradient synchronisation.
        """
        from tqdm.auto import tqdm

        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "demonstrations"):
            raise ValueError("warm_start needs a datamodule with demonstrations(count, seed)")
        steps = 1 if self.trainer.fast_dev_run else int(self.warm_cfg["steps"])
        size = int(self.warm_cfg["batch_size"])
        demos = datamodule.demonstrations(steps * size, seed=self.hparams.seed)
        optimizer = torch.optim.AdamW(self.policy.parameters(), lr=self.warm_cfg["lr"], weight_decay=0.0)
        self.policy.train()
        bar = tqdm(range(steps), desc="supervised warm start", disable=None if self.trainer.is_global_zero else True)
        for step in bar:
            chunk = demos[step * size:(step + 1) * size]
            self._sft_progress = (step, steps)
            loss = self.supervised_loss([d for d in chunk], [d["solution"] for d in chunk])
            loss.backward()
            loss = loss.detach()
            torch.nn.utils.clip_grad_norm_(self.policy.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            bar.set_postfix(loss=f"{float(loss):.3f}")
            self.history.append({"warm_step": step + 1, "sft_loss": float(loss)})
        self.warm_started.fill_(1.0)

    def supervised_loss(self, samples: Sequence[Mapping[str, Any]], completions: Sequence[str]) -> Tensor:
        """Token-mean cross-entropy of ``completion + EOS`` after each formatted prompt.

        The ``batch_transforms`` may edit the token batch first (with the warm-start step).
        """
        batch = self.sft_batch(samples, completions)
        for transform in self.batch_transforms.values():
            transform(batch, self, *self._sft_progress)
        logprobs = token_logprobs(self.forward_logits(batch), batch["labels"][:, 1:].clamp(min=0))
        return -aggregate(logprobs, self.token_loss_mask(batch))

    def sft_batch(self, samples: Sequence[Mapping[str, Any]], completions: Sequence[str]) -> dict[str, Tensor]:
        """``input_ids``, ``attention_mask`` and ``labels`` (-100 on prompt and padding) of prompt + completion + EOS."""
        encode = lambda text: self.tokenizer(text, add_special_tokens=False)["input_ids"]
        prompts = [encode(self.format_prompt(s)) for s in samples]
        eos = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        packed = pack(prompts, [encode(c) + eos for c in completions], self.tokenizer.pad_token_id, self.device)
        labels = torch.cat([torch.full_like(packed.prompt_ids, -100),
                            packed.response_ids.masked_fill(packed.response_mask == 0, -100)], dim=1)
        return {"input_ids": packed.input_ids, "attention_mask": packed.attention_mask, "labels": labels}

    def forward_logits(self, batch: dict[str, Tensor]) -> Tensor:
        """Policy logits ``[B, T-1, V]`` (fp32, rollout temperature) of a token batch; entry t predicts labels[:, t+1]."""
        logits, _ = response_logits(self.policy, batch["input_ids"], batch["attention_mask"], 1,
                                    self.rollout_cfg.get("temperature", 1.0))
        return logits

    def token_loss_mask(self, batch: dict[str, Tensor]) -> Tensor:
        return batch["labels"][:, 1:] != -100

    # -- evaluation --------------------------------------------------------------------------
    def evaluate_batch(self, batch: list[dict[str, Any]]) -> None:
        samples_per_prompt = int(self.eval_cfg.get("samples", 1))
        engine = self.engine(evaluation=True)
        prompts = [self.format_prompt(s) for s in batch for _ in range(samples_per_prompt)]
        rollout = engine.generate(prompts, generator=self.generator(stream=2))
        repeated = [s for s in batch for _ in range(samples_per_prompt)]
        rewards, parts = self.reward(rollout, repeated)
        correct = parts["accuracy"].view(len(batch), samples_per_prompt)
        lengths = rollout.lengths.float().view(len(batch), samples_per_prompt)
        for i in range(len(batch)):
            c = int(correct[i].sum())
            self._eval_records.append((float(correct[i].mean()), pass_at_k(samples_per_prompt, c, samples_per_prompt),
                                       float(lengths[i].mean()), float(rewards.view(len(batch), -1)[i].mean())))

    def eval_summary(self, stage: str) -> dict[str, float]:
        records = self._eval_records
        self._eval_records = []
        if not records:
            return {}
        k = int(self.eval_cfg.get("samples", 1))
        columns = list(zip(*records))
        metrics = {f"{stage}/accuracy": sum(columns[0]) / len(records),
                   f"{stage}/length": sum(columns[2]) / len(records),
                   f"{stage}/reward": sum(columns[3]) / len(records)}
        if k > 1:
            metrics[f"{stage}/pass@{k}"] = sum(columns[1]) / len(records)
        return metrics

    def validation_step(self, batch: list[dict[str, Any]], batch_idx: int) -> None:
        self.evaluate_batch(batch)

    def on_validation_epoch_end(self) -> None:
        metrics = self.eval_summary("val")
        if metrics:
            self.log_dict(metrics, sync_dist=True)
            self.history.append({"step": self._rl_steps, **metrics})   # the sanity check is step 0

    def test_step(self, batch: list[dict[str, Any]], batch_idx: int) -> None:
        self.evaluate_batch(batch)

    def on_test_epoch_end(self) -> None:
        metrics = self.eval_summary("test")
        self.log_dict(metrics, sync_dist=True)
        self.test_metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith("test/")}

    def on_train_end(self) -> None:
        if self.trainer.is_global_zero and self.history:
            path = Path(self.trainer.default_root_dir) / "rl_history.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in self.history))

    # -- checkpoints -------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["rl_steps"] = self._rl_steps

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._rl_steps = int(checkpoint.get("rl_steps", 0))

    def backbone_parts(self) -> tuple[Any, Any]:
        return self.policy, self.tokenizer


class PPOModule(GRPOModule):
    """PPO with a value head on the policy's last hidden state and GAE (Schulman et al., arXiv 1707.06347)."""

    zoo_name = "ppo"
    card_notes = ("Generic PPO entry of the zoo's policy-gradient core: a linear value head shares the "
                  "policy trunk; advantages by GAE over sampled tokens (inserted tool tokens are skipped).")
    uses_values = True

    def __init__(self, *args: Any, value_coef: float = 0.5, value_clip: float | None = 0.2, gamma: float = 1.0,
                 lam: float = 0.95, **kwargs: Any) -> None:
        kwargs["advantage"] = kwargs.get("advantage") or {"name": "gae"}
        super().__init__(*args, **kwargs)
        self.save_hyperparameters()
        if self.advantage_cfg["name"] == "gae":
            self.advantage_cfg = {"gamma": gamma, "lam": lam, **self.advantage_cfg}
        self.value_head = torch.nn.Linear(self.policy.config.hidden_size, 1)
        torch.nn.init.zeros_(self.value_head.weight)
        torch.nn.init.zeros_(self.value_head.bias)

    def values(self, hidden: Tensor) -> Tensor:
        return self.value_head(hidden.float()).squeeze(-1)

    def critic_loss(self, values: Tensor, batch: dict[str, Any]) -> Tensor:
        mask = batch["rollout"].response_mask
        return self.hparams.value_coef * value_loss(values, batch["old_values"], batch["returns"], mask,
                                                    self.hparams.value_clip)
