"""Model families, chosen by name in configs."""

from __future__ import annotations

import importlib
from typing import Any

from gradood.models.base import DensityModel

# name -> "module:class", imported on first use so a model family costs nothing until chosen
MODELS: dict[str, type[DensityModel] | str] = {
    "glow": "gradood.models.glow:Glow",
    "ddpm": "gradood.models.ddpm:DDPM",
    "vae": "gradood.models.vae:VAE",
    "pixelcnn": "gradood.models.pixelcnn:PixelCNN",
}


def register_model(name: str, target: type[DensityModel] | str) -> None:
    """Make a model family available to configs as ``model.name=NAME`` (a class or "module:Class").

    Ray workers rebuild models by name, so register in a module they import too (or use a
    "module:Class" string, which they import themselves).
    """
    MODELS[name] = target


def _registry() -> dict[str, type[DensityModel]]:
    found = {}
    for name, target in MODELS.items():
        if not isinstance(target, str):
            found[name] = target
            continue
        module, cls = target.split(":")
        try:
            found[name] = getattr(importlib.import_module(module), cls)
        except ModuleNotFoundError as err:
            if err.name != module:  # a broken import inside an existing model file must surface
                raise
    return found


def model_names() -> list[str]:
    return sorted(_registry())


def build_model(name: str, params: dict[str, Any] | None = None) -> DensityModel:
    """Instantiate a registered model; unknown names or parameters fail with the offending key named."""
    registry = _registry()
    if name not in registry:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(registry))}")
    cls = registry[name]
    for old, new in cls.renamed_params.items():
        if old in (params or {}):
            raise ValueError(f"model {name!r}: parameter {old} was renamed to {new} (model.params.{new})")
    try:
        return cls(**(params or {}))
    except TypeError as err:
        raise ValueError(f"bad parameters for model {name!r}: {err}") from err


__all__ = ["DensityModel", "build_model", "model_names", "register_model"]
