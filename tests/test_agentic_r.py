"""Agentic-R: selection rule, query format, InfoNCE over the global batch, GAC replay, LR parsing,
the agent <-> retriever iteration, index consistency, agent state masking, one vs two DDP ranks."""
import math
import os
import random
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from datamodules.agentic_qa import AgenticQADataModule
from datamodules.agentic_r import (
    AgenticRetrieverDataModule,
    GroupCollator,
)
from zoo.agentic_r.agents import (
    ScriptedSearchAgent,
    SearchTool,
    Turn,
    replay,
    run_episode,
)
from zoo.agentic_r.iterate import INITIAL, AgenticRIteration
from zoo.agentic_r.labeling import (
    HeuristicJudge,
    UtilityLabeler,
    parse_scores,
    parse_sub_answers,
    relevance_prompt,
    select_groups,
)
from zoo.agentic_r.module import AgenticRetrieverModule, format_query
from zoo.blocks.search_env import SearchEnvironment
from zoo.blocks.world import SyntheticWorld

TINY = {"backbone": "tiny-llama-world", "temperature": 0.05, "max_passage_length": 32, "max_query_length": 32}


@pytest.fixture(scope="module")
def world_qa():
    qa = AgenticQADataModule(source="world", world={"distractors_per_person": 3}, train_fraction=0.7)
    qa.load()
    return qa


# -- 1. selection rule -----------------------------------------------------------------------------
def test_selection_keeps_the_tied_best_as_positives_and_skips_bad_rounds():
    gac = [1, 1, 1, 0] + [0] * 16
    lr = [0.9, 0.9, 0.7, 1.0] + [0.1] * 16
    groups = select_groups(gac, lr, rng=random.Random(0))
    assert [g[0] for g in groups] == [0, 1]                            # both tied positives, passage 0 first
    assert all(len(g) == 16 for g in groups)
    assert all(0 not in g[1:] and 1 not in g[1:] for g in groups)      # a positive is never a negative
    negatives = set().union(*(set(g[1:]) for g in groups))
    assert negatives <= set(range(2, 20))
    ranked = [[n for n in g[1:]] for g in groups]
    order = [2, 3] + list(range(4, 20))                                # (1,0.7) and (0,1.0) rank above the rest
    assert all(r == sorted(r, key=order.index) for r in ranked)        # negatives keep their ranked order
    # (1, 0.7) is never a positive; the best (0, 1.0) round and the (1, 0.5) round are skipped
    assert select_groups([0] * 20, [1.0] + [0.1] * 19) == []
    assert select_groups([1] + [0] * 19, [0.5] + [0.1] * 19) == []
    # 3 positives and only 14 negatives: skipped; 15 negatives: kept
    assert select_groups([1] * 3 + [0] * 14, [0.9] * 3 + [0.2] * 14) == []
    assert len(select_groups([1] * 3 + [0] * 15, [0.9] * 3 + [0.2] * 15)) == 3
    # five tied positives: only three groups
    five = select_groups([1] * 5 + [0] * 15, [0.8] * 5 + [0.3] * 15)
    assert [g[0] for g in five] == [0, 1, 2] and all(len(g) == 16 for g in five)
    # without GAC (the relevance ablation) the (0, 1.0) candidate wins
    assert select_groups(gac, lr, selection="relevance")[0][0] == 3


def test_negative_sampling_is_seeded():
    gac, lr = [1] + [0] * 19, [0.9] + [0.1] * 19
    first = select_groups(gac, lr, negatives=7, rng=random.Random(5))
    assert first == select_groups(gac, lr, negatives=7, rng=random.Random(5))
    assert first != select_groups(gac, lr, negatives=7, rng=random.Random(6))


# -- 2. query formatting ---------------------------------------------------------------------------
def test_query_is_prefix_question_sep_query_and_history_is_off_by_default():
    module = AgenticRetrieverModule(**TINY)
    q, sub, history = "Where was Entity3 born ?", "born Entity3", ["works for Entity3"]
    assert module.format_query(q, sub, history) == "query: Where was Entity3 born ? [SEP] born Entity3"
    assert format_query(q, sub, history, "q") == "query: born Entity3"
    assert format_query(q, sub, history, "Q+history+q") == ("query: Where was Entity3 born ? [SEP] "
                                                            "works for Entity3 [SEP] born Entity3")
    # the collator and the search tool send the retriever the same string
    passages = {"p": {"id": "p", "title": "T", "text": "x"}}
    group = {"query_id": "1", "question": q, "query_text": sub, "history_queries": history, "passage_ids": ["p"]}
    collator = GroupCollator(module.encoder.tokenizer, passages, 1)
    assert collator.query_text(group) == module.format_query(q, sub, history)
    assert collator.passage_texts(group) == ["passage: T x"]
    seen = []

    class Recorder:
        def index(self, ids, texts):
            return self

        def search(self, queries, k, within=None):
            seen.extend(queries)
            return [[("p", 1.0)] for _ in queries]

    env = SearchEnvironment(["p"], ["T"], ["x"], retriever=Recorder())
    SearchTool(env, "Q+q", 1).search(q, sub, history)
    assert seen == [q + " [SEP] " + sub]          # DenseSearch then adds the "query: " prefix


# -- 3, 4. InfoNCE and normalisation ---------------------------------------------------------------
def test_infonce_targets_limits_and_normalised_embeddings():
    module = AgenticRetrieverModule(**{**TINY, "temperature": 0.01})
    captured = {}
    original = torch.nn.functional.cross_entropy

    def spy(logits, targets):
        captured["targets"] = targets
        return original(logits, targets)

    torch.nn.functional.cross_entropy = spy
    try:
        d = 64
        basis = torch.eye(d)
        queries = basis[[0, 16]]
        passages = basis[:32].clone()               # positive of query b is row b*16 = the query itself
        loss = module.contrastive_loss(queries, passages)
    finally:
        torch.nn.functional.cross_entropy = original
    assert captured["targets"].tolist() == [0, 16]
    assert float(loss) < 1e-6
    # a random (untrained) encoder: scores hardly differ at a large temperature -> loss ~ log(B*G)
    module = AgenticRetrieverModule(**{**TINY, "temperature": 100.0})
    tok = module.encoder.tokenizer
    q = tok(["query: a"] * 2, return_tensors="pt")
    p = tok([f"passage: Entity{i} visited City{i} ." for i in range(32)], return_tensors="pt", padding=True)
    loss = module.compute_losses({"q_input_ids": q["input_ids"], "q_attention_mask": q["attention_mask"],
                                  "p_input_ids": p["input_ids"], "p_attention_mask": p["attention_mask"]})["loss"]
    assert float(loss) == pytest.approx(math.log(32), abs=0.02)
    emb = module.encode(p["input_ids"], p["attention_mask"])
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(32), atol=1e-5, rtol=0)
    scores = module.scores(emb, emb)
    assert scores.abs().max() <= 1 / module.hparams.temperature + 1e-4


# -- 5. GAC ----------------------------------------------------------------------------------------
def test_gac_replay_reproduces_the_answer_and_gold_passage_gives_gac_one(world_qa):
    env = world_qa.environment(k=3)
    tool = SearchTool(env, "q", 3)
    agent = ScriptedSearchAgent()
    labeler = UtilityLabeler(agent, tool, HeuristicJudge(), negatives=7)
    samples = world_qa.samples("train")
    for sample in samples[:40]:
        trajectory = run_episode(agent, sample, tool)
        for i, step in enumerate(trajectory.steps, 1):
            assert replay(agent, trajectory, i, step.passages, tool).answer == trajectory.answer
    one_hop = next(s for s in samples if s["hops"] == 1)
    trajectory = run_episode(agent, one_hop, tool)
    gold = env.passages[one_hop["support"][0]]
    distractor = next(p for pid, p in env.passages.items()
                      if pid.startswith("distractor") and one_hop["golden_answers"][0] not in p.text)
    assert labeler.gac(trajectory, 1, gold) == 1.0
    assert labeler.gac(trajectory, 1, distractor) == 0.0


class FiveSearches:
    """Searches the question five times, then answers from the last result."""

    max_searches = 5

    def act(self, sample, steps, searches_left):
        if len(steps) < 5 and searches_left:
            return Turn(query=f"{sample['question']} {len(steps)}")
        return Turn(answer=ScriptedSearchAgent.read(steps[-1].passages, None, ""))


def test_rounds_past_the_fourth_are_never_labelled(world_qa):
    tool = SearchTool(world_qa.environment(k=3), "q", 3)
    labeler = UtilityLabeler(FiveSearches(), tool, HeuristicJudge(), negatives=3, lr_threshold=0.0)
    samples = world_qa.samples("train")[:6]
    trajectories = labeler.trajectories(samples)
    assert all(len(t.steps) == 5 for t in trajectories)
    rounds = [r for t in trajectories for r in labeler.label_rounds(t)]
    assert {r.round_index for r in rounds} == {1, 2, 3, 4}
    assert all(len(r.candidates) == 20 and len(r.gac) == 20 for r in rounds)


# -- 6. LR parsing ---------------------------------------------------------------------------------
def test_lr_parsing_drops_short_outputs_clamps_and_hides_unknown_references():
    assert parse_scores("80 70 60", 4) is None
    assert parse_scores("150 -3 40", 3) == [100.0, 0.0, 40.0]
    assert parse_sub_answers("<sub-answer> City4 </sub-answer><sub-answer>Not Sure</sub-answer>", 2) == [
        "City4", "Not Sure"]
    assert parse_sub_answers("<sub-answer> City4 </sub-answer>", 2) is None
    assert "Reference answer" not in relevance_prompt("born Entity1", ["a", "b"], "Not Sure")
    assert "Reference answer: City4" in relevance_prompt("born Entity1", ["a", "b"], "City4")

    class ShortJudge(HeuristicJudge):
        def relevance(self, query, passages, reference):
            return parse_scores("90 " * (len(passages) - 1), len(passages))

    world = SyntheticWorld()
    tool = SearchTool(SearchEnvironment.from_world(world), "q", 3)
    labeler = UtilityLabeler(ScriptedSearchAgent(), tool, ShortJudge(), negatives=7)
    sample = world.questions[0].as_sample()
    assert labeler.label_rounds(run_episode(ScriptedSearchAgent(), sample, tool)) == []


# -- 7, 8. iterations restart from the initial weights; the index is rebuilt -----------------------
@pytest.fixture(scope="module")
def two_iterations(world_qa):
    def run(warm_start, questions, epochs):
        return AgenticRIteration(
            world_qa.load()[1], world_qa.samples("train")[:questions], world_qa.samples("test")[:30],
            module={**TINY, "optimizer": {"name": "AdamW", "lr": 3e-3}, "scheduler": {"name": "constant"}},
            data={"group_size": 8, "batch_size": 16}, trainer={"max_epochs": epochs}, iterations=2,
            warm_start=warm_start).run()
    return run(False, 40, 1), run(True, 40, 1)


def test_each_retriever_iteration_starts_from_the_initial_weights(two_iterations):
    cold, warm = two_iterations
    assert cold[0].init_source == warm[0].init_source == INITIAL
    assert cold[1].init_source == INITIAL
    first_trained = cold[0].module.state_dict()
    assert all(cold[1].start_state[k].equal(v) for k, v in cold[0].start_state.items())
    assert not all(cold[1].start_state[k].equal(first_trained[k]) for k in first_trained)
    assert warm[1].init_source == "iteration 0"
    assert all(warm[1].start_state[k].equal(v) for k, v in warm[0].module.state_dict().items())


def test_index_is_rebuilt_with_the_new_encoder_and_finds_passages_by_their_text(two_iterations):
    cold, _ = two_iterations
    for record in cold:
        retriever = record.tool.env.retriever
        ids = list(record.tool.env.passages)
        texts = ["passage: " + record.tool.env.passages[i].contents() for i in ids]
        fresh = record.module.encoder.encode(texts, max_length=record.module.hparams.max_passage_length)
        torch.testing.assert_close(retriever.vectors, fresh, atol=1e-5, rtol=1e-5)
        # a passage's own text, encoded as passages are, finds itself through the index
        sample = ids[::4]
        retriever.query_prefix = retriever.passage_prefix
        try:
            hits = retriever.search([record.tool.env.passages[i].contents() for i in sample], 1)
        finally:
            retriever.query_prefix = record.module.hparams.query_prefix
        rate = sum(h[0][0] == i for h, i in zip(hits, sample)) / len(sample)
        assert rate >= 0.95, rate
    assert cold[1].tool.env.retriever is not cold[0].tool.env.retriever


def test_training_on_utility_groups_ranks_held_out_positives_first():
    import lightning as L

    L.seed_everything(0, verbose=False)
    module = AgenticRetrieverModule(**{**TINY, "optimizer": {"name": "AdamW", "lr": 3e-3},
                                       "scheduler": {"name": "constant"}})
    dm = AgenticRetrieverDataModule(group_size=8, batch_size=16, max_query_length=32, max_passage_length=32,
                                    val_fraction=0.2)
    trainer = L.Trainer(max_steps=120, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1.0)
    before = trainer.validate(module, datamodule=dm, verbose=False)[0]["val/group_accuracy"]
    trainer.fit(module, datamodule=dm)
    after = trainer.validate(module, datamodule=dm, verbose=False)[0]["val/group_accuracy"]
    assert after > before + 0.3, (before, after)


# -- datamodule ------------------------------------------------------------------------------------
def test_datamodule_builds_groups_and_batches_of_the_group_size(tmp_path):
    dm = AgenticRetrieverDataModule(group_size=8, batch_size=4, max_query_length=32, max_passage_length=32)
    batch = next(iter(dm.train_dataloader()))
    assert batch["q_input_ids"].shape[0] == 4 and batch["p_input_ids"].shape[0] == 32
    train_q = {g["question"] for g in dm.groups("train")}
    assert not train_q & {g["question"] for g in dm.groups("val")}
    assert not train_q & {s["question"] for s in dm.test_questions()}
    bad = tmp_path / "groups.jsonl"
    bad.write_text('{"query_id": "1", "question": "q", "query_text": "x", "passage_ids": ["a"]}\n')
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"id": "a", "contents": "Title\\nsome text"}\n')
    from datamodules.readers import DataFormatError
    with pytest.raises(DataFormatError, match="groups.jsonl:1"):
        AgenticRetrieverDataModule(groups_path=str(bad), corpus_path=str(corpus), group_size=8).groups("train")
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        AgenticRetrieverDataModule(groups_path=str(tmp_path / "missing.jsonl"), corpus_path=str(corpus)).groups("train")


# -- one vs two gloo ranks -------------------------------------------------------------------------
def _ddp_batch(module, queries, group):
    tok = module.encoder.tokenizer
    q = tok([f"query: Where was Entity{i} born ? [SEP] Entity{i}" for i in queries], return_tensors="pt",
            padding=True)
    p = tok([f"passage: Entity{i} {'was born in' if j == 0 else 'visited'} City{i + j} ." for i in queries
             for j in range(group)], return_tensors="pt", padding=True)
    return {"q_input_ids": q["input_ids"], "q_attention_mask": q["attention_mask"],
            "p_input_ids": p["input_ids"], "p_attention_mask": p["attention_mask"]}


def _module():
    torch.manual_seed(0)
    return AgenticRetrieverModule(**TINY)


def _grads(module):
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def _worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        module = _module()
        loss = module.compute_losses(_ddp_batch(module, [2 * rank, 2 * rank + 1], 4))["loss"]
        loss.backward()
        for p in module.parameters():                  # what DDP does: average the gradients
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= world
        losses = [torch.zeros(()) for _ in range(world)]
        dist.all_gather(losses, loss.detach())
        if rank == 0:
            torch.save({"losses": torch.stack(losses), "grads": _grads(module)}, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(240)
def test_two_gloo_ranks_give_the_global_batch_loss_and_gradients(tmp_path):
    module = _module()
    single = module.compute_losses(_ddp_batch(module, [0, 1, 2, 3], 4))["loss"]
    single.backward()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "ddp.pt")
    mp.spawn(_worker, args=(2, port, out), nprocs=2, join=True)
    result = torch.load(out, weights_only=True)
    # every rank computes the global-batch loss, scaled by the world size
    torch.testing.assert_close(result["losses"], torch.stack([single.detach() * 2] * 2), atol=1e-5, rtol=1e-5)
    grads = _grads(module)
    assert set(result["grads"]) == set(grads)
    for name, grad in grads.items():
        torch.testing.assert_close(result["grads"][name], grad, atol=1e-5, rtol=1e-4, msg=name)


# -- 9. the search agent: state masking, and it serves the labeller --------------------------------
def test_retrieved_tokens_get_no_policy_gradient_and_the_agent_replays_greedily(monkeypatch):
    import zoo.blocks.rl.rollout as rollout_module
    from zoo.agentic_r.agents import CHOICE_INSTRUCTION, SearchAgentModule

    world = SyntheticWorld(people=12, cities=6, countries=3, companies=4, distractors_per_person=2)
    torch.manual_seed(0)
    module = SearchAgentModule(backbone="tiny-llama-world", prompt_template=CHOICE_INSTRUCTION, mini_batch_size=4,
                               seed=0, kl={"coef": 0.0})
    module.env = SearchEnvironment.from_world(world, k=2)
    samples = [q.as_sample() for q in world.questions[:4]]
    _, transitions, buffer = module.run_episodes(samples)
    rows = [t.row for steps in transitions for t in steps]
    rewards = torch.arange(len(rows)) % 2 * 2.0 - 1.0               # mixed signs: whitening keeps them
    scored = module.score_batch(buffer.select(rows), rewards)
    # every position's logits, so the retrieved tokens' logits exist and can be checked
    monkeypatch.setattr(rollout_module, "causal_lm_forward", lambda model, keep, **inputs: model(**inputs))
    captured = []

    def keep_logits(mod, args, out):
        out.retain_grad()
        captured.append(out)

    hook = module.policy.lm_head.register_forward_hook(keep_logits)
    loss, _ = module.actor_loss(scored)
    hook.remove()
    loss.backward()
    grad = captured[0].grad.abs().sum(-1)                              # [N, L]
    ids = scored["rollout"].input_ids
    tok = module.tokenizer
    opening, closing = tok.convert_tokens_to_ids("<information>"), tok.convert_tokens_to_ids("</information>")
    inside = ((ids == opening).long().cumsum(1) - (ids == closing).long().cumsum(1) > 0) | (ids == closing)
    assert inside.sum() > 0                                            # later turns do show retrieved passages
    # the logit at position t predicts token t + 1: none that predicts a retrieved token is trained
    predicts_retrieved = torch.zeros_like(inside)
    predicts_retrieved[:, :-1] = inside[:, 1:]
    assert float(grad[predicts_retrieved].sum()) == 0.0
    assert float(grad.sum()) > 0.0
    width = scored["rollout"].prompt_width
    assert not (inside[:, width:] & scored["rollout"].response_mask.bool()).any()
    # the same module is a SearchAgent: greedy replay with the original passages gives the same answer
    tool = SearchTool(module.env, "q", 2)
    for sample in samples[:2]:
        trajectory = run_episode(module, sample, tool)
        for i, step in enumerate(trajectory.steps, 1):
            assert replay(module, trajectory, i, step.passages, tool).answer == trajectory.answer
