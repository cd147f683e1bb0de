"""``kinetoscope scan DIR -o manifest.csv``: probe a folder of videos and images into a manifest.

Each readable file becomes a row ``path, caption, frames, fps, width, height, duration_s`` (path relative to the
manifest's folder, so the pair can be moved together); the caption comes from a sidecar text file next to the media
file (``clip.mp4`` -> ``clip.txt``), else it is empty. Unreadable files are listed, with why, and left out; they
do not stop the scan. With the metadata columns filled, ``ManifestVideoDataset`` does not open files up front.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

from tqdm import tqdm

from framework.data.video_io import IMAGE_SUFFIXES, VideoDecodeError, probe_video

MEDIA_SUFFIXES: tuple[str, ...] = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".gif", ".m4v") + IMAGE_SUFFIXES
COLUMNS = ("path", "caption", "frames", "fps", "width", "height", "duration_s")


def find_media(folder: Path) -> list[Path]:
    """Media files under ``folder`` (recursively, sorted), by suffix."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in MEDIA_SUFFIXES)


def sidecar_caption(path: Path) -> str:
    sidecar = path.with_suffix(".txt")
    return sidecar.read_text(encoding="utf-8").strip() if sidecar.is_file() else ""


def scan(folder: Path, output: Path, progress: bool = True) -> tuple[int, list[tuple[Path, str]]]:
    """Probe every media file under ``folder`` and write ``output`` -> (rows written, [(unreadable path, reason)])."""
    if not folder.is_dir():
        raise NotADirectoryError(f"scan: {folder} is not a folder")
    files = find_media(folder)
    failures: list[tuple[Path, str]] = []
    rows = []
    for path in tqdm(files, desc=f"scanning {folder}", unit="file", disable=not progress, file=sys.stderr):
        try:
            meta = probe_video(path)
        except VideoDecodeError as err:
            failures.append((path, err.reason))
            continue
        fps = float(meta["fps"])
        rows.append({
            "path": os.path.relpath(path.resolve(), output.resolve().parent),
            "caption": sidecar_caption(path),
            "frames": meta["frames"],
            "fps": f"{fps:.6g}" if fps else "",
            "width": meta["width"],
            "height": meta["height"],
            "duration_s": f"{meta['frames'] / fps:.4f}" if fps else "",
        })
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return len(rows), failures


def scan_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="kinetoscope scan",
        description="Probe a folder of videos and images (frames, fps, size, duration) into a CSV manifest; "
        "captions come from sidecar .txt files when present.",
    )
    parser.add_argument("folder", type=Path, help="folder to scan (recursively)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="manifest to write (.csv)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.output.suffix.lower() != ".csv":
        parser.error(f"--output {args.output}: the manifest must be a .csv file")
    try:
        written, failures = scan(args.folder, args.output, progress=not args.no_progress)
    except NotADirectoryError as err:
        parser.error(str(err))
    print(f"wrote {written} rows to {args.output}")
    if failures:
        print(f"{len(failures)} unreadable files left out:", file=sys.stderr)
        for path, reason in failures:
            print(f"  {path}: {reason}", file=sys.stderr)
    return 0
