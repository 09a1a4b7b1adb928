"""train.py end to end: every config composes and runs, resume is exact, errors are clear."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from safetensors.torch import load_file

from zoo.paths import REPO_ROOT

CONFIGS = REPO_ROOT / "configs"
QUICK = ["trainer.fast_dev_run=1", "data.corpus_limit=40", "data.max_queries=16"]
TINY = ["model.backbone=tiny-bert", "model.max_doc_length=48", "model.listwise.max_doc_tokens=8",
        "model.max_prompt_length=160"]
NEEDS_GPU = {"gpu", "ddp", "fsdp"}
RESUME_DATA = ["data.max_queries=24", "data.synthetic.super_topics=2", "data.batch_size=4",
               "trainer.limit_val_batches=0", "test_after_fit=false"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def train(tmp_path: Path, *overrides: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    run_dir = tmp_path / "run"
    cmd = [sys.executable, str(REPO_ROOT / "train.py"), f"hydra.run.dir={run_dir}", *overrides]
    result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, **(env or {})})
    if check and result.returncode != 0:
        pytest.fail(f"train.py {' '.join(overrides)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def write_beir(folder: Path, bad_corpus_line: bool = False) -> Path:
    (folder / "qrels").mkdir(parents=True)
    topics = ["solar energy panels", "river fish species", "ancient roman roads", "quantum computing qubits",
              "coffee bean roasting"]
    with open(folder / "corpus.jsonl", "w") as f:
        f.writelines(json.dumps({"_id": f"d{i}", "title": topics[i % 5], "text": f"{topics[i % 5]} note {i}"}) + "\n" for i in range(30))
        if bad_corpus_line:
            f.write('{"_id": "broken", "text": \n')
    with open(folder / "queries.jsonl", "w") as f:
        f.writelines(json.dumps({"_id": f"q{i}", "text": topic}) + "\n" for i, topic in enumerate(topics))
    with open(folder / "qrels" / "test.tsv", "w") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        f.writelines(f"q{i % 5}\td{i}\t1\n" for i in range(30))
    return folder


# -- composition ---------------------------------------------------------------------------
def _compose(overrides: list[str]):
    from train import OmegaConf as _  # noqa: F401  (registers the zoo_root resolver)
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize("group", ["model", "data", "trainer", "experiment", "logger", "callbacks"])
def test_every_config_composes(group, shared_data):
    for option in options(group):
        overrides = [f"{group}={option}", "data.path=/some/beir"] if option in ("beir", "beir_eval") else [f"{group}={option}"]
        if group == "data" and (CONFIGS / "model" / f"{option}.yaml").exists():
            overrides.append(f"model={option}")       # a model's data config may read the model's keys
        cfg = _compose(overrides)
        OmegaConf.resolve(cfg.data) if cfg.data.get("path") != "???" else None
        assert cfg.model._target_ and cfg.data._target_ and cfg.trainer._target_


@pytest.mark.parametrize("trainer", sorted(NEEDS_GPU))
def test_gpu_trainer_configs_need_a_gpu(trainer):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the fast_dev_run tests cover these")
    cfg = _compose([f"trainer={trainer}"])
    assert cfg.trainer.accelerator == "gpu"


# -- runs ----------------------------------------------------------------------------------
def test_default_runs_fast_dev_run_with_minilm(tmp_path):
    result = train(tmp_path, *QUICK)
    assert "run folder:" in result.stdout
    run_dir = tmp_path / "run"
    assert (run_dir / "config.yaml").exists()


# Experiments of other models must run under fast_dev_run alone; E2Rank's shrink MiniLM to tiny-bert,
# and the real-LLM RL run generates fewer tokens.
SMOKE = {"e2rank": [*QUICK, *TINY], "dense": [*QUICK, "model.backbone=tiny-bert", "model.max_doc_length=48"],
         "grpo_gsm8k_smollm2": ["trainer.fast_dev_run=1", "model.rollout.max_new_tokens=16"],
         "jade_hotpotqa_smollm2": ["trainer.fast_dev_run=1", "data.eval_batch_size=1",
                                   "model.role_max_new_tokens={planner:8,sub_planner:8,qds:16,qdp:16,qr:12,ds:12,"
                                   "ag:12,as:12}"],
         # one step: the curriculum's p(0) = 0 would skip the entropy pre-pass
         "entrodrop_multiepoch": ["trainer.fast_dev_run=1", "callbacks.entrodrop.schedule=constant"],
         "mask_hotpotqa_smollm2": ["trainer.fast_dev_run=1", "data.max_eval_questions=2", "data.eval_batch_size=2",
                                   "model.max_turns=1",
                                   "model.role_max_new_tokens={planning:16,search:16,summary:16,update:8,answer:16}"],
         # one step that snapshots, merges, evaluates and saves
         "wsm_causal_lm": ["trainer.fast_dev_run=1", "data.num_train=64", "callbacks.wsm.interval=1",
                           "callbacks.wsm.count=1", "callbacks.wsm.include_warmup=true"],
         "wsm_wsd_control": ["trainer.fast_dev_run=1", "data.num_train=64"],
         # 0.5-ratio subsets need 32 queries for one training batch
         "boom": ["trainer.fast_dev_run=1", "data.corpus_limit=40", "data.max_queries=32", "model.backbone=tiny-bert",
                  "model.max_doc_length=48"],
         "boom_incremental": [*QUICK, "model.backbone=tiny-bert", "model.max_doc_length=48",
                              "+data.mixture.0.max_queries=16", "+data.mixture.0.corpus_limit=40"],
         "llm_ql": [*QUICK], "llm_ql_dense": [*QUICK],
         "utility_annotation": [*QUICK, "model.backbone=tiny-bert", "model.max_doc_length=48"],
         # hashed encoders: MiniLM would encode all 5,183 SciFact documents (4 min on 2 cores)
         "gencrf_scifact": ["trainer.fast_dev_run=1", "data.batch_size=1", "model.max_new_tokens=4",
                            "model.cluster_max_new_tokens=8", "model.score_max_new_tokens=4",
                            "model.retriever=hashed", "model.sim_encoder=hashed"],
         "usefulness_smollm2": ["trainer.fast_dev_run=1", "data.max_queries=1", "data.batch_size=1"],
         "usefulness_setwise_smollm2": ["trainer.fast_dev_run=1", "data.max_queries=1", "data.batch_size=1",
                                        "model.voters=1", "model.max_new_tokens=8", "model.repair_max_new_tokens=4"],
         "usefulness_satisfaction_clue": ["trainer.fast_dev_run=1", "data.synthetic.num_queries=40"],
         # judges one pair and patches nothing: one patched pair is ~720 SmolLM2 forwards
         "relevance_interp_dl19_smollm2": ["trainer.fast_dev_run=1", "model.max_patched_pairs=0"]}


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_runs_fast_dev_run(tmp_path, experiment, shared_data):
    model = _compose([f"experiment={experiment}"]).hydra.runtime.choices.model
    extra = [f"data.path={write_beir(tmp_path / 'beir')}"] if experiment == "beir_eval" else []
    smoke = SMOKE.get(experiment) or SMOKE.get(model) or ["trainer.fast_dev_run=1"]
    train(tmp_path, f"experiment={experiment}", *smoke, *extra)


def test_ddp_sim_two_processes_share_one_run_folder(tmp_path):
    result = train(tmp_path, "trainer=ddp_sim", *QUICK, *TINY)
    assert "run folder:" in result.stdout
    assert sorted(p.name for p in (tmp_path.iterdir())) == ["run"]


def _fit(tmp_path: Path, name: str, *overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    folder = tmp_path / name
    folder.mkdir()
    return train(folder, *TINY, *RESUME_DATA, "logger=none", *overrides, env=env)


def test_resume_after_a_kill_equals_uninterrupted_run(tmp_path):
    tests_dir = {"PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    _fit(tmp_path, "straight", "trainer.max_epochs=2")
    (tmp_path / "killed").mkdir()
    killed = train(tmp_path / "killed", *TINY, *RESUME_DATA, "trainer.max_epochs=2", "logger=none",
                   "+callbacks.kill._target_=custom_modules.KillAtEpochStart", "+callbacks.kill.epoch=1",
                   check=False, env=tests_dir)
    assert killed.returncode == 17, killed.stderr[-2000:]
    last = tmp_path / "killed" / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["epoch"] == 0
    _fit(tmp_path, "resumed", "trainer.max_epochs=2", f"ckpt_path={last}")
    a = load_file(str(tmp_path / "straight" / "run" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "run" / "model" / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=0, rtol=0, msg=key)


def test_subclass_overriding_one_hook_trains_through_train_py(tmp_path):
    tests_dir = str(Path(__file__).parent)
    result = _fit(tmp_path, "sub", "model._target_=custom_modules.ListMLEE2Rank", "trainer.max_steps=2",
                  env={"PYTHONPATH": os.pathsep.join([tests_dir, os.environ.get("PYTHONPATH", "")])})
    assert "ListMLE ranking loss used 2 times" in result.stdout
    run = tmp_path / "sub" / "run"
    config = (run / "model" / "config.yaml").read_text()
    assert "custom_modules.ListMLEE2Rank" in config
    sys.path.insert(0, str(Path(__file__).parent))
    try:
        from custom_modules import ListMLEE2Rank

        import zoo
        loaded = zoo.load(str(run / "model"))
        assert type(loaded) is ListMLEE2Rank
    finally:
        sys.path.remove(str(Path(__file__).parent))


RL_TINY = ["model=grpo", "model.backbone_overrides.hidden_size=32", "model.backbone_overrides.intermediate_size=64",
           "model.warm_start.steps=2", "model.rollout.max_new_tokens=8", "data.batch_size=4", "data.eval_size=8",
           "logger=none"]


def test_subclassed_rl_hook_trains_through_train_py_and_loads_back(tmp_path):
    tests_dir = str(Path(__file__).parent)
    result = train(tmp_path, *RL_TINY, "model._target_=custom_modules.BrevityGRPO", "data.train_batches=2",
                   "trainer.max_epochs=1", env={"PYTHONPATH": os.pathsep.join([tests_dir, os.environ.get("PYTHONPATH", "")])})
    assert "brevity reward used 2 times" in result.stdout and "test/accuracy" in result.stdout
    history = [json.loads(line) for line in (tmp_path / "run" / "rl_history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in history if "reward" in r] == [1, 2] and any("sft_loss" in r for r in history)
    sys.path.insert(0, tests_dir)
    try:
        from custom_modules import BrevityGRPO

        import zoo
        loaded = zoo.load(str(tmp_path / "run" / "model"))
        assert type(loaded) is BrevityGRPO and bool(loaded.warm_started)
    finally:
        sys.path.remove(tests_dir)


def test_grpo_under_two_gloo_processes(tmp_path):
    result = train(tmp_path, *RL_TINY, "trainer=ddp_sim", "trainer.fast_dev_run=1")
    assert "run folder:" in result.stdout


def test_beir_evaluation_writes_metrics_and_trec_runs(tmp_path):
    from datamodules.readers import read_trec_run
    folder = write_beir(tmp_path / "beir")
    result = train(tmp_path, "experiment=beir_eval", f"data.path={folder}", *TINY)
    assert "final metrics:" in result.stdout
    runs = tmp_path / "run" / "runs"
    metrics = json.loads((runs / "beir-test.metrics.json").read_text())
    assert {"retrieval/ndcg@10", "first_stage/ndcg@10", "rerank/ndcg@10"} <= set(metrics)
    line = (runs / "beir-test.rerank.trec").read_text().splitlines()[0].split()
    assert len(line) == 6 and line[1] == "Q0" and line[3] == "1"
    run = read_trec_run(runs / "beir-test.rerank.trec")
    first_stage = read_trec_run(runs / "beir-test.first_stage.trec")
    assert set(run) == {f"q{i}" for i in range(5)}
    assert all(set(run[q]) == set(first_stage[q]) for q in run)      # every candidate is reranked
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == pytest.approx(metrics)
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


# -- errors --------------------------------------------------------------------------------
@pytest.mark.parametrize("group,valid", [("model", "e2rank"), ("data", "scifact"), ("trainer", "ddp_sim"),
                                         ("experiment", "e2rank_default")])
def test_unknown_name_lists_valid_choices(tmp_path, group, valid):
    result = train(tmp_path, f"{group}=nope", check=False)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert f"Could not find '{group}/nope'" in output and valid in output
    assert "Traceback" not in output


def test_malformed_data_line_names_file_and_line(tmp_path):
    folder = write_beir(tmp_path / "beir", bad_corpus_line=True)
    result = train(tmp_path, "experiment=beir_eval", f"data.path={folder}", *TINY, check=False)
    assert result.returncode == 2
    assert f"{folder / 'corpus.jsonl'}:31" in result.stderr and "Traceback" not in result.stderr


def test_unknown_pretrained_name_is_a_clear_error(tmp_path):
    result = train(tmp_path, "pretrained=e2rank:missing", "mode=test", check=False)
    assert result.returncode == 2 and "unknown checkpoint" in result.stderr and "Traceback" not in result.stderr


def test_zoo_list_json_names_every_paper(shared_data):
    result = subprocess.run([sys.executable, "-m", "zoo", "list", "--json"], cwd=REPO_ROOT, capture_output=True,
                            text=True, check=True)
    rows = json.loads(result.stdout)
    papers_readme = (shared_data.parent / "papers" / "README.md")
    expected = {line.split("|")[1].strip() for line in papers_readme.read_text().splitlines()
                if line.startswith("| ") and line.split("|")[2].strip().endswith(".md")}
    generic = {"grpo", "ppo", "causal_lm", "dense"}
    assert {r["name"] for r in rows} == expected | generic
    assert all({"name", "paper", "arxiv", "kind", "module", "datamodule", "status"} <= set(r) for r in rows)


def test_ckpt_path_last_finds_this_or_the_newest_run(tmp_path):
    import time

    from train import _last_checkpoint
    runs = tmp_path / "outputs" / "e2rank"
    older, newer, current = runs / "a", runs / "b", runs / "c"
    for run in (older, newer):
        (run / "checkpoints").mkdir(parents=True)
        (run / "checkpoints" / "last.ckpt").write_bytes(b"x")
        time.sleep(0.01)
    current.mkdir()
    assert _last_checkpoint(current) == str(newer / "checkpoints" / "last.ckpt")
    (current / "checkpoints").mkdir()
    (current / "checkpoints" / "last.ckpt").write_bytes(b"x")
    assert _last_checkpoint(current) == str(current / "checkpoints" / "last.ckpt")
    with pytest.raises(FileNotFoundError, match="no checkpoints/last.ckpt"):
        _last_checkpoint(tmp_path / "elsewhere" / "run")


def test_fit_on_a_training_free_module_runs_its_evaluation(tmp_path):
    result = train(tmp_path, "model=tourrank", "trainer.fast_dev_run=1", "logger=none")
    assert "training-free" in result.stdout and "test/" in result.stdout
