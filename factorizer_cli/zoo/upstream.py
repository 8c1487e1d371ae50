"""Load checkpoints saved by a family's upstream code into our networks.

The formats are the families' own (``factorizer_cli.families``); this is the one door: read the file
with the restricted unpickler (no upstream install is needed and no code from the file runs), build
the described network, map the checkpoint's keys, load strictly.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import CheckpointError
from ..families import build, read_upstream, upstream_config
from ..safe_pickle import load_checkpoint
from .package import load_state_dict_checked


def load_upstream(path: str | Path, config: Mapping[str, Any] | None = None) -> nn.Module:
    """Build the network described by ``config`` and load the upstream checkpoint at ``path`` into it.

    ``config`` is the declarative description (``{"class": NAME, ...}``); it may be omitted for a
    checkpoint that describes its own network (Factorizer 0.0.1 Lightning ``.ckpt``). Returns the
    network in eval mode. Raises ``CheckpointError`` (``UnsafeCheckpointError`` for a pickle that would
    run code) or ``ConfigError``.
    """
    checkpoint = load_checkpoint(path)
    if config is None:
        config = upstream_config(checkpoint)
        if config is None:
            raise CheckpointError(f"{path}: the checkpoint does not describe its network; pass the network config")
    model = build(dict(config))
    try:
        state_dict = read_upstream(checkpoint, model, path)
    except CheckpointError as err:
        message = str(err)
        raise CheckpointError(message if message.startswith(str(path)) else f"{path}: {message}") from None
    load_state_dict_checked(model, state_dict, path)
    return model.eval()
