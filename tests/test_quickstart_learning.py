"""benchmarks/quickstart_learning.py: one training run per seed, each in its own directory, scored and summarised."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]


def test_benchmark_trains_each_seed_in_its_own_run_and_reports_mean_min_max(tmp_path: Path) -> None:
    config = yaml.safe_load((REPO / "configs/quickstart.yaml").read_text())
    config["trainer"]["max_steps"] = 2
    config["data"]["init_args"].update(num_samples=64, batch_size=4)
    config["model"]["init_args"]["sampling_steps"] = 1
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text(yaml.safe_dump(config))
    run_dir, results = tmp_path / "runs", tmp_path / "results"

    subprocess.run([sys.executable, str(REPO / "benchmarks/quickstart_learning.py"), "--config", str(tiny),
                    "--seeds", "3", "4", "--jobs", "2", "--threads", "1", "--sizes", "8x16x16", "--run-dir", str(run_dir),
                    "--results-dir", str(results)], check=True, cwd=tmp_path, timeout=600, capture_output=True)

    [path] = (results / "quickstart_learning").glob("*.json")
    result = json.loads(path.read_text())
    assert [run["seed"] for run in result["per_seed"]] == [3, 4]
    checkpoints = []
    for run in result["per_seed"]:
        # The config's relative paths (runs/quickstart/...) land in the seed's own directory.
        [checkpoint] = Path(run["run_dir"]).glob("**/checkpoints/last.ckpt")
        assert Path(run["run_dir"]).parent == run_dir
        checkpoints.append(torch.load(checkpoint, map_location="cpu", weights_only=True))
        assert checkpoints[-1]["global_step"] == 2
        assert run["timing"]["seed"] == run["seed"]
        assert run["timing"]["fit"]["wall_s"] > 0 and run["timing"]["fit"]["cpu_s"] > 0
        assert list(Path(run["run_dir"]).glob("**/samples/*.mp4"))  # the predict half of the README job ran
        for model in ("trained", "untrained"):
            assert run[model]["clips"] == 48  # 6 colours x 2 shapes x 4 directions at 8x16x16
            for key in ("colour_accuracy", "direction_accuracy", "shape_accuracy"):
                assert 0.0 <= run[model][key] <= 1.0
    # Different seeds, different runs: the initial weights differ.
    first, second = (c["state_dict"] for c in checkpoints)
    assert any(not torch.equal(first[k], second[k]) for k in first)
    for model in ("trained", "untrained"):
        for key, stats in result[model].items():
            values = [run[model][key] for run in result["per_seed"]]
            assert stats == {"mean": round(sum(values) / 2, 4), "min": min(values), "max": max(values), "runs": 2}
    assert result["chance"]["shape_accuracy"] == 0.5
    assert result["seeds"] == [3, 4] and result["benchmark"] == "quickstart_learning"
