"""Finding a case's modality files in BraTS, ISLES'22 BIDS and nnU-Net folders, and naming errors."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from factorizer_cli.errors import InputError
from factorizer_cli.io import find_modalities, match_modalities

BRATS = [("t1n", ["t1"]), ("t1c", ["t1ce"]), ("t2w", ["t2"]), ("t2f", ["flair"])]
ISLES = [("dwi", []), ("adc", []), ("flair", [])]


def _touch(folder: Path, *names: str) -> None:
    """Tiny real NIfTI files (the finder reads names only, but keep the fixtures honest)."""
    tiny = nib.Nifti1Image(np.ones((2, 2, 2), np.uint8), np.eye(4))
    for name in names:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith((".nii", ".nii.gz")):
            nib.save(tiny, path)
        else:
            path.write_text("{}")


def _names(found: dict[str, Path], folder: Path) -> dict[str, str]:
    return {key: path.relative_to(folder).as_posix() for key, path in found.items()}


def test_brats_2023(tmp_path: Path) -> None:
    case = "BraTS-GLI-00000-000"
    _touch(tmp_path, *(f"{case}-{m}.nii.gz" for m in ("t2f", "seg", "t1n", "t2w", "t1c")))
    found = find_modalities(tmp_path, BRATS)
    assert list(found) == ["t1n", "t1c", "t2w", "t2f"]  # spec order, not file order
    assert _names(found, tmp_path) == {
        m: f"{case}-{m}.nii.gz" for m in ("t1n", "t1c", "t2w", "t2f")
    }


def test_brats_2021_uses_aliases(tmp_path: Path) -> None:
    _touch(tmp_path, *(f"BraTS2021_00000_{m}.nii.gz" for m in ("t1", "t1ce", "t2", "flair", "seg")))
    assert _names(find_modalities(tmp_path, BRATS), tmp_path) == {
        "t1n": "BraTS2021_00000_t1.nii.gz",
        "t1c": "BraTS2021_00000_t1ce.nii.gz",
        "t2w": "BraTS2021_00000_t2.nii.gz",
        "t2f": "BraTS2021_00000_flair.nii.gz",
    }


def test_isles22_bids_nested(tmp_path: Path) -> None:
    sub = "sub-strokecase0001_ses-0001"
    _touch(
        tmp_path,
        f"ses-0001/dwi/{sub}_dwi.nii.gz",
        f"ses-0001/dwi/{sub}_dwi.json",
        f"ses-0001/dwi/{sub}_adc.nii.gz",
        f"ses-0001/dwi/{sub}_adc.json",
        f"ses-0001/anat/{sub}_FLAIR.nii.gz",
        f"ses-0001/anat/{sub}_FLAIR.json",
        f"derivatives/sub-strokecase0001/ses-0001/{sub}_msk.nii.gz",
        f"derivatives/ses-0001/dwi/{sub}_dwi.nii.gz",  # a processed copy must not count twice
    )
    assert _names(find_modalities(tmp_path, ISLES), tmp_path) == {
        "dwi": f"ses-0001/dwi/{sub}_dwi.nii.gz",
        "adc": f"ses-0001/dwi/{sub}_adc.nii.gz",
        "flair": f"ses-0001/anat/{sub}_FLAIR.nii.gz",
    }


def test_isles22_flat(tmp_path: Path) -> None:
    _touch(tmp_path, *(f"sub-strokecase0007_ses-0001_{m}.nii" for m in ("adc", "dwi", "flair")))
    assert list(find_modalities(tmp_path, ISLES)) == ["dwi", "adc", "flair"]


def test_nnunet_indices_follow_spec_order(tmp_path: Path) -> None:
    _touch(tmp_path, *(f"CASE_{i:04d}.nii.gz" for i in (3, 1, 0, 2)))
    assert _names(find_modalities(tmp_path, BRATS), tmp_path) == {
        "t1n": "CASE_0000.nii.gz",
        "t1c": "CASE_0001.nii.gz",
        "t2w": "CASE_0002.nii.gz",
        "t2f": "CASE_0003.nii.gz",
    }


def test_nnunet_index_beyond_the_model(tmp_path: Path) -> None:
    _touch(tmp_path, *(f"case_{i:04d}.nii.gz" for i in range(4)))
    with pytest.raises(InputError, match="case_0003.nii.gz .* channel 3 but the model takes 3"):
        find_modalities(tmp_path, ISLES)


def test_plain_names_and_case_insensitivity(tmp_path: Path) -> None:
    _touch(tmp_path, "T1.nii.gz", "Patient7_T1CE.NII.GZ", "scan-T2W.nii", "FLAIR.nii.gz")
    assert _names(find_modalities(tmp_path, BRATS), tmp_path) == {
        "t1n": "T1.nii.gz",
        "t1c": "Patient7_T1CE.NII.GZ",
        "t2w": "scan-T2W.nii",
        "t2f": "FLAIR.nii.gz",
    }


def test_name_must_follow_a_separator(tmp_path: Path) -> None:
    """``xt1`` is not a T1: a modality name counts only as a whole token."""
    _touch(tmp_path, "caseflair.nii.gz", "case_dwi.nii.gz", "case_adc.nii.gz")
    with pytest.raises(InputError, match="no FLAIR \\(flair\\) image"):
        find_modalities(tmp_path, ISLES)


def test_missing_modality_names_folder_and_found_files(tmp_path: Path) -> None:
    _touch(tmp_path, "BraTS-GLI-00001-000-t1n.nii.gz", "BraTS-GLI-00001-000-t1c.nii.gz",
           "BraTS-GLI-00001-000-seg.nii.gz")  # fmt: skip
    with pytest.raises(InputError) as info:
        find_modalities(tmp_path, BRATS)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"no T2 (t2w/t2) or FLAIR (t2f/flair) image in {tmp_path}; found: ")
    assert "BraTS-GLI-00001-000-seg.nii.gz" in message
    assert "CASE_0002.nii.gz" in message  # says how to name the file


def test_two_files_for_one_modality(tmp_path: Path) -> None:
    _touch(
        tmp_path, "x_t1.nii.gz", "x_t1c.nii.gz", "x_t1ce.nii.gz", "x_t2.nii.gz", "x_flair.nii.gz"
    )
    with pytest.raises(
        InputError, match=r"2 files in .* match T1c \(t1c/t1ce\): x_t1c.nii.gz, x_t1ce"
    ):
        find_modalities(tmp_path, BRATS)


def test_nnunet_and_named_file_for_the_same_modality(tmp_path: Path) -> None:
    _touch(tmp_path, "c_0000.nii.gz", "c_0001.nii.gz", "c_0002.nii.gz", "c_dwi.nii.gz")
    with pytest.raises(InputError, match="2 files .* match DWI"):
        find_modalities(tmp_path, ISLES)


def test_folder_without_nifti(tmp_path: Path) -> None:
    _touch(tmp_path, "notes.json", ".hidden_t1.nii.gz")
    with pytest.raises(InputError, match=f"no NIfTI images .* in {tmp_path}"):
        find_modalities(tmp_path, BRATS)


def test_folder_missing_or_a_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="nope: no such folder"):
        find_modalities(tmp_path / "nope", BRATS)
    _touch(tmp_path, "a_t1.nii.gz")
    with pytest.raises(InputError, match="a_t1.nii.gz is a file, not a case folder"):
        find_modalities(tmp_path / "a_t1.nii.gz", BRATS)


def test_match_modalities_aliases_case_and_order() -> None:
    assert match_modalities(["t1", "T1CE", "t2", "Flair"], BRATS) == ["t1n", "t1c", "t2w", "t2f"]
    assert match_modalities(["flair", "t2w", "t1n", "t1c"], BRATS) == ["t2f", "t2w", "t1n", "t1c"]
    assert match_modalities(["DWI", "adc", "flair"], ISLES) == ["dwi", "adc", "flair"]


def test_match_modalities_errors() -> None:
    expects = "t1n \\(t1\\), t1c \\(t1ce\\), t2w \\(t2\\), t2f \\(flair\\)"
    with pytest.raises(InputError, match=f"unknown modality 'pd'; the model expects {expects}"):
        match_modalities(["t1", "t1ce", "t2", "pd"], BRATS)
    with pytest.raises(InputError, match="t2f given twice \\('flair' and 'T2F'\\)"):
        match_modalities(["flair", "T2F", "t1", "t2"], BRATS)
    with pytest.raises(
        InputError, match=f"3 modalities given \\(t1 t1ce t2\\) but the model takes 4: {expects}"
    ):
        match_modalities(["t1", "t1ce", "t2"], BRATS)


def test_specs_with_a_shared_alias_are_a_bug() -> None:
    with pytest.raises(ValueError, match="'t1' belongs to both"):
        match_modalities(["t1"], [("t1n", ["t1"]), ("t1c", ["t1"])])
