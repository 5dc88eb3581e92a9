"""`lmadda demo`: the main job on the embedded simulated data, end to end."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    demo = subparsers.add_parser("demo", help="simulate data and run the demo study (what `make demo` runs)",
                                 description="Simulate data, train a source model, adapt it at several layers to bright field and to overexposure, and write the table and figures. Reuses finished stages in --out.")
    demo.add_argument("--out", type=Path, default=Path("demo-out"), help="output folder (finished stages are reused)")
    demo.add_argument("--fields", type=int, default=64)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--source-epochs", type=int, default=None)
    demo.add_argument("--adapt-steps", type=int, default=None)
    demo.add_argument("--layers", default=None, help="comma-separated matched layers (default 0,3,15)")
    demo.add_argument("--paper", action="store_true", help="also adapt with ADDA as published at the last layer (slower; the study always runs it)")
    demo.add_argument("--oracle", action="store_true", help="also train an oracle per target (slower)")
    demo.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> int:
    from lmadda.core.config import build_config
    from lmadda.demo import DemoConfig, run_demo as run

    layers = [int(v) for v in args.layers.split(",")] if args.layers else None
    config = build_config(DemoConfig, None, out=args.out, fields=args.fields, seed=args.seed, source_epochs=args.source_epochs,
                          adapt_steps=args.adapt_steps, layers=layers, paper=args.paper or None, oracle=args.oracle or None)
    run(config)
    return 0
