"""`lmadda data index | show | synth`."""

from __future__ import annotations

import argparse
from pathlib import Path

from lmadda.core.errors import LmaddaError
from lmadda.data.io import refuse_overwriting_inputs
from lmadda.data.manifest import manifest_inputs


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key or not value:
        raise argparse.ArgumentTypeError(f"{text!r} must be NAME=VALUE")
    return key, value


def _fractions(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} must be three numbers, e.g. 0.7,0.15,0.15") from None
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"{text!r} must be three numbers (train,val,test), e.g. 0.7,0.15,0.15")
    return values  # type: ignore[return-value]


def _acquisition_fractions(text: str) -> tuple[str, tuple[float, float, float]]:
    acquisition, fractions = _key_value(text)
    return acquisition, _fractions(fractions)


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="index, inspect and simulate paired microscopy data")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")

    index = data_sub.add_parser(
        "index",
        help="build a Parquet manifest from a folder of TIFF/PNG/OME-Zarr images by filename patterns, or from an OME-Zarr HCS plate",
        description=(
            "Build a manifest from a folder of images (TIFF, PNG, or OME-Zarr image folders named *.zarr). Each --pattern is a "
            "regular expression matched against the path relative to DIR, with named groups (?P<field>...) and (?P<channel>...), "
            "optionally (?P<z>...) focus in micrometres, (?P<split>...) and (?P<acquisition>...) for folders "
            "of several experiments whose fields share file names (fields become <acquisition>_<field>, input "
            "settings <setting>_<acquisition>, split fractions apply per acquisition). Channels named by --target "
            "are fluorescence markers; all other channels are input settings. When DIR is an OME-Zarr HCS plate, no --pattern is "
            "needed: every field of every well becomes a field <row><column>_<field> (A1_0), its channels (the plate's omero "
            "labels, else c0, c1, ...) become settings or, with --target, markers, and splits are drawn per well "
            "(--split may name a well, A1, or a field, A1_0)."
        ),
        epilog=(
            "examples: lmadda data index images/ --pattern '(?P<field>\\w+)_(?P<channel>\\w+)\\.tif' "
            "--target dapi=dapi --out manifest.parquet;  "
            "lmadda data index plate.ome.zarr --rename 'Phase=phase_contrast' --target DAPI=dapi --out manifest.parquet"
        ),
    )
    index.add_argument("folder", type=Path, metavar="DIR")
    index.add_argument("--pattern", action="append", default=[],
                       help="regex with field and channel groups; repeatable, first match wins (not for a plate)")
    index.add_argument("--target", action="append", default=[], type=_key_value, metavar="CHANNEL=MARKER", help="a channel that is a target marker")
    index.add_argument("--rename", action="append", default=[], type=_key_value, metavar="CHANNEL=SETTING", help="name an input channel's setting")
    index.add_argument("--split", action="append", default=[], type=_key_value, metavar="FIELD=SPLIT", help="put a field in train/val/test")
    index.add_argument("--split-fractions", type=_fractions, default=(0.7, 0.15, 0.15), help="train,val,test fractions for unassigned fields")
    index.add_argument("--acquisition-fractions", action="append", default=[], type=_acquisition_fractions,
                       metavar="ACQUISITION=TRAIN,VAL,TEST", help="split fractions of one acquisition (e.g. ds4=0.8,0.2,0)")
    index.add_argument("--seed", type=int, default=0, help="seed of the split assignment")
    index.add_argument("--bit-depth", type=int, default=None, help="camera bit depth when lower than the storage type (e.g. 12)")
    index.add_argument("--pixel-size-um", type=float, default=None)
    index.add_argument("--focus-round", type=float, default=1.0, metavar="UM", help="round defocus names to this step in micrometres")
    index.add_argument("--in-focus", action="append", default=[], type=_key_value, metavar="CHANNEL=Z",
                       help="the in-focus plane of CHANNEL's focus stacks: a z in micrometres, or median (default) | min | max")
    index.add_argument("--out", type=Path, required=True, help="manifest file to write (.parquet)")
    index.set_defaults(func=run_index)

    show = data_sub.add_parser("show", help="summarise a manifest (counts, shapes, dtypes) and optionally draw a contact sheet")
    show.add_argument("manifest", type=Path, metavar="MANIFEST")
    show.add_argument("--png", type=Path, default=None, help="write a contact sheet of a few fields here")
    show.add_argument("--fields", type=int, default=4, help="fields in the contact sheet")
    show.set_defaults(func=run_show)

    synth = data_sub.add_parser("synth", help="simulate paired phase contrast / bright field / DAPI / CD29-like fields")
    synth.add_argument("--out", type=Path, required=True, help="folder for the TIFFs and manifest.parquet")
    synth.add_argument("--fields", type=int, default=64)
    synth.add_argument("--size", type=int, default=256, help="field size in pixels (square)")
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(func=run_synth)


def run_index(args: argparse.Namespace) -> int:
    from lmadda.data.index import IndexSpec, index_folder, index_plate
    from lmadda.data.omezarr import is_plate

    if args.out.suffix != ".parquet":
        raise LmaddaError(f"--out {args.out}: a manifest is a Parquet file; name it *.parquet")
    refuse_overwriting_inputs([("--out", args.out)], [("DIR", args.folder)])
    spec = IndexSpec(
        patterns=args.pattern, targets=dict(args.target), rename=dict(args.rename), splits=dict(args.split),
        split_fractions=args.split_fractions, acquisition_fractions=dict(args.acquisition_fractions), seed=args.seed,
        bit_depth=args.bit_depth, pixel_size_um=args.pixel_size_um, focus_round_um=args.focus_round, in_focus=dict(args.in_focus),
    )
    index = index_plate if is_plate(args.folder) else index_folder
    manifest, unmatched = index(args.folder, spec)
    # The images it found are known only now; a link at --out to one of them is refused here, before anything is written.
    refuse_overwriting_inputs([("--out", args.out)], [("an image of DIR", image) for image in manifest.image_paths()])
    path = manifest.save(args.out)
    print(f"wrote {path}: {len(manifest.rows)} images, {len(manifest.fields())} fields, settings {manifest.settings}, markers {manifest.markers}")
    if unmatched:
        shown = ", ".join(unmatched[:5]) + (" ..." if len(unmatched) > 5 else "")
        print(f"note: {len(unmatched)} image file(s) matched no pattern and were left out: {shown}")
    return 0


def run_show(args: argparse.Namespace) -> int:
    from lmadda.data.contact_sheet import contact_sheet
    from lmadda.data.manifest import Manifest

    refuse_overwriting_inputs([("--png", args.png)], manifest_inputs(args.manifest, "MANIFEST"))
    manifest = Manifest.load(args.manifest)
    print(manifest.summary())
    if args.png:
        print(f"contact sheet: {contact_sheet(manifest, args.png, fields=args.fields)}")
    return 0


def run_synth(args: argparse.Namespace) -> int:
    from lmadda.data.synth import SynthConfig, synthesize

    manifest, seconds = synthesize(args.out, SynthConfig(fields=args.fields, size=args.size, seed=args.seed))
    print(f"simulated {len(manifest.fields())} fields of {args.size}x{args.size} in {seconds:.1f} s -> {manifest.source}")
    return 0
