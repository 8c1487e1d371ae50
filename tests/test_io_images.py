"""Reading and writing images: geometry survives round trips, bad inputs fail with one clear line.

Geometry is tested with oblique, LPS-stored and anisotropic affines, since identity affines hide the
usual bugs (axis order, LPS vs RAS, a lost sform).
"""

from __future__ import annotations

import gzip
import locale
import os
import struct
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from factorizer_cli.errors import InputError, OutputError
from factorizer_cli.io import (
    Image,
    atomic,
    check_image,
    check_output_path,
    read_image,
    write_nifti,
    write_png,
)
from factorizer_cli.io.atomic import atomic_path, make_folder, write_json_atomic, write_text_atomic
from factorizer_cli.io.png import PNG_SIGNATURE


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _affine(rotation: np.ndarray, spacing: tuple[float, float, float], origin) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = rotation * np.asarray(spacing)
    affine[:3, 3] = origin
    return affine


AFFINES = {
    "ras_anisotropic": _affine(np.eye(3), (0.9, 1.2, 3.0), (-90.0, -126.0, -72.0)),
    "lps_stored": _affine(np.diag([-1.0, -1.0, 1.0]), (1.0, 0.8, 2.5), (100.0, 120.0, -50.0)),
    "oblique": _affine(_rotation(0.3, -0.2, 0.5), (0.7, 1.1, 2.2), (12.5, -30.0, 41.0)),
    "oblique_flipped": _affine(
        _rotation(0.1, 0.4, -0.3) @ np.diag([1, -1, 1]), (1.5, 1, 1), (3, 4, 5)
    ),
}
SHAPE = (7, 6, 5)


def _volume(shape=SHAPE, seed: int = 0) -> np.ndarray:
    """Distinct values per voxel, so any axis swap or flip changes the array."""
    return np.random.default_rng(seed).integers(1, 1000, size=shape).astype(np.int16)


def _save_nifti(path: Path, data: np.ndarray, affine: np.ndarray, qcode=1, scode=2, **kw) -> Path:
    header = nib.Nifti1Header()
    header.set_data_dtype(data.dtype)
    img = nib.Nifti1Image(data, affine, header=header, **kw)
    img.header.set_qform(affine, code=qcode)
    img.header.set_sform(affine, code=scode)
    img.header.set_xyzt_units("mm", "msec")
    nib.save(img, path)
    return path


def _raw_header(path: Path) -> nib.Nifti1Header:
    """The header as stored on disk (nibabel's loaded images move scaling into the data proxy)."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as f:
        return nib.Nifti1Header.from_fileobj(f)


# ---------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", AFFINES)
@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_read_write_round_trip_keeps_geometry(tmp_path: Path, name: str, suffix: str) -> None:
    affine = AFFINES[name]
    data = _volume()
    source = _save_nifti(tmp_path / f"t1{suffix}", data, affine, qcode=1, scode=4)

    image = read_image(source)
    assert image.array.dtype == np.float32 and image.array.shape == SHAPE
    np.testing.assert_array_equal(image.array, data)
    np.testing.assert_allclose(image.affine, affine, atol=1e-5)
    np.testing.assert_allclose(image.spacing, np.linalg.norm(affine[:3, :3], axis=0), rtol=1e-6)

    labels = (data % 4).astype(np.uint8)
    out = tmp_path / f"seg{suffix}"
    write_nifti(out, labels, image, np.uint8)
    written = nib.load(out)
    assert written.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), labels)
    np.testing.assert_array_equal(written.affine, nib.load(source).affine)
    raw, reference = _raw_header(out), _raw_header(source)
    assert int(raw["qform_code"]) == 1 and int(raw["sform_code"]) == 4
    np.testing.assert_array_equal(raw.get_qform(), reference.get_qform())
    np.testing.assert_array_equal(raw.get_sform(), reference.get_sform())
    assert raw.get_xyzt_units() == ("mm", "msec")
    assert float(raw["scl_slope"]) == 1.0 and float(raw["scl_inter"]) == 0.0


def test_scaling_is_applied_on_read(tmp_path: Path) -> None:
    data = _volume()
    img = nib.Nifti1Image(data, AFFINES["oblique"])
    img.header.set_slope_inter(0.5, 10.0)
    nib.save(img, tmp_path / "scaled.nii.gz")
    image = read_image(tmp_path / "scaled.nii.gz")
    np.testing.assert_allclose(image.array, data * 0.5 + 10.0)


def test_qform_only_header_is_preserved(tmp_path: Path) -> None:
    affine = AFFINES["oblique"]
    source = _save_nifti(tmp_path / "q.nii.gz", _volume(), affine, qcode=1, scode=0)
    image = read_image(source)
    np.testing.assert_allclose(image.affine, affine, atol=1e-5)
    write_nifti(tmp_path / "out.nii.gz", image.array, image, np.float32)
    raw = _raw_header(tmp_path / "out.nii.gz")
    assert (int(raw["qform_code"]), int(raw["sform_code"])) == (1, 0)
    np.testing.assert_allclose(nib.load(tmp_path / "out.nii.gz").affine, affine, atol=1e-5)


def test_write_4d_channels_last_and_float(tmp_path: Path) -> None:
    source = _save_nifti(tmp_path / "t1.nii.gz", _volume(), AFFINES["lps_stored"])
    image = read_image(source)
    maps = np.random.default_rng(1).random((*SHAPE, 3)).astype(np.float32)
    write_nifti(tmp_path / "prob.nii.gz", maps, image, np.float32)
    written = nib.load(tmp_path / "prob.nii.gz")
    assert written.shape == (*SHAPE, 3) and written.get_data_dtype() == np.float32
    np.testing.assert_array_equal(written.get_fdata(dtype=np.float32), maps)
    np.testing.assert_array_equal(written.affine, nib.load(source).affine)


def test_trailing_singleton_axis_is_squeezed(tmp_path: Path) -> None:
    data = _volume()[..., None]
    source = _save_nifti(tmp_path / "t1.nii.gz", data, AFFINES["oblique"])
    image = read_image(source)
    assert image.array.shape == SHAPE
    write_nifti(tmp_path / "seg.nii.gz", np.ones(SHAPE, np.uint8), image, np.uint8)
    assert nib.load(tmp_path / "seg.nii.gz").shape == SHAPE


def test_write_replaces_an_existing_file(tmp_path: Path) -> None:
    image = read_image(_save_nifti(tmp_path / "t1.nii.gz", _volume(), AFFINES["oblique"]))
    out = tmp_path / "seg.nii.gz"
    out.write_bytes(b"old")
    write_nifti(out, np.ones(SHAPE, np.uint8), image, "uint8")
    assert nib.load(out).shape == SHAPE
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seg.nii.gz", "t1.nii.gz"]


def test_write_refuses_arrays_that_do_not_fit(tmp_path: Path) -> None:
    image = read_image(_save_nifti(tmp_path / "t1.nii.gz", _volume(), AFFINES["oblique"]))
    with pytest.raises(ValueError, match="reference grid"):
        write_nifti(tmp_path / "a.nii.gz", np.ones((7, 6, 4), np.uint8), image, np.uint8)
    with pytest.raises(ValueError, match="reference grid"):
        write_nifti(tmp_path / "a.nii.gz", np.ones((3, *SHAPE), np.float32), image, np.float32)
    with pytest.raises(ValueError, match="do not fit uint8"):
        write_nifti(tmp_path / "a.nii.gz", np.full(SHAPE, 300), image, np.uint8)
    with pytest.raises(ValueError, match="float16"):
        write_nifti(tmp_path / "a.nii.gz", np.ones(SHAPE), image, np.float16)
    with pytest.raises(OutputError, match="a.png"):
        write_nifti(tmp_path / "a.png", np.ones(SHAPE), image, np.float32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t1.nii.gz"]


def test_image_built_in_memory_gets_a_header(tmp_path: Path) -> None:
    affine = AFFINES["oblique_flipped"]
    image = Image(_volume().astype(np.float32), affine, None, tmp_path / "mem")
    write_nifti(tmp_path / "x.nii.gz", image.array, image, np.float32)
    np.testing.assert_allclose(nib.load(tmp_path / "x.nii.gz").affine, affine, atol=1e-5)


# ------------------------------------------------------------------------------------------ DICOM


def _write_dicom_series(
    itk_image: sitk.Image, folder: Path, uid: str = "1.2.826.0.1.3680043.2.1125.9"
) -> None:
    """One file per slice with the tags a reader needs to rebuild the geometry."""
    folder.mkdir()
    d = itk_image.GetDirection()
    orientation = "\\".join(f"{v:.10f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7]))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(itk_image.GetDepth()):
        piece = itk_image[:, :, k]
        position = itk_image.TransformIndexToPhysicalPoint((0, 0, k))
        for tag, value in {
            "0008|0060": "MR",
            "0008|0016": "1.2.840.10008.5.1.4.1.1.4",
            "0008|0018": f"{uid}.3.{k + 1}",
            "0020|000d": f"{uid}.1",
            "0020|000e": f"{uid}.2",
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:.10f}" for v in position),
            "0020|0037": orientation,
            "0018|0050": f"{itk_image.GetSpacing()[2]:.10f}",
        }.items():
            piece.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(piece)


@pytest.mark.parametrize("name", AFFINES)
def test_dicom_series_matches_the_nifti_it_was_made_from(tmp_path: Path, name: str) -> None:
    data = _volume(seed=3)
    source = _save_nifti(tmp_path / "t1.nii.gz", data, AFFINES[name])
    # ITK's own NIfTI reader does the RAS -> LPS conversion: an oracle independent of ours.
    _write_dicom_series(sitk.ReadImage(str(source)), tmp_path / "dicom")

    locale.setlocale(locale.LC_ALL, "C.UTF-8")  # GDCM's writer above left the process in "C"
    image = read_image(tmp_path / "dicom")
    assert locale.getpreferredencoding(False) == "UTF-8", "reading DICOM must not change the locale"
    reference = read_image(source)
    assert int(image.header["qform_code"]) == 1 and int(image.header["sform_code"]) == 1
    np.testing.assert_allclose(image.header.get_zooms()[:3], reference.spacing, rtol=1e-5)

    # Same world coordinate -> same value, voxel by voxel.
    to_reference = np.linalg.inv(reference.affine) @ image.affine
    np.testing.assert_allclose(to_reference, np.round(to_reference), atol=1e-3)
    index = np.indices(image.shape).reshape(3, -1)
    mapped = np.round(to_reference[:3, :3] @ index + to_reference[:3, 3:]).astype(int)
    np.testing.assert_array_equal(image.array[tuple(index)], reference.array[tuple(mapped)])

    if np.linalg.det(AFFINES[name][:3, :3]) > 0:
        np.testing.assert_allclose(image.affine, reference.affine, atol=1e-4)
        np.testing.assert_array_equal(image.array, reference.array)
    else:
        # DICOM readers sort slices along row x column, so a left-handed grid comes back k-flipped.
        flip_k = np.diag([1.0, 1.0, -1.0, 1.0])
        flip_k[2, 3] = SHAPE[2] - 1
        np.testing.assert_allclose(image.affine, reference.affine @ flip_k, atol=1e-4)
        np.testing.assert_array_equal(image.array, reference.array[:, :, ::-1])

    write_nifti(tmp_path / "seg.nii.gz", (image.array > 500).astype(np.uint8), image, np.uint8)
    np.testing.assert_allclose(nib.load(tmp_path / "seg.nii.gz").affine, image.affine, atol=1e-4)


def test_dicom_series_with_a_missing_slice(tmp_path: Path) -> None:
    source = _save_nifti(tmp_path / "t1.nii.gz", _volume(), AFFINES["oblique"])
    _write_dicom_series(sitk.ReadImage(str(source)), tmp_path / "dicom")
    (tmp_path / "dicom" / "slice002.dcm").unlink()
    _assert_input_error(tmp_path / "dicom", "unevenly spaced")


def test_two_dicom_series_in_one_folder(tmp_path: Path) -> None:
    source = _save_nifti(tmp_path / "t1.nii.gz", _volume(), AFFINES["oblique"])
    _write_dicom_series(sitk.ReadImage(str(source)), tmp_path / "dicom")
    other = sitk.ReadImage(str(source))
    _write_dicom_series(other, tmp_path / "other", uid="1.2.826.0.1.3680043.2.1125.77")
    for file in (tmp_path / "other").iterdir():
        file.rename(tmp_path / "dicom" / f"b_{file.name}")
    _assert_input_error(tmp_path / "dicom", "2 DICOM series; put each series in its own folder")


# ------------------------------------------------------------------------------------ bad inputs


def _assert_input_error(path: Path, *fragments: str) -> None:
    with pytest.raises(InputError) as info:
        read_image(path)
    message = str(info.value)
    assert path.name in message and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


def _valid_gz(tmp_path: Path, name: str = "good.nii.gz") -> bytes:
    data = np.random.default_rng(0).random((20, 20, 20)).astype(np.float32)
    return _save_nifti(tmp_path / name, data, AFFINES["oblique"]).read_bytes()


def test_missing_file(tmp_path: Path) -> None:
    _assert_input_error(tmp_path / "nope.nii.gz", "no such file")


@pytest.mark.parametrize("name", ["scan.mha", "scan.txt", "scan.hdr"])
def test_wrong_extension(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_bytes(b"x" * 400)
    _assert_input_error(tmp_path / name, "not a NIfTI", ".nii.gz")


def test_wrong_content(tmp_path: Path) -> None:
    (tmp_path / "junk.nii").write_bytes(b"this is not an image" * 40)
    _assert_input_error(tmp_path / "junk.nii", "not a NIfTI", ".nii.gz")


def test_misnamed_compression(tmp_path: Path) -> None:
    raw = _valid_gz(tmp_path)
    (tmp_path / "zipped.nii").write_bytes(raw)
    _assert_input_error(tmp_path / "zipped.nii", "rename it to .nii.gz")
    (tmp_path / "plain.nii.gz").write_bytes(gzip.decompress(raw))
    _assert_input_error(tmp_path / "plain.nii.gz", "rename it to .nii")


@pytest.mark.parametrize("cut", [0.1, 0.6, 0.98])
def test_truncated_gzip(tmp_path: Path, cut: float) -> None:
    raw = _valid_gz(tmp_path)
    (tmp_path / "cut.nii.gz").write_bytes(raw[: int(len(raw) * cut)])
    _assert_input_error(tmp_path / "cut.nii.gz")


@pytest.mark.parametrize("where", ["middle", "crc"])
def test_corrupt_gzip(tmp_path: Path, where: str) -> None:
    """Damage that zlib may decode without complaint is still caught: the CRC is checked."""
    raw = bytearray(_valid_gz(tmp_path))
    if where == "middle":
        middle = len(raw) // 2
        raw[middle : middle + 64] = bytes(64)
    else:
        raw[-6] ^= 0xFF  # gzip trailer: CRC-32 then length, 4 bytes each
    (tmp_path / "bad.nii.gz").write_bytes(bytes(raw))
    _assert_input_error(tmp_path / "bad.nii.gz", "corrupt")


def test_nifti2_is_read_with_its_geometry(tmp_path: Path) -> None:
    affine = AFFINES["oblique"]
    img = nib.Nifti2Image(_volume(), affine)
    img.header.set_qform(affine, code=1)
    nib.save(img, tmp_path / "n2.nii.gz")
    image = read_image(tmp_path / "n2.nii.gz")
    np.testing.assert_allclose(image.affine, affine, atol=1e-5)
    assert isinstance(image.header, nib.Nifti1Header) and int(image.header["qform_code"]) == 1


def test_truncated_uncompressed(tmp_path: Path) -> None:
    raw = gzip.decompress(_valid_gz(tmp_path))
    (tmp_path / "cut.nii").write_bytes(raw[: len(raw) // 2])
    _assert_input_error(tmp_path / "cut.nii", "truncated")


def test_4d_image(tmp_path: Path) -> None:
    source = _save_nifti(tmp_path / "multi.nii.gz", _volume((5, 5, 5, 3)), np.eye(4))
    _assert_input_error(source, "4D image with 3 volumes; give one 3D file per modality")


@pytest.mark.parametrize("shape", [(8, 9), (8, 9, 1)])
def test_2d_image(tmp_path: Path, shape) -> None:
    source = _save_nifti(tmp_path / "slice.nii.gz", _volume(shape), np.eye(4))
    _assert_input_error(source, "2D image")


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_values(tmp_path: Path, value: float) -> None:
    data = _volume().astype(np.float32)
    data[1, 2, 3] = value
    _assert_input_error(_save_nifti(tmp_path / "nan.nii.gz", data, np.eye(4)), "NaN or Inf")


def test_empty_image(tmp_path: Path) -> None:
    source = _save_nifti(tmp_path / "zeros.nii.gz", np.zeros(SHAPE, np.float32), np.eye(4))
    _assert_input_error(source, "empty image")


def test_folder_without_dicom(tmp_path: Path) -> None:
    folder = tmp_path / "case"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    _assert_input_error(folder, "no DICOM series")


def test_check_image_is_reusable(tmp_path: Path) -> None:
    image = Image(np.zeros(SHAPE, np.float32), np.eye(4), None, tmp_path / "made.nii.gz")
    with pytest.raises(InputError, match="made.nii.gz: empty image"):
        check_image(image)
    image.array = np.ones((4, 4, 4, 2), np.float32)
    with pytest.raises(InputError, match="4D image with 2 volumes"):
        check_image(image)
    image.array = np.ones(SHAPE, np.float32)
    check_image(image)


# ------------------------------------------------------------------------------ atomic writing


def test_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image = read_image(_save_nifti(tmp_path / "t1.nii.gz", _volume(), AFFINES["oblique"]))
    before = sorted(tmp_path.iterdir())

    def partial_save(img, filename):
        Path(filename).write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(nib, "save", partial_save)
    with pytest.raises(OutputError, match="seg.nii.gz: cannot write \\(No space left on device\\)"):
        write_nifti(tmp_path / "seg.nii.gz", np.ones(SHAPE, np.uint8), image, np.uint8)
    assert sorted(tmp_path.iterdir()) == before

    def broken_save(img, filename):
        Path(filename).write_bytes(b"half a file")
        raise RuntimeError("boom")

    monkeypatch.setattr(nib, "save", broken_save)
    with pytest.raises(RuntimeError, match="boom"):
        write_nifti(tmp_path / "seg.nii.gz", np.ones(SHAPE, np.uint8), image, np.uint8)
    assert sorted(tmp_path.iterdir()) == before


def test_atomic_path_maps_os_errors_to_one_line_and_lets_bugs_through(tmp_path: Path) -> None:
    target = tmp_path / "report.json"
    with pytest.raises(OutputError, match=r"report.json: cannot write \(No space left on device\); check free space"):
        with atomic_path(target) as temporary:
            # hidden, beside the target, named by host and process (what batch restarts clean up)
            assert temporary.parent == tmp_path and temporary.name.endswith(".tmp.json")
            assert temporary.name.startswith(f".report.{atomic._HOST}-{os.getpid()}.")
            temporary.write_text("half a report")
            raise OSError(28, "No space left on device")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(KeyError, match="a bug"):  # not an output problem: passes through, file removed
        with atomic_path(target) as temporary:
            temporary.write_text("x")
            raise KeyError("a bug")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(OutputError, match="missing/r.txt: cannot write"):
        write_text_atomic(tmp_path / "missing" / "r.txt", "x")
    with atomic_path(tmp_path / "seg.NII.GZ") as temporary:  # writers that read the format from the name
        assert temporary.name.endswith(".tmp.nii.gz")
        temporary.write_bytes(b"x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seg.NII.GZ"]


def test_json_is_utf8_whatever_the_locale_and_folders_fail_in_one_line(tmp_path: Path) -> None:
    write_json_atomic(tmp_path / "s.json", {"case": "patient-é"})
    assert (tmp_path / "s.json").read_bytes() == '{\n  "case": "patient-é"\n}\n'.encode()
    assert make_folder(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    with pytest.raises(OutputError, match="s.json/sub: cannot create the case folder"):
        make_folder(tmp_path / "s.json" / "sub", "case folder")


# -------------------------------------------------------------------------------- output paths


def test_check_output_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "t1.nii.gz"
    source.write_bytes(b"")
    check_output_path(tmp_path / "seg.nii.gz", [source])

    with pytest.raises(OutputError, match="does not exist; create it"):
        check_output_path(tmp_path / "missing" / "seg.nii.gz", [source])
    with pytest.raises(OutputError, match="is a file, not a folder"):
        check_output_path(source / "seg.nii.gz", [source])
    with pytest.raises(OutputError, match="is a folder"):
        check_output_path(tmp_path, [source])
    with pytest.raises(OutputError, match="overwrite the input .*t1.nii.gz; choose another"):
        check_output_path(tmp_path / "." / "t1.nii.gz", [source])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OutputError, match="overwrite the input"):
        check_output_path(Path("t1.nii.gz"), [source])
    (tmp_path / "link.nii.gz").symlink_to(source)
    with pytest.raises(OutputError, match="overwrite the input"):
        check_output_path(tmp_path / "link.nii.gz", [source])


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes anywhere")
def test_check_output_path_read_only_folder(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(OutputError, match="not writable"):
            check_output_path(folder / "seg.nii.gz", [])
    finally:
        folder.chmod(0o755)


def test_check_output_path_folder_not_writable_even_for_root() -> None:
    """/proc/sys refuses new files to every user, root included (CI runs as root)."""
    if os.access("/proc/sys", os.W_OK):
        pytest.skip("/proc/sys is writable here")
    with pytest.raises(OutputError, match="not writable; choose another folder"):
        check_output_path(Path("/proc/sys/seg.nii.gz"), [])


# ------------------------------------------------------------------------------------------- PNG


def _decode_png(blob: bytes) -> np.ndarray:
    """A reader for the subset we write: checks the signature and every CRC, undoes filter 0."""
    assert blob[:8] == PNG_SIGNATURE
    position, chunks = 8, []
    while position < len(blob):
        (length,) = struct.unpack(">I", blob[position : position + 4])
        kind = blob[position + 4 : position + 8]
        data = blob[position + 8 : position + 8 + length]
        (crc,) = struct.unpack(">I", blob[position + 8 + length : position + 12 + length])
        assert crc == zlib.crc32(kind + data), kind
        chunks.append((kind, data))
        position += 12 + length
    assert chunks[0][0] == b"IHDR" and chunks[-1] == (b"IEND", b"")
    width, height, depth, colour, compression, filtering, interlace = struct.unpack(
        ">IIBBBBB", chunks[0][1]
    )
    assert (depth, colour, compression, filtering, interlace) == (8, 2, 0, 0, 0)
    raw = zlib.decompress(b"".join(d for k, d in chunks if k == b"IDAT"))
    rows = np.frombuffer(raw, np.uint8).reshape(height, 1 + 3 * width)
    assert not rows[:, 0].any()  # filter type 0 everywhere
    return rows[:, 1:].reshape(height, width, 3)


def test_png_round_trip(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, size=(13, 21, 3), dtype=np.uint8)
    write_png(tmp_path / "overlay.png", rgb)
    np.testing.assert_array_equal(_decode_png((tmp_path / "overlay.png").read_bytes()), rgb)
    assert [p.name for p in tmp_path.iterdir()] == ["overlay.png"]


def test_png_refuses_other_arrays(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="uint8"):
        write_png(tmp_path / "a.png", np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="\\(H, W, 3\\)"):
        write_png(tmp_path / "a.png", np.zeros((4, 4), np.uint8))
    assert not list(tmp_path.iterdir())


def test_png_write_failure_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_space(self, data):
        with open(self, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", no_space)
    with pytest.raises(OutputError, match="overlay.png: cannot write"):
        write_png(tmp_path / "overlay.png", np.zeros((2, 2, 3), np.uint8))
    assert not list(tmp_path.iterdir())
