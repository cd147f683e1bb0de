"""What ``predict`` generates: captions with a size and a seed, from the config or from a prompts file."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from torch.utils.data import Dataset


@dataclass
class Prompts:
    """Prompts for generation. ``file`` is a text file with one caption per line or a JSONL file whose rows hold a
    ``caption`` and optionally ``frames``, ``height``, ``width``, ``seed``, ``negative_prompt``; its rows come after
    ``captions``. ``negative_prompt`` applies to every prompt that does not set its own (classifier-free guidance
    steers away from it instead of from the empty caption)."""

    captions: list[str] = field(default_factory=list)
    file: Path | None = None
    frames: int = 8
    height: int = 16
    width: int = 16
    seed: int = 0
    samples_per_prompt: int = 1
    negative_prompt: str = ""


@dataclass
class PromptRequest:
    index: int
    caption: str
    frames: int
    height: int
    width: int
    seed: int
    negative_prompt: str = ""

    @property
    def name(self) -> str:
        slug = "".join(ch if ch.isalnum() else "_" for ch in self.caption.lower())[:48].strip("_") or "unconditional"
        return f"{self.index:03d}_{slug}_seed{self.seed}"


def load_prompt_requests(prompts: Prompts) -> list[PromptRequest]:
    rows: list[dict] = [{"caption": c} for c in prompts.captions]
    if prompts.file is not None:
        rows += _read_prompt_file(Path(prompts.file))
    if not rows:
        raise ValueError("no prompts to generate: set data.prompts.captions or data.prompts.file")
    if prompts.samples_per_prompt < 1:
        raise ValueError(f"prompts.samples_per_prompt must be >= 1, got {prompts.samples_per_prompt}")
    requests = []
    for row in rows:
        for k in range(prompts.samples_per_prompt):
            base_seed = int(row.get("seed", prompts.seed + len(requests)))
            requests.append(
                PromptRequest(
                    index=len(requests),
                    caption=str(row["caption"]),
                    frames=int(row.get("frames", prompts.frames)),
                    height=int(row.get("height", prompts.height)),
                    width=int(row.get("width", prompts.width)),
                    seed=base_seed + k if "seed" in row else base_seed,
                    negative_prompt=str(row.get("negative_prompt", prompts.negative_prompt)),
                )
            )
    for r in requests:
        for name in ("frames", "height", "width"):
            if getattr(r, name) < 1:
                raise ValueError(f"prompt {r.index} ({r.caption!r}): {name} must be >= 1, got {getattr(r, name)}")
    return requests


def _read_prompt_file(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} does not exist")
    rows = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict) or "caption" not in row:
                raise ValueError(f"{path}:{line_no}: each row needs a 'caption' field")
            rows.append(row)
        else:
            rows.append({"caption": line.strip()})
    return rows


class PromptDataset(Dataset):
    def __init__(self, requests: list[PromptRequest]) -> None:
        self.requests = requests

    def __len__(self) -> int:
        return len(self.requests)

    def __getitem__(self, i: int) -> PromptRequest:
        return self.requests[i]


def collate_prompts(requests: list[PromptRequest]) -> list[PromptRequest]:
    return list(requests)
