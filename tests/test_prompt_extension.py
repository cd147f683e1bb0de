"""Prompt extension at inference: template and local language model (a tiny random GPT-2 saved to a temp dir)."""

from __future__ import annotations

import pytest
import torch

from framework.data.prompt_extension import PromptExtension
from framework.data.prompts import Prompts, load_prompt_requests


def test_template_extension_rewrites_prompts_and_keeps_the_empty_caption():
    prompts = Prompts(captions=["a red square moving right.", ""],
                      extension=PromptExtension(template="A video of {caption}, filmed on a tripod."))
    requests = load_prompt_requests(prompts)
    assert [r.caption for r in requests] == ["A video of a red square moving right, filmed on a tripod.", ""]
    with pytest.raises(ValueError, match="caption"):
        PromptExtension(template="no placeholder")


def test_language_model_extension_is_greedy_and_local(tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install -e .[text])")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "square", "moving", "right", "slowly",
             "bright", "describe", "this", "video", "in", "one", "detailed", "sentence", ":", "description"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    tokenizer = transformers.BertTokenizer(str(tmp_path / "vocab.txt"))
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=len(words), n_positions=64, n_embd=16, n_layer=1, n_head=2,
                                     bos_token_id=2, eos_token_id=3, pad_token_id=0)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "lm")
    tokenizer.save_pretrained(tmp_path / "lm")
    extension = PromptExtension(model_dir=tmp_path / "lm", max_new_tokens=5)
    first = extension.extend(["a red square", ""])
    assert first[1] == ""  # the unconditional prompt is never extended
    assert first[0] and first[0] != "a red square" and len(first[0].split()) <= 5
    assert first[0].split()[0] in words  # words of the model's vocabulary
    assert extension.extend(["a red square"]) == first[:1]  # greedy: the same prompt always extends the same way
    with pytest.raises(FileNotFoundError, match="not a transformers model directory"):
        PromptExtension(model_dir=tmp_path / "missing")
