"""Benchmark: where a sweep's time goes on this machine, and what concurrency buys.

Runs a small sweep (4 layers x 1 lr, on simulated data with a small source model) four times on a
local Ray instance: with a Ray Train worker group per trial and with the loop in the trial's own
process (`workers_per_trial: 0`), each one trial at a time and two at once. Prints the wall time of each, and for each
trial the seconds spent inside adaptation steps against the trial's wall time, i.e. the share of
Ray Tune + Ray Train start-up, data loading and evaluation.

    python bench/sweep_overhead.py [--steps 40] [--num-cpus 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from results_file import write_result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

    import ray

    from lmadda.data.synth import SynthConfig, synthesize
    from lmadda.training.source import SourceTrainConfig, train_source
    from tune.sweep import run_sweep
    from tune.sweep_config import SweepConfig

    root = Path(tempfile.mkdtemp(prefix="lmadda-sweep-bench-"))
    manifest, _ = synthesize(root / "data", SynthConfig(fields=16, size=128, seed=1))
    source = root / "source.pt"
    train_source(SourceTrainConfig(manifest=manifest.source, markers=["dapi"], ngf=8, depth=7, ndf=8, crop_size=128,
                                   batch_size=4, epochs=1, crops_per_epoch=16, device="cpu"), source, progress=False)
    ray.init(num_cpus=args.num_cpus, log_to_driver=False)
    record = {"benchmark": "sweep_overhead", "host": platform.node(), "date": date.today().isoformat(), "steps": args.steps, "runs": {}}
    for workers, concurrent in ((1, 1), (1, 2), (0, 1), (0, 2)):
        key = f"workers{workers}-concurrent{concurrent}"
        sweep = SweepConfig.model_validate({
            "name": f"bench-{key}", "storage_path": str(root / "sweeps"), "source": {"checkpoint": str(source)},
            "data": {"manifest": str(manifest.source), "source_setting": "phase_contrast", "target_setting": "bright_field"},
            "grid": {"layer": [0, 3, 7, 13], "lr": [2e-5]},
            "adapt": {"steps": args.steps, "batch_size": 4, "crop_size": 128, "log_every": 10},
            "resources": {"workers_per_trial": workers, "cpus_per_worker": args.num_cpus / concurrent - 0.02, "max_concurrent_trials": concurrent},
        })
        start = time.perf_counter()
        rows = run_sweep(sweep, log=lambda *_: None)
        wall = time.perf_counter() - start
        shares = [1 - r["steps_s"] / r["trial_s"] for r in rows if r.get("steps_s") and r.get("trial_s")]
        record["runs"][key] = {
            "wall_s": wall, "trials": len(rows), "steps_s": [r.get("steps_s") for r in rows], "trial_s": [r.get("trial_s") for r in rows],
            "overhead_share_median": statistics.median(shares) if shares else None,
        }
        mode = "Ray Train worker group" if workers else "in the trial's process"
        print(f"{mode}, {concurrent} concurrent: {len(rows)} trials in {wall:.1f} s; per trial: steps "
              f"{statistics.median(r['steps_s'] for r in rows):.1f} s of {statistics.median(r['trial_s'] for r in rows):.1f} s "
              f"-> {record['runs'][key]['overhead_share_median']:.0%} of a trial is not adaptation")
    runs = record["runs"]
    record["speedup_2_concurrent"] = runs["workers1-concurrent1"]["wall_s"] / runs["workers1-concurrent2"]["wall_s"]
    record["speedup_in_trial"] = runs["workers1-concurrent1"]["wall_s"] / runs["workers0-concurrent1"]["wall_s"]
    print(f"2 concurrent trials: {record['speedup_2_concurrent']:.2f}x the throughput of 1 (worker groups); "
          f"in-trial adaptation: {record['speedup_in_trial']:.2f}x (one at a time)")
    ray.shutdown()
    path = write_result(args.out, "sweep_overhead", record)
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
