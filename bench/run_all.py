"""`make bench`: every CPU benchmark in turn, then one file bench/results/<date>-<host>.json that
holds all their figures (each benchmark also keeps its own JSON beside it).

    python bench/run_all.py [--skip serve_latency ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

from results_file import result_path, write_result

HERE = Path(__file__).parent
# (name, arguments): sized so the whole suite stays under 10 minutes on 2 CPU cores.
BENCHMARKS = [
    ("adapt_cost", ["--steps", "5"]),
    ("train_throughput", ["--quick"]),
    ("inference_tiling", []),
    ("serve_latency", ["--requests", "200", "--concurrency", "8"]),
    ("abuse", []),  # bounded DoS cases against a loopback endpoint: statuses, times, replica peak memory
    ("sweep_overhead", ["--steps", "40"]),
    ("domain_calibration", []),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip", nargs="*", default=[], choices=[name for name, _ in BENCHMARKS])
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    suite = {"host": platform.node(), "date": date.today().isoformat(), "cpus": os.cpu_count(), "benchmarks": {}}
    failed = []
    for name, extra in BENCHMARKS:
        if name in args.skip:
            continue
        print(f"\n=== {name} ===", flush=True)
        start = time.perf_counter()
        done = subprocess.run([sys.executable, str(HERE / f"{name}.py"), "--out", str(args.out), *extra], env=env)
        seconds = time.perf_counter() - start
        result = result_path(args.out, name)
        if done.returncode != 0 or not result.is_file():
            failed.append(name)
            suite["benchmarks"][name] = {"error": f"exit {done.returncode}", "seconds": seconds}
            continue
        suite["benchmarks"][name] = {**json.loads(result.read_text()), "seconds": seconds}
    path = write_result(args.out, None, suite)
    total = sum(b["seconds"] for b in suite["benchmarks"].values())
    print(f"\nsuite: {total / 60:.1f} min -> {path}" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
