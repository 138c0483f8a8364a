"""Text encoders: the real offline MiniLM against sentence-transformers, and T5 / CLIP through their real
loading path with tiny random weights."""

import pytest
import torch

from ldmkit.conditioning.text_encoders import TextEncoder, minilm_path

CAPTIONS = ["a handwritten digit seven", "a handwritten digit zero, written thickly"]


@pytest.mark.slow
def test_minilm_matches_sentence_transformers():
    sentence_transformers = pytest.importorskip("sentence_transformers")
    enc = TextEncoder("minilm", max_length=32)
    out = enc(CAPTIONS)
    assert out.tokens.shape == (2, 32, 384)
    assert out.mask.shape == (2, 32)
    assert out.pooled.shape == (2, 384)
    assert out.mask[0].sum() < out.mask[1].sum()
    assert out.mask[:, 0].all()  # shorter caption, more padding
    reference = sentence_transformers.SentenceTransformer(str(minilm_path()), device="cpu").encode(
        CAPTIONS, convert_to_tensor=True
    )
    assert torch.allclose(out.pooled, reference, atol=1e-5)
    # semantically closer captions are closer
    more = enc(["a handwritten digit seven", "a handwritten number 7", "a photo of a red sports car"]).pooled
    assert (more[0] @ more[1]) > (more[0] @ more[2])


def _save_minilm_tokenizer(folder):
    import transformers

    transformers.AutoTokenizer.from_pretrained(str(minilm_path())).save_pretrained(folder)


def test_t5_encoder_path_with_tiny_random_weights(tmp_path):
    import transformers

    cfg = transformers.T5Config(vocab_size=30522, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    transformers.T5EncoderModel(cfg).save_pretrained(tmp_path / "t5")
    _save_minilm_tokenizer(tmp_path / "t5")  # a real tokenizer whose ids fit the tiny vocabulary
    out = TextEncoder("t5", tmp_path / "t5", max_length=16)(CAPTIONS)
    assert out.tokens.shape == (2, 16, 32)
    assert out.pooled.shape == (2, 32)
    m = out.mask[0].unsqueeze(-1).float()
    assert torch.allclose(out.pooled[0], (out.tokens[0] * m).sum(0) / m.sum(), atol=1e-6)


def test_clip_encoder_path_with_tiny_random_weights(tmp_path):
    import transformers

    cfg = transformers.CLIPTextConfig(
        vocab_size=30522,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=32,
        projection_dim=24,
        eos_token_id=102,
        pad_token_id=0,
    )
    transformers.CLIPTextModelWithProjection(cfg).save_pretrained(tmp_path / "clip")
    _save_minilm_tokenizer(tmp_path / "clip")
    out = TextEncoder("clip", tmp_path / "clip", max_length=16)(CAPTIONS)
    assert out.tokens.shape == (2, 16, 32)
    assert out.pooled.shape == (2, 24)


def test_text_encoder_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown text encoder"):
        TextEncoder("gpt")
    with pytest.raises(ValueError, match="cannot load the t5 text encoder"):
        TextEncoder("t5", tmp_path / "missing")
    with pytest.raises(TypeError, match="list of strings"):
        TextEncoder("minilm")("one caption")
