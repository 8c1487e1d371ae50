"""Reading and writing images, and finding a case's modality files.

``read_image`` / ``write_nifti`` keep one geometry convention (nibabel's i, j, k voxel axes and a
voxel -> RAS+ mm affine) for NIfTI and DICOM alike; ``find_modalities`` understands the BraTS, ISLES'22
BIDS and nnU-Net folder layouts; ``write_png`` writes overlay snapshots without extra dependencies.
"""

from .cases import ModalitySpec, find_modalities, match_modalities
from .images import (
    Image,
    atomic_path,
    check_image,
    check_output_path,
    header_from_affine,
    read_image,
    read_label_map,
    write_nifti,
)
from .png import encode_png, write_png

__all__ = [
    "Image",
    "ModalitySpec",
    "atomic_path",
    "check_image",
    "check_output_path",
    "encode_png",
    "find_modalities",
    "header_from_affine",
    "match_modalities",
    "read_image",
    "read_label_map",
    "write_nifti",
    "write_png",
]
