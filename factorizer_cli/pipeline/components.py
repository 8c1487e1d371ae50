"""NMF component maps in the patient's space: what each chosen Factorizer block looked at.

During inference the chosen subblocks of the first network (fold 0) record their factors
(``nn.components``). For every batch of windows, each block's maps (one per head and rank index, on the
block's grid) are upsampled linearly to the network window, and the sliding window blends them with the
same Gaussian weights as the probabilities. After inference the blended maps go through the case's
``Inverse`` (resampling, crop, reorientation undone), a block at a time, and are written as one 4D NIfTI
per block (a volume per component, the reference's affine) with ``components.json`` describing them.

Memory: the blended maps of every chosen block are held on the network grid (``dtype="float16"``
halves them); the patient-grid volumes exist one block at a time, when written.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError, InputError
from ..io import geometry
from ..io.atomic import make_folder, write_json_atomic
from ..io.images import Image, read_image, write_nifti
from ..io.png import write_png
from .preprocess import Inverse
from .preview import axial_slice, display_grey, tile_sheet

if TYPE_CHECKING:
    from ..nn.components import SiteRecorder

DTYPES = ("float32", "float16")
INT16_MAX = 32767
_CHANNELS_PER_STEP = 8  # channels inverted at a time: bounds the patient-grid temporaries

DEFINITION = (
    "For X ≈ U Vᵀ, X the (head_dim × voxels) features of one head in one window of the block (after its "
    "input projection and activation), component (head h, rank index r) is column r of U (channel "
    "loadings) and V (spatial pattern) in every window. Its map is V[:, r]·‖U[:, r]‖ (the norm of that "
    "rank-1 term's features at each voxel), put back in place by the matricize inverse; with several "
    "window shifts, the maps of the shifts are averaged. Maps are upsampled linearly to the network "
    "input grid, blended over sliding windows with the probabilities' Gaussian weights, and mapped "
    "onto the reference image by the same inverse as the labels (0 outside the cropped region). "
    "mean_channel_loadings: the unit-norm U[:, r] averaged over all windows, weighted by the term's "
    "energy ‖U[:, r]‖·‖V[:, r]‖; energy_share: the component's part of the block's summed energy."
)


@dataclass(frozen=True)
class ComponentRequest:
    """Which blocks to capture (None: the encoder's first stage and the bottleneck) and how to store."""

    blocks: tuple[str, ...] | None = None
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"component maps are float32 or float16, not {self.dtype!r}")


@dataclass
class ComponentBlock:
    """One captured block: its facts, its blended maps on the network grid, its loadings."""

    name: str
    facts: dict  # Site.describe()
    maps: np.ndarray  # (heads·rank, *network grid), float32 or float16
    loadings: np.ndarray  # (heads, head_dim, rank)
    energy: np.ndarray  # (heads, rank)

    def components(self) -> list[dict]:
        """One description per volume of the block's file, in volume order (head-major)."""
        rank, total = self.facts["rank"], float(self.energy.sum()) or 1.0
        return [
            {"volume": h * rank + r, "head": h, "rank_index": r,
             "channels": [h * self.facts["head_dim"], (h + 1) * self.facts["head_dim"]],
             "window_size": self.facts["window_size"],
             "energy_share": round(float(self.energy[h, r]) / total, 6),
             "mean_channel_loadings": [round(float(v), 6) for v in self.loadings[h, :, r]]}
            for h in range(self.facts["heads"]) for r in range(rank)
        ]


@dataclass
class ComponentMaps:
    """The component maps of one case, still on the network grid, with the way onto the patient's."""

    blocks: list[ComponentBlock]
    inverse: Inverse
    reference: Image
    model: str
    dtype: str = "float32"
    fold: int = 0
    notes: list[str] = field(default_factory=list)

    def volumes(self, block: ComponentBlock) -> np.ndarray:
        """The block's maps on the reference image's voxels, channels last, float32."""
        out = np.zeros((*self.reference.array.shape, block.maps.shape[0]), np.float32)
        for start in range(0, block.maps.shape[0], _CHANNELS_PER_STEP):
            chunk = block.maps[start : start + _CHANNELS_PER_STEP].astype(np.float32)
            out[..., start : start + len(chunk)] = np.moveaxis(self.inverse.invert(chunk, fill=0.0), 0, -1)
        return out

    def write(self, directory: str | Path) -> list[Path]:
        """``directory/<block>.nii.gz`` per block and ``components.json``; returns the paths written.

        float32 maps are stored as float32; float16 ones as int16 scaled by the file's ``scl_slope``
        (NIfTI-1 has no float16; every reader applies the slope).
        """
        directory = make_folder(directory, "folder for component maps")
        written, described = [], []
        for block in self.blocks:
            path = directory / f"{block.name}.nii.gz"
            volumes = self.volumes(block)
            peaks = volumes.reshape(-1, volumes.shape[-1]).max(0) if volumes.size else np.zeros(0)
            if self.dtype == "float16":
                slope = max(float(peaks.max(initial=0.0)), 1e-30) / INT16_MAX
                volumes /= slope
                write_nifti(path, volumes, self.reference, np.int16, slope=slope)
            else:
                write_nifti(path, volumes, self.reference, np.float32)
            del volumes
            written.append(path)
            components = block.components()
            for entry, peak in zip(components, peaks):
                entry["peak"] = round(float(peak), 6)
            described.append({"name": block.name, "file": path.name, **block.facts,
                              "stored_as": "int16 with scl_slope" if self.dtype == "float16" else "float32",
                              "components": components})
        report = {"model": self.model, "fold": self.fold, "dtype": self.dtype,
                  "definition": DEFINITION, "notes": self.notes, "blocks": described}
        path = directory / "components.json"
        write_json_atomic(path, report)
        written.append(path)
        return written


class ComponentCapture:
    """Collects the maps of recorders set on a network's blocks through one case's sliding window."""

    def __init__(self, recorders: Sequence[SiteRecorder], request: ComponentRequest, folds: int = 1,
                 tta: bool = False) -> None:
        self.request = request
        self.notes = [f"maps of fold 0 only: the {folds} folds factorize different features"] if folds > 1 else []
        if tta:
            self.notes.append("maps averaged over the mirror flips of test-time augmentation, each flipped back")
        self.recorders = list(recorders)  # set on their blocks by the family's capture, for the whole case
        self.dtype = torch.float16 if request.dtype == "float16" else torch.float32
        self.blended: Tensor | None = None  # (Σ heads·rank, *network grid), set by the Segmenter

    def wrap(self, predictor: Callable[[Tensor], Tensor]) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
        """A predictor that also returns the chosen blocks' maps upsampled to the window (B, K, *roi)."""

        def predict(x: Tensor) -> tuple[Tensor, Tensor]:
            probabilities = predictor(x)
            roi = tuple(x.shape[2:])
            maps = [_upsample(r.maps, roi).to(self.dtype) for r in self.recorders]
            for recorder in self.recorders:
                recorder.maps = None
            return probabilities, torch.cat(maps, 1)

        return predict

    def result(self, inverse: Inverse, reference: Image, model: str) -> ComponentMaps:
        """The blended maps split by block, with loadings, ready to write."""
        if self.blended is None:
            raise ConfigError("no component maps were blended; run the inference with this capture first")
        blocks, start = [], 0
        for recorder in self.recorders:
            facts = recorder.site.describe()
            count = facts["heads"] * facts["rank"]
            blocks.append(ComponentBlock(
                name=recorder.site.name, facts=facts,
                maps=self.blended[start : start + count].numpy(),
                loadings=recorder.mean_loadings().cpu().numpy(), energy=recorder.energy.cpu().numpy(),
            ))
            start += count
        return ComponentMaps(blocks, inverse, reference, model, self.request.dtype, notes=list(self.notes))


def _upsample(maps: Tensor, size: tuple[int, ...]) -> Tensor:
    """Linear upsampling (voxel corners aligned, as the strided convolutions see them), float32."""
    maps = maps.float()
    if tuple(maps.shape[2:]) == size:
        return maps
    mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(size)]
    return F.interpolate(maps, size=size, mode=mode, align_corners=False)


# ------------------------------------------------------------------------------------------ preview

RANKINGS = ("contrast", "energy")


def _heat(t: np.ndarray) -> np.ndarray:
    """Black-red-yellow-white colours for values in [0, 1]: (..., 3) float."""
    return np.stack([np.clip(3 * t, 0, 1), np.clip(3 * t - 1, 0, 1), np.clip(3 * t - 2, 0, 1)], -1) * 255


@dataclass(frozen=True)
class PreviewTile:
    block: str
    head: int
    rank_index: int
    energy_share: float
    contrast: float  # 99.9th percentile over median, inside the image
    slice_index: int  # axial slice of the RAS-reoriented volume shown


def _read_report(directory: Path) -> dict:
    path = directory / "components.json"
    if not path.is_file():
        raise InputError(f"{directory}: no components.json; give the folder written by segment --components")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: unreadable ({err})") from None


def _read_map(directory: Path, block: dict, component: dict) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    file = directory / block["file"]
    try:
        nifti = nib.load(file)
        return np.asarray(nifti.dataobj[..., component["volume"]], dtype=np.float32), nifti.affine
    except Exception as err:  # nibabel raises many kinds on a missing or broken file
        raise InputError(f"{file}: cannot read the component maps ({err})") from None


def components_montage(directory: str | Path, background: str | Path, top: int = 8,
                       blocks: Sequence[str] | None = None, by: str = "contrast", columns: int = 4,
                       alpha: float = 0.6) -> tuple[np.ndarray, list[PreviewTile]]:
    """A montage of the ``top`` strongest component maps over ``background``, each at its peak slice.

    Strongest ``by`` contrast (the map's 99.9th percentile over its median inside the image: focal
    maps first, such as a lesion's) or by energy share (the component's part of its block's
    factorization: broad maps first). Tiles are axial slices in radiological convention (as
    ``preview.montage``), at the slice holding most of the map; each map is scaled to its own 99.9th
    percentile and drawn inside the image only. Returns the RGB sheet and what each tile shows.
    """
    if by not in RANKINGS:
        raise ConfigError(f"rank components by {' or '.join(RANKINGS)}, not {by!r}")
    directory = Path(directory)
    report = _read_report(directory)
    known = [b["name"] for b in report["blocks"]]
    missing = sorted(set(blocks or ()) - set(known))
    if missing:
        raise InputError(f"no block {', '.join(missing)} in these component maps; known: {', '.join(known)}")
    entries = [(b, c) for b in report["blocks"] if not blocks or b["name"] in blocks for c in b["components"]]
    if not entries:
        raise InputError(f"{directory / 'components.json'}: lists no components")
    image = read_image(background)
    grids: dict[tuple, np.ndarray] = {}  # the background on each maps grid (all share the reference's)

    def on_grid(volume: np.ndarray, affine: np.ndarray) -> np.ndarray:
        key = (volume.shape, affine.tobytes())
        if key not in grids:
            same = image.array.shape == volume.shape and np.allclose(image.affine, affine, atol=1e-3)
            grids[key] = image.array if same else geometry.resample_to_grid(image.array, image.affine,
                                                                             volume.shape, affine)
        return grids[key]

    scored = []
    for block, component in entries:
        volume, affine = _read_map(directory, block, component)
        inside = on_grid(volume, affine) != 0
        values = volume[inside] if inside.any() else volume.ravel()
        high, median = np.percentile(values, [99.9, 50])
        scored.append((float(high / max(median, 1e-12 * max(high, 1e-30))), block, component))
    key = (lambda e: -e[0]) if by == "contrast" else (lambda e: -e[2]["energy_share"])
    scored.sort(key=key)

    tiles, shown = [], []
    for contrast, block, component in scored[:top]:
        volume, affine = _read_map(directory, block, component)
        grey = on_grid(volume, affine)
        both, _, _ = geometry.to_canonical(np.stack([grey, volume]), affine)
        grey, heat = both
        inside = grey != 0 if (grey != 0).any() else np.ones(grey.shape, bool)
        heat = np.where(inside, heat, 0.0)
        z = int(np.argmax(heat.sum(axis=(0, 1))))
        scale = float(np.percentile(heat[inside], 99.9)) or float(heat.max()) or 1.0
        t = axial_slice(np.clip(heat / scale, 0, 1), z)
        rgb = np.repeat(axial_slice(display_grey(grey), z)[..., None], 3, axis=2)
        weight = (alpha * t)[..., None]
        tiles.append(((1 - weight) * rgb + weight * _heat(t)).astype(np.uint8))
        shown.append(PreviewTile(block["name"], component["head"], component["rank_index"],
                                 component["energy_share"], round(contrast, 3), z))
    return tile_sheet(tiles, columns), shown


def write_components_preview(path: str | Path, directory: str | Path, background: str | Path, top: int = 8,
                             blocks: Sequence[str] | None = None, by: str = "contrast") -> list[PreviewTile]:
    sheet, shown = components_montage(directory, background, top, blocks, by)
    write_png(path, sheet)
    return shown
