"""SCMA: the spec's properties 1-9 on tiny random policies (no training to convergence)."""
import itertools
import random

import lightning as L
import pytest
import torch

from datamodules.scma import ChainSumTask, SCMADataModule
from zoo.blocks.rl.advantages import grpo
from zoo.blocks.rl.rollout import pack
from zoo.policy_gradient.module import GRPOModule
from zoo.scma.module import (
    SCMAModule,
    chunk_token_lengths,
    count_fillers,
    importance_penalty,
    lossless,
    oracle_scores,
    parse_scores,
    parse_segments,
    redundancy,
    role_rewards,
    split_sentences,
)

TINY = {"backbone": "tiny-llama-char", "backbone_overrides": {"hidden_size": 32, "intermediate_size": 64},
        "prompt_template": "Q: {prompt}\nA: ", "seg_prompt": "S:\n", "score_prompt": "W:\n", "group_size": 4,
        "rollout": {"max_new_tokens": 80}, "alpha": 0.3, "mini_batch_size": 64, "kl": {"coef": 0.0}}
Y = "3+4=7. Wait, let me check. 7+5=12. \\boxed{12}"
TEXTS = [  # problem 1 (answer 12): short, one filler, wrong, two fillers; problem 2 (answer 6): identical
    "3+4=7. 7+5=12. \\boxed{12}", Y, "3+4=7. 7+5=13. \\boxed{13}",
    "Let me think again. 3+4=7. Let me think again. 7+5=12. \\boxed{12}",
    *["2+2=4. 4+2=6. \\boxed{6}"] * 4,
]


def tiny(**overrides) -> SCMAModule:
    torch.manual_seed(0)
    return SCMAModule(**{**TINY, **overrides})


def problems() -> list[dict]:
    task = ChainSumTask()
    return [task.sample([3, 4, 5], random.Random(0)), task.sample([2, 2, 2], random.Random(0))]


def with_responses(module: SCMAModule, texts: list[str] = TEXTS) -> SCMAModule:
    """The reasoning rollout replaced by fixed responses (each followed by EOS)."""
    def rollout(batch):
        prompts = [module.encode(module.format_prompt(s)) for s in batch for _ in range(module.hparams.group_size)]
        responses = [module.encode(t) + [module.tokenizer.eos_token_id] for t in texts]
        return pack(prompts, responses, module.tokenizer.pad_token_id, texts=texts)
    module.rollout = rollout
    return module


def row_advantages(advantages: torch.Tensor, mask: torch.Tensor) -> list[float]:
    """The one value each row's tokens carry (asserting it is uniform over the row's tokens)."""
    values = []
    for row, m in zip(advantages, mask.bool()):
        assert torch.allclose(row[m], row[m][0].expand_as(row[m])), "advantage not broadcast uniformly"
        assert torch.all(row[~m] == 0)
        values.append(float(row[m][0]))
    return values


# -- the task ------------------------------------------------------------------------------
def test_chain_sum_samples_label_every_sentence_and_split_disjointly():
    task = ChainSumTask(max_filler=4)
    train, test = task.samples("train", 200, seed=0), task.samples("test", None, seed=0)
    assert not {tuple(s["numbers"]) for s in train} & {tuple(s["numbers"]) for s in test}
    for s in train[:50]:
        sentences = split_sentences(s["solution"])
        assert [t.strip() for t in sentences] == [t for t, _ in s["steps"]]
        assert count_fillers(s["solution"], s["fillers"]) == sum(k == "filler" for _, k in s["steps"])
        assert s["solution"].endswith(f"\\boxed{{{s['answer']}}}") and s["answer"] == str(sum(s["numbers"]))
    assert problems()[0]["prompt"] == "Add 3, 4 and 5."
    assert SCMADataModule(batch_size=2, train_batches=3).train_samples()[0]["steps"]


# -- 1. lossless check ---------------------------------------------------------------------
def test_lossless_check_accepts_whitespace_and_rejects_any_character_change():
    chunks = parse_segments("<seg>3+4=7.</seg>\n<seg> Wait, let me check. 7+5=12.</seg><seg>\\boxed{12}</seg>")
    assert chunks is not None and len(chunks) == 3 and lossless(chunks, Y)
    assert lossless(split_sentences(Y), Y) and "".join(split_sentences(Y)) == Y
    for bad in (["3+4=7.", "Wait, let me check. 7+5=12.", "\\boxed{1}"],           # dropped
                ["3+4=7.", "Wait, let me check! 7+5=12.", "\\boxed{12}"],          # changed
                ["3+4=7.", "Wait, let me check. 7+5=12.", "\\boxed{12}", "."],     # added
                ["Wait, let me check.", "3+4=7. 7+5=12. \\boxed{12}"], []):        # reordered, empty
        assert not lossless(bad, Y)
    assert parse_segments("3+4=7. <seg>rest</seg>") is None and parse_segments("no tags") is None


def free_mode_outputs(module: SCMAModule, seg, score):
    """aux_free_text replaced: ``seg(response)`` and ``score(chunks_prompt)`` give the roles' texts."""
    def fake(prompts, budgets, stream):
        if stream == 3:
            texts = [seg(p[len(module.hparams.seg_prompt):-1]) for p in prompts]
        else:
            texts = [score(p) for p in prompts]
        return pack([module.encode(p) for p in prompts], [module.encode(t) or [0] for t in texts],
                    module.tokenizer.pad_token_id, texts=texts)
    module.aux_free_text = fake
    return module


def tagged(response: str) -> str:
    return "".join(f"<seg>{s}</seg>" for s in split_sentences(response))


def test_a_lossy_segmentation_triggers_the_uniform_penalty():
    module = with_responses(free_mode_outputs(
        tiny(decode_mode="free"), seg=lambda y: tagged(y).replace("=", "-", 1),
        score=lambda p: "<score>5</score>" * p.count("\n", len("W:\n"))))
    out = module.collect(problems())
    rollout = module.rollout(problems())
    assert out["metrics"]["seg_valid"] == 0.0 and out["metrics"]["weighted_share"] == 0.0
    torch.testing.assert_close(out["penalty"], rollout.lengths.float() / 80)
    good = with_responses(free_mode_outputs(
        tiny(decode_mode="free"), seg=tagged, score=lambda p: "<score>5</score>" * p.count("\n", len("W:\n"))))
    out = good.collect(problems())
    assert out["metrics"]["seg_valid"] == 1.0 and out["metrics"]["score_valid"] == 1.0
    assert torch.all(out["penalty"] == 0)                        # every chunk scored 5


# -- 2. score parsing ----------------------------------------------------------------------
def test_score_parsing_needs_one_integer_in_1_to_5_per_chunk():
    assert parse_scores("<score>4</score><score> 1 </score>", 2) == [4, 1]
    assert parse_scores("<score>4</score>\n<score>1</score>\n", 2) == [4, 1]
    for bad, n in (("<score>4</score>", 2), ("<score>4</score><score>1</score>", 1), ("<score>6</score>", 1),
                   ("<score>0</score>", 1), ("<score>2.5</score>", 1), ("<score>x</score>", 1),
                   ("<score>44</score>", 1), ("so <score>4</score>", 1), ("", 1)):
        assert parse_scores(bad, n) is None, bad


# -- 3. penalty ----------------------------------------------------------------------------
def test_penalty_properties():
    lengths, norm = [7, 20, 8, 10], 160.0
    assert importance_penalty(lengths, [5, 5, 5, 5], norm) == 0.0
    assert importance_penalty(lengths, [1, 1, 1, 1], norm) == pytest.approx(sum(lengths) / norm)
    base = [3, 2, 4, 1]
    for i in range(4):
        values = [importance_penalty(lengths, base[:i] + [w] + base[i + 1:], norm) for w in range(1, 6)]
        assert all(a >= b for a, b in itertools.pairwise(values))                # non-increasing in w_i
        doubled = [importance_penalty([n * (2 if j == i else 1) for j, n in enumerate(lengths)], base, norm),
                   importance_penalty(lengths, base, norm)]
        assert doubled[0] - doubled[1] == pytest.approx(redundancy(base[i]) * lengths[i] / norm)   # linear in l_i
    assert [redundancy(w, "threshold", 2) for w in range(1, 6)] == [1, 1, 0, 0, 0]
    with pytest.raises(ValueError):
        redundancy(3, "quadratic")


def test_chunk_lengths_sum_to_the_response_length_in_tokens():
    pieces = ["3+4", "=7.", " ", "Wait,", " let", " me check.", " 7+5=12.", " \\boxed{12}", ""]   # BPE-like, EOS
    chunks = ["3+4=7. ", "Wait, let me check. ", "7+5=12. \\boxed{12}"]
    assert chunk_token_lengths(pieces, chunks) == [3, 3, 3] and sum(chunk_token_lengths(pieces, chunks)) == 9
    module = with_responses(tiny())
    rollout = module.rollout(problems())
    for i, text in enumerate(TEXTS):
        counts = chunk_token_lengths(module.response_pieces(rollout, i), split_sentences(text))
        assert sum(counts) == int(rollout.lengths[i]) == len(text) + 1                 # chars + EOS, exactly
        assert counts[:-1] == [len(s) for s in split_sentences(text)][:-1]


def test_norm_options():
    for norm, expected in (("self", lambda n, g: n / n), ("group_mean", lambda n, g: n / g)):
        module = with_responses(free_mode_outputs(tiny(decode_mode="free", norm=norm), seg=lambda y: "bad",
                                                  score=lambda p: ""))
        rollout = module.rollout(problems())
        penalty = module.collect(problems())["penalty"]            # uniform fallback: |y| / L_norm
        n = rollout.lengths.float()
        group_mean = n.view(2, 4).mean(1).repeat_interleave(4)
        torch.testing.assert_close(penalty, expected(n, group_mean))


# -- 4. reward gating ----------------------------------------------------------------------
def test_wrong_answers_get_zero_and_alpha_zero_is_the_accuracy_reward():
    accuracy = torch.tensor([1.0, 0.0, 0.0, 1.0])
    penalty = torch.tensor([0.2, 0.9, 0.1, 0.0])
    valid = torch.ones(4, dtype=torch.bool)
    r = role_rewards(accuracy, penalty, 0.3, valid, valid)
    assert r["reason"][1] == 0 and r["reason"][2] == 0
    torch.testing.assert_close(r["reason"], torch.tensor([1 - 0.06, 0.0, 0.0, 1.0]))
    r_all = role_rewards(accuracy, penalty, 0.3, valid, valid, penalty_on="all")
    torch.testing.assert_close(r_all["reason"], accuracy - 0.3 * penalty)
    torch.testing.assert_close(role_rewards(accuracy, penalty, 0.0, valid, valid)["reason"], accuracy)
    invalid = torch.tensor([True, False, True, False])
    r = role_rewards(accuracy, penalty, 0.3, invalid, invalid, aux_role_reward="acc_only")
    torch.testing.assert_close(r["seg"], accuracy - (~invalid).float())


def test_alpha_zero_reasoning_update_is_vanilla_grpo():
    module = with_responses(tiny(alpha=0.0))
    out = module.collect(problems())
    n = len(TEXTS)
    scored = module.score_batch(out["rollout"], out["rewards"], out["group_ids"])
    accuracy = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    rollout = module.rollout(problems())
    expected, _ = grpo(accuracy, rollout.response_mask, group_ids=torch.arange(2).repeat_interleave(4))
    width = rollout.response_mask.shape[1]
    torch.testing.assert_close(scored["advantages"][:n, :width], expected)
    assert torch.all(scored["advantages"][:n, width:] == 0)


# -- 5. GRPO per (problem, role) ----------------------------------------------------------
def test_advantages_are_zero_mean_per_problem_and_role_and_broadcast():
    module = with_responses(tiny())
    out = module.collect(problems())
    scored = module.score_batch(out["rollout"], out["rewards"], out["group_ids"])
    values = torch.tensor(row_advantages(scored["advantages"], out["rollout"].response_mask))
    groups = out["group_ids"]
    assert sorted(groups.unique().tolist()) == [0, 1, 2, 3, 4, 5]               # 2 problems x 3 roles
    for g in groups.unique():
        assert abs(float(values[groups == g].sum())) < 1e-4
    assert values[groups == 0].abs().max() > 0.1                                # problem 1 has a wrong answer


def test_identical_rewards_give_zero_advantages_and_no_gradient():
    module = with_responses(tiny(oracle_scorer=True))                            # problem 2: no filler, P = 0
    out = module.collect(problems())
    scored = module.score_batch(out["rollout"], out["rewards"], out["group_ids"])
    same = (out["group_ids"] == 1) | (out["group_ids"] == 3)                     # problem 2's reason and seg rows
    assert torch.all(scored["advantages"][same] == 0)
    batch = {k: (v.select(same.nonzero().flatten()) if k == "rollout" else None if v is None
                 else v[same]) for k, v in scored.items()}
    loss, _ = module.actor_loss(batch)
    loss.backward()
    assert all(p.grad is None or torch.all(p.grad == 0) for p in module.policy.parameters())


# -- 6. parameter sharing ------------------------------------------------------------------
def test_a_step_on_scoring_transitions_alone_changes_the_reasoning_logits():
    module = with_responses(tiny())
    out = module.collect(problems())
    rows = (out["group_ids"] >= 4).nonzero().flatten()                           # scoring transitions only
    assert len(rows) == len(TEXTS)
    scored = module.score_batch(out["rollout"].select(rows), out["rewards"][rows], out["group_ids"][rows])
    assert scored["advantages"].abs().sum() > 0
    prompt = module.tokenizer("Q: Add 3, 4 and 5.\nA: 3+4=", return_tensors="pt")["input_ids"]
    before = module.policy(input_ids=prompt).logits.detach()
    optimizer = torch.optim.SGD(module.policy.parameters(), lr=0.5)
    module.actor_loss(scored)[0].backward()
    optimizer.step()
    assert not torch.allclose(module.policy(input_ids=prompt).logits, before)


# -- 7. deployment -------------------------------------------------------------------------
def test_evaluation_and_generate_use_only_the_reasoning_role():
    module = tiny()
    batch = problems()
    module.role_calls.clear()
    module.eval()
    module.validation_step(batch, 0)
    module.evaluate_batch(batch)
    assert len(module.generate(["Add 1, 2 and 3.", batch[0]])) == 2
    assert module.role_calls["reason"] == 6 and module.role_calls["seg"] == 0 and module.role_calls["score"] == 0
    module.train()
    with_responses(module).collect(batch)
    assert module.role_calls["seg"] == len(TEXTS) and module.role_calls["score"] == len(TEXTS)


# -- 8. fallback path ----------------------------------------------------------------------
def test_a_malformed_scorer_reduces_training_to_grpo_with_the_uniform_length_penalty():
    module = with_responses(free_mode_outputs(tiny(decode_mode="free"), seg=tagged, score=lambda p: "<score>"))
    out = module.collect(problems())
    assert out["metrics"]["score_valid"] == 0.0 and out["metrics"]["weighted_share"] == 0.0
    torch.manual_seed(0)
    baseline = GRPOModule(**{k: v for k, v in TINY.items() if k not in ("alpha", "seg_prompt", "score_prompt")},
                          rewards=[{"name": "boxed_match"}, {"name": "length", "weight": 0.3, "gate": "correct"}])
    rollout = module.rollout(problems())
    expected, _ = baseline.reward(rollout, [s for s in problems() for _ in range(4)])
    n = len(TEXTS)
    torch.testing.assert_close(out["rewards"][:n], expected)
    torch.testing.assert_close(out["rewards"][2 * n:], expected - 1.0)          # team reward + format penalty

    no_seg = with_responses(free_mode_outputs(tiny(decode_mode="free"), seg=lambda y: "junk", score=lambda p: ""))
    out = no_seg.collect(problems())
    assert out["metrics"]["seg_valid"] == 0.0 and out["metrics"]["score_valid"] == 0.0
    assert len(out["rewards"]) == 2 * n                                          # no segmentation, no scoring call
    torch.testing.assert_close(out["rewards"][:n], expected)


# -- 9. collusion monitor ------------------------------------------------------------------
def test_collusion_monitor_warns_above_95_percent_fives():
    module = tiny()
    with pytest.warns(UserWarning, match="collusion"):
        assert module.monitor_collusion([5] * 96 + [1] * 4)
    assert not module.monitor_collusion([5] * 95 + [2] * 5)
    metrics = with_responses(module).collect(problems())["metrics"]
    assert {"mean_score", "share_w1", "share_w5", "chunks", "seg_valid", "score_valid", "fillers"} <= set(metrics)
    assert 1.0 <= metrics["mean_score"] <= 5.0


# -- decoding, switches, training ----------------------------------------------------------
def test_choice_decoding_is_lossless_and_its_log_probs_are_exact():
    module = tiny()
    rollout, chunks = module.segment([Y, "no sentence boundary", ""])
    assert "".join(chunks[0]) == Y and chunks[1] == ["no sentence boundary"] and chunks[2] is None
    assert rollout.response_mask[0].sum() == 3 and rollout.response_mask[1].sum() == 0
    score_rollout, scores = module.rate(chunks[:2], [{}, {}])
    assert [len(s) for s in scores] == [len(chunks[0]), 1] and all(1 <= w <= 5 for s in scores for w in s)
    for r in (rollout, score_rollout):
        recomputed, _, _ = module.policy_outputs(r)
        torch.testing.assert_close(recomputed * r.response_mask, r.logprobs * r.response_mask, atol=1e-5, rtol=0)


def test_oracle_scorer_and_switch_validation():
    sample = problems()[0]
    chunks = ["3+4=7. ", "Wait, let me check. Let me think again. ", "Wait, let me check. 7+5=12. ", "\\boxed{12}"]
    assert oracle_scores(chunks, sample) == [5, 1, 5, 5]
    module = with_responses(tiny(oracle_scorer=True))
    out = module.collect(problems())
    assert out["learned_scores"] == [] and sorted(out["group_ids"].unique().tolist()) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="oracle_scorer"):
        oracle_scores(chunks, {})
    for bad in ({"g": "quadratic"}, {"norm": "median"}, {"penalty_on": "wrong"}, {"aux_role_reward": "solo"},
                {"decode_mode": "beam"}, {"threshold": 6}):
        with pytest.raises(ValueError):
            tiny(**bad)


def test_training_through_lightning_with_frozen_aux_agents(tmp_path):
    module = tiny(frozen_aux=True, penalty_on="all", warm_start={"steps": 2, "batch_size": 4, "lr": 1e-3})
    datamodule = SCMADataModule(batch_size=2, train_batches=2, eval_size=4, eval_batch_size=4)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(tmp_path))
    trainer.fit(module, datamodule=datamodule)
    records = [r for r in module.history if "reward" in r]
    assert len(records) == 2 and {"collusion", "mean_score", "penalty", "fillers", "loss"} <= set(records[-1])
    changed = any(not torch.equal(a, b) for a, b in zip(module.policy.parameters(), module.aux_policy.parameters()))
    assert changed and all(not p.requires_grad for p in module.aux_policy.parameters())
    module.save_pretrained(tmp_path / "saved")
    loaded = SCMAModule.from_pretrained(tmp_path / "saved")
    assert loaded.hparams.frozen_aux and torch.equal(loaded.aux_policy.model.embed_tokens.weight,
                                                     module.aux_policy.model.embed_tokens.weight)
