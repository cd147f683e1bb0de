"""Re-captioning: write descriptive captions for a manifest's clips with a captioner plugin (DALL-E 3 / Sora recipe).

Betker et al., "Improving Image Generation with Better Captions" (DALL-E 3, 2023) and OpenAI's Sora report train on
long descriptive captions written by a captioning model instead of the short alt-text that came with the data;
prompts are then expanded to the same style at inference. ``kinetoscope recaption`` runs a ``Captioner`` (e.g. a
local vision-language model directory, ``plugins/captioners/hf_vlm.py``) over ``--frames`` evenly spaced frames of
each clip and writes a new manifest whose rows keep every original column and gain:

* ``recaption``: the generated caption;
* ``captions``: ``[recaption, original caption(s)...]``, so training draws either (descriptive and short prompts).

It works in batches with a progress bar and is resumable: every finished row is appended (and flushed) to
``NEW_MANIFEST.partial.jsonl``; a rerun after an interruption skips the rows found there, and the complete manifest
is written atomically at the end (the partial file is then removed). A clip that cannot be decoded keeps its
original captions, is counted and reported, and does not stop the run.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from pathlib import Path

import av
import numpy as np
from PIL import Image
from tqdm import tqdm

from framework.core.interfaces import Captioner
from framework.data.video_io import VideoDecodeError, probe_video

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def sample_frames(path: Path, count: int) -> list[Image.Image]:
    """``count`` evenly spaced frames of a video (the image itself for a still), decoded without keeping the rest."""
    if path.suffix.lower() in IMAGE_SUFFIXES:
        with Image.open(path) as image:
            return [image.convert("RGB")]
    total = int(probe_video(path)["frames"])
    wanted = sorted({int(round(i)) for i in np.linspace(0, total - 1, count)}) if count > 1 else [total // 2]
    frames: list[Image.Image] = []
    with av.open(str(path)) as container:
        for index, frame in enumerate(container.decode(video=0)):
            if index in wanted:
                frames.append(frame.to_image())
            if index >= wanted[-1]:
                break
    if not frames:
        raise VideoDecodeError(path, "no decodable video frames")
    return frames


def tile(frames: list[Image.Image]) -> Image.Image:
    """Frames side by side in one image (single-image captioners see the clip's course at once)."""
    if len(frames) == 1:
        return frames[0]
    width, height = frames[0].size
    sheet = Image.new("RGB", (width * len(frames), height))
    for i, frame in enumerate(frames):
        sheet.paste(frame.resize((width, height)), (i * width, 0))
    return sheet


def _raw_rows(manifest: Path) -> list[dict]:
    """The manifest's rows as written (all columns), in file order."""
    if manifest.suffix.lower() == ".csv":
        with manifest.open(newline="", encoding="utf-8") as f:
            return [dict(row) for row in csv.DictReader(f)]
    return [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines() if line.strip()]


def _original_captions(row: dict) -> list[str]:
    captions = row.get("captions")
    if isinstance(captions, str) and captions.strip().startswith("["):
        captions = json.loads(captions)
    if isinstance(captions, list) and captions:
        return [str(c) for c in captions]
    if isinstance(captions, str) and captions:
        return [captions]
    return [str(row.get("caption") or "")]


def _write_manifest(rows: list[dict], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix.lower() == ".csv":
        columns = list(dict.fromkeys(k for row in rows for k in row))
        with tmp.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            for row in rows:
                writer.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in row.items()})
    else:
        tmp.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    tmp.replace(path)


def recaption(manifest: Path, output: Path, captioner: Captioner, frames: int = 3, batch_size: int = 8,
              progress: bool = True) -> dict[str, int]:
    """Write ``output``: ``manifest`` with descriptive captions added; resumes from ``output``'s partial file.
    Returns counts: rows, captioned (this run), resumed (done before), failed (undecodable, originals kept)."""
    from framework.data.manifest import read_manifest  # validates paths and columns, naming line and column

    if frames < 1 or batch_size < 1:
        raise ValueError(f"recaption: frames and batch_size must be >= 1, got {frames} and {batch_size}")
    parsed = read_manifest(manifest)
    raw = _raw_rows(manifest)
    if len(raw) != len(parsed):
        raise ValueError(f"recaption: {manifest} has {len(raw)} rows but {len(parsed)} parse")
    partial = output.with_name(output.name + ".partial.jsonl")
    done: dict[int, str | None] = {}
    if partial.is_file():
        for line in partial.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # the last line of an interrupted write
                continue
            done[int(record["row"])] = record["recaption"]
    resumed = len(done)
    todo = [i for i in range(len(raw)) if i not in done]
    counts = {"rows": len(raw), "captioned": 0, "resumed": resumed, "failed": 0}
    output.parent.mkdir(parents=True, exist_ok=True)
    with partial.open("a", encoding="utf-8") as sink, \
            tqdm(total=len(raw), initial=resumed, desc="recaption", unit="clip", disable=not progress) as bar:
        for start in range(0, len(todo), batch_size):
            batch, clips = [], []
            for i in todo[start: start + batch_size]:
                try:
                    clips.append([tile(sample_frames(parsed[i].path, frames))])
                    batch.append(i)
                except (VideoDecodeError, OSError, av.error.FFmpegError) as err:
                    log.warning("recaption: %s (manifest row %d) cannot be decoded, keeping its caption: %s",
                                parsed[i].path, i + 1, err)
                    done[i] = None
                    counts["failed"] += 1
                    sink.write(json.dumps({"row": i, "recaption": None}) + "\n")
                    bar.update(1)
            captions = captioner.caption(clips) if clips else []
            for i, text in zip(batch, captions):
                done[i] = text.strip()
                sink.write(json.dumps({"row": i, "recaption": done[i]}) + "\n")
            sink.flush()
            counts["captioned"] += len(batch)
            bar.update(len(batch))
    rows = []
    for i, row in enumerate(raw):
        row = dict(row)
        if done.get(i):
            row["recaption"] = done[i]
            row["captions"] = [done[i], *_original_captions(row)]
        rows.append(row)
    _write_manifest(rows, output)
    partial.unlink()
    return counts


def recaption_command(argv: list[str]) -> int:
    """``kinetoscope recaption MANIFEST -o NEW_MANIFEST --model-dir DIR``."""
    parser = argparse.ArgumentParser(prog="kinetoscope recaption", description=__doc__.split("\n\n")[0])
    parser.add_argument("manifest", type=Path)
    parser.add_argument("-o", "--output", type=Path, required=True, help="new manifest (.jsonl or .csv)")
    parser.add_argument("--model-dir", type=Path, required=True, help="local vision-language model directory")
    parser.add_argument("--captioner", default="hf_vlm", help="captioner plugin name (kinetoscope plugins)")
    parser.add_argument("--frames", type=int, default=3, help="evenly spaced frames per clip, tiled side by side")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=60)
    parser.add_argument("--prompt", default=None, help="text prefix for the captioner (e.g. 'a video of')")
    args = parser.parse_args(argv)
    from framework.core.registry import default_registry

    cls = default_registry().get("captioner", args.captioner)
    captioner = cls(model_dir=args.model_dir, max_new_tokens=args.max_new_tokens, prompt=args.prompt)
    counts = recaption(args.manifest, args.output, captioner, args.frames, args.batch_size)
    print(f"recaption: wrote {args.output}: {counts['rows']} rows, {counts['captioned']} captioned now, "
          f"{counts['resumed']} resumed, {counts['failed']} undecodable (original captions kept)", file=sys.stderr)
    return 0
