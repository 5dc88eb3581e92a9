"""Benchmark: source-training throughput (images/s of a full pix2pix step, G and D) by image size and
batch size, for lmadda's indexed UNet against the nested reference UNet (bench/nested_unet.py), and
for the speed options (channels_last, bf16 autocast, torch.compile) against eager fp32, all in the
same run. On a GPU it also prints model FLOP utilisation against --peak-tflops.

    python bench/train_throughput.py [--device cpu] [--ngf 16] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from nested_unet import NestedUnetGenerator  # noqa: E402
from results_file import write_result  # noqa: E402

from lmadda.models import GeneratorConfig, PatchDiscriminator, UNetGenerator  # noqa: E402
from lmadda.models.generator import init_weights  # noqa: E402
from lmadda.training.source import pix2pix_step  # noqa: E402


def generator_flops(generator: torch.nn.Module, size: int) -> float:
    """Forward multiply-adds x 2 of every conv for one image (training costs ~3x this)."""
    total = 0.0

    def hook(module, inputs, output):
        nonlocal total
        kernel = module.weight.shape[2] * module.weight.shape[3]
        if isinstance(module, torch.nn.ConvTranspose2d):
            total += 2.0 * inputs[0].numel() * module.out_channels * kernel
        else:
            total += 2.0 * output.numel() * module.in_channels * kernel

    handles = [m.register_forward_hook(hook) for m in generator.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    with torch.no_grad():
        generator.eval()(torch.zeros(1, 1, size, size))
    for handle in handles:
        handle.remove()
    generator.train()
    return total


def measure(make_generator, size: int, batch: int, device: str, steps: int, *, channels_last=False, bf16=False, compile_=False) -> float:
    torch.manual_seed(0)
    generator, discriminator = make_generator().to(device), PatchDiscriminator(2, ndf=16).to(device)
    init_weights(generator)
    init_weights(discriminator)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    generator, discriminator = generator.to(memory_format=memory_format), discriminator.to(memory_format=memory_format)
    if compile_:
        generator, discriminator = torch.compile(generator), torch.compile(discriminator)
    optimizer_g = torch.optim.Adam(generator.parameters(), 2e-4, betas=(0.5, 0.999))
    optimizer_d = torch.optim.Adam(discriminator.parameters(), 2e-4, betas=(0.5, 0.999))
    x = torch.randn(batch, 1, size, size, device=device).contiguous(memory_format=memory_format)
    y = torch.randn(batch, 1, size, size, device=device).clamp(-0.8, 0.8).contiguous(memory_format=memory_format)
    autocast = torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def step():
        with autocast:
            pix2pix_step(generator, discriminator, optimizer_g, optimizer_d, x, y, 100.0)

    step()  # warm-up (and compilation)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--ngf", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="fewer shapes (what make bench runs on CPU)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (e.g. 989 for H100 bf16 dense)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    config = GeneratorConfig(in_channels=1, out_channels=1, ngf=args.ngf, depth=8)
    indexed = lambda: UNetGenerator(config)  # noqa: E731
    nested = lambda: NestedUnetGenerator(1, 1, 8, args.ngf)  # noqa: E731
    # Same network; lmadda gives the two convs without a following BatchNorm a bias (144 parameters at ngf 16).
    counts = [sum(p.numel() for p in make().parameters()) for make in (indexed, nested)]
    assert abs(counts[0] - counts[1]) / counts[1] < 1e-3, counts
    shapes = [(256, 1), (256, 4), (256, 16), (1024, 1), (1024, 4)] if not args.quick else [(256, 4), (256, 16), (1024, 1)]
    rows = []
    print(f"source training throughput, images/s (pix2pix step: G and D), ngf {args.ngf}, {args.device}")
    print(f"{'size':>5} {'batch':>5} {'indexed':>9} {'nested':>9} {'ratio':>6} {'ch_last':>9} {'bf16':>9} {'compile':>9}")
    for size, batch in shapes:
        row = {"size": size, "batch": batch}
        row["indexed"] = measure(indexed, size, batch, args.device, args.steps)
        row["nested"] = measure(nested, size, batch, args.device, args.steps)
        row["channels_last"] = measure(indexed, size, batch, args.device, args.steps, channels_last=True)
        row["bf16"] = measure(indexed, size, batch, args.device, args.steps, bf16=True)
        try:
            row["compile"] = measure(indexed, size, batch, args.device, args.steps, compile_=True) if size == 256 else None
        except Exception as error:  # no C++ toolchain for inductor, and the like: report, do not fail
            row["compile"], row["compile_error"] = None, f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"
        flops = generator_flops(indexed(), size)
        row["train_flops_per_image"] = 3 * flops
        if args.peak_tflops:
            row["mfu_fp32_eager"] = row["indexed"] * 3 * flops / (args.peak_tflops * 1e12)
        rows.append(row)
        cell = lambda v: f"{v:9.2f}" if v else f"{'n/a':>9}"  # noqa: E731
        print(f"{size:>5} {batch:>5} {cell(row['indexed'])} {cell(row['nested'])} {row['indexed'] / row['nested']:6.2f} "
              f"{cell(row['channels_last'])} {cell(row['bf16'])} {cell(row['compile'])}")
        if row.get("compile_error"):
            print(f"      torch.compile unavailable: {row['compile_error']}")
    path = write_result(args.out, "train_throughput", {"benchmark": "train_throughput", "host": platform.node(), "date": date.today().isoformat(),
                                "device": args.device, "torch": torch.__version__, "rows": rows})
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
