"""Reading and writing images, finding the files of cases, and writing outputs whole.

``read_image`` / ``write_nifti`` keep one geometry convention (nibabel's i, j, k voxel axes and a
voxel -> RAS+ mm affine) for NIfTI and DICOM alike; ``cases`` knows the folder layouts of the field
(BraTS, ISLES'22 BIDS, nnU-Net) for every command; ``atomic`` writes every output whole or not at all;
``write_png`` writes overlay snapshots without extra dependencies.
"""

from .atomic import atomic_path, write_json_atomic, write_text_atomic
from .cases import (
    Case,
    LabelMap,
    ModalitySpec,
    find_cases,
    find_label_maps,
    find_labelled_cases,
    find_modalities,
    match_modalities,
    resolve_inputs,
)
from .images import (
    Image,
    check_image,
    check_output_folder,
    check_output_path,
    check_outputs,
    header_from_affine,
    read_image,
    read_label_map,
    write_nifti,
)
from .png import encode_png, write_png

__all__ = [
    "Case",
    "Image",
    "LabelMap",
    "ModalitySpec",
    "atomic_path",
    "check_image",
    "check_output_folder",
    "check_output_path",
    "check_outputs",
    "encode_png",
    "find_cases",
    "find_label_maps",
    "find_labelled_cases",
    "find_modalities",
    "header_from_affine",
    "match_modalities",
    "read_image",
    "read_label_map",
    "resolve_inputs",
    "write_json_atomic",
    "write_nifti",
    "write_png",
    "write_text_atomic",
]
