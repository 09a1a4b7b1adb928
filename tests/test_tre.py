"""TRE (trust-region entropy): the maths in zoo/blocks/entropy.py and the loss-term callback."""
import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from callbacks.tre import TRE
from datamodules.reasoning import ReasoningDataModule
from zoo.blocks.entropy import entropy, invalid_mass, invalid_token_rate, tail_mass, trust_region, trust_region_entropy
from zoo.policy_gradient.module import GRPOModule, PPOModule

SMALL = {"backbone_overrides": {"hidden_size": 32, "intermediate_size": 64}, "group_size": 4,
         "rollout": {"max_new_tokens": 8}, "warm_start": {"steps": 0}, "mini_batch_size": 64}


def _tre(logits, **kw):
    return trust_region_entropy(logits, **kw)[0]


# -- values ----------------------------------------------------------------------------------
def test_full_region_equals_full_entropy():
    logits = torch.randn(6, 5, 50, generator=torch.Generator().manual_seed(0)) * 2
    full = entropy(logits)
    torch.testing.assert_close(_tre(logits, mode="topk", k=50), full, atol=1e-6, rtol=0)
    torch.testing.assert_close(_tre(logits, mode="topp", p=1.0), full, atol=1e-6, rtol=0)


def test_hand_computed_values():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    q = [math.exp(2) / (math.exp(2) + math.exp(1)), math.exp(1) / (math.exp(2) + math.exp(1))]
    binary = -sum(x * math.log(x) for x in q)
    assert _tre(logits, mode="topk", k=2).item() == pytest.approx(binary * math.log(4) / math.log(2), abs=1e-6)
    assert _tre(logits, mode="topk", k=2, scale=False).item() == pytest.approx(binary, abs=1e-6)
    probs = torch.softmax(logits, -1)[0].tolist()                 # 0.644, 0.237, 0.087, 0.032
    three = [x / sum(probs[:3]) for x in probs[:3]]
    expected = -sum(x * math.log(x) for x in three) * math.log(4) / math.log(3)
    assert _tre(logits, mode="topp", p=0.9).item() == pytest.approx(expected, abs=1e-6)   # 0.644+0.237 < 0.9
    assert entropy(logits).item() == pytest.approx(-sum(x * math.log(x) for x in probs), abs=1e-6)


def test_uniform_logits_give_log_vocab_and_bounds_hold():
    uniform = torch.zeros(3, 40)
    for k in (2, 5, 40):
        torch.testing.assert_close(_tre(uniform, mode="topk", k=k), torch.full((3,), math.log(40)))
    torch.testing.assert_close(_tre(uniform, mode="topp", p=0.5), torch.full((3,), math.log(40)))
    logits = torch.randn(200, 40, generator=torch.Generator().manual_seed(1)) * 3
    for kw in ({"mode": "topk", "k": 3}, {"mode": "topp", "p": 0.9}):
        values = _tre(logits, **kw)
        assert (values >= 0).all() and (values <= math.log(40) + 1e-5).all()


def test_shift_and_tail_invariance():
    logits = torch.randn(8, 30, generator=torch.Generator().manual_seed(2)) * 2
    base = _tre(logits, mode="topk", k=3)
    torch.testing.assert_close(_tre(logits + 7.0, mode="topk", k=3), base)
    torch.testing.assert_close(_tre(logits + 7.0, mode="topp", p=0.9), _tre(logits, mode="topp", p=0.9))
    index, _ = trust_region(logits, "topk", k=3)
    inside = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, index, True)
    torch.testing.assert_close(_tre(logits + 5.0 * inside, mode="topk", k=3), base)     # region logits only
    torch.testing.assert_close(_tre(logits - 3.0 * ~inside, mode="topk", k=3), base)    # the tail moves away


def test_gradient_only_inside_the_region_sums_to_zero_and_matches_the_formula():
    logits = (torch.randn(5, 30, generator=torch.Generator().manual_seed(3)) * 2).requires_grad_()
    for kw in ({"mode": "topk", "k": 4}, {"mode": "topp", "p": 0.8}):
        logits.grad = None
        _tre(logits, scale=False, **kw).sum().backward()
        index, member = trust_region(logits.detach(), kw["mode"], k=4, p=0.8)
        inside = torch.zeros_like(logits, dtype=torch.bool)
        inside.scatter_(1, index, member)
        assert (logits.grad[~inside] == 0).all()
        torch.testing.assert_close(logits.grad.sum(-1), torch.zeros(5), atol=1e-6, rtol=0)
        z = logits.detach().masked_fill(~inside, float("-inf"))
        logq = torch.log_softmax(z, -1)
        q = logq.exp()
        h = -(q * logq.nan_to_num(neginf=0.0)).sum(-1, keepdim=True)
        expected = torch.where(inside, -q * (logq + h), torch.zeros_like(q))
        torch.testing.assert_close(logits.grad, expected, atol=1e-6, rtol=1e-5)


def test_single_token_region_is_zero_without_nan():
    logits = torch.tensor([[20.0, 0.0, 0.0, 0.0]], requires_grad=True)     # top-1 probability ~ 1 > P
    value = _tre(logits, mode="topp", p=0.5)
    value.sum().backward()
    assert value.item() == 0.0 and torch.isfinite(logits.grad).all() and (logits.grad == 0).all()


def test_topp_membership_rule_and_candidate_cap():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()[None]
    for p, size in ((0.79, 2), (0.85, 3), (0.96, 4), (0.5, 1)):
        _, member = trust_region(logits, "topp", p=p)
        assert int(member.sum()) == size, p
    uniform = torch.zeros(1, 1000)
    _, member = trust_region(uniform, "topp", p=0.99)
    assert int(member.sum()) == 256
    # log|A| = log 256 is the local entropy; the scale log|V| / log 256 maps it to log|V|.
    assert _tre(uniform, mode="topp", p=0.99).item() == pytest.approx(math.log(1000), abs=1e-5)
    assert _tre(uniform, mode="topp", p=0.99, scale=False).item() == pytest.approx(math.log(256), abs=1e-5)


def test_masked_positions_contribute_nothing():
    logits = torch.randn(2, 6, 20, generator=torch.Generator().manual_seed(4)).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]])
    term = TRE(mode="tre_k", coef=1.0, diagnostics=False, sparse_grad=False)
    loss = term(logits, mask, None)
    loss.backward()
    assert (logits.grad[mask == 0] == 0).all() and (logits.grad[mask == 1] != 0).any()
    changed = logits.detach().clone()
    changed[mask == 0] = torch.randn_like(changed[mask == 0]) * 10
    assert term(changed, mask, None).item() == pytest.approx(loss.item(), abs=1e-7)
    ones = torch.ones(2, 6, dtype=torch.long)
    per_token, mean = trust_region_entropy(logits.detach(), ones)
    torch.testing.assert_close(mean, per_token.mean())


def test_ascent_moves_region_logits_together_and_global_entropy_raises_the_tail():
    logits = torch.tensor([4.0, 3.0, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0])
    for kind in ("tre", "global"):
        z = logits.clone().requires_grad_()
        value = _tre(z, mode="topk", k=3) if kind == "tre" else entropy(z)
        value.backward()
        step = z.grad
        if kind == "tre":
            assert step[0] < 0 and step[2] > 0 and (step[3:] == 0).all()
        else:
            assert (step[3:] > 0).sum() >= 3


def test_tail_mass_grows_least_under_trust_region_ascent():
    """The spec's unit-level demo: 200 ascent steps on a peaked |V| = 1000 vector; assert the ordering."""
    gen = torch.Generator().manual_seed(0)
    start = torch.cat([torch.tensor([6.0, 5.5, 5.0]), torch.randn(997, generator=gen)])
    tails = {}
    for name, fn in (("global", entropy), ("tre2", lambda z: _tre(z, mode="topk", k=2)),
                     ("tre3", lambda z: _tre(z, mode="topk", k=3))):
        z = start.clone()
        for _ in range(200):
            z.requires_grad_()
            grad, = torch.autograd.grad(fn(z), z)
            z = (z + 0.05 * grad).detach()
        tails[name] = tail_mass(z, 3).item()
    before = tail_mass(start, 3).item()
    assert tails["global"] > tails["tre3"] > tails["tre2"] and tails["tre2"] < before + 0.1


def test_low_precision_large_logits_stay_finite():
    for dtype in (torch.bfloat16, torch.float16):
        logits = (torch.randn(4, 64, generator=torch.Generator().manual_seed(5)) * 1e4).to(dtype).requires_grad_()
        for kw in ({"mode": "topk", "k": 2}, {"mode": "topp", "p": 0.99}):
            value = _tre(logits, **kw)
            value.sum().backward()
            assert torch.isfinite(value).all() and torch.isfinite(logits.grad).all()


def test_forbidden_tokens_are_outside_the_support():
    """Constrained decoding sets logits to -inf: they never join a region nor produce NaN."""
    logits = torch.tensor([[1.0, 0.5, float("-inf"), float("-inf")]], requires_grad=True)
    for kw in ({"mode": "topk", "k": 3}, {"mode": "topp", "p": 1.0}):
        value = _tre(logits, scale=False, **kw)
        value.sum().backward()
        assert value.item() == pytest.approx(entropy(logits.detach()).item(), abs=1e-6)
        assert torch.isfinite(logits.grad).all() and (logits.grad[0, 2:] == 0).all()
        logits.grad = None


def test_diagnostics_and_bad_options():
    logits = torch.tensor([[3.0, 0.0, 0.0, -10.0]])
    probs = torch.softmax(logits, -1)[0]
    assert tail_mass(logits, 2).item() == pytest.approx(float(probs[2:].sum()), abs=1e-6)
    assert invalid_mass(logits, [0, 1]).item() == pytest.approx(float(probs[2:].sum()), abs=1e-6)
    tokens, mask = torch.tensor([[0, 2, 3, 1]]), torch.tensor([[1, 1, 0, 1]])
    assert invalid_token_rate(tokens, mask, [0, 1], 4).item() == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="k >= 2"):
        TRE(mode="tre_k", k=1)
    with pytest.raises(ValueError, match="2 <= k"):
        _tre(logits, mode="topk", k=5)
    with pytest.raises(ValueError, match="unknown TRE mode"):
        TRE(mode="nope")


# -- the loss term in modules --------------------------------------------------------------
def _scored(module):
    samples = ReasoningDataModule(task="arithmetic", batch_size=4, train_batches=1).train_samples()[:4]
    rollout = module.rollout(samples)
    rewards = torch.arange(len(rollout), dtype=torch.float32) % 3          # differing rewards: non-zero advantages
    return module.score_batch(rollout, rewards, module.group_ids(4, module.hparams.group_size))


def test_zero_coefficient_is_bit_identical_and_minimising_raises_tre():
    torch.manual_seed(0)
    module = GRPOModule(**SMALL)
    batch = _scored(module)
    plain, _ = module.actor_loss(batch)
    module.loss_terms["tre"] = TRE(mode="tre_k", coef=0.0)
    with_zero, _ = module.actor_loss(batch)
    assert torch.equal(plain, with_zero)
    module.loss_terms["tre"] = TRE(mode="tre_k", coef=1.0, diagnostics=False, sparse_grad=False)
    logits = module.policy_outputs(batch["rollout"])[1].detach().requires_grad_()
    mask = batch["rollout"].response_mask
    before = trust_region_entropy(logits, mask)[1]
    grad, = torch.autograd.grad(module.loss_terms["tre"](logits, mask, module), logits)
    after = trust_region_entropy(logits.detach() - 0.1 * grad, mask)[1]
    assert after > before                                  # L = L_PPO - alpha * TRE: descent raises TRE


def _fit(module, callback, steps=2):
    import tempfile
    dm = ReasoningDataModule(task="arithmetic", batch_size=4, train_batches=steps, eval_size=4, eval_batch_size=4)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                        callbacks=[callback], default_root_dir=tempfile.mkdtemp(prefix="zoo-tre-"))
    trainer.fit(module, dm)


@pytest.mark.parametrize("cls,mode", [(GRPOModule, "tre_k"), (PPOModule, "tre_p"), (GRPOModule, "global")])
def test_callback_attaches_to_policy_gradient_modules(cls, mode):
    L.seed_everything(0)
    module = cls(**SMALL, rewards=[{"name": "length"}])
    callback = TRE(mode=mode, coef=0.01, k=2, p=0.9)
    _fit(module, callback)
    assert "tre" not in module.loss_terms                   # removed at teardown
    record = module.history[-1]
    assert record["term/tre"] < 0
    assert len(callback.history) == 2 and 0 < callback.history[-1]["entropy"] <= math.log(len(module.tokenizer))
    if mode == "tre_k":
        assert callback.history[-1]["region_size"] == 2
    if mode != "global":
        assert record["term/tre"] == pytest.approx(-0.01 * callback.history[-1]["value"], rel=1e-4)


def test_callback_attaches_to_causal_lm():
    from zoo.causal_lm.module import CausalLMModule

    L.seed_everything(0)
    module = CausalLMModule(backbone="tiny-llama-char", backbone_overrides={"hidden_size": 32, "intermediate_size": 64})
    ids = torch.randint(4, 60, (8, 12), generator=torch.Generator().manual_seed(0))
    rows = [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": i} for i in ids]
    callback = TRE(mode="tre_p", coef=0.01, p=0.5)
    import tempfile
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tempfile.mkdtemp(prefix="zoo-tre-"),
                        callbacks=[callback])
    trainer.fit(module, DataLoader(rows, batch_size=4))
    assert len(callback.history) == 2 and callback.history[-1]["region_size"] >= 1
    plain = module.loss({k: torch.stack([r[k] for r in rows[:4]]) for k in rows[0]})
    module.loss_terms["tre"] = callback
    with_term = module.loss({k: torch.stack([r[k] for r in rows[:4]]) for k in rows[0]})
    assert with_term[1]["term/tre"] < 0 and with_term[0] < plain[0]


def test_callback_needs_loss_terms():
    class Plain(L.LightningModule):
        pass

    with pytest.raises(TypeError, match="loss_terms"):
        TRE().setup(None, Plain(), "fit")


def test_callbacks_list_composes_with_tre():
    from hydra import compose, initialize_config_dir

    from train import OmegaConf  # noqa: F401  (registers the zoo_root resolver)
    from zoo.paths import REPO_ROOT

    with initialize_config_dir(config_dir=str(REPO_ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["experiment=grpo_default", "callbacks=[default,tre]"])
    assert set(cfg.callbacks) == {"checkpoint", "progress", "rng_state", "tre"}
    assert cfg.callbacks.tre._target_ == "callbacks.tre.TRE"


def test_sparse_gradient_matches_the_dense_one_when_the_loss_also_uses_the_logits():
    weight = torch.randn(8, 50, generator=torch.Generator().manual_seed(6), requires_grad=True)
    hidden = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(7))
    grads = []
    for sparse in (False, True):
        weight.grad = None
        logits = (hidden @ weight)[:, :-1] / 0.7                 # a view, as the modules' logits are
        loss = -torch.log_softmax(logits, -1)[..., 0].mean()
        term = TRE(mode="tre_p", coef=0.1, p=0.9, diagnostics=False, sparse_grad=sparse)
        (loss + term(logits, torch.ones(2, 4), None)).backward()
        grads.append(weight.grad.clone())
    assert not grads[1].is_sparse
    torch.testing.assert_close(grads[1], grads[0])
