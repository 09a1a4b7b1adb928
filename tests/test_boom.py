"""BOOM: seeded subsets, batch-level shuffling, incremental data, identical starts, merges, checkpoints."""
import itertools

import lightning as L
import pytest
import torch

import zoo
from datamodules.boom import (
    BatchLevelShuffleSampler,
    BoomDataModule,
    sample_subset,
    subset_size,
)
from zoo.blocks.merging import multislerp
from zoo.boom.module import BoomModule
from zoo.boom.runner import (
    BoomRunner,
    IncrementalUpdater,
    SubModel,
    SubsetSpec,
    merge_states,
    merge_weights,
    plan,
    training_cost,
)

SYNTHETIC = {"super_topics": 2, "topics_per_super": 2, "docs_per_topic": 10, "queries_per_topic": 6}
OTHER = {**SYNTHETIC, "seed": 1}
MODEL = {"_target_": "zoo.boom.module.BoomModule", "backbone": "tiny-bert", "max_doc_length": 32,
         "max_query_length": 16, "encode_batch_size": 32}
DATA = {"_target_": "datamodules.boom.BoomDataModule", "synthetic": SYNTHETIC, "group_size": 4, "batch_size": 4}


def datamodule(**kwargs) -> BoomDataModule:
    dm = BoomDataModule(synthetic=SYNTHETIC, group_size=4, batch_size=4, **kwargs)
    dm.setup("fit")
    return dm


@pytest.mark.parametrize("total,ratio,size", [(100, 0.29, 29), (37, 0.5, 18), (10, 1.0, 10), (7, 0.4, 2)])
def test_subset_has_the_stated_size_unique_members_and_is_seeded(total, ratio, size):
    picked = sample_subset(total, ratio, seed=3)
    assert len(picked) == subset_size(total, ratio) == size
    assert len(set(picked)) == len(picked) and all(0 <= i < total for i in picked)
    assert picked == sample_subset(total, ratio, seed=3)
    if ratio == 1.0:
        assert picked == list(range(total))
    elif size > 2:
        assert picked != sample_subset(total, ratio, seed=4)


def test_bootstrap_samples_with_replacement_and_bad_ratios_fail():
    picked = sample_subset(50, 1.0, seed=0, bootstrap=True)
    assert len(picked) == 50 and len(set(picked)) < 50
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="ratio"):
            sample_subset(10, bad, seed=0)


def test_datamodule_samples_every_dataset_at_its_ratio_deterministically():
    dm = datamodule(sample_ratio=0.5, mixture=[{"source": "synthetic", "synthetic": OTHER}])
    assert len(dm.full_rows) == 2
    assert dm.subset_sizes() == [len(rows) // 2 for rows in dm.full_rows]
    expected = [dict(dm.full_rows[j][i], dataset=j) for j, picked in enumerate(dm.subset_indices) for i in picked]
    assert dm.train_rows == expected
    again = datamodule(sample_ratio=0.5, mixture=[{"source": "synthetic", "synthetic": OTHER}])
    assert again.subset_indices == dm.subset_indices
    other_seed = datamodule(sample_ratio=0.5, sample_seed=1, mixture=[{"source": "synthetic", "synthetic": OTHER}])
    assert other_seed.subset_indices != dm.subset_indices
    # ratio 1 is the plain RetrievalDataModule training set (the full-shuffle baseline's rows)
    assert [{k: v for k, v in r.items() if k != "dataset"} for r in datamodule(sample_ratio=1.0).train_rows] \
        == dm.full_rows[0]


def test_incremental_data_is_all_new_data_plus_the_core_subset_of_history():
    runner = BoomRunner(MODEL, DATA)
    history = [{"source": "synthetic", "synthetic": OTHER}]
    updater = IncrementalUpdater(runner, old={}, new_data=DATA, history=history, core_ratio=0.4)
    dm = updater.update_datamodule()
    dm.setup("fit")
    new, old = dm.full_rows
    assert dm.subset_indices[0] == list(range(len(new)))
    assert len(dm.subset_indices[1]) == subset_size(len(old), 0.4) and len(set(dm.subset_indices[1])) > 0
    assert [r["query"] for r in dm.train_rows if r["dataset"] == 0] == [r["query"] for r in new]
    core = [r["query"] for r in dm.train_rows if r["dataset"] == 1]
    assert len(core) == subset_size(len(old), 0.4) and set(core) <= {r["query"] for r in old}
    # cost: |N| + rho|H| examples, strictly below a full retrain on |N| + |H|
    assert len(dm.train_rows) < len(new) + len(old)


def test_batch_level_shuffle_keeps_one_dataset_per_batch_and_every_row_once():
    sizes = [40, 24, 16]
    owner = [j for j, n in enumerate(sizes) for _ in range(n)]
    sampler = BatchLevelShuffleSampler(sizes, batch_size=4, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 20
    assert all(len({owner[i] for i in b}) == 1 for b in batches)
    assert sorted(i for b in batches for i in b) == list(range(80))
    switches = sum(owner[a[0]] != owner[b[0]] for a, b in itertools.pairwise(batches))
    assert switches > len(sizes) - 1
    sampler.set_epoch(1)
    assert list(sampler) != batches
    # two ranks: the same dataset at every step, disjoint rows
    ranks = [list(BatchLevelShuffleSampler(sizes, 4, seed=0, num_replicas=2, rank=r)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 10
    for a, b in zip(*ranks):
        assert owner[a[0]] == owner[b[0]] and not set(a) & set(b)


def test_mixture_loader_batches_one_dataset_at_a_time():
    dm = datamodule(sample_ratio=1.0, mixture=[{"source": "synthetic", "synthetic": OTHER}])
    batches = list(dm.train_dataloader())
    assert batches and all(len(set(b["dataset"].tolist())) == 1 for b in batches)
    assert {int(b["dataset"][0]) for b in batches} == {0, 1}


def _states(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {"w": torch.randn(6, 5), "b": torch.randn(5), "step": torch.tensor(seed)}


@pytest.mark.parametrize("method", ["multislerp", "linear", "task_arithmetic"])
def test_merging_one_model_or_identical_models_is_the_identity(method):
    state, base = _states(0), _states(1)
    for inputs in ([state], [state, state, state]):
        merged = merge_states(inputs, merge_weights([1] * len(inputs)), method, base=base)
        for key in state:
            # integer buffers are copied from the reference input: the base for task arithmetic
            source = base if method == "task_arithmetic" and not state[key].is_floating_point() else state
            torch.testing.assert_close(merged[key], source[key], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("with_base", [False, True])
def test_multislerp_of_three_carries_over_tensors_no_sub_model_changed(with_base):
    base = _states(9)
    states = [{**_states(seed), "unused": torch.zeros(4), "frozen": base["w"].clone()} for seed in range(3)]
    base = {**base, "unused": torch.zeros(4), "frozen": base["w"].clone()}
    merged = merge_states(states, [1 / 3] * 3, "multislerp", base=base if with_base else None)
    torch.testing.assert_close(merged["unused"], torch.zeros(4))
    torch.testing.assert_close(merged["frozen"], base["w"])
    expected = multislerp([{"w": s["w"]} for s in states], [1 / 3] * 3, base={"w": base["w"]} if with_base else None)
    torch.testing.assert_close(merged["w"], expected["w"])


def test_merge_weights_and_cost_accounting():
    assert merge_weights([10, 30]) == [0.5, 0.5]
    assert merge_weights([10, 30], "size_proportional") == [0.25, 0.75]
    ratios = (0.2, 0.4, 0.6, 0.8, 1.0)
    subs = [SubModel(SubsetSpec(r, 0), {}, steps=int(r * 100), examples=int(r * 100)) for r in ratios]
    assert training_cost(subs, 100) == {"steps": 300, "epochs": 3.0}
    assert plan([0.5, 1.0], seed=7) == [SubsetSpec(0.5, 7), SubsetSpec(1.0, 8)]
    with pytest.raises(ValueError, match="task_arithmetic"):
        merge_states([_states(0)], [1.0], "task_arithmetic")


class ProbedRunner(BoomRunner):
    """Records every sub-model's weights at the start of its fit."""

    starts: list

    def build_trainer(self, folder):
        trainer = super().build_trainer(folder)
        starts = self.starts

        class Probe(L.Callback):
            def on_fit_start(self, trainer, module):
                starts.append({k: v.detach().clone() for k, v in module.state_dict().items()})

        trainer.callbacks.append(Probe())
        return trainer


def test_runner_trains_from_identical_weights_merges_and_round_trips(tmp_path):
    runner = ProbedRunner(MODEL, DATA, {"max_steps": 2}, ratios=[0.5, 1.0], root=tmp_path / "runs")
    runner.starts = []
    module, subs = runner.run()
    assert len(runner.starts) == 2
    for key, value in runner.starts[0].items():
        torch.testing.assert_close(runner.starts[1][key], value, atol=0, rtol=0)
    assert subs[0].examples == subset_size(subs[1].examples, 0.5)
    assert any(not torch.equal(subs[0].state[k], runner.starts[0][k]) for k in subs[0].state)
    expected = multislerp([s.state for s in subs], [0.5, 0.5])
    merged = module.state_dict()
    assert merged.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(merged[key], expected[key])
        assert merged[key].dtype == subs[0].state[key].dtype
    assert module.hparams.provenance["training_steps"] == 4
    # the merged model is an ordinary zoo checkpoint
    loaded = zoo.load(str(module.save_pretrained(tmp_path / "merged")))
    assert isinstance(loaded, BoomModule) and loaded.hparams.provenance == module.hparams.provenance
    torch.testing.assert_close(loaded.embed_queries(["topic one"]), module.embed_queries(["topic one"]))
    # plain hyperparameters (the provenance included): a checkpoint of them loads with weights_only
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, tmp_path / "m.ckpt")
    state = torch.load(tmp_path / "m.ckpt", weights_only=True)
    assert BoomModule(**state["hyper_parameters"]).load_state_dict(state["state_dict"]) is not None
    # the merged model is evaluated like any bi-encoder
    metrics = runner.evaluate(loaded)
    assert 0.0 <= metrics["retrieval/ndcg@10"] <= 1.0


def test_incremental_update_merges_exactly_the_old_and_the_update_model(tmp_path):
    runner = BoomRunner(MODEL, DATA, {"max_steps": 1}, root=tmp_path)
    old = {k: v + 0.01 if v.is_floating_point() else v for k, v in runner.base_state().items()}
    updater = IncrementalUpdater(runner, old, DATA, [{"source": "synthetic", "synthetic": OTHER}], core_ratio=0.4)
    module, update = updater.run()
    expected = multislerp([old, update.state], [0.5, 0.5])
    for key, value in module.state_dict().items():
        torch.testing.assert_close(value, expected[key])
    assert module.hparams.provenance["incremental"] and update.steps == 1
