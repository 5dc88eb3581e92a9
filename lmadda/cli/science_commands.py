"""`lmadda train-source | adapt | evaluate | report | predict`."""

from __future__ import annotations

import argparse
from pathlib import Path

from lmadda.cli.options import add_model_flags, model_overrides
from lmadda.core.errors import LmaddaError
from lmadda.data.io import refuse_overwriting_inputs
from lmadda.data.manifest import manifest_inputs
from lmadda.core.registry_names import target_name
from lmadda.training.adapt import AdaptConfig
from lmadda.training.source import SourceTrainConfig


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _layers(text: str) -> list[int] | str:
    if text.strip() == "auto":
        return "auto"
    try:
        return [int(part) for part in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} must be layer numbers separated by commas, e.g. 3 or 3,7, or auto") from None


def register(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser("train-source", help="train a pix2pix source generator on paired images",
                                  description="Train a source generator (L1 + conditional PatchGAN). Options come from --config (YAML/JSON) and flags; flags win.")
    train.add_argument("--config", type=Path, help="YAML/JSON file with SourceTrainConfig options")
    add_model_flags(train, SourceTrainConfig)
    train.add_argument("--out", type=Path, required=True, help="checkpoint to write (.pt)")
    train.set_defaults(func=run_train_source)

    adapt = subparsers.add_parser("adapt", help="adapt a source generator to a new setting by LM-ADDA (no target labels)",
                                  description="LM-ADDA: train layers 0..LAYER of a copy of the source generator so that its layer-LAYER features on target images match the source's. The last layer is ADDA.")
    adapt.add_argument("source", type=Path, metavar="SOURCE_CHECKPOINT")
    adapt.add_argument("--manifest", type=Path, required=True, help="manifest with the target images (and the source images unless --source-manifest)")
    adapt.add_argument("--setting", required=True, help="target input setting, e.g. bright_field")
    adapt.add_argument("--shift", help="shift applied to the target setting's images, e.g. overexposure:2")
    adapt.add_argument("--source-manifest", type=Path, help="manifest of the source images (default: --manifest)")
    adapt.add_argument("--layer", type=_layers, help="matched layer(s), e.g. 7 or 3,7; 'auto': adapt at several layers and let the "
                                                    "label-free selector choose among them, AdaBN, histogram matching and the "
                                                    "unadapted model (it keeps the unadapted model unless one is confidently better)")
    adapt.add_argument("--config", type=Path, help="YAML/JSON file with AdaptConfig options")
    add_model_flags(adapt, AdaptConfig, skip=("layer",))
    adapt.add_argument("--out", type=Path, required=True, help="adapted checkpoint to write (.pt)")
    adapt.set_defaults(func=run_adapt)

    evaluate = subparsers.add_parser("evaluate", help="evaluate generators (and baselines) on held-out paired images",
                                     description="Evaluate checkpoints on the test split of a setting (+ shift); write one Parquet row per model x image x marker and print a summary.")
    evaluate.add_argument("checkpoints", type=Path, nargs="+", metavar="CHECKPOINT")
    evaluate.add_argument("--manifest", type=Path, required=True)
    evaluate.add_argument("--setting", required=True)
    evaluate.add_argument("--shift")
    evaluate.add_argument("--split", default="test", choices=["train", "val", "test"])
    evaluate.add_argument("--baselines", type=_csv, default=[], help="for source checkpoints: adabn,histogram_matching,fda")
    evaluate.add_argument("--seed", type=int, default=0,
                          help="seeds the shifted images and FDA's choice of source image as the study's seed does (default 0, the study's first)")
    evaluate.add_argument("--device")
    evaluate.add_argument("--out", type=Path, required=True, help="results table (.parquet), one row per checkpoint x method x image x marker")
    evaluate.add_argument("--overwrite", action="store_true", help="replace an existing --out (atomically, once all is evaluated)")
    evaluate.set_defaults(func=run_evaluate)

    report = subparsers.add_parser("report", help="turn a results table into a summary and plots (PNG)")
    report.add_argument("results", type=Path, metavar="RESULTS_PARQUET")
    report.add_argument("--out", type=Path, required=True, help="folder for summary.txt and the figures")
    report.set_defaults(func=run_report)

    predict = subparsers.add_parser("predict", help="virtually stain an image of any size (tiled, feathered)",
                                    description="Stain IN with the model. OME-Zarr (IN or OUT a .zarr / .ome.zarr folder; "
                                                "pip install 'lmadda[zarr]') is read and written one row of tiles at a time, "
                                                "so a whole slide or a plate field never has to fit in memory.")
    predict.add_argument("checkpoint", type=Path, metavar="CHECKPOINT")
    predict.add_argument("input", type=Path, metavar="IN",
                         help="image to stain: .tif/.tiff, .png, or an OME-Zarr image folder (image.ome.zarr, plate.ome.zarr/A/1/0)")
    predict.add_argument("output", type=Path, metavar="OUT",
                         help="stained image to write: .tif/.tiff (every marker, any pixel type), .png (one marker, 8/16-bit) "
                              "or .ome.zarr (every marker, written chunk by chunk, pixel size in its scale)")
    predict.add_argument("--tile", type=int, default=256)
    predict.add_argument("--overlap", type=float, default=0.25)
    predict.add_argument("--batch-size", type=int, default=8)
    predict.add_argument("--device", default=None)
    predict.add_argument("--bit-depth", type=int, default=None, help="camera bit depth of IN when lower than its storage type")
    predict.add_argument("--channel", default=None, metavar="INDEX|NAME",
                         help="the channel of a multi-channel IN to stain from: an index, or an OME-Zarr channel's label "
                              "(e.g. Phase in a plate field that holds Phase and DAPI)")
    predict.add_argument("--pixel-size", metavar="UM", help="pixel size of IN in µm (0.65, or X,Y) when its file records none "
                                                         "or a wrong one; OUT records it, and it is checked against the model's")
    predict.add_argument("--pixel-size-tolerance", type=float, default=None, metavar="FRACTION",
                         help="warn when IN's pixel size differs from the model's training pixel size by more than this (default 0.10)")
    predict.set_defaults(func=run_predict)


def run_train_source(args: argparse.Namespace) -> int:
    from lmadda.core.config import build_config
    from lmadda.training.source import SourceTrainConfig, train_source

    config = build_config(SourceTrainConfig, args.config, **model_overrides(args))
    refuse_overwriting_inputs([("--out", args.out)], [("--config", args.config), ("--init-from", config.init_from),
                                                      *manifest_inputs(config.manifest, "--manifest")])
    result = train_source(config, args.out)
    print(f"wrote {args.out}: best validation Pearson {result.best_val_pearson:.3f} after {len(result.history)} epochs ({result.seconds:.0f} s)")
    return 0


def run_adapt(args: argparse.Namespace) -> int:
    from lmadda.stainer import VirtualStainer

    refuse_overwriting_inputs([("--out", args.out)], [("SOURCE_CHECKPOINT", args.source), ("--config", args.config),
                                                      *manifest_inputs(args.manifest, "--manifest"),
                                                      *manifest_inputs(args.source_manifest, "--source-manifest")])
    selector_options = None
    if args.layer == "auto":  # the study's selection defaults: the selector of `adapt --layer auto` and the study is one
        from lmadda.study.config import SelectionSpec

        selector_options = SelectionSpec().options()
    source = VirtualStainer.load(args.source)
    outcome = source.adapt(args.manifest, args.setting, shift=args.shift, layer=args.layer, config=args.config,
                           source_manifest=args.source_manifest, selector_options=selector_options, **model_overrides(args))
    outcome.stainer.save(args.out)
    print(f"wrote {args.out}: {outcome.summary}")
    if outcome.result is not None and outcome.result.g_updates == 0 and not outcome.collapsed:
        print(f"warning: the discriminator never reached the gate accuracy ({outcome.config.gate_accuracy}), so G' never moved and "
              f"{args.out} predicts exactly like the source model. Give it more --steps, or lower gate_accuracy in --config "
              "(gate_accuracy: null updates G' at every step).")
    return 1 if outcome.collapsed else 0


def run_evaluate(args: argparse.Namespace) -> int:
    from lmadda.corrections.baselines import BASELINES
    from lmadda.checkpoint import load_checkpoint
    from lmadda.data.manifest import Manifest
    from lmadda.evaluation.evaluate import evaluate_checkpoints, refuse_existing, write_results
    from lmadda.study.report import summary_table

    unknown = set(args.baselines) - set(BASELINES)
    if unknown:
        raise LmaddaError(f"unknown baseline(s) {sorted(unknown)}; known: {', '.join(BASELINES)}")
    if args.out.suffix.lower() != ".parquet":
        raise LmaddaError(f"--out {args.out}: results are a Parquet table; name it *.parquet")
    refuse_existing(args.out, args.overwrite)  # before any work, not after it
    refuse_overwriting_inputs([("--out", args.out)], [*(("CHECKPOINT", path) for path in args.checkpoints),
                                                      *manifest_inputs(args.manifest, "--manifest")])
    names = [str(path) for path in args.checkpoints]
    if len(set(names)) < len(names):
        raise LmaddaError(f"checkpoint(s) {sorted({n for n in names if names.count(n) > 1})} given twice; name each once")
    manifest = Manifest.load(args.manifest)
    checkpoints = [(str(path), load_checkpoint(path)) for path in args.checkpoints]
    target = target_name(args.setting, args.shift)
    rows = evaluate_checkpoints(checkpoints, manifest, target, split=args.split, baselines=args.baselines, seed=args.seed, device=args.device,
                                progress=True)
    for name, _ in checkpoints:
        print(f"\n{name}\n" + summary_table([row for row in rows if row["checkpoint"] == name]))
    write_results(rows, args.out, overwrite=args.overwrite)
    print(f"wrote {args.out}")
    return 0


def run_report(args: argparse.Namespace) -> int:
    import pyarrow.parquet as pq

    from lmadda.study.report import REPORT_FILES, summary_table, write_report

    refuse_overwriting_inputs([("--out", args.out / name) for name in REPORT_FILES], [("RESULTS_PARQUET", args.results)])
    if not args.results.exists():
        raise LmaddaError(f"results table {args.results} not found; make one with `lmadda evaluate` or `lmadda demo`")
    try:
        rows = pq.read_table(args.results).to_pylist()
    except Exception as error:
        raise LmaddaError(f"{args.results} is not a readable Parquet table ({error})") from error
    required = {"target", "marker", "method", "layer", "pearson"}
    if not rows or not required <= set(rows[0]):
        raise LmaddaError(f"{args.results} is not an lmadda results table (needs columns {sorted(required)})")
    print(summary_table(rows))
    for path in write_report(rows, args.out):
        print(f"wrote {path}")
    return 0


def run_predict(args: argparse.Namespace) -> int:
    import sys

    from lmadda.core.config import build_config
    from lmadda.data.calibration import PixelSizeCheck, parse_pixel_size
    from lmadda.inference import predict_file

    from lmadda.cli.domain_messages import warn_about

    check = build_config(PixelSizeCheck, tolerance=args.pixel_size_tolerance)
    pixel_size = parse_pixel_size(args.pixel_size) if args.pixel_size else None
    path = predict_file(args.checkpoint, args.input, args.output, tile=args.tile, overlap=args.overlap,
                        batch_size=args.batch_size, device=args.device, bit_depth=args.bit_depth,
                        on_domain=lambda domain: warn_about(domain, args.input, args.checkpoint),
                        pixel_size=pixel_size, pixel_size_check=check, progress=True, channel=args.channel,
                        on_pixel_size=lambda note: print(f"{note.level}: {note.message}", file=sys.stderr))
    print(f"wrote {path}")
    return 0
