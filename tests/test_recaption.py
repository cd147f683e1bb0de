"""``kinetoscope recaption`` with a tiny randomly initialised BLIP saved to a temp dir: a complete new manifest, and
resuming after an interruption without redoing finished rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install -e .[text])")

from framework.data.recaption import recaption  # noqa: E402
from framework.cli.main import main  # noqa: E402
from framework.data.manifest import read_manifest  # noqa: E402
from framework.data.video_io import write_video  # noqa: E402
from plugins.captioners.hf_vlm import HFVisionCaptioner  # noqa: E402

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "blue", "square", "circle", "moving", "left",
         "right", "video", "of", "fast", "slow"]


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_blip")
    (folder / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    tokenizer = transformers.BertTokenizer(str(folder / "vocab.txt"), bos_token="[CLS]", eos_token="[SEP]")
    config = transformers.BlipConfig(
        text_config=dict(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=32, bos_token_id=2, eos_token_id=3,
                         pad_token_id=0, sep_token_id=3),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = transformers.BlipForConditionalGeneration(config)
    image_processor = transformers.BlipImageProcessorPil(size={"height": 32, "width": 32}) \
        if hasattr(transformers, "BlipImageProcessorPil") else transformers.BlipImageProcessor(size={"height": 32, "width": 32})
    processor = transformers.BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)
    model.save_pretrained(folder / "model")
    processor.save_pretrained(folder / "model")
    return folder / "model"


@pytest.fixture
def manifest(tmp_path) -> Path:
    rows = []
    for i in range(5):
        video = torch.rand(3, 6, 16, 16) * 2 - 1  # [3, T, H, W]
        write_video(tmp_path / f"clip{i}.mp4", video, fps=8)
        rows.append({"path": f"clip{i}.mp4", "caption": f"clip {i}"})
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    rows.append({"path": "broken.mp4", "caption": "broken"})
    path = tmp_path / "manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_recaption_writes_a_complete_manifest_and_resumes(tiny_blip, manifest, tmp_path, monkeypatch):
    reference = recaption(manifest, tmp_path / "reference.jsonl", HFVisionCaptioner(tiny_blip, max_new_tokens=6),
                          frames=2, batch_size=2, progress=False)
    assert reference == {"rows": 6, "captioned": 5, "resumed": 0, "failed": 1}
    expected = [json.loads(line) for line in (tmp_path / "reference.jsonl").read_text().splitlines()]

    # Interrupt after the first batch: its rows are kept in the partial file, the new manifest is not written yet.
    seen: list[int] = []
    real_caption = HFVisionCaptioner.caption

    def interrupted(self, clips):
        if seen:
            raise KeyboardInterrupt
        seen.append(len(clips))
        assert [clip[0].size for clip in clips] == [(32, 16)] * 2  # 2 frames of 16x16 tiled side by side
        return real_caption(self, clips)

    monkeypatch.setattr(HFVisionCaptioner, "caption", interrupted)
    output = tmp_path / "out" / "recaptioned.jsonl"
    with pytest.raises(KeyboardInterrupt):
        recaption(manifest, output, HFVisionCaptioner(tiny_blip, max_new_tokens=6), frames=2, batch_size=2,
                  progress=False)
    assert not output.exists() and seen == [2]

    # Resume through the CLI: only the unfinished rows are captioned.
    calls: list[int] = []
    monkeypatch.setattr(HFVisionCaptioner, "caption", lambda self, clips: calls.append(len(clips)) or
                        real_caption(self, clips))
    assert main(["recaption", str(manifest), "-o", str(output), "--model-dir", str(tiny_blip), "--frames", "2",
                 "--batch-size", "2", "--max-new-tokens", "6"]) == 0
    assert sum(calls) == 3  # rows 3-5 of 5 decodable clips; rows 1-2 were finished before the interruption
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert rows == expected  # identical to the uninterrupted run
    assert not output.with_name(output.name + ".partial.jsonl").exists()
    for row, original in zip(rows[:5], range(5)):
        assert row["recaption"] and row["captions"] == [row["recaption"], f"clip {original}"]
        assert row["caption"] == f"clip {original}"  # the original stays next to the new caption
    assert "recaption" not in rows[5] and rows[5]["caption"] == "broken"  # undecodable: original kept
    parsed = read_manifest(output)
    assert parsed[0].captions == (rows[0]["recaption"], "clip 0")
