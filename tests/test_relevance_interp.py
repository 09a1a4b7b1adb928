"""Relevance patching (arXiv 2504.07898): the spec's exact patching identities on a tiny random Llama,
prompt span bookkeeping, normalisation, the data module and an end-to-end test run."""
import csv

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from datamodules.relevance_pairs import RelevancePairsDataModule, synthetic_triples
from zoo.backbones import build_tiny_tokenizer
from zoo.blocks.llm import Patch
from zoo.relevance_interp.module import RelevancePatchingModule
from zoo.relevance_interp.patching import (
    ablation_patches,
    answer_token_ids,
    kv_head,
    mean_activations,
    normalised_effect,
    patch_sweep,
    per_sample_effect,
)
from zoo.relevance_interp.prompts import (
    LAYOUTS,
    PromptPair,
    build_pair,
    check_differs_only_in_documents,
    position_groups,
    segments,
)

ATOL = 1e-5
SITES = ("resid_pre", "resid_post", "attn_out", "mlp_out", "z", "q")


def _module(**kwargs):
    torch.manual_seed(0)
    return RelevancePatchingModule(**kwargs)


@pytest.fixture(scope="module")
def pointwise():
    return _module()


@pytest.fixture(scope="module")
def row():
    return synthetic_triples(1, seed=3)[0]


def _setup(module, row, layout="DQI"):
    module.hparams.layout = layout
    try:
        pair = module.prompt_pair(row)
    finally:
        module.hparams.layout = "DQI"
    L_ = len(module.hooks.layers)
    ids = {k: torch.tensor([getattr(pair, f"{k}_ids")]) for k in ("clean", "corrupt")}
    ones = torch.ones_like(ids["clean"])
    every = [(s, l) for s in SITES for l in range(L_)]
    clean_logits, clean = module.hooks.run(ids["clean"], ones, capture=every)
    corrupt_logits, corrupt = module.hooks.run(ids["corrupt"], ones, capture=every)
    return pair, ids, ones, clean_logits, clean, corrupt_logits, corrupt


def _ld(module, logits):
    return module.behaviour(logits)


@pytest.mark.parametrize("site", ["resid_pre", "resid_post"])
@pytest.mark.parametrize("skip", [True, False])
def test_patching_the_whole_residual_stream_of_any_layer_restores_the_clean_ld(pointwise, row, site, skip):
    """Property 1, through the batched sweep (with and without starting at the patched layer)."""
    pair, ids, _, clean_logits, clean, corrupt_logits, corrupt = _setup(pointwise, row)
    ld_clean, ld_corrupt = _ld(pointwise, clean_logits), _ld(pointwise, corrupt_logits)
    assert (ld_clean - ld_corrupt).abs() > 1e-3
    layers = range(len(pointwise.hooks.layers))
    grid = patch_sweep(pointwise.hooks, ids["corrupt"], site, [clean[(site, l)] for l in layers],
                       [corrupt[("resid_pre", l)] for l in layers] if skip else None,
                       position_groups(pair, ["all", "doc_all"]), pointwise.answer_ids, batch_size=4)
    torch.testing.assert_close(grid[:, 0], ld_clean.expand(len(layers)), atol=ATOL, rtol=0)
    effect = normalised_effect(grid[None], ld_clean, ld_corrupt)
    torch.testing.assert_close(effect[:, 0], torch.ones(len(layers)), atol=1e-3, rtol=0)


def test_last_layer_residual_at_the_last_position_gives_the_clean_logits(pointwise, row):
    """Property 2."""
    pair, ids, ones, clean_logits, clean, _, _ = _setup(pointwise, row)
    top = len(pointwise.hooks.layers) - 1
    last = position_groups(pair, ["last"])
    patched, _ = pointwise.hooks.run(ids["corrupt"], ones, patches=[Patch("resid_post", top, clean[("resid_post", top)], last)])
    torch.testing.assert_close(patched[:, -1], clean_logits[:, -1], atol=ATOL, rtol=0)


def test_every_attention_and_mlp_output_at_the_last_position_restores_the_clean_ld(pointwise, row):
    """Property 3: same last token + same sum of component outputs = same final residual there."""
    pair, ids, ones, clean_logits, clean, _, _ = _setup(pointwise, row)
    last = position_groups(pair, ["last"])
    patches = [Patch(s, l, clean[(s, l)], last) for s in ("attn_out", "mlp_out") for l in range(len(pointwise.hooks.layers))]
    patched, _ = pointwise.hooks.run(ids["corrupt"], ones, patches=patches)
    torch.testing.assert_close(_ld(pointwise, patched), _ld(pointwise, clean_logits), atol=ATOL, rtol=0)
    dropped, _ = pointwise.hooks.run(ids["corrupt"], ones, patches=patches[1:])   # one output missing: not exact
    assert (_ld(pointwise, dropped) - _ld(pointwise, clean_logits)).abs() > 1e-6


def test_patching_positions_before_the_first_differing_token_changes_nothing(pointwise, row):
    """Property 4: in QDI prompts the query precedes the document, so its activations are shared."""
    pair, ids, ones, _, clean, corrupt_logits, _ = _setup(pointwise, row, layout="QDI")
    assert pair.spans["query"][1] <= pair.spans["doc"][0]
    query = position_groups(pair, ["query_all"])
    for site in SITES:
        patches = [Patch(site, l, clean[(site, l)], query) for l in range(len(pointwise.hooks.layers))]
        patched, _ = pointwise.hooks.run(ids["corrupt"], ones, patches=patches)
        torch.testing.assert_close(patched, corrupt_logits, atol=0, rtol=0)


def test_identity_patches_give_the_run_they_came_from(pointwise, row):
    """Property 5: corrupted into corrupted gives LD_corr; a pair with clean == corrupted has zero effect."""
    pair, ids, ones, _, _, corrupt_logits, corrupt = _setup(pointwise, row)
    every = torch.ones(1, pair.length, dtype=torch.bool)
    for site in SITES:
        same, _ = pointwise.hooks.run(ids["corrupt"], ones, patches=[Patch(site, 1, corrupt[(site, 1)], every)])
        torch.testing.assert_close(same, corrupt_logits, atol=ATOL, rtol=0)
    twin = pointwise.analyse({**row, "negative": row["positive"]})
    for grid in twin["grids"].values():
        torch.testing.assert_close(grid, torch.full_like(grid, twin["ld_clean"]), atol=ATOL, rtol=0)
        ld = torch.tensor([twin["ld_clean"]])
        assert normalised_effect(grid[None], ld, ld).abs().max() == 0            # guard: 0, not NaN


def test_embedding_patch_over_the_document_is_the_input_swap(pointwise, row):
    """Property 6."""
    pair, ids, ones, clean_logits, clean, _, _ = _setup(pointwise, row)
    patched, _ = pointwise.hooks.run(ids["corrupt"], ones,
                                     patches=[Patch("resid_pre", 0, clean[("resid_pre", 0)], position_groups(pair, ["doc_all"]))])
    torch.testing.assert_close(patched, clean_logits, atol=ATOL, rtol=0)


def test_all_heads_of_a_layer_equal_its_attention_output(pointwise, row):
    """Property 7: z of every head at P == attn_out at P."""
    pair, ids, ones, _, clean, _, _ = _setup(pointwise, row)
    heads = pointwise.hooks.heads
    for group in ("doc_all", "last", "inst_all"):
        where = position_groups(pair, [group])
        via_z, _ = pointwise.hooks.run(ids["corrupt"], ones,
                                       patches=[Patch("z", 1, clean[("z", 1)], where[..., None].expand(1, -1, heads))])
        via_attn, _ = pointwise.hooks.run(ids["corrupt"], ones, patches=[Patch("attn_out", 1, clean[("attn_out", 1)], where)])
        torch.testing.assert_close(via_z, via_attn, atol=ATOL, rtol=0)


@pytest.mark.parametrize("site", ["mlp_out", "z"])
def test_batched_rows_match_single_unbatched_patches(pointwise, row, site):
    """Property 8: chunked, row-indexed, layer-skipping sweeps == one plain forward per patch."""
    pair, ids, ones, _, clean, _, corrupt = _setup(pointwise, row)
    layers = range(len(pointwise.hooks.layers))
    groups = position_groups(pair, ["last", "doc_all", "inst_all"])
    batched = patch_sweep(pointwise.hooks, ids["corrupt"], site, [clean[(site, l)] for l in layers],
                          [corrupt[("resid_pre", l)] for l in layers], groups, pointwise.answer_ids, batch_size=5)
    single = patch_sweep(pointwise.hooks, ids["corrupt"], site, [clean[(site, l)] for l in layers], None, groups,
                         pointwise.answer_ids, batch_size=1)
    torch.testing.assert_close(batched, single, atol=ATOL, rtol=0)
    if site == "z":
        layer, head, g = 2, 1, 1
        mask = torch.zeros(1, pair.length, pointwise.hooks.heads, dtype=torch.bool)
        mask[0, :, head] = groups[g]
        alone, _ = pointwise.hooks.run(ids["corrupt"], ones, patches=[Patch("z", layer, clean[("z", layer)], mask)])
        assert batched[layer, head, g] == pytest.approx(float(_ld(pointwise, alone)), abs=ATOL)
    assert batched.abs().sum() > 0


@pytest.mark.parametrize("tokenizer", ["word", "wordpiece"])
@pytest.mark.parametrize("fmt", ["pointwise", "pairwise"])
def test_spans_decode_to_their_texts_and_prompts_differ_only_in_documents(pointwise, tokenizer, fmt):
    """Property 9, with the word tokenizer and a sub-word one; documents of unequal length are cut."""
    tok = pointwise.tokenizer if tokenizer == "word" else build_tiny_tokenizer()
    if tokenizer == "wordpiece":
        tok.chat_template = pointwise.tokenizer.chat_template
    rows = synthetic_triples(3, seed=5)
    for r in rows:
        r["negative"] = r["negative"] + " w1 w2 w3"      # longer negative: cut to the positive's length
        for layout in LAYOUTS[fmt]:
            pair = build_pair(tok, fmt, layout, r["query"], r["positive"], r["negative"])
            assert len(pair.clean_ids) == len(pair.corrupt_ids)
            def decode(ids, name, pair=pair):
                return tok.decode(ids[slice(*pair.spans[name])]).strip().lower()
            assert decode(pair.clean_ids, "query") == r["query"].lower()
            doc = "doc" if fmt == "pointwise" else "doc_a"
            assert decode(pair.clean_ids, doc) == r["positive"].lower()
            cut = decode(pair.corrupt_ids, doc)
            assert r["negative"].lower().startswith(cut) and len(cut) < len(r["negative"])
            if tokenizer == "word":
                assert cut == " ".join(r["negative"].split()[:12]).lower()
            assert "answer" in decode(pair.clean_ids, "inst") or "relevant" in decode(pair.clean_ids, "inst")
            differ = torch.tensor(pair.clean_ids) != torch.tensor(pair.corrupt_ids)
            inside = position_groups(pair, ["doc_all"])[0]
            assert differ.any() and not (differ & ~inside).any()
            if fmt == "pairwise":       # swapping the documents swaps clean and corrupted
                swapped = build_pair(tok, fmt, layout, r["query"], r["negative"], r["positive"])
                assert swapped.clean_ids == pair.corrupt_ids and swapped.corrupt_ids == pair.clean_ids
    broken = PromptPair([5, 6, 7, 8], [5, 9, 7, 8], {"query": (0, 1), "doc": (2, 3), "inst": (3, 4)})
    with pytest.raises(AssertionError, match="outside the documents"):
        check_differs_only_in_documents(broken)


def test_position_groups_partition_the_prompt(pointwise, row):
    pair = pointwise.prompt_pair(row)
    g = position_groups(pair, ["query_all", "doc_all", "inst_all", "other", "last", "doc_first", "doc_last", "qd_all"])
    assert int(g[:4].sum(0).max()) == 1 and bool(g[:4].sum(0).all())      # the four span groups partition
    assert g[4, -1] and g[3, -1]                                            # the answer slot lies in "other"
    assert g[5].nonzero().item() == pair.spans["doc"][0] and g[6].nonzero().item() == pair.spans["doc"][1] - 1
    assert torch.equal(g[7], g[0] | g[1])
    with pytest.raises(ValueError, match="unknown position group"):
        position_groups(pair, ["doc_middle"])
    with pytest.raises(ValueError, match="layout"):
        segments("pairwise", "QDI", "q", ["a", "b"])


def test_normalisation_guards_and_shift_invariance():
    """Property 10."""
    patched, clean, corrupt = torch.tensor([[1.0, 2.0], [3.0, 0.5]]), torch.tensor([2.0, 4.0]), torch.tensor([1.0, -1.0])
    effect = normalised_effect(patched, clean, corrupt)
    torch.testing.assert_close(normalised_effect(patched + 7, clean + 7, corrupt + 7), effect)
    torch.testing.assert_close(per_sample_effect(patched + 7, clean + 7, corrupt + 7), per_sample_effect(patched, clean, corrupt))
    torch.testing.assert_close(effect, ((patched - 0.0) / 3.0).mean(0))
    same = torch.tensor([1.0, 2.0])
    assert torch.equal(normalised_effect(patched, same, same.flip(0)), torch.zeros(2))
    assert not per_sample_effect(patched, same, same).isnan().any()


def test_gqa_query_head_maps_to_its_kv_head():
    """Property 11."""
    assert kv_head(13, 32, 8) == 3 and kv_head(8, 9, 3) == 2 and kv_head(3, 4, 2) == 1


def test_mean_ablation_over_a_single_sample_leaves_it_unchanged(pointwise, row):
    """Property 12; over two different samples it does change them."""
    pair = pointwise.prompt_pair(row)
    hooks = pointwise.hooks
    sites = [("z", l) for l in range(len(hooks.layers))]
    one = torch.tensor([pair.clean_ids])
    plain, _ = hooks.run(one, torch.ones_like(one))
    ablated, _ = hooks.run(one, torch.ones_like(one), patches=ablation_patches(mean_activations(hooks, one, sites), 1))
    torch.testing.assert_close(ablated, plain, atol=ATOL, rtol=0)
    two = torch.tensor([pair.clean_ids, pair.corrupt_ids])
    mixed, _ = hooks.run(one, torch.ones_like(one), patches=ablation_patches(mean_activations(hooks, two, sites), 1))
    assert not torch.allclose(mixed, plain, atol=1e-4)
    keep = {("z", l): torch.ones(pair.length, hooks.heads, dtype=torch.bool) for l in range(len(hooks.layers))}
    kept, _ = hooks.run(one, torch.ones_like(one), patches=ablation_patches(mean_activations(hooks, two, sites), 1, keep))
    torch.testing.assert_close(kept, plain, atol=ATOL, rtol=0)     # a circuit of every head is the full model


def test_answer_tokens_must_be_single_known_tokens(pointwise):
    assert len(answer_token_ids(pointwise.tokenizer, ["yes", "no"])) == 2
    with pytest.raises(ValueError, match="not one known token"):
        answer_token_ids(pointwise.tokenizer, ["yes no"])
    with pytest.raises(ValueError, match="not one known token"):
        answer_token_ids(pointwise.tokenizer, ["maybe"])


def test_synthetic_triples_follow_the_spec():
    rows = synthetic_triples(16, seed=0)
    assert len(rows) == 16
    for r in rows:
        query, pos, neg = r["query"].split(), r["positive"].split(), r["negative"].split()
        assert len(query) == 3 and len(pos) == len(neg) == 12
        assert set(query) <= set(pos) and not set(query) & set(neg)


def test_dl19_pairs_are_a_relevant_passage_and_a_judged_hard_negative(shared_data, pointwise):
    from datamodules.readers import read_trec_qrels

    folder = shared_data / "trec-dl-passage-bm25-top100"
    dm = RelevancePairsDataModule(source="file", path=str(folder / "bm25_dl19_top100.jsonl"),
                                  qrels=str(folder / "qrels_dl19.txt"))
    dm.setup()
    qrels = read_trec_qrels(folder / "qrels_dl19.txt")
    assert len(dm.rows) >= 30 and len({r["qid"] for r in dm.rows}) == len(dm.rows)
    tok = build_tiny_tokenizer()
    tok.chat_template = pointwise.tokenizer.chat_template
    for r in dm.rows:
        assert qrels[r["qid"]][r["positive_id"]] >= 2 and qrels[r["qid"]][r["negative_id"]] == 0
    for r in dm.rows[:5]:
        pair = build_pair(tok, "pointwise", "DQI", r["query"], r["positive"], r["negative"], max_doc_tokens=40)
        assert pair.spans["doc"][1] - pair.spans["doc"][0] <= 40
    with pytest.raises(ValueError, match="data.path"):
        RelevancePairsDataModule(source="file")


@pytest.mark.parametrize("fmt", ["pointwise", "pairwise"])
def test_a_test_run_writes_grids_and_the_identity_check(tmp_path, fmt):
    module = _module(format=fmt, output_dir=str(tmp_path / fmt), patch_batch_size=16)
    data = RelevancePairsDataModule(synthetic={"num_triples": 3})
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.test(module, datamodule=data, verbose=False)
    summary, grids = module.results["summary"], module.results["grids"]
    assert summary["pairs"] == summary["patched_pairs"] == 3
    assert summary["resid_post_layer_identity_max_abs_err"] < ATOL
    assert grids["mlp_out_layer"]["effect"].shape == (3, 5) and grids["z_head"]["effect"].shape == (3, 4, 1)
    torch.testing.assert_close(grids["resid_post_layer"]["effect"][:, 0], torch.ones(3), atol=1e-3, rtol=0)
    saved = load_file(str(tmp_path / fmt / "z_head.safetensors"))
    assert saved["ld_patched"].shape == (3, 3, 4, 1)
    with open(tmp_path / fmt / "mlp_out_layer.csv") as f:
        assert len(list(csv.DictReader(f))) == 15
    assert "test/ld_clean" in module.test_metrics and len(module.top_effects("z_head", 3)) == 3


def test_filters_and_config_errors():
    strict = _module(filter="strict", max_patched_pairs=1)
    assert strict.keep(1.0, -1.0) and not strict.keep(2.0, 1.0)
    assert _module(filter="ordered").keep(2.0, 1.0)
    with pytest.raises(ValueError, match="model.format"):
        _module(format="listwise")
    with pytest.raises(ValueError, match="experiments"):
        _module(experiments=[{"site": "z", "groups": ["middle"]}])
