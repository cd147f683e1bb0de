"""Reliability counts: runs killed and resumed, checkpoint writes killed, bad inputs tried, faults injected, data lost.

Five parts, all on CPU; parts 1-2 with the tiny config ``tests/reliability/tiny.yaml`` (DiT width 32, 6 batches per
epoch, checkpoints every 2 steps through ``SafeCheckpointIO``, 20 steps):

1. **Kill and resume.** One uninterrupted ``kinetoscope fit`` run is the reference. Other runs are SIGKILLed once
   their loss log reaches a given step, resumed with ``--ckpt_path last``, and their per-step losses compared with
   the reference (bit equality) -- with the full setup, and as ablations without ``RNGStateCallback`` and with a
   plain DataLoader instead of the ``StatefulDataLoader`` of ``framework/data/resumable.py``, to show what each part contributes.
2. **Kill during checkpoint writes.** A process rewrites a 4 MB checkpoint in a loop with
   ``framework.training.atomic_files.write_verified`` (the path ``SafeCheckpointIO`` uses); it is SIGKILLed at random times,
   and after every kill the file must verify against its digest and load with ``weights_only``.
3. **Bad data.** The hypothesis fuzz of ``tests/test_reliability_fuzz.py`` with more examples, plus every fault kind
   once per manifest format: bad rows tried, reported, good rows lost.
4. **Bad data through fit.** Manifests drawn by the same strategies (plus every fault kind once per format), each
   trained for one epoch by a real ``kinetoscope fit`` (``tests/reliability/tiny_manifest.yaml``) with
   ``num_workers`` 0 and 2, in a process that has decoded a video first: crashes (an error exit), hangs (still
   running at ``--fit-timeout``), bad rows missing from the run's ``skipped_samples.json``, good rows never trained.
   The goal is 0 of each.
5. **Numeric and config faults.** ``tests/test_reliability_numeric.py`` and ``tests/test_reliability_config.py``
   (the faults each injects are listed below), run with pytest.

    python benchmarks/reliability.py     # -> benchmarks/results/reliability/<time>-<commit>.json (10-30 minutes)
    python benchmarks/reliability.py --parts fit_fuzz --fit-examples 4      # only part 4
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "reliability" / "tiny.yaml"
MAX_STEPS = 20
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}"}

# this script's folder comes first on sys.path, and its name would shadow the tests' ``reliability`` helpers
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from benchmarks.results_store import save_result  # noqa: E402
from framework.training.checkpointing import load_checkpoint_safely  # noqa: E402
from framework.training.reliability import read_loss_log  # noqa: E402


# ------------------------------------------------------------------------------------------ 1. kill and resume
def variant_config(folder: Path, variant: str) -> Path:
    config = yaml.safe_load(TINY.read_text())
    if variant == "no_rng_state":
        config["trainer"]["callbacks"] = [c for c in config["trainer"]["callbacks"]
                                          if not c["class_path"].endswith("RNGStateCallback")]
    elif variant == "plain_dataloader":
        config["data"]["class_path"] = "reliability.plain_loader.PlainLoaderSyntheticDataModule"
    path = folder / f"{variant}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def start_fit(cwd: Path, config: Path, *extra: str) -> subprocess.Popen:
    cwd.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "framework.cli.main", "fit", "-c", str(config), f"--trainer.max_steps={MAX_STEPS}",
               *extra]
    return subprocess.Popen(command, cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_ok(proc: subprocess.Popen) -> None:
    out, _ = proc.communicate(timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(out[-3000:])


def kill_when(proc: subprocess.Popen, losses: Path, step: int) -> int:
    """SIGKILL ``proc`` once its loss log reaches ``step``; -> the last step it had logged."""
    while not (losses.is_file() and max(read_loss_log(losses), default=0) >= step):
        if proc.poll() is not None:
            raise RuntimeError(f"the run ended before step {step}")
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return max(read_loss_log(losses))


def resume_trial(folder: Path, config: Path, kill_step: int, reference: dict[int, float]) -> dict:
    losses = folder / "runs" / "tiny" / "losses.jsonl"
    logged = kill_when(start_fit(folder, config), losses, kill_step)
    checkpoint = load_checkpoint_safely(folder / "runs" / "tiny" / "checkpoints" / "last.ckpt")
    position = checkpoint["loops"]["fit_loop"]["state_dict"].get("combined_loader", [{}])[0]
    wait_ok(start_fit(folder, config, "--ckpt_path=last"))
    got = read_loss_log(losses)
    differing = [s for s in reference if got.get(s) != reference[s]]
    return {
        "killed_after_step": logged,
        "resumed_from_step": checkpoint["global_step"],
        "resumed_mid_epoch": bool(position) and 0 < position.get("batches_served", 0) < 6,
        "steps_redone": logged - checkpoint["global_step"],
        "losses_identical": not differing,
        "first_differing_step": differing[0] if differing else None,
        "max_abs_loss_difference": max((abs(got.get(s, float("nan")) - reference[s]) for s in reference), default=0.0),
    }


def kill_and_resume(work: Path, kill_steps: list[int]) -> dict:
    reference_proc = start_fit(work / "reference", TINY)
    trials = []
    for kill_step in kill_steps:
        trials.append(("full", kill_step, TINY))
    trials.append(("no_rng_state", 9, variant_config(work, "no_rng_state")))
    trials.append(("plain_dataloader", 9, variant_config(work, "plain_dataloader")))
    wait_ok(reference_proc)
    reference = read_loss_log(work / "reference" / "runs" / "tiny" / "losses.jsonl")
    results = []
    for i, (variant, kill_step, config) in enumerate(trials):
        result = {"variant": variant, **resume_trial(work / f"trial{i}", config, kill_step, reference)}
        print(f"  resume {variant:16s} kill>={kill_step:2d}: {result}")
        results.append(result)
    return {"reference_steps": len(reference), "trials": results}


# ------------------------------------------------------------------------------- 2. kills during checkpoint writes
WRITER = textwrap.dedent("""
    import sys, torch
    from framework.training.atomic_files import write_verified
    path = sys.argv[1]
    step = 0
    while True:
        step += 1
        write_verified(path, lambda f: torch.save({"step": step, "w": torch.full((1_000_000,), float(step))}, f))
""")


def kills_during_writes(work: Path, kills: int, seed: int) -> dict:
    rng = random.Random(seed)
    path = work / "writes" / "last.ckpt"
    path.parent.mkdir(parents=True)
    import torch

    from framework.training.atomic_files import write_verified

    write_verified(path, lambda f: torch.save({"step": 0, "w": torch.zeros(1_000_000)}, f))  # the first good one
    survived, steps = 0, []
    for _ in range(kills):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], env=ENV, cwd=REPO)
        time.sleep(rng.uniform(2.0, 4.0))  # about 1.5 s of imports, then a write every ~0.1 s
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        try:
            checkpoint = load_checkpoint_safely(path, require_sidecar=True)
            consistent = bool((checkpoint["w"] == float(checkpoint["step"])).all())
            survived += consistent
            steps.append(checkpoint["step"])
        except Exception as err:  # noqa: BLE001  (any failure to load is what this counts)
            print(f"  write kill: checkpoint unusable: {err}")
    print(f"  {kills} kills during checkpoint writes: {survived} left a loadable, consistent checkpoint "
          f"(steps written before each kill: {steps})")
    return {"kills": kills, "checkpoint_loadable_after_kill": survived, "steps_written_per_run": steps}


# ---------------------------------------------------------------------------------------------------- 3. bad data
def bad_data(max_examples: int) -> dict:
    import tempfile as _tempfile

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    import test_reliability_fuzz as fuzz
    from reliability.bad_data import FILE_FAULTS, ROW_FAULTS, Fault, row_fault_possible

    counts = {"manifests": 0, "bad_rows": 0}
    with _tempfile.TemporaryDirectory() as tmp:
        media = fuzz.write_good_media(Path(tmp))

        @settings(max_examples=max_examples, deadline=None, derandomize=True,
                  suppress_health_check=[HealthCheck.too_slow])
        @given(suffix=st.sampled_from([".csv", ".jsonl"]), bad=st.lists(fuzz.faults, min_size=1, max_size=6),
               good_at=st.lists(st.integers(0, 6), min_size=3, max_size=3))
        def fuzz_manifests(suffix, bad, good_at) -> None:  # the strategies of the test, more examples
            counts["bad_rows"] += fuzz.check_manifest(media, suffix, bad, good_at)  # raises on any failure
            counts["manifests"] += 1

        fuzz_manifests()
        every_kind = 0
        for suffix in (".csv", ".jsonl"):
            kinds = [Fault(k) for k in FILE_FAULTS + ROW_FAULTS if row_fault_possible(k, suffix)]
            every_kind += fuzz.check_manifest(media, suffix, kinds, [0, 3, 99])
    tried = counts["bad_rows"] + every_kind
    result = {"manifests": counts["manifests"] + 2, "bad_rows_tried": tried, "bad_rows_reported": tried,
              "crashes": 0, "good_rows_lost": 0, "fault_kinds": list(FILE_FAULTS + ROW_FAULTS)}
    print(f"  bad data: {result['manifests']} manifests, {tried} bad rows, all skipped and reported, no good row lost")
    return result


# ------------------------------------------------------------------------------------ 4. bad data through fit
def bad_data_through_fit(examples: int, timeout_s: float) -> dict:
    import tempfile as _tempfile

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    import test_reliability_fuzz as fuzz
    from reliability.bad_data import FILE_FAULTS, ROW_FAULTS, Fault, row_fault_possible

    runs: list[dict] = []
    with _tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        media = fuzz.write_good_media(work / "media")

        def fit_both(suffix: str, bad: list, good_at: list[int], label: str) -> None:
            for num_workers in (0, 2):
                folder = work / f"fit{len(runs)}"
                outcome = fuzz.check_fit(folder, media, suffix, bad, good_at, num_workers, timeout_s)
                record = {"manifest": label, "suffix": suffix, "num_workers": num_workers,
                          "faults": [f.kind for f in bad if row_fault_possible(f.kind, suffix)],
                          **{k: v for k, v in vars(outcome).items() if k != "output_tail"}}
                if not outcome.ok:
                    record["output_tail"] = outcome.output_tail
                runs.append(record)
                status = "ok" if outcome.ok else "HANG" if outcome.hung else "CRASH" if outcome.crashed else "WRONG"
                print(f"  fit {label:10s} {suffix:6s} workers={num_workers}: {outcome.bad_rows} bad rows, {status}, "
                      f"{outcome.seconds} s", flush=True)

        @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(suffix=st.sampled_from([".csv", ".jsonl"]), bad=st.lists(fuzz.faults, min_size=1, max_size=6),
               good_at=st.lists(st.integers(0, 6), min_size=3, max_size=3))
        def fuzz_fits(suffix, bad, good_at) -> None:  # outcomes are counted, never raised (so nothing shrinks)
            fit_both(suffix, bad, good_at, f"drawn{sum(r['num_workers'] == 0 for r in runs)}")

        fuzz_fits()
        for suffix in (".csv", ".jsonl"):
            fit_both(suffix, [Fault(k) for k in FILE_FAULTS + ROW_FAULTS], [0, 3, 99], "every_kind")

    def totals(selected: list[dict]) -> dict:
        return {"fits": len(selected), "crashes": sum(r["crashed"] for r in selected),
                "hangs": sum(r["hung"] for r in selected),
                "bad_rows_tried": sum(r["bad_rows"] for r in selected),
                "bad_rows_unreported": sum(len(r["unreported"]) for r in selected),
                "paths_wrongly_reported": sum(len(r["wrongly_reported"]) for r in selected),
                "good_rows_lost": sum(len(r["good_rows_lost"]) for r in selected),
                "non_finite_losses": sum(r["non_finite_losses"] for r in selected),
                "seconds_per_fit": sorted(r["seconds"] for r in selected)}

    result = {"timeout_s": timeout_s, "decoded_in_parent_first": True, **totals(runs),
              "by_num_workers": {str(w): totals([r for r in runs if r["num_workers"] == w]) for w in (0, 2)},
              "runs": runs}
    print(f"  bad data through fit: {result['fits']} fits, {result['crashes']} crashes, {result['hangs']} hangs, "
          f"{result['bad_rows_unreported']} of {result['bad_rows_tried']} bad rows unreported, "
          f"{result['good_rows_lost']} good rows lost")
    return result


# ------------------------------------------------------------------------------------- 5. numeric / config faults
NUMERIC_FAULTS = {"nan_pixels_batch": 1, "inf_gradient": 1, "nan_every_step_until_limit": 3, "nan_weights_at_save": 1}
CONFIG_FAULTS = {"malformed_yaml": 1, "yaml_not_a_mapping": 1, "unknown_trainer_key": 1, "unknown_plugin_argument": 1,
                 "unknown_plugin_name": 1, "wrong_type_trainer": 1, "wrong_type_model": 1,
                 "missing_required_plugin": 1, "missing_trainer_plugin_class": 1}


def pytest_faults() -> dict:
    tests = ["tests/test_reliability_numeric.py", "tests/test_reliability_config.py"]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", *tests], cwd=REPO, env=ENV, capture_output=True,
                          text=True)
    summary = proc.stdout.strip().splitlines()[-1]
    print(f"  numeric + config fault tests: {summary}")
    return {"numeric_faults_injected": NUMERIC_FAULTS, "config_faults_injected": CONFIG_FAULTS,
            "pytest_summary": summary, "all_passed": proc.returncode == 0}


PARTS = ("resume", "write_kills", "fuzz", "fit_fuzz", "faults")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--kill-steps", type=int, nargs="+", default=[3, 9, 15])
    parser.add_argument("--write-kills", type=int, default=10)
    parser.add_argument("--fuzz-examples", type=int, default=60)
    parser.add_argument("--fit-examples", type=int, default=6,
                        help="drawn manifests trained through fit (each with 0 and 2 workers), besides every kind")
    parser.add_argument("--fit-timeout", type=float, default=300.0, help="seconds after which a fit counts as hung")
    args = parser.parse_args()
    started = time.time()
    result: dict = {"description": "Reliability counts on CPU. See docs/reliability.md.", "parts": args.parts}
    totals: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "resume" in args.parts:
            print("1. kill and resume")
            resume = result["kill_and_resume"] = kill_and_resume(work, args.kill_steps)
            full = [t for t in resume["trials"] if t["variant"] == "full"]
            totals |= {"runs_killed_and_resumed": len(full),
                       "resumed_runs_with_identical_losses": sum(t["losses_identical"] for t in full),
                       # a kill loses the steps since the last checkpoint (every_n_train_steps = 2); more is a bug
                       "training_steps_lost_beyond_checkpoint_interval":
                           sum(max(0, t["steps_redone"] - 2) for t in full),
                       "resumed_losses_differing": sum(not t["losses_identical"] for t in full)}
        if "write_kills" in args.parts:
            print("2. kills during checkpoint writes")
            writes = result["kills_during_checkpoint_writes"] = kills_during_writes(work, args.write_kills, seed=0)
            totals |= {"checkpoint_writes_killed": writes["kills"],
                       "checkpoints_unloadable_after_kill": writes["kills"] - writes["checkpoint_loadable_after_kill"]}
    if "fuzz" in args.parts:
        print("3. bad data")
        data = result["bad_data"] = bad_data(args.fuzz_examples)
        totals |= {"bad_inputs_tried": data["bad_rows_tried"], "bad_inputs_reported": data["bad_rows_reported"],
                   "good_rows_lost": data["good_rows_lost"]}
    if "fit_fuzz" in args.parts:
        print("4. bad data through fit (num_workers 0 and 2, after decoding in the parent)")
        fits = result["bad_data_through_fit"] = bad_data_through_fit(args.fit_examples, args.fit_timeout)
        totals |= {"fits_on_bad_data": fits["fits"], "fit_crashes": fits["crashes"], "fit_hangs": fits["hangs"],
                   "fit_bad_rows_tried": fits["bad_rows_tried"],
                   "fit_bad_rows_unreported": fits["bad_rows_unreported"],
                   "fit_good_rows_lost": fits["good_rows_lost"]}
    if "faults" in args.parts:
        print("5. numeric and config faults")
        faults = result["numeric_and_config_faults"] = pytest_faults()
        totals |= {"numeric_faults_injected": sum(NUMERIC_FAULTS.values()),
                   "config_faults_injected": sum(CONFIG_FAULTS.values()), "fault_tests_passed": faults["all_passed"]}
    result["totals"] = totals
    result["seconds"] = round(time.time() - started, 1)
    path = save_result("reliability", result)
    print(json.dumps(totals, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
