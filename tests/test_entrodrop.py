"""EntroDrop: the spec's falsifiable properties, on causal_lm and on GRPO's supervised warm start."""
import logging
import math
import os
import socket
from itertools import pairwise

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from callbacks.entrodrop import EntroDrop, curriculum, select_candidates, token_scores
from datamodules.text import TEMPLATE, TextDataModule
from zoo.causal_lm import CausalLMModule

logging.getLogger("lightning").setLevel(logging.ERROR)
MASK = 4                                      # the tiny tokenizer's [MASK]


def _trainer(tmp_path, **kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=str(tmp_path), **kwargs)


def _module(seed: int = 0, **kwargs) -> CausalLMModule:
    torch.manual_seed(seed)
    return CausalLMModule(**kwargs)


def _batch(module, rows: int = 4, length: int = 24, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, len(module.tokenizer), (rows, length), generator=g)
    ids[0, 10] = module.tokenizer.eos_token_id            # a document boundary inside a packed row
    labels = ids.clone()
    labels[1, :6] = -100                                   # a prompt
    labels[2, -5:] = -100                                  # padding
    mask = torch.ones_like(ids)
    mask[2, -5:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class FixedLogits:
    """A protocol module whose pre-pass returns given logits (to control the entropies exactly)."""

    def __init__(self, logits, tokenizer=None):
        self.logits, self.tokenizer, self.sub = logits, tokenizer, torch.nn.Linear(1, 1)

    def modules(self):
        return [self.sub]

    def eval(self):
        self.sub.eval()

    def forward_logits(self, batch):
        return self.logits

    def token_loss_mask(self, batch):
        return batch["labels"][:, 1:] != -100


# -- schedule, entropy, selection ----------------------------------------------------------
def test_schedule_values_at_given_steps():
    S = 1000
    assert curriculum(0, S) == 0.0 and curriculum(S, S) == pytest.approx(1.0, abs=1e-12)
    assert curriculum(S // 2, S, mu=0.5) == pytest.approx(0.5, abs=1e-12)
    values = [curriculum(s, S, kappa=10, mu=0.3) for s in range(S + 1)]
    assert all(b >= a for a, b in pairwise(values)) and values[-1] == pytest.approx(1.0, abs=1e-12)
    assert curriculum(250, S, "linear") == 0.25 and curriculum(7, S, "constant") == 1.0
    cb = EntroDrop(p_max=0.3, gamma=0.5)
    assert cb.strength(0, S) == (0.0, 0.5)
    assert cb.strength(S, S)[0] == pytest.approx(0.3, abs=1e-12)
    assert cb.strength(S // 2, S)[0] == pytest.approx(0.15, abs=1e-12)
    ramp_gamma = EntroDrop(p_max=0.3, gamma=0.5, schedule="linear", schedule_target="gamma")
    assert ramp_gamma.strength(S // 4, S) == (0.3, 0.125)


def test_entropy_helper():
    V = 50
    uniform = torch.zeros(2, 3, V)
    torch.testing.assert_close(token_scores(uniform, torch.zeros(2, 3, dtype=torch.long)),
                               torch.full((2, 3), math.log(V)), atol=1e-6, rtol=0)
    peaked = torch.zeros(1, 2, V)
    peaked[..., 7] = 50.0
    assert float(token_scores(peaked, torch.zeros(1, 2, dtype=torch.long)).max()) < 1e-6
    logits = torch.randn(3, 5, V, generator=torch.Generator().manual_seed(0)) * 3
    p = logits.softmax(-1)
    torch.testing.assert_close(token_scores(logits, torch.zeros(3, 5, dtype=torch.long), chunk_rows=2),
                               -(p * p.log()).sum(-1), atol=1e-5, rtol=0)
    targets = torch.randint(0, V, (3, 5))
    torch.testing.assert_close(token_scores(logits, targets, "surprisal"),
                               -logits.log_softmax(-1).gather(-1, targets[..., None])[..., 0], atol=1e-5, rtol=0)


def test_only_low_entropy_eligible_tokens_are_dropped():
    module = _module()
    batch = _batch(module)
    original = {k: v.clone() for k, v in batch.items()}
    logits = torch.randn(4, 23, len(module.tokenizer), generator=torch.Generator().manual_seed(1)) * 4
    entropy = token_scores(logits, batch["labels"][:, 1:])
    cb = EntroDrop(gamma=0.5, p_max=1.0, schedule="constant")
    stats = cb(batch, FixedLogits(logits, module.tokenizer), step=3, total_steps=10)
    drops = cb.last_drops
    valid = original["labels"][:, 1:] != -100
    eligible = valid & (original["labels"][:, 1:] != module.tokenizer.eos_token_id)
    n = int(eligible.sum())
    assert int(drops.sum()) == n // 2                                       # p = 1: every candidate
    assert bool((entropy[drops] <= stats["entropy_threshold"]).all())
    assert float(entropy[drops].max()) <= float(entropy[eligible & ~drops].min())   # exactly the lowest half
    assert not drops[~valid].any()                                          # prompt and padding
    assert not drops[original["labels"][:, 1:] == module.tokenizer.eos_token_id].any()
    assert not drops[entropy == entropy[eligible].max()].any()              # the highest-entropy token stays
    assert batch["input_ids"][:, 0].equal(original["input_ids"][:, 0])      # first positions never
    candidates, _ = select_candidates(entropy, eligible, gamma=1.0)
    assert candidates.equal(eligible)


def test_drop_rate_lies_in_the_binomial_band():
    rows, length, V = 64, 129, 20
    logits = torch.randn(rows, length - 1, V, generator=torch.Generator().manual_seed(2))
    ids = torch.randint(5, V, (rows, length), generator=torch.Generator().manual_seed(3))
    batch = {"input_ids": ids, "labels": ids.clone()}
    cb = EntroDrop(gamma=0.5, p_max=0.3, schedule="linear", mask_token_id=MASK)
    stats = cb(batch, FixedLogits(logits), step=60, total_steps=100)
    p, n = 0.3 * 0.6, rows * (length - 1)
    k = n // 2
    band = 3.29 * math.sqrt(k * p * (1 - p)) / n                              # 99.9%, Binomial(k, p) drops
    assert abs(stats["drop_frac"] - 0.5 * p) < band and stats["p"] == pytest.approx(p)


def test_input_and_loss_modes_edit_only_their_tensor_at_the_same_positions():
    module = _module()
    logits = torch.randn(4, 23, len(module.tokenizer), generator=torch.Generator().manual_seed(4))
    results = {}
    for mode in ("input", "loss"):
        batch = _batch(module)
        original = {k: v.clone() for k, v in batch.items()}
        cb = EntroDrop(mode=mode, gamma=0.7, p_max=0.5, schedule="constant", seed=9)
        cb(batch, FixedLogits(logits, module.tokenizer), step=5, total_steps=10)
        drops = torch.nn.functional.pad(cb.last_drops, (1, 0))
        assert drops.any()
        changed, kept = ("input_ids", "labels") if mode == "input" else ("labels", "input_ids")
        assert batch[kept].equal(original[kept]) and batch["attention_mask"].equal(original["attention_mask"])
        assert batch[changed][~drops].equal(original[changed][~drops])
        assert bool((batch[changed][drops] == (MASK if mode == "input" else -100)).all())
        results[mode] = drops
    assert results["input"].equal(results["loss"])


def test_masks_are_determined_by_seed_step_and_rank():
    module = _module()
    logits = torch.randn(4, 23, len(module.tokenizer), generator=torch.Generator().manual_seed(5))

    def drops(step, rank, warm=0):
        cb = EntroDrop(gamma=0.8, p_max=0.5, schedule="constant", seed=1)
        for earlier in range(warm):                 # a callback that already ran (as before a resume)
            cb(_batch(module), FixedLogits(logits, module.tokenizer), step=earlier, total_steps=10, rank=rank)
        cb(_batch(module), FixedLogits(logits, module.tokenizer), step=step, total_steps=10, rank=rank)
        return cb.last_drops

    assert drops(4, 0).equal(drops(4, 0, warm=4))
    assert not drops(4, 0).equal(drops(4, 1))
    assert not drops(4, 0).equal(drops(5, 0))


def test_random_dropout_reduction_ignores_the_entropies():
    module = _module()
    logits = torch.randn(4, 23, len(module.tokenizer), generator=torch.Generator().manual_seed(6))
    shuffled = logits.flatten(0, 1)[torch.randperm(4 * 23)].view_as(logits)
    masks = []
    for pre in (logits, shuffled):
        cb = EntroDrop(gamma=1.0, p_max=0.4, schedule="constant")
        cb(_batch(module), FixedLogits(pre, module.tokenizer), step=2, total_steps=10)
        masks.append(cb.last_drops)
    assert masks[0].equal(masks[1]) and masks[0].any()


def test_pre_pass_leaves_weights_modes_rng_and_autograd_alone():
    module = _module()
    module.train()
    module.model.model.layers[0].eval()                  # a submodule deliberately in eval mode stays so
    before = {k: v.clone() for k, v in module.state_dict().items()}
    rng = torch.get_rng_state()
    batch = _batch(module)
    EntroDrop(gamma=0.5, p_max=0.3, schedule="constant")(batch, module, step=0, total_steps=10)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())
    assert module.training and module.model.training and not module.model.model.layers[0].training
    assert all(p.grad is None for p in module.parameters())
    assert not any(v.requires_grad or v.grad_fn is not None for v in batch.values())


# -- through Lightning ---------------------------------------------------------------------
class _Recording(CausalLMModule):
    masked = 0

    def training_step(self, batch, batch_idx):
        self.masked += int((batch["input_ids"] == MASK).sum())
        return super().training_step(batch, batch_idx)


class _Spy(L.Callback):
    eval_masked = 0

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.eval_masked += int((batch["input_ids"] == MASK).sum())

    on_test_batch_start = on_validation_batch_start


def _data(**kwargs):
    return TextDataModule(**{"num_train": 32, "num_val": 8, "num_test": 8, "batch_size": 8, "block_size": 32,
                             **kwargs})


def test_ratio_zero_is_the_identity_and_only_training_batches_change(tmp_path):
    weights = {}
    for name, callbacks in (("none", []), ("p0", [EntroDrop(p_max=0.0)]), ("g0", [EntroDrop(gamma=0.0)])):
        module = _module()
        _trainer(tmp_path / name, max_epochs=1, limit_val_batches=0, callbacks=callbacks).fit(module, _data())
        weights[name] = module.state_dict()
    for key, value in weights["none"].items():
        assert torch.equal(weights["p0"][key], value) and torch.equal(weights["g0"][key], value), key
    spy = _Spy()
    torch.manual_seed(0)
    module = _Recording()
    trainer = _trainer(tmp_path / "spy", max_epochs=1,
                       callbacks=[EntroDrop(gamma=1.0, p_max=0.5, schedule="constant"), spy])
    trainer.fit(module, _data())
    trainer.test(module, _data(), verbose=False)
    assert module.masked > 0 and spy.eval_masked == 0          # training_step saw the edit; evaluation none


def test_selector_picks_template_tokens_after_a_warm_up(tmp_path):
    module = _module(optimizer={"name": "AdamW", "lr": 3e-3})
    data = _data(num_train=128, batch_size=8)
    _trainer(tmp_path, max_epochs=10, limit_val_batches=0).fit(module, data)
    batch = next(iter(data.val_dataloader()))
    kinds = batch["token_kind"][:, 1:]
    cb = EntroDrop(gamma=0.5, p_max=1.0, schedule="constant")
    cb(batch, module, step=0, total_steps=1)
    precision = float((kinds[cb.last_drops] == TEMPLATE).float().mean())
    base_rate = float((kinds == TEMPLATE).float().mean())
    assert base_rate < 0.8 and precision > 0.9, (precision, base_rate)


def test_grpo_supervised_warm_start_gets_entrodrop():
    from zoo.policy_gradient.module import GRPOModule
    torch.manual_seed(0)
    module = GRPOModule(backbone_overrides={"hidden_size": 32, "intermediate_size": 64}, kl={"coef": 0.0})
    if not hasattr(module, "batch_transforms"):
        pytest.skip("GRPOModule has no batch_transforms hook yet (the change EntroDrop asks of GRPO)")
    samples = [{"prompt": f"Q:{a}+{a + 1}="} for a in range(6)]
    completions = [f"..\\boxed{{{2 * a + 1}}}" for a in range(6)]
    tokens = module.sft_batch(samples, completions)
    prompt_width = int((tokens["labels"] == -100).all(0).long().cumprod(0).sum())
    module.train()
    baseline = module.supervised_loss(samples, completions)
    cb = EntroDrop(gamma=0.5, p_max=0.0)
    cb.setup(None, module, "fit")
    assert module.batch_transforms["entrodrop"] is cb
    module._sft_progress = (10, 10)
    assert torch.equal(module.supervised_loss(samples, completions), baseline)   # ratio 0: the same loss
    cb.p_max = 1.0
    edited = module.supervised_loss(samples, completions)
    drops = cb.last_drops
    assert drops.any() and not drops[:, :prompt_width - 1].any()                 # never a prompt token
    assert int(drops.sum()) == int(module.token_loss_mask(tokens).sum() - (tokens["labels"][:, 1:] ==
                                   module.tokenizer.eos_token_id).sum()) // 2
    assert not torch.equal(edited, baseline)
    cb.teardown(None, module, "fit")
    assert "entrodrop" not in module.batch_transforms


def test_a_module_without_the_protocol_gets_a_clear_error():
    class Bare(L.LightningModule):
        pass

    with pytest.raises(TypeError, match="forward_logits and token_loss_mask"):
        EntroDrop().setup(None, Bare(), "fit")


# -- one process vs two gloo ranks ----------------------------------------------------------
def _step_loss(module, batch, forward):
    logits = forward(batch["input_ids"], batch["attention_mask"])[:, :-1]
    return F.cross_entropy(logits.flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100)


def _shard(module, rank):
    full = _batch(module, rows=4, seed=11)
    return {k: v[2 * rank:2 * rank + 2].clone() for k, v in full.items()}


def _ddp_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        module = _module()
        ddp = DistributedDataParallel(module)
        batch = _shard(module, rank)
        EntroDrop(gamma=0.6, p_max=0.5, schedule="constant")(batch, module, step=3, total_steps=10, rank=rank)
        loss = _step_loss(module, batch, ddp)
        loss.backward()
        ids = [torch.zeros_like(batch["input_ids"]) for _ in range(world)]
        dist.all_gather(ids, batch["input_ids"])
        if rank == 0:
            torch.save({"ids": torch.cat(ids), "grads": {n: p.grad.clone() for n, p in module.named_parameters()}}, out)
        dist.barrier()
        del ddp, loss
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(240)
def test_two_gloo_ranks_drop_and_step_as_one_process_does(tmp_path):
    module = _module()
    losses, edited = [], []
    for rank in (0, 1):                          # each rank's shard with its own rank's draws
        batch = _shard(module, rank)
        EntroDrop(gamma=0.6, p_max=0.5, schedule="constant")(batch, module, step=3, total_steps=10, rank=rank)
        edited.append(batch["input_ids"])
        losses.append(_step_loss(module, batch, module))
    (sum(losses) / 2).backward()                 # DDP averages the ranks' gradients
    out = str(tmp_path / "ddp.pt")
    mp.spawn(_ddp_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    result = torch.load(out, weights_only=True)
    assert result["ids"].equal(torch.cat(edited))
    assert not (edited[0] == MASK).equal(edited[1] == MASK)
    for name, param in module.named_parameters():
        torch.testing.assert_close(result["grads"][name], param.grad, atol=1e-6, rtol=1e-5, msg=name)
