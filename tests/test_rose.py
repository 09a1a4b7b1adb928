"""ROSE (arXiv 2601.05053): the spec's properties 1-13 on small tensors, hand-built trees and a tiny model."""
import itertools
import math
import random

import lightning as L
import pytest
import torch

from datamodules.reasoning import ReasoningDataModule
from zoo.backbones import build_backbone
from zoo.blocks.metrics import pass_at_k
from zoo.blocks.rl.advantages import ADVANTAGES, dr_grpo
from zoo.blocks.rl.losses import kl_penalty
from zoo.blocks.rl.rewards import boxed_match
from zoo.blocks.rl.rollout import RolloutEngine, entropy_from_logits, response_logits
from zoo.blocks.rl.tree import (
    RolloutTree,
    TreeRolloutSampler,
    length_calibration,
    semantic_divergence,
    tree_segment,
    truncated_entropy,
)
from zoo.rose.module import ROSEModule, varied_groups

PROMPTS = ["Q:3+4=", "Q:12+7=", "Q:5+20="]


@pytest.fixture(scope="module")
def policy():
    torch.manual_seed(0)
    model, tokenizer = build_backbone("tiny-llama-char", causal_lm=True, padding_side="left")
    return model.eval(), tokenizer


def sample_trees(policy, epsilon, group_size=4, seed=0, metric="semantic_entropy", max_new_tokens=12, **options):
    model, tokenizer = policy
    engine = RolloutEngine(model, tokenizer, max_new_tokens=max_new_tokens, record_stats_top_k=5)
    sampler = TreeRolloutSampler(engine, epsilon=epsilon, metric=metric, **options)
    return sampler.sample(PROMPTS, group_size, generator=torch.Generator().manual_seed(seed))


def chain(length, start=0):
    """Distinct token ids, so unrelated branches never share a prefix by chance."""
    return list(range(start, start + length))


# -- 1. semantic divergence ----------------------------------------------------------------
def test_sd_closed_form_matches_the_double_sum():
    gen = torch.Generator().manual_seed(0)
    p = torch.rand(20, generator=gen, dtype=torch.float64)
    emb = torch.randn(20, 8, generator=gen, dtype=torch.float64)
    ids = torch.arange(20)
    cos = torch.nn.functional.cosine_similarity(emb[:, None], emb[None], dim=-1)
    brute = -sum(p[i] * p[j] * cos[i, j] for i in range(20) for j in range(20) if i != j)
    assert semantic_divergence(p, ids, emb) == pytest.approx(float(brute), abs=1e-6)
    with_diag = semantic_divergence(p, ids, emb, include_diagonal=True)
    assert with_diag == pytest.approx(float(brute - (p ** 2).sum()), abs=1e-6)
    dissimilar = sum(p[i] * p[j] * (1 - cos[i, j]) for i in range(20) for j in range(20) if i != j)
    assert semantic_divergence(p, ids, emb, variant="dissimilarity") == pytest.approx(float(dissimilar), abs=1e-6)
    assert semantic_divergence(p, ids, torch.eye(20)) == pytest.approx(0.0, abs=1e-7)          # orthonormal
    same = torch.ones(20, 8, dtype=torch.float64)
    assert semantic_divergence(p, ids, same) == pytest.approx(float(-(p.sum() ** 2 - (p ** 2).sum())), abs=1e-6)


# -- 2. entropy ----------------------------------------------------------------------------
def test_recorded_entropy_is_the_full_vocabulary_entropy(policy):
    model, tokenizer = policy
    engine = RolloutEngine(model, tokenizer, max_new_tokens=6, record_stats_top_k=5)
    rollout = engine.generate(PROMPTS, generator=torch.Generator().manual_seed(1))
    logits, _ = response_logits(model, rollout.input_ids, rollout.attention_mask, rollout.prompt_width)
    mask = rollout.response_mask.bool()
    assert torch.allclose(rollout.entropy[mask], entropy_from_logits(logits)[mask], atol=1e-4)
    one_hot = torch.full((1, 10), float("-inf"))
    one_hot[0, 3] = 0.0
    probs = one_hot.softmax(-1)
    assert float(entropy_from_logits(one_hot)) == 0.0 and float(truncated_entropy(probs)) == 0.0
    sd = semantic_divergence(probs[:, :5], torch.arange(5)[None], torch.randn(10, 4))
    assert float(sd * entropy_from_logits(one_hot)) == 0.0


# -- 3. prefix integrity / 5. connected tree -----------------------------------------------
@pytest.mark.parametrize("metric", ["semantic_entropy", "entropy", "semantic_divergence", "random", "fixed_interval"])
def test_children_copy_their_parents_prefix(policy, metric):
    rollout, trees = sample_trees(policy, 0.0, metric=metric, interval=3, exclude_used_branch_points=True)
    for tree in trees:
        points = set()
        for i in range(1, len(tree)):
            p, k = tree.parents[i], tree.branch_pos[i]
            if p >= 0:
                assert k <= len(tree.tokens[p]) and tree.tokens[i][:k] == tree.tokens[p][:k]
                assert (k, tuple(tree.tokens[i][:k])) not in points          # exclude_used_branch_points
                points.add((k, tuple(tree.tokens[i][:k])))
                if metric == "fixed_interval":
                    assert k > 0 and k % 3 == 0
    rows = [t for tree in trees for t in tree.tokens]
    assert [rollout.response_ids[r, :len(t)].tolist() for r, t in enumerate(rows)] == rows
    with pytest.raises(ValueError):
        RolloutTree(tokens=[[1, 2, 3]], parents=[-1], branch_pos=[0], branch_se=[None]).add([1, 9, 5], 0, 2)


def test_child_statistics_copy_the_parent_prefix(policy):
    rollout, trees = sample_trees(policy, 0.0)
    offsets = [0, 4, 8]
    for tree, start in zip(trees, offsets):
        for i in range(1, len(tree)):
            p, k = tree.parents[i], tree.branch_pos[i]
            assert torch.equal(rollout.entropy[start + i, :k], rollout.entropy[start + p, :k])
            assert torch.equal(rollout.topk_probs[start + i, :k], rollout.topk_probs[start + p, :k])


def test_epsilon_zero_gives_a_connected_tree(policy):
    _, trees = sample_trees(policy, 0.0, group_size=5)
    for tree in trees:
        assert len(tree) == 5 and tree.parents[0] == -1
        assert all(p >= 0 for p in tree.parents[1:])
        assert all(tree.depth(i) >= 1 for i in range(1, 5))
        assert all(se is not None for se in tree.branch_se[1:])


# -- 4. ε = 1 is Dr.GRPO -------------------------------------------------------------------
def test_epsilon_one_reduces_to_dr_grpo(policy):
    rollout, trees = sample_trees(policy, 1.0)
    assert all(p == -1 for tree in trees for p in tree.parents)
    rewards = torch.tensor([1.0, 0, 0, 1, 1, 1, 0, 1, 0, 0, 0, 1])
    ours, _ = tree_segment(rewards, rollout.response_mask, trees=trees, alpha=0.0)
    group = torch.arange(3).repeat_interleave(4)
    theirs, _ = dr_grpo(rewards, rollout.response_mask, group_ids=group)
    assert torch.allclose(ours, theirs, atol=1e-7)
    assert "tree_segment" in ADVANTAGES


# -- 6. node values / 7. telescoping -------------------------------------------------------
def prefix_members(tree, k, prefix):
    return [j for j, t in enumerate(tree.tokens) if len(t) >= k and t[:k] == list(prefix)]


@pytest.mark.parametrize("seed", [0, 1])
def test_node_values_and_telescoping(policy, seed):
    _, trees = sample_trees(policy, 0.3, group_size=6, seed=seed)
    rng = random.Random(seed)
    for tree in trees:
        rewards = [float(rng.random() < 0.5) for _ in range(len(tree))]
        values = tree.node_values(rewards)
        assert values[(0, ())] == pytest.approx(sum(rewards) / len(rewards))
        for (k, prefix), value in values.items():
            members = prefix_members(tree, k, prefix) if k else list(range(len(tree)))
            assert 0.0 <= value <= 1.0
            assert value == pytest.approx(sum(rewards[j] for j in members) / len(members))
        mean = sum(rewards) / len(rewards)
        for i, adv in enumerate(tree.segment_advantages(rewards)):
            bounds = [0] + [k for k, _ in tree.path(i)] + [len(tree.tokens[i])]
            segments = [float(adv[b]) for b, e in itertools.pairwise(bounds) if e > b]
            assert sum(segments) == pytest.approx(rewards[i] - mean, abs=1e-7)
            assert float(adv[-1]) == pytest.approx(rewards[i] - (values[tree.path(i)[-1]] if tree.path(i) else mean))


# -- 8. membership (the reference's ancestor-position bug) ---------------------------------
@pytest.mark.parametrize("membership", ["prefix", "tree"])
def test_membership_follows_the_paths(membership):
    tree = RolloutTree()
    a = tree.add(chain(150))
    b = tree.add(chain(100) + chain(30, 1000), parent=a, branch_pos=100)
    c = tree.add(chain(50) + chain(40, 2000), parent=b, branch_pos=50)
    node_100 = (100, tuple(chain(100)) if membership == "prefix" else a)
    node_50 = (50, tuple(chain(50)) if membership == "prefix" else a)
    assert tree.members(node_100, membership) == [a, b]
    assert tree.members(node_50, membership) == [a, b, c]
    assert [k for k, _ in tree.path(c, membership)] == [50]
    assert [k for k, _ in tree.path(b, membership)] == [50, 100]
    adv = tree.segment_advantages([1.0, 0.0, 1.0], membership)
    assert float(adv[c][60]) == pytest.approx(1.0 - 2 / 3)       # C's own segment: r_C - V(50)


def test_prefix_membership_counts_equal_prefixes_tree_membership_only_lineage():
    tree = RolloutTree()
    tree.add([1, 2, 3, 4])
    tree.add([1, 2, 9, 9], parent=0, branch_pos=2)
    tree.add([1, 2, 7, 7])                                       # a root rollout with the same first two tokens
    assert tree.members((2, (1, 2)), "prefix") == [0, 1, 2]
    assert tree.members((2, 0), "tree") == [0, 1]


# -- 9. length calibration -----------------------------------------------------------------
def test_calibration_hand_example():
    tree = RolloutTree()
    s = tree.add(chain(60))
    c = tree.add(chain(10) + chain(100, 500), parent=s, branch_pos=10)
    adv = [torch.full((60,), 0.25, dtype=torch.float64), torch.full((110,), 0.25, dtype=torch.float64)]
    out = length_calibration(tree, adv, [True, True], alpha=1.0)
    assert torch.equal(out[s], adv[s])
    assert torch.allclose(out[c][:10], torch.tensor(0.25, dtype=torch.float64))
    assert torch.allclose(out[c][10:], torch.tensor(0.125, dtype=torch.float64))


def calibration_tree():
    tree = RolloutTree()
    tree.add(chain(20))                                          # 0: correct, shortest
    tree.add(chain(8) + chain(22, 100), parent=0, branch_pos=8)  # 1: correct, 30 tokens
    tree.add(chain(8) + chain(30, 200), parent=0, branch_pos=8)  # 2: wrong
    tree.add(chain(40, 300))                                     # 3: correct, root restart
    tree.add(chain(8) + chain(4, 100) + chain(20, 400), parent=1, branch_pos=12)   # 4: correct, 32 tokens
    return tree, [True, True, False, True, True]


def test_calibration_properties():
    tree, correct = calibration_tree()
    gen = torch.Generator().manual_seed(0)
    adv = [torch.randn(n, generator=gen, dtype=torch.float64) for n in tree.lengths]
    assert all(torch.equal(a, b) for a, b in zip(length_calibration(tree, adv, correct, 0.0), adv))       # (a)
    out = length_calibration(tree, adv, correct, 1.0)
    for i in range(len(tree)):
        changed = (out[i] != adv[i]).nonzero().flatten()
        if i in (0, 2):                                                                                    # (b)
            assert changed.numel() == 0
        else:
            assert int(changed.min()) >= tree.divergence(0, i)
        assert bool((out[i][adv[i] > 0] >= 0).all()) and bool((out[i][adv[i] < 0] <= adv[i][adv[i] < 0]).all())  # (c)
    assert tree.divergence(0, 1) == 8 and tree.divergence(0, 3) == 0 and tree.divergence(0, 4) == 8
    penalties = [sum(float((a - b).abs().sum()) for a, b in zip(length_calibration(tree, adv, correct, alpha), adv))
                 for alpha in (0.0, 0.5, 1.0, 2.0, 3.0, 10.0)]
    assert penalties == sorted(penalties) and penalties[0] == 0.0                                          # (d)
    one = [True, False, False, False, False]
    assert all(torch.equal(a, b) for a, b in zip(length_calibration(tree, adv, one, 3.0), adv))          # (e)


# -- 10. dynamic sampling ------------------------------------------------------------------
SCRIPT = [[0, 0, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [0, 1, 1, 0]]   # rewards by group position in a batch


class ScriptedROSE(ROSEModule):
    """Rewards by the group's position in its batch; remembers what reached the update."""

    def reward(self, rollout, samples):
        rewards = torch.tensor([float(SCRIPT[(i // 4) % 4][i % 4] if self.script else 0.0)
                                for i in range(len(rollout))])
        return rewards, {"boxed_match": rewards, "accuracy": rewards}

    def update(self, batch):
        self.seen = batch
        return super().update(batch)


def run_rose(script, **dynamic):
    L.seed_everything(0)
    module = ScriptedROSE(group_size=4, rollout={"max_new_tokens": 6}, tree={"top_k": 5},
                          kl={"coef": 0.001}, mini_batch_size=8, dynamic_sampling=dynamic,
                          optimizer={"name": "AdamW", "lr": 1e-3})
    module.script, module.seen = script, None
    data = ReasoningDataModule(batch_size=4, train_batches=2, task_options={"high": 9})
    before = {k: v.clone() for k, v in module.policy.state_dict().items()}
    trainer = L.Trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=data)
    changed = any(not torch.equal(v, module.policy.state_dict()[k]) for k, v in before.items())
    return module, module.history[-1], changed


def test_zero_variance_groups_never_reach_the_loss():
    assert varied_groups(torch.tensor([0.0, 0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0]), 4).tolist() == [False, False, True]
    module, record, changed = run_rose(True, max_gen_batches=1, min_kept_fraction=1.0)
    assert changed and record["groups_trained"] == 2 and record["kept_fraction"] == 0.5
    rollout = module.seen["rollout"]
    prompts = [module.tokenizer.decode(ids[mask.bool()]) for ids, mask in zip(rollout.prompt_ids, rollout.prompt_mask)]
    first_batch = ReasoningDataModule(batch_size=4, train_batches=2, task_options={"high": 9}).train_samples()[:4]
    assert prompts == [s["prompt"] for s in first_batch[2:4] for _ in range(4)]


def test_refill_tops_up_the_batch():
    _, record, _ = run_rose(True, max_gen_batches=2, min_kept_fraction=1.0)
    assert record["gen_batches"] == 2 and record["groups_trained"] == 4 and record["generated"] == 32


def test_step_is_skipped_when_every_group_is_filtered():
    module, record, changed = run_rose(False, max_gen_batches=2, min_kept_fraction=1.0)
    assert record["skipped"] == 1.0 and record["gen_batches"] == 2 and module.seen is None and not changed


# -- 11. loss ------------------------------------------------------------------------------
def test_clip_loss_gradient_at_the_old_policy_is_the_policy_gradient():
    module = ROSEModule(group_size=4, rollout={"max_new_tokens": 24})
    gen = torch.Generator().manual_seed(0)
    logp = (torch.rand(6, 10, generator=gen) - 2.0).requires_grad_(True)
    adv, mask = torch.randn(6, 10, generator=gen), (torch.rand(6, 10, generator=gen) > 0.2).float()
    loss, _ = module.policy_loss(logp, logp.detach(), adv, mask)
    (grad,) = torch.autograd.grad(loss, logp)
    reference = torch.autograd.grad(-(adv * logp * mask).sum() / 24, logp)[0]
    assert torch.allclose(grad, reference, atol=1e-6)
    ref = logp.detach() + torch.randn(6, 10, generator=gen)
    assert bool((kl_penalty(logp.detach(), ref, "k3") >= 0).all())
    assert float(kl_penalty(logp.detach(), logp.detach(), "k3").abs().max()) == 0.0


# -- 12. pass@k / 13. reward ---------------------------------------------------------------
@pytest.mark.parametrize("n,c,k", [(5, 2, 2), (6, 1, 3), (4, 0, 2), (8, 3, 8), (7, 7, 3)])
def test_pass_at_k_matches_brute_force(n, c, k):
    outcomes = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    brute = sum(any(outcomes[i] for i in s) for s in subsets) / math.comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(brute)
    if n == k:
        assert pass_at_k(n, c, k) == float(c > 0)


def test_reward_parser():
    assert boxed_match("so \\boxed{\\frac12}", {"answer": "\\frac{1}{2}"}) == 1.0
    assert boxed_match("the answer is 12", {"answer": "12"}) == 0.0
    assert boxed_match("\\boxed{12} then \\boxed{13}", {"answer": "13"}) == 1.0
    assert boxed_match("\\boxed{12} then \\boxed{13}", {"answer": "12"}) == 0.0


def test_module_round_trips_through_save_pretrained(tmp_path):
    module = ROSEModule(group_size=4, tree={"top_k": 5, "epsilon": 0.25}, dynamic_sampling={"max_gen_batches": 2})
    loaded = ROSEModule.from_pretrained(module.save_pretrained(tmp_path / "rose"))
    assert loaded.tree_cfg == module.tree_cfg and loaded.dynamic_cfg == module.dynamic_cfg
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in module.state_dict().items())
    with pytest.raises(ValueError, match="metric"):
        ROSEModule(tree={"metric": "cosine"})
