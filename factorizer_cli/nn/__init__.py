"""Pure PyTorch Factorizer layers and networks: no I/O, no CLI."""

from .blocks import FactMixer, FactMixerBlock, FactorizerBlock, FactorizerStage, FactorizerSubblock
from .factorization import HALS, NMF, MultiplicativeUpdate, RandomInit, relative_error
from .layers import MLP, LayerNorm, Linear, PositionalEmbedding, Residual
from .matricize import Matricize, SWMatricize
from .networks import Factorizer, SegmentationFactorizer, UNet
from .partial import partialize

__all__ = [
    "NMF", "HALS", "MultiplicativeUpdate", "RandomInit", "relative_error",
    "Matricize", "SWMatricize",
    "Linear", "LayerNorm", "MLP", "PositionalEmbedding", "Residual",
    "FactorizerSubblock", "FactMixer", "FactorizerBlock", "FactMixerBlock", "FactorizerStage",
    "UNet", "SegmentationFactorizer", "Factorizer",
    "partialize",
]
