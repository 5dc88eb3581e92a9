"""`lmadda export`: a generator checkpoint as a package other tools open (the BioImage Model Zoo format)."""

from __future__ import annotations

import argparse
from pathlib import Path

FORMATS = ("bioimageio",)


def register(subparsers: argparse._SubParsersAction) -> None:
    export = subparsers.add_parser(
        "export", help="package a model for the BioImage Model Zoo (deepImageJ, napari, bioimageio.core)",
        description="Write CHECKPOINT as a BioImage Model Zoo package (model description 0.5, a .zip): TorchScript and "
                    "PyTorch weights, lmadda's normalisation as pre- and postprocessing, test tensors cut from a real image, "
                    "a README and, for an adapted model, its lineage. bioimageio.core runs the package on its test input "
                    "and must reproduce lmadda's output before the package is written. Needs: pip install 'lmadda[bioimageio]'.")
    export.add_argument("checkpoint", type=Path, metavar="CHECKPOINT")
    export.add_argument("--format", choices=FORMATS, default="bioimageio", help="package format (default bioimageio)")
    export.add_argument("--out", type=Path, required=True, help="package to write (.zip)")
    export.add_argument("--sample-image", type=Path, metavar="PATH",
                        help="an image (TIFF or PNG) of the setting the model is for; its central tile (up to 256 px) becomes the "
                             "test input. Default: the first test image of the model's setting in its training manifest")
    export.add_argument("--parent", metavar="ZOO_ID",
                        help="for an adapted model: the zoo id of its source model, when that is published (e.g. affable-shark); "
                             "the lineage lmadda recorded goes into the package either way")
    export.add_argument("--author", action="append", dest="authors", metavar="NAME", help="an author of the model (repeat for more)")
    export.add_argument("--name", help="the model's name in the zoo (default: from its method, setting and markers)")
    export.add_argument("--overwrite", action="store_true", help="replace an existing --out (only once the new package passed its test)")
    export.add_argument("--no-test", dest="test", action="store_false",
                        help="skip running the package under bioimageio.core before writing it (faster; run `bioimageio test` later)")
    export.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    from lmadda.export.bioimageio import export_bioimageio

    # export_bioimageio refuses a request that cannot succeed before any work
    result = export_bioimageio(args.checkpoint, args.out, sample_image=args.sample_image, overwrite=args.overwrite,
                               parent=args.parent, authors=args.authors, name=args.name, test=args.test)
    top, left, side = result.crop
    tested = "bioimageio.core reproduced lmadda's output on it" if result.tested else "not tested (--no-test)"
    print(f"wrote {result.path}: BioImage Model Zoo package of {args.checkpoint}"
          f"{' with its adaptation lineage' if result.adapted else ''}; test tile {side}x{side} px at ({top}, {left}) of "
          f"{result.sample}, {tested}")
    if not args.authors:
        print("note: no --author given; the package names its author 'Unknown': pass --author NAME before publishing it")
    return 0
