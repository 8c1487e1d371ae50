"""The seed API's way of passing a class with preset arguments: ``(cls, {kwargs})``.

Upstream writes layers as ``stem=(nn.Conv3d, {"kernel_size": 3})``: a callable, or a tuple of a callable
followed by positional-argument sequences and keyword dicts. ``partialize`` turns either into one callable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

PartialSpec = Callable[..., Any] | Sequence[Any]


def partialize(spec: PartialSpec) -> Callable[..., Any]:
    """Return ``spec`` itself if callable, else ``partial(spec[0], *args, **kwargs)`` from the tuple form."""
    if callable(spec):
        return spec
    if isinstance(spec, Sequence) and not isinstance(spec, str) and spec and callable(spec[0]):
        args: list[Any] = []
        kwargs: dict[str, Any] = {}
        for item in spec[1:]:
            if isinstance(item, dict):
                kwargs.update(item)
            elif isinstance(item, Sequence) and not isinstance(item, str):
                args.extend(item)
            else:
                args.append(item)
        return partial(spec[0], *args, **kwargs)
    raise TypeError(f"expected a class or a (class, {{kwargs}}) tuple, got {spec!r}")
