"""Voxel-grid geometry: orientation, spacing and resampling, as small pure functions on arrays.

Conventions: arrays are channel-first ``(C, I, J, K)`` numpy float32; an affine maps voxel indices
``(i, j, k)`` to RAS+ millimetres (nibabel's convention). SimpleITK works in LPS and orders numpy axes
``(z, y, x)``; the conversions live here and nowhere else.

The usual bug of this field is an output that is flipped, transposed or shifted against its input, so
every function here comes with its inverse and round-trip tests, with oblique and flipped affines.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from nibabel import orientations

_RAS = orientations.axcodes2ornt(("R", "A", "S"))
_LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def voxel_spacing(affine: np.ndarray) -> np.ndarray:
    """Millimetres between neighbouring voxel centres along each array axis."""
    return np.linalg.norm(affine[:3, :3], axis=0)


def to_canonical(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flip and transpose the spatial axes so that they run closest to R, A, S.

    Returns the reoriented array (a view), its affine, and the orientation that undoes it (for
    ``from_canonical``). Only axis permutations and flips: no interpolation, so the voxels are the
    same numbers, and an oblique scan stays oblique (its affine keeps the rotation).
    """
    ornt = orientations.io_orientation(affine)
    shape = array.shape[1:]
    canonical = np.moveaxis(orientations.apply_orientation(np.moveaxis(array, 0, -1), ornt), -1, 0)
    new_affine = affine @ orientations.inv_ornt_aff(ornt, shape)
    back = orientations.ornt_transform(_RAS, ornt)
    return canonical, new_affine, back


def from_canonical(array: np.ndarray, back: np.ndarray) -> np.ndarray:
    """Undo ``to_canonical`` on a channel-first array (a view)."""
    return np.moveaxis(orientations.apply_orientation(np.moveaxis(array, 0, -1), back), -1, 0)


def resample_linear(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Linearly resample a channel-first array to ``shape`` over the same field of view.

    Voxel corners are aligned (output voxel ``j`` samples input index ``(j + 0.5) · n_in / n_out − 0.5``),
    so resampling to a new shape and back returns to the original grid exactly.
    """
    shape = tuple(int(s) for s in shape)
    if tuple(array.shape[1:]) == shape:
        return array
    # numpy (I, J, K, C) is ITK's (z, y, x) with C components: sizes and spacings go reversed.
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.moveaxis(array, 0, -1)), isVector=True)
    scale = [n_in / n_out for n_in, n_out in zip(array.shape[1:], shape)][::-1]
    out = sitk.Resample(
        image, list(shape[::-1]), sitk.Transform(), sitk.sitkLinear,
        [(s - 1) / 2 for s in scale], scale, image.GetDirection(), 0.0, image.GetPixelID(),
    )
    # SimpleITK drops the component axis of one-channel images: put it back before moving it first.
    result = sitk.GetArrayFromImage(out).reshape(*shape, array.shape[0])
    return np.ascontiguousarray(np.moveaxis(result, -1, 0), dtype=np.float32)


def to_sitk(volume: np.ndarray, affine: np.ndarray) -> sitk.Image:
    """A 3D array on the grid of ``affine`` as a SimpleITK image with the same world coordinates."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(volume.transpose(2, 1, 0), dtype=np.float32))
    lps = _LPS_FROM_RAS @ affine
    spacing = voxel_spacing(affine)
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection([float(v) for v in (lps[:3, :3] / spacing).ravel()])
    image.SetOrigin([float(v) for v in lps[:3, 3]])
    return image


def ras_affine_of(image: sitk.Image) -> np.ndarray:
    """The voxel (i, j, k) → RAS+ mm affine of a SimpleITK image (ITK maps indices to LPS)."""
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3) * np.asarray(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    return _LPS_FROM_RAS @ lps  # the flip of the first two axes is its own inverse


def resample_to_grid(volume: np.ndarray, affine: np.ndarray, shape: tuple[int, ...],
                     target_affine: np.ndarray) -> np.ndarray:
    """Linearly resample a 3D volume onto another voxel grid, matching world coordinates (0 outside)."""
    reference = to_sitk(np.zeros(shape, np.float32), target_affine)
    out = sitk.Resample(to_sitk(volume, affine), reference, sitk.Transform(), sitk.sitkLinear, 0.0,
                        sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out).transpose(2, 1, 0)


def resample_voxels(volume: np.ndarray, out_to_in: np.ndarray, shape: tuple[int, ...], nearest: bool,
                    fill: float = 0.0) -> np.ndarray:
    """``volume`` (3D) sampled at voxel ``out_to_in @ (i, j, k, 1)`` for each voxel of ``shape``, linear or
    nearest, ``fill`` outside; the dtype is kept (ITK's pixel type). The ITK images have unit spacing
    and zero origin with ITK's (x, y, z) = our (i, j, k), so physical points are voxel indices."""
    transform = sitk.AffineTransform(3)
    transform.SetMatrix([float(v) for v in out_to_in[:3, :3].ravel()])
    transform.SetTranslation([float(v) for v in out_to_in[:3, 3]])
    image = sitk.GetImageFromArray(np.ascontiguousarray(volume.transpose(2, 1, 0)))
    out = sitk.Resample(image, [int(n) for n in shape], transform,
                        sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0),
                        (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0), float(fill), image.GetPixelID())
    return np.ascontiguousarray(sitk.GetArrayFromImage(out).transpose(2, 1, 0))


def world_bounds(shape: tuple[int, ...], affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned world box (min, max corners in mm) that holds every voxel centre."""
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in shape], indexing="ij")).reshape(3, -1)
    world = affine[:3, :3] @ corners + affine[:3, 3:4]
    return world.min(axis=1), world.max(axis=1)
