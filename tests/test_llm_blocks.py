"""LLM blocks: label scoring, chat prompts and activation capture / patching on a tiny Llama."""
import pytest
import torch

from zoo.backbones import build_backbone
from zoo.blocks.llm import (
    ActivationHooks,
    Patch,
    ScoreCache,
    chat_prompt,
    label_logprobs,
)
from zoo.blocks.rl.rollout import left_pad


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    model, tok = build_backbone("tiny-llama-world", causal_lm=True, padding_side="left")
    return model.eval(), tok


@torch.no_grad()
def _manual(model, tok, prompt, label):
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    lab = tok(label, add_special_tokens=False)["input_ids"]
    full = torch.tensor([ids + lab])
    logp = torch.log_softmax(model(input_ids=full).logits.float(), -1)[0]
    return sum(float(logp[len(ids) - 1 + j, t]) for j, t in enumerate(lab))


def test_label_logprobs_match_a_manual_forward_for_single_and_multi_token_labels(lm):
    model, tok = lm
    prompts = ["Is City4 located in Country2 ?", "Question : Where was Entity3 born ? Answer :"]
    single = label_logprobs(model, tok, prompts, ["yes", "no"], batch_size=1)
    multi = label_logprobs(model, tok, prompts, ["City4 is", "no"], batch_size=2)
    for i, prompt in enumerate(prompts):
        assert single[i, 0].item() == pytest.approx(_manual(model, tok, prompt, "yes"), abs=1e-4)
        assert single[i, 1].item() == pytest.approx(_manual(model, tok, prompt, "no"), abs=1e-4)
        assert multi[i, 0].item() == pytest.approx(_manual(model, tok, prompt, "City4 is"), abs=1e-4)
    torch.testing.assert_close(multi[:, 1], single[:, 1], atol=1e-4, rtol=0)   # same label, both paths


def test_cache_returns_the_same_scores_without_recomputing(lm):
    model, tok = lm
    cache = ScoreCache()
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        first = label_logprobs(model, tok, ["a b", "c d"], ["yes", "no"], cache=cache)
        again = label_logprobs(model, tok, ["c d", "a b"], ["yes", "no"], cache=cache)
    finally:
        handle.remove()
    torch.testing.assert_close(again, first.flip(0))
    assert len(calls) == 1 and cache.hits == 2


def test_chat_prompt_without_a_template_is_plain_text(lm):
    _, tok = lm
    assert chat_prompt(tok, "Is it ?", system="Judge", assistant_prefix="Answer :") == "Judge\nIs it ?\nAnswer :"


def _pair(tok):
    clean = tok("Entity3 was born in City4 . Where was Entity3 born ?", add_special_tokens=False)["input_ids"]
    corrupt = tok("Entity3 was born in City9 . Where was Entity3 born ?", add_special_tokens=False)["input_ids"]
    return left_pad([clean, corrupt], tok.pad_token_id)


@pytest.mark.parametrize("site,layer", [("resid_pre", 0), ("resid_post", 1)])
def test_patching_the_whole_residual_stream_restores_the_clean_logits(lm, site, layer):
    model, tok = lm
    hooks = ActivationHooks(model)
    ids, mask = _pair(tok)
    clean_logits, cache = hooks.run(ids[:1], mask[:1], capture=[(site, layer)])
    corrupt_logits, _ = hooks.run(ids[1:], mask[1:])
    assert not torch.allclose(clean_logits, corrupt_logits)
    everywhere = torch.ones(1, ids.shape[1], dtype=torch.bool)
    patched, _ = hooks.run(ids[1:], mask[1:], patches=[Patch(site, layer, cache[(site, layer)], everywhere)])
    torch.testing.assert_close(patched, clean_logits, atol=1e-5, rtol=0)


def test_patches_are_per_row_and_only_where_masked(lm):
    model, tok = lm
    hooks = ActivationHooks(model)
    ids, mask = _pair(tok)
    _, cache = hooks.run(ids[:1], mask[:1], capture=[("z", 0), ("resid_post", 0)])
    z = cache[("z", 0)]
    assert z.shape == (1, ids.shape[1], hooks.heads, hooks.head_dim)
    batch_ids, batch_mask = ids[[1, 1]], mask[[1, 1]]
    head_mask = torch.zeros(2, ids.shape[1], hooks.heads, dtype=torch.bool)
    head_mask[0, :, 1] = True                          # row 0: head 1 everywhere; row 1: nothing
    patched, seen = hooks.run(batch_ids, batch_mask, capture=[("z", 0)],
                              patches=[Patch("z", 0, z.expand(2, -1, -1, -1), head_mask)])
    plain, _ = hooks.run(ids[1:], mask[1:])
    torch.testing.assert_close(patched[1:], plain)                      # the unpatched row is untouched
    assert not torch.allclose(patched[:1], plain)
    torch.testing.assert_close(seen[("z", 0)][0, :, 1], z[0, :, 1])     # head 1 now carries the clean values
    with pytest.raises(ValueError, match="unknown site"):
        hooks.run(ids, mask, capture=[("mlp_in", 0)])


def test_a_run_started_at_a_layer_from_its_cached_input_matches_the_full_run(lm):
    model, tok = lm
    hooks = ActivationHooks(model)
    ids, mask = _pair(tok)
    _, clean = hooks.run(ids[:1], mask[:1], capture=[("q", 1), ("mlp_out", 1)])
    corrupt_logits, corrupt = hooks.run(ids[1:], mask[1:], capture=[("resid_pre", 1)])
    assert clean[("q", 1)].shape == (1, ids.shape[1], hooks.heads, hooks.head_dim)
    where = torch.zeros(1, ids.shape[1], dtype=torch.bool)
    where[0, -3:] = True
    patch = [Patch("mlp_out", 1, clean[("mlp_out", 1)], where)]
    full, _ = hooks.run(ids[1:], mask[1:], patches=patch)
    started, _ = hooks.run(ids[1:], mask[1:], patches=patch, start_layer=1, start_resid=corrupt[("resid_pre", 1)])
    torch.testing.assert_close(started, full, atol=1e-5, rtol=0)
    assert not torch.allclose(full, corrupt_logits)
    assert len(hooks.layers) == len(model.model.layers)          # the layer list is restored
    with pytest.raises(ValueError, match="below start_layer"):
        hooks.run(ids[1:], mask[1:], capture=[("z", 0)], start_layer=1, start_resid=corrupt[("resid_pre", 1)])


def test_chat_prompt_spans_cover_exactly_their_segments(lm):
    from zoo.blocks.llm import chat_prompt_with_spans

    _, tok = lm
    ids, spans = chat_prompt_with_spans(tok, [(None, "Where was"), ("who", " Entity3"), (None, " born ?")],
                                        system="Judge")
    assert tok.decode(ids[slice(*spans["who"])]) == "Entity3"
    assert ids == tok(chat_prompt(tok, "Where was Entity3 born ?", system="Judge"), add_special_tokens=False)["input_ids"]
