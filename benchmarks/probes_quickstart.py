"""Capability probes on a trained text-to-video checkpoint (default: the quickstart model), next to their baselines.

The quickstart model was trained on 8-frame 16x16 clips of one shape moving on a plain background, so the probes'
scenes (an occluding bar, 32-frame clips, textured pans) are out of its distribution: this shows how the probes
read on a real model, not a claim about what it should score. ``ConstantMotionProbe`` is also run at a size close
to the training data (16 frames, 16x24).

    python benchmarks/probes_quickstart.py [--ckpt runs/quickstart/checkpoints/last.ckpt] [--steps 25]

Writes benchmarks/results/probes_quickstart.json.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from framework.metrics.probes import CameraPanProbe, ConstantMotionProbe, ObjectPermanenceProbe, text_to_video
from framework.modules import VideoDiffusion
from framework.core.registry import default_registry

REPO = Path(__file__).resolve().parents[1]
RESULT = REPO / "benchmarks" / "results" / "probes_quickstart.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default=str(REPO / "runs" / "quickstart" / "checkpoints" / "last.ckpt"))
    parser.add_argument("--steps", type=int, default=25)
    args = parser.parse_args()
    if not Path(args.ckpt).exists():
        raise SystemExit(f"no checkpoint at {args.ckpt}: train one with `kinetoscope fit -c configs/quickstart.yaml`")
    default_registry()  # plugin class paths in the checkpoint's hyperparameters must resolve
    model = VideoDiffusion.load_from_checkpoint(args.ckpt, map_location="cpu").eval()
    probes = {
        "object_permanence": ObjectPermanenceProbe(),
        "constant_motion": ConstantMotionProbe(),
        "constant_motion_16x16x24": ConstantMotionProbe(frames=16, height=16, width=24, context_frames=4),
        "camera_pan": CameraPanProbe(),
    }
    results = {}
    for name, probe in probes.items():
        start = time.perf_counter()
        torch.manual_seed(0)
        report = asdict(probe.run(text_to_video(model, steps=args.steps)))
        report["seconds"] = round(time.perf_counter() - start, 1)
        results[name] = report
        print(name, json.dumps(report), flush=True)
    ckpt = Path(args.ckpt).resolve()
    output = {"checkpoint": str(ckpt.relative_to(REPO)) if ckpt.is_relative_to(REPO) else str(ckpt),
              "sampling_steps": args.steps, "probes": results,
              "note": "model = text-to-video from each case's caption; 2 shared CPU cores"}
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(output, indent=2) + "\n")
    print(f"wrote {RESULT}")


if __name__ == "__main__":
    main()
