"""Backbone presets and the corpus-embedding cache."""
import pytest
import torch

from zoo.backbones import BackboneError, build_backbone, smollm2_path
from zoo.blocks.encoder import EmbeddingEncoder
from zoo.blocks.retrieval import encode_corpus


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_tiny_decoders_build_with_lm_head(name):
    model, tokenizer = build_backbone(name, causal_lm=True)
    batch = tokenizer(["hello there"], return_tensors="pt")
    assert model(**batch).logits.shape[-1] == len(tokenizer)


def test_unknown_backbone_is_a_clear_error():
    with pytest.raises(BackboneError, match="tiny-bert"):
        build_backbone("no-such-model")


def test_smollm2_converts_from_gguf_once_and_generates():
    pytest.importorskip("gguf", reason="the smollm2-135m preset needs the gguf package (demo extra)")
    try:
        path = smollm2_path()
    except BackboneError as err:
        pytest.skip(str(err))
    assert smollm2_path() == path                      # the second call reuses the cached conversion
    model, tokenizer = build_backbone("smollm2-135m", causal_lm=True)
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           tokenize=False, add_generation_prompt=True)
    batch = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**batch, max_new_tokens=8, do_sample=False)
    answer = tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


def test_corpus_embeddings_are_cached_by_model_and_corpus(tmp_path):
    torch.manual_seed(0)
    model, tokenizer = build_backbone("tiny-bert")
    encoder = EmbeddingEncoder(model, tokenizer)
    ids, texts = ["a", "b"], ["first text", "second text"]
    first = encode_corpus(encoder, ids, texts, progress=False)
    files = list(tmp_path.rglob("*.safetensors"))
    assert len(files) == 1
    encoder.encode = lambda *a, **k: pytest.fail("cache miss: the corpus was encoded again")
    torch.testing.assert_close(encode_corpus(encoder, ids, texts, progress=False), first)
    del encoder.encode
    with torch.no_grad():
        encoder.backbone.embeddings.word_embeddings.weight[5] += 1.0   # any weight change is a new key
    encode_corpus(encoder, ids, texts, progress=False)
    encode_corpus(encoder, ids, ["first text", "changed"], progress=False)
    assert len(list(tmp_path.rglob("*.safetensors"))) == 3
