"""Bad-data fuzz (hypothesis): manifests mixing good rows with corrupt, truncated, zero-frame, mislabelled and
huge-header files and with broken rows (non-UTF-8 captions, missing cells, non-numbers, invalid JSON) never crash;
every bad row is skipped, counted once and reported with its path; every good row is used -- by the data module
directly (fast, many examples) and through a full `kinetoscope fit` with and without DataLoader workers."""

from __future__ import annotations

import json
import math
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from framework.data.buckets import BucketConfig, TokenGeometry
from framework.data.datamodules import ManifestVideoDataModule, collate_manifest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reliability.bad_data import FILE_FAULTS, ROW_FAULTS, Fault, row_fault_possible, write_fault, write_good_media, \
    write_manifest  # noqa: E402
from manifest_media import run_fit, write_numbered_mp4  # noqa: E402

GOOD = ("good0.mp4", "good1.mp4", "good0.png")


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    return write_good_media(tmp_path_factory.mktemp("media"))


faults = st.one_of(
    st.builds(Fault, kind=st.just("corrupt_bytes"), payload=st.binary(min_size=0, max_size=3000)),
    st.builds(Fault, kind=st.sampled_from(["truncated_mp4", "truncated_mp4_with_metadata"]),
              fraction=st.floats(0.0, 0.9)),
    st.builds(Fault, kind=st.just("huge_png_header"),
              size=st.tuples(st.integers(20000, 2**31 - 1), st.integers(20000, 2**31 - 1))),
    st.builds(Fault, kind=st.just("not_a_number"), column=st.sampled_from(["fps", "frames", "width"]),
              value=st.sampled_from(["fast", "x1", "--", "1,5"])),
    st.builds(Fault, kind=st.sampled_from([k for k in FILE_FAULTS + ROW_FAULTS
                                           if k not in ("corrupt_bytes", "huge_png_header", "not_a_number")])),
)


def build_manifest(folder: Path, media: dict[str, Path], suffix: str, bad: list[Fault],
                   good_at: list[int]) -> tuple[Path, set[str]]:
    """Write the good files and ``bad`` rows (good files at positions ``good_at`` among them) into ``folder``
    -> (manifest, the paths every bad row must be reported under)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in GOOD:
        (folder / name).write_bytes(media[name].read_bytes())
    rows, expected_paths = [], {}
    bad = [f for f in bad if row_fault_possible(f.kind, suffix)]
    for i, fault in enumerate(bad):
        row = write_fault(folder, media, i, fault)
        row["_invalid_json"] = fault.kind == "invalid_json"
        rows.append(row)
    for position, name in zip(good_at, GOOD):
        rows.insert(min(position, len(rows)), {"path": name, "caption": f"good {name}"})
    manifest = folder / f"manifest{suffix}"
    lines = write_manifest(manifest, rows)
    for i, row in enumerate(rows):
        if row["path"].startswith("bad"):
            no_path = row.get("_invalid_json") or not row["path"]
            expected_paths[i] = f"{manifest}, line {lines[i]}" if no_path else str((folder / row["path"]).resolve())
        elif not row["path"]:
            expected_paths[i] = f"{manifest}, line {lines[i]}"
    return manifest, set(expected_paths.values())


def check_manifest(media: dict[str, Path], suffix: str, bad: list[Fault], good_at: list[int]) -> int:
    """Build a manifest with the good files at positions ``good_at`` among the bad rows, load every sample;
    -> the number of bad rows. Raises AssertionError on any crash, lost good row or unreported bad row."""
    with tempfile.TemporaryDirectory() as tmp:
        manifest, expected = build_manifest(Path(tmp), media, suffix, bad, good_at)
        data = ManifestVideoDataModule(
            manifest,
            buckets=BucketConfig(resolutions=[32], aspect_ratios=[1.0], frame_counts=[1, 8], size_multiple=16),
            geometry=TokenGeometry(patch_h=4, patch_w=4), tokens_per_batch=256,
        )
        dataset = data.dataset  # must not raise: three good rows are always there
        samples = [dataset[i] for i in range(len(dataset))]
        batch = collate_manifest(samples)
        reported = set(dataset.skipped.paths) | {s.path for s in batch["skipped"]}
        assert reported == expected, (reported ^ expected)
        assert set(GOOD) <= set(batch["ids"]), f"good rows lost: {set(GOOD) - set(batch['ids'])}"
        assert all(v.isfinite().all() for v in batch["videos"])
        return len(expected)


@dataclass
class FitOutcome:
    """One ``kinetoscope fit`` epoch over a fuzzed manifest (benchmarks/reliability.py counts these)."""

    bad_rows: int
    hung: bool  # still running at the time limit
    crashed: bool  # exited with an error
    unreported: list[str]  # bad rows missing from the run's skipped_samples.json
    wrongly_reported: list[str]  # reported paths that are not bad rows
    good_rows_lost: list[str]  # good rows no training step saw
    non_finite_losses: int
    seconds: float
    output_tail: str

    @property
    def ok(self) -> bool:
        return not (self.hung or self.crashed or self.unreported or self.wrongly_reported or self.good_rows_lost
                    or self.non_finite_losses)


def check_fit(folder: Path, media: dict[str, Path], suffix: str, bad: list[Fault], good_at: list[int],
              num_workers: int, timeout_s: float) -> FitOutcome:
    """``kinetoscope fit`` (one epoch of the tiny config) on such a manifest, in a process that has decoded a video
    before training (as a preview or a metric callback's reference clips do)."""
    manifest, expected = build_manifest(folder / "data", media, suffix, bad, good_at)
    preview = write_numbered_mp4(folder / "preview.mp4", 4, 40, 48, fps=8)  # another size than the buckets'
    run = run_fit(folder / "run", manifest, num_workers=num_workers, timeout_s=timeout_s, decode_first=preview)
    hung, crashed = run.returncode is None, run.returncode not in (0, None)
    reported = set(run.skipped) if not (hung or crashed) else set()
    trained = set(run.trained_ids) if (run.run_dir / "losses.jsonl").is_file() else set()
    losses = [json.loads(line)["loss"] for line in (run.run_dir / "losses.jsonl").read_text().splitlines()
              if line.strip()] if trained else []
    return FitOutcome(
        bad_rows=len(expected), hung=hung, crashed=crashed,
        unreported=sorted(expected - reported) if not (hung or crashed) else [],
        wrongly_reported=sorted(reported - expected),
        good_rows_lost=sorted(set(GOOD) - trained) if not (hung or crashed) else [],
        non_finite_losses=sum(not math.isfinite(x) for x in losses),
        seconds=round(run.seconds, 1), output_tail=run.output[-3000:],
    )


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(suffix=st.sampled_from([".csv", ".jsonl"]), bad=st.lists(faults, min_size=1, max_size=6),
       good_at=st.lists(st.integers(0, 6), min_size=3, max_size=3))
def test_bad_rows_are_skipped_and_reported_and_good_rows_all_used(media, suffix, bad, good_at) -> None:
    check_manifest(media, suffix, bad, good_at)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_every_fault_kind_once(media, suffix) -> None:
    """Each fault kind at least once, whatever hypothesis draws."""
    kinds = [Fault(k) for k in FILE_FAULTS + ROW_FAULTS if row_fault_possible(k, suffix)]
    assert check_manifest(media, suffix, kinds, [0, 3, 99]) == len(kinds)


FIT_TIMEOUT_S = 240  # a fit of the tiny config takes seconds idle, a minute or two on the loaded 2-core machine


@pytest.mark.parametrize("suffix, num_workers", [(".csv", 0), (".jsonl", 2)])
def test_every_fault_kind_through_fit(media, tmp_path, suffix, num_workers) -> None:
    """The promise through the real command: `fit` trains an epoch on the good rows and reports every bad one in
    the run's skipped_samples.json, with and without DataLoader workers (after decoding in the parent)."""
    kinds = [Fault(k) for k in FILE_FAULTS + ROW_FAULTS if row_fault_possible(k, suffix)]
    outcome = check_fit(tmp_path, media, suffix, kinds, [0, 3, 99], num_workers, FIT_TIMEOUT_S)
    assert not outcome.hung, f"fit hung for {FIT_TIMEOUT_S} s:\n{outcome.output_tail}"
    assert not outcome.crashed, outcome.output_tail
    assert outcome.ok and outcome.bad_rows == len(kinds), outcome
