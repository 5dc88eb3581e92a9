"""Benchmark: where a sweep's time goes on this machine, and what grouping points and concurrency buy.

Runs a small sweep (4 layers x 1 lr, on simulated data with a small source model) on a local Ray
instance in several ways: with a Ray Train worker group per trial and with the loop in the trial's
own process (`workers_per_trial: 0`), one grid point per trial (`points_per_trial: 1`) or several
(`points_per_trial: auto` in-process: the grid shared over the concurrent slots; 4 with a worker
group), one trial at a time and two at once, and once with 4x the steps. Prints the wall time of each, and per trial the share of
its time spent inside adaptation steps (the sum over its points of `steps_s`, against the trial's
`time_total_s`), split into start-up (the trial's time before and between its points) and the points'
own overhead (building the adapter, evaluating, writing reports).

    python bench/sweep_overhead.py [--steps 40] [--num-cpus 2] [--runs workers0-concurrent1-grouped,...]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from datetime import date
from pathlib import Path

from results_file import write_result

# name -> (workers_per_trial, max_concurrent_trials, points_per_trial, steps as a multiple of --steps); in-process runs first
RUNS = {
    "workers0-concurrent1": (0, 1, 1, 1),
    "workers0-concurrent1-grouped": (0, 1, "auto", 1),
    "workers0-concurrent2": (0, 2, 1, 1),
    "workers0-concurrent2-grouped": (0, 2, "auto", 1),
    "workers0-concurrent1-grouped-4xsteps": (0, 1, "auto", 4),  # where the per-point evaluation weighs less
    "workers1-concurrent1": (1, 1, 1, 1),
    "workers1-concurrent1-grouped": (1, 1, 4, 1),
    "workers1-concurrent2": (1, 2, 1, 1),
}


def per_trial(rows: list[dict]) -> list[dict]:
    """Each trial's time: in its points' adaptation steps, in the rest of its points, and outside any point."""
    trials = defaultdict(list)
    for row in rows:
        if row.get("steps_s") is not None and row.get("trial_s") is not None:  # a failed trial has no timings
            trials[row["trial_id"]].append(row)
    out = []
    for points in trials.values():
        trial_s = max(r["trial_s"] for r in points)
        steps_s = sum(r["steps_s"] for r in points)
        points_s = sum(r["worker_s"] for r in points)
        out.append({"points": len(points), "trial_s": trial_s, "steps_s": steps_s, "steps_share": steps_s / trial_s,
                    "point_overhead_s": points_s - steps_s, "startup_s": trial_s - points_s})
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, of: {', '.join(RUNS)}")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    runs = args.runs.split(",")
    unknown = sorted(set(runs) - set(RUNS))
    if unknown:
        parser.error(f"unknown runs {unknown}; known: {', '.join(RUNS)}")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

    import ray

    from lmadda.data.synth import SynthConfig, synthesize
    from lmadda.training.source import SourceTrainConfig, train_source
    from lmadda_tune.sweep import run_sweep
    from lmadda.sweep.config import SweepConfig

    root = Path(tempfile.mkdtemp(prefix="lmadda-sweep-bench-"))
    manifest, _ = synthesize(root / "data", SynthConfig(fields=16, size=128, seed=1))
    source = root / "source.pt"
    train_source(SourceTrainConfig(manifest=manifest.source, markers=["dapi"], ngf=8, depth=7, ndf=8, crop_size=128,
                                   batch_size=4, epochs=1, crops_per_epoch=16, device="cpu"), source, progress=False)
    ray.init(num_cpus=args.num_cpus, log_to_driver=False)
    record = {"benchmark": "sweep_overhead", "host": platform.node(), "date": date.today().isoformat(), "steps": args.steps,
              "load_average_at_start": os.getloadavg(), "runs": {}}
    for key in runs:
        workers, concurrent, points_per_trial, steps_factor = RUNS[key]
        sweep = SweepConfig.model_validate({
            "name": f"bench-{key}", "storage_path": str(root / "sweeps"), "source": {"checkpoint": str(source)},
            "data": {"manifest": str(manifest.source), "source_setting": "phase_contrast"},
            "grid": {"targets": ["bright_field"], "layers": [0, 3, 7, 13], "lrs": [2e-5], "paper_layers": []},
            "adapt": {"steps": args.steps * steps_factor, "batch_size": 4, "crop_size": 128, "log_every": 10},
            "resources": {"workers_per_trial": workers, "cpus_per_worker": args.num_cpus / concurrent - 0.02,
                          "max_concurrent_trials": concurrent, "points_per_trial": points_per_trial},
        })
        load = os.getloadavg()[0]  # the machine may be shared: say how busy it was
        start = time.perf_counter()
        rows = run_sweep(sweep, log=lambda *_: None)
        wall = time.perf_counter() - start
        trials = per_trial(rows)
        errors = sorted({r["error"].splitlines()[0][:200] for r in rows if r.get("error")})
        if not trials:
            record["runs"][key] = {"wall_s": wall, "load_average_1min": load, "points": len(rows), "errors": errors}
            print(f"{key}: no trial finished ({errors})")
            continue
        median_share = statistics.median(t["steps_share"] for t in trials)
        record["runs"][key] = {
            "wall_s": wall, "load_average_1min": load, "steps": args.steps * steps_factor, "points": len(rows), "trials": trials, "errors": errors,
            "steps_share_median": median_share, "overhead_share_median": 1 - median_share,
            "steps_share_overall": sum(t["steps_s"] for t in trials) / sum(t["trial_s"] for t in trials),
        }
        mode = "Ray Train worker group" if workers else "in the trial's process"
        print(f"{mode}, {concurrent} concurrent, {args.steps * steps_factor} steps, {len(trials)} trials of {'/'.join(str(t['points']) for t in trials)} points: "
              f"{wall:.1f} s; per trial (median): steps {statistics.median(t['steps_s'] for t in trials):.1f} s of "
              f"{statistics.median(t['trial_s'] for t in trials):.1f} s -> {median_share:.0%} in adaptation steps "
              f"(start-up {statistics.median(t['startup_s'] for t in trials):.1f} s, "
              f"points' own overhead {statistics.median(t['point_overhead_s'] for t in trials):.1f} s)")
        write_result(args.out, "sweep_overhead", record)  # after every run: a later run that hangs loses nothing
    found = record["runs"]
    for name, (faster, slower) in {"speedup_2_concurrent": ("workers1-concurrent2", "workers1-concurrent1"),
                                   "speedup_in_trial": ("workers0-concurrent1", "workers1-concurrent1"),
                                   "speedup_grouped_in_trial": ("workers0-concurrent1-grouped", "workers0-concurrent1"),
                                   "speedup_grouped_in_trial_2_concurrent": ("workers0-concurrent2-grouped", "workers0-concurrent2"),
                                   "speedup_grouped_worker_group": ("workers1-concurrent1-grouped", "workers1-concurrent1")}.items():
        if "trials" in found.get(faster, {}) and "trials" in found.get(slower, {}):
            record[name] = found[slower]["wall_s"] / found[faster]["wall_s"]
            print(f"{name}: {record[name]:.2f}x ({faster} against {slower})")
    record["load_average_at_end"] = os.getloadavg()
    ray.shutdown()
    path = write_result(args.out, "sweep_overhead", record)
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
