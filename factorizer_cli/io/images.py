"""Read and write the images of one case: NIfTI files and DICOM series in, NIfTI out.

Geometry is the usual source of silent errors in this field (flipped or shifted outputs), so this
module keeps one convention everywhere: an ``Image`` holds its voxels in the axis order nibabel gives
(i, j, k) and an ``affine`` that maps those voxel indices to RAS+ millimetres. DICOM series, which ITK
reads in LPS with (k, j, i) arrays, are converted to that convention on the way in, so later code never
sees two conventions. Outputs reuse the reference's header (qform, sform and their codes, units), so a
viewer overlays them exactly on the input.

Every problem with an input raises ``InputError`` and every unwritable output ``OutputError``, each
with a one-line message that names the file and says the fix.
"""

from __future__ import annotations

import gzip
import locale
import os
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from ..errors import InputError, OutputError, one_line
from . import geometry
from .atomic import atomic_path
from .cases import nifti_suffix

_ACCEPTED = "a .nii or .nii.gz file, or a folder holding one DICOM series"
# What nibabel, gzip and zlib raise on a truncated or corrupt file, depending on where it breaks.
_READ_ERRORS = (EOFError, zlib.error, OSError, ValueError, OverflowError, ImageFileError, HeaderDataError)


@dataclass
class Image:
    """One 3D image with its geometry.

    ``array`` is float32 with axes (i, j, k) exactly as nibabel returns them; ``affine`` maps
    (i, j, k, 1) to RAS+ millimetres (nibabel convention). ``header`` is kept so outputs can copy the
    input's qform/sform codes and units; ``path`` is where it came from (for messages).
    """

    array: np.ndarray
    affine: np.ndarray
    header: nib.Nifti1Header | None
    path: Path

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along i, j, k: the column norms of the affine (right for oblique too)."""
        return tuple(float(s) for s in geometry.voxel_spacing(self.affine))

    @property
    def shape(self) -> tuple[int, ...]:
        """The voxel grid's shape (i, j, k)."""
        return tuple(self.array.shape)


# ----------------------------------------------------------------------------------------- reading


def read_image(path: str | os.PathLike[str]) -> Image:
    """Read a NIfTI file or a folder holding one DICOM series into an ``Image`` (RAS+, float32).

    Raises ``InputError`` for a missing file, a format we do not read, a truncated or corrupt file,
    a 2D or multi-volume 4D image, NaN/Inf values, or an image whose voxels are all zero.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder; check the path")
    if path.is_dir():
        image = _read_dicom_series(path)
    elif nifti_suffix(path) is not None:
        image = _read_nifti(path)
    else:
        raise InputError(f"{path}: not a NIfTI image; give {_ACCEPTED}")
    check_image(image)
    return image


def read_label_map(path: str | os.PathLike[str]) -> Image:
    """Read a NIfTI label map (a segmentation or a mask) into an ``Image`` of whole numbers >= 0.

    Unlike ``read_image`` an all-zero map is valid (an empty prediction or truth). Raises
    ``InputError`` for what ``read_image`` refuses, and for fractional or negative values.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file; check the path")
    if nifti_suffix(path) is None:
        raise InputError(f"{path}: not a NIfTI label map; give a .nii or .nii.gz file")
    image = _read_nifti(path)
    array = image.array
    if not np.all(np.isfinite(array)) or np.any(array < 0) or np.any(array != np.rint(array)):
        raise InputError(f"{path}: holds negative, fractional, NaN or Inf values, so it is no label map; "
                         "give a segmentation with labels 0, 1, 2, ...")
    return image


def check_image(image: Image) -> None:
    """Raise ``InputError`` unless ``image`` is a 3D, finite, non-empty volume.

    Shared by the readers and by code that builds images itself, so every path into the pipeline
    refuses the same inputs with the same messages.
    """
    array, path = image.array, image.path
    _check_shape(array.shape, path)
    bad = array.size - int(np.count_nonzero(np.isfinite(array)))
    if bad:
        raise InputError(
            f"{path}: {bad} voxels are NaN or Inf; fix the conversion that made this file"
        )
    if not np.any(array):
        raise InputError(
            f"{path}: empty image (all voxels are zero); check that it is the right file"
        )


def _check_shape(shape: tuple[int, ...], path: Path) -> None:
    """Raise ``InputError`` unless ``shape`` is a 3D volume (shared by the checks and the reader)."""
    if len(shape) == 4:
        raise InputError(f"{path}: 4D image with {shape[3]} volumes; give one 3D file per modality")
    if len(shape) > 4:
        raise InputError(f"{path}: {len(shape)}D image of shape {shape}; give a 3D volume")
    if min(shape, default=0) < 1:
        raise InputError(f"{path}: header declares the impossible shape {shape}; the file is corrupt")
    if len(shape) < 3 or min(shape) == 1:
        raise InputError(f"{path}: 2D image of shape {shape}; give a 3D volume")


def _read_nifti(path: Path) -> Image:
    try:
        img, nbytes = _load_nifti(path)
    except _READ_ERRORS as exc:
        raise InputError(f"{path}: {_unreadable_reason(path, exc)}") from exc
    if not isinstance(img, nib.Nifti1Image):  # Nifti2Image is a subclass, so it passes
        raise InputError(f"{path}: not a NIfTI image ({type(img).__name__}); give {_ACCEPTED}")
    if img.get_data_dtype().fields is not None:
        raise InputError(f"{path}: RGB image; give a grayscale MRI volume")
    if img.get_data_dtype().kind == "c":
        raise InputError(f"{path}: complex-valued image; give the magnitude image")
    shape = _squeeze_trailing(img.shape)
    _check_shape(shape, path)  # before reading the voxels: a large 4D file is refused at once
    _check_declared_size(img.header, shape, nbytes, path)
    affine = img.affine.astype(np.float64)
    check_affine(affine, path)
    try:
        array = img.get_fdata(dtype=np.float32, caching="unchanged")
        header = img.header if type(img.header) is nib.Nifti1Header else _nifti1_header_from(img.header)
    except (*_READ_ERRORS, MemoryError, KeyError) as exc:
        raise InputError(
            f"{path}: truncated or corrupt file ({one_line(exc)}); copy or download it again"
        ) from exc
    return Image(array.reshape(shape), affine, header, path)


def _check_declared_size(header: nib.Nifti1Header, shape: tuple[int, ...], nbytes: int, path: Path) -> None:
    """Refuse a header that promises more voxels than the file holds, before allocating them."""
    needed = int(np.prod(shape, dtype=object)) * header.get_data_dtype().itemsize
    try:
        offset = int(header.get_data_offset())
    except (OverflowError, ValueError):
        offset = -1
    if offset < 0 or offset + needed > nbytes:
        raise InputError(f"{path}: header declares {shape} voxels but the file is too short for them; "
                         "the file is truncated or corrupt")


# Voxel sizes outside this range (mm) are no MRI scanner's: a corrupt or mistyped header.
SPACING_RANGE_MM = (1e-3, 1e3)


def check_affine(affine: np.ndarray, path: Path) -> None:
    """Raise ``InputError`` unless ``affine`` is a usable voxel-to-world map.

    Finite, voxel sizes in ``SPACING_RANGE_MM``, and axes not folded onto each other (a near-singular
    or extremely sheared direction matrix cannot be reoriented or resampled).
    """
    if not np.isfinite(affine).all():
        raise InputError(f"{path}: the header's affine (qform/sform) holds NaN or Inf; fix the conversion "
                         "that made this file")
    spacing = geometry.voxel_spacing(affine)
    if spacing.min() < SPACING_RANGE_MM[0] or spacing.max() > SPACING_RANGE_MM[1]:
        raise InputError(f"{path}: voxel size {np.round(spacing, 6).tolist()} mm is not plausible; the header's "
                         "spacing (pixdim, qform/sform) is corrupt")
    if abs(np.linalg.det(affine[:3, :3] / spacing)) < 0.1:
        raise InputError(f"{path}: the header's axes are (nearly) parallel, so the image has no valid "
                         "orientation; fix its qform/sform")


def _load_nifti(path: Path) -> tuple[nib.Nifti1Image, int]:
    """``nib.load``, and the size in bytes of what holds the data; a ``.nii.gz`` is decompressed first.

    Only reading a gzip stream to its end checks its CRC, and nibabel reads just the bytes it needs,
    so a corrupt file could otherwise yield wrong voxels silently. One full decompression is also
    what nibabel would do anyway.
    """
    if nifti_suffix(path) == ".nii":  # plain arrays: no file kept mapped behind the image
        return nib.load(path, mmap=False), path.stat().st_size
    raw = gzip.decompress(path.read_bytes())
    sizes = {int.from_bytes(raw[:4], "little"), int.from_bytes(raw[:4], "big")}
    if 348 in sizes:
        return nib.Nifti1Image.from_bytes(raw), len(raw)
    if 540 in sizes:
        return nib.Nifti2Image.from_bytes(raw), len(raw)
    raise ImageFileError("no NIfTI header after decompression")


def _unreadable_reason(path: Path, exc: Exception) -> str:
    """Why nibabel could not open ``path``, with the fix (a misnamed gzip is the common case)."""
    try:
        with open(path, "rb") as f:
            gzipped = f.read(2) == b"\x1f\x8b"
    except OSError:
        return f"cannot be opened ({one_line(exc)}); check its permissions"
    if nifti_suffix(path) == ".nii" and gzipped:
        return "gzip-compressed but named .nii; rename it to .nii.gz"
    if nifti_suffix(path) == ".nii.gz" and not gzipped:
        return "not gzip-compressed but named .nii.gz; rename it to .nii if it is a NIfTI file"
    if isinstance(exc, (EOFError, zlib.error, gzip.BadGzipFile)):
        return f"truncated or corrupt file ({one_line(exc)}); copy or download it again"
    return f"not a NIfTI image ({one_line(exc)}); give {_ACCEPTED}"


def _squeeze_trailing(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Drop trailing length-1 axes beyond the third: (X, Y, Z, 1) is a 3D image saved as 4D."""
    shape = tuple(shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def _read_dicom_series(folder: Path) -> Image:
    """Read the one DICOM series in ``folder`` and convert ITK's LPS geometry to a RAS affine."""
    with _quiet_itk():  # ITK prints its warnings; we raise InputError for the ones that matter
        itk_image = _read_itk_series(folder)
    if itk_image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{folder}: colour DICOM series; give a grayscale MRI series")
    if itk_image.GetDimension() != 3:
        raise InputError(f"{folder}: {itk_image.GetDimension()}D DICOM image; give a 3D series")
    # ITK arrays are (k, j, i); nibabel's are (i, j, k). astype copies out of ITK's buffer.
    array = sitk.GetArrayViewFromImage(itk_image).transpose(2, 1, 0).astype(np.float32)
    affine = geometry.ras_affine_of(itk_image)
    check_affine(affine, folder)
    header = header_from_affine(affine, array.shape, code="scanner")
    return Image(array, affine, header, folder)


@contextmanager
def _quiet_itk() -> Iterator[None]:
    """Silence ITK's warnings, and undo GDCM's ``setlocale(LC_ALL, "C")``.

    GDCM switches the process to the C locale while it reads; left so, Python's default text
    encoding becomes ASCII for the rest of the run.
    """
    display = sitk.ProcessObject.GetGlobalWarningDisplay()
    saved_locale = locale.setlocale(locale.LC_ALL)
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(display)
        locale.setlocale(locale.LC_ALL, saved_locale)


def _read_itk_series(folder: Path) -> sitk.Image:
    try:
        series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    except RuntimeError as exc:
        raise InputError(f"{folder}: cannot list DICOM files ({one_line(exc)})") from exc
    if not series:
        raise InputError(f"{folder}: folder holds no DICOM series; give {_ACCEPTED}")
    if len(series) > 1:
        raise InputError(
            f"{folder}: folder holds {len(series)} DICOM series; put each series in its own folder"
        )
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series[0]))
    reader.MetaDataDictionaryArrayUpdateOn()  # per-slice positions, for the spacing check
    try:
        itk_image = reader.Execute()
    except RuntimeError as exc:
        raise InputError(
            f"{folder}: unreadable DICOM series ({one_line(exc)}); export the series again"
        ) from exc
    _check_slice_spacing(reader, folder)
    return itk_image


def _check_slice_spacing(reader: sitk.ImageSeriesReader, folder: Path) -> None:
    """Refuse a series with a missing or doubled slice: one affine cannot describe uneven gaps.

    ITK only warns (on stderr) and uses an average spacing, which would shift every slice past the
    gap. Positions are projected on the slice normal; a gap off the median by over 1 % fails.
    """
    count = len(reader.GetFileNames())
    if count < 3 or not all(reader.HasMetaDataKey(i, "0020|0032") for i in range(count)):
        return
    try:
        cosines = [float(v) for v in reader.GetMetaData(0, "0020|0037").split("\\")]
        positions = np.array(
            [
                [float(v) for v in reader.GetMetaData(i, "0020|0032").split("\\")]
                for i in range(count)
            ]
        )
    except (RuntimeError, ValueError):  # tags absent or malformed: ITK's own geometry stands
        return
    along = positions @ np.cross(cosines[:3], cosines[3:6])
    gaps = np.diff(np.sort(along))
    typical = float(np.median(gaps))
    if typical > 0 and np.max(np.abs(gaps - typical)) > 0.01 * typical:
        raise InputError(
            f"{folder}: DICOM slices are unevenly spaced (gaps {gaps.min():.3g} to "
            f"{gaps.max():.3g} mm); a slice is missing or doubled, export the full series again"
        )


def header_from_affine(
    affine: np.ndarray, shape: Sequence[int], code: str | int = "scanner"
) -> nib.Nifti1Header:
    """A fresh NIfTI-1 header whose qform and sform both hold ``affine`` (units mm and s)."""
    header = nib.Nifti1Header()
    header.set_data_shape(tuple(shape))
    header.set_data_dtype(np.float32)
    header.set_qform(affine, code=code)
    header.set_sform(affine, code=code)
    header.set_xyzt_units("mm", "sec")
    return header


def _nifti1_header_from(header: nib.Nifti1Header) -> nib.Nifti1Header:
    """A NIfTI-1 header with the geometry (forms, codes, units) of a NIfTI-2 one."""
    converted = header_from_affine(header.get_best_affine(), header.get_data_shape()[:3])
    converted.set_qform(header.get_qform(), code=int(header["qform_code"]))
    converted.set_sform(header.get_sform(), code=int(header["sform_code"]))
    converted.set_xyzt_units(*header.get_xyzt_units())
    return converted


# ----------------------------------------------------------------------------------------- writing


def write_nifti(
    path: str | os.PathLike[str], array: np.ndarray, reference: Image, dtype: np.dtype | type | str,
    slope: float = 1.0,
) -> None:
    """Write ``array`` as a NIfTI file on ``reference``'s grid, atomically.

    ``array`` is 3D, or 4D with channels last (NIfTI keeps volumes on its 4th axis); its first three
    axes must equal the reference's shape. The output gets exactly the reference's affine, qform and
    sform with their codes and ``xyzt_units``, the on-disk ``dtype`` (uint8 for label maps, float32
    for probability maps; NIfTI-1 has no float16) and no intensity scaling (slope 1, intercept 0), so
    labels are stored as they are. Raises ``ValueError`` for an array that does not fit, and
    ``OutputError`` when the file cannot be written.

    ``slope``: store ``array`` (already divided by it) with that ``scl_slope``, so that readers get
    ``array · slope``: a float map kept in 16-bit integers.
    """
    path = Path(path)
    if nifti_suffix(path) is None:
        raise OutputError(f"{path}: output name must end in .nii.gz or .nii; rename it")
    data = np.asarray(array)
    if data.ndim not in (3, 4) or data.shape[:3] != tuple(reference.array.shape):
        raise ValueError(
            f"array of shape {data.shape} does not fit the reference grid {reference.array.shape} "
            "(expected the same 3 spatial axes, plus channels last)"
        )
    data = _cast(data, np.dtype(dtype))
    header = _output_header(reference, data)
    image = nib.Nifti1Image(data, None, header=header)  # None: nibabel keeps the header's forms
    # After construction: nibabel resets scaling on a header passed in, and NaN means "choose one".
    image.header.set_slope_inter(float(slope), 0.0)
    with atomic_path(path) as temporary:
        nib.save(image, temporary)


def _cast(data: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``data`` as ``dtype``, refusing casts that would silently change values (wrap, NaN)."""
    if dtype == np.float16:
        raise ValueError("NIfTI-1 has no float16 data type; write float32 (or uint8 for labels)")
    if dtype.kind in "ui" and data.dtype.kind in "fiu" and data.size:
        if data.dtype.kind == "f" and not np.all(np.isfinite(data)):
            raise ValueError(f"cannot store NaN or Inf as {dtype}")
        info = np.iinfo(dtype)
        low, high = data.min(), data.max()
        if low < info.min or high > info.max:
            raise ValueError(f"values {low}..{high} do not fit {dtype} ({info.min}..{info.max})")
        if data.dtype.kind == "f":
            data = np.rint(data)
    return data.astype(dtype, copy=False)


def _output_header(reference: Image, data: np.ndarray) -> nib.Nifti1Header:
    """The reference's header with the output's shape and dtype, scaling and value hints reset."""
    if reference.header is None:
        header = header_from_affine(reference.affine, data.shape[:3])
    else:
        header = reference.header.copy()
        if not np.allclose(header.get_best_affine(), reference.affine, atol=1e-5):
            # The image was given a new affine: store it, keeping the codes the header had.
            header.set_sform(reference.affine, code=int(header["sform_code"]) or "aligned")
            header.set_qform(reference.affine, code=int(header["qform_code"]))
    header.set_data_shape(data.shape)
    header.set_data_dtype(data.dtype)
    if data.ndim == 4:
        pixdim = header["pixdim"]
        pixdim[4] = 1.0  # channels, not time points: unit step
        header["pixdim"] = pixdim
    for field in ("cal_min", "cal_max", "glmin", "glmax"):
        header[field] = 0
    header.set_intent("none")
    return header


def check_output_path(
    path: str | os.PathLike[str], inputs: Sequence[str | os.PathLike[str]]
) -> None:
    """Raise ``OutputError`` unless ``path`` can be written without touching an input.

    Called before any computation, so a run that would fail at the last step (missing or read-only
    folder, output overwriting its own input) fails in the first second instead.
    """
    path = Path(path)
    folder = path.parent
    if not folder.exists():
        raise OutputError(f"{path}: output folder {folder} does not exist; create it first")
    if not folder.is_dir():
        raise OutputError(f"{path}: {folder} is a file, not a folder; choose another output path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(
            f"{path}: output folder {folder} is not writable; choose another folder or fix its "
            "permissions"
        )
    if path.is_dir():
        raise OutputError(
            f"{path} is a folder; give an output file name such as {path / 'seg.nii.gz'}"
        )
    target = path.resolve()
    for source in map(Path, inputs):
        if target == source.resolve() or (
            path.exists() and source.exists() and os.path.samefile(path, source)
        ):
            raise OutputError(
                f"{path}: output would overwrite the input {source}; choose another output name"
            )


# What each kind of output must be named, and how to say so.
_OUTPUT_NAMES = {
    "nifti": (lambda path: nifti_suffix(path) is not None, "output name must end in .nii.gz or .nii; rename it"),
    "png": (lambda path: path.suffix.lower() == ".png", "the preview is a PNG; give a name ending in .png"),
    "onnx": (lambda path: path.suffix.lower() == ".onnx", "the output name must end in .onnx"),
}


def check_outputs(
    outputs: Sequence[tuple[str | os.PathLike[str], str]], inputs: Sequence[str | os.PathLike[str]]
) -> None:
    """``check_output_path`` for every ``(path, kind)`` of one run, and more: names that fit the kind
    (``nifti``, ``png``, ``onnx``; any other kind, e.g. ``json``, takes any name), no path twice."""
    seen: set[Path] = set()
    for path, kind in outputs:
        path = Path(path)
        fits, fix = _OUTPUT_NAMES.get(kind, (lambda _: True, ""))
        if not fits(path):
            raise OutputError(f"{path}: {fix}")
        check_output_path(path, inputs)
        if path.resolve() in seen:
            raise OutputError(f"{path}: given for two outputs; choose distinct names")
        seen.add(path.resolve())


def check_output_folder(folder: str | os.PathLike[str], option: str, marker: str) -> None:
    """An output folder: an existing one, or a new one in an existing folder; ``marker`` is a file the
    writer puts in it (checked writable). ``option`` names the setting in messages (``--components``)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder}: {option} takes a folder, and this is a file; choose another name")
    if not folder.is_dir() and not folder.parent.is_dir():
        raise OutputError(f"{folder}: cannot create it, {folder.parent} does not exist; create that first")
    check_output_path((folder if folder.is_dir() else folder.parent) / marker, [])
