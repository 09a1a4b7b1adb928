"""The policy-gradient core: advantage and loss maths by hand, rollouts, rewards, reasoning data."""
import math

import pytest
import torch

from zoo.blocks.rl.advantages import get_advantage, group_stats
from zoo.blocks.rl.losses import aggregate, get_policy_loss, kl_penalty
from zoo.blocks.rl.rewards import (
    countdown,
    extract_final_number,
    format_check,
    get_reward,
    gsm8k,
    math_equal,
)
from zoo.blocks.rl.rollout import (
    Rollout,
    RolloutEngine,
    pack,
    response_logits,
    token_logprobs,
)


# -- advantages ----------------------------------------------------------------------------
def _ones(n, r=3):
    return torch.ones(n, r)


def test_grpo_group_std_scaling_by_hand():
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0])
    groups = torch.tensor([0, 0, 1, 1])
    adv, _ = get_advantage("grpo")(rewards, _ones(4), group_ids=groups)
    s = 1 / math.sqrt(2)                        # (1 - 0.5) / unbiased std of {1, 0}
    torch.testing.assert_close(adv[:, 0], torch.tensor([s, -s, 0.0, 0.0]))
    assert torch.equal(adv, adv[:, :1].expand_as(adv))       # broadcast to every token


def test_grpo_norm_variants_and_dr_grpo():
    rewards = torch.tensor([3.0, 1.0, 0.0, 2.0])
    groups = torch.tensor([0, 0, 1, 1])
    none, _ = get_advantage("grpo")(rewards, _ones(4, 1), group_ids=groups, norm="none")
    torch.testing.assert_close(none[:, 0], torch.tensor([1.0, -1.0, -1.0, 1.0]))
    dr, _ = get_advantage("dr_grpo")(rewards, _ones(4, 1), group_ids=groups)
    torch.testing.assert_close(dr, none)
    batch, _ = get_advantage("grpo")(rewards, _ones(4, 1), group_ids=groups, norm="batch", eps=0.0)
    torch.testing.assert_close(batch[:, 0], none[:, 0] / rewards.std())


def test_grpo_zero_mean_per_group_and_masked():
    torch.manual_seed(0)
    rewards = torch.rand(12)
    groups = torch.arange(3).repeat_interleave(4)
    mask = (torch.rand(12, 5) > 0.3).float()
    mask[:, 0] = 1
    adv, _ = get_advantage("grpo")(rewards, mask, group_ids=groups)
    scores = torch.where(mask.bool(), adv, torch.nan).nanmean(-1)
    for g in range(3):
        assert abs(float(scores[groups == g].mean())) < 1e-6
    assert torch.all(adv[mask == 0] == 0)


def test_group_std_of_a_single_response_is_one():
    mean, std, count = group_stats(torch.tensor([5.0, 1.0, 3.0]), torch.tensor([0, 1, 1]))
    torch.testing.assert_close(std, torch.tensor([1.0, math.sqrt(2), math.sqrt(2)]))
    torch.testing.assert_close(mean, torch.tensor([5.0, 2.0, 2.0]))
    torch.testing.assert_close(count, torch.tensor([1.0, 2.0, 2.0]))


def test_rloo_leave_one_out_by_hand():
    adv, _ = get_advantage("rloo")(torch.tensor([1.0, 0.0, 0.0]), _ones(3, 1), group_ids=torch.zeros(3))
    torch.testing.assert_close(adv[:, 0], torch.tensor([1.0, -0.5, -0.5]))


def test_reinforce_pp_returns_and_whitening():
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv, returns = get_advantage("reinforce_pp")(torch.tensor([1.0, 0.0]), mask)
    torch.testing.assert_close(returns, torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]))
    valid = adv[mask.bool()]
    assert abs(float(valid.mean())) < 1e-6 and abs(float(valid.std()) - 1) < 1e-4
    kl = torch.full((2, 3), 0.5)
    _, with_kl = get_advantage("reinforce_pp")(torch.tensor([1.0, 0.0]), mask, token_kl=kl, kl_coef=0.1)
    torch.testing.assert_close(with_kl[0], torch.tensor([0.85, 0.9, 0.95]))     # 1 - 0.05 per remaining token


def test_gae_by_hand_and_skips_inserted_tokens():
    mask = torch.tensor([[1.0, 1.0]])
    values = torch.tensor([[0.5, 0.2]])
    adv, returns = get_advantage("gae")(torch.tensor([1.0]), mask, values=values, gamma=1.0, lam=1.0, whiten=False)
    torch.testing.assert_close(adv, torch.tensor([[0.5, 0.8]]))         # 1 - V(t) with lambda = gamma = 1
    torch.testing.assert_close(returns, torch.tensor([[1.0, 1.0]]))
    lam_half, _ = get_advantage("gae")(torch.tensor([1.0]), mask, values=values, gamma=1.0, lam=0.5, whiten=False)
    torch.testing.assert_close(lam_half, torch.tensor([[-0.3 + 0.5 * 0.8, 0.8]]))
    # A tool observation inserted in the middle changes nothing for the sampled tokens around it.
    gapped, _ = get_advantage("gae")(torch.tensor([1.0]), torch.tensor([[1.0, 0.0, 1.0]]),
                                     values=torch.tensor([[0.5, 9.9, 0.2]]), gamma=1.0, lam=0.5, whiten=False)
    torch.testing.assert_close(gapped, torch.tensor([[-0.3 + 0.5 * 0.8, 0.0, 0.8]]))


def test_unknown_names_list_the_registered_ones():
    with pytest.raises(KeyError, match="grpo"):
        get_advantage("nope")
    with pytest.raises(KeyError, match="clipped"):
        get_policy_loss("nope")
    with pytest.raises(KeyError, match="countdown"):
        get_reward("nope")


# -- losses --------------------------------------------------------------------------------
def test_clipped_loss_at_ratio_one_is_the_policy_gradient():
    torch.manual_seed(0)
    logp = torch.randn(3, 4, requires_grad=True)
    adv = torch.randn(3, 4)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.float)
    loss, stats = get_policy_loss("clipped")(logp, logp.detach(), adv, mask)
    (grad,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(grad, -adv * mask / mask.sum())
    assert float(stats["clip_fraction"]) == 0.0 and abs(float(stats["ratio"]) - 1) < 1e-6


def test_clipping_and_dual_clip_by_hand():
    mask = torch.ones(1, 3)
    logp = torch.log(torch.tensor([[1.5, 1.1, 10.0]])).requires_grad_(True)
    old = torch.zeros(1, 3)
    adv = torch.tensor([[1.0, -1.0, -1.0]])
    loss, _ = get_policy_loss("clipped")(logp, old, adv, mask, agg="seq_mean_token_sum")
    # token 1: min(1.5, 1.2) * 1 -> -1.2 (clipped); token 2: inside the range -> 1.1; token 3: 10
    torch.testing.assert_close(loss, torch.tensor(-1.2 + 1.1 + 10.0))
    dual, _ = get_policy_loss("dual_clip")(logp, old, adv, mask, agg="seq_mean_token_sum")
    torch.testing.assert_close(dual, torch.tensor(-1.2 + 1.1 + 3.0))     # capped at -c * A
    (grad,) = torch.autograd.grad(dual, logp)
    assert grad[0, 0] == 0 and grad[0, 2] == 0 and grad[0, 1] != 0


def test_aggregations_by_hand():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert float(aggregate(values, mask, "token_mean")) == pytest.approx(10 / 4)
    assert float(aggregate(values, mask, "seq_mean_token_mean")) == pytest.approx((2 + 4) / 2)
    assert float(aggregate(values, mask, "seq_mean_token_sum")) == pytest.approx((6 + 4) / 2)
    assert float(aggregate(values, mask, "seq_sum_const_norm", max_length=8)) == pytest.approx(10 / 8)
    with pytest.raises(ValueError):
        aggregate(values, mask, "seq_sum_const_norm")


def test_kl_estimators():
    torch.manual_seed(0)
    logp = torch.randn(4, 6)
    for kind in ("k1", "k2", "k3", "abs"):
        assert torch.all(kl_penalty(logp, logp, kind) == 0)
    ref = torch.randn(4, 6)
    assert torch.all(kl_penalty(logp, ref, "k3") >= 0)
    delta = ref - logp
    torch.testing.assert_close(kl_penalty(logp, ref, "k3"), (delta.exp() - delta - 1).clamp(-10, 10))
    torch.testing.assert_close(kl_penalty(logp, ref, "k2"), 0.5 * delta ** 2)


# -- rollouts ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    from zoo.backbones import build_backbone
    torch.manual_seed(0)
    model, tokenizer = build_backbone("tiny-llama-char", causal_lm=True, padding_side="left")
    return model.eval(), tokenizer


def _recomputed(model, rollout: Rollout) -> torch.Tensor:
    logits, _ = response_logits(model, rollout.input_ids, rollout.attention_mask, rollout.prompt_width,
                                allowed=rollout.allowed)
    return token_logprobs(logits, rollout.response_ids)


def test_sampling_logprobs_equal_a_full_forward(tiny):
    model, tok = tiny
    engine = RolloutEngine(model, tok, max_new_tokens=12)
    rollout = engine.generate(["Q:1+2=", "Q:1+2=", "Q:31+4=", "Q:31+4="], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(_recomputed(model, rollout) * rollout.response_mask, rollout.logprobs,
                                   atol=1e-5, rtol=0)
    assert rollout.lengths.tolist() == [12] * 4


def test_rollouts_are_reproducible_under_a_seed(tiny):
    model, tok = tiny
    engine = RolloutEngine(model, tok, max_new_tokens=10, top_k=20, top_p=0.9)
    a = engine.generate(["ab", "cde"] * 2, generator=torch.Generator().manual_seed(3))
    b = engine.generate(["ab", "cde"] * 2, generator=torch.Generator().manual_seed(3))
    c = engine.generate(["ab", "cde"] * 2, generator=torch.Generator().manual_seed(4))
    assert a.texts == b.texts and torch.equal(a.logprobs, b.logprobs)
    assert a.texts != c.texts


def test_greedy_matches_transformers_generate(tiny):
    model, tok = tiny
    prompts = ["Q:7+8=", "Q:12+30=", "hello"]
    rollout = RolloutEngine(model, tok, max_new_tokens=8, greedy=True).generate(prompts)
    for prompt, response in zip(prompts, rollout.response_ids):
        ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=None)
        assert out[0, ids.shape[1]:].tolist() == response.tolist()


def test_stop_strings_end_a_sequence(tiny):
    model, tok = tiny
    engine = RolloutEngine(model, tok, max_new_tokens=40, stop=["a", "e", "i", "o", "u"])
    rollout = engine.generate(["x"] * 8, generator=torch.Generator().manual_seed(0))
    for text, finished, length in zip(rollout.texts, rollout.finished, rollout.lengths):
        if finished and text and text[-1] in "aeiou":
            assert not any(c in "aeiou" for c in text[:-1])
        else:
            assert length == 40 or not finished
    assert rollout.finished.any()


def test_constrained_decoding_stays_in_the_allowed_set(tiny):
    model, tok = tiny
    allowed = tok.convert_tokens_to_ids(list("CN"))
    engine = RolloutEngine(model, tok, max_new_tokens=9)
    rollout = engine.generate(["one", "two"], allowed_token_ids=allowed, max_new_tokens=[3, 6],
                              generator=torch.Generator().manual_seed(0))
    assert [len(t) for t in rollout.texts] == [3, 6] and set("".join(rollout.texts)) <= {"C", "N"}
    with torch.no_grad():
        torch.testing.assert_close(_recomputed(model, rollout) * rollout.response_mask, rollout.logprobs,
                                   atol=1e-5, rtol=0)
    # Renormalised over the two tokens: the two log-probs of a position sum to log 1.
    logits, _ = response_logits(model, rollout.input_ids, rollout.attention_mask, rollout.prompt_width,
                                allowed=rollout.allowed)
    probs = logits.softmax(-1)[..., allowed].sum(-1)
    torch.testing.assert_close(probs, torch.ones_like(probs))


def test_multi_turn_inserted_tokens_are_outside_the_loss_mask(tiny):
    model, tok = tiny
    seen = []

    def env(index, text):
        seen.append(text)
        return "<obs>"

    engine = RolloutEngine(model, tok, max_new_tokens=60, stop=["a", "e", "i", "o", "u"], max_turns=3)
    rollout = engine.generate(["hello"] * 6, env=env, generator=torch.Generator().manual_seed(1))
    obs = tok("<obs>", add_special_tokens=False)["input_ids"]
    checked = 0
    for i, text in enumerate(rollout.texts):
        ids = rollout.response_ids[i].tolist()
        for start in range(len(ids) - len(obs) + 1):
            if ids[start:start + len(obs)] == obs and rollout.response_attention[i, start] == 1:
                assert rollout.response_mask[i, start:start + len(obs)].sum() == 0
                assert torch.all(rollout.logprobs[i, start:start + len(obs)] == 0)
                checked += 1
        assert text.count("<obs>") == rollout.turns[i] - 1 or not rollout.finished[i]
    assert checked > 0 and seen
    with torch.no_grad():
        torch.testing.assert_close(_recomputed(model, rollout) * rollout.response_mask, rollout.logprobs,
                                   atol=1e-5, rtol=0)


def test_concat_pads_prompts_left_and_responses_right(tiny):
    _, tok = tiny
    a = pack([[5, 6, 7]], [[8]], tok.pad_token_id)
    b = pack([[9]], [[10, 11, 12]], tok.pad_token_id)
    both = Rollout.concat([a, b], tok.pad_token_id)
    assert both.input_ids.tolist() == [[5, 6, 7, 8, 0, 0], [0, 0, 9, 10, 11, 12]]
    assert both.response_mask.tolist() == [[1, 0, 0], [1, 1, 1]]


# -- rewards -------------------------------------------------------------------------------
@pytest.mark.parametrize("response,expected", [
    ("so 3 + 4 = 7\n#### 7", "7"), ("The answer is \\boxed{1,234}.", "1234"), ("answer is: 12", "12"),
    ("first 3 then 41 apples", "41"), ("no digits", None)])
def test_final_number_extraction(response, expected):
    found = extract_final_number(response)
    assert (found.replace(",", "") if found else None) == expected


def test_gsm8k_reward_is_numeric():
    assert gsm8k("#### 72", {"answer": "72"}) == 1.0
    assert gsm8k("it is \\boxed{72.0}", {"answer": "72"}) == 1.0
    assert gsm8k("#### 71", {"answer": "72"}) == 0.0


def test_boxed_match_normalises_and_uses_the_last_box():
    reward = get_reward("boxed_match")
    assert reward("\\boxed{\\frac12}", {"answer": "\\frac{1}{2}"}) == 1.0
    assert reward("\\boxed{3} then \\boxed{4}", {"answer": "4"}) == 1.0
    assert reward("\\boxed{4} then \\boxed{3}", {"answer": "4"}) == 0.0
    assert reward("4", {"answer": "4"}) == 0.0
    assert math_equal("\\left(2\\right)", "(2)") and math_equal("0.50", ".5")


@pytest.mark.parametrize("equation,expected", [
    ("(3*5)+7", 1.0), ("7 + 3 * 5", 1.0), ("3*5+7+7", 0.0), ("3*5+6", 0.0), ("15+7", 0.0),
    ("(7-3)*5", 0.0), ("__import__('os')", 0.0), ("3*5+7/0", 0.0)])
def test_countdown_verifier(equation, expected):
    sample = {"numbers": [3, 5, 7], "target": 22}
    assert countdown(f"think... <answer>{equation}</answer>", sample) == expected


def test_countdown_needs_the_answer_tag_and_divides_exactly():
    assert countdown("(3*5)+7", {"numbers": [3, 5, 7], "target": 22}) == 0.0
    assert countdown("<answer>8/3*6</answer>", {"numbers": [8, 3, 6], "target": 16}) == 1.0


def test_format_reward():
    assert format_check("x \\boxed{3}", {}) == 1.0 and format_check("x", {}) == 0.0
    assert format_check("<answer>1</answer>", {}, pattern="<answer>.*</answer>", full=True) == 1.0
