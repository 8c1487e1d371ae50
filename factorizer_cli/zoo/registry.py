"""The bundled model cards (``models/`` in the repository, ``factorizer_cli.models`` once installed)."""

from __future__ import annotations

from importlib.resources import files

from ..errors import ConfigError
from .card import ModelCard


def zoo_names() -> list[str]:
    """Names of the models that ship with the package, sorted."""
    return sorted(p.name[: -len(".json")] for p in files("factorizer_cli.models").iterdir()
                  if p.name.endswith(".json"))


def zoo_card(name: str) -> ModelCard:
    """The card of a bundled model; ``ConfigError`` listing the known names otherwise."""
    resource = files("factorizer_cli.models") / f"{name}.json"
    if not resource.is_file():
        raise ConfigError(f"no model named {name!r} in the zoo; known: {', '.join(zoo_names()) or 'none'}")
    return ModelCard.load(resource)
