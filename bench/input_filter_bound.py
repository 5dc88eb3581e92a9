"""How much of a target's gap a linear input filter could close: a bound on the families that only correct the input.

For one experiment of a study config (its data and source model, reused from its `out` folder, so run it
after `make study` or `lmadda study --only NAME`), and for each target (default: the experiment's grid
targets that differ from the source), on VALIDATION fields:

- the unadapted model;
- the **oracle filter**: the Wiener filter that best maps each target training crop onto the source crop
  of the same field (paired, so it needs labels of a kind no lab has; `--sign-real` keeps only its real
  part, a zero-phase filter with signs);
- the **label-free spectrum match**: the zero-phase filter sqrt(P_source / P_target) from the two
  domains' mean power spectra (no pairs), and the same with its sign flipped, since power spectra cannot
  tell a contrast from its inverse.

Each filtered image is brought back to the source's mean and spread of model units before the model
sees it. If even the oracle filter gains little on a target, no input-only correction that is linear in
the pixels can close its gap (FDA, spectrum or contrast matching): the shift is not a filter. Nothing
here looks at test fields.

    .venv/bin/python bench/input_filter_bound.py --experiment simulated

Results go to bench/results/input_filter_bound.jsonl (one line per target).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lmadda.core.errors import LmaddaError
from lmadda.data.dataset import LoadedImage
from lmadda.evaluation.evaluate import evaluate_generator
from lmadda.evaluation.rows import TargetDomain
from study_experiment import experiment_parser, load_experiment, shifted_targets

CROP = 256  # the filter's support: every field of the three data sets holds at least one crop this size


def _crops(image: LoadedImage) -> list[np.ndarray]:
    pixels = image.input[0]
    height, width = pixels.shape
    return [pixels[i : i + CROP, j : j + CROP] for i in range(0, height - CROP + 1, CROP) for j in range(0, width - CROP + 1, CROP)]


def _spectrum(crop: np.ndarray) -> np.ndarray:
    # a Hann window, so the crop's edges do not add a cross of false frequencies
    window = np.outer(np.hanning(CROP), np.hanning(CROP))
    return np.fft.fft2((crop - crop.mean()) * window)


def oracle_filter(source: list[LoadedImage], target: list[LoadedImage]) -> np.ndarray | None:
    """Per-frequency least squares from each target crop to the source crop of the same field (regularised);
    None where no target field was also imaged in the source setting (another experiment: no pairs)."""
    by_field = {image.field: image for image in source}
    cross, power = np.zeros((CROP, CROP), complex), np.zeros((CROP, CROP))
    for image in target:
        if image.field not in by_field:
            continue
        for target_crop, source_crop in zip(_crops(image), _crops(by_field[image.field])):
            spectrum = _spectrum(target_crop)
            cross += _spectrum(source_crop) * np.conj(spectrum)
            power += np.abs(spectrum) ** 2
    if not power.any():
        return None
    return cross / (power + 1e-3 * power.mean())


def spectrum_match(source: list[LoadedImage], target: list[LoadedImage]) -> np.ndarray:
    """Zero-phase filter that gives the target's mean power spectrum the source's (no pairs)."""
    def mean_power(images: list[LoadedImage]) -> np.ndarray:
        spectra = [np.abs(_spectrum(crop)) ** 2 for image in images for crop in _crops(image)]
        return np.mean(spectra, axis=0)

    source_power, target_power = mean_power(source), mean_power(target)
    return np.sqrt(source_power / (target_power + 1e-3 * target_power.mean()))


class FilteredInput:
    """Apply a CROP x CROP frequency response to a whole field, then restore the source's mean and spread."""

    def __init__(self, response: np.ndarray, source: list[LoadedImage]):
        self.kernel = np.fft.fftshift(np.fft.ifft2(response).real)  # centred spatial kernel
        self.mean = float(np.mean([image.input.mean() for image in source]))
        self.std = float(np.mean([image.input.std() for image in source]))

    def __call__(self, image: np.ndarray) -> np.ndarray:
        pixels = image[0]
        height, width = pixels.shape
        if height < CROP or width < CROP:
            raise SystemExit(f"a field of {height} x {width} px is smaller than the filter ({CROP} px)")
        kernel = np.zeros((height, width))
        top, left = height // 2 - CROP // 2, width // 2 - CROP // 2
        kernel[top : top + CROP, left : left + CROP] = self.kernel
        filtered = np.fft.ifft2(np.fft.fft2(pixels - pixels.mean()) * np.fft.fft2(np.fft.ifftshift(kernel))).real
        filtered = (filtered - filtered.mean()) / (filtered.std() + 1e-8) * self.std + self.mean
        return np.clip(filtered, -1.0, 1.0)[None].astype(np.float32)


def main() -> None:
    args = experiment_parser(__doc__.splitlines()[0], "bench/results/input_filter_bound.jsonl",
                             "default: the experiment's grid targets that differ from the source").parse_args()
    experiment = load_experiment(args.config, args.experiment)
    spec, data, source_model, source_train = experiment.spec, experiment.data, experiment.source, experiment.source_train
    markers, percentiles = source_model.markers, source_model.percentiles
    targets = args.targets or shifted_targets(spec)
    results = Path(args.out)
    results.parent.mkdir(parents=True, exist_ok=True)

    def pearson(images: list[LoadedImage], transform=None) -> float:
        rows = evaluate_generator(source_model.generator, images, markers, input_transform=transform)
        return float(np.nanmean([row["pearson"] for row in rows]))

    for target in targets:
        domain = TargetDomain.parse(target)
        target_train = data.load(domain.setting, "train", shift=domain.shift, percentiles=percentiles)
        try:
            target_val = data.load(domain.setting, "val", markers, shift=domain.shift, percentiles=percentiles, seed=1)
        except LmaddaError:  # a target with no validation split: nothing may be measured on its test fields alone
            target_val = []
        if not target_val:
            print(f"{target}: no validation fields, skipped", flush=True)
            continue
        # a rescaled target's fields are not pixel-aligned with the source's: no filter maps one onto the other
        oracle = None if domain.shift is not None and domain.shift.name == "scale" else oracle_filter(source_train, target_train)
        matched = spectrum_match(source_train, target_train)
        record = {
            "experiment": spec.name, "target": target, "val_fields": len(target_val),
            "unadapted": pearson(target_val),
            "oracle_filter": None if oracle is None else pearson(target_val, FilteredInput(oracle, source_train)),
            "oracle_filter_sign_real": None if oracle is None else pearson(target_val, FilteredInput(oracle.real, source_train)),
            "spectrum_match": pearson(target_val, FilteredInput(matched, source_train)),
            "spectrum_match_inverted": pearson(target_val, FilteredInput(-matched, source_train)),
        }
        print(f"{target}: " + ", ".join(f"{k} {v:.3f}" for k, v in record.items() if isinstance(v, float)), flush=True)
        with results.open("a") as handle:
            handle.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
