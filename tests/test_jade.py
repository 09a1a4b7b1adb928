"""JADE: workflow validity, the role parsers, the two-level workflow loop's bookkeeping, the shared reward
(broadcast / terminal, costs, format penalties), parameter sharing, determinism and DDP padding."""
from typing import ClassVar

import lightning as L
import pytest
import torch

from datamodules.agentic_qa import AgenticQADataModule
from zoo.blocks.qa import token_f1
from zoo.blocks.rl.advantages import gae
from zoo.blocks.search_env import SearchEnvironment
from zoo.blocks.world import SyntheticWorld
from zoo.jade import (
    JADEModule,
    is_workflow_valid,
    parse_answer,
    parse_doc_ids,
    parse_query,
    parse_subquestions,
    parse_workflow,
    retrieval_cost,
    round_cost,
)
from zoo.policy_gradient import agents

WORLD = {"people": 12, "cities": 6, "countries": 3, "companies": 4}


class Scripted(JADEModule):
    """Free mode with scripted role outputs: ``script[role]`` is one text or a list consumed in order."""

    script: ClassVar[dict] = {}

    def generate_calls(self, calls, evaluation, stream):
        texts = []
        for call in calls:
            entry = self.script[call.role]
            texts.append(entry.pop(0) if isinstance(entry, list) else entry)
        return texts, [(None, -1)] * len(calls)


class Forced(JADEModule):
    """Choice mode with the Planner restricted to ``plans`` (the other roles keep their candidates)."""

    plans: ClassVar[list] = []

    def candidates(self, role, view):
        return list(self.plans) if role == "planner" else super().candidates(role, view)


@pytest.fixture(scope="module")
def world():
    return SyntheticWorld(**WORLD)


def make(world, cls=JADEModule, **kwargs):
    torch.manual_seed(0)
    options = {"backbone": "tiny-llama-world", "seed": 0, "mini_batch_size": 4, "optimizer": {"lr": 1e-3},
               **kwargs}
    module = cls(**options)
    module.env = SearchEnvironment.from_world(world, k=3)
    return module


def scripted(world, script, **kwargs):
    module = make(world, Scripted, decode_mode="free", **kwargs)
    module.script = {role: list(v) if isinstance(v, list) else v for role, v in script.items()}
    return module


def one_hop(world):
    return next(q for q in world.questions if q.hops == 1 and q.relations == ["born_in"]).as_sample()


def run_one(module, sample):
    outcomes, transitions, _ = module.run_episodes([sample], evaluation=True)
    for outcome in outcomes:
        outcome.setdefault("metrics", {}).update(module.score(outcome["prediction"], sample))
    module.assign_rewards([sample], outcomes, transitions)
    return outcomes[0], transitions[0]


# -- 1. workflow validity ----------------------------------------------------------------------
@pytest.mark.parametrize("workflow", ["AG", "R,AG", "QR,R,DS,AG", "QDS", "QDP", "QR,AG", "DS,AG"])
def test_valid_workflows(workflow):
    assert is_workflow_valid(workflow)


@pytest.mark.parametrize("workflow", ["QDS,AG", "R,R,AG", "DS,R,AG", "R,DS", "AG,QR", "", "XYZ", "QDS,QDP"])
def test_invalid_workflows(workflow):
    assert not is_workflow_valid(workflow)


def test_workflow_tags_must_hold_everything():
    assert parse_workflow("<workflow>R,AG</workflow>") == (["R", "AG"], True)
    assert parse_workflow("<workflow> R , AG </workflow>") == (["R", "AG"], True)       # word-level decoding
    assert parse_workflow("Plan: <workflow>R,AG</workflow>")[1] is False
    assert parse_workflow("<workflow>R,AG</workflow> done")[1] is False
    assert parse_workflow("<workflow>QDP</workflow>", allowed=("QDS", "R", "DS", "AG"))[1] is False
    assert parse_workflow("<workflow>QR,R,AG</workflow>", allowed=("R", "DS", "AG"))[1] is False


# -- 2. parsers --------------------------------------------------------------------------------
def test_document_selector_parser():
    assert parse_doc_ids("<id>Document0,Document2</id>", 5) == ([0, 2], True)
    assert parse_doc_ids("<id> Document0 , Document2 </id>", 5) == ([0, 2], True)
    assert parse_doc_ids("<id>Document7</id>", 5) == ([], False)
    assert parse_doc_ids("<id>Document1,Document1</id>", 5) == ([1], False)
    assert parse_doc_ids("<id></id>", 5) == ([], True)
    assert parse_doc_ids("Document1", 3) == ([0, 1, 2], False)                # wrong tags keep every doc


def test_answer_parser_limits_and_fallback():
    assert parse_answer("<answer> City4 </answer>") == ("City4", True)
    assert parse_answer("<answer>" + " w" * 40 + "</answer>")[1] is True
    long, ok = parse_answer("<answer>" + " w" * 41 + "</answer>")
    assert not ok and len(long.split()) == 41
    assert parse_answer("it is <answer>Paris</answer>") == ("it is Paris", False)
    assert parse_answer("Paris") == ("Paris", False)


def test_query_parser():
    assert parse_query("<query>Entity3 born</query>", "Where was Entity3 born ?") == ("Entity3 born", True)
    assert parse_query("<query>Where was Entity3 born?</query>", "Where was Entity3 born ?")[1] is False
    assert parse_query("<query>a</query><query>b</query>", "q")[1] is False
    assert parse_query("<query>" + "w " * 101 + "</query>", "q")[1] is False
    assert parse_query("search Entity3", "q") == ("search Entity3", False)


@pytest.mark.parametrize("low, high, n, valid", [(2, 4, 1, False), (2, 4, 2, True), (2, 4, 4, True),
                                                 (2, 4, 5, False), (1, 7, 1, True), (1, 7, 7, True)])
def test_decomposition_count_limits(low, high, n, valid):
    text = "\n".join(f"<q{i}>question {i}</q{i}>" for i in range(1, n + 1))
    questions, ok = parse_subquestions(text, "original", low, high)
    assert ok is valid and len(questions) == min(n, high)


def test_decomposition_duplicates_original_and_numbering_are_invalid():
    assert parse_subquestions("<q1>x y</q1><q2>X y?</q2>", "orig") == (["x y"], False)
    assert parse_subquestions("<q1>x y</q1><q2>Orig?</q2>", "orig") == (["x y"], False)
    assert parse_subquestions("<q1>x</q1><q3>y</q3>", "orig")[1] is False
    assert parse_subquestions("<q1>x</q1> and <q2>y</q2>", "orig")[1] is False
    assert parse_subquestions("no tags", "orig") == (["orig"], False)     # fallback: the question itself


# -- choice decoding's candidate sets ------------------------------------------------------------
def test_choice_candidates_are_exactly_the_valid_outputs(world):
    module = make(world)
    sample = one_hop(world)
    plans = module.candidates("planner", module.view(sample["question"], allowed=module.planner_modules))
    assert len(plans) == 10 and all(parse_workflow(p)[1] for p in plans)          # 8 chains + QDS + QDP
    assert len(make(world, enable_qdp=False).candidates(
        "planner", module.view("q", allowed=("QR", "QDS", "R", "DS", "AG")))) == 9
    subs = module.candidates("sub_planner", module.view("q", allowed=("R", "DS", "AG")))
    assert sorted(subs) == sorted(f"<workflow>{w}</workflow>" for w in ["AG", "R,AG", "DS,AG", "R,DS,AG"])
    docs = module.env.search(sample["question"])
    assert len(module.candidates("ds", module.view("q", docs=docs))) == 2 ** len(docs)
    subject = sample["question"].split()[2]
    for role in ("qds", "qdp"):
        options = module.candidates(role, module.view(sample["question"]))
        assert options and all(parse_subquestions(o, sample["question"])[1] for o in options)
        assert all(subject in o for o in options)
    queries = module.candidates("qr", module.view(sample["question"]))
    assert f"<query>{subject} born</query>" in queries
    answers = module.candidates("ag", module.view(sample["question"], docs=docs))
    assert f"<answer>{sample['golden_answers'][0]}</answer>" in answers           # the support doc is retrieved


# -- 3. / 7. rollout bookkeeping -------------------------------------------------------------------
def test_direct_retrieve_generate_is_two_transitions_and_one_retrieval(world):
    module = make(world, Forced)
    module.plans = ["<workflow>R,AG</workflow>"]
    samples = [q.as_sample() for q in world.questions[:4]]
    outcomes, transitions, buffer = module.run_episodes(samples)
    for outcome, steps in zip(outcomes, transitions):
        assert [t.role for t in steps] == ["planner", "ag"]                      # the retriever makes none
        assert outcome["retrievals"] == 1 and outcome["rounds"] == 1
    assert len(buffer) == sum(len(s) for s in transitions)                      # one row per LLM call
    assert not isinstance(module.env, torch.nn.Module)                          # the RA has no parameters


@pytest.mark.parametrize("m", [2, 3])
def test_serial_decomposition_with_fixed_subworkflow_counts(world, m):
    sub = "".join(f"<q{i}>sub question {i}</q{i}>" for i in range(1, m + 1))
    module = scripted(world, {"planner": "<workflow>QDS</workflow>", "qds": sub, "qr": "<query>Entity1 born</query>",
                              "sub_planner": "<workflow>AG</workflow>", "ds": "<id>Document0</id>",
                              "ag": "<answer>City1</answer>", "as": "<answer>City1</answer>"},
                      fixed_subworkflow="R,DS,AG", max_rounds=5)
    outcome, steps = run_one(module, one_hop(world))
    assert len(steps) == 3 + 4 * m and outcome["retrievals"] == m and outcome["rounds"] == 1 + m
    assert [t.role for t in steps] == ["planner", "qds"] + ["qr", "sub_planner", "ds", "ag"] * m + ["as"]
    assert all(t.valid for t in steps)
    assert [t.info["workflow"] for t in steps if t.role == "sub_planner"] == ["R,DS,AG"] * m   # overridden


def test_parallel_decomposition_skips_rewrites_and_takes_two_rounds(world):
    module = scripted(world, {"planner": "<workflow>QDP</workflow>", "qdp": "<q1>a b</q1><q2>c d</q2><q3>e f</q3>",
                              "sub_planner": "<workflow>R,AG</workflow>", "ag": "<answer>x</answer>",
                              "as": "<answer>x</answer>"})
    outcome, steps = run_one(module, one_hop(world))
    assert [t.role for t in steps] == ["planner", "qdp"] + ["sub_planner", "ag"] * 3 + ["as"]
    assert outcome["rounds"] == 2 and outcome["retrievals"] == 3


def test_round_limit_leaves_later_subquestions_unsolved(world):
    module = scripted(world, {"planner": "<workflow>QDS</workflow>", "qds": "<q1>a b</q1><q2>c d</q2><q3>e f</q3>",
                              "qr": "<query>Entity1 born</query>", "sub_planner": "<workflow>R,AG</workflow>",
                              "ag": "<answer>x</answer>", "as": "<answer>x</answer>"}, max_rounds=2)
    outcome, steps = run_one(module, one_hop(world))
    assert [t.role for t in steps] == ["planner", "qds", "qr", "sub_planner", "ag", "as"]
    assert outcome["rounds"] == 2


def test_invalid_plans_fall_back_with_a_penalty(world):
    module = scripted(world, {"planner": "I would search", "qds": "<q1>a b</q1><q2>c d</q2>",
                              "qr": ["<query>Entity1 born</query>", "<query>City1 located in</query>"],
                              "sub_planner": "R then AG", "ag": "<answer>x</answer>", "as": "<answer>x</answer>"})
    outcome, steps = run_one(module, one_hop(world))
    assert outcome["workflow"] == "QDS"                                             # top-level fallback
    assert [t.info["workflow"] for t in steps if t.role == "sub_planner"] == ["R,AG", "R,AG"]
    assert [t.valid for t in steps if t.role in ("planner", "sub_planner")] == [False, False, False]
    assert outcome["metrics"]["format_violation_rate"] == pytest.approx(3 / len(steps))


def test_deeper_recursion_plans_subquestions_with_the_planner(world):
    module = scripted(world, {"planner": ["<workflow>QDS</workflow>", "<workflow>R,AG</workflow>",
                                          "<workflow>AG</workflow>"],
                              "qds": "<q1>a b</q1><q2>c d</q2>", "qr": "<query>Entity1 born</query>",
                              "ag": "<answer>x</answer>", "as": "<answer>x</answer>"}, max_depth=2)
    outcome, steps = run_one(module, one_hop(world))
    assert [t.role for t in steps] == ["planner", "qds", "qr", "planner", "ag", "qr", "planner", "ag", "as"]
    assert outcome["retrievals"] == 1


# -- 4. / 5. / 6. rewards ---------------------------------------------------------------------------
DIRECT = {"planner": "<workflow>QR,R,DS,AG</workflow>", "qr": "<query>Entity1 born</query>",
          "ds": "<id>Document0</id>", "ag": "<answer>City1 area</answer>"}


@pytest.mark.parametrize("placement", ["broadcast", "terminal"])
def test_zero_cost_reward_is_the_f1_of_the_final_answer(world, placement):
    sample = one_hop(world)
    sample["golden_answers"] = ["City1"]
    _, steps = run_one(scripted(world, DIRECT, reward_assignment=placement), sample)
    f1 = token_f1("City1 area", ["City1"])
    assert 0 < f1 < 1 and all(t.valid for t in steps) and len(steps) == 4
    step = [t.info["step_reward"] for t in steps]
    assert step == ([f1] * 4 if placement == "broadcast" else [0.0, 0.0, 0.0, f1])
    assert [t.reward for t in steps] == pytest.approx([f1] * 4)       # no penalties: both train on F1


def test_yes_no_gold_is_scored_by_exact_match(world):
    module = make(world)
    assert module.global_reward({"prediction": "Yes.", "rounds": 1}, {"golden_answers": ["yes"]}) == 1.0
    assert module.global_reward({"prediction": "yes it is", "rounds": 1}, {"golden_answers": ["yes"]}) == 0.0
    assert module.global_reward({"prediction": "the City4 area"}, {"golden_answers": ["City4"]}) == pytest.approx(
        token_f1("the City4 area", ["City4"]))


def test_cost_terms():
    assert retrieval_cost(5) == 1.0 and retrieval_cost(2) == pytest.approx(2 / 3) and retrieval_cost(0) == 0.0
    assert round_cost(1, "code") == 0.0 and round_cost(3, "code") == pytest.approx(2 / 3)
    assert round_cost(9, "code") == 1.0
    assert round_cost(1, "paper") == pytest.approx(1 / 3) and round_cost(3, "paper") == 1.0


def test_costs_enter_the_global_reward(world):
    module = make(world, alpha=0.3, beta=0.2)
    reward = module.global_reward({"prediction": "City4", "rounds": 3, "retrievals": 2}, {"golden_answers": ["City4"]})
    assert reward == pytest.approx(1.0 - 0.3 * 2 / 3 - 0.2 * 2 / 3)
    paper = make(world, alpha=0.3, round_cost="paper")
    assert paper.global_reward({"prediction": "City4", "rounds": 1}, {"golden_answers": ["City4"]}) == pytest.approx(0.9)


def test_format_violation_penalises_only_its_own_transition(world):
    sample = one_hop(world)
    sample["golden_answers"] = ["City1"]
    script = {**DIRECT, "ds": "<id>Document7</id>"}
    _, steps = run_one(scripted(world, script, format_penalty=-1.0), sample)
    f1 = token_f1("City1 area", ["City1"])
    assert [t.valid for t in steps] == [True, True, False, True]
    assert [t.reward for t in steps] == pytest.approx([f1, f1, f1 - 1.0, f1])


def test_terminal_return_to_go_equals_gae_over_the_flattened_question(world):
    sample = one_hop(world)
    sample["golden_answers"] = ["City1"]
    script = {**DIRECT, "qr": "no tags here", "ds": "<id>Document7</id>"}
    _, steps = run_one(scripted(world, script, reward_assignment="terminal", format_penalty=-2.0), sample)
    f1 = token_f1("City1 area", ["City1"])
    assert [t.info["step_reward"] for t in steps] == pytest.approx([0.0, -2.0, -2.0, f1])
    assert [t.reward for t in steps] == pytest.approx([f1 - 4, f1 - 4, f1 - 2, f1])
    lengths = [3, 1, 2, 4]
    torch.manual_seed(1)
    values = [torch.randn(n) for n in lengths]
    # the paper: one sequence per question, each step's reward on its last token
    flat_mask = torch.ones(1, sum(lengths))
    step_tokens = torch.cat([torch.nn.functional.pad(torch.zeros(n - 1), (0, 1), value=t.info["step_reward"])
                             for n, t in zip(lengths, steps)])[None]
    flat, _ = gae(torch.zeros(1), flat_mask, values=torch.cat(values)[None], token_kl=step_tokens, kl_coef=-1.0,
                  gamma=1.0, lam=1.0, whiten=False)
    # what is trained: one sequence per transition, its return-to-go on its last token
    width = max(lengths)
    mask = torch.stack([torch.arange(width) < n for n in lengths]).float()
    padded = torch.stack([torch.nn.functional.pad(v, (0, width - len(v))) for v in values])
    per, _ = gae(torch.tensor([t.reward for t in steps]), mask, values=padded, gamma=1.0, lam=1.0, whiten=False)
    torch.testing.assert_close(per[mask.bool()], flat[0])


# -- 8. parameter sharing -----------------------------------------------------------------------------
def test_a_planner_only_step_changes_the_document_selector(world):
    module = make(world, Forced)
    module.plans = ["<workflow>R,DS,AG</workflow>", "<workflow>QR,R,DS,AG</workflow>"]   # DS always runs
    samples = [q.as_sample() for q in world.questions[:6]]
    _, transitions, buffer = module.run_episodes(samples)
    rows = {role: [t.row for s in transitions for t in s if t.role == role] for role in ("planner", "ds")}
    assert rows["ds"] and float(buffer.select(rows["planner"]).response_mask.sum()) > 0
    ds = buffer.select(rows["ds"])
    _, before, _ = module.policy_outputs(ds)
    planner = buffer.select(rows["planner"])
    scored = module.score_batch(planner, torch.arange(len(planner)) % 2 * 2.0 - 1.0)
    loss, _ = module.actor_loss(scored)
    loss.backward()
    torch.optim.SGD(module.policy.parameters(), lr=0.5).step()
    _, after, _ = module.policy_outputs(ds)
    assert not torch.allclose(before, after)


# -- 9. determinism -----------------------------------------------------------------------------------
def _fit_and_validate(seed):
    L.seed_everything(seed)
    data = AgenticQADataModule(world=WORLD, k=3, batch_size=4, train_batches=2, eval_batch_size=16,
                               max_eval_questions=16, seed=seed)
    torch.manual_seed(seed)
    module = JADEModule(backbone="tiny-llama-world", seed=seed, mini_batch_size=8, optimizer={"lr": 1e-3})
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, accelerator="cpu")
    trainer.fit(module, datamodule=data)
    outcomes, _, _ = module.run_episodes(data.samples("val"), evaluation=True)
    return [h["val/f1"] for h in module.history if "val/f1" in h], [o["prediction"] for o in outcomes]


def test_greedy_validation_is_identical_across_runs_with_one_seed():
    first, second = _fit_and_validate(3), _fit_and_validate(3)
    assert first[0] and first == second


# -- 10. DDP padding ----------------------------------------------------------------------------------
def test_ddp_padding_gives_every_rank_the_same_multiple_of_the_mini_batch(world, monkeypatch):
    module = make(world, mini_batch_size=4)
    _, _, buffer = module.run_episodes([q.as_sample() for q in world.questions[:8]])
    counts = {0: 5, 1: 9}
    lengths = {}
    for rank, count in counts.items():
        other = counts[1 - rank]
        monkeypatch.setattr(agents, "world", lambda rank=rank: (rank, 2))
        monkeypatch.setattr(agents.dist, "all_reduce", lambda t, op=None, other=other: t.fill_(max(int(t), other)))
        rollout, rewards = module.equalize(buffer.select(list(range(count))), torch.arange(count, dtype=torch.float))
        assert len(rollout) == len(rewards)
        assert rewards[:count].tolist() == list(range(count))              # the local rows, then duplicates
        assert set(rewards[count:].tolist()) <= set(range(count))
        lengths[rank] = len(rollout)
    assert lengths[0] == lengths[1] == 12 and lengths[0] % 4 == 0


# -- free mode prompts ----------------------------------------------------------------------------------
def test_free_mode_uses_the_role_prompts_and_compact_mode_the_tags(world):
    free = make(world, decode_mode="free")
    call = free.call("planner", free.view("Where was Entity1 born ?", allowed=free.planner_modules))
    assert call.candidates is None and "<workflow>" in call.system and call.stop == ("</workflow>",)
    assert "at most 4" in free.call("qds", free.view("q")).system
    choice = make(world)
    call = choice.call("ds", choice.view("Where was Entity1 born ?", docs=choice.env.search("Entity1 born")))
    assert call.system == "DS" and "Document0" in choice.render(call)
    unknown = choice.tokenizer.unk_token_id
    assert unknown not in choice.tokenizer(choice.render(call), add_special_tokens=False)["input_ids"]
