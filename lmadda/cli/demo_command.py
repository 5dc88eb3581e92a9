"""`lmadda demo`: the main job on the embedded simulated data, end to end."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    demo = subparsers.add_parser("demo", help="simulate data and run the demo study (what `make demo` runs)")
    demo.add_argument("--out", type=Path, default=Path("demo-out"), help="output folder (reused if present)")
    demo.add_argument("--fields", type=int, default=64)
    demo.add_argument("--size", type=int, default=256)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from lmadda.data.contact_sheet import contact_sheet
    from lmadda.data.manifest import Manifest
    from lmadda.data.synth import SynthConfig, synthesize

    data_dir = args.out / "data"
    manifest_path = data_dir / "manifest.parquet"
    if manifest_path.exists():
        manifest = Manifest.load(manifest_path)
        print(f"[demo] reusing simulated data in {data_dir}")
    else:
        manifest, seconds = synthesize(data_dir, SynthConfig(fields=args.fields, size=args.size, seed=args.seed))
        print(f"[demo] simulated {len(manifest.fields())} fields in {seconds:.1f} s -> {data_dir}")
    print(manifest.summary())
    sheet = contact_sheet(manifest, args.out / "contact_sheet.png")
    print(f"[demo] contact sheet: {sheet}")
    return 0
