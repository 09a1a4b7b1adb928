"""How LLMs judge relevance, by activation patching (arXiv 2504.07898).

Each clean/corrupted prompt pair (relevant vs hard-negative document; pairwise: documents swapped)
gets one clean run (cached), one corrupted run, then batched patched runs: per experiment, the
clean activation of one site replaces the corrupted one at one (layer, position group[, head]).
The behaviour is LD = logit(yes) - logit(no) at the last position; effects are normalised with
dataset means after all samples are in (spec, ambiguity 1), and written as safetensors + CSV.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from zoo.backbones import build_backbone, build_word_tokenizer
from zoo.base import ZooModule
from zoo.blocks.llm import HEAD_SITES, ActivationHooks
from zoo.relevance_interp.patching import (
    NORMALISATIONS,
    answer_token_ids,
    indirect_effect,
    logit_diff,
    normalised_effect,
    patch_sweep,
    per_sample_effect,
    prob_diff,
)
from zoo.relevance_interp.prompts import (
    FORMATS,
    GROUPS,
    PromptPair,
    build_pair,
    position_groups,
)

FILTERS = ("none", "ordered", "strict")
DEFAULT_EXPERIMENTS = [
    {"site": "resid_post", "groups": ["all", "last", "query_all", "doc_all", "inst_all"]},
    {"site": "attn_out", "groups": ["all", "last", "query_all", "doc_all", "inst_all"]},
    {"site": "mlp_out", "groups": ["all", "last", "query_all", "doc_all", "inst_all"]},
    {"site": "z", "groups": ["last"]},
]
# Words of the embedded default's tokenizer: the prompt scaffolding, answers and synthetic vocabulary.
TINY_WORDS = (["yes", "no", "Document", "Query", "A", "B", "Does", "the", "document", "answer", "query", "Only",
               "output", "or", "Is", "more", "relevant", "to", "user", "assistant", "system", "?", "'", ".", ":"]
              + [f"w{i}" for i in range(60)])
# A minimal chat template for tokenizers without one: the answer follows "assistant :".
MINIMAL_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
                    "{% if add_generation_prompt %}assistant :{% endif %}")


def tiny_relevance_backbone(overrides: dict | None = None) -> tuple[LlamaForCausalLM, Any]:
    """The embedded default: a random 3-layer Llama (4 heads, 2 KV heads, eager) over TINY_WORDS."""
    tokenizer = build_word_tokenizer(TINY_WORDS, padding_side="left")
    tokenizer.chat_template = MINIMAL_TEMPLATE
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, max_position_embeddings=512, pad_token_id=0,
                         bos_token_id=2, eos_token_id=3, tie_word_embeddings=False, attn_implementation="eager")
    for key, value in (overrides or {}).items():
        setattr(config, key, value)
    return LlamaForCausalLM(config), tokenizer


class RelevancePatchingModule(ZooModule):
    """Training-free analysis. Hooks to override: ``prompt_pair`` (texts -> aligned token pair),
    ``behaviour`` (logits -> LD), ``sweep`` (one experiment on one pair), ``keep`` (sample filter),
    ``effects`` (grids -> normalised effects)."""

    zoo_name = "relevance_interp"
    card_notes = (
        "Activation patching (denoising) of yes/no relevance judgments, following the official code "
        "(liuqi6777/llm-relevance): LD = logit('yes') - logit('no') at the last position; effects normalised "
        "with dataset means (also per-sample and unnormalised IE). Documents are cut to one token length so "
        "clean and corrupted prompts align. Path patching and attention-score patching are not implemented; "
        "mean ablation is available as functions (zoo.relevance_interp.patching). The embedded default is a "
        "random tiny Llama, so its effects are meaningless except as a check of the machinery."
    )

    def __init__(
        self,
        backbone: str = "tiny-relevance",
        backbone_overrides: dict | None = None,
        dtype: str = "float32",
        format: str = "pointwise",
        layout: str = "DQI",
        answer_tokens: list | None = None,
        experiments: list | None = None,
        normalisation: str = "dataset_mean",
        filter: str = "none",
        max_patched_pairs: int | None = None,
        max_doc_tokens: int | None = 128,
        system_prompt: str | None = None,
        patch_batch_size: int = 32,
        skip_unchanged_layers: bool = True,
        top_k: int = 5,
        output_dir: str | None = None,
    ) -> None:
        super().__init__()
        if format not in FORMATS:
            raise ValueError(f"unknown model.format '{format}'; choose one of {FORMATS}")
        if normalisation not in NORMALISATIONS:
            raise ValueError(f"unknown model.normalisation '{normalisation}'; choose one of {NORMALISATIONS}")
        if filter not in FILTERS:
            raise ValueError(f"unknown model.filter '{filter}'; choose one of {FILTERS}")
        for i, exp in enumerate(experiments or []):
            bad = [g for g in exp.get("groups", []) if g not in GROUPS]
            if "site" not in exp or bad:
                raise ValueError(f"model.experiments[{i}] needs a site and groups from {GROUPS} (bad: {bad})")
        self.save_hyperparameters()
        if backbone == "tiny-relevance":
            self.llm, self.tokenizer = tiny_relevance_backbone(backbone_overrides)
        else:
            self.llm, self.tokenizer = build_backbone(backbone, causal_lm=True, config_overrides=backbone_overrides,
                                                      dtype=dtype)
        self.llm.requires_grad_(False).eval()
        self.hooks = ActivationHooks(self.llm)
        self.answer_ids = tuple(answer_token_ids(self.tokenizer, answer_tokens or ["yes", "no"]))
        self.experiments = [dict(e) for e in (experiments or DEFAULT_EXPERIMENTS)]
        self.results: dict[str, Any] = {}
        self._reset()

    def _reset(self) -> None:
        self._rows: list[dict[str, Any]] = []

    def backbone_parts(self) -> tuple[Any, Any]:
        return self.llm, self.tokenizer

    def configure_optimizers(self) -> None:
        return None

    # -- hooks -------------------------------------------------------------------------------
    def prompt_pair(self, row: dict[str, Any]) -> PromptPair:
        hp = self.hparams
        return build_pair(self.tokenizer, hp.format, hp.layout, row["query"], row["positive"], row["negative"],
                          max_doc_tokens=hp.max_doc_tokens, system=hp.system_prompt)

    def behaviour(self, logits: torch.Tensor) -> torch.Tensor:
        return logit_diff(logits, *self.answer_ids)

    def keep(self, ld_clean: float, ld_corrupt: float) -> bool:
        """Spec, ambiguity 2: ``strict`` keeps pairs judged right (LD_clean > 0 > LD_corr)."""
        rule = self.hparams.filter
        if rule == "strict":
            return ld_clean > 0 > ld_corrupt
        return ld_clean > ld_corrupt if rule == "ordered" else True

    def sweep(self, experiment: dict[str, Any], pair: PromptPair, clean_cache: dict, corrupt_cache: dict) -> torch.Tensor:
        site = experiment["site"]
        layers = range(len(self.hooks.layers))
        resid = [corrupt_cache[("resid_pre", l)] for l in layers] if self.hparams.skip_unchanged_layers else None
        return patch_sweep(self.hooks, self._ids(pair.corrupt_ids), site, [clean_cache[(site, l)] for l in layers],
                           resid, position_groups(pair, experiment["groups"]), self.answer_ids,
                           self.hparams.patch_batch_size)

    def effects(self, patched: torch.Tensor, clean: torch.Tensor, corrupt: torch.Tensor) -> dict[str, torch.Tensor]:
        main = normalised_effect if self.hparams.normalisation == "dataset_mean" else per_sample_effect
        return {"effect": main(patched, clean, corrupt),
                "effect_per_sample": per_sample_effect(patched, clean, corrupt),
                "indirect_effect": indirect_effect(patched, corrupt)}

    # -- running -----------------------------------------------------------------------------
    def _ids(self, ids: list[int]) -> torch.Tensor:
        return torch.tensor([ids], device=self.device)

    def judge(self, pair: PromptPair) -> dict[str, Any]:
        """Clean and corrupted runs with everything the experiments need cached."""
        L = len(self.hooks.layers)
        sites = {e["site"] for e in self.experiments}
        clean_logits, clean_cache = self.hooks.run(
            self._ids(pair.clean_ids), self._ids([1] * pair.length),
            capture=[(s, l) for s in sites for l in range(L)])
        corrupt_logits, corrupt_cache = self.hooks.run(
            self._ids(pair.corrupt_ids), self._ids([1] * pair.length), capture=[("resid_pre", l) for l in range(L)])
        return {"clean_logits": clean_logits, "corrupt_logits": corrupt_logits,
                "clean_cache": clean_cache, "corrupt_cache": corrupt_cache}

    @torch.no_grad()
    def analyse(self, row: dict[str, Any]) -> dict[str, Any]:
        """One pair: LD/PD clean and corrupted, and (if kept) the patched LD grid of every experiment."""
        pair = self.prompt_pair(row)
        runs = self.judge(pair)
        out = {"qid": row.get("qid", ""), "length": pair.length,
               "ld_clean": float(self.behaviour(runs["clean_logits"])[0]),
               "ld_corrupt": float(self.behaviour(runs["corrupt_logits"])[0]),
               "pd_clean": float(prob_diff(runs["clean_logits"], *self.answer_ids)[0]),
               "pd_corrupt": float(prob_diff(runs["corrupt_logits"], *self.answer_ids)[0]), "grids": {}}
        limit = self.hparams.max_patched_pairs
        patched_so_far = sum(bool(r["grids"]) for r in self._rows)
        if self.keep(out["ld_clean"], out["ld_corrupt"]) and (limit is None or patched_so_far < limit):
            for exp in self.experiments:
                out["grids"][self.experiment_name(exp)] = self.sweep(exp, pair, runs["clean_cache"],
                                                                     runs["corrupt_cache"])
        return out

    @staticmethod
    def experiment_name(experiment: dict[str, Any]) -> str:
        return f"{experiment['site']}_{'head' if experiment['site'] in HEAD_SITES else 'layer'}"

    def test_step(self, batch: list[dict[str, Any]], batch_idx: int) -> None:
        for row in batch:
            self._rows.append(self.analyse(row))

    def predict_step(self, batch: list[dict[str, Any]], batch_idx: int) -> list[dict[str, Any]]:
        return [self.analyse(row) for row in batch]

    def on_test_epoch_start(self) -> None:
        self._reset()

    def on_test_epoch_end(self) -> None:
        rows, self._rows = self._rows, []
        if not rows:
            self.results = {}
            return
        self.results = self.summarise(rows)
        metrics = {k: v for k, v in self.results["summary"].items() if isinstance(v, (int, float))}
        for key, value in metrics.items():
            self.log(f"test/{key}", float(value))
        self.test_metrics = {f"test/{k}": float(v) for k, v in metrics.items()}
        if self.trainer is not None and self.trainer.is_global_zero:
            self.write(self.results, Path(self.hparams.output_dir or Path(self.trainer.default_root_dir)
                                          / "relevance_patching"))

    def summarise(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Dataset-level numbers over every pair, and effect grids over the patched ones."""
        ld_clean = torch.tensor([r["ld_clean"] for r in rows])
        ld_corrupt = torch.tensor([r["ld_corrupt"] for r in rows])
        patched_rows = [r for r in rows if r["grids"]]
        summary: dict[str, Any] = {
            "pairs": len(rows), "patched_pairs": len(patched_rows),
            "ld_clean": float(ld_clean.mean()), "ld_corrupt": float(ld_corrupt.mean()),
            "pd_clean": sum(r["pd_clean"] for r in rows) / len(rows),
            "pd_corrupt": sum(r["pd_corrupt"] for r in rows) / len(rows),
            "judged_correct": float(((ld_clean > 0).float().mean() + (ld_corrupt < 0).float().mean()) / 2),
            "pair_correct": float(((ld_clean > 0) & (ld_corrupt < 0)).float().mean()),
            "pair_ordered": float((ld_clean > ld_corrupt).float().mean()),
        }
        grids: dict[str, dict[str, torch.Tensor]] = {}
        if patched_rows:
            clean = torch.tensor([r["ld_clean"] for r in patched_rows])
            corrupt = torch.tensor([r["ld_corrupt"] for r in patched_rows])
            summary["patched_ld_clean"], summary["patched_ld_corrupt"] = float(clean.mean()), float(corrupt.mean())
            for exp in self.experiments:
                name = self.experiment_name(exp)
                patched = torch.stack([r["grids"][name] for r in patched_rows])
                grids[name] = {"ld_patched": patched, "ld_clean": clean, "ld_corrupt": corrupt,
                               **self.effects(patched, clean, corrupt)}
                if exp["site"] in ("resid_pre", "resid_post") and "all" in exp["groups"]:
                    # Spec property 1: the whole residual stream of any layer carries the clean run.
                    full = patched[..., exp["groups"].index("all")]
                    summary[f"{name}_identity_max_abs_err"] = float((full - clean[:, None]).abs().max())
        return {"summary": summary, "grids": grids, "groups": {self.experiment_name(e): list(e["groups"])
                                                                for e in self.experiments}}

    def top_effects(self, name: str, k: int | None = None) -> list[tuple[str, float]]:
        """The k largest effects of one experiment as ("L12 doc_all" or "L12H3 last", value)."""
        effect, groups = self.results["grids"][name]["effect"], self.results["groups"][name]
        flat = effect.flatten()
        order = flat.abs().argsort(descending=True)[: k or self.hparams.top_k]
        labels = []
        for i in order.tolist():
            index = list(torch.unravel_index(torch.tensor(i), effect.shape))
            if effect.dim() == 3:
                labels.append((f"L{int(index[0])}H{int(index[1])} {groups[int(index[2])]}", float(flat[i])))
            else:
                labels.append((f"L{int(index[0])} {groups[int(index[1])]}", float(flat[i])))
        return labels

    @staticmethod
    def write(results: dict[str, Any], folder: Path) -> None:
        """One safetensors file (all tensors) and one CSV of effects per experiment, plus summary.csv."""
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "summary.csv", "w", newline="") as f:
            csv.writer(f).writerows(sorted(results["summary"].items()))
        for name, tensors in results["grids"].items():
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / f"{name}.safetensors"))
            groups = results["groups"][name]
            effect = tensors["effect"]
            with open(folder / f"{name}.csv", "w", newline="") as f:
                writer = csv.writer(f)
                if effect.dim() == 3:
                    writer.writerow(["layer", "head", "group", "effect", "effect_per_sample", "indirect_effect"])
                    for (l, h, g), value in zip(torch.cartesian_prod(*(torch.arange(n) for n in effect.shape)).tolist(),
                                                effect.flatten().tolist()):
                        writer.writerow([l, h, groups[g], value, float(tensors["effect_per_sample"][l, h, g]),
                                         float(tensors["indirect_effect"][l, h, g])])
                else:
                    writer.writerow(["layer", "group", "effect", "effect_per_sample", "indirect_effect"])
                    for (l, g), value in zip(torch.cartesian_prod(*(torch.arange(n) for n in effect.shape)).tolist(),
                                             effect.flatten().tolist()):
                        writer.writerow([l, groups[g], value, float(tensors["effect_per_sample"][l, g]),
                                         float(tensors["indirect_effect"][l, g])])
