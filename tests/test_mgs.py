"""MGS (modular gradient surgery): the surgery in zoo/blocks/gradient_surgery.py, the callback, the data."""
import os
import socket
import tempfile

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.pytorch.overrides.distributed import prepare_for_backward
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from callbacks.mgs import MGS
from datamodules.multidomain import MultiDomainDataModule
from zoo.blocks.gradient_surgery import (
    modular_gradient_surgery,
    partition_parameters,
    pcgrad_coefficients,
    projection_orders,
)
from zoo.blocks.rl.rewards import get_reward
from zoo.policy_gradient.module import GRPOModule, PPOModule

NAMES = ["embed.weight", "layers.0.attn.q.weight", "layers.0.mlp.up.weight", "layers.1.attn.q.weight", "head.weight"]
SHAPES = [(4, 3), (3, 3), (5, 3), (3, 3), (2, 3)]


def _grads(domains: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(domains, *s, generator=gen) for n, s in zip(NAMES, SHAPES)}


def _direct_pcgrad(vectors: list[torch.Tensor], orders: list[list[int]]) -> torch.Tensor:
    """Textbook sequential PCGrad on flat vectors: project onto the originals, then sum."""
    out = torch.zeros_like(vectors[0], dtype=torch.float64)
    for i, g in enumerate(vectors):
        h = g.double().clone()
        for j in orders[i]:
            gj = vectors[j].double()
            inner = h @ gj
            if inner < 0 and gj @ gj > 1e-12:
                h = h - inner / (gj @ gj) * gj
        out += h
    return out


def _surgery(grads, granularity="param", seed=0, **kw):
    return modular_gradient_surgery(grads, partition_parameters(list(grads), granularity),
                                    torch.Generator().manual_seed(seed), **kw)


# -- the surgery ---------------------------------------------------------------------------
@pytest.mark.parametrize("granularity", ["param", "module", "block", "layer", "global"])
def test_no_conflict_leaves_the_sum_and_one_domain_is_identity(granularity):
    base = _grads(1)
    aligned = {n: torch.stack([g[0], 0.5 * g[0] + 0.01 * g[0].abs(), 2 * g[0]]) for n, g in base.items()}
    final, stats = _surgery(aligned, granularity)
    assert int(stats.projections.sum()) == 0
    for name, g in aligned.items():
        torch.testing.assert_close(final[name], g.sum(0), atol=1e-7, rtol=0)
    final, _ = _surgery(base, granularity)
    for name, g in base.items():
        assert torch.equal(final[name], g[0])


def test_hand_checked_two_dimensional_projection():
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])          # <g1, g2> = -1: conflict
    final, stats = _surgery({"w": torch.stack([g1, g2])})
    # g1 - (-1/2) g2 = (0.5, 0.5);  g2 - (-1/1) g1 = (0, 1);  sum = (0.5, 1.5)
    torch.testing.assert_close(final["w"], torch.tensor([0.5, 1.5]))
    assert int(stats.projections.sum()) == 2
    g3 = torch.tensor([1.0, 1.0])                                            # <g1, g3> = 1: no conflict
    final, _ = _surgery({"w": torch.stack([g1, g3])})
    torch.testing.assert_close(final["w"], g1 + g3)


def test_global_partition_is_flat_pcgrad_and_gram_form_matches_direct_projection():
    for domains in (2, 3, 4):
        grads = _grads(domains, seed=domains)
        final, _ = _surgery(grads, "global", seed=7)
        orders = projection_orders(1, domains, torch.Generator().manual_seed(7))[0].tolist()
        flat = [torch.cat([g[d].reshape(-1) for g in grads.values()]) for d in range(domains)]
        expected = _direct_pcgrad(flat, orders)
        got = torch.cat([final[n].reshape(-1) for n in grads]).double()
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
        # per parameter: each tensor is PCGrad'ed alone with its own drawn order
        final, _ = _surgery(grads, "param", seed=7)
        orders = projection_orders(len(grads), domains, torch.Generator().manual_seed(7)).tolist()
        for m, (name, g) in enumerate(grads.items()):
            direct = _direct_pcgrad([g[d].reshape(-1) for d in range(domains)], orders[m])
            torch.testing.assert_close(final[name].reshape(-1).double(), direct, atol=1e-6, rtol=1e-6)


def test_two_domains_never_point_against_either_and_ignore_the_order():
    for seed in range(5):
        grads = _grads(2, seed=seed)
        final, stats = _surgery(grads, seed=seed)
        again, _ = _surgery(grads, seed=seed + 100)
        for name, g in grads.items():
            assert (final[name] * g[0]).sum() >= -1e-6 and (final[name] * g[1]).sum() >= -1e-6
            torch.testing.assert_close(final[name], again[name], atol=0, rtol=0)
        gram = stats.gram
        coef, _ = pcgrad_coefficients(gram)
        for m, name in enumerate(stats.modules):
            if gram[m, 0, 1] < 0:
                g = grads[name].reshape(2, -1).double()
                h1 = coef[m, 0] @ g
                assert abs(float(h1 @ g[1])) <= 1e-6 * float(h1.norm() * g[1].norm()) + 1e-12


def test_three_domains_are_deterministic_per_seed():
    grads = _grads(3, seed=11)
    a, _ = _surgery(grads, seed=5)
    b, _ = _surgery(grads, seed=5)
    assert all(torch.equal(a[n], b[n]) for n in grads)
    differs = any(not torch.allclose(_surgery(grads, seed=s)[0][n], a[n]) for s in range(6, 30) for n in grads)
    assert differs                                   # with D >= 3 the order matters: the seed must be shared


def test_locality_against_global_pcgrad():
    x = {"X": torch.tensor([[1.0, 0.0], [-1.0, 0.2]]), "Y": torch.tensor([[0.1, 0.0], [0.1, 0.0]])}
    # case 1: conflict only in X, global inner product negative: MGS keeps Y's sum, global PCGrad changes Y
    mgs, _ = _surgery(x, "param")
    flat, _ = _surgery(x, "global")
    torch.testing.assert_close(mgs["Y"], x["Y"].sum(0))
    assert not torch.allclose(flat["Y"], x["Y"].sum(0))
    # case 2: conflict masked globally by a large agreeing Y: global PCGrad does nothing, MGS projects X
    x["Y"] = torch.tensor([[3.0, 0.0], [3.0, 0.0]])
    mgs, stats = _surgery(x, "param")
    flat, _ = _surgery(x, "global")
    torch.testing.assert_close(flat["X"], x["X"].sum(0))
    assert not torch.allclose(mgs["X"], x["X"].sum(0))
    assert stats.conflicted.tolist() == [True, False]


def test_conflict_flags_do_not_depend_on_scale_and_zero_gradients_are_safe():
    grads = _grads(3, seed=4)
    flags = _surgery(grads)[1].conflicted
    scaled = {n: g * torch.tensor([7.0, 1.0, 1.0])[:, None, None] for n, g in grads.items()}
    assert torch.equal(_surgery(scaled)[1].conflicted, flags)
    grads["head.weight"][1] = 0.0
    final, _ = _surgery(grads, seed=3)
    assert all(torch.isfinite(v).all() for v in final.values())
    others = {"head.weight": grads["head.weight"][[0, 2]]}
    # the zero domain adds nothing and is projected onto by nobody: the other two's 2-domain result
    expected, _ = _surgery(others)
    torch.testing.assert_close(final["head.weight"], expected["head.weight"], atol=1e-6, rtol=1e-6)


def test_partitions_and_exclusion():
    names = ["model.embed_tokens.weight", "model.layers.3.self_attn.q_proj.weight", "model.layers.3.mlp.up_proj.weight",
             "model.layers.3.input_layernorm.weight", "lm_head.weight"]
    assert list(partition_parameters(names, "module").values()) == [
        "model.embed_tokens", "model.layers.3.self_attn.q_proj", "model.layers.3.mlp.up_proj",
        "model.layers.3.input_layernorm", "lm_head"]
    assert list(partition_parameters(names, "block").values())[1:4] == [
        "model.layers.3.self_attn", "model.layers.3.mlp", "model.layers.3.input_layernorm"]
    assert set(list(partition_parameters(names, "layer").values())[1:4]) == {"model.layers.3"}
    assert partition_parameters(names, "param", exclude=["lm_head"])["lm_head.weight"] is None
    with pytest.raises(ValueError, match="unknown MGS partition"):
        partition_parameters(names, "row")


# -- the per-domain step and its distributed form ---------------------------------------------
class Toy(nn.Module):
    """Implements the protocol: per-row weighted regression loss, normalised over the given rows."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))

    def forward(self, x):
        return self.body(x)

    def mgs_units(self, batch):
        return batch["units"]

    def actor_loss(self, batch):
        rows = ((self.body(batch["x"]) - batch["y"]) ** 2).sum(-1)
        return (rows * batch["units"]).sum() / batch["units"].sum(), {"rows": torch.tensor(float(len(rows)))}


def _toy_batch():
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 4, generator=gen), torch.randn(8, 3, generator=gen)
    y[torch.tensor([2, 3, 7])] *= -5                              # domain 1 pulls the other way
    return {"x": x, "y": y, "units": torch.tensor([3.0, 1, 2, 5, 1, 1, 4, 2]),
            "domain": torch.tensor([0, 0, 1, 1, 2, 2, 0, 1])}


def _toy_step(model, batch, reduce_sum=lambda t: t, backward=lambda loss: loss.backward(), step=0):
    callback = MGS(domains=["a", "b", "c"], seed=3)
    loss, stats = callback.domain_step(model, batch, loss_fn=model.actor_loss, backward=backward,
                                       reduce_sum=reduce_sum, step=step)
    return loss, stats, {n: p.grad.clone() for n, p in model.named_parameters()}


def test_plain_mixing_equals_the_gradient_of_the_whole_batch():
    batch = _toy_batch()
    model = Toy()
    loss, stats, grads = _toy_step(model, {**batch})
    callback = MGS(domains=["a", "b", "c"], project=False)
    model.zero_grad()
    callback.domain_step(model, batch, loss_fn=model.actor_loss, backward=lambda l: l.backward(),
                         reduce_sum=lambda t: t, step=0)
    mixed = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    whole, _ = model.actor_loss(batch)
    whole.backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(mixed[name], param.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(loss, whole.detach(), atol=1e-6, rtol=1e-6)
    assert stats["mgs/projections"] > 0 and any(not torch.allclose(grads[n], mixed[n]) for n in grads)
    assert stats["mgs/grad_norm"] == pytest.approx(float(torch.cat([g.reshape(-1) for g in grads.values()]).norm()),
                                                   rel=1e-5)


def test_single_domain_batch_skips_the_surgery():
    batch = _toy_batch()
    only = {k: v[batch["domain"] == 1] for k, v in batch.items()}
    model = Toy()
    _, stats, grads = _toy_step(model, only)
    model.zero_grad()
    whole, _ = model.actor_loss(only)
    whole.backward()
    assert stats["mgs/domains_present"] == 1 and stats["mgs/projections"] == 0
    for name, param in model.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, atol=1e-6, rtol=1e-5)


def _gloo_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = Toy()
        ddp = DistributedDataParallel(model)
        batch = _toy_batch()
        rows = torch.tensor([[0, 1, 6, 4], [2, 3, 5, 7]][rank])  # domains {a, c} vs {b, c}: different mixes
        local = {k: v[rows] for k, v in batch.items()}

        def reduce_sum(t):
            dist.all_reduce(t)
            return t

        def backward(loss):
            # What MGS does around Lightning's manual_backward, whose DDP pre-backward arms the reducer
            # (prepare_for_backward) unless sync is blocked: then the backward would average the ranks'
            # gradients of whatever domain each happens to be on.
            with ddp.no_sync():
                prepare_for_backward(ddp, loss)
                loss.backward()

        _, _, grads = _toy_step(model, local, reduce_sum, backward=backward)
        if rank == 0:
            torch.save(grads, out)
        dist.barrier()
        ddp = None                                               # DDP goes before its process group
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(240)
def test_two_gloo_ranks_equal_one_process_on_the_concatenated_batch(tmp_path):
    single = _toy_step(Toy(), _toy_batch())[2]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "grads.pt")
    mp.spawn(_gloo_worker, args=(2, port, out), nprocs=2, join=True)
    distributed = torch.load(out, weights_only=True)
    for name, grad in single.items():
        torch.testing.assert_close(distributed[name], grad, atol=1e-6, rtol=1e-5, msg=name)


# -- the callback on the policy-gradient modules -------------------------------------------------
SMALL = {"backbone_overrides": {"hidden_size": 32, "intermediate_size": 64}, "group_size": 4,
         "rollout": {"max_new_tokens": 12}, "warm_start": {"steps": 0}, "mini_batch_size": 64,
         "rewards": [{"name": "format", "pattern": "[0-4]"}],     # varies in both domains: both have gradients
         "kl": {"coef": 0.0}, "optimizer": {"name": "SGD", "lr": 0.5}, "max_grad_norm": None}


def _fit(module, callbacks=(), steps=1, mixing="balanced"):
    dm = MultiDomainDataModule(batch_size=4, train_batches=steps, eval_size=4, mixing=mixing)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                        callbacks=list(callbacks), default_root_dir=tempfile.mkdtemp(prefix="zoo-mgs-"))
    trainer.fit(module, dm)
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("cls", [GRPOModule, PPOModule])
def test_callback_on_policy_gradient_modules(cls):
    L.seed_everything(0)
    plain = _fit(cls(**SMALL, seed=0))
    L.seed_everything(0)
    mixed_module = cls(**SMALL, seed=0)
    mixed = _fit(mixed_module, [MGS(project=False)])
    for key, value in plain.items():                             # Mixed RL = the plain step
        torch.testing.assert_close(mixed[key], value, atol=1e-6, rtol=1e-5, msg=key)
    assert "actor_loss" not in vars(mixed_module) and mixed_module.history[-1]["mgs/domains_present"] == 2
    L.seed_everything(0)
    module = cls(**SMALL, seed=0)
    callback = MGS()
    surgered = _fit(module, [callback])
    assert module.history[-1]["mgs/projections"] > 0 and callback.conflict_counts
    assert any(not torch.allclose(surgered[k], plain[k]) for k in plain)
    assert {"reward/arithmetic", "reward/countdown"} <= set(callback.history[-1])


def test_clipping_sees_the_surgered_gradient():
    L.seed_everything(0)
    module = GRPOModule(**{**SMALL, "max_grad_norm": 1e-3})
    seen = []
    clip = module.clip_gradients

    def recording_clip(optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        seen.append(float(torch.cat([p.grad.reshape(-1) for p in module.parameters() if p.grad is not None]).norm()))
        clip(optimizer, gradient_clip_val=gradient_clip_val, gradient_clip_algorithm=gradient_clip_algorithm)

    module.clip_gradients = recording_clip
    _fit(module, [MGS()])
    assert seen and seen[0] == pytest.approx(module.history[-1]["mgs/grad_norm"], rel=1e-5)


def test_clear_errors():
    with pytest.raises(ValueError, match="every sample needs one of"):
        MGS(domains=["arithmetic", "countdown"]).on_train_batch_start(None, None, [{"prompt": "x"}], 0)
    automatic = L.LightningModule()
    with pytest.raises(TypeError, match="manual-optimisation"):
        MGS(domains=["a"]).setup(L.Trainer(logger=False), automatic, "fit")
    with pytest.raises(ValueError, match="unknown reasoning task"):
        MultiDomainDataModule(domains={"x": {"task": "nope", "reward": {"name": "boxed_match"}}})


# -- data ----------------------------------------------------------------------------------
def test_multidomain_samples_are_tagged_mixed_and_verified_by_their_own_reward():
    dm = MultiDomainDataModule(batch_size=8, train_batches=20, eval_size=8)
    train = dm.train_samples()
    assert {s["domain"] for s in train} == {"arithmetic", "countdown"}
    assert 0.3 < sum(s["domain"] == "arithmetic" for s in train) / len(train) < 0.7
    reward = get_reward("domain")
    assert all(reward(s["solution"], s) == 1.0 for s in dm.demonstrations(64, seed=0))
    assert all(reward("<answer>0</answer> \\boxed{-1}", s) == 0.0 for s in dm.eval_samples())
    assert [s["domain"] for s in dm.eval_samples("countdown")] == ["countdown"] * 8
    balanced = MultiDomainDataModule(batch_size=4, train_batches=5, mixing="balanced").train_samples()
    for start in range(0, 20, 4):
        assert sorted(s["domain"] for s in balanced[start:start + 4]) == ["arithmetic"] * 2 + ["countdown"] * 2
