"""Is the per-image domain score calibrated? AUC against shifted images and Spearman with the Pearson it costs.

On simulated data (every shift family at three magnitudes, and bright field for a phase-contrast
model) and, with --sephace, on sephaCe's focus stack:

- AUC: how well the score of one image separates in-domain test images from shifted ones (1 = always
  higher on shifted images, 0.5 = chance);
- Spearman between the score and the Pearson the unadapted model loses on that image (its Pearson
  on the unshifted image minus on the shifted one; 0 for in-domain images), over every image;
- the fraction of shifted images called out of domain, and of in-domain images called anything but in domain.

The source model is trained here on a small simulated set (L1 only, 6 epochs: about a minute on one
free core) unless --source and --manifest name one; its domain reference is the one `lmadda
train-source` stores. The whole run takes a few minutes on 2 free CPU cores.

    .venv/bin/python bench/domain_calibration.py [--source CKPT --manifest M] [--sephace DIR] [--figure PNG]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

from results_file import write_result

SHIFTS = [f"{name}:{m}" for name, magnitudes in (
    ("overexposure", (1.5, 2, 3)), ("scale", (0.7, 0.5, 1.6)), ("defocus", (0.5, 1, 2)),
    ("noise", (0.05, 0.1, 0.2)), ("illumination", (0.3, 0.6, 0.9))) for m in magnitudes]


def auc(negatives: list[float], positives: list[float]) -> float:
    """P(score of a shifted image > score of an in-domain one), ties counted half."""
    neg, pos = np.asarray(negatives)[:, None], np.asarray(positives)[None, :]
    return float(np.mean((pos > neg) + 0.5 * (pos == neg))) if neg.size and pos.size else float("nan")


def score_images(checkpoint, images, *, tile: int) -> list[tuple[float, str, float]]:
    """(score, verdict, Pearson averaged over markers) per LoadedImage."""
    from lmadda.data.dataset import target_from_model_range
    from lmadda.domain import predict_and_score
    from lmadda.evaluation.metrics import pearson

    rows = []
    for image in images:
        prediction, domain = predict_and_score(checkpoint.generator, checkpoint.domain_reference, image.input, tile=tile, device="cpu")
        truth = target_from_model_range(image.target)
        value = float(np.mean([pearson(target_from_model_range(prediction)[c], truth[c]) for c in range(truth.shape[0])]))
        rows.append((domain.score, domain.verdict, value))
    return rows


def summarise(name: str, in_domain: list, shifted: list, baseline: list[float]) -> dict:
    drops = [b - p for b, (_, _, p) in zip(baseline, shifted)]
    return {"target": name, "auc": auc([s for s, _, _ in in_domain], [s for s, _, _ in shifted]),
            "pearson_drop": float(np.mean(drops)), "mean_score": float(np.mean([s for s, _, _ in shifted])),
            "out_of_domain": float(np.mean([v == "out_of_domain" for _, v, _ in shifted])),
            "flagged": float(np.mean([v != "in_domain" for _, v, _ in shifted])),
            "scores": [round(s, 4) for s, _, _ in shifted], "drops": [round(d, 4) for d in drops]}


def simulated(args, root: Path) -> tuple[dict, list]:
    from lmadda.checkpoint import load_checkpoint
    from lmadda.data.dataset import load_images
    from lmadda.data.manifest import Manifest
    from lmadda.data.shifts import Shift
    from lmadda.data.synth import SynthConfig, synthesize
    from lmadda.training.source import SourceTrainConfig, train_source

    if args.manifest is None:
        manifest, seconds = synthesize(root / "data", SynthConfig(fields=args.fields, size=256, seed=0))
        print(f"simulated {args.fields} fields of 256 px in {seconds:.0f} s")
    else:
        manifest = Manifest.load(args.manifest)
    if args.source is None:
        start = time.perf_counter()
        # L1 only at a higher learning rate: validation Pearson 0.77 after 6 epochs (a minute on one core), where the
        # pix2pix recipe (GAN, 2e-4) stayed at 0.10 after 10; a model that has learnt nothing loses no Pearson to any shift.
        config = SourceTrainConfig(manifest=manifest.source, markers=["dapi"], ngf=8, depth=8, ndf=8, crop_size=256, batch_size=4,
                                   epochs=args.epochs, crops_per_epoch=160, gan_loss="none", lr=1e-3, device="cpu")
        train_source(config, root / "source.pt", progress=False)
        print(f"trained the source model in {time.perf_counter() - start:.0f} s")
        args.source = root / "source.pt"
    checkpoint = load_checkpoint(args.source)
    if checkpoint.domain_reference is None:
        sys.exit(f"{args.source} has no domain reference; add one with `lmadda diagnose --add-reference {args.source} --manifest ...`")
    setting = checkpoint.metadata.get("train_config", {}).get("setting", checkpoint.setting)
    markers = checkpoint.markers
    tile = checkpoint.domain_reference.crop_size
    load = dict(percentiles=checkpoint.percentiles, seed=1)
    clean = load_images(manifest, setting, args.split, markers, **load)
    in_domain = score_images(checkpoint, clean, tile=tile)
    baseline = [p for _, _, p in in_domain]
    print(f"{len(clean)} {args.split} images; in domain: scores {[round(s, 2) for s, _, _ in in_domain]}, "
          f"thresholds {[round(t, 2) for t in checkpoint.domain_reference.thresholds]}")
    targets, points = [], [(s, 0.0, "in domain") for s, _, _ in in_domain]
    others = [("bright_field", load_images(manifest, "bright_field", args.split, markers, **load))] if setting != "bright_field" else []
    for name, images in [*((s, load_images(manifest, setting, args.split, markers, shift=Shift.parse(s), **load)) for s in SHIFTS), *others]:
        row = summarise(name, in_domain, score_images(checkpoint, images, tile=tile), baseline)
        targets.append(row)
        points += [(s, d, name.split(":")[0]) for s, d in zip(row["scores"], row["drops"])]
        print(f"  {name:<18} AUC {row['auc']:.2f}  Pearson drop {row['pearson_drop']:+.3f}  score {row['mean_score']:6.2f}  "
              f"out of domain {row['out_of_domain']:.0%}  flagged {row['flagged']:.0%}")
    return {"in_domain": {"scores": [round(s, 4) for s, _, _ in in_domain], "false_alarms": float(np.mean([v != "in_domain" for _, v, _ in in_domain])),
                          "pearson": float(np.mean(baseline))},
            "thresholds": list(checkpoint.domain_reference.thresholds), "targets": targets}, points


def sephace(args, root: Path) -> tuple[dict, list]:
    """Source: in-focus bright field of Set_1 -> DAPI (trained here); test: crops of Set_2 at focus and each defocus plane."""
    from lmadda.data.dataset import LoadedImage, target_to_model_range, to_model_range
    from lmadda.data.io import read_image
    from lmadda.data.normalise import normalise
    from lmadda.domain import reference_from_images
    from lmadda.training.source import SourceTrainConfig, train_source

    sets = {name: sorted((args.sephace / "tif" / name).glob("*.tif")) for name in ("Set_1", "Set_2")}

    def plane(paths, kind):
        return next(p for p in paths if p.stem.startswith(kind))

    def loaded(path: Path, target: Path, crop: tuple[int, int], size: int = 256) -> LoadedImage:
        top, left = crop
        window = (slice(None), slice(top, top + size), slice(left, left + size))
        image, norm = normalise(read_image(path).pixels[window])
        stain, stain_norm = normalise(read_image(target).pixels[window])
        return LoadedImage(path.stem, to_model_range(image).astype(np.float32), norm, target_to_model_range(stain).astype(np.float32), stain_norm)

    # in-focus planes: the one whose name carries the middle Z of its kind
    def focus_planes(paths):
        kinds = {}
        for p in paths:
            kinds.setdefault(p.stem.split("-")[0], []).append(p)
        return {kind: sorted(group, key=lambda p: float(p.stem.split("Z")[-1])) for kind, group in kinds.items() if len(group) == 3}

    planes1, planes2 = focus_planes(sets["Set_1"]), focus_planes(sets["Set_2"])
    fl1, fl2 = plane(sets["Set_1"], "fl"), plane(sets["Set_2"], "fl")
    crops = [(t, l) for t in range(0, 1024 - 255, 192) for l in range(0, 1344 - 255, 192)]
    # Test images: 512 px windows of Set_2 (4 tiles each, as a lab's images hold several), 12 per plane
    windows = [(t, l) for t in (0, 256, 512) for l in (0, 277, 554, 832)]
    kind = sorted(planes1)[0]
    focus1 = planes1[kind][1]
    train = [loaded(focus1, fl1, c) for c in crops if c[0] + 256 <= 768]  # no overlap with the held-out bottom rows
    val = [loaded(focus1, fl1, c) for c in crops if c[0] >= 768]
    manifest_free = SourceTrainConfig(manifest=root / "unused.parquet", setting="bright_field", markers=["dapi"], ngf=8, depth=8, ndf=8,
                                      crop_size=256, batch_size=4, epochs=args.epochs, crops_per_epoch=160, gan_loss="none", lr=1e-3,
                                      device="cpu")
    result = train_source(manifest_free, None, progress=False, data=(train, val))
    checkpoint = result.checkpoint
    checkpoint.domain_reference = reference_from_images(checkpoint.generator, train, val, domain="bright field in focus")
    test = {f"{k} {'+' if i == 2 else '-' if i == 0 else ''}{'focus' if i == 1 else 'defocus'}": [loaded(p, fl2, w, 512) for w in windows]
            for k, group in planes2.items() for i, p in enumerate(group)}
    focus_key = next(k for k in test if k.startswith(kind) and k.endswith(" focus"))
    in_domain = score_images(checkpoint, test.pop(focus_key), tile=256)
    baseline = [p for _, _, p in in_domain]
    targets, points = [], [(s, 0.0, "in domain") for s, _, _ in in_domain]
    for name, images in test.items():
        row = summarise(name, in_domain, score_images(checkpoint, images, tile=256), baseline)
        targets.append(row)
        points += [(s, d, "sephaCe") for s, d in zip(row["scores"], row["drops"])]
        print(f"  sephaCe {name:<18} AUC {row['auc']:.2f}  Pearson drop {row['pearson_drop']:+.3f}  score {row['mean_score']:6.2f}  "
              f"out of domain {row['out_of_domain']:.0%}")
    return {"in_domain": {"scores": [round(s, 4) for s, _, _ in in_domain], "pearson": float(np.mean(baseline)),
                          "false_alarms": float(np.mean([v != "in_domain" for _, v, _ in in_domain]))},
            "source": f"{kind} in focus, Set_1; test crops of Set_2", "targets": targets}, points


def serving_cost(sizes: tuple[int, ...] = (256, 1024), repeats: int = 9) -> dict:
    """Median CPU seconds of the endpoint's forward (serve_latency's model: ngf 16, depth 8, tile 256, tile batch 4) with
    and without the domain score, in this process; the difference is what the score adds to every request.

    CPU time of this process on one thread, not wall time: on a shared machine the wall time of a run mostly
    measures the other processes (and idle worker threads spin), and the two variants run interleaved so that
    what remains hits both alike."""
    import statistics

    from lmadda.domain import _layer_features, build_reference, predict_and_score
    from lmadda.models.tiling import predict_tiled
    from lmadda.models import GeneratorConfig, UNetGenerator
    from lmadda.models.generator import init_weights

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    generator = UNetGenerator(GeneratorConfig(in_channels=1, out_channels=2, ngf=16, depth=8))
    init_weights(generator)
    generator.eval()
    rng = np.random.default_rng(0)
    reference = build_reference(generator, [rng.uniform(-1, 1, (1, 256, 256)).astype(np.float32) for _ in range(4)], domain="bench", crops=8)
    cost = {}
    for size in sizes:
        image = rng.uniform(-1, 1, (1, size, size)).astype(np.float32)
        runs = {"plain": lambda: predict_tiled(generator, image, tile=256, batch_size=4, device="cpu"),
                "scored": lambda: predict_and_score(generator, reference, image, tile=256, batch_size=4, device="cpu")}
        times = {name: [] for name in runs}
        for name, run in runs.items():
            run()  # warm-up
        for _ in range(repeats):  # interleaved, so load from elsewhere on the machine hits both alike
            for name, run in runs.items():
                start = time.process_time()
                run()
                times[name].append(time.process_time() - start)
        plain, scored = statistics.median(times["plain"]), statistics.median(times["scored"])
        cost[str(size)] = {"plain_s": plain, "scored_s": scored, "overhead": scored / plain - 1,
                           "overhead_of_fastest_runs": min(times["scored"]) / min(times["plain"]) - 1}
        print(f"serving cost {size}x{size}: forward {plain * 1000:.0f} CPU ms, with the domain score {scored * 1000:.0f} CPU ms "
              f"({100 * (scored / plain - 1):+.1f} %)")
    # The score's own work, alone: the feature reductions of one tile batch against that batch's forward.
    batch = torch.from_numpy(rng.uniform(-1, 1, (4, 1, 256, 256)).astype(np.float32))
    with torch.no_grad():
        recorded = generator.forward_to(generator.last_layer, batch, record=tuple(reference.layers)).recorded
        forward, features = [], []
        for _ in range(repeats * 3):
            start = time.process_time()
            generator(batch)
            forward.append(time.process_time() - start)
            start = time.process_time()
            [_layer_features(recorded[layer]) for layer in reference.layers]
            features.append(time.process_time() - start)
    cost["features_over_forward"] = statistics.median(features) / statistics.median(forward)
    print(f"serving cost: the features of a 4-tile batch take {1000 * statistics.median(features):.1f} CPU ms, "
          f"{100 * cost['features_over_forward']:.1f} % of its forward ({1000 * statistics.median(forward):.0f} CPU ms)")
    torch.set_num_threads(threads)
    return cost


def spearman_of(points: list) -> float:
    from lmadda.selection.criteria import spearman

    return spearman([p[0] for p in points], [p[1] for p in points])


def plot(points: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for group in sorted({p[2] for p in points}):
        chosen = [p for p in points if p[2] == group]
        axis.scatter([p[0] for p in chosen], [p[1] for p in chosen], s=14, label=group, alpha=0.8)
    axis.set_xscale("log")
    axis.set_xlabel("domain score (1 = held-out in-domain level)")
    axis.set_ylabel("Pearson lost by the unadapted model")
    axis.legend(fontsize=7)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, help="a source checkpoint with a domain reference (default: train one here)")
    parser.add_argument("--manifest", type=Path, help="its data (default: simulate --fields fields)")
    parser.add_argument("--fields", type=int, default=48)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--split", default="test")
    parser.add_argument("--sephace", type=Path, help="sephaCe folder (../shared/data/sephace) to add its focus stack")
    parser.add_argument("--sephace-only", action="store_true", help="skip the simulated data")
    parser.add_argument("--figure", type=Path, help="write the score-against-Pearson-drop plot here")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    start = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="lmadda-domain-bench-"))
    record = {"date": date.today().isoformat(), "serving_cost": serving_cost()}
    points = []
    if not args.sephace_only:
        record["simulated"], points = simulated(args, root)
        record["simulated"]["spearman"] = spearman_of(points)
        families = sorted({p[2] for p in points} - {"in domain"})
        record["simulated"]["spearman_by_family"] = {f: spearman_of([p for p in points if p[2] in (f, "in domain")]) for f in families}
        print(f"simulated: Spearman(score, Pearson drop) {record['simulated']['spearman']:.2f} over {len(points)} images; "
              + ", ".join(f"{f} {v:.2f}" for f, v in record["simulated"]["spearman_by_family"].items()))
    if args.sephace:
        record["sephace"], sephace_points = sephace(args, root)
        record["sephace"]["spearman"] = spearman_of(sephace_points)
        print(f"sephaCe: Spearman {record['sephace']['spearman']:.2f} over {len(sephace_points)} windows")
        points += sephace_points
    record["seconds"] = time.perf_counter() - start
    if args.figure:
        plot(points, args.figure)
        print(f"-> {args.figure}")
    print(f"-> {write_result(args.out, 'domain_calibration', record)} ({record['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
