"""The MNI152 2009a template, read from the ``nilearn`` wheel (the optional extra ``factorizer-cli[atlas]``).

Source: ``nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz``, the ICBM 2009a
nonlinear symmetric T1 template (Fonov et al., NeuroImage 2011; McConnell Brain Imaging Centre),
skull-stripped, 197×233×189 voxels of 1 mm, RAS, uint8 intensities 0..255 (brain median 178). Its
licence (MNI/ICBM: copy, modify and distribute with the copyright notice, no fee) is permissive; it is
the grid of the ATLAS R1.2 standard-space volumes SPiN was trained on. The file is found without
importing nilearn (which pulls scikit-learn and pandas): only its package folder is located.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from ..io.images import Image, read_image

MNI152_2009A = "mni152-2009a"
TEMPLATES = {MNI152_2009A: "datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"}
INSTALL_HINT = "pip install 'factorizer-cli[atlas]' (nilearn ships the template)"


def template_path(name: str = MNI152_2009A) -> Path:
    """The template's file; a ``ConfigError`` naming the extra to install where it is absent."""
    if name not in TEMPLATES:
        raise ConfigError(f"unknown template {name!r}; known: {', '.join(TEMPLATES)}")
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the {name} template needs nilearn: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / TEMPLATES[name]
    if not path.is_file():
        raise ConfigError(f"{path}: the {name} template is missing from this nilearn; {INSTALL_HINT}")
    return path


@lru_cache(maxsize=2)
def template(name: str = MNI152_2009A) -> Image:
    """The template as an ``Image`` (float32 intensities 0..255). Cached: callers must not modify it."""
    image = read_image(template_path(name))
    image.array.setflags(write=False)
    return image


def brain_mask(name: str = MNI152_2009A) -> np.ndarray:
    """The template's brain: its nonzero voxels (the template is skull-stripped)."""
    return template(name).array > 0
