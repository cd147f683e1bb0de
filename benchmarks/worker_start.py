"""What starting manifest DataLoader workers from a fork server costs, against forking the training process.

``ManifestVideoDataModule`` starts its workers with ``decoding_worker_context()`` (``forkserver``), because a forked
worker can hang on FFmpeg/swscale thread state inherited from a parent that decoded video (issue 20; see
docs/data.md, 'Worker processes'). This measures, side by side in one process, the seconds to the first batch and
to the end of one epoch with 2 workers for: ``fork`` (the old start; safe here only because every conversion in
``video_io`` now uses a swscale context made in its own process), ``forkserver`` with the server not yet running
(the first loader of a training process) and ``forkserver`` again (the server is already up: later loaders).
Repeated ``--repeats`` times in fresh processes, since the cold fork server is a once-per-process cost.

    python benchmarks/worker_start.py     # -> benchmarks/results/worker_start/<time>-<commit>.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from benchmarks.results_store import save_result  # noqa: E402

ONE_PROCESS = """
import json, multiprocessing, sys, time
sys.path[:0] = [sys.argv[2], sys.argv[2] + "/tests"]
from framework.data.buckets import BucketConfig, TokenGeometry
from framework.data.datamodules import ManifestVideoDataModule
from framework.data.resumable import resumable_loader
from framework.data.datamodules import collate_manifest
from framework.data.video_io import decoding_worker_context, read_video

data = ManifestVideoDataModule(sys.argv[1], buckets=BucketConfig(resolutions=[32], aspect_ratios=[1.0],
                               frame_counts=[1, 8], size_multiple=16), geometry=TokenGeometry(patch_h=4, patch_w=4),
                               tokens_per_batch=1024)
read_video(data.dataset.samples[0].row.path)  # the training process has decoded video, as in a real run
timings = {}
for label, context in (("fork", "fork"), ("forkserver_cold", None), ("forkserver_warm", None)):
    loader = resumable_loader(data.dataset, data.batch_sampler(), collate_manifest, num_workers=2,
                              multiprocessing_context=multiprocessing.get_context(context) if context
                              else decoding_worker_context())
    start = time.perf_counter()
    batches = 0
    for batch in loader:
        if batches == 0:
            first = time.perf_counter() - start
        batches += 1
    timings[label] = {"first_batch_s": round(first, 3), "epoch_s": round(time.perf_counter() - start, 3),
                      "batches": batches}
print(json.dumps(timings))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clips", type=int, default=24, help="12-frame 32x32 clips in the generated manifest")
    args = parser.parse_args()
    from manifest_media import write_manifest, write_numbered_mp4

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rows = []
        for i in range(args.clips):
            write_numbered_mp4(folder / f"c{i}.mp4", 12, 40, 40, fps=8)
            rows.append({"path": f"c{i}.mp4", "caption": f"clip {i}"})
        manifest = write_manifest(folder / "m.csv", rows)
        for repeat in range(args.repeats):
            out = subprocess.run([sys.executable, "-c", ONE_PROCESS, str(manifest), str(REPO)], capture_output=True,
                                 text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
            if out.returncode != 0:
                raise RuntimeError(out.stderr[-3000:])
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"  repeat {repeat}: {runs[-1]}", flush=True)
    summary = {label: {key: {"median": statistics.median(r[label][key] for r in runs),
                             "min": min(r[label][key] for r in runs), "max": max(r[label][key] for r in runs)}
                       for key in ("first_batch_s", "epoch_s")} for label in runs[0]}
    path = save_result("worker_start", {"clips": args.clips, "num_workers": 2, "repeats": args.repeats,
                                        "summary": summary, "runs": runs})
    print(json.dumps(summary, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
