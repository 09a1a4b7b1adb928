"""The agentic-search shared blocks: QA metrics, the generated world, the search environment, choice
decoding and the multi-role PPO base (episodes, transition buffer, rewards, GAE, update)."""
import itertools

import pytest
import torch

from datamodules.agentic_qa import AgenticQADataModule, read_hotpotqa, read_nq_open
from datamodules.readers import DataFormatError
from zoo.backbones import build_backbone
from zoo.blocks.qa import (
    answer_score,
    cover_exact_match,
    exact_match,
    normalize_answer,
    qa_metrics,
    token_f1,
)
from zoo.blocks.rl.choice import sample_choices
from zoo.blocks.rl.rollout import Rollout, response_logits, token_logprobs
from zoo.blocks.search_env import (
    BM25Search,
    HashedBagOfWords,
    SearchEnvironment,
    TrajectoryStats,
    summarize,
)
from zoo.blocks.world import WORLD_WORDS, SyntheticWorld
from zoo.policy_gradient.agents import AgentPPOModule, Call, global_masked_whiten


# -- QA metrics ------------------------------------------------------------------------------
def test_answer_normalisation_and_scores_match_hand_computed_values():
    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert normalize_answer("an apple a day") == "apple day"
    assert exact_match("the Beatles", ["Beatles", "Fab Four"]) == 1.0
    # pred "barack obama jr" vs "barack obama": precision 2/3, recall 1 -> F1 0.8
    assert token_f1("Barack Obama Jr.", ["barack obama"]) == pytest.approx(0.8)
    assert token_f1("Paris", ["London", "paris"]) == 1.0                     # best alias
    assert cover_exact_match("it was in Paris, France", ["paris"]) == 1.0
    assert cover_exact_match("Parisian", ["paris"]) == 0.0                   # whole words only
    assert answer_score("Yes.", ["yes"]) == 1.0                              # yes/no gold: EM
    assert answer_score("yes it is", ["yes"]) == 0.0
    assert token_f1("no", ["no way"]) == 0.0                                 # yes/no only match themselves
    assert qa_metrics("", ["x"]) == {"em": 0.0, "f1": 0.0, "cover_em": 0.0}


# -- world, environment ----------------------------------------------------------------------
def test_world_questions_are_answered_by_their_support_passages():
    world = SyntheticWorld(seed=3)
    assert {q.hops for q in world.questions} == {1, 2}
    for q in world.questions:
        assert len(q.support) == q.hops and q.subquestions[-1][1] == q.answer
        assert q.answer in world.passages[q.support[-1]]["text"]
        assert q.subject in world.passages[q.support[0]]["text"]
    assert SyntheticWorld(seed=3).passages == world.passages                  # deterministic
    with pytest.raises(ValueError, match="person"):
        SyntheticWorld(people=10_000)


def test_world_text_is_fully_known_to_the_word_tokenizer():
    _, tok = build_backbone("tiny-llama-world", causal_lm=True)
    world = SyntheticWorld(people=200, cities=60, countries=20, companies=40)
    texts = [p["text"] for p in world.passages.values()] + [q.question for q in world.questions]
    unk = tok.unk_token_id
    assert all(unk not in tok(t, add_special_tokens=False)["input_ids"] for t in texts)
    assert len(tok) == len(set(WORLD_WORDS)) + 4


@pytest.mark.parametrize("retriever", ["bow", "bm25"])
def test_search_finds_the_fact_and_is_deterministic(retriever):
    world = SyntheticWorld(seed=1)
    env = SearchEnvironment.from_world(world, retriever=retriever, k=3)
    q = next(q for q in world.questions if q.hops == 1 and q.relations == ["born_in"])
    stats = TrajectoryStats()
    hits = env.search(f"{q.subject} born", stats=stats)
    assert hits[0].id == q.support[0]
    assert [p.id for p in env.search(f"{q.subject} born")] == [p.id for p in hits]
    assert env.search("   ", stats=stats) == []
    assert (stats.searches, stats.valid_searches) == (2, 1)
    restricted = env.search(f"{q.subject} born", within=["distractor0:" + q.subject, q.support[0]])
    assert {p.id for p in restricted} <= {"distractor0:" + q.subject, q.support[0]}


def test_search_truncation_and_formats_are_counted_and_rendered():
    env = SearchEnvironment(["a", "b"], ["A", "B"], ["one two three four", "five six"], retriever="bow",
                            max_query_words=2, max_passage_words=3)
    stats = TrajectoryStats()
    hits = env.search("one two three", stats=stats)
    assert stats.truncations == 2                      # the query, then passage "a"
    assert hits[0].text == "one two three"
    assert SearchEnvironment.format(hits[:1], "document") == "Document0: A one two three"
    assert SearchEnvironment.format(hits[:1], "doc") == "Doc1: A one two three"
    assert SearchEnvironment.format(hits[:1], "information").startswith("<information> Doc 1(Title: A)")
    assert summarize([stats])["truncations"] == 2.0


def test_query_format_reaches_the_retriever():
    seen = []

    class Spy(BM25Search):
        def search(self, queries, k, within=None):
            seen.extend(queries)
            return super().search(queries, k, within)

    env = SearchEnvironment(["a"], [""], ["alpha beta"], retriever=Spy(stopwords=None),
                            query_format="{question} [SEP] {query}")
    env.search("beta", question="what alpha")
    assert seen == ["what alpha [SEP] beta"]


def test_hashed_bag_of_words_is_normalised_and_word_order_free():
    enc = HashedBagOfWords(dim=64)
    a, b = enc(["City4 is located in Country2", "Country2 located City4"])
    assert torch.allclose(a, b) and a.norm().item() == pytest.approx(1.0)


# -- readers ---------------------------------------------------------------------------------
def test_hotpotqa_and_nq_readers(shared_data):
    samples, corpus = read_hotpotqa(shared_data / "hotpotqa-distractor-sample" / "train.jsonl")
    assert len(samples) == 300 and all(len(s["within"]) >= 2 for s in samples)
    titles = {p["id"] for p in corpus}
    assert all(set(s["support"]) <= set(s["within"]) <= titles for s in samples)
    nq = read_nq_open(shared_data / "nq-open" / "NQ-open.dev.jsonl")
    assert len(nq) == 3610 and all(s["golden_answers"] for s in nq)


def test_reader_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "hp.jsonl"
    bad.write_text('{"id": "1", "question": "q", "answer": "a", "supporting_facts": {}, '
                   '"context": {"title": ["t"], "sentences": [["s"]]}}\n{"id": "2", "question": "q"}\n')
    with pytest.raises(DataFormatError, match=r"hp.jsonl:2: missing key 'context'"):
        read_hotpotqa(bad)


def test_datamodule_splits_are_disjoint_and_cover_the_world(tmp_path):
    dm = AgenticQADataModule(world={"people": 20, "cities": 8, "countries": 3, "companies": 5})
    splits = {k: {s["qid"] for s in dm.samples(k)} for k in ("train", "val", "test")}
    assert not (splits["train"] & splits["val"]) and not (splits["val"] & splits["test"])
    assert sum(map(len, splits.values())) == len(dm.world.questions)
    env = dm.environment(k=2)
    assert len(env.passages) == len(dm.world.passages)
    with pytest.raises(ValueError, match="corpus_path"):
        nq = tmp_path / "nq.jsonl"
        nq.write_text('{"question": "who", "answer": ["me"]}\n')
        AgenticQADataModule(source="nq_open", path=str(nq)).load()


# -- choice decoding -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world_lm():
    torch.manual_seed(0)
    return build_backbone("tiny-llama-world", causal_lm=True, padding_side="left")


def test_choice_decoding_is_a_proper_policy_with_exact_logprobs(world_lm):
    model, tok = world_lm
    cands = ["<workflow> R , AG </workflow>", "<workflow> QR , R , AG </workflow>", "<workflow> QDS </workflow>",
             "<workflow> R </workflow>"]
    prompt = tok("Plan for Entity4 ?", add_special_tokens=False)["input_ids"]
    total = 0.0
    for picked in range(len(cands)):
        # probability of each candidate, from forcing it through the prefix tree
        for seed in itertools.count():
            rollout, picks = sample_choices(model, tok, [prompt], [cands],
                                            generator=torch.Generator().manual_seed(seed))
            if picks[0] == picked:
                break
        logits, _ = response_logits(model, rollout.input_ids, rollout.attention_mask, rollout.prompt_width,
                                    choices=rollout.choices)
        recomputed = token_logprobs(logits, rollout.response_ids) * rollout.response_mask
        torch.testing.assert_close(recomputed, rollout.logprobs * rollout.response_mask)
        total += float(recomputed.detach().sum().exp())
        assert rollout.texts[0] == cands[picked]
    assert total == pytest.approx(1.0, abs=1e-5)


def test_choice_decoding_batches_mixed_candidate_sets_and_greedy_is_deterministic(world_lm):
    model, tok = world_lm
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in ["a b", "Where was Entity3 born ?", "x"]]
    cands = [["City1", "City2"], ["City1 City2", "Country3", "City1"], ["only"]]
    first, picks = sample_choices(model, tok, prompts, cands, greedy=True)
    again, picks2 = sample_choices(model, tok, prompts, cands, greedy=True)
    assert picks == picks2 and first.texts == [c[p] for c, p in zip(cands, picks)]
    assert int(first.response_mask[2].sum()) == 0                      # a single candidate decides nothing
    mixed = Rollout.concat([first, again], tok.pad_token_id)
    assert mixed.choices.shape[0] == 6


# -- the multi-role PPO base -----------------------------------------------------------------
class LookupAgent(AgentPPOModule):
    """Two roles: a router picks search or answer-directly; an answerer picks an entity."""

    def episode(self, sample, index):
        route = yield Call("router", f"Question : {sample['question']}", candidates=["R , AG", "AG"])
        docs = []
        if route.text.startswith("R"):
            docs = self.env.search(sample["question"], stats=(stats := TrajectoryStats()))
        else:
            stats = TrajectoryStats()
        options = sorted({w for p in docs for w in p.text.split() if w[0].isupper()} | {"City0"})
        answer = yield Call("answer", "Documents : " + " ".join(p.text for p in docs), candidates=options)
        if answer.text == "City0":
            answer.transition.valid = False
        return {"prediction": answer.text, "stats": stats, "score": float(answer.text in sample["golden_answers"])}


@pytest.fixture
def agent():
    world = SyntheticWorld(people=12, cities=6, countries=3, companies=4)
    env = SearchEnvironment.from_world(world, k=2)
    torch.manual_seed(0)
    module = LookupAgent(backbone="tiny-llama-world", mini_batch_size=4, optimizer={"lr": 1e-3}, critic_lr=1e-3,
                         seed=0)
    module.env = env
    samples = [q.as_sample() for q in world.questions if q.hops == 1][:6]
    return module, samples


def test_episodes_record_one_transition_per_call_in_the_buffer(agent):
    module, samples = agent
    outcomes, transitions, buffer = module.run_episodes(samples)
    assert all(len(steps) == 2 for steps in transitions)
    rows = [t.row for steps in transitions for t in steps]
    assert sorted(rows) == list(range(len(buffer)))
    for steps in transitions:
        for t in steps:
            assert buffer.texts[t.row] == t.text
    assert all(o["prediction"] == steps[-1].text for o, steps in zip(outcomes, transitions))


def test_default_rewards_broadcast_outcome_plus_format_penalty(agent):
    module, samples = agent
    outcomes, transitions, _ = module.run_episodes(samples)
    module.assign_rewards(samples, outcomes, transitions)
    for outcome, steps in zip(outcomes, transitions):
        for t in steps:
            assert t.reward == outcome["score"] + (0.0 if t.valid else -1.0)


def test_gae_with_unit_gamma_lambda_gives_reward_minus_value(agent):
    module, samples = agent
    _, _transitions, buffer = module.run_episodes(samples)
    rewards = torch.linspace(-1, 1, len(buffer))
    with torch.no_grad():
        module.value_head.bias.fill_(0.3)
        scored = module.score_batch(buffer, rewards)
    mask = buffer.response_mask.bool()
    values = scored["old_values"]
    raw = (rewards[:, None] - values) * mask           # before whitening: R - V(s_j) at every sampled token
    whitened = global_masked_whiten(raw, buffer.response_mask)
    torch.testing.assert_close(scored["advantages"], whitened)
    torch.testing.assert_close(scored["returns"][mask], rewards[:, None].expand_as(mask)[mask])


def test_one_update_moves_the_shared_policy_for_every_role(agent):
    module, samples = agent
    _outcomes, transitions, buffer = module.run_episodes(samples)
    answer_rows = [t.row for steps in transitions for t in steps if t.role == "answer"]
    router_rows = [t.row for steps in transitions for t in steps if t.role == "router"]
    before, _, _ = module.policy_outputs(buffer.select(answer_rows))
    opt = torch.optim.SGD(module.policy.parameters(), lr=0.5)
    router = buffer.select(router_rows)
    scored = module.score_batch(router, torch.arange(len(router)) % 2 * 2.0 - 1.0)   # whitening keeps it non-zero
    loss, _ = module.actor_loss(scored)
    loss.backward()
    opt.step()
    after, _, _ = module.policy_outputs(buffer.select(answer_rows))
    assert not torch.allclose(before, after)            # a router-only step changes the answerer's outputs
