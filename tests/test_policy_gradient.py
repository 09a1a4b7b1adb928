"""The grpo / ppo entries and the reasoning datamodules."""
import json

import lightning as L
import pytest
import torch

from datamodules.readers import DataFormatError
from datamodules.reasoning import ReasoningDataModule
from zoo.blocks.rl.rewards import get_reward
from zoo.policy_gradient.module import GRPOModule, PPOModule

SMALL = {"backbone_overrides": {"hidden_size": 32, "intermediate_size": 64}, "group_size": 4,
         "rollout": {"max_new_tokens": 8}, "warm_start": {"steps": 0}, "mini_batch_size": 64}


def _fit(module, steps: int = 1, **data) -> L.Trainer:
    import tempfile
    root = tempfile.mkdtemp(prefix="zoo-rl-")             # rl_history.jsonl goes to the trainer's root
    datamodule = ReasoningDataModule(task="arithmetic", batch_size=4, train_batches=steps, eval_size=8,
                                     eval_batch_size=8, **data)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                        default_root_dir=root)
    trainer.fit(module, datamodule)
    return trainer


def _weights(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.policy.state_dict().items()}


def test_kl_is_zero_for_identical_policies():
    L.seed_everything(0)
    module = GRPOModule(**SMALL, kl={"coef": 0.5, "kind": "k3"})
    _fit(module)
    assert module.history[-1]["kl"] == 0.0                 # one mini-batch, evaluated before the update


def test_identical_rewards_give_no_update():
    L.seed_everything(0)
    module = GRPOModule(**SMALL, rewards=[{"name": "format", "pattern": ".*"}], optimizer={"name": "AdamW", "lr": 0.1,
                                                                                         "weight_decay": 0.0})
    before = _weights(module)
    _fit(module)
    assert module.history[-1]["reward"] == 1.0
    for key, value in _weights(module).items():
        assert torch.equal(value, before[key]), key


def test_rewarded_step_changes_the_policy_and_techniques_see_logits():
    L.seed_everything(0)
    module = GRPOModule(**SMALL, rewards=[{"name": "length"}])      # response lengths differ: rewards differ
    seen = []

    def term(logits, mask, owner):
        seen.append((tuple(logits.shape), tuple(mask.shape), owner is module))
        return 0.0 * logits.sum()

    module.loss_terms["probe"] = term
    before = _weights(module)
    _fit(module)
    assert any(not torch.equal(v, before[k]) for k, v in _weights(module).items())
    (logits_shape, mask_shape, same), = seen
    assert logits_shape[:2] == mask_shape and logits_shape[2] == len(module.tokenizer) and same
    assert "term/probe" in module.history[-1]


def test_training_is_reproducible_under_a_seed():
    runs = []
    for _ in range(2):
        L.seed_everything(3)
        module = GRPOModule(**{**SMALL, "warm_start": {"steps": 2, "batch_size": 8}}, seed=3)
        _fit(module, steps=2)
        runs.append(_weights(module))
    for key in runs[0]:
        assert torch.equal(runs[0][key], runs[1][key]), key


def test_ppo_trains_its_value_head():
    L.seed_everything(0)
    module = PPOModule(**SMALL, rewards=[{"name": "length"}])
    head = module.value_head.weight.detach().clone()
    _fit(module)
    assert not torch.equal(head, module.value_head.weight) and "value_loss" in module.history[-1]
    assert module.hparams.value_coef == 0.5 and module.hparams.advantage == {"name": "gae"}


def test_unknown_component_names_fail_at_construction():
    with pytest.raises(KeyError, match="registered"):
        GRPOModule(**{**SMALL, "advantage": {"name": "nope"}})
    with pytest.raises(KeyError, match="registered"):
        GRPOModule(**{**SMALL, "rewards": [{"name": "nope"}]})


def test_gated_length_penalty_only_touches_correct_responses():
    module = GRPOModule(**SMALL, rewards=[{"name": "boxed_match"}, {"name": "length", "weight": 0.5, "gate": "correct"}])
    from zoo.blocks.rl.rollout import pack
    tok = module.tokenizer
    texts = ["\\boxed{3}", "....\\boxed{3}", "\\boxed{4}"]
    rollout = pack([[5]] * 3, [tok(t, add_special_tokens=False)["input_ids"] for t in texts], tok.pad_token_id,
                   texts=texts)
    total, parts = module.reward(rollout, [{"answer": "3"}] * 3)
    assert parts["accuracy"].tolist() == [1.0, 1.0, 0.0]
    torch.testing.assert_close(total, torch.tensor([1 - 0.5 * 9 / 8, 1 - 0.5 * 13 / 8, 0.0]))


# -- data ----------------------------------------------------------------------------------
def test_arithmetic_train_and_eval_pairs_are_disjoint_and_solutions_verify():
    dm = ReasoningDataModule(task="arithmetic", batch_size=8, train_batches=50, eval_size=None)
    train = {s["prompt"] for s in dm.train_samples()}
    evaluation = {s["prompt"] for s in dm.eval_samples()}
    assert train and evaluation and not train & evaluation
    reward = get_reward("boxed_match")
    assert all(reward(s["solution"], s) == 1.0 for s in dm.demonstrations(64, seed=0))


def test_countdown_problems_are_solvable_by_their_reference():
    dm = ReasoningDataModule(task="countdown", batch_size=8, train_batches=10, eval_size=32)
    samples = dm.train_samples() + dm.eval_samples()
    assert all(get_reward("countdown")(s["solution"], s) == 1.0 for s in samples)
    assert all(3 <= len(s["numbers"]) <= 4 for s in samples)
    assert {s["prompt"] for s in dm.eval_samples()}.isdisjoint({s["prompt"] for s in dm.train_samples()})


def test_gsm8k_reader_and_gold_solutions(shared_data):
    dm = ReasoningDataModule(task="gsm8k", path=str(shared_data / "gsm8k"), batch_size=4, train_batches=2,
                             eval_size=None)
    train = dm.task.read("train")
    assert len(train) == 7473 and len(dm.eval_samples()) == 1319
    assert train[0]["answer"] == "72" and "<<" not in train[0]["solution"]
    assert all(get_reward("gsm8k")(s["solution"], s) == 1.0 for s in train[:500])


def test_gsm8k_malformed_line_names_file_and_line(tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps({"question": "q", "answer": "1\n#### 1"}) + "\n"
                                          + json.dumps({"question": "q", "answer": "no marker"}) + "\n")
    dm = ReasoningDataModule(task="gsm8k", path=str(tmp_path))
    with pytest.raises(DataFormatError, match=r"train.jsonl:2"):
        dm.train_samples()
