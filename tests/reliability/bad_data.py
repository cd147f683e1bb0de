"""Bad manifest rows and files for the fuzz test (tests/test_reliability_fuzz.py) and benchmarks/reliability.py.

Each fault writes one manifest row (and usually one file) that must be skipped and reported -- under the file's
resolved path, or as ``<manifest>, line N`` when the row has no usable path -- while every good row stays usable.
"""

from __future__ import annotations

import json
import shutil
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import torch

from framework.data.video_io import write_frame_grid, write_video

NON_UTF8_MARK = "@@NOT-UTF8@@"  # replaced by the bytes ff fe after the manifest is encoded

# file faults: the row is fine, the file is not
FILE_FAULTS = ("corrupt_bytes", "truncated_mp4", "truncated_mp4_with_metadata", "zero_frame_video", "mp4_named_png",
               "text_named_mp4", "huge_png_header", "missing_file", "directory", "empty_file")
# row faults: the file is fine, the row is not
ROW_FAULTS = ("non_utf8_caption", "missing_path", "missing_caption", "not_a_number", "invalid_json")


@dataclass
class Fault:
    kind: str
    payload: bytes = b""  # random bytes (corrupt_bytes)
    fraction: float = 0.5  # where a truncated file is cut
    size: tuple[int, int] = (40000, 40000)  # huge_png_header: width, height claimed by the header
    value: str = "fast"  # not_a_number: the cell's text
    column: str = "fps"  # not_a_number: which column


def write_good_media(folder: Path) -> dict[str, Path]:
    """Two 12-frame 32x32 MP4s at 8 fps, one 32x32 PNG and one zero-frame AVI (a template)."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    files = {}
    for i in range(2):
        files[f"good{i}.mp4"] = write_video(folder / f"good{i}.mp4", torch.rand(3, 12, 32, 32, generator=g) * 2 - 1,
                                            fps=8)
    files["good0.png"] = write_frame_grid(folder / "good0.png", torch.rand(3, 1, 32, 32, generator=g) * 2 - 1)
    with av.open(str(folder / "zero.avi"), "w", format="avi") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        container.start_encoding()  # header, not one frame
    files["zero.avi"] = folder / "zero.avi"
    return files


def png_with_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width`` x ``height`` (valid CRCs) with no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def write_fault(folder: Path, media: dict[str, Path], index: int, fault: Fault) -> dict:
    """Write the file for ``fault`` (named after ``index``) -> its manifest row (``_line`` filled in later)."""
    good_mp4 = media["good0.mp4"].read_bytes()
    name = f"bad{index}"
    row: dict = {"caption": f"bad row {index} ({fault.kind})"}
    kind = fault.kind
    if kind == "corrupt_bytes":
        name += ".mp4"
        (folder / name).write_bytes(fault.payload)
    elif kind in ("truncated_mp4", "truncated_mp4_with_metadata"):
        name += ".mp4"
        (folder / name).write_bytes(good_mp4[: int(len(good_mp4) * fault.fraction)])
        if kind == "truncated_mp4_with_metadata":  # probing is skipped: the failure shows up while decoding
            row.update(fps=8, frames=12, width=32, height=32)
    elif kind == "zero_frame_video":
        name += ".avi"
        shutil.copy(media["zero.avi"], folder / name)
    elif kind == "mp4_named_png":
        name += ".png"
        (folder / name).write_bytes(good_mp4)
    elif kind == "text_named_mp4":
        name += ".mp4"
        (folder / name).write_text("this is not a video\n" * 10)
    elif kind == "huge_png_header":
        name += ".png"
        (folder / name).write_bytes(png_with_header(*fault.size))
    elif kind == "missing_file":
        name += ".mp4"
    elif kind == "directory":
        name += ".mp4"
        (folder / name).mkdir()
    elif kind == "empty_file":
        name += ".mp4"
        (folder / name).write_bytes(b"")
    else:  # row faults point at a good copy, so only the row is to blame
        name += ".mp4"
        shutil.copy(media["good1.mp4"], folder / name)
        if kind == "non_utf8_caption":
            row["caption"] = f"caption {NON_UTF8_MARK} {index}"
        elif kind == "missing_caption":
            del row["caption"]
        elif kind == "not_a_number":
            row[fault.column] = fault.value
    row["path"] = name
    if kind == "missing_path":
        row["path"] = ""
    return row


def row_fault_possible(kind: str, suffix: str) -> bool:
    """CSV cells cannot be missing (an empty caption is a valid, unconditional sample) nor invalid JSON."""
    return suffix == ".jsonl" or kind not in ("missing_caption", "invalid_json")


def write_manifest(path: Path, rows: list[dict]) -> dict[int, int]:
    """Write rows (CSV or JSONL by suffix); -> {row position: manifest line number}."""
    lines = {}
    if path.suffix == ".jsonl":
        text = ""
        for i, row in enumerate(rows):
            lines[i] = i + 1
            text += ("{not json: " + row["path"] + "\n") if row.get("_invalid_json") else \
                json.dumps({k: v for k, v in row.items() if not k.startswith("_")}) + "\n"
    else:
        columns = ["path", "caption", "fps", "frames", "width", "height"]
        out = [",".join(columns)]
        for i, row in enumerate(rows):
            lines[i] = i + 2
            out.append(",".join(_csv_cell(row.get(c, "")) for c in columns))
        text = "\n".join(out) + "\n"
    path.write_bytes(text.encode().replace(NON_UTF8_MARK.encode(), b"\xff\xfe"))
    return lines


def _csv_cell(value) -> str:
    text = str(value)
    return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"\n') else text


def random_bytes(seed: int, size: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()
