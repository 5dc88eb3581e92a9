"""Benchmark: staining-endpoint latency over HTTP versus the raw in-process model, on this machine.

Registers a demo-sized generator (ngf 16, depth 8, random weights: speed does not depend on them) in
a temporary MLflow registry, starts the endpoint with `serve/config.yaml`'s application on a local
Ray instance, and loads it from a second process on loopback (N requests at concurrency C). For
each image size it prints p50/p95/p99 latency, throughput, the count of non-2xx answers, and the
in-process `predict_tiled` time of the same model and tiling, whose ratio is the endpoint's overhead.
Images larger than 256x256 get a fifth of the requests (they take seconds each on CPU). The ratio and
the fixed cost are also measured paired: one in-process forward, one request, alternated, so that
both see the same load of a shared machine (the figures to compare across code changes).

What the per-image domain score costs (lmadda.domain): the same model is also registered with a
domain reference, and the two are requested alternately at concurrency 1; the median ratio of their
latencies is the score's cost at the endpoint.

Where a request's time goes (figures only, nothing asserted): each stage the endpoint runs (decode
with the header's pixel check, percentile normalisation, tiling and blending, the forward passes,
camera units, TIFF encoding) timed in this process with the endpoint's own functions; the time
inside the replica's handler (its X-Lmadda-Seconds header) less those stages, which is the
micro-batch wait, the model lookup and the reload check; and the client's latency less the
handler's, which is Serve's proxy, the hop to the replica and HTTP on loopback.

    python bench/serve_latency.py [--sizes 256 1024] [--requests 200] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from results_file import write_result

import numpy as np

LOAD_SCRIPT = r"""
import json, sys, time, urllib.request, urllib.error
from concurrent.futures import ThreadPoolExecutor
url, body_path, n, concurrency = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
body = open(body_path, "rb").read()
def one(_):
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "image/tiff"}, method="POST")
    start = time.perf_counter()
    server = None
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            response.read(); status = response.status
            server = float(response.headers.get("X-Lmadda-Seconds") or "nan")
    except urllib.error.HTTPError as error:
        status = error.code
    return time.perf_counter() - start, status, server
start = time.perf_counter()
with ThreadPoolExecutor(concurrency) as pool:
    results = list(pool.map(one, range(n)))
print(json.dumps({"wall": time.perf_counter() - start, "latencies": [r[0] for r in results], "statuses": [r[1] for r in results],
                  "server": [r[2] for r in results]}))
"""
STAGES = ("decode", "percentiles", "tiling", "forward", "camera_units", "encode")


def stage_times(checkpoint, body: bytes, *, tile_batch: int, repeats: int = 5) -> dict[str, float]:
    """Median seconds of each stage of one request, run here with the endpoint's own functions."""
    import torch

    from lmadda.data.dataset import target_from_model_range
    from lmadda.inference import model_input, to_camera_units
    from lmadda.models.tiling import TilePlan
    from lmadda_serve.codec import decode_request_image, encode_tiff

    runs: dict[str, list[float]] = {stage: [] for stage in STAGES}
    for _ in range(repeats + 1):  # the first is a warm-up
        clock = {stage: 0.0 for stage in STAGES}
        start = time.perf_counter()
        image = decode_request_image(body, "image/tiff", max_bytes=2**31, max_megapixels=1e3)
        clock["decode"] = time.perf_counter() - start
        start = time.perf_counter()
        pixels = model_input(image.pixels, checkpoint)
        clock["percentiles"] = time.perf_counter() - start
        start = time.perf_counter()
        plan = TilePlan(pixels, checkpoint.config, tile=256, overlap=0.25)
        for origins, tiles in plan.batches(tile_batch):
            forward_start = time.perf_counter()
            with torch.no_grad():
                predictions = checkpoint.generator(torch.from_numpy(tiles)).float().numpy()
            clock["forward"] += time.perf_counter() - forward_start
            plan.add(origins, predictions)
        result = plan.result()
        clock["tiling"] = time.perf_counter() - start - clock["forward"]
        start = time.perf_counter()
        stains = to_camera_units(target_from_model_range(result), checkpoint)
        clock["camera_units"] = time.perf_counter() - start
        start = time.perf_counter()
        encode_tiff(stains[0], checkpoint.target_dtype, {"lmadda_markers": "dapi"})
        clock["encode"] = time.perf_counter() - start
        for stage, seconds in clock.items():
            runs[stage].append(seconds)
    return {stage: statistics.median(values[1:]) for stage, values in runs.items()}


def post(url: str, body: bytes) -> tuple[float, float]:
    """One request from this process: (client seconds, the handler's own X-Lmadda-Seconds)."""
    import urllib.request

    request = urllib.request.Request(url, data=body, headers={"Content-Type": "image/tiff"}, method="POST")
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as response:
        response.read()
        return time.perf_counter() - start, float(response.headers["X-Lmadda-Seconds"])


def paired_overhead(url: str, body: bytes, reference, rounds: int) -> dict:
    """The endpoint at concurrency 1 against the in-process tiled forward, alternated request by request:
    on a shared machine the load drifts within seconds, and each pair sees the same load. Medians
    over the pairs of their ratio and of their difference (the endpoint's fixed cost)."""
    pairs = []
    for _ in range(rounds):
        start = time.perf_counter()
        reference()
        forward_s = time.perf_counter() - start
        client_s, handler_s = post(url, body)
        pairs.append((client_s, handler_s, forward_s))
    return {"rounds": rounds, "client_p50_s": statistics.median(p[0] for p in pairs),
            "handler_p50_s": statistics.median(p[1] for p in pairs), "forward_p50_s": statistics.median(p[2] for p in pairs),
            "ratio_p50": statistics.median(p[0] / p[2] for p in pairs), "fixed_cost_p50_s": statistics.median(p[0] - p[2] for p in pairs)}


def paired_domain_cost(url: str, setting: str, scored_setting: str, body: bytes, rounds: int) -> dict:
    """What the per-image domain score costs a request: the same model with and without a domain reference
    (two registry settings), requested alternately so both see the same load. Medians over the pairs."""
    pairs = []
    for _ in range(rounds):
        plain = post(url.format(setting=setting), body)
        scored = post(url.format(setting=scored_setting), body)
        pairs.append((plain[0], scored[0], plain[1], scored[1]))
    return {"rounds": rounds, "client_p50_s": statistics.median(p[0] for p in pairs),
            "client_scored_p50_s": statistics.median(p[1] for p in pairs),
            "client_ratio_p50": statistics.median(p[1] / p[0] for p in pairs),
            "handler_ratio_p50": statistics.median(p[3] / p[2] for p in pairs)}


def print_breakdown(size: int, stages: dict[str, float], load: dict) -> dict:
    """Client latency at concurrency 1, split into the stages, the rest of the handler, and the proxy."""
    server = statistics.median(load["server_s"])
    client = load["p50_s"]
    proxy = statistics.median(load["proxy_s"])
    rows = {**stages, "handler_other": server - sum(stages.values()), "proxy_and_http": proxy}
    print(f"  {size:>4}x{size:<4} where the time goes at concurrency 1 (ms; stages timed in this process, the rest by difference):")
    print("    " + "  ".join(f"{name} {seconds * 1000:.1f}" for name, seconds in rows.items())
          + f"  | handler {server * 1000:.1f}  client p50 {client * 1000:.1f}")
    return rows


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def measure_load(url: str, body_path: Path, size: int, args) -> dict:
    """Latency percentiles and throughput at concurrency 1 and args.concurrency, from a second process."""
    subprocess.run([sys.executable, "-c", LOAD_SCRIPT, url, str(body_path), "3", "1"], check=True, capture_output=True)  # warm-up
    load = {}
    for concurrency in sorted({1, args.concurrency}):
        # Large images take seconds each on CPU: a fifth as many requests keeps the run in minutes.
        count = args.requests if size <= 256 else max(20, args.requests // 5)
        count = count if concurrency > 1 else max(10, count // 10)
        done = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, url, str(body_path), str(count), str(concurrency)],
                              check=True, capture_output=True, text=True)
        result = json.loads(done.stdout)
        latencies = result["latencies"]
        served = [(c, s) for c, s in zip(latencies, result["server"]) if s is not None]
        load[concurrency] = {
            "requests": count, "p50_s": percentile(latencies, 50), "p95_s": percentile(latencies, 95),
            "p99_s": percentile(latencies, 99), "throughput_rps": count / result["wall"],
            "non_2xx": sum(1 for s in result["statuses"] if not 200 <= s < 300),
            "5xx": sum(1 for s in result["statuses"] if s >= 500),
            "server_s": [s for _, s in served], "proxy_s": [c - s for c, s in served],  # per request: the handler's time, the rest
        }
    return load


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=40, help="alternated endpoint/in-process rounds at 256x256 (a quarter above)")
    parser.add_argument("--micro-batch", choices=("both", "on", "off"), default="both", help="endpoint modes to measure")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()

    import ray
    import tifffile
    import torch
    from ray import serve

    from lmadda.checkpoint import GeneratorCheckpoint, load_checkpoint, save_checkpoint
    from lmadda.sweep.promotion import register_checkpoint
    from lmadda.data.dataset import to_model_range
    from lmadda.data.normalise import normalise
    from lmadda.models.tiling import predict_tiled
    from lmadda.models import GeneratorConfig, UNetGenerator
    from lmadda.models.generator import init_weights
    from lmadda_serve.local import start_local

    root = Path(tempfile.mkdtemp(prefix="lmadda-serve-bench-"))
    torch.manual_seed(0)
    generator = UNetGenerator(GeneratorConfig(in_channels=1, out_channels=2, ngf=16, depth=8))
    init_weights(generator)
    checkpoint = GeneratorCheckpoint(generator=generator.eval(), markers=["dapi", "cd29"], setting="bench")
    path = save_checkpoint(root / "generator.pt", checkpoint)
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    register_checkpoint(tracking_uri, path, "dapi", "bench", experiment="serve-bench")
    # The same model with a domain reference, so every request to this setting is scored (lmadda.domain)
    from lmadda.domain import build_reference

    reference_image = to_model_range(normalise(np.random.default_rng(1).integers(0, 4000, size=(1, 1024, 1024)).astype(np.float32))[0])
    scored = GeneratorCheckpoint(generator=generator.eval(), markers=["dapi", "cd29"], setting="bench",
                                 domain_reference=build_reference(generator, [reference_image], domain="bench", crops=16))
    register_checkpoint(tracking_uri, save_checkpoint(root / "generator_scored.pt", scored), "dapi", "bench_scored", experiment="serve-bench")

    ray.init(num_cpus=args.num_cpus, log_to_driver=False)
    # One replica with every CPU: Ray sets a replica's torch threads to its num_cpus, and the
    # in-process reference below uses all of them too.
    whole_machine = {"ray_actor_options": {"num_cpus": args.num_cpus}, "autoscaling_config": {"min_replicas": 1, "max_replicas": 1}}
    torch.set_num_threads(max(1, args.num_cpus))
    record = {"date": date.today().isoformat(), "host": platform.node(), "cpus": args.num_cpus, "requests": args.requests,
              "concurrency": args.concurrency, "model": "UNet ngf16 depth8, tile 256, overlap 0.25, tile batch 4", "sizes": {}}
    rng = np.random.default_rng(0)
    bodies, forward, stages, references = {}, {}, {}, {}
    served_model = load_checkpoint(path)  # as a replica loads it
    served_model.generator.eval()
    for size in args.sizes:
        image = rng.integers(0, 4000, size=(size, size)).astype(np.uint16)
        bodies[size] = root / f"image_{size}.tif"
        tifffile.imwrite(bodies[size], image)
        # The raw forward, in this process: the same normalisation, tiling and tile batch as the endpoint.
        model_input = to_model_range(normalise(image[None].astype(np.float32))[0])
        references[size] = lambda model_input=model_input: predict_tiled(generator, model_input, tile=256, overlap=0.25,
                                                                          batch_size=4, device="cpu")
        references[size]()  # warm-up
        times = []
        for _ in range(5):
            start = time.perf_counter()
            references[size]()
            times.append(time.perf_counter() - start)
        forward[size] = statistics.median(times)
        stages[size] = stage_times(served_model, bodies[size].read_bytes(), tile_batch=4)
        record["sizes"][str(size)] = {"forward_in_process_s": forward[size], "stages_in_process_s": stages[size]}
        print(f"{size}x{size}: in-process forward {forward[size] * 1000:.1f} ms; stages "
              + ", ".join(f"{name} {seconds * 1000:.1f}" for name, seconds in stages[size].items()) + " ms")

    for micro_batch in {"both": (True, False), "on": (True,), "off": (False,)}[args.micro_batch]:
        mode = "micro_batch_on" if micro_batch else "micro_batch_off"
        url = start_local(host="127.0.0.1", port=8765, tracking_uri=tracking_uri, cache_dir=str(root / "cache"),
                          max_in_flight=max(8, args.concurrency), micro_batch=micro_batch, tile_batch=4, deployment=whole_machine)
        print(f"--- endpoint, micro-batching {'on' if micro_batch else 'off'}")
        for size in args.sizes:
            load = measure_load(f"{url}/v1/stain?setting=bench&marker=dapi", bodies[size], size, args)
            paired = paired_overhead(f"{url}/v1/stain?setting=bench&marker=dapi", bodies[size].read_bytes(), references[size],
                                     args.pairs if size <= 256 else max(5, args.pairs // 4))
            print(f"  {size:>4}x{size:<4} paired at concurrency 1 ({paired['rounds']} rounds): endpoint {paired['client_p50_s'] * 1000:.1f} ms, "
                  f"handler {paired['handler_p50_s'] * 1000:.1f} ms, in-process forward {paired['forward_p50_s'] * 1000:.1f} ms; "
                  f"ratio {paired['ratio_p50']:.3f}, fixed cost {paired['fixed_cost_p50_s'] * 1000:.1f} ms")
            domain_cost = paired_domain_cost(f"{url}/v1/stain?setting={{setting}}&marker=dapi", "bench", "bench_scored",
                                             bodies[size].read_bytes(), args.pairs if size <= 256 else max(5, args.pairs // 4))
            print(f"  {size:>4}x{size:<4} domain score, paired ({domain_cost['rounds']} rounds): endpoint "
                  f"{domain_cost['client_p50_s'] * 1000:.1f} ms without, {domain_cost['client_scored_p50_s'] * 1000:.1f} ms with; "
                  f"ratio {domain_cost['client_ratio_p50']:.3f} (handler {domain_cost['handler_ratio_p50']:.3f})")
            breakdown = print_breakdown(size, stages[size], load[1])
            record["sizes"][str(size)][mode] = {"load": load, "p50_over_forward_at_concurrency_1": load[1]["p50_s"] / forward[size],
                                                "paired_concurrency_1": paired, "domain_score_paired": domain_cost,
                                                "breakdown_concurrency_1_s": breakdown}
            for concurrency, row in load.items():
                print(f"  {size:>4}x{size:<4} concurrency {concurrency:>2}: p50 {row['p50_s'] * 1000:7.1f} ms  p95 {row['p95_s'] * 1000:7.1f} ms  "
                      f"p99 {row['p99_s'] * 1000:7.1f} ms  {row['throughput_rps']:6.2f} req/s  non-2xx {row['non_2xx']}  5xx {row['5xx']}")
            print(f"  {size:>4}x{size:<4} endpoint p50 / in-process forward (concurrency 1): {load[1]['p50_s'] / forward[size]:.2f}; "
                  f"fixed cost (their difference) {(load[1]['p50_s'] - forward[size]) * 1000:.1f} ms")
        serve.delete("lmadda")
    serve.shutdown()
    ray.shutdown()
    out = write_result(args.out, "serve_latency", record)
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
