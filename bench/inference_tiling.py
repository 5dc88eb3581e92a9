"""Benchmark: tiled prediction of a large 16-bit image versus one whole-image forward.

Each measurement runs in its own subprocess so its peak resident memory is its own. Prints seconds,
megapixels/s and peak memory for tiled (`predict_tiled`, 256 tiles, 25 % overlap, batch 8) and
untiled inference of a demo-sized generator (ngf 16, depth 8), their ratio, and the share of that
ratio the overlap itself explains: at 25 % overlap each pixel is computed (1/0.75)^2 = 1.78 times.

    python bench/inference_tiling.py [--size 4096] [--tile 256] [--overlap 0.25]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
from datetime import date
from pathlib import Path

from results_file import write_result

CHILD = r"""
import json, resource, sys, time
import numpy as np, torch
from lmadda.models import GeneratorConfig, UNetGenerator
from lmadda.models.generator import init_weights
from lmadda.models.tiling import predict_tiled
mode, size, tile, overlap, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
torch.manual_seed(0)
generator = UNetGenerator(GeneratorConfig(in_channels=1, out_channels=2, ngf=16, depth=8)).eval()
init_weights(generator)
image = np.random.default_rng(0).uniform(-1, 1, size=(1, size, size)).astype(np.float32)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
if mode == "tiled":
    out = predict_tiled(generator, image, tile=tile, overlap=overlap, batch_size=batch, device="cpu")
else:
    with torch.no_grad():
        out = generator(torch.from_numpy(image)[None])[0].numpy()
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "rss_before_mib": before / 1024, "shape": list(out.shape)}))
"""


def run(mode: str, args) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, mode, str(args.size), str(args.tile), str(args.overlap), str(args.batch)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--overlap", type=float, default=0.25)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    megapixels = args.size**2 / 1e6
    tiled, untiled = run("tiled", args), run("untiled", args)
    stride = args.tile - round(args.tile * args.overlap)
    tiles_per_axis = math.ceil((args.size - args.tile) / stride) + 1
    redundancy = (tiles_per_axis * args.tile) ** 2 / args.size**2
    print(f"{args.size}x{args.size} image, UNet ngf16 depth8, CPU")
    for name, result in (("tiled", tiled), ("untiled", untiled)):
        if "error" in result:
            print(f"  {name:8s} failed: {result['error']}")
        else:
            print(f"  {name:8s} {result['seconds']:7.2f} s  {megapixels / result['seconds']:6.2f} MP/s  peak RSS {result['peak_rss_mib']:7.0f} MiB")
    record = {"benchmark": "inference_tiling", "host": platform.node(), "date": date.today().isoformat(), "args": vars(args) | {"out": str(args.out)},
              "tiled": tiled, "untiled": untiled, "pixels_computed_per_pixel": redundancy}
    if "error" not in tiled and "error" not in untiled:
        ratio = tiled["seconds"] / untiled["seconds"]
        record.update({"tiled_over_untiled": ratio, "tiled_over_untiled_per_computed_pixel": ratio / redundancy})
        print(f"  tiled / untiled time {ratio:.2f}; the {args.overlap:.0%} overlap computes each pixel {redundancy:.2f} times, "
              f"so per computed pixel tiling costs {ratio / redundancy:.2f}x")
    path = write_result(args.out, "inference_tiling", record)
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
