"""Multi-role, multi-turn agents on the policy-gradient core: one shared policy, a separate critic, PPO-GAE.

The base of JADE, M-ASK and Agentic-R's search agent. A paper module writes its control flow as an
**episode**: a generator that yields ``Call``s (one per LLM call: a role, its observation, and for
choice decoding the candidate outputs), receives a ``Response`` for each (the text, and the
``Transition`` it may mark invalid or annotate), calls tools such as the search environment
directly, and finally returns an outcome dict with at least ``prediction``::

    def episode(self, sample, index):
        plan = yield Call("planner", prompt, candidates=workflows)
        if not parse(plan.text): plan.transition.valid = False
        docs = self.env.search(query, stats=stats)           # tools make no transitions
        answer = yield Call("answer", prompt2, candidates=entities)
        return {"prediction": answer.text, "stats": stats}

``run_episodes`` advances every episode of a batch in lockstep and batches all pending calls into
one generation (choice calls through ``sample_choices``, free calls through the ``RolloutEngine``),
so calls of different roles and questions share a forward pass. ``assign_rewards`` (the paper's
reward) sets each transition's scalar reward; it sits on the transition's last sampled token.

Training: every transition of every question is one row of a single buffer; old log-probs and
critic values, GAE (γ = λ = 1 by default: a transition's advantage is its return minus V), advantages
whitened over the global batch, then ``ppo_epochs`` passes of clipped (dual-clip) surrogate plus
clipped value loss over shuffled mini-batches. Under DDP every rank pads its buffer to the same
length, a multiple of the mini-batch size, by duplicating random local transitions (as verl does),
so all ranks run the same number of backward passes.

``decode_mode``: ``choice`` (each role picks one of its candidates; a random tiny model can then
exercise every branch) or ``free`` (free text, parsed by the episode; real models).
"""
from __future__ import annotations

import copy
import random
import time
from collections import defaultdict
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from zoo.blocks.distributed import world
from zoo.blocks.qa import qa_metrics
from zoo.blocks.rl.advantages import gae
from zoo.blocks.rl.choice import sample_choices
from zoo.blocks.rl.losses import value_loss
from zoo.blocks.rl.rollout import Rollout, causal_lm_forward, position_ids
from zoo.blocks.search_env import SearchEnvironment, TrajectoryStats, summarize
from zoo.policy_gradient.module import GRPOModule

DECODE_MODES = ("choice", "free")
EVAL_DECODING = ("greedy", "sample_t1")


@dataclass
class Call:
    role: str
    prompt: str                                  # the observation (role instructions + state)
    candidates: Sequence[str] | None = None      # choice decoding picks one of these
    system: str | None = None                    # the role's system prompt (chat models)
    max_new_tokens: int | None = None            # free decoding budget (default: rollout.max_new_tokens)
    stop: Sequence[str] = ()
    trainable: bool = True                       # False: the call runs but makes no transition


@dataclass
class Transition:
    episode: int
    role: str
    step: int                                    # order of the call within its episode
    text: str
    valid: bool = True                           # the episode clears it on a format violation
    reward: float = 0.0                          # set by assign_rewards
    info: dict[str, Any] = field(default_factory=dict)
    row: int = -1                                # row in the training buffer (-1: not trained on)


@dataclass
class Response:
    text: str
    transition: Transition


Episode = Generator[Call, Response, dict[str, Any]]


def global_masked_whiten(values: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """Whiten over the masked entries of every rank (one mean and variance for the global batch)."""
    mask = mask.to(values.dtype)
    moments = torch.stack([(values * mask).sum(), (values * values * mask).sum(), mask.sum()]).double()
    if world()[1] > 1:
        dist.all_reduce(moments)
    total, squares, count = moments.tolist()
    count = max(count, 1.0)
    mean = total / count
    var = max(squares / count - mean * mean, 0.0) * count / max(count - 1.0, 1.0)
    return (values - mean) * (var + eps) ** -0.5 * mask


class AgentPPOModule(GRPOModule):
    """Base for multi-role agents: subclasses implement ``episode`` and ``assign_rewards``."""

    card_notes = "Multi-role agent trained with PPO-GAE (separate critic) on the zoo's policy-gradient core."

    def __init__(self, *args: Any, decode_mode: str = "choice", eval_decoding: str = "greedy",
                 critic_lr: float = 1e-5, value_clip: float | None = 0.5, gamma: float = 1.0, lam: float = 1.0,
                 max_prompt_tokens: int = 480, format_penalty: float = -1.0, search: dict[str, Any] | None = None,
                 **kwargs: Any) -> None:
        if decode_mode not in DECODE_MODES:
            raise ValueError(f"decode_mode must be one of {DECODE_MODES}, not '{decode_mode}'")
        if eval_decoding not in EVAL_DECODING:
            raise ValueError(f"eval_decoding must be one of {EVAL_DECODING}, not '{eval_decoding}'")
        kwargs.setdefault("policy_loss", {"name": "clipped", "clip_low": 0.2, "clip_high": 0.2, "dual_clip": 3.0,
                                          "agg": "token_mean"})
        kwargs["advantage"] = {"name": "gae"}
        kwargs.setdefault("group_size", 1)
        super().__init__(*args, **kwargs)
        self.save_hyperparameters()
        # The critic: a copy of the policy's initial weights with a scalar head (JADE / M-ASK init it
        # from the same checkpoint as the actor).
        self.critic = copy.deepcopy(self.policy)
        self.value_head = torch.nn.Linear(self.policy.config.hidden_size, 1)
        torch.nn.init.zeros_(self.value_head.weight)
        torch.nn.init.zeros_(self.value_head.bias)
        self.env: SearchEnvironment | None = None

    def setup(self, stage: str) -> None:
        """The search tool over the datamodule's corpus (``search``: k, retriever, query_format, ...)."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if self.env is None and datamodule is not None and hasattr(datamodule, "environment"):
            self.env = datamodule.environment(**dict(self.hparams.search or {}))

    # -- hooks a paper overrides -------------------------------------------------------------
    def episode(self, sample: Mapping[str, Any], index: int) -> Episode:
        raise NotImplementedError("an agent module writes its control flow in episode()")

    def assign_rewards(self, samples: Sequence[Mapping[str, Any]], outcomes: Sequence[dict[str, Any]],
                       transitions: Sequence[list[Transition]]) -> None:
        """Default: every transition gets its episode's ``score`` plus the format penalty if invalid."""
        for outcome, steps in zip(outcomes, transitions):
            for t in steps:
                t.reward = float(outcome.get("score", 0.0)) + (0.0 if t.valid else self.hparams.format_penalty)

    def score(self, prediction: str, sample: Mapping[str, Any]) -> dict[str, float]:
        """Outcome metrics of one prediction (EM, F1, cover-EM against the gold aliases)."""
        return qa_metrics(prediction, sample["golden_answers"])

    def render(self, call: Call) -> str:
        """The prompt text of a call: the chat template for chat models, plain text otherwise."""
        if not self.hparams.chat_template:
            return f"{call.system}\n{call.prompt}" if call.system else call.prompt
        messages = ([{"role": "system", "content": call.system}] if call.system else [])
        messages.append({"role": "user", "content": call.prompt})
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    # -- running episodes --------------------------------------------------------------------
    def run_episodes(self, samples: Sequence[Mapping[str, Any]], evaluation: bool = False
                     ) -> tuple[list[dict[str, Any]], list[list[Transition]], Rollout | None]:
        """Advance every episode until it returns; returns outcomes, transitions and the training buffer."""
        episodes = [self.episode(s, i) for i, s in enumerate(samples)]
        outcomes: list[dict[str, Any] | None] = [None] * len(samples)
        transitions: list[list[Transition]] = [[] for _ in samples]
        pending: dict[int, Call] = {}

        def advance(i: int, response: Response | None) -> None:
            try:
                call = next(episodes[i]) if response is None else episodes[i].send(response)
            except StopIteration as stop:
                if not isinstance(stop.value, dict) or "prediction" not in stop.value:
                    raise TypeError(f"{type(self).__name__}.episode must return a dict with 'prediction'") from None
                outcomes[i] = stop.value
                return
            pending[i] = call

        for i in range(len(samples)):
            advance(i, None)
        chunks: list[Rollout] = []
        offset, stream = 0, 10
        while pending:
            order = sorted(pending)
            calls = [pending.pop(i) for i in order]
            texts, where = self.generate_calls(calls, evaluation, stream)
            stream += 1
            starts: dict[int, int] = {}
            if not evaluation:
                for rollout, _ in where:
                    if id(rollout) not in starts:
                        starts[id(rollout)] = offset
                        chunks.append(rollout)
                        offset += len(rollout)
            for i, call, text, (rollout, row) in zip(order, calls, texts, where):
                t = Transition(i, call.role, len(transitions[i]), text)
                if call.trainable and not evaluation:
                    t.row = starts[id(rollout)] + row
                transitions[i].append(t)
                advance(i, Response(text, t))
        buffer = Rollout.concat(chunks, self.tokenizer.pad_token_id) if chunks else None
        return [o or {} for o in outcomes], transitions, buffer

    def generate_calls(self, calls: Sequence[Call], evaluation: bool, stream: int
                       ) -> tuple[list[str], list[tuple[Rollout, int]]]:
        """Texts for a batch of calls and, per call, (the rollout holding it, its row)."""
        greedy = evaluation and self.hparams.eval_decoding == "greedy"
        temperature = self.rollout_cfg.get("temperature", 1.0)
        generator = self.generator(stream=stream + (1000 if evaluation else 0))
        prompts = [self._prompt_ids(c) for c in calls]
        texts: list[str] = [""] * len(calls)
        where: list[tuple[Rollout, int]] = [(None, -1)] * len(calls)   # type: ignore[list-item]
        choice = [j for j, c in enumerate(calls) if self.hparams.decode_mode == "choice" and c.candidates is not None]
        if choice:
            rollout, _ = sample_choices(self.policy, self.tokenizer, [prompts[j] for j in choice],
                                        [list(calls[j].candidates) for j in choice], temperature=temperature,
                                        greedy=greedy, generator=generator)
            for row, j in enumerate(choice):
                texts[j] = rollout.texts[row]
                where[j] = (rollout, row)
        free = [j for j in range(len(calls)) if j not in set(choice)]
        groups: dict[tuple[int, tuple[str, ...]], list[int]] = defaultdict(list)
        for j in free:
            budget = calls[j].max_new_tokens or self.rollout_cfg["max_new_tokens"]
            groups[(budget, tuple(calls[j].stop))].append(j)
        for (budget, stop), members in groups.items():
            engine = self.engine(evaluation=False, greedy=greedy, max_new_tokens=budget, stop=list(stop),
                                 temperature=temperature if not greedy else 1.0, max_turns=1)
            rollout = engine.generate([prompts[j] for j in members], generator=generator)
            for row, j in enumerate(members):
                texts[j] = rollout.texts[row]
                where[j] = (rollout, row)
        return texts, where

    def _prompt_ids(self, call: Call) -> list[int]:
        ids = self.tokenizer(self.render(call), add_special_tokens=False)["input_ids"]
        limit = self.hparams.max_prompt_tokens
        return ids[-limit:] if limit and len(ids) > limit else ids     # keep the end: the instruction and state

    # -- training ----------------------------------------------------------------------------
    def critic_values(self, rollout: Rollout) -> Tensor:
        """V(s_j) at every response position: the critic's last hidden state through the value head."""
        out = causal_lm_forward(self.critic, 1, input_ids=rollout.input_ids, attention_mask=rollout.attention_mask,
                                position_ids=position_ids(rollout.attention_mask), output_hidden_states=True,
                                use_cache=False)
        hidden = out.hidden_states[-1][:, rollout.prompt_width - 1:-1]
        return self.value_head(hidden.float()).squeeze(-1)

    def equalize(self, rollout: Rollout, rewards: Tensor) -> tuple[Rollout, Tensor]:
        """Under DDP, pad every rank's buffer to one length (a multiple of the mini-batch) by duplicating
        random local transitions, so every rank runs the same number of backward passes."""
        _, size = world()
        if size == 1:
            return rollout, rewards
        count = torch.tensor([len(rollout)], device=self.device)
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        mini = self.hparams.mini_batch_size
        target = -(-int(count) // mini) * mini
        rng = random.Random(self.hparams.seed * 7919 + self._rl_steps)
        extra = [rng.randrange(len(rollout)) for _ in range(target - len(rollout))]
        index = list(range(len(rollout))) + extra
        return rollout.select(index), rewards[torch.as_tensor(index, device=rewards.device)]

    @torch.no_grad()
    def score_batch(self, rollout: Rollout, rewards: Tensor, group_ids: Tensor | None = None,
                    **_: Any) -> dict[str, Any]:
        mask = rollout.response_mask
        old_logprobs, _, _ = self.policy_outputs(rollout)
        old_values = self.critic_values(rollout) * mask
        advantages, returns = gae(rewards, mask, values=old_values, gamma=self.hparams.gamma, lam=self.hparams.lam,
                                  whiten=False)
        return {"rollout": rollout, "old_logprobs": old_logprobs, "ref_logprobs": None, "old_values": old_values,
                "advantages": global_masked_whiten(advantages, mask), "returns": returns}

    def configure_optimizers(self) -> Any:
        actor_cfg = dict(self.hparams.optimizer or {"lr": 1e-4})
        actor_cfg.pop("name", None)
        critic_params = list(self.critic.parameters()) + list(self.value_head.parameters())
        return [torch.optim.AdamW(self.policy.parameters(), **{"weight_decay": 0.0, **actor_cfg}),
                torch.optim.AdamW(critic_params, lr=self.hparams.critic_lr, weight_decay=0.0)]

    def update(self, batch: dict[str, Any]) -> dict[str, float]:
        """PPO epochs over shuffled mini-batches: actor and critic losses summed (disjoint parameters),
        one backward, both optimizers step."""
        actor_opt, critic_opt = self.optimizers()
        n = len(batch["rollout"])
        totals: dict[str, float] = defaultdict(float)
        count = 0
        seed = int(self.generator(stream=1).initial_seed())
        for epoch in range(self.hparams.ppo_epochs):
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
            for chunk in order.split(self.hparams.mini_batch_size):
                mini = {k: (None if v is None else v.select(chunk) if isinstance(v, Rollout) else v[chunk.to(v.device)])
                        for k, v in batch.items()}
                actor, stats = self.actor_loss(mini)
                mask = mini["rollout"].response_mask
                critic = value_loss(self.critic_values(mini["rollout"]), mini["old_values"], mini["returns"], mask,
                                    self.hparams.value_clip)
                self.manual_backward(actor + critic)
                if self.hparams.max_grad_norm:
                    self.clip_gradients(actor_opt, gradient_clip_val=self.hparams.max_grad_norm,
                                        gradient_clip_algorithm="norm")
                    self.clip_gradients(critic_opt, gradient_clip_val=self.hparams.max_grad_norm,
                                        gradient_clip_algorithm="norm")
                actor_opt.step()
                critic_opt.step()
                actor_opt.zero_grad(set_to_none=True)
                critic_opt.zero_grad(set_to_none=True)
                for key, value in {"actor_loss": actor.detach(), "value_loss": critic.detach(), **stats}.items():
                    totals[key] += float(value)
                count += 1
        return {k: v / max(count, 1) for k, v in totals.items()}

    def training_step(self, batch: list[dict[str, Any]], batch_idx: int) -> None:
        started = time.perf_counter()
        outcomes, transitions, buffer = self.run_episodes(batch)
        rolled = time.perf_counter()
        for outcome, sample in zip(outcomes, batch):
            outcome.setdefault("metrics", {}).update(self.score(outcome["prediction"], sample))
        self.assign_rewards(batch, outcomes, transitions)
        flat = [t for steps in transitions for t in steps if t.row >= 0]
        record: dict[str, float] = {}
        if flat and buffer is not None:
            rollout = buffer.select([t.row for t in flat])
            rewards = torch.tensor([t.reward for t in flat], device=self.device, dtype=torch.float32)
            rollout, rewards = self.equalize(rollout, rewards)
            record.update(self.update(self.score_batch(rollout, rewards)))
        self._rl_steps += 1
        record.update(self.episode_metrics(outcomes, transitions))
        record.update({"seconds/rollout": rolled - started, "seconds/step": time.perf_counter() - started})
        self.history.append({"step": self._rl_steps, **record})
        self.log_dict({f"train/{k}": v for k, v in record.items()}, batch_size=len(batch))
        if "f1" in record:
            self.log("train/f1_mean", record["f1"], prog_bar=True, batch_size=len(batch))

    def episode_metrics(self, outcomes: Sequence[dict[str, Any]], transitions: Sequence[list[Transition]]
                        ) -> dict[str, float]:
        """Outcome metrics, tool statistics, and per-role call counts, rewards and invalid rates."""
        n = max(len(outcomes), 1)
        record: dict[str, float] = {}
        names = sorted({k for o in outcomes for k in o.get("metrics", {})})
        for name in names:
            record[name] = sum(float(o.get("metrics", {}).get(name, 0.0)) for o in outcomes) / n
        stats = [o["stats"] for o in outcomes if isinstance(o.get("stats"), TrajectoryStats)]
        if stats:
            record.update(summarize(stats, prefix="env/"))
        by_role: dict[str, list[Transition]] = defaultdict(list)
        for steps in transitions:
            for t in steps:
                by_role[t.role].append(t)
        record["transitions_per_question"] = sum(len(s) for s in transitions) / n
        for role, steps in by_role.items():
            record[f"role/{role}/calls"] = len(steps) / n
            record[f"role/{role}/invalid"] = sum(not t.valid for t in steps) / len(steps)
            record[f"role/{role}/reward"] = sum(t.reward for t in steps) / len(steps)
        return record

    # -- evaluation --------------------------------------------------------------------------
    def evaluate_batch(self, batch: list[dict[str, Any]]) -> None:
        outcomes, transitions, _ = self.run_episodes(batch, evaluation=True)
        sums: dict[str, float] = defaultdict(float)
        for outcome, sample in zip(outcomes, batch):
            for key, value in self.score(outcome["prediction"], sample).items():
                sums[key] += value
            for key, value in outcome.get("metrics", {}).items():
                sums[key] += float(value)
        stats = [o["stats"] for o in outcomes if isinstance(o.get("stats"), TrajectoryStats)]
        if stats:
            for key, value in summarize(stats).items():
                sums[f"env_{key}"] += value * len(stats)
        sums["transitions"] = float(sum(len(s) for s in transitions))
        sums["format_violations"] = float(sum(not t.valid for s in transitions for t in s))
        self.accumulate_metrics(dict(sums), len(batch))

    def validation_step(self, batch: list[dict[str, Any]], batch_idx: int) -> None:
        self.evaluate_batch(batch)

    def on_validation_epoch_end(self) -> None:
        metrics = self.reduce_metrics("val", prog_bar="f1")
        if metrics:
            self.history.append({"step": self._rl_steps, **metrics})

    def test_step(self, batch: list[dict[str, Any]], batch_idx: int) -> None:
        self.evaluate_batch(batch)

    def on_test_epoch_end(self) -> None:
        self.test_metrics = self.reduce_metrics("test", prog_bar="f1")

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.critic.train()
