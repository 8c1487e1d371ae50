"""Architecture families: each kind of network registers, in its own module, what the tool asks of it.

Adding a family is one new module here (imported below) plus its model cards; see ``registry`` for
what a family provides and README's developer section for a worked example.
"""

# Importing a family's module registers it (order does not matter: classes are looked up at build time).
from . import factorizer, genesis, layers, spin, uxnet  # noqa: F401
from .registry import (
    Family,
    Knob,
    LogitsModule,
    SliceWindow,
    TrainingView,
    UpstreamFormat,
    activate,
    all_classes,
    build,
    family_of,
    full_resolution_logits,
    label_decisions,
    read_upstream,
    register,
    resolve,
    unregister,
    upstream_config,
    window_logits,
)

__all__ = [
    "Family", "Knob", "SliceWindow", "TrainingView", "activate", "label_decisions", "LogitsModule", "UpstreamFormat",
    "all_classes", "build",
    "family_of", "full_resolution_logits", "read_upstream", "register",
    "resolve", "unregister", "upstream_config", "window_logits",
]
