"""``kinetoscope scan``: probes a folder into a manifest the datasets read; unreadable files are listed, not fatal."""

from __future__ import annotations

import csv
import json
import logging
import sys

import pytest

from framework.cli.main import main
from framework.data.manifest import read_manifest
from manifest_media import TINY_MANIFEST_CONFIG, write_corrupt, write_numbered_mp4, write_still


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


def test_scan_warns_when_every_caption_is_empty_and_says_where_captions_come_from(tmp_path, capsys):
    write_numbered_mp4(tmp_path / "media" / "a.mp4", 12, 32, 32, fps=8)
    write_numbered_mp4(tmp_path / "media" / "b.mp4", 12, 32, 32, fps=8)
    assert main(["scan", str(tmp_path / "media"), "-o", str(tmp_path / "m.csv"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "every caption is empty (2 rows)" in err and "m.csv" in err
    assert "clip.txt" in err and "--captions" in err and "kinetoscope recaption" in err  # the three sources


def test_scan_takes_captions_from_a_captions_file_before_sidecars(tmp_path, capsys):
    media = tmp_path / "media"
    for name in ("a.mp4", "b.mp4", "c.mp4"):
        write_numbered_mp4(media / "sub" / name, 12, 32, 32, fps=8)
    (media / "sub" / "a.txt").write_text("the sidecar loses\n")
    (media / "sub" / "c.txt").write_text("a sidecar caption\n")
    # paths resolve against the captions file's folder, like a manifest's
    (media / "captions.csv").write_text('path,caption\nsub/a.mp4,a grey ramp\nsub/gone.mp4,"no such, file"\n')
    out = tmp_path / "m.csv"
    assert main(["scan", str(media), "-o", str(out), "--captions", str(media / "captions.csv"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    captions = {r.path.name: r.captions for r in read_manifest(out)}
    assert captions == {"a.mp4": ("a grey ramp",), "b.mp4": ("",), "c.mp4": ("a sidecar caption",)}
    assert "1 of 3 rows have an empty caption" in err
    assert "1 rows of" in err and "gone.mp4" in err  # a captions row that names no scanned file

    jsonl = media / "captions.jsonl"
    jsonl.write_text(json.dumps({"path": "sub/b.mp4", "captions": ["a ramp", "grey levels rising"]}) + "\n")
    assert main(["scan", str(media), "-o", str(out), "--captions", str(jsonl), "--no-progress"]) == 0
    captions = {r.path.name: r.captions for r in read_manifest(out)}
    assert captions["b.mp4"] == ("a ramp", "grey levels rising") and captions["a.mp4"] == ("the sidecar loses",)


def test_scan_with_a_bad_captions_file_fails_naming_it(tmp_path, capsys):
    write_numbered_mp4(tmp_path / "media" / "a.mp4", 12, 32, 32, fps=8)
    (tmp_path / "captions.csv").write_text("file,text\na.mp4,x\n")
    with pytest.raises(SystemExit) as info:
        main(["scan", str(tmp_path / "media"), "-o", str(tmp_path / "m.csv"), "--captions",
              str(tmp_path / "captions.csv")])
    assert info.value.code == 2 and "captions.csv (header): missing column 'path'" in capsys.readouterr().err


def test_fit_on_a_manifest_without_captions_warns(tmp_path, monkeypatch, caplog):
    """`scan` of a folder without captions, then `fit` on it: the run goes ahead, but not silently."""
    for name in ("a.mp4", "b.mp4"):
        write_numbered_mp4(tmp_path / "media" / name, 12, 32, 32, fps=8)
    manifest = tmp_path / "m.csv"
    assert main(["scan", str(tmp_path / "media"), "-o", str(manifest), "--no-progress"]) == 0
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["kinetoscope"])
    with caplog.at_level(logging.WARNING, logger="kinetoscope.data"):
        assert main(["fit", "-c", str(TINY_MANIFEST_CONFIG), f"--data.init_args.manifest={manifest}",
                     "--trainer.fast_dev_run=1", "--data.init_args.num_workers=0"]) == 0
    warnings = [r.getMessage() for r in caplog.records if "caption" in r.getMessage()]
    assert len(warnings) == 1 and "every caption is empty (2 rows)" in warnings[0] and str(manifest) in warnings[0]
