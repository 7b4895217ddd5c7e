"""The contract every gradood model meets; the trainer, feature extractors and pipeline rely only on it."""

from __future__ import annotations

import functools
import inspect
from typing import Any, ClassVar

import torch
from torch import nn

from gradood.seeding import NoiseSpec


def require_positive_ints(model: str, **values: Any) -> None:
    """Constructor arguments that must be positive integers; a clear error names the first bad one."""
    for key, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{model}: {key} must be a positive integer, got {value!r}")


class DensityModel(nn.Module):
    """A generative model with a differentiable (proxy) log-likelihood per input.

    Inputs ``x`` are float tensors ``[B, C, H, W]`` holding integer pixel values in ``[0, 255]``
    (the decoded uint8 image, cast). Every random draw the model needs (dequantisation, diffusion
    noise, VAE eps) comes in through ``noise``, shaped per :meth:`noise_spec`, so callers derive it from
    (seed, row id) and every code path sees the same numbers.

    ``log_prob`` of row i must depend only on ``x[i]`` and ``noise[*][i]``: no batch statistics
    (BatchNorm in eval mode only, ActNorm initialised before extraction). Per-sample gradient methods
    rely on this.
    """

    #: registry name, used in configs and checkpoints
    name: str = ""
    #: (C, H, W) the model expects
    input_shape: tuple[int, int, int] = (1, 28, 28)
    #: constructor arguments that were renamed (old -> new): a config or checkpoint with the old name
    #: fails with a message naming the new one
    renamed_params: ClassVar[dict[str, str]] = {}
    #: what ``training_loss`` measures, as the training job reports it
    loss_name: ClassVar[str] = "bits/dim"

    @property
    def image_mode(self) -> str:
        """PIL mode inputs are converted to: "L" for one channel, "RGB" for three."""
        return {1: "L", 3: "RGB"}[self.input_shape[0]]

    def noise_spec(self) -> dict[str, NoiseSpec]:
        """Per-row noise inputs of :meth:`log_prob` and :meth:`training_loss`; empty when deterministic."""
        return {}

    def log_prob(self, x: torch.Tensor, noise: dict[str, torch.Tensor]) -> torch.Tensor:
        """Log-likelihood (or proxy) of each row in nats, shape ``[B]``."""
        raise NotImplementedError

    def training_loss(self, x: torch.Tensor, noise: dict[str, torch.Tensor]) -> torch.Tensor:
        """Scalar loss to minimise; by default mean negative log-likelihood in bits per dimension."""
        return -(self.log_prob(x, noise) / (self.num_dims * torch.log(torch.tensor(2.0)))).mean()

    @property
    def num_dims(self) -> int:
        c, h, w = self.input_shape
        return c * h * w

    def bits_per_dim(self, log_prob: torch.Tensor) -> torch.Tensor:
        """Discrete-data bits per dimension from ``log_prob`` in nats."""
        return -log_prob / (self.num_dims * torch.log(torch.tensor(2.0, dtype=log_prob.dtype)))

    def prepare_for_scoring(self) -> None:
        """Put the model in the state feature extraction needs (eval mode; data-dependent inits done)."""
        self.eval()

    def init_from_data(self, x: torch.Tensor, noise: dict[str, torch.Tensor]) -> None:  # noqa: B027
        """Data-dependent initialisation (Glow's ActNorm) run once at the start of training."""

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Optional: ``n`` samples as float pixel values in [0, 255]."""
        raise NotImplementedError(f"{type(self).__name__} does not implement sampling")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # every family's constructor arguments are recorded here, once, as the checkpoint's hparams
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:
            return
        signature = inspect.signature(init)

        @functools.wraps(init)
        def recording_init(self: DensityModel, *args: Any, **kwargs: Any) -> None:
            bound = signature.bind(self, *args, **kwargs)
            bound.apply_defaults()
            arguments = _keyword_arguments(signature, bound)
            self.__dict__.setdefault("_arguments", {})[cls] = arguments
            if "_hparams" not in self.__dict__:  # the most derived constructor's arguments win
                object.__setattr__(self, "_hparams", arguments)
            init(self, *args, **kwargs)

        cls.__init__ = recording_init  # type: ignore[method-assign]

    def arguments_of(self, family: type) -> dict[str, Any]:
        """The keyword arguments ``family``'s constructor received for this model, defaults filled in
        (a subclass's constructor may have passed it others than its own)."""
        return dict(self.__dict__["_arguments"][family] or {})

    def hparams(self) -> dict[str, Any]:
        """Constructor keyword arguments that rebuild this model (saved in checkpoints), as the
        constructor received them (defaults filled in, sequences as lists)."""
        recorded = self.__dict__.get("_hparams")
        if recorded is None:
            raise NotImplementedError(
                f"{type(self).__name__}'s constructor takes positional-only or *args parameters: "
                "override hparams()"
            )
        return {k: list(v) if isinstance(v, list | tuple) else v for k, v in recorded.items()}


def _keyword_arguments(signature: inspect.Signature, bound: inspect.BoundArguments) -> dict[str, Any] | None:
    """The bound constructor arguments as keywords, or None where they cannot be passed as keywords."""
    out: dict[str, Any] = {}
    for name, value in list(bound.arguments.items())[1:]:  # without self
        kind = signature.parameters[name].kind
        if kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.VAR_POSITIONAL):
            return None
        if kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        else:
            out[name] = value
    return out
