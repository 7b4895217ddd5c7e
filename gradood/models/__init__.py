"""Model families, chosen by name in configs."""

from __future__ import annotations

from typing import Any

from gradood.models.base import DensityModel


def _registry() -> dict[str, type[DensityModel]]:
    from gradood.models.glow import Glow

    return {"glow": Glow}


def model_names() -> list[str]:
    return sorted(_registry())


def build_model(name: str, params: dict[str, Any] | None = None) -> DensityModel:
    """Instantiate a registered model; unknown names or parameters fail with the offending key named."""
    registry = _registry()
    if name not in registry:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(registry))}")
    cls = registry[name]
    try:
        return cls(**(params or {}))
    except TypeError as err:
        raise ValueError(f"bad parameters for model {name!r}: {err}") from err


__all__ = ["DensityModel", "build_model", "model_names"]
