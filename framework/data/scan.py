"""``kinetoscope scan DIR -o manifest.csv``: probe a folder of videos and images into a manifest.

Each readable file becomes a row ``path, caption, frames, fps, width, height, duration_s`` (path relative to the
manifest's folder, so the pair can be moved together). The caption comes from, in this order:

1. a captions file (``--captions``): a CSV / JSONL with ``path`` and ``caption`` (or ``captions``, a list) columns,
   read like a manifest (relative paths resolve against its folder); a row with several captions also fills the
   manifest's ``captions`` column (a JSON list);
2. a sidecar text file next to the media file (``clip.mp4`` -> ``clip.txt``);
3. else it is empty, and the scan warns (an all-empty manifest trains a model that ignores its prompts).

Unreadable files are listed, with why, and left out; they do not stop the scan. With the metadata columns filled,
``ManifestVideoDataset`` does not open files up front.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from framework.data.manifest import empty_captions_message, read_manifest
from framework.data.video_io import IMAGE_SUFFIXES, VideoDecodeError, probe_video

MEDIA_SUFFIXES: tuple[str, ...] = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".gif", ".m4v") + IMAGE_SUFFIXES
COLUMNS = ("path", "caption", "frames", "fps", "width", "height", "duration_s")


@dataclass
class ScanResult:
    """What a scan wrote and what the user should hear about."""

    rows: int = 0
    failures: list[tuple[Path, str]] = field(default_factory=list)  # (unreadable file, why)
    empty_captions: int = 0
    unmatched_captions: list[Path] = field(default_factory=list)  # captions-file paths that name no scanned file
    warnings: list[str] = field(default_factory=list)


def find_media(folder: Path) -> list[Path]:
    """Media files under ``folder`` (recursively, sorted), by suffix."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in MEDIA_SUFFIXES)


def sidecar_caption(path: Path) -> str:
    sidecar = path.with_suffix(".txt")
    return sidecar.read_text(encoding="utf-8").strip() if sidecar.is_file() else ""


def read_captions_file(path: Path) -> dict[Path, tuple[str, ...]]:
    """A captions CSV / JSONL -> {resolved media path: captions}; errors name the file, line and column."""
    return {row.path: tuple(c.strip() for c in row.captions) for row in read_manifest(path)}


def scan(folder: Path, output: Path, progress: bool = True, captions: Path | None = None) -> ScanResult:
    """Probe every media file under ``folder`` and write ``output``; captions from ``captions`` (a CSV / JSONL),
    else sidecar ``.txt`` files."""
    if not folder.is_dir():
        raise NotADirectoryError(f"scan: {folder} is not a folder")
    given = read_captions_file(captions) if captions is not None else {}
    files = find_media(folder)
    result = ScanResult()
    rows, row_captions = [], []
    for path in tqdm(files, desc=f"scanning {folder}", unit="file", disable=not progress, file=sys.stderr):
        try:
            meta = probe_video(path)
        except VideoDecodeError as err:
            result.failures.append((path, err.reason))
            continue
        fps = float(meta["fps"])
        texts = given.get(path.resolve(), ())
        if not any(texts):
            texts = (sidecar_caption(path),)
        rows.append({
            "path": os.path.relpath(path.resolve(), output.resolve().parent),
            "caption": texts[0],
            "captions": json.dumps(list(texts)) if len(texts) > 1 else "",
            "frames": meta["frames"],
            "fps": f"{fps:.6g}" if fps else "",
            "width": meta["width"],
            "height": meta["height"],
            "duration_s": f"{meta['frames'] / fps:.4f}" if fps else "",
        })
        row_captions.append(texts)
    columns = list(COLUMNS)
    if any(row["captions"] for row in rows):
        columns.insert(2, "captions")
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    result.rows = len(rows)
    result.empty_captions = sum(1 for texts in row_captions if not any(texts))
    scanned = {p.resolve() for p in files}
    result.unmatched_captions = sorted(p for p in given if p not in scanned)
    if message := empty_captions_message(f"scan {output}", row_captions):
        result.warnings.append(message)
    if result.unmatched_captions:
        shown = ", ".join(str(p) for p in result.unmatched_captions[:5])
        more = len(result.unmatched_captions) - 5
        result.warnings.append(f"scan: {len(result.unmatched_captions)} rows of {captions} name no scanned file "
                               f"(under {folder}): {shown}" + (f" and {more} more" if more > 0 else ""))
    return result


def scan_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="kinetoscope scan",
        description="Probe a folder of videos and images (frames, fps, size, duration) into a CSV manifest; "
        "captions come from --captions, else sidecar .txt files (clip.mp4 -> clip.txt).",
    )
    parser.add_argument("folder", type=Path, help="folder to scan (recursively)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="manifest to write (.csv)")
    parser.add_argument("--captions", type=Path, default=None,
                        help="CSV / JSONL with 'path' and 'caption' (or 'captions') columns; relative paths "
                             "resolve against its folder; wins over sidecar .txt files")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.output.suffix.lower() != ".csv":
        parser.error(f"--output {args.output}: the manifest must be a .csv file")
    try:
        result = scan(args.folder, args.output, progress=not args.no_progress, captions=args.captions)
    except (NotADirectoryError, FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    print(f"wrote {result.rows} rows to {args.output}")
    if result.failures:
        print(f"{len(result.failures)} unreadable files left out:", file=sys.stderr)
        for path, reason in result.failures:
            print(f"  {path}: {reason}", file=sys.stderr)
    for message in result.warnings:
        print(f"warning: {message}", file=sys.stderr)
    return 0
