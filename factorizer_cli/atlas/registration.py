"""Affine registration of a T1 to a standard template, as a preprocessing step that can be undone.

Atlas-space models (SPiN, trained on ATLAS R1.2 volumes on the MNI152 2009a grid) see a scan only after
it is brought onto the template's grid. ``Registration.fit`` finds the affine map between the scan and
the template with SimpleITK; the record then ``apply``-s it (native grid → template grid, for the
network's input and for training labels) and ``invert``-s it (template grid → native grid, for the
outputs), the protocol of the other steps of ``pipeline.preprocess``, so it sits in ``Inverse.steps``
and every output keeps the input's exact geometry.

Registration (template fixed, scan moving; Mattes mutual information with 32 bins, so the contrasts
need not match): the centres of mass aligned (moments), then rigid (6 parameters) at 8, 4 and 2 mm,
then affine (12) at 4 and 2 mm. Each level's images are smoothed (σ = half the level) and binned once,
outside ITK (``_pyramid``; the template's are cached): ITK's own pyramid smoothed the full images
again on every optimizer run, which took most of the time. The metric is sampled at random points of
the template's brain grown by ``MASK_MARGIN_MM`` (the template is skull-stripped: outside it, its
zeros say nothing about the scan's scalp), drawn with a fixed seed; runs agree to 1e-6 mm, not to the
bit (ITK's threads sum the metric in a varying order). The schedule stops at 2 mm: a 1 mm level about
doubled the time and, for 1×1×3 mm scans, moved the result 0.3 mm further from the truth (their
interpolated slices match the 1 mm template only once both are smoothed). On the tests' cases (the
template moved by up to 15° and 20 mm, resampled onto oblique 1×1×3 mm grids, with or without a
synthetic scalp, skull and neck) the corners of the template's brain land within 0.3 mm of where they
should, in 1-3 s on two cores (and about 1.5 s more once per process, for the template's pyramid).

Geometry: an ``Image`` holds (i, j, k) arrays and a RAS affine; ITK works in LPS with (k, j, i) arrays.
The transform is found on images made by ``io.geometry.to_sitk`` (which does that conversion) and kept
as ``matrix``, a 4×4 map from template RAS millimetres to scan RAS millimetres. Resampling then works
in voxel indices (``_resample``): the voxel-to-voxel map is the product of the affines, and the ITK
images it builds have unit spacing, zero origin and (i, j, k) axes, so no second convention enters.

Intensities (``match_template_scale``): upstream SPiN gives no rule for scans of other scanners. After
registration each channel is multiplied by one factor (zero stays zero: the background, and the fill
outside the scan's field of view) so that its median over the template's brain mask equals the
template's own (178 on its 0..255 scale). Why this rule: the mask, carried over by the registration,
picks the same tissue in every scan, never the scalp, fat and neck of an unstripped scan whose share
of a whole-volume histogram changes with the field of view; a median needs no tissue model, and a
lesion filling a fraction f of the brain can move it only to the (50 ± 100·f)th percentile of the
healthy tissue. Voxels at 0 inside the mask (beyond the field of view) are left out, so a scan that
covers part of the brain is scaled by the part it shows. One factor suffices for magnitude images,
whose zero is zero; a bias field or another contrast is not corrected.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import SimpleITK as sitk

from ..errors import InputError, one_line
from ..io import geometry
from ..io.images import Image
from .template import MNI152_2009A, brain_mask, template

MASK_MARGIN_MM = 8.0  # the template's brain grown by this much: where the metric is sampled
SEED = 20091  # random sampling of the metric (fixed: the same transform, to 1e-6 mm, on every run)
HISTOGRAM_BINS = 32


@dataclass(frozen=True)
class Level:
    """One resolution of the schedule: images smoothed (σ = mm / 2) and binned to ``mm`` per voxel, the
    fraction of their voxels the metric samples, and the optimizer's iteration budget."""

    mm: float
    fraction: float
    iterations: int


RIGID = (Level(8, 1.0, 100), Level(4, 0.5, 100), Level(2, 0.1, 40))
AFFINE = (Level(4, 0.5, 60), Level(2, 0.1, 40))
LEVELS_MM = (8, 4, 2)


@dataclass(frozen=True)
class Registration:
    """An affine map between a scan's grid (native) and a template's grid.

    ``matrix`` maps template RAS mm to native RAS mm (the template point ``p`` is seen at ``matrix @ p``
    in the scan); the grids are ``native_shape`` on ``native_affine`` and ``template_shape`` on
    ``template_affine`` (voxel (i, j, k) → RAS mm).
    """

    template: str
    matrix: np.ndarray
    native_affine: np.ndarray
    native_shape: tuple[int, ...]
    template_affine: np.ndarray
    template_shape: tuple[int, ...]

    @classmethod
    def fit(cls, image: Image, name: str = MNI152_2009A) -> Registration:
        """Register ``image`` (a T1, any grid and orientation) to the template ``name``.

        Raises ``ConfigError`` when the template is not installed (``atlas.template``), ``InputError``
        when ITK cannot register the image (too small, or no part of it overlaps the template's brain).
        """
        atlas = template(name)
        return cls(name, find_affine(image, name), image.affine.copy(), tuple(image.shape),
                   atlas.affine.copy(), tuple(atlas.shape))

    def apply(self, array: np.ndarray, nearest: bool | None = None) -> np.ndarray:
        """Channel-first arrays on the native grid, onto the template grid (0 outside the scan).

        Linear interpolation (float32 out), or nearest neighbour (dtype kept) where ``nearest`` is
        true; ``None`` chooses nearest for integer and bool arrays (label maps), linear otherwise.
        """
        to_native = np.linalg.inv(self.native_affine) @ self.matrix @ self.template_affine
        return _resample(array, to_native, self.template_shape, _is_labels(array, nearest), 0.0)

    def invert(self, array: np.ndarray, fill: float = 0.0, nearest: bool | None = None) -> np.ndarray:
        """Channel-first arrays on the template grid, back onto the native grid (``fill`` outside)."""
        to_template = np.linalg.inv(self.template_affine) @ np.linalg.inv(self.matrix) @ self.native_affine
        return _resample(array, to_template, self.native_shape, _is_labels(array, nearest), fill)


def find_affine(image: Image, name: str = MNI152_2009A) -> np.ndarray:
    """The 4×4 map from template RAS mm to ``image``'s RAS mm that best aligns the two (see module)."""
    fixed = _template_pyramid(name)
    try:
        transform = _register(fixed, _pyramid(geometry.to_sitk(image.array, image.affine)), _sampling_mask(name))
    except RuntimeError as exc:  # e.g. under 4 voxels along an axis; no sample of the brain in the scan
        raise InputError(f"{image.path}: cannot be registered to the {name} template ({_itk_reason(exc)}); "
                         "check that it is a head scan and its header's geometry") from exc
    # ITK: x ↦ A (x − c) + c + t, from fixed (template) LPS to moving (scan) LPS points.
    a = np.asarray(transform.GetMatrix(), dtype=np.float64).reshape(3, 3)
    c, t = np.asarray(transform.GetCenter()), np.asarray(transform.GetTranslation())
    lps = np.eye(4)
    lps[:3, :3], lps[:3, 3] = a, c + t - a @ c
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS ↔ LPS, its own inverse
    return flip @ lps @ flip


def _register(fixed: dict[float, sitk.Image], moving: dict[float, sitk.Image],
              mask: sitk.Image) -> sitk.AffineTransform:
    """Moments, then rigid, then affine over the pyramids' levels (see module); the transform found."""
    finest = min(LEVELS_MM)
    transform = sitk.CenteredTransformInitializer(fixed[finest], moving[finest], sitk.Euler3DTransform(),
                                                  sitk.CenteredTransformInitializerFilter.MOMENTS)
    for level in RIGID:
        _optimize(fixed[level.mm], moving[level.mm], transform, level, mask)
    rigid, transform = transform, sitk.AffineTransform(3)
    transform.SetCenter(rigid.GetCenter())
    transform.SetMatrix(rigid.GetMatrix())
    transform.SetTranslation(rigid.GetTranslation())
    for level in AFFINE:
        _optimize(fixed[level.mm], moving[level.mm], transform, level, mask)
    return transform


def _optimize(fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform, level: Level,
              mask: sitk.Image) -> None:
    """Improve ``transform`` (in place) on one resolution level.

    Regular-step gradient descent with steps measured in mm of voxel motion (parameter scales from
    physical shift; the first step moves voxels by at most ``level.mm``, and the step halves whenever
    the direction turns back) until steps are under 0.01 or after ``level.iterations``. Plain gradient
    descent with its window-based convergence test stopped early, 1-20 mm off, on the test cases.
    """
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=HISTOGRAM_BINS)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(level.fraction, SEED)
    method.SetMetricFixedMask(mask)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=1.0, minStep=0.01, numberOfIterations=level.iterations, relaxationFactor=0.5,
        estimateLearningRate=method.Once, maximumStepSizeInPhysicalUnits=float(level.mm),
    )
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetInitialTransform(transform, inPlace=True)
    method.Execute(fixed, moving)


def _itk_reason(exc: RuntimeError) -> str:
    """The reason in an ITK exception, without the source path and object address before it."""
    text = str(exc).split("ITK ERROR:")[-1]
    return one_line(re.sub(r"^\s*\w+\(0x[0-9a-f]+\):\s*", "", text))


def _pyramid(image: sitk.Image) -> dict[float, sitk.Image]:
    """``image`` at each of ``LEVELS_MM``: Gaussian-smoothed (σ = mm / 2) and binned (averaged) to about
    that many mm per voxel, each axis by ``round(mm / spacing)`` voxels (a 3 mm axis only at 8 mm).

    Built once and given to ITK at shrink 1: its own pyramid would smooth the full images again on every
    optimizer run, which took most of the time.
    """
    levels = {}
    for mm in LEVELS_MM:
        factors = [max(1, round(mm / s)) for s in image.GetSpacing()]
        smooth = sitk.SmoothingRecursiveGaussian(image, mm / 2)
        levels[mm] = sitk.BinShrink(smooth, factors) if max(factors) > 1 else smooth
    return levels


@lru_cache(maxsize=2)
def _template_pyramid(name: str) -> dict[float, sitk.Image]:
    atlas = template(name)
    return _pyramid(geometry.to_sitk(atlas.array, atlas.affine))


@lru_cache(maxsize=2)
def _sampling_mask(name: str) -> sitk.Image:
    """The template's brain grown by ``MASK_MARGIN_MM``, as a uint8 ITK image on the template's grid."""
    atlas = template(name)
    mask = sitk.GetImageFromArray(brain_mask(name).transpose(2, 1, 0).astype(np.uint8))
    spacing = geometry.voxel_spacing(atlas.affine)
    radius = [max(1, round(MASK_MARGIN_MM / s)) for s in spacing]
    grown = sitk.BinaryDilate(mask, radius, sitk.sitkBall)
    grown.CopyInformation(geometry.to_sitk(np.zeros(atlas.shape, np.float32), atlas.affine))
    return grown


def match_template_scale(array: np.ndarray, name: str = MNI152_2009A,
                         sources: Sequence[str] | None = None) -> tuple[np.ndarray, list[float]]:
    """Scale each channel of ``array`` (on the template grid) so its median over the brain matches the
    template's (see module); the scaled float32 array and the factor used per channel.

    Raises ``InputError``, naming the channel's ``sources`` entry (its file), when a channel has no
    positive signal inside the template's brain (the registration failed, or the image is no head).
    """
    mask = brain_mask(name)
    target = template_brain_median(name)
    out, factors = np.empty(array.shape, np.float32), []
    for c, channel in enumerate(array):
        values = channel[mask]
        values = values[values != 0]
        median = float(np.median(values)) if values.size else 0.0
        if not median > 0:
            source = sources[c] if sources is not None else f"channel {c}"
            raise InputError(f"{source}: no positive signal inside the {name} brain after registration; "
                             "check that the image is a head scan (T1) and its header's geometry")
        factors.append(target / median)
        out[c] = channel * np.float32(target / median)
    return out, factors


@lru_cache(maxsize=2)
def template_brain_median(name: str = MNI152_2009A) -> float:
    """The template's median intensity over its brain (178 for MNI152 2009a)."""
    return float(np.median(template(name).array[brain_mask(name)]))


def _is_labels(array: np.ndarray, nearest: bool | None) -> bool:
    return array.dtype.kind in "biu" if nearest is None else bool(nearest)


def _resample(array: np.ndarray, out_to_in: np.ndarray, shape: tuple[int, ...], nearest: bool,
              fill: float) -> np.ndarray:
    """Each channel of ``array`` sampled at ``out_to_in @ (i, j, k, 1)`` for every voxel of ``shape``
    (``geometry.resample_voxels``): nearest keeps the dtype (bool through uint8), linear gives float32."""
    dtype = (np.uint8 if array.dtype == bool else array.dtype) if nearest else np.float32
    out = np.empty((array.shape[0], *shape), dtype=bool if array.dtype == bool and nearest else dtype)
    for c, channel in enumerate(array):
        out[c] = geometry.resample_voxels(channel.astype(dtype, copy=False), out_to_in, shape, nearest, fill)
    return out
