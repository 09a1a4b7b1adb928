"""WSM callback: its window, the merged checkpoint it saves and evaluates, non-interference, resume, DDP and FSDP."""
import json
import logging
import warnings

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, DistributedSampler

import zoo
from callbacks.rng import RNGState
from callbacks.wsm import WSM, gather_full_state, merge_checkpoints, scatter_full_state
from datamodules.ltr import ClickLTRDataModule
from datamodules.text import TextDataModule
from zoo.blocks.merging import linear, wsm_coefficients
from zoo.causal_lm.module import CausalLMModule
from zoo.paths import REPO_ROOT
from zoo.ultr_user_aware.module import UserAwareULTRModule


def causal_lm(**data):
    L.seed_everything(0, verbose=False)
    module = CausalLMModule(backbone="tiny-llama", optimizer={"name": "AdamW", "lr": 3e-3})
    return module, TextDataModule(block_size=32, batch_size=4, eval_batch_size=16,
                                  **{"num_train": 24, "num_val": 16, "num_test": 16, **data})


def ultr():
    L.seed_everything(0, verbose=False)
    return (UserAwareULTRModule(n_features=16, keep_best=False),
            ClickLTRDataModule(split=[0.6667, 0.1667, 0.1666], sessions=2000, batch_size=32))


MODULES = {"causal_lm": causal_lm, "ultr_user_aware": ultr}
EVERY_5_STEPS = {"val_check_interval": 5, "check_val_every_n_epoch": None}


def quiet(**overrides) -> L.Trainer:
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    args = {"max_steps": 10, "max_epochs": -1, "logger": False, "enable_checkpointing": False,
            "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
            "accelerator": "cpu", "devices": 1}
    return L.Trainer(**{**args, **overrides})


class Recorder(L.Callback):
    """A copy of the weights after every optimizer step."""

    def __init__(self) -> None:
        self.states: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.states[trainer.global_step] = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


def assert_states(a, b, exact: bool = False, atol: float = 1e-6):
    assert sorted(a) == sorted(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key, **({"atol": 0, "rtol": 0} if exact else {"atol": atol, "rtol": 1e-5}))


# -- the merged model --------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["causal_lm", "ultr_user_aware"])
def test_saved_merge_is_the_hand_merge_is_evaluated_and_leaves_training_alone(tmp_path, kind):
    # Epochs of 6 (7) steps: the merged validation at step 5 comes before a reshuffle it must not disturb.
    module, data = MODULES[kind]()
    recorder, wsm = Recorder(), WSM(interval=3, count=3, shape="1-sqrt", eval_merged=True)
    trainer = quiet(default_root_dir=tmp_path, callbacks=[wsm, recorder], **EVERY_5_STEPS)
    trainer.fit(module, datamodule=data)

    assert [s.step for s in wsm.window] == [3, 6, 9]
    expected = linear([recorder.states[s] for s in (3, 6, 9)], wsm_coefficients("1-sqrt", 3).tolist(),
                      normalize=False, reference=-1)
    loaded = zoo.load(str(tmp_path / "wsm_merged"))
    assert type(loaded) is type(module)
    assert_states(loaded.state_dict(), expected)
    manifest = json.loads((tmp_path / "wsm_merged" / "wsm.json").read_text())
    assert manifest["steps"] == [3, 6, 9] and manifest["coefficients"] == pytest.approx(wsm_coefficients("1-sqrt", 3).tolist())

    # The merged weights were validated after each validation (steps 5 and 10), with what the module logs.
    assert [(h["step"], h["window"]) for h in wsm.history] == [(5, [3]), (10, [3, 6, 9])]
    validated = quiet().validate(loaded, datamodule=data, verbose=False)[0]
    assert validated and {f"wsm/{k}" for k in validated} == set(wsm.merged_metrics)
    for key, value in validated.items():
        assert wsm.merged_metrics[f"wsm/{key}"] == pytest.approx(value, abs=1e-5), key

    # Training is untouched: the same run without the callback ends on bitwise the same online weights,
    # with the same metrics seen by checkpoint monitors and loggers (the merged pass logs only wsm/*).
    plain_module, plain_data = MODULES[kind]()
    plain = quiet(default_root_dir=tmp_path / "plain", **EVERY_5_STEPS)
    plain.fit(plain_module, datamodule=plain_data)
    assert_states(module.state_dict(), plain_module.state_dict(), exact=True)
    assert {k: float(v) for k, v in trainer.callback_metrics.items()} == {k: float(v) for k, v in plain.callback_metrics.items()}


def test_window_follows_interval_count_start_step_and_counts_optimizer_steps(tmp_path):
    for accumulate in (1, 2):
        module, data = ultr()
        windows = [WSM(interval=3, count=2, save_dir=str(tmp_path / f"a{accumulate}")),
                   WSM(interval=3, duration=6, start_step=2, save_dir=str(tmp_path / f"b{accumulate}")),
                   WSM(interval=4, count=1, save_dir=str(tmp_path / f"c{accumulate}")),
                   WSM(interval=5, count=2, replace_weights_on_train_end=True, save_dir=str(tmp_path / f"d{accumulate}"))]
        recorder = Recorder()
        quiet(accumulate_grad_batches=accumulate, limit_val_batches=0, default_root_dir=tmp_path,
              callbacks=[*windows, recorder]).fit(module, datamodule=data)
        assert [[s.step for s in w.window] for w in windows] == [[6, 9], [5, 8], [8], [5, 10]]
        # One checkpoint: the merge is that checkpoint, bit for bit.
        single = zoo.load(str(tmp_path / f"c{accumulate}")).state_dict()
        assert_states(single, recorder.states[8], exact=True)
        # replace_weights_on_train_end: the run ends on the merged weights.
        assert_states(module.state_dict(), linear([recorder.states[5], recorder.states[10]], reference=-1))


def test_snapshots_skip_warmup_and_a_decaying_lr_is_flagged(tmp_path):
    module, data = causal_lm()
    module.hparams.scheduler = {"name": "constant", "warmup_steps": 4}
    strict, lenient = WSM(interval=1, count=20, save_dir=str(tmp_path / "s")), \
        WSM(interval=1, count=20, include_warmup=True, save_dir=str(tmp_path / "l"))
    quiet(max_steps=8, limit_val_batches=0, callbacks=[strict, lenient]).fit(module, datamodule=data)
    assert [s.step for s in strict.window] == [5, 6, 7, 8]
    assert [s.step for s in lenient.window] == list(range(1, 9))

    module, data = causal_lm()
    module.hparams.scheduler = {"name": "linear"}
    with pytest.warns(UserWarning, match="learning rate fell to .* WSM assumes a constant LR"):
        quiet(max_steps=4, limit_val_batches=0, callbacks=[WSM(interval=2, count=2, save_dir=str(tmp_path / "d"))]
              ).fit(module, datamodule=data)


@pytest.mark.parametrize("storage", ["memory", "disk"])
def test_resume_keeps_the_window_and_gives_the_uninterrupted_merge(tmp_path, storage):
    """Six steps per epoch; snapshots every 2 steps, window of 4: the resumed run's window [6, 8, 10, 12]
    starts with a snapshot taken before the interruption."""
    def run(folder, epochs, ckpt_path=None):
        module, data = causal_lm(num_train=24)
        wsm = WSM(interval=2, count=4, storage=storage)
        checkpoint = ModelCheckpoint(dirpath=tmp_path / folder / "checkpoints", save_last=True)
        quiet(max_steps=-1, max_epochs=epochs, limit_val_batches=0, default_root_dir=tmp_path / folder,
              enable_checkpointing=True, callbacks=[wsm, checkpoint, RNGState()]
              ).fit(module, datamodule=data, ckpt_path=ckpt_path, weights_only=True)
        return wsm

    straight = run("straight", 2)
    first = run("first", 1)
    assert [s.step for s in first.window] == [2, 4, 6]
    resumed = run("resumed", 2, ckpt_path=str(tmp_path / "first" / "checkpoints" / "last.ckpt"))
    assert [s.step for s in resumed.window] == [s.step for s in straight.window] == [6, 8, 10, 12]
    assert_states(dict(resumed.window[0].state()), dict(first.window[-1].state()), exact=True)
    assert_states(zoo.load(str(tmp_path / "resumed" / "wsm_merged")).state_dict(),
                  zoo.load(str(tmp_path / "straight" / "wsm_merged")).state_dict(), exact=True)
    if storage == "disk":       # evicted snapshot files are deleted, across the two run folders
        kept = sorted(p.name for p in tmp_path.glob("*/wsm_snapshots/*.safetensors") if "straight" not in str(p))
        assert kept == [f"step_{s:09d}.safetensors" for s in (6, 8, 10, 12)]


# -- several processes ---------------------------------------------------------------------------------------
class OrderedText(TextDataModule):
    """Training blocks in order (rank r of W takes blocks r, r + W, ...), so one process with batch 2B sees
    what two ranks with batch B see together; Lightning's own sampler would shuffle under DDP."""

    def train_dataloader(self):
        world, rank = self.trainer.world_size, self.trainer.global_rank
        sampler = DistributedSampler(self.splits["train"], num_replicas=world, rank=rank, shuffle=False)
        return DataLoader(self.splits["train"], batch_size=self.hparams.batch_size, sampler=sampler)


class FSDPProbe(L.Callback):
    """Inside the two-rank run (its gloo process group): shard a small net with FSDP and check that a
    snapshot gathers its full state dict and that loading a full state dict re-shards it."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_end(self, trainer, pl_module) -> None:
        from torch.distributed.fsdp import FullyShardedDataParallel
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Linear(4, 3))
        net.register_buffer("steps", torch.tensor([7]))
        full = {k: v.clone() for k, v in net.state_dict().items()}
        sharded = FullyShardedDataParallel(net, device_id=torch.device("cpu"), use_orig_params=True)
        gathered = gather_full_state(sharded)
        target = {k: v * 2 + 1 if v.is_floating_point() else v for k, v in full.items()}
        scatter_full_state(sharded, target if trainer.is_global_zero else {})
        reloaded = gather_full_state(sharded)
        local = sum(p.numel() for p in sharded.parameters())
        if trainer.is_global_zero:
            torch.save({"full": full, "gathered": gathered, "target": target, "reloaded": reloaded, "local": local},
                       self.out)


def _ddp_merge(folder, devices: int, batch_size: int):
    L.seed_everything(0, verbose=False)
    module = CausalLMModule(backbone="tiny-llama", optimizer={"name": "AdamW", "lr": 3e-3})
    data = OrderedText(block_size=32, batch_size=batch_size, eval_batch_size=8, num_train=48, num_val=16, num_test=16)
    extra = {"strategy": "ddp_spawn", "callbacks": [FSDPProbe(str(folder / "fsdp.pt"))]} if devices > 1 else {}
    quiet(max_steps=6, devices=devices, default_root_dir=folder, val_check_interval=6, use_distributed_sampler=False,
          **{**extra, "callbacks": [WSM(interval=2, count=3, eval_merged=True), *extra.get("callbacks", [])]}
          ).fit(module, datamodule=data)
    return zoo.load(str(folder / "wsm_merged")).state_dict(), json.loads((folder / "wsm_merged" / "wsm.json").read_text())


@pytest.mark.timeout(240)
def test_one_and_two_gloo_ranks_give_the_same_merged_weights_and_fsdp_helpers_reshard(tmp_path):
    single, single_manifest = _ddp_merge(tmp_path / "one", 1, 8)
    double, double_manifest = _ddp_merge(tmp_path / "two", 2, 4)
    assert double_manifest["steps"] == single_manifest["steps"] == [2, 4, 6]
    assert_states(double, single, atol=2e-5)      # Adam divides by sqrt(v): summation-order noise grows to ~1e-5
    # The merged validation ran on both ranks over their halves of the validation set.
    assert double_manifest["metrics"]["wsm/val/loss"] == pytest.approx(single_manifest["metrics"]["wsm/val/loss"], abs=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]

    fsdp = torch.load(tmp_path / "two" / "fsdp.pt", weights_only=True)
    assert fsdp["local"] < sum(v.numel() for k, v in fsdp["full"].items() if k != "steps")     # really sharded
    assert_states(fsdp["gathered"], fsdp["full"], exact=True)
    assert_states(fsdp["reloaded"], fsdp["target"], exact=True)


# -- configuration and the offline merge -------------------------------------------------------------------
def test_callbacks_list_form_composes_default_and_wsm():
    from train import OmegaConf as _  # noqa: F401  (registers the zoo_root resolver)
    with initialize_config_dir(config_dir=str(REPO_ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["callbacks=[default,wsm]", "callbacks.wsm.shape=1-sqrt"],
                      return_hydra_config=True)
    assert set(cfg.callbacks) == {"checkpoint", "progress", "rng_state", "wsm"}
    wsm = instantiate(cfg.callbacks.wsm)
    assert isinstance(wsm, WSM) and (wsm.interval, wsm.count, wsm.shape) == (25, 8, "1-sqrt")


def test_offline_merge_of_saved_checkpoints_and_bad_settings(tmp_path):
    from safetensors.torch import save_file
    states = [{"w": torch.randn(3, 2), "n": torch.tensor([i])} for i in range(3)]
    paths = [tmp_path / "a.ckpt", tmp_path / "b.safetensors", tmp_path / "c"]
    torch.save({"state_dict": states[0], "epoch": 0}, paths[0])
    save_file(states[1], str(paths[1]))
    paths[2].mkdir()
    save_file(states[2], str(paths[2] / "model.safetensors"))
    merged = merge_checkpoints(paths, shape="cosine")
    assert_states(merged, linear(states, wsm_coefficients("cosine", 3).tolist(), normalize=False, reference=-1))
    assert_states(merge_checkpoints(paths, decay_weights=[0.5, 0.5]),
                  linear(states, [0.5, 0.0, 0.5], normalize=False, reference=-1))
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        merge_checkpoints([tmp_path / "missing.ckpt"])
    with pytest.raises(ValueError, match="unknown WSM shape 'exp'"):
        WSM(shape="exp")
    with pytest.raises(ValueError, match="duration 50 is not a multiple of interval 20"):
        WSM(interval=20, duration=50)
    with pytest.raises(ValueError, match="coefficients must be 3 non-negative values summing to 1"):
        WSM(count=3, coefficients=[0.5, 0.5])
    with pytest.raises(ValueError, match="non-increasing"):
        WSM(count=3, decay_weights=[0.2, 0.9])


def test_module_filter_keeps_tensors_out_of_the_merge_and_explicit_weights_need_a_full_window():
    from collections import deque

    from callbacks.wsm import Snapshot

    class FrozenHead(torch.nn.Module):
        def wsm_param_filter(self, name: str) -> bool:
            return name != "head"

    wsm = WSM(interval=1, count=2)
    wsm.window = deque([Snapshot(1, tensors={"body": torch.ones(2), "head": torch.ones(2)}),
                        Snapshot(2, tensors={"body": torch.zeros(2), "head": torch.zeros(2)})])
    merged = wsm.merge(FrozenHead())
    assert torch.equal(merged["body"], torch.full((2,), 0.5)) and torch.equal(merged["head"], torch.zeros(2))
    explicit = WSM(interval=1, count=3, coefficients=[0.2, 0.3, 0.5])
    explicit.window = deque(list(wsm.window))
    assert not explicit.ready()
    with pytest.raises(ValueError, match="3 explicit coefficients but the window holds 2"):
        explicit.merge()
