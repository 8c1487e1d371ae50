"""factorizer-cli: Factorizer segmentation networks (differentiable NMF) for clinical MRI.

``import factorizer_cli as ft`` gives the seed paper's API (``ft.NMF``, ``ft.SWMatricize``,
``ft.SegmentationFactorizer``, ...), ``ft.build`` for networks described as data, and the entry points
of segmentation (``ft.load_segmenter``, ``ft.segment_case``, ``ft.segment_dataset``; the rest of the
commands' functions are in ``factorizer_cli.api``).

The API is loaded lazily (PEP 562): importing the package does not import PyTorch. The ``factorizer``
command relies on this to set OpenMP's environment before PyTorch loads it (``factorizer_cli.runtime``),
and ``factorizer --help`` starts without paying for PyTorch.
"""

import importlib as _importlib
import importlib.util as _importlib_util

__version__ = "0.1.0"

# Public name -> the module (relative to this package) that defines it.
_SEED_API = (
    "NMF", "HALS", "MultiplicativeUpdate", "RandomInit", "relative_error",
    "Matricize", "SWMatricize",
    "Linear", "LayerNorm", "MLP", "PositionalEmbedding", "Residual",
    "FactorizerSubblock", "FactMixer", "FactorizerBlock", "FactMixerBlock", "FactorizerStage",
    "UNet", "SegmentationFactorizer", "Factorizer",
    "partialize",
)
_LAZY: dict[str, str] = {
    **dict.fromkeys(_SEED_API, ".nn"),
    "build": ".families",
    **dict.fromkeys(("load_segmenter", "segment_case", "segment_dataset"), ".api"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> object:
    """Import a public name's module on first use; also ``ft.nn``, ``ft.zoo``, ... (subpackages)."""
    if name in _LAZY:
        value = getattr(_importlib.import_module(_LAZY[name], __name__), name)
    elif not name.startswith("_") and _importlib_util.find_spec(f"{__name__}.{name}") is not None:
        value = _importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*(k for k in globals() if not k.startswith("_")), *__all__})
