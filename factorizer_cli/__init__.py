"""factorizer-cli: Factorizer segmentation networks (differentiable NMF) for clinical MRI.

``import factorizer_cli as ft`` gives the seed paper's API (``ft.NMF``, ``ft.SWMatricize``,
``ft.SegmentationFactorizer``, ...).
"""

__version__ = "0.1.0"

from .nn import *  # noqa: F401,F403  (the seed API, re-exported)
from .nn import __all__ as _nn_all

__all__ = ["__version__", *_nn_all]
