"""The embedded default data set: simulated fields of adherent cells, four registered images each.

Each field holds mesenchymal-stromal-like cells: large, flat, irregular, elongated bodies with one
nucleus each (with nucleoli), at a density that varies from field to field. One specimen model
(thickness, refractive index, absorption, fluorophores) is rendered four ways:

- phase contrast: the thin-object field exp(i*phi) through a Zernike phase-contrast objective. The
  undiffracted light (a small disc around zero frequency, standing in for the phase ring) is
  attenuated and retarded by a quarter wave, so thick parts come out dark; because the ring also
  catches the lowest object frequencies, cells get the bright halos of real phase contrast.
- bright field: the same field through an ordinary pupil with weak absorption, slightly defocused
  below focus (as one focuses unstained cells to see them at all): low contrast, bright background,
  thin edge fringes instead of halos, and nuclei with a bright centre and a dark rim, the reverse of
  their dark look in phase contrast; visibly a different microscope (pixel correlation with the phase
  contrast image of the same field is near 0).
- DAPI: nuclei only, brightness varying with DNA content (G1/G2) and chromatin texture, nucleoli dim,
  widefield blur and shot noise.
- CD29-like (integrin beta-1): per-cell expression independent of the nucleus, a perinuclear
  cytoplasmic halo, membrane signal at the cell edge and focal-adhesion puncta at the periphery;
  not a function of the nucleus mask, so it is the harder target.

Label-free images are 12-bit (stored as uint16, saturating at 4095), fluorescence 16-bit.
Everything is numpy FFT optics; the same seed gives the same data, bit for bit.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmadda.core.errors import LmaddaError
from lmadda.data.index import assign_splits
from lmadda.data.io import write_tiff
from lmadda.data.manifest import Manifest, ManifestRow

INPUT_SETTINGS = ("phase_contrast", "bright_field")
LABEL_FREE_BITS = 12
FLUORESCENCE_BITS = 16
WAVELENGTH_UM = 0.55
PIXEL_SIZE_UM = 0.65


@dataclass(frozen=True)
class SynthConfig:
    fields: int = 64
    size: int = 256
    seed: int = 0
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)

    def __post_init__(self) -> None:
        if self.fields < 1:
            raise LmaddaError(f"--fields {self.fields}: need at least 1 field")
        if not 64 <= self.size <= 4096:
            raise LmaddaError(f"--size {self.size}: use 64..4096 pixels")


@dataclass
class Specimen:
    """Maps of one field, in physical units, from which all four images are rendered."""

    thickness_um: np.ndarray  # optical thickness of cells above the medium
    delta_n: np.ndarray  # refractive index difference (thickness-weighted mean)
    dapi: np.ndarray  # fluorophore density, arbitrary units
    cd29: np.ndarray


# ---------------------------------------------------------------------------------------------
# Specimen model
# ---------------------------------------------------------------------------------------------
def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Zero-mean, unit-std Gaussian random field with correlation length `sigma` pixels."""
    field = _gaussian_blur(rng.standard_normal(shape).astype(np.float32), sigma)
    return (field - field.mean()) / (field.std() + 1e-8)


def _gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Periodic Gaussian blur by FFT (fields are simulated, so periodic edges are harmless)."""
    fy = np.fft.fftfreq(image.shape[0])[:, None]
    fx = np.fft.rfftfreq(image.shape[1])[None, :]
    transfer = np.exp(-2.0 * (np.pi * sigma) ** 2 * (fx**2 + fy**2))
    return np.fft.irfft2(np.fft.rfft2(image) * transfer, s=image.shape).astype(np.float32)


def _place_cells(rng: np.random.Generator, size: int) -> list[tuple[float, float, float]]:
    """Cell centres and body radii, without heavy overlap; density varies per field."""
    scale = size / 256.0
    target = max(1, int(round(rng.uniform(3, 11) * scale * scale)))
    cells: list[tuple[float, float, float]] = []
    for _ in range(target * 30):
        if len(cells) == target:
            break
        radius = rng.uniform(22, 38)
        x, y = rng.uniform(0, size, 2)
        if all((x - cx) ** 2 + (y - cy) ** 2 > (0.9 * (radius + cr)) ** 2 for cx, cy, cr in cells):
            cells.append((x, y, radius))
    return cells


def simulate_specimen(rng: np.random.Generator, size: int) -> Specimen:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    thickness = np.zeros((size, size), np.float32)
    index_path = np.zeros((size, size), np.float32)  # sum of delta_n * thickness
    dapi = np.zeros((size, size), np.float32)
    cd29 = np.zeros((size, size), np.float32)
    texture = _smooth_noise(rng, (size, size), 2.0)
    chromatin = _smooth_noise(rng, (size, size), 1.2)

    for cx, cy, radius in _place_cells(rng, size):
        # Cell body: a star-shaped, elongated outline (flat, irregular, spread cells).
        elongation = rng.uniform(1.0, 2.4)
        angle = rng.uniform(0, np.pi)
        harmonics = [(k, rng.normal(0, 0.28 / k), rng.uniform(0, 2 * np.pi)) for k in range(2, 7)]
        dx, dy = xx - cx, yy - cy
        u = (dx * np.cos(angle) + dy * np.sin(angle)) / np.sqrt(elongation)
        v = (-dx * np.sin(angle) + dy * np.cos(angle)) * np.sqrt(elongation)
        rho = np.hypot(u, v)
        theta = np.arctan2(v, u)
        outline = radius * (1 + sum(a * np.cos(k * theta + p) for k, a, p in harmonics))
        s = rho / np.maximum(outline, 4.0)  # 0 at the centre, 1 at the edge
        body = np.clip(1 - s**2, 0, None) ** 0.6
        cell_mask = (s < 1).astype(np.float32)
        cell_thickness = rng.uniform(0.8, 1.6) * body * (1 + 0.15 * texture)

        # Nucleus: an ellipse near the centre, thicker and denser than the cytoplasm, with nucleoli.
        nx, ny = cx + rng.normal(0, 0.12 * radius), cy + rng.normal(0, 0.12 * radius)
        a_n = rng.uniform(7, 11)
        b_n = a_n / rng.uniform(1.0, 1.6)
        angle_n = rng.uniform(0, np.pi)
        ndx, ndy = xx - nx, yy - ny
        un = (ndx * np.cos(angle_n) + ndy * np.sin(angle_n)) / a_n
        vn = (-ndx * np.sin(angle_n) + ndy * np.cos(angle_n)) / b_n
        s_n = np.hypot(un, vn)
        nucleus = 1.0 / (1.0 + np.exp(np.clip((s_n - 1.0) / 0.08, -50, 50)))  # soft edge
        nucleus_thickness = rng.uniform(2.5, 4.0) * np.clip(1 - s_n**2, 0, None) ** 0.5
        nucleoli = np.zeros_like(nucleus)
        for _ in range(rng.integers(1, 4)):
            r = 0.5 * np.sqrt(rng.uniform())
            phi = rng.uniform(0, 2 * np.pi)
            ox = nx + r * a_n * np.cos(phi)
            oy = ny + r * b_n * np.sin(phi)
            nucleoli += np.exp(-((xx - ox) ** 2 + (yy - oy) ** 2) / (2 * rng.uniform(1.0, 1.8) ** 2))
        nucleoli = np.clip(nucleoli, 0, 1) * nucleus

        thickness += cell_thickness + nucleus_thickness
        index_path += 0.020 * cell_thickness + 0.022 * nucleus_thickness * (1 + 0.6 * nucleoli)

        # DAPI: DNA content (G1 or G2), chromatin texture, nucleoli excluded.
        dna = (2.0 if rng.uniform() < 0.3 else 1.0) * rng.lognormal(0, 0.15)
        dapi += dna * nucleus * (1 + 0.25 * chromatin) * (1 - 0.7 * nucleoli)

        # CD29-like: independent expression; perinuclear halo + membrane + focal adhesions.
        expression = rng.lognormal(0, 0.5)
        outside_nucleus_px = np.clip(s_n - 1.0, 0, None) * 0.5 * (a_n + b_n)
        perinuclear = np.exp(-outside_nucleus_px / rng.uniform(6, 12)) * (1 - 0.85 * nucleus)
        membrane = np.exp(-((s - 0.96) ** 2) / (2 * 0.035**2))
        adhesions = np.zeros_like(s)
        for _ in range(rng.integers(6, 16)):
            phi = rng.uniform(-np.pi, np.pi)
            edge = radius * (1 + sum(a * np.cos(k * phi + p) for k, a, p in harmonics)) * rng.uniform(0.75, 0.95)
            pu, pv = edge * np.cos(phi), edge * np.sin(phi)
            along = ((u - pu) * np.cos(phi) + (v - pv) * np.sin(phi)) / 3.0
            across = (-(u - pu) * np.sin(phi) + (v - pv) * np.cos(phi)) / 1.2
            adhesions += np.exp(-(along**2 + across**2) / 2)
        cytoplasm = 0.12 * np.clip(1 + 0.6 * texture, 0, None)
        cd29 += expression * cell_mask * (0.7 * perinuclear + 0.5 * membrane + 0.9 * adhesions + cytoplasm)

    delta_n = np.where(thickness > 1e-6, index_path / np.maximum(thickness, 1e-6), 0.0).astype(np.float32)
    return Specimen(thickness_um=thickness, delta_n=delta_n, dapi=dapi, cd29=cd29)


# ---------------------------------------------------------------------------------------------
# Optics
# ---------------------------------------------------------------------------------------------
def _frequency_radius(size: int) -> np.ndarray:
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.fftfreq(size)[None, :]
    return np.hypot(fx, fy)  # cycles per pixel, Nyquist = 0.5


def _object_field(specimen: Specimen, absorption_per_um: float) -> np.ndarray:
    phase = 2 * np.pi / WAVELENGTH_UM * specimen.delta_n * specimen.thickness_um
    amplitude = np.exp(-absorption_per_um * specimen.thickness_um)
    return amplitude * np.exp(1j * phase)


def render_phase_contrast(specimen: Specimen) -> np.ndarray:
    """Zernike phase contrast, relative intensity (background about 0.2)."""
    size = specimen.thickness_um.shape[0]
    radius = _frequency_radius(size)
    spectrum = np.fft.fft2(_object_field(specimen, absorption_per_um=0.005))
    ring = radius <= 0.018  # undiffracted light + lowest object frequencies: source of the halo
    spectrum = np.where(ring, spectrum * 0.45 * np.exp(-1j * np.pi / 2), spectrum)
    spectrum *= radius <= 0.25  # objective NA: pupil at half the Nyquist frequency
    return (np.abs(np.fft.ifft2(spectrum)) ** 2).astype(np.float32)


def render_bright_field(specimen: Specimen) -> np.ndarray:
    """Bright field with weak absorption and slight defocus below focus (edges show as fringes), background about 1."""
    size = specimen.thickness_um.shape[0]
    radius = _frequency_radius(size)
    spectrum = np.fft.fft2(_object_field(specimen, absorption_per_um=0.03))
    rho2 = (radius / 0.25) ** 2
    pupil = (rho2 <= 1.0) * np.exp(-2j * np.pi * 0.6 * rho2)  # 0.6 waves of defocus, below focus
    intensity = np.abs(np.fft.ifft2(spectrum * pupil)) ** 2
    # Partially coherent (condenser) illumination washes out coherent ringing: soften a little.
    return _gaussian_blur(intensity.astype(np.float32), 0.8)


def _expose(rng: np.random.Generator, relative: np.ndarray, counts_per_unit: float, sensor_max: float,
            photons_per_count: float, offset: float) -> np.ndarray:
    """Camera: signal in counts, shot noise, offset, saturation at the sensor maximum."""
    expected = np.clip(relative * counts_per_unit, 0, None)
    photons = rng.poisson(expected * photons_per_count) / photons_per_count
    read = rng.normal(0, 2.0, relative.shape)
    return np.clip(photons + offset + read, 0, sensor_max).astype(np.float32)


def render_field(rng: np.random.Generator, size: int) -> dict[str, np.ndarray]:
    """All four registered images of one simulated field, in camera counts."""
    specimen = simulate_specimen(rng, size)
    label_free_max = 2**LABEL_FREE_BITS - 1
    fluorescence_max = 2**FLUORESCENCE_BITS - 1
    fluorescence_psf_sigma = 1.4
    dapi = _gaussian_blur(specimen.dapi, fluorescence_psf_sigma)
    cd29 = _gaussian_blur(specimen.cd29, fluorescence_psf_sigma)
    return {
        # Exposed as a user would: the background near half scale, bright halos near the top of the
        # 12-bit range without clipping, so longer exposures (the overexposure shift) saturate.
        "phase_contrast": _expose(rng, render_phase_contrast(specimen), 7500.0, label_free_max, 4.0, 100.0),
        "bright_field": _expose(rng, render_bright_field(specimen), 2600.0, label_free_max, 4.0, 100.0),
        "dapi": _expose(rng, dapi + 0.02, 14000.0, fluorescence_max, 0.5, 400.0),
        "cd29": _expose(rng, cd29 + 0.04, 9000.0, fluorescence_max, 0.5, 400.0),
    }


# ---------------------------------------------------------------------------------------------
# Writing a data set
# ---------------------------------------------------------------------------------------------
def synthesize(out: str | Path, config: SynthConfig = SynthConfig()) -> tuple[Manifest, float]:
    """Write `config.fields` simulated fields as 16-bit TIFFs plus `manifest.parquet`; return it and the seconds taken."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LmaddaError(f"--out {out} is a file; give a folder")
    manifest_path = out / "manifest.parquet"
    start = time.perf_counter()
    field_ids = [f"field_{i:04d}" for i in range(config.fields)]
    splits = assign_splits(field_ids, config.split_fractions, config.seed)
    rows: list[ManifestRow] = []
    for number, field_id in enumerate(field_ids):
        # One independent stream per field: field i is the same whatever --fields says.
        rng = np.random.default_rng([config.seed, number])
        images = render_field(rng, config.size)
        for name, pixels in images.items():
            relative = f"images/{field_id}_{name}.tif"
            write_tiff(out / relative, pixels, dtype="uint16")
            is_input = name in INPUT_SETTINGS
            rows.append(
                ManifestRow(
                    field=field_id, split=splits[field_id], role="input" if is_input else "target",
                    setting=name if is_input else None, marker=None if is_input else name, path=relative,
                    bit_depth=LABEL_FREE_BITS if is_input else FLUORESCENCE_BITS, pixel_size_um=PIXEL_SIZE_UM,
                )
            )
    manifest = Manifest(rows=rows, root=out, source=str(manifest_path))
    manifest.save(manifest_path)
    return Manifest.load(manifest_path), time.perf_counter() - start
