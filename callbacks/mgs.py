"""MGS (modular gradient surgery, arXiv 2602.02301) as a callback for manual-optimisation modules.

Enable with ``'callbacks=[default,mgs]'`` on a multi-domain run (``data=multidomain``). Each
optimizer step's mini-batch is split by domain; every domain's loss is back-propagated on its
own rows into a per-domain gradient buffer; the buffers are all-reduced across ranks; then
``zoo.blocks.gradient_surgery`` projects conflicting domain gradients inside every module and
writes the sum into ``.grad``. The module's own step then clips (after the surgery, as the
spec asks) and steps the optimizer.

Why a callback and not a strategy: the per-domain split needs the loss batch, which only the
module's step sees; a strategy's ``backward`` (like ``on_before_optimizer_step``) receives one
already-summed loss. Under manual optimisation the module calls ``actor_loss`` then
``manual_backward`` itself, so those two calls are where the technique hooks in, and a
callback composes with every trainer config (cpu, ddp_sim, ddp) instead of replacing DDP.
Splitting rows instead of back-propagating D losses from one shared forward costs one
forward and one backward over the same rows as the plain step (in D smaller pieces).

Protocol a module meets (grpo, ppo and their subclasses do, without changes):
- ``automatic_optimization = False``; each optimizer step computes ``loss, stats =
  self.actor_loss(batch)``, calls ``self.manual_backward(loss)``, then clips and steps;
- ``batch`` is a dict of per-row tensors (or objects with ``.select(rows)``, e.g. ``Rollout``)
  and ``actor_loss`` of a subset of rows is that subset's loss, normalised over the subset;
- the rows carry their domain index under ``batch["domain"]``. For the policy-gradient core
  the callback puts it there: it reads each prompt's ``domain`` field in
  ``on_train_batch_start`` and adds the per-row labels to what ``score_batch`` returns (its
  mini-batch slicing then carries them along);
- the normalisation units of each row: ``module.mgs_units(batch)`` if the module defines it,
  else derived from ``module.loss_cfg["agg"]`` and ``batch["rollout"].response_mask`` (tokens
  for ``token_mean``, non-empty sequences for the ``seq_mean_*`` modes, none for sums).

Normalisation: domain ``d``'s loss on a rank is scaled by ``units_d(rank) / units(all ranks)``
(``normalize_per_domain``: ``/ units_d(all ranks)``), and buffers are summed over ranks, so
without conflict the update is the gradient of the whole global batch's loss (Mixed RL), and
two ranks give the single-process update on the concatenated batch. Every per-domain backward
runs under the strategy's ``block_backward_sync`` (DDP's ``no_sync``): DDP would otherwise
average whatever domain each rank happens to back-propagate, and gradients of different
domains must never be mixed before they are filed.

Projection orders come from a generator seeded by ``(seed, global_step)``, identical on every
rank. Logged per step (``mgs/*``): fraction of modules with a negative cosine, projections
made, final gradient norm before clipping, each domain pair's whole-model and median module
cosine, and each domain's mean reward. ``conflict_counts`` accumulates, per module, how many
steps it was in conflict.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy, ParallelStrategy, SingleDeviceStrategy
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from zoo.blocks.gradient_surgery import modular_gradient_surgery, partition_parameters

Batch = dict[str, Any]


def select_rows(batch: Batch, rows: Tensor) -> Batch:
    """The same rows of every per-row entry (``None`` stays ``None``)."""
    out = {}
    for key, value in batch.items():
        if value is None:
            out[key] = None
        elif isinstance(value, Tensor):
            out[key] = value[rows.to(value.device)]
        elif hasattr(value, "select"):
            out[key] = value.select(rows)
        else:
            raise TypeError(f"MGS cannot split batch entry '{key}' ({type(value).__name__}) by rows")
    return out


def default_units(module: Any, batch: Batch) -> Tensor | None:
    """Per-row normalisation units of the policy-gradient core's loss; ``None`` for sum aggregations."""
    mask = batch["rollout"].response_mask
    agg = (getattr(module, "loss_cfg", None) or {}).get("agg", "token_mean")
    if agg == "token_mean":
        return mask.sum(-1).float()
    if agg in ("seq_mean_token_mean", "seq_mean_token_sum"):
        return (mask.sum(-1) > 0).float()
    return None


class MGS(L.Callback):
    def __init__(self, partition: str = "param", project: bool = True, domains: list[str] | None = None,
                 domain_key: str = "domain", normalize_per_domain: bool = False, exclude: list[str] | None = None,
                 seed: int = 0, name: str = "mgs") -> None:
        partition_parameters([], partition)                   # fail early on an unknown granularity
        self.partition, self.project, self.domains = partition, bool(project), list(domains or [])
        self.domain_key, self.normalize_per_domain = domain_key, bool(normalize_per_domain)
        self.exclude, self.seed, self.name = list(exclude or []), int(seed), name
        self.conflict_counts: Counter[str] = Counter()
        self.history: list[dict[str, float]] = []
        self._prompt_domains: Tensor | None = None
        self._handled: Tensor | None = None
        self._step_sums: dict[str, float] = {}
        self._patched: dict[str, Callable | None] = {}

    # -- the per-domain step -------------------------------------------------------------------
    def domain_step(self, module: Any, batch: Batch, *, loss_fn: Callable[[Batch], tuple[Tensor, dict]],
                    backward: Callable[[Tensor], None], reduce_sum: Callable[[Tensor], Tensor],
                    step: int) -> tuple[Tensor, dict[str, Tensor]]:
        """Per-domain backward, all-reduce, surgery; leaves the final gradient in ``.grad``.

        Returns the (detached) sum of the scaled domain losses and the stats: each domain's
        loss stats weighted by its share of the rows' units, plus ``mgs/*`` scalars.
        """
        domain = batch[self.domain_key]
        n_domains = len(self.domains)
        if domain.numel() and int(domain.max()) >= n_domains:
            raise ValueError(f"MGS: domain index {int(domain.max())} outside the {n_domains} domains {self.domains}")
        units_of = getattr(module, "mgs_units", None)
        units = units_of(batch) if callable(units_of) else default_units(module, batch)
        per_row = torch.ones(len(domain), device=domain.device) if units is None else units.to(domain.device)
        local = torch.zeros(n_domains, dtype=torch.float64, device=domain.device)
        local.index_add_(0, domain, per_row.double())
        counts = reduce_sum(local.clone())
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        sizes = [p.numel() for _, p in named]
        for _, param in named:
            param.grad = None                                   # each domain's backward starts from zero
        buffer = torch.zeros(n_domains, sum(sizes), dtype=torch.float32, device=named[0][1].device)
        total_loss = torch.zeros((), device=buffer.device)
        stats: dict[str, Tensor] = {}
        local_total = float(local.sum()) or 1.0
        for d in range(n_domains):
            rows = (domain == d).nonzero().squeeze(-1)
            if rows.numel() == 0:
                continue
            loss, domain_stats = loss_fn(select_rows(batch, rows))
            if units is None:
                weight = 1.0
            else:
                denominator = counts[d] if self.normalize_per_domain else counts.sum()
                weight = float(local[d] / denominator.clamp(min=1e-12))
            scaled = loss * weight
            backward(scaled)
            offset = 0
            for (_, param), size in zip(named, sizes):
                if param.grad is not None:
                    buffer[d, offset:offset + size] = param.grad.reshape(-1)
                    param.grad = None
                offset += size
            total_loss = total_loss + scaled.detach()
            share = float(local[d]) / local_total
            for key, value in domain_stats.items():
                stats[key] = stats.get(key, 0.0) + share * value.detach().float()
        buffer = reduce_sum(buffer)
        grads, offset = {}, 0
        for (name, param), size in zip(named, sizes):
            grads[name] = buffer[:, offset:offset + size].view(n_domains, *param.shape)
            offset += size
        partition = partition_parameters([n for n, _ in named], self.partition, self.exclude)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        present = int((counts > 0).sum())
        final, surgery = modular_gradient_surgery(grads, partition, generator, project=self.project and present > 1)
        for name, param in named:
            param.grad = final[name].to(param.dtype)
        for key, flagged in zip(surgery.modules, surgery.conflicted.tolist()):
            if flagged:
                self.conflict_counts[key] += 1
        summary = {**surgery.summary(self.domains), "domains_present": float(present)}
        for key, value in summary.items():
            stats[f"mgs/{key}"] = torch.tensor(value)
        return total_loss, stats

    # -- wiring into a module --------------------------------------------------------------
    def attach(self, module: Any, trainer: L.Trainer) -> None:
        """Route the module's ``score_batch``, ``actor_loss`` and ``manual_backward`` through MGS (setup does it)."""
        own_loss, own_score, own_backward = module.actor_loss, module.score_batch, module.manual_backward
        strategy = trainer.strategy

        def domain_backward(loss: Tensor) -> None:
            with strategy.block_backward_sync() if isinstance(strategy, ParallelStrategy) else nullcontext():
                own_backward(loss)

        def score_batch(rollout: Any, rewards: Tensor, group_ids: Tensor, **extra: Any) -> dict[str, Any]:
            scored = own_score(rollout, rewards, group_ids, **extra)
            if self._prompt_domains is None:
                return scored
            prompts = self._prompt_domains.to(group_ids.device)
            if int(group_ids.max()) >= len(prompts):
                raise ValueError(f"MGS: group id {int(group_ids.max())} but only {len(prompts)} prompts in the batch")
            scored[self.domain_key] = prompts[group_ids]
            for d, name in enumerate(self.domains):
                picked = scored[self.domain_key] == d
                if picked.any():
                    self._accumulate({f"reward/{name}": float(rewards[picked].float().mean())})
            return scored

        def actor_loss(batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
            if self.domain_key not in batch:
                return own_loss(batch)
            loss, stats = self.domain_step(
                module, batch, loss_fn=own_loss, backward=domain_backward,
                reduce_sum=lambda t: strategy.reduce(t, reduce_op="sum"), step=trainer.global_step)
            self._accumulate({k: float(v) for k, v in stats.items() if k.startswith("mgs/")})
            self._handled = loss
            return loss, stats

        def manual_backward(loss: Tensor, *args: Any, **kwargs: Any) -> None:
            if loss is self._handled:                         # the surgery already wrote the gradients
                self._handled = None
                return
            own_backward(loss, *args, **kwargs)

        wrapped = {"score_batch": score_batch, "actor_loss": actor_loss, "manual_backward": manual_backward}
        for attr, fn in wrapped.items():
            # an instance attribute (another wrapper) is put back on detach; a class method just reappears
            self._patched[attr] = getattr(module, attr) if attr in vars(module) else None
            setattr(module, attr, fn)

    def detach(self, module: Any) -> None:
        """Give the module its own methods back (``teardown`` does this)."""
        for attr, previous in self._patched.items():
            if previous is None:
                delattr(module, attr)
            else:
                setattr(module, attr, previous)
        self._patched = {}

    def _accumulate(self, values: dict[str, float]) -> None:
        for key, value in values.items():
            self._step_sums[key] = self._step_sums.get(key, 0.0) + value
            self._step_sums[f"{key}#n"] = self._step_sums.get(f"{key}#n", 0.0) + 1

    # -- Lightning ---------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        missing = [attr for attr in ("actor_loss", "score_batch", "manual_backward") if not hasattr(pl_module, attr)]
        if pl_module.automatic_optimization or missing:
            problem = ("uses automatic optimisation" if pl_module.automatic_optimization
                       else "lacks " + ", ".join(missing))
            raise TypeError(f"MGS needs a manual-optimisation module whose step calls actor_loss(batch) then "
                            f"manual_backward(loss) (the policy-gradient core); {type(pl_module).__name__} {problem}")
        if not isinstance(trainer.strategy, (SingleDeviceStrategy, DDPStrategy)):
            raise NotImplementedError(f"MGS supports single-device and DDP strategies, not "
                                      f"{type(trainer.strategy).__name__} (sharded buffers need the Gram all-reduce)")
        if not self.domains:
            self.domains = list(getattr(trainer.datamodule, "domains", None) or []) if trainer.datamodule else []
        if not self.domains:
            raise ValueError("MGS needs the domain names: set callbacks.mgs.domains or use a datamodule with a "
                             "`domains` list (datamodules.multidomain.MultiDomainDataModule)")
        self.attach(pl_module, trainer)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.detach(pl_module)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = trainer.strategy.model
        if isinstance(model, DistributedDataParallel) and getattr(model, "static_graph", False):
            raise NotImplementedError("MGS does not support DDP static_graph=True (its first step syncs regardless)")

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        index = {name: i for i, name in enumerate(self.domains)}
        labels = []
        for position, sample in enumerate(batch):
            domain = sample.get(self.domain_key) if isinstance(sample, dict) else None
            if domain not in index:
                raise ValueError(f"MGS: sample {position} of batch {batch_idx} has {self.domain_key}={domain!r}; "
                                 f"every sample needs one of {self.domains} (datamodules.multidomain tags them)")
            labels.append(index[domain])
        self._prompt_domains = torch.tensor(labels, dtype=torch.long)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._prompt_domains = None
        sums, self._step_sums = self._step_sums, {}
        record = {key: value / sums[f"{key}#n"] for key, value in sums.items() if not key.endswith("#n")}
        if record:
            self.history.append({"step": trainer.global_step, **record})
            pl_module.log_dict({k if k.startswith("mgs/") else f"{self.name}/{k}": v for k, v in record.items()},
                               on_step=True, on_epoch=False, batch_size=len(batch))
