"""M-ASK: knowledge state, strict parsers, the five-agent rollout and its turn-level ΔF1 rewards.

Branches are forced by scripting each call's output: in choice decoding a role offered one candidate
must pick it, so ``Scripted.candidates`` hands out the scripted text.
"""
import pytest
import torch

from zoo.blocks.rl.advantages import outcome_token_rewards
from zoo.blocks.search_env import SearchEnvironment
from zoo.blocks.world import SyntheticWorld
from zoo.mask.module import (
    UNKNOWN,
    KnowledgeState,
    MASKModule,
    parse_answer,
    parse_planning,
    parse_search,
    parse_summary,
    parse_update,
)

ROLES = ("planning", "search", "summary", "update", "answer")


class Scripted(MASKModule):
    """Questions with a script get exactly the scripted (role, output) sequence; others decode normally."""

    script: dict[str, list[tuple[str, str]]]

    def candidates(self, role, **context):
        steps = self.script.get(context["sample"]["qid"])
        if steps is None:
            return super().candidates(role, **context)
        expected, text = steps.pop(0)
        assert role == expected, f"script expected a {expected} call, the rollout made a {role} call"
        return [text]


class NeverEnds(MASKModule):
    def search_candidates(self, state, **context):
        return [c for c in super().search_candidates(state, **context) if c != "<end>"]


@pytest.fixture(scope="module")
def world():
    return SyntheticWorld(people=12, cities=6, countries=3, companies=4)


def make(world, cls=Scripted, **overrides):
    torch.manual_seed(0)
    options = {"backbone": "tiny-llama-world", "max_turns": 3, "top_k": 3, "instructions": "role_only",
               "mini_batch_size": 64, "optimizer": {"lr": 1e-3}, "seed": 0}
    module = cls(**{**options, **overrides})
    module.env = SearchEnvironment.from_world(world, k=3)
    module.script = {}
    return module


def two_hop(world):
    q = next(q for q in world.questions if q.relations == ["born_in", "located_in"])
    return q.as_sample(), q


def plan(question, guess=UNKNOWN):
    return "planning", f"<q1> {question} </q1> <a1> {guess} </a1> <final_answer> {guess} </final_answer>"


def turn(query, evidence, update, answer):
    return [("search", f"<search> {query} </search>"), ("summary", f"<evidence> {evidence} </evidence>"),
            ("update", update), ("answer", f"<final_answer> {answer} </final_answer>")]


def up_down_script(world):
    """F1 series 0 -> 1 -> 0 -> 2/3: non-zero improvements of both signs."""
    sample, q = two_hop(world)
    middle, answer = q.subquestions[0][1], q.answer
    first = world.passages[q.support[0]]["text"]
    second = world.passages[q.support[1]]["text"]
    script = [plan(sample["question"]),
              *turn(f"{q.subject} born", first, "<Add> t2 </Add>", answer),
              *turn(f"{middle} located in", second, "<Update> t1 </Update>", middle),
              *turn(f"{middle} located in", "No useful information", "<Add> t3 </Add>", f"{answer} {middle}")]
    return sample, script


def run(module, samples, scripts=()):
    for sample, script in zip(samples, scripts):
        module.script[sample["qid"]] = list(script)
    outcomes, transitions, buffer = module.run_episodes(samples)
    module.assign_rewards(samples, outcomes, transitions)
    return outcomes, transitions, buffer


def by_role(steps, role):
    return [t for t in steps if t.role == role]


# -- 1. telescoping, and the released code's turn-level formula ---------------------------------
def test_delta_rewards_telescope_to_last_minus_first_score(world):
    module = make(world)
    sample, script = up_down_script(world)
    samples = [sample] + [q.as_sample() for q in world.questions[:15] if q.qid != sample["qid"]]
    outcomes, transitions, _ = run(module, samples, [script])
    scores = outcomes[0]["scores"]
    assert scores == pytest.approx([0.0, 1.0, 0.0, 2 / 3])
    for outcome, steps in zip(outcomes, transitions):
        assert all(t.valid for t in steps)             # choice candidates are all legal
        f = outcome["scores"]
        for role in ("search", "summary", "update"):
            assert sum(t.reward for t in by_role(steps, role)) == pytest.approx(f[-1] - f[0])
        assert by_role(steps, "planning")[0].reward == f[0]
        assert [t.reward for t in by_role(steps, "answer")] == pytest.approx(f[1:])
    first = transitions[0]
    assert [t.reward for t in by_role(first, "search")] == pytest.approx([1.0, -1.0, 2 / 3])


def test_turn_cost_penalties_and_f1_plus_delta(world):
    sample, script = up_down_script(world)
    script[3] = ("update", "<Add> t9 </Add>")                  # wrong index at turn 1: illegal, becomes Add t2
    module = make(world, turn_cost=-0.1, kma_reward="f1_plus_delta")
    outcomes, transitions, _ = run(module, [sample], [script])
    f = outcomes[0]["scores"]
    updates = by_role(transitions[0], "update")
    assert [t.valid for t in updates] == [False, True, True]
    expected = [-0.1 + f[i] + (f[i] - f[i - 1]) for i in (1, 2, 3)]
    assert [t.reward for t in updates] == pytest.approx([expected[0] - 1.0, *expected[1:]])
    assert [t.reward for t in by_role(transitions[0], "summary")] == pytest.approx(expected)
    assert list(outcomes[0]["state"].trajectory) == ["t1", "t2", "t3"]   # the fallback added a step


# -- 2, 3. <end>, transition counts -----------------------------------------------------------
@pytest.mark.parametrize("end_turn", [1, 2, 3])
def test_end_stops_with_one_zero_reward_search_and_no_retrieval(world, end_turn):
    module = make(world)
    sample, script = up_down_script(world)
    script = script[:1 + 4 * (end_turn - 1)] + [("search", "<end>")]
    outcomes, transitions, _ = run(module, [sample], [script])
    steps = transitions[0]
    assert len(steps) == 1 + 4 * (end_turn - 1) + 1
    assert steps[-1].role == "search" and steps[-1].info["end"] and steps[-1].reward == 0.0
    assert [t.info["turn"] for t in steps if t.role != "planning"].count(end_turn) == 1
    assert outcomes[0]["stats"].searches == end_turn - 1         # the end call retrieved nothing
    assert outcomes[0]["end_turn"] == end_turn
    assert len(outcomes[0]["scores"]) == end_turn
    assert outcomes[0]["prediction"] == outcomes[0]["state"].final_answer


@pytest.mark.parametrize("end_penalty", [True, False])
def test_an_illegal_end_gets_the_format_penalty_when_configured(world, end_penalty):
    module = make(world, end_format_penalty=end_penalty)
    sample, _ = two_hop(world)
    _, transitions, _ = run(module, [sample], [[plan(sample["question"]), ("search", "<end> now")]])
    end = transitions[0][-1]
    assert end.info["end"] and not end.valid
    assert end.reward == (-1.0 if end_penalty else 0.0)


def test_transition_count_without_end_is_one_plus_four_per_turn(world):
    module = make(world, cls=NeverEnds, max_turns=3)
    samples = [q.as_sample() for q in world.questions[:6]]
    _, transitions, buffer = module.run_episodes(samples)
    assert all(len(steps) == 1 + 4 * 3 for steps in transitions)
    assert len(buffer) == 6 * 13
    assert [t.role for t in transitions[0]] == ["planning"] + ["search", "summary", "update", "answer"] * 3


def test_without_knowledge_agents_search_results_go_to_the_answer_agent(world):
    module = make(world, cls=NeverEnds, use_knowledge_agents=False, max_turns=2)
    samples = [q.as_sample() for q in world.questions[:4]]
    outcomes, transitions, _ = module.run_episodes(samples)
    module.assign_rewards(samples, outcomes, transitions)
    assert all([t.role for t in steps] == ["planning", "search", "answer", "search", "answer"] for steps in transitions)
    f = outcomes[0]["scores"]
    assert sum(t.reward for t in by_role(transitions[0], "search")) == pytest.approx(f[-1] - f[0])
    state = outcomes[0]["state"]
    assert "Doc1:" in module.answer_prompt(state, module.env.search("x born", k=2))


# -- 4-7. parsers and the knowledge state -----------------------------------------------------
def test_update_parser_and_state_copy():
    keys = ["t1", "t2"]
    assert parse_update("<Update>t1</Update>", keys) == ("update", "t1", True)
    assert parse_update("<Add>t3</Add>", keys) == ("add", "t3", True)
    assert parse_update(" <Add> t3 </Add> ", keys) == ("add", "t3", True)      # word-level decoding's spaces
    assert parse_update("<Add>t5</Add>", keys) == ("add", "t3", False)
    assert parse_update("<Add>t03</Add>", keys) == ("add", "t3", False)
    assert parse_update("<Update>t7</Update>", keys) == ("add", "t3", False)
    assert parse_update("<Update>t1</Update> because", keys) == ("add", "t3", False)
    assert parse_update("<Update>t1</Update><Add>t3</Add>", keys) == ("add", "t3", False)
    assert parse_update("", keys) == ("add", "t3", False)
    state = KnowledgeState("Q ?", {"t1": ("q1", "a1"), "t2": ("q2", "a2")}, "a2")
    updated = state.apply_update("update", "t1", "new q", "new e")
    added = state.apply_update("add", "t3", "q3", "e3")
    assert state.trajectory == {"t1": ("q1", "a1"), "t2": ("q2", "a2")} and state.final_answer == "a2"
    assert updated.trajectory["t1"] == ("new q", "new e") and list(added.trajectory) == ["t1", "t2", "t3"]
    assert state.with_answer("x").final_answer == "x" and state.final_answer == "a2"
    assert added.render().splitlines()[-1] == "t3: Q: q3 | A: e3"
    with pytest.raises(ValueError, match="t3"):
        state.apply_update("add", "t5", "q", "e")
    with pytest.raises(ValueError, match="t9"):
        state.apply_update("update", "t9", "q", "e")


def test_search_parser():
    assert parse_search("<search>a</search><search>b</search>") == ("search", "a", False)
    assert parse_search("<end>") == ("end", "", True)
    assert parse_search("foo") == ("search", "foo", False)
    assert parse_search("<search> Entity3 born </search>") == ("search", "Entity3 born", True)
    assert parse_search("I think: <search>x</search>") == ("search", "x", False)
    assert parse_search("who, is it?\nmore") == ("search", "who is it", False)
    assert parse_search("") == ("end", "", False)


def test_summary_parser():
    long = " ".join(["word"] * 76)
    assert parse_summary(f"<evidence>{long}</evidence>") == (long, False)
    assert parse_summary("<evidence>Entity1 was born in City2 .</evidence>") == ("Entity1 was born in City2 .", True)
    assert parse_summary("<evidence>a</evidence><evidence>b</evidence>") == ("a", False)
    assert parse_summary("<evidence>a</evidence> extra") == ("a", False)
    assert parse_summary("No useful information here") == ("No useful information", False)
    assert parse_summary("!!!", "Entity1 born", ["Entity9 visited City1. Entity1 was born in City2."]) == (
        "Entity1 was born in City2", False)
    assert parse_summary("", "zzz", ["nothing shared"]) == ("No useful information", False)


def test_planning_parser():
    q = "Where ?"
    good = parse_planning("<q1>x</q1>\n<a1>1</a1>\n<q2>y</q2><a2>unkown</a2><final_answer>1</final_answer>", q)
    assert good.legal and good.steps == [("x", "1"), ("y", "unkown")] and good.final_answer == "1"
    assert not parse_planning("<q1>x</q1><a2>1</a2><final_answer>1</final_answer>", q).legal      # order q1 a2
    six = "".join(f"<q{i}>s{i}</q{i}><a{i}>a</a{i}>" for i in range(1, 7))
    assert not parse_planning(six, q).legal
    five = "".join(f"<q{i}>s{i}</q{i}><a{i}>a</a{i}>" for i in range(1, 6))
    assert parse_planning(five, q).legal
    assert not parse_planning("<q1>x</q1><a1>1</a1><q2>x</q2><a2>2</a2>", q).legal                # duplicate
    assert not parse_planning("<q1>x</q1><a1>1</a1> and so on", q).legal                         # text outside
    fallback = parse_planning("born: City1\nCity1", q)
    assert not fallback.legal and fallback.steps == [("born", "City1")] and fallback.final_answer == "City1"
    assert parse_planning("", q) == ([(q, UNKNOWN)], UNKNOWN, False)
    collapsed = KnowledgeState.from_plan(q, good, collapse=True)
    assert collapsed.trajectory == {"t1": (q, "1")} and collapsed.final_answer == "1"
    assert KnowledgeState.from_plan(q, good).trajectory == {"t1": ("x", "1"), "t2": ("y", "unkown")}


def test_answer_parser():
    state = KnowledgeState("Q", {"t1": ("q", "City4")})
    assert parse_answer("<final_answer> City2 </final_answer>", state) == ("City2", True)
    assert parse_answer("<final_answer>a</final_answer><final_answer>b</final_answer>", state) == ("a", False)
    assert parse_answer("City2\nbecause", state) == ("City2", False)
    assert parse_answer("", state) == ("City4", False)


# -- 8. the score: EM for yes/no gold, F1 (best alias, normalised) otherwise --------------------
def test_reward_score_uses_em_for_yes_no_and_best_alias_f1_otherwise(world):
    module = make(world)
    assert module.reward_score("indeed yes", {"golden_answers": ["yes", "yes indeed"]}) == 0.0   # F1 would give 1
    assert module.reward_score("Yes.", {"golden_answers": ["yes"]}) == 1.0
    assert module.reward_score("Barack Obama Jr.", {"golden_answers": ["Obama", "barack obama"]}) == pytest.approx(0.8)
    assert module.reward_score("The Beatles!", {"golden_answers": ["beatles"]}) == 1.0
    sample, _ = two_hop(world)
    sample = {**sample, "golden_answers": ["no", "City1"]}
    outcomes, _, _ = run(module, [sample], [[plan(sample["question"], "City1 Country2"), ("search", "<end>")]])
    assert outcomes[0]["scores"] == [0.0]             # F1 against "City1" would be 2/3: a yes/no alias means EM


# -- 9. reward placement ----------------------------------------------------------------------
def test_each_reward_sits_on_the_last_response_token(world):
    module = make(world, decode_mode="free", max_turns=1, role_max_new_tokens={r: 6 for r in ROLES})
    samples = [q.as_sample() for q in world.questions[:4]]
    _, transitions, buffer = run(module, samples)
    flat = [t for steps in transitions for t in steps]
    assert any(not t.valid for t in flat)               # random text: penalties make the rewards non-zero
    rollout = buffer.select([t.row for t in flat])
    rewards = torch.tensor([t.reward for t in flat])
    token_rewards = outcome_token_rewards(rewards, rollout.response_mask)
    for row, t in enumerate(flat):
        length = int(rollout.lengths[row])
        nonzero = token_rewards[row].nonzero().flatten().tolist()
        assert nonzero == ([length - 1] if t.reward != 0 else [])
        assert token_rewards[row, length - 1] == pytest.approx(t.reward)


# -- 10. the outcome-only ablation ------------------------------------------------------------
def test_final_only_gives_every_call_the_last_score_plus_its_penalty(world):
    module = make(world, reward_mode="final_only")
    sample, script = up_down_script(world)
    script[2] = ("summary", "<evidence> a </evidence> <evidence> b </evidence>")        # illegal
    samples = [sample] + [q.as_sample() for q in world.questions[:7] if q.qid != sample["qid"]]
    outcomes, transitions, _ = run(module, samples, [script])
    for outcome, steps in zip(outcomes, transitions):
        last = outcome["scores"][-1]
        assert all(t.reward - (0.0 if t.valid else -1.0) == pytest.approx(last) for t in steps)
    assert outcomes[0]["scores"][-1] == pytest.approx(2 / 3)
    assert sum(not t.valid for t in transitions[0]) == 1


# -- 11. shared parameters --------------------------------------------------------------------
def test_one_step_on_one_role_changes_every_roles_outputs(world):
    module = make(world, cls=NeverEnds)
    samples = [q.as_sample() for q in world.questions[:8]]
    _, transitions, buffer = run(module, samples)
    rows = {role: [t.row for steps in transitions for t in steps if t.role == role] for role in ROLES}

    def logits():
        with torch.no_grad():
            return {role: module.policy(input_ids=buffer.input_ids[r], attention_mask=buffer.attention_mask[r]).logits
                    for role, r in rows.items()}

    before = logits()
    update_rows = buffer.select(rows["update"])
    rewards = torch.arange(len(update_rows)) % 2 * 2.0 - 1.0       # whitening keeps it non-zero
    scored = module.score_batch(update_rows, rewards)
    assert scored["rollout"].response_mask.sum() > 0
    loss, _ = module.actor_loss(scored)
    loss.backward()
    torch.optim.SGD(module.policy.parameters(), lr=0.5).step()
    after = logits()
    for role in ROLES:
        assert not torch.allclose(before[role], after[role]), role


# -- configuration errors ---------------------------------------------------------------------
def test_bad_switches_and_a_missing_environment_fail_clearly(world):
    with pytest.raises(ValueError, match="reward_mode"):
        make(world, reward_mode="dense")
    with pytest.raises(ValueError, match="role_max_new_tokens"):
        make(world, role_max_new_tokens={"critic": 3})
    module = make(world)
    module.env = None
    with pytest.raises(RuntimeError, match="search environment"):
        module.run_episodes([world.questions[0].as_sample()])
