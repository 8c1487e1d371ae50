"""Typed exceptions of the library.

The library raises these and never exits; the CLI maps each to a one-line message and an exit code.
"""


def one_line(exc: BaseException, limit: int = 120) -> str:
    """An exception's message on one line, shortened: for the one-line errors users see."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


class FactorizerError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(FactorizerError, ValueError):
    """A network description (class name, argument) that cannot be built."""


class InputShapeError(FactorizerError, ValueError):
    """A tensor whose channels or spatial size the network cannot take."""


class CheckpointError(FactorizerError):
    """A checkpoint that cannot be read, or whose keys or shapes do not fit the network."""


class UnsafeCheckpointError(CheckpointError):
    """A pickled checkpoint that would call code outside plain containers and tensors."""


class InputError(FactorizerError):
    """An input image or case folder that cannot be used; the message names the file and the fix."""


class OutputError(FactorizerError):
    """An output path that cannot be written (missing or read-only folder, same as an input, disk full)."""


class DeviceError(FactorizerError):
    """A compute device or precision that this machine cannot provide."""


class DownloadError(FactorizerError):
    """Weights that cannot be fetched (offline, network failure) or fail their checksum."""


class LicenseError(FactorizerError):
    """A model whose licence is not permissive, used without accepting it (``--accept-license``)."""


class ExportError(FactorizerError):
    """An ONNX export that failed, or whose graph disagrees with PyTorch."""
