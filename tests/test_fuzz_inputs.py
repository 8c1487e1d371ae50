"""Fuzz the input path: no input file, however mangled, may end in a traceback.

From one valid small NIfTI volume (8×9×10 float32, NIfTI-1 and NIfTI-2, ``.nii`` and ``.nii.gz``)
hypothesis derives broken files: random bytes written over the header, header fields set through
nibabel to hostile values (zero, negative or huge dims, unknown datatypes, NaN/Inf in pixdim, quaternion
or sform, singular and zero affines, odd qform/sform codes, scaling, vox_offset, magic), truncations of
the raw file and of the gzip stream, bytes flipped in the gzip stream, voxels that are NaN/Inf/zero or
of other dtypes and shapes, and odd files (empty, random bytes, misnamed gzip, a folder or a dangling
link with a NIfTI name, header extensions with bad sizes).

Properties: ``read_image`` returns a 3D, finite, non-empty float32 image with a finite 4×4 affine, or
raises ``InputError`` with a one-line message naming the file; anything else fails. Through the CLI
(``factorizer segment CASE_DIR``, the mutated file standing for one modality of the oracle model) the
exit code is 0 or 2, there is no traceback, and a refusal prints one ``error:`` line and writes nothing.

Each example runs under a guard: at most ``GUARD_BYTES`` more address space and ``*_SECONDS`` of time,
so a header that makes the reader allocate gigabytes (a few-kilobyte file claiming 32767³ voxels) fails
the test with a ``MemoryError`` instead of swapping or being killed by the OOM killer.
"""

from __future__ import annotations

import contextlib
import gzip
import math
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from factorizer_cli.cli import app
from factorizer_cli.errors import InputError
from factorizer_cli.io.images import read_image

from .oracle import oracle_package

try:
    import resource
except ImportError:  # not on Windows: no address-space guard there
    resource = None

SHAPE = (8, 9, 10)
AFFINE = np.array([  # mildly oblique, anisotropic: the CLI resamples it to the oracle's 1 mm grid
    [0.95, 0.10, 0.0, -3.5],
    [-0.10, 1.05, 0.0, 4.0],
    [0.0, 0.0, 1.2, -5.0],
    [0.0, 0.0, 0.0, 1.0],
])
MODALITIES = ("t1n", "t1c", "t2w", "t2f")
SUFFIXES = (".nii", ".nii.gz", ".NII", ".Nii.Gz")
GUARD_BYTES = 3 * 1024**3  # more address space than any of these few-kilobyte files could need
READ_SECONDS = 20.0
CLI_SECONDS = 60.0

FUZZ = settings(  # example counts and derandomizing come from the profile loaded in conftest.py
    deadline=None,
    print_blob=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much, HealthCheck.large_base_example],
)


def examples(scale: float) -> int:
    """``scale`` times the loaded profile's ``max_examples``: the ci profile's 100 gives each test its full
    count (500 header edits, ...), the quick default profile a tenth of it."""
    return max(1, round(settings.default.max_examples * scale))


# ------------------------------------------------------------------------------------ base images


def _volume(seed: int = 0) -> np.ndarray:
    return (0.5 + np.random.default_rng(seed).random(SHAPE)).astype(np.float32)


def _nifti_bytes(data: np.ndarray, version: int = 1, dtype=None) -> bytes:
    """A single-file NIfTI image (header, 4-byte extension flag, voxels) with qform = sform = AFFINE."""
    klass = nib.Nifti1Image if version == 1 else nib.Nifti2Image
    image = klass(data, AFFINE, dtype=dtype)
    image.set_qform(AFFINE, code=1)
    image.set_sform(AFFINE, code=1)
    return image.to_bytes()


BASES = {1: _nifti_bytes(_volume()), 2: _nifti_bytes(_volume(), version=2)}
HEADER_SIZE = {1: 348, 2: 540}
HEADER_CLASS = {1: nib.Nifti1Header, 2: nib.Nifti2Header}
HEADER_DTYPE = {1: nib.nifti1.header_dtype, 2: nib.nifti2.header_dtype}


def _gzip(raw: bytes) -> bytes:
    return gzip.compress(raw, mtime=0)


def _set_fields(raw: bytes, version: int, fields: list[tuple[str, object]]) -> bytes:
    """``raw`` with header fields overwritten through nibabel, without its checks or fixes."""
    size = HEADER_SIZE[version]
    header = HEADER_CLASS[version](binaryblock=raw[:size], check=False)
    for name, value in fields:
        header[name] = value
    return header.binaryblock + raw[size:]


# ---------------------------------------------------------------------------------------- samples


class Sample:
    """One input to try: a file's bytes (or a folder, or a dangling link) and the suffix it is named with.

    ``kind`` is "file", "folder" (``content``, if any, becomes a file inside) or "dangling" (a link to
    nothing). A plain class, so hypothesis shows the short ``repr`` rather than every byte.
    """

    __slots__ = ("what", "suffix", "content", "kind")

    def __init__(self, what: str, suffix: str, content: bytes = b"", kind: str = "file") -> None:
        self.what, self.suffix, self.content, self.kind = what, suffix, content, kind

    def __repr__(self) -> str:
        size = f"{len(self.content)} bytes" if self.kind == "file" else self.kind
        return f"<{self.what}; named *{self.suffix}; {size}>"

    def write(self, folder: Path, stem: str) -> Path:
        path = folder / f"{stem}{self.suffix}"
        if self.kind == "folder":
            path.mkdir()
            if self.content:
                (path / "inside.nii").write_bytes(self.content)
        elif self.kind == "dangling":
            path.symlink_to(folder / "no-such-target.nii.gz")
        else:
            path.write_bytes(self.content)
        return path


def _named(raw: bytes, suffix: str) -> bytes:
    """What a file named ``*suffix`` holds: the raw bytes gzipped for ``.nii.gz``."""
    return _gzip(raw) if suffix.lower().endswith(".gz") else raw


# Listed simplest first: hypothesis shrinks a failure towards the front of each list.
_SPECIAL_INTS = st.sampled_from([0, 1, 2, 3, 8, 9, 10, -1, -2, 4, 5, 7, 255, 256, 4096, 32767, -1000,
                                 -32768])
_INT16 = st.one_of(_SPECIAL_INTS, st.integers(-32768, 32767))
_FLOAT = st.one_of(
    st.sampled_from([1.0, 0.0, math.nan, math.inf, -math.inf, -0.0, -1.0, 1e-30, 1e-6, 1e-3, 0.5, 2.0,
                     1e3, 1e6, 1e30, 3.4e38]),
    st.floats(width=32),
)
_DIM0 = st.sampled_from([3, 0, 1, 2, 4, 5, 6, 7, 8, 9, -1, 32767])
_DATATYPES = st.one_of(
    st.sampled_from([0, 1, 2, 4, 8, 16, 32, 64, 128, 255, 256, 512, 768, 1024, 1280, 1536, 1792, 2048,
                     2304]),
    st.integers(-32768, 32767),
)


def _field_values(version: int) -> st.SearchStrategy[tuple[str, object]]:
    """(field, value) pairs to set in a header of this NIfTI version."""
    big = st.sampled_from([2**31, 2**40, 2**62]) if version == 2 else st.nothing()
    dims = st.tuples(_DIM0, *[st.one_of(_INT16, big)] * 7).map(list)
    offsets = (st.one_of(_FLOAT, st.sampled_from([352.0, 353.0, 351.0, 0.0, 1e10, -352.0]))
               if version == 1 else st.one_of(_INT16, big, st.sampled_from([352, 544, 1 << 40])))
    magic = [b"n+1", b"ni1", b"n+2", b"ni2", b"xxx", b""] if version == 1 else [
        b"n+2\0\r\n\x1a\n", b"n+1\0\r\n\x1a\n", b"ni2\0\r\n\x1a\n", b"n+2\0\0\0\0\0", b""]
    codes = st.one_of(st.sampled_from([-1, 0, 1, 2, 3, 4, 5, 99]), _INT16)
    row = st.lists(_FLOAT, min_size=4, max_size=4)
    per_field = {
        "dim": dims,
        "datatype": _DATATYPES,
        "bitpix": _INT16,
        "pixdim": st.lists(_FLOAT, min_size=8, max_size=8),
        "vox_offset": offsets,
        "scl_slope": _FLOAT,
        "scl_inter": _FLOAT,
        "qform_code": codes,
        "sform_code": codes,
        "quatern_b": _FLOAT,
        "quatern_c": _FLOAT,
        "quatern_d": _FLOAT,
        "qoffset_x": _FLOAT,
        "qoffset_y": _FLOAT,
        "qoffset_z": _FLOAT,
        "srow_x": row,
        "srow_y": row,
        "srow_z": row,
        "magic": st.sampled_from(magic),
        "sizeof_hdr": st.sampled_from([0, -1, 348, 540, 1 << 24, 0x5C010000, 0x1C020000]),
        "dim_info": st.integers(0, 255),
        "xyzt_units": st.integers(0, 255),
        "intent_code": _INT16,
        "slice_code": st.integers(0, 255),
        "cal_min": _FLOAT,
        "cal_max": _FLOAT,
    }
    return st.one_of([st.tuples(st.just(name), values) for name, values in per_field.items()])


# Whole affines, set as the sform (rows) and, with qform_code 0, as the only geometry.
_AFFINES = {
    "zero": np.zeros((3, 4)),
    "rank 2": np.array([[1.0, 1.0, 0, 0], [1.0, 1.0, 0, 0], [0, 0, 1.0, 0]]),
    "rank 1": np.array([[1.0, 1.0, 1.0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]),
    "zero column": np.array([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 0, 0]]),
    "NaN": np.full((3, 4), np.nan),
    "Inf": np.array([[np.inf, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0]]),
    "huge spacing": np.diag([1e30, 1e30, 1e30, 1.0])[:3],
    "large spacing": np.diag([1e4, 1.0, 1.0, 1.0])[:3],
    "tiny spacing": np.diag([1e-30, 1e-30, 1e-30, 1.0])[:3],
    "huge offset": np.array([[1.0, 0, 0, 1e30], [0, 1.0, 0, 0], [0, 0, 1.0, 0]]),
    "shear": np.array([[1.0, 5.0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0]]),
    "reflection": np.diag([-1.0, 1.0, 1.0, 1.0])[:3],
}


@st.composite
def header_byte_edits(draw) -> Sample:
    """1–4 header bytes overwritten, mostly inside the fields that drive reading and geometry."""
    version = draw(st.sampled_from([1, 2]))
    fields = HEADER_DTYPE[version].fields
    raw, edits = bytearray(BASES[version]), []
    for _ in range(draw(st.integers(1, 4))):
        if draw(st.integers(0, 3)):
            name = draw(st.sampled_from(["sizeof_hdr", "dim", "datatype", "bitpix", "pixdim",
                                         "vox_offset", "scl_slope", "scl_inter", "qform_code",
                                         "sform_code", "quatern_b", "quatern_c", "quatern_d",
                                         "qoffset_x", "srow_x", "srow_y", "srow_z", "magic",
                                         "dim_info", "xyzt_units", "intent_code"]))
            dtype, start = fields[name][:2]
            position = start + draw(st.integers(0, dtype.itemsize - 1))
        else:
            position = draw(st.integers(0, HEADER_SIZE[version] + 3))  # + the extension flag
            name = "byte"
        value = draw(st.one_of(st.sampled_from([0x00, 0xFF, 0x7F, 0x80, 0x01]), st.integers(0, 255)))
        raw[position] = value
        edits.append(f"{name}@{position}={value:#04x}")
    suffix = draw(st.sampled_from(SUFFIXES))
    return Sample(f"NIfTI-{version} header bytes {', '.join(edits)}", suffix, _named(bytes(raw), suffix))


@st.composite
def header_field_values(draw) -> Sample:
    """1–3 header fields set to hostile values, or a whole hostile affine, through nibabel."""
    version = draw(st.sampled_from([1, 2]))
    if draw(st.integers(0, 3)):
        fields = draw(st.lists(_field_values(version), min_size=1, max_size=3))
    else:
        rows = _AFFINES[draw(st.sampled_from(sorted(_AFFINES)))]
        fields = [("srow_x", rows[0]), ("srow_y", rows[1]), ("srow_z", rows[2]),
                  ("sform_code", draw(st.sampled_from([1, 2, 4]))),
                  ("qform_code", draw(st.sampled_from([0, 1])))]
    suffix = draw(st.sampled_from(SUFFIXES))
    raw = _set_fields(BASES[version], version, fields)
    shown = ", ".join(f"{n}={np.asarray(v).tolist()!r}" for n, v in fields)
    return Sample(f"NIfTI-{version} fields {shown}", suffix, _named(raw, suffix))


@st.composite
def truncations(draw) -> Sample:
    """The raw file or the gzip stream cut short (at the header, the flag, the voxels, the trailer)."""
    version = draw(st.sampled_from([1, 2]))
    suffix = draw(st.sampled_from(SUFFIXES))
    content = _named(BASES[version], suffix)
    n = len(content)
    cut = draw(st.one_of(st.integers(0, n - 1),
                         st.sampled_from(sorted({0, 1, 2, 4, 10, 347, 348, 351, 352, 539, 540, 543,
                                                 n // 2, n - 8, n - 4, n - 1} & set(range(n))))))
    return Sample(f"NIfTI-{version} ({n} bytes as stored) cut to {cut} bytes", suffix, content[:cut])


@st.composite
def gzip_corruptions(draw) -> Sample:
    """Bytes flipped in the gzip stream (header, deflate data, CRC, length), or garbage appended."""
    version = draw(st.sampled_from([1, 2]))
    content = bytearray(_gzip(BASES[version]))
    if draw(st.booleans()):
        edits = []
        for _ in range(draw(st.integers(1, 3))):
            position = draw(st.one_of(st.integers(0, len(content) - 1),
                                      st.integers(len(content) - 8, len(content) - 1),
                                      st.integers(0, 9)))
            value = draw(st.integers(0, 255))
            content[position] = value
            edits.append(f"{position}={value:#04x}")
        what = f"gzipped NIfTI-{version} with stream bytes {', '.join(edits)}"
    else:
        tail = draw(st.one_of(st.binary(min_size=1, max_size=64), st.just(b"\0" * 16),
                              st.just(_gzip(b"more"))))
        content += tail
        what = f"gzipped NIfTI-{version} followed by {tail!r}"
    return Sample(what, draw(st.sampled_from([".nii.gz", ".NII.GZ"])), bytes(content))


_SHAPES = [(8, 9, 10), (8, 9, 10, 1), (8, 9, 10, 1, 1), (8, 9, 10, 2), (8, 9, 10, 1, 3), (8, 9),
           (1, 9, 10), (8, 1, 10), (2, 2, 2), (8,), (8, 9, 10, 1, 1, 1, 1)]
_DTYPES = ["float32", "float64", "int16", "uint8", "int8", "uint16", "int32", "uint32", "int64",
           "complex64", "RGB"]


@st.composite
def voxel_contents(draw) -> Sample:
    """Valid headers written by nibabel around unusual voxels: NaN/Inf, zeros, dtypes, shapes, scaling."""
    shape = draw(st.sampled_from(_SHAPES))
    dtype = draw(st.sampled_from(_DTYPES))
    content = draw(st.sampled_from(["plain", "NaN", "+Inf", "-Inf", "zeros", "one voxel", "huge",
                                    "negative"]))
    data = 0.5 + np.random.default_rng(draw(st.integers(0, 3))).random(shape)
    flat = data.reshape(-1)
    if content in ("NaN", "+Inf", "-Inf"):
        count = draw(st.integers(1, flat.size))
        where = draw(st.lists(st.integers(0, flat.size - 1), min_size=1, max_size=count))
        flat[where] = {"NaN": np.nan, "+Inf": np.inf, "-Inf": -np.inf}[content]
    elif content == "zeros":
        flat[:] = 0
    elif content == "one voxel":
        flat[:] = 0
        flat[draw(st.integers(0, flat.size - 1))] = 1
    elif content == "huge":
        flat *= 3e38 if dtype != "float64" else 1e300
    elif content == "negative":
        flat -= 10
    if dtype == "RGB":
        rgb = np.zeros(shape, [("R", "u1"), ("G", "u1"), ("B", "u1")])
        rgb["R"] = np.nan_to_num(data % 256).astype(np.uint8)
        array, on_disk = rgb, None
    elif np.dtype(dtype).kind in "iu":
        array = np.nan_to_num(data, posinf=1e4, neginf=-1e4)
        info = np.iinfo(dtype)
        array, on_disk = np.clip(array, info.min, info.max).astype(dtype), np.dtype(dtype)
    else:
        with np.errstate(over="ignore"):
            array, on_disk = data.astype(dtype), np.dtype(dtype)
    version = draw(st.sampled_from([1, 2]))
    raw = _nifti_bytes(array, version=version, dtype=on_disk)
    scaling = draw(st.one_of(st.none(), st.tuples(_FLOAT, _FLOAT)))
    if scaling is not None:
        raw = _set_fields(raw, version, [("scl_slope", scaling[0]), ("scl_inter", scaling[1])])
    suffix = draw(st.sampled_from(SUFFIXES))
    what = f"NIfTI-{version} {dtype} voxels of shape {shape}, {content}, scaling {scaling}"
    return Sample(what, suffix, _named(raw, suffix))


@st.composite
def odd_files(draw) -> Sample:
    """Files that are not what their name says, folders and links with NIfTI names, bad extensions."""
    suffix = draw(st.sampled_from(SUFFIXES))
    choice = draw(st.sampled_from([
        "empty", "random bytes", "gzipped random bytes", "gzipped nothing", "raw NIfTI named .nii.gz",
        "gzipped NIfTI named .nii", "gzipped twice", "header only", "header and flag only", "folder",
        "folder holding a NIfTI", "dangling link", "extension", "MGH image", "text",
    ]))
    base = BASES[1]
    if choice == "empty":
        return Sample(choice, suffix, b"")
    if choice == "random bytes":
        return Sample(choice, suffix, draw(st.binary(min_size=1, max_size=2048)))
    if choice == "gzipped random bytes":
        return Sample(choice, suffix, _gzip(draw(st.binary(max_size=2048))))
    if choice == "gzipped nothing":
        return Sample(choice, suffix, _gzip(b""))
    if choice == "raw NIfTI named .nii.gz":
        return Sample(choice, ".nii.gz", base)
    if choice == "gzipped NIfTI named .nii":
        return Sample(choice, ".nii", _gzip(base))
    if choice == "gzipped twice":
        return Sample(choice, ".nii.gz", _gzip(_gzip(base)))
    if choice == "header only":
        return Sample(choice, suffix, _named(base[:348], suffix))
    if choice == "header and flag only":
        return Sample(choice, suffix, _named(base[:352], suffix))
    if choice == "folder":
        return Sample(choice, suffix, kind="folder")
    if choice == "folder holding a NIfTI":
        return Sample(choice, suffix, base, kind="folder")
    if choice == "dangling link":
        return Sample(choice, suffix, kind="dangling")
    if choice == "MGH image":
        mgh = nib.MGHImage(_volume(), AFFINE).to_bytes()
        return Sample(choice, suffix, _named(mgh, suffix))
    if choice == "text":
        return Sample(choice, suffix, _named(b"not an image\n" * 40, suffix))
    # A header extension: flag byte(s), then esize and ecode (int32) and some content.
    flag = draw(st.sampled_from([b"\x01\0\0\0", b"\xff\xff\xff\xff", b"\0\0\0\x01"]))
    esize = draw(st.sampled_from([-16, -1, 0, 1, 8, 15, 16, 32, 1 << 20, 2**31 - 1]))
    ecode = draw(st.sampled_from([0, 2, 4, 6, 14, 16, 40, -1, 2**31 - 1]))
    body = draw(st.binary(max_size=48))
    offset = draw(st.sampled_from([352 + 8 + len(body), 352, 368, 400]))
    ext = np.array([esize, ecode], "<i4").tobytes() + body
    raw = _set_fields(base[:348] + flag + ext + base[352:], 1, [("vox_offset", offset)])
    what = f"extension flag {flag!r}, esize {esize}, ecode {ecode}, {len(body)} bytes, vox_offset {offset}"
    return Sample(what, suffix, _named(raw, suffix))


ANY_SAMPLE = st.one_of(header_byte_edits(), header_field_values(), truncations(), gzip_corruptions(),
                       voxel_contents(), odd_files())


# ------------------------------------------------------------------------------------------ guard


class GuardTimeout(Exception):
    """An example ran past its time limit."""


def _address_space() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@contextlib.contextmanager
def guarded(seconds: float) -> Iterator[None]:
    """At most ``GUARD_BYTES`` more address space and ``seconds`` of wall time for the block.

    A header that makes the reader allocate gigabytes then fails fast with ``MemoryError``, on any
    machine, rather than swapping or meeting the OOM killer.
    """
    main = threading.current_thread() is threading.main_thread()
    used = _address_space() if resource is not None else None
    limits = resource.getrlimit(resource.RLIMIT_AS) if used is not None else None
    if limits is not None:
        cap = used + GUARD_BYTES
        for bound in limits:
            if bound != resource.RLIM_INFINITY:
                cap = min(cap, bound)
        resource.setrlimit(resource.RLIMIT_AS, (cap, limits[1]))
    if main:
        def expire(signum, frame):
            raise GuardTimeout(f"still running after {seconds:.0f} s")

        previous = signal.signal(signal.SIGALRM, expire)
        signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        if main:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        if limits is not None:
            resource.setrlimit(resource.RLIMIT_AS, limits)


# ------------------------------------------------------------------------------ property: read_image


def check_read(sample: Sample) -> None:
    """``read_image`` gives a clean image or ``InputError``; any other exception propagates."""
    note(repr(sample))
    with tempfile.TemporaryDirectory() as tmp:
        path = sample.write(Path(tmp), "img")
        try:
            with guarded(READ_SECONDS):
                image = read_image(path)
        except InputError as err:
            message = str(err)
            assert message.strip() and "\n" not in message, f"{sample!r}: message {message!r}"
            assert path.name in message, f"{sample!r}: message does not name the file: {message!r}"
            return
    array, affine = image.array, image.affine
    assert isinstance(array, np.ndarray) and array.dtype == np.float32, (sample, array.dtype)
    assert array.ndim == 3 and array.size > 0 and min(array.shape) > 1, (sample, array.shape)
    assert np.isfinite(array).all() and np.any(array), sample
    assert isinstance(affine, np.ndarray) and affine.shape == (4, 4), (sample, affine)
    assert np.isfinite(affine).all(), f"{sample!r}: read_image returned a non-finite affine\n{affine}"


def test_base_images_read():
    for version in (1, 2):
        for suffix in SUFFIXES:
            with tempfile.TemporaryDirectory() as tmp:
                image = read_image(Sample("base", suffix, _named(BASES[version], suffix)).write(
                    Path(tmp), "img"))
            np.testing.assert_array_equal(image.array, _volume())
            np.testing.assert_allclose(image.affine, AFFINE, atol=1e-6)


@settings(FUZZ, max_examples=examples(5))
@given(header_byte_edits())
def test_read_header_bytes(sample):
    check_read(sample)


@settings(FUZZ, max_examples=examples(5))
@given(header_field_values())
def test_read_header_fields(sample):
    check_read(sample)


@settings(FUZZ, max_examples=examples(1.5))
@given(truncations())
def test_read_truncated(sample):
    check_read(sample)


@settings(FUZZ, max_examples=examples(1))
@given(gzip_corruptions())
def test_read_corrupt_gzip(sample):
    check_read(sample)


@settings(FUZZ, max_examples=examples(2))
@given(voxel_contents())
def test_read_voxel_contents(sample):
    check_read(sample)


@settings(FUZZ, max_examples=examples(1))
@given(odd_files())
def test_read_odd_files(sample):
    check_read(sample)


# ------------------------------------------------------------------------------------ property: CLI

runner = CliRunner()


class CliSetup(tuple):
    """(folder holding the oracle model, good modality bytes); a short repr for hypothesis' reports."""

    def __repr__(self) -> str:
        return f"<oracle model and good modalities in {self[0]}>"


@pytest.fixture(scope="module")
def cli_root(tmp_path_factory):
    """The oracle model and the good modalities, built once; a good case segments (exit 0)."""
    root = tmp_path_factory.mktemp("fuzz_cli")
    oracle_package(root / "model")
    good = {m: _gzip(_nifti_bytes(_volume(seed))) for seed, m in enumerate(MODALITIES)}
    result, out = _segment(root, good, MODALITIES[0], Sample("base", ".nii.gz", good[MODALITIES[0]]))
    assert result.exit_code == 0, result.output
    assert (out / "seg.nii.gz").is_file()
    return CliSetup((root, good))


def _segment(root: Path, good: dict[str, bytes], modality: str, sample: Sample):
    folder = Path(tempfile.mkdtemp(dir=root))
    case, out = folder / "case", folder / "out"
    case.mkdir()
    out.mkdir()
    for name in MODALITIES:
        if name != modality:
            (case / f"BraTS-GLI-00001-000-{name}.nii.gz").write_bytes(good[name])
    sample.write(case, f"BraTS-GLI-00001-000-{modality}")
    with guarded(CLI_SECONDS):
        result = runner.invoke(app, ["segment", str(case), "-o", str(out / "seg.nii.gz"), "--model",
                                     str(root / "model"), "--device", "cpu", "--quiet"])
    return result, out


@pytest.mark.slow
@settings(FUZZ, max_examples=examples(1.5))
@given(sample=ANY_SAMPLE, modality=st.sampled_from(MODALITIES))
def test_segment_cli_never_tracebacks(cli_root, sample, modality):
    root, good = cli_root
    note(f"{sample!r} as {modality}")
    result, out = _segment(root, good, modality, sample)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # the traceback, with the mutation shown by hypothesis
    assert result.exit_code in (0, 2), result.output
    assert "Traceback" not in result.output, result.output
    written = sorted(p.name for p in out.iterdir())
    if result.exit_code == 2:
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:"), result.output
        assert written == [], written
    else:
        assert written == ["seg.nii.gz"], written
        labels = nib.load(out / "seg.nii.gz")
        assert len(labels.shape) == 3 and labels.get_data_dtype() == np.uint8
