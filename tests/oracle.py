"""An oracle model and synthetic cases for pipeline tests: the test knows where every label must land.

The oracle is a 1×1×1 convolution with fixed weights: after z-scoring, WT is "FLAIR bright", TC is
"T1c bright" and ET is "T1c very bright". The cases are blocks of known intensity in a brain-shaped
ellipsoid, written in any orientation; the expected label map follows from the raw intensities alone.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from nibabel import orientations

from factorizer_cli.zoo.card import ModelCard
from factorizer_cli.zoo.package import ModelPackage, save_package

BRATS_INPUTS = [
    {"name": "t1n", "aliases": ["t1"]},
    {"name": "t1c", "aliases": ["t1ce"]},
    {"name": "t2w", "aliases": ["t2"]},
    {"name": "t2f", "aliases": ["flair"]},
]


def oracle_card(roi=(16, 16, 16), spacing=(1.0, 1.0, 1.0)) -> ModelCard:
    return ModelCard.from_dict({
        "name": "oracle",
        "task": "test",
        "inputs": BRATS_INPUTS,
        "spacing": list(spacing),
        "roi": list(roi),
        "outputs": ["TC", "WT", "ET"],
        "labels": [{"region": "WT", "label": 2}, {"region": "TC", "label": 1}, {"region": "ET", "label": 3}],
        "label_conventions": {"brats2021": {"ET": 4}},
        "label_names": {"1": "NCR", "2": "ED", "3": "ET", "4": "ET"},
        "activation": "sigmoid",
        "crop_margin_mm": 2.0,
        "architecture": {"class": "Conv3d", "in_channels": 4, "out_channels": 3, "kernel_size": 1},
    })


def oracle_weights() -> dict[str, torch.Tensor]:
    """Logit = 20·(z − t): TC: T1c above 1.5 σ; WT: FLAIR above 1.5 σ; ET: T1c above 10 σ."""
    weight = torch.zeros(3, 4, 1, 1, 1)
    weight[0, 1] = weight[1, 3] = weight[2, 1] = 20.0
    bias = torch.tensor([-30.0, -30.0, -200.0])
    return {"weight": weight, "bias": bias}


def oracle_package(directory: Path, **card_kwargs) -> ModelPackage:
    return save_package(directory, oracle_card(**card_kwargs), [oracle_weights()])


def phantom(shape=(40, 44, 36), seed=0) -> tuple[np.ndarray, np.ndarray]:
    """Four channels (t1n, t1c, t2w, t2f) on a RAS grid, and the labels the oracle must give."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    brain = (grid**2).sum(0) < 0.8
    images = np.zeros((4, *shape), np.float32)
    images[:, brain] = 1.0 + 0.05 * rng.standard_normal((4, int(brain.sum())))
    i, j, k = (np.array(shape) * [0.55, 0.35, 0.5]).astype(int)  # off-centre, so flips show
    oedema = (slice(i - 7, i + 7), slice(j - 6, j + 8), slice(k - 5, k + 6))
    core = (slice(i - 4, i + 4), slice(j - 3, j + 5), slice(k - 3, k + 3))
    rim = (slice(i - 2, i + 2), slice(j - 1, j + 3), slice(k - 1, k + 2))
    images[3][oedema] = 4.0  # FLAIR bright: WT
    images[1][core] = 3.0  # T1c bright: TC
    images[1][rim] = 10.0  # T1c very bright: ET
    labels = np.zeros(shape, np.uint8)
    labels[oedema] = 2
    labels[core] = 1
    labels[rim] = 3
    return images, labels


def oblique(angle_deg=17.0, spacing=(1.0, 1.0, 1.0), origin=(-20.0, 30.0, 12.5)) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    rotation = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


def reorient(volume: np.ndarray, affine: np.ndarray, codes: str) -> tuple[np.ndarray, np.ndarray]:
    """The same image stored with its axes along ``codes`` (e.g. "LPS", "PIR"): data and affine."""
    start = orientations.io_orientation(affine)
    transform = orientations.ornt_transform(start, orientations.axcodes2ornt(tuple(codes)))
    data = orientations.apply_orientation(volume, transform)
    return data, affine @ orientations.inv_ornt_aff(transform, volume.shape)


def write_case(folder: Path, images: np.ndarray, affine: np.ndarray, qform_code=1, sform_code=1) -> list[Path]:
    """BraTS-named files of one case; returns the paths in t1n, t1c, t2w, t2f order."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, volume in zip(["t1n", "t1c", "t2w", "t2f"], images):
        image = nib.Nifti1Image(volume.astype(np.float32), affine)
        image.set_qform(affine, code=qform_code)
        image.set_sform(affine, code=sform_code)
        path = folder / f"BraTS-GLI-00001-000-{name}.nii.gz"
        nib.save(image, path)
        paths.append(path)
    return paths
