"""What ``predict`` generates: captions with a size and a seed, from the config or from a prompts file.

A JSONL prompts file can also ask for a generation task other than text-to-video (see ``GenerationTask`` and
docs/conditioning.md): each row may give ``task``, ``image``, ``video``, ``video_end``, ``context_frames``,
``strength`` and ``guidance``, and the micro-conditions ``fps``, ``original_height`` and ``original_width``
(``framework/core/micro_conditions.py``). A row whose fields are wrong (an unknown task, a strength outside [0, 1], a
missing path, an fps that is not a number > 0) becomes a request carrying an ``error`` that names the row and the
field; the other rows still run.
"""

from __future__ import annotations

import enum
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from torch.utils.data import Dataset

from framework.core.errors import UsageError
from framework.data.prompt_extension import PromptExtension


@dataclass
class Prompts:
    """Prompts for generation. ``file`` is a text file with one caption per line or a JSONL file whose rows hold a
    ``caption`` and optionally ``frames``, ``height``, ``width``, ``seed``, ``negative_prompt``; when it is given, its
    rows replace ``captions`` (so a config's example captions do not run alongside a prompts file). ``negative_prompt`` applies to every prompt that does not set its own (classifier-free guidance
    steers away from it instead of from the empty caption).

    ``fps``, ``original_height`` and ``original_width`` are the micro-conditions of every prompt that does not set its
    own: the frame rate the clip is asked for (default: the model's ``output_fps``; it is also the written file's
    rate) and the "original" size (default: the requested size). They matter for a denoiser configured with
    ``micro_conditions``."""

    captions: list[str] = field(default_factory=list)
    file: Path | None = None
    frames: int = 8
    height: int = 16
    width: int = 16
    seed: int = 0
    samples_per_prompt: int = 1
    negative_prompt: str = ""
    extension: PromptExtension | None = None  # rewrite short prompts into descriptive captions before generating
    fps: float | None = None
    original_height: int | None = None
    original_width: int | None = None

    def __post_init__(self) -> None:
        for name in ("fps", "original_height", "original_width"):
            value = getattr(self, name)
            if value is not None:
                _positive_number(value, integer=name != "fps", what=f"prompts.{name}")


class GenerationTask(str, enum.Enum):
    """What a prompt asks for; every task but text-to-video is conditioned on given frames or a given video."""

    TEXT_TO_VIDEO = "text_to_video"
    IMAGE_TO_VIDEO = "image_to_video"  # ``image`` becomes the first frame
    EXTEND_FORWARD = "extend_forward"  # the last ``context_frames`` of ``video`` start the output
    EXTEND_BACKWARD = "extend_backward"  # the first ``context_frames`` of ``video`` end the output
    INTERPOLATE = "interpolate"  # the end of ``video`` starts the output, the start of ``video_end`` ends it
    SDEDIT = "sdedit"  # ``video`` noised to ``strength`` and denoised under the caption (Meng et al. 2022)


# The path fields each task needs.
TASK_INPUTS: dict[GenerationTask, tuple[str, ...]] = {
    GenerationTask.TEXT_TO_VIDEO: (),
    GenerationTask.IMAGE_TO_VIDEO: ("image",),
    GenerationTask.EXTEND_FORWARD: ("video",),
    GenerationTask.EXTEND_BACKWARD: ("video",),
    GenerationTask.INTERPOLATE: ("video", "video_end"),
    GenerationTask.SDEDIT: ("video",),
}


@dataclass
class PromptRequest:
    index: int
    caption: str
    frames: int
    height: int
    width: int
    seed: int
    negative_prompt: str = ""
    task: GenerationTask = GenerationTask.TEXT_TO_VIDEO
    image: Path | None = None
    video: Path | None = None
    video_end: Path | None = None
    context_frames: int = 1  # frames taken from each given video (extension, interpolation)
    strength: float = 0.6  # SDEdit: the noise level the given video starts from, in [0, 1]
    guidance: float | None = None  # overrides the model's guidance scale for this prompt
    fps: float | None = None  # micro-condition and output frame rate; None: the model's output_fps
    original_height: int | None = None  # size micro-condition; None: the requested height
    original_width: int | None = None  # size micro-condition; None: the requested width
    source: str = ""  # where the prompt came from (``file:line`` or ``captions[i]``), for error messages
    error: str | None = None  # set for a row that cannot run; it is reported instead of generated

    @property
    def original_size(self) -> tuple[int, int]:
        """(height, width) the size micro-condition asks for."""
        return (self.original_height or self.height, self.original_width or self.width)

    @property
    def name(self) -> str:
        slug = "".join(ch if ch.isalnum() else "_" for ch in self.caption.lower())[:48].strip("_") or "unconditional"
        return f"{self.index:03d}_{slug}_seed{self.seed}"


def load_prompt_requests(prompts: Prompts) -> list[PromptRequest]:
    if prompts.file is not None:  # the file replaces the config's captions
        rows = _read_prompt_file(Path(prompts.file))
    else:
        rows = [{"caption": c, "_source": f"captions[{i}]"} for i, c in enumerate(prompts.captions)]
    if not rows:
        raise UsageError("no prompts to generate: set data.init_args.prompts.captions or data.init_args.prompts.file")
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
                    source=str(row.get("_source", "")),
                )
            )
            _apply_task_fields(requests[-1], row, base_dir=Path(prompts.file).parent if prompts.file else Path("."))
            _apply_micro_condition_fields(requests[-1], row, prompts)
    if prompts.extension is not None:
        for r, caption in zip(requests, prompts.extension.extend([r.caption for r in requests])):
            r.caption = caption
    for r in requests:
        for name in ("frames", "height", "width"):
            if getattr(r, name) < 1:
                raise ValueError(f"prompt {r.index} ({r.caption!r}): {name} must be >= 1, got {getattr(r, name)}")
    return requests


def _apply_task_fields(request: PromptRequest, row: dict, base_dir: Path) -> None:
    """Fill the task fields of ``request`` from ``row``; a bad field sets ``request.error`` naming row and field.
    Relative paths are relative to the prompts file's folder."""
    where = f"prompt row {request.source or request.index}"
    try:
        task = row.get("task", GenerationTask.TEXT_TO_VIDEO.value)
        try:
            request.task = GenerationTask(task)
        except ValueError:
            raise ValueError(f"field 'task': unknown task {task!r}; valid: {[t.value for t in GenerationTask]}") from None
        for name in ("image", "video", "video_end"):
            if row.get(name) is not None:
                path = Path(str(row[name])).expanduser()
                setattr(request, name, path if path.is_absolute() else base_dir / path)
        for name in TASK_INPUTS[request.task]:
            if getattr(request, name) is None:
                raise ValueError(f"field {name!r}: task {request.task.value} needs {name!r}")
            if not getattr(request, name).is_file():
                raise ValueError(f"field {name!r}: {getattr(request, name)} does not exist")
        if "strength" in row:
            request.strength = float(row["strength"])
        if not 0.0 <= request.strength <= 1.0:
            raise ValueError(f"field 'strength': must be in [0, 1], got {request.strength}")
        if "context_frames" in row:
            request.context_frames = int(row["context_frames"])
        if request.context_frames < 1:
            raise ValueError(f"field 'context_frames': must be >= 1, got {request.context_frames}")
        if row.get("guidance") is not None:
            request.guidance = float(row["guidance"])
    except (TypeError, ValueError) as err:
        request.error = f"{where}: {err}"


def _positive_number(value: object, integer: bool, what: str) -> float:
    """``value`` as a finite number > 0 (a whole one if ``integer``); else ValueError naming ``what``."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number) or number <= 0 or (integer and number != int(number)):
        kind = "a whole number" if integer else "a number"
        raise ValueError(f"{what}: must be {kind} > 0, got {value!r}")
    return number


def _apply_micro_condition_fields(request: PromptRequest, row: dict, prompts: Prompts) -> None:
    """Fill ``fps``, ``original_height`` and ``original_width`` from ``row`` (else from ``prompts``); a bad row
    value sets ``request.error`` naming the row and the field."""
    if request.error is not None:
        return
    try:
        for name in ("fps", "original_height", "original_width"):
            value = row[name] if row.get(name) is not None else getattr(prompts, name)
            if value is not None:
                number = _positive_number(value, integer=name != "fps", what=f"field {name!r}")
                setattr(request, name, number if name == "fps" else int(number))
    except ValueError as err:
        request.error = f"prompt row {request.source or request.index}: {err}"


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
            rows.append({**row, "_source": f"{path.name}:{line_no}"})
        else:
            rows.append({"caption": line.strip(), "_source": f"{path.name}:{line_no}"})
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
