"""Finding a case's modality files, a dataset's cases and label maps in BraTS, ISLES'22 BIDS and nnU-Net
folders, and naming errors."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from factorizer_cli.errors import InputError
from factorizer_cli.io import (
    find_cases,
    find_label_maps,
    find_labelled_cases,
    find_modalities,
    match_modalities,
    resolve_inputs,
)

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


# --- dataset layouts: the one walker every command uses ------------------------------------------


def test_find_cases_of_case_folders_and_nnunet_files(tmp_path: Path) -> None:
    for case in ("BraTS-GLI-00001-000", "BraTS-GLI-00000-000"):
        _touch(tmp_path, *(f"{case}/{case}-{m}.nii.gz" for m in ("t1n", "t1c", "t2w", "t2f", "seg")))
    _touch(tmp_path, "derivatives/x_t1.nii.gz", ".hidden/y_t1.nii.gz")  # never cases
    _touch(tmp_path, *(f"flat_{c:04d}.nii.gz" for c in (2, 0, 3, 1)), ".flat_0000.nii.gz")
    _touch(tmp_path, "gap_0000.nii.gz", "gap_0001.nii.gz", "gap_0002.nii.gz", "gap_0004.nii.gz")
    cases = {c.name: c for c in find_cases(tmp_path, BRATS)}
    assert list(cases) == ["BraTS-GLI-00000-000", "BraTS-GLI-00001-000", "flat", "gap"]
    assert [f.name for f in cases["flat"].files] == [f"flat_{c:04d}.nii.gz" for c in range(4)]
    assert cases["BraTS-GLI-00000-000"].files[3].name == "BraTS-GLI-00000-000-t2f.nii.gz"
    assert cases["gap"].files == () and "gap_0000 to gap_0003" in cases["gap"].problem


def test_find_cases_with_a_pattern_names_nested_folders(tmp_path: Path) -> None:
    for subject in ("sub-02", "sub-01"):
        _touch(tmp_path, *(f"{subject}/ses-1/anat/{subject}_ses-1_{m}.nii.gz" for m in ("dwi", "adc", "flair")))
    cases = find_cases(tmp_path, ISLES, pattern="sub-*/ses-*")
    assert [c.name for c in cases] == ["sub-01_ses-1", "sub-02_ses-1"] and all(len(c.files) == 3 for c in cases)


def test_label_maps_of_every_layout(tmp_path: Path) -> None:
    _touch(tmp_path, "brats/BraTS-GLI-00000-000/BraTS-GLI-00000-000-seg.nii.gz",
           "brats/BraTS-GLI-00000-000/BraTS-GLI-00000-000-t1c.nii.gz",
           "brats/plain/seg.nii.gz", "brats/plain/flair.nii.gz",  # a bare marker: the folder names the case
           "brats/imagesTr/x_0000.nii.gz", "brats/labelsTr/x.nii.gz",
           "brats/derivatives/sub-1/ses-1/sub-1_ses-1_msk.nii.gz")
    found = {t.case: t for t in find_label_maps(tmp_path / "brats")}
    assert sorted(found) == ["BraTS-GLI-00000-000", "plain", "sub-1_ses-1", "x"]
    assert found["sub-1_ses-1"].aliases == ("sub-1",) and found["x"].path.parent.name == "labelsTr"
    _touch(tmp_path, "brats/BraTS-GLI-00000-000/BraTS-GLI-00000-000_mask.nii.gz")
    with pytest.raises(InputError, match="two ground truths for case BraTS-GLI-00000-000"):
        find_label_maps(tmp_path / "brats")


def test_labelled_cases_for_training_share_the_label_markers(tmp_path: Path) -> None:
    _touch(tmp_path, *(f"a/a_{m}.nii.gz" for m in ("dwi", "adc", "flair")), "a/seg.nii.gz",
           *(f"b/b_{m}.nii.gz" for m in ("dwi", "adc", "flair")), "b/b.label.nii.gz")
    found = {case.name: label.name for case, label in find_labelled_cases(tmp_path, ISLES)}
    assert found == {"a": "seg.nii.gz", "b": "b.label.nii.gz"}
    (tmp_path / "b" / "b.label.nii.gz").unlink()
    with pytest.raises(InputError, match="no label map for case b"):
        find_labelled_cases(tmp_path, ISLES)
    with pytest.raises(InputError, match="no such dataset folder"):
        find_labelled_cases(tmp_path / "nope", ISLES)


def test_resolve_inputs_by_folder_by_names_or_for_one_input_models(tmp_path: Path) -> None:
    _touch(tmp_path, *(f"case/c_{m}.nii.gz" for m in ("dwi", "adc", "flair")))
    folder = tmp_path / "case"
    files = sorted(folder.iterdir())  # adc, dwi, flair
    assert [p.name for p in resolve_inputs([folder], [], ISLES)] == ["c_dwi.nii.gz", "c_adc.nii.gz", "c_flair.nii.gz"]
    assert resolve_inputs(files, ["ADC", "dwi", "flair"], ISLES) == [files[1], files[0], files[2]]
    assert resolve_inputs(files[:1], [], [("flair", [])]) == files[:1]
    with pytest.raises(InputError, match="no --modality; say which is which, e.g. --modality dwi adc flair"):
        resolve_inputs(files, [], ISLES)
    with pytest.raises(InputError, match="2 input files but 3 modality names"):
        resolve_inputs(files[:2], ["dwi", "adc", "flair"], ISLES)
    with pytest.raises(InputError, match="nope.nii.gz: no such file"):
        resolve_inputs([tmp_path / "nope.nii.gz"], ["flair"], [("flair", [])])
