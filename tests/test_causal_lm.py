"""causal_lm: loss alignment, loss terms, token-mean evaluation, the text datamodule, save/load, WSD."""
import logging
import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from datamodules.text import OTHER, TEMPLATE, FactCorpus, TextDataModule
from zoo.base import ZooModule
from zoo.causal_lm import CausalLMModule

logging.getLogger("lightning").setLevel(logging.ERROR)


def _trainer(**kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, **kwargs)


def _batch(module: CausalLMModule, rows: int = 3, length: int = 12, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, len(module.tokenizer), (rows, length), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100                     # a prompt
    labels[1, -3:] = -100                    # padding
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_loss_is_the_token_mean_next_token_cross_entropy_of_transformers():
    torch.manual_seed(0)
    module = CausalLMModule()
    batch = _batch(module)
    logits = module.forward_logits(batch)
    assert logits.shape == (3, 11, len(module.tokenizer))
    assert module.token_loss_mask(batch).sum() == 3 * 11 - 3 - 3
    loss, stats = module.loss(batch)
    reference = module.model(**batch).loss      # Transformers shifts the labels itself
    torch.testing.assert_close(loss, reference, atol=1e-5, rtol=1e-5)
    assert stats["tokens"] == 27


def test_loss_terms_are_added_with_aligned_logits_and_mask():
    torch.manual_seed(0)
    module = CausalLMModule()
    batch = _batch(module)
    base, _ = module.loss(batch)
    seen = {}

    def term(logits, mask, owner):
        seen.update(shape=tuple(logits.shape), mask=mask.clone(), owner=owner)
        return torch.tensor(0.25)

    module.loss_terms["probe"] = term
    loss, stats = module.loss(batch)
    torch.testing.assert_close(loss, base + 0.25)
    assert seen["shape"] == (3, 11, len(module.tokenizer)) and seen["owner"] is module
    assert torch.equal(seen["mask"], module.token_loss_mask(batch)) and float(stats["term/probe"]) == 0.25


class _Batches(L.LightningDataModule):
    def __init__(self, batches):
        super().__init__()
        self.batches = batches

    def val_dataloader(self):
        return DataLoader(self.batches, batch_size=None)


def test_validation_loss_is_the_token_mean_over_all_batches_not_the_mean_of_batch_means():
    torch.manual_seed(0)
    module = CausalLMModule()
    first, second = _batch(module, seed=1), _batch(module, rows=2, seed=2)
    second["labels"][:, :-2] = -100          # a batch with few loss tokens
    metrics = _trainer().validate(module, datamodule=_Batches([first, second]), verbose=False)[0]
    with torch.no_grad():
        sums = [module.token_losses(module.forward_logits(b), b).sum() for b in (first, second)]
    counts = [module.token_loss_mask(b).sum() for b in (first, second)]
    expected = float(sum(sums) / sum(counts))
    assert metrics["val/loss"] == pytest.approx(expected, rel=1e-5)
    assert metrics["val/ppl"] == pytest.approx(math.exp(expected), rel=1e-5)
    assert abs(expected - float(sum(s / c for s, c in zip(sums, counts)) / 2)) > 1e-3   # the two differ here


def test_generated_corpus_is_deterministic_with_known_template_tokens():
    module = CausalLMModule()
    blocks = []
    for _ in range(2):
        dm = TextDataModule(num_train=8, num_val=4, num_test=4, block_size=32, seed=3)
        dm.tokenizer = module.tokenizer
        dm.setup("fit")
        blocks.append(dm.splits)
    assert torch.equal(blocks[0]["train"].tensors["input_ids"], blocks[1]["train"].tensors["input_ids"])
    train, val = blocks[0]["train"].tensors, blocks[0]["val"].tensors
    assert train["input_ids"].shape == (8, 32) and val["input_ids"].shape == (4, 32)
    assert not torch.equal(train["input_ids"][:4], val["input_ids"])
    assert torch.equal(train["labels"], train["input_ids"]) and bool(train["attention_mask"].all())
    kinds = train["token_kind"]
    assert 0.55 < float((kinds == TEMPLATE).float().mean()) < 0.8       # header, delimiters, copies, footer
    assert bool((kinds[train["input_ids"] == module.tokenizer.eos_token_id] == OTHER).all())
    assert 0 < FactCorpus().entropy_rate() < math.log(16)


def test_text_files_are_packed_in_order_and_bad_paths_are_named(tmp_path):
    module = CausalLMModule()
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("the data of this study " * 40)
    (folder / "b.txt").write_text("which model is relevant " * 40)
    dm = TextDataModule(source="files", path=str(folder), block_size=16, val_fraction=0.1, test_fraction=0.1)
    dm.tokenizer = module.tokenizer
    dm.setup("fit")
    stream = torch.cat([dm.splits[s].tensors["input_ids"].flatten() for s in ("train", "val", "test")])
    expected = module.tokenizer((folder / "a.txt").read_text(), add_special_tokens=False)["input_ids"]
    assert stream[:len(expected)].tolist() == expected and stream[len(expected)] == module.tokenizer.eos_token_id
    assert len(dm.splits["val"]) >= 1 and len(dm.splits["test"]) >= 1
    with pytest.raises(FileNotFoundError, match="nowhere"):
        TextDataModule(source="files", path=str(tmp_path / "nowhere"), tokenizer="tiny-llama").setup("fit")
    (tmp_path / "tiny.txt").write_text("the data")
    with pytest.raises(ValueError, match="tiny.txt"):
        TextDataModule(source="files", path=str(tmp_path / "tiny.txt"), tokenizer="tiny-llama").setup("fit")


def test_short_fit_learns_well_below_uniform_and_round_trips(tmp_path):
    torch.manual_seed(0)
    module = CausalLMModule(optimizer={"name": "AdamW", "lr": 3e-3})
    dm = TextDataModule(num_train=64, num_val=16, num_test=16, batch_size=16, seed=0)
    trainer = _trainer(max_epochs=4, default_root_dir=str(tmp_path))
    trainer.fit(module, datamodule=dm)
    assert len((tmp_path / "lm_history.jsonl").read_text().splitlines()) == 4     # one line per epoch
    trainer.test(module, datamodule=dm, verbose=False)
    assert module.test_metrics["test/loss"] < 0.6 * math.log(len(module.tokenizer))
    assert {"test/loss", "test/ppl", "test/loss_template", "test/loss_content"} <= set(module.test_metrics)
    assert module.test_metrics["test/loss_template"] < module.test_metrics["test/loss_content"]
    loaded = ZooModule.from_pretrained(module.save_pretrained(tmp_path / "saved"))
    assert type(loaded) is CausalLMModule
    batch = next(iter(dm.val_dataloader()))
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.forward_logits(batch), module.forward_logits(batch), atol=0, rtol=0)


def test_warmup_stable_decay_schedule_through_configure_optimizers():
    lrs = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    module = CausalLMModule(optimizer={"name": "AdamW", "lr": 1e-3},
                            scheduler={"name": "warmup_stable_decay", "warmup_steps": 4, "num_decay_steps": 6,
                                       "decay_type": "linear"})
    dm = TextDataModule(num_train=40, num_val=2, num_test=2, batch_size=2, block_size=16)
    _trainer(max_epochs=1, limit_val_batches=0, callbacks=[Record()]).fit(module, datamodule=dm)
    assert len(lrs) == 20
    assert lrs[:5] == pytest.approx([0.0, 2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert lrs[5:14] == pytest.approx([1e-3] * 9)
    assert lrs[14:] == pytest.approx([1e-3 * (6 - i) / 6 for i in range(6)])
