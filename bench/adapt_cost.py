"""Benchmark: LM-ADDA step time and peak memory per matched layer, next to the analytic FLOPs of
layers 0..l, and source-training throughput. Prints figures; never asserts timings.

    python bench/adapt_cost.py [--ngf 16] [--size 256] [--batch 4] [--steps 5] [--device cpu]
"""

from __future__ import annotations

import argparse
import platform
import resource
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

from lmadda.checkpoint import GeneratorCheckpoint
from lmadda.data.dataset import LoadedImage
from lmadda.data.normalise import NormalisationParams
from lmadda.models import GeneratorConfig, PatchDiscriminator, UNetGenerator
from lmadda.models.generator import init_weights
from lmadda.training.adapt import AdaptConfig, adapt
from lmadda.training.source import pix2pix_step
from results_file import write_result


def layer_flops(generator: UNetGenerator, size: int) -> list[float]:
    """Multiply-accumulates x 2 of each layer's convolution for one image of size x size."""
    x = torch.zeros(1, generator.config.in_channels, size, size)
    hooks, per_layer = [], {}

    def hook(index):
        def record(module, inputs, output):
            kernel = module.weight.shape[2] * module.weight.shape[3]
            if isinstance(module, torch.nn.ConvTranspose2d):
                macs = inputs[0].numel() * module.out_channels * kernel
            else:
                macs = output.numel() * module.in_channels * kernel
            per_layer[index] = per_layer.get(index, 0) + 2 * macs
        return record

    for index, layer in enumerate(generator.layers):
        for module in layer.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
                hooks.append(module.register_forward_hook(hook(index)))
    with torch.no_grad():
        generator(x)
    for h in hooks:
        h.remove()
    return [per_layer.get(i, 0) for i in range(generator.num_layers)]


def discriminator_flops(generator: UNetGenerator, size: int, width: int = 32) -> list[float]:
    """FLOPs of the feature discriminator LM-ADDA builds for each layer's activation, per image."""
    from lmadda.models.discriminators import FeatureDiscriminator

    x = torch.zeros(1, generator.config.in_channels, size, size)
    flops = []
    with torch.no_grad():
        for layer in range(generator.num_layers):
            activation = generator.forward_to(layer, x).activation
            discriminator = FeatureDiscriminator(activation.shape[1], min(activation.shape[2:]), width=width)
            total = 0.0

            def count(module, inputs, output):
                nonlocal total
                if isinstance(module, torch.nn.Conv2d):
                    total += 2.0 * output.numel() * module.in_channels * module.weight.shape[2] * module.weight.shape[3]

            handles = [m.register_forward_hook(count) for m in discriminator.modules()]
            discriminator(activation)
            for handle in handles:
                handle.remove()
            flops.append(total)
    return flops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ngf", type=int, default=16)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.manual_seed(0)
    generator = UNetGenerator(GeneratorConfig(ngf=args.ngf, depth=8, out_channels=1))
    init_weights(generator)
    source = GeneratorCheckpoint(generator=generator.eval(), markers=["dapi"], setting="bench")
    rng = np.random.default_rng(0)
    norm = NormalisationParams((0.0,), (1.0,))
    images = [LoadedImage(field=str(i), input=rng.normal(size=(1, args.size, args.size)).astype(np.float32), input_norm=norm) for i in range(8)]
    flops = layer_flops(generator, args.size)
    total = sum(flops)
    d_flops = discriminator_flops(generator, args.size)

    rows = []
    for layer in range(generator.num_layers):
        # gate and warm-up off: every step must include the G' update being measured
        config = AdaptConfig(layer=layer, steps=args.steps + 1, batch_size=args.batch, crop_size=args.size, log_every=1,
                             gate_accuracy=None, d_warmup_steps=0, device=args.device)
        result = adapt(source, images, images, config, progress=False)
        # the first step includes data-loader and allocator warm-up: time the rest from the loop's clock
        seconds_per_step = result.seconds / (args.steps + 1)
        rows.append({"layer": layer, "step_s": seconds_per_step, "flops_0_to_l": sum(flops[: layer + 1]), "d_flops": d_flops[layer]})
    last = rows[-1]["step_s"]
    print(f"LM-ADDA step time per matched layer (ngf={args.ngf}, {args.size}x{args.size}, batch {args.batch}, {args.device})")
    print(f"{'layer':>5} {'step s':>8} {'time/time(15)':>14} {'FLOPs(0..l)/all':>16} {'ratio':>7} {'D FLOPs / G(0..l)':>18}")
    for row in rows:
        row["time_ratio"] = row["step_s"] / last
        row["flop_ratio"] = row["flops_0_to_l"] / total
        row["d_over_g"] = row["d_flops"] / row["flops_0_to_l"]
        print(f"{row['layer']:>5} {row['step_s']:>8.3f} {row['time_ratio']:>14.3f} {row['flop_ratio']:>16.3f} "
              f"{row['time_ratio'] / row['flop_ratio']:>7.2f} {row['d_over_g']:>18.2f}")
    sweep_ratio = sum(r["step_s"] for r in rows) / (len(rows) * last)
    print(f"a full 16-layer sweep costs {sweep_ratio:.2f} x 16 full-network adaptations")

    discriminator = PatchDiscriminator(2, ndf=16)
    optimizer_g = torch.optim.Adam(generator.parameters(), 2e-4, betas=(0.5, 0.999))
    optimizer_d = torch.optim.Adam(discriminator.parameters(), 2e-4, betas=(0.5, 0.999))
    generator.train()
    x = torch.randn(args.batch, 1, args.size, args.size)
    y = torch.randn(args.batch, 1, args.size, args.size).clamp(-0.8, 0.8)
    pix2pix_step(generator, discriminator, optimizer_g, optimizer_d, x, y, 100.0)
    start = time.perf_counter()
    for _ in range(args.steps):
        pix2pix_step(generator, discriminator, optimizer_g, optimizer_d, x, y, 100.0)
    images_per_second = args.steps * args.batch / (time.perf_counter() - start)
    print(f"source training: {images_per_second:.2f} images/s at {args.size}x{args.size}, batch {args.batch}")
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak resident memory of the process: {peak_mb:.0f} MiB")

    record = {"benchmark": "adapt_cost", "host": platform.node(), "date": date.today().isoformat(), "args": vars(args) | {"out": str(args.out)},
              "layers": rows, "sweep_ratio": sweep_ratio, "source_images_per_s": images_per_second, "peak_rss_mib": peak_mb}
    path = write_result(args.out, "adapt_cost", record)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
