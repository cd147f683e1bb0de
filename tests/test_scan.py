"""``kinetoscope scan``: probes a folder into a manifest the datasets read; unreadable files are listed, not fatal."""

from __future__ import annotations

import csv

import pytest

from framework.cli.main import main
from framework.data.manifest import read_manifest
from manifest_media import write_corrupt, write_numbered_mp4, write_still


def test_scan_writes_probed_rows_with_sidecar_captions_and_lists_unreadable_files(tmp_path, capsys):
    media = tmp_path / "media"
    write_numbered_mp4(media / "a.mp4", 12, 36, 64, fps=8)
    (media / "a.txt").write_text("a grey ramp\n")
    write_still(media / "nested" / "b.png", 40, 30)
    write_corrupt(media / "bad.mp4")
    (media / "notes.md").write_text("not media")
    out = tmp_path / "out" / "manifest.csv"

    assert main(["scan", str(media), "-o", str(out), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "wrote 2 rows" in captured.out
    assert "1 unreadable files" in captured.err and "bad.mp4" in captured.err

    with out.open() as f:
        rows = {r["path"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"../media/a.mp4", "../media/nested/b.png"}  # relative to the manifest's folder
    a, b = rows["../media/a.mp4"], rows["../media/nested/b.png"]
    assert (a["caption"], a["frames"], a["fps"], a["width"], a["height"], a["duration_s"]) == (
        "a grey ramp", "12", "8", "64", "36", "1.5000")
    assert (b["caption"], b["frames"], b["fps"], b["width"], b["height"]) == ("", "1", "", "30", "40")

    parsed = {r.path.name: r for r in read_manifest(out)}
    assert parsed["a.mp4"].path == (media / "a.mp4").resolve() and parsed["a.mp4"].has_metadata
    assert parsed["b.png"].has_metadata and parsed["b.png"].is_image


def test_scan_of_a_missing_folder_fails_naming_it(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["scan", str(tmp_path / "nowhere"), "-o", str(tmp_path / "m.csv")])
    assert info.value.code == 2 and "nowhere is not a folder" in capsys.readouterr().err
