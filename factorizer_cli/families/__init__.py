"""Architecture families: each kind of network registers, in its own module, what the tool asks of it.

Adding a family is one new module here (imported below) plus its model cards; see ``registry`` for
what a family provides and README's developer section for a worked example.
"""

from . import (
    factorizer,  # noqa: E402,F401
    layers,  # noqa: E402,F401  (registers the families: plain layers first, they are nested)
)
from .registry import (
    Family,
    Knob,
    LogitsModule,
    UpstreamFormat,
    all_classes,
    build,
    families,
    family_named,
    family_of,
    full_resolution_logits,
    read_upstream,
    register,
    resolve,
    unregister,
    upstream_config,
)

__all__ = [
    "Family", "Knob", "LogitsModule", "UpstreamFormat", "all_classes", "build",
    "families", "family_named", "family_of", "full_resolution_logits", "read_upstream", "register",
    "resolve", "unregister", "upstream_config",
]
