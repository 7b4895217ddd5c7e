"""Closed choices shared by the configuration and the code that acts on them (a bad value fails when the
config is read, before Ray starts)."""

from __future__ import annotations

from enum import StrEnum


class ResizePolicy(StrEnum):
    """How an input of another size reaches the model's size."""

    #: scale the whole image to the size (aspect ratio not kept)
    resize = "resize"
    #: crop or zero-pad to the size, no scaling
    center_crop = "center_crop"
    #: scale the shorter side to the size, then crop the centre
    resize_center_crop = "resize_center_crop"


class Interpolation(StrEnum):
    """Resampling filter for resizing (Pillow's names)."""

    nearest = "nearest"
    bilinear = "bilinear"
    bicubic = "bicubic"
    lanczos = "lanczos"
    box = "box"
    hamming = "hamming"


class FeatureMethod(StrEnum):
    """How the per-sample squared gradient norms are computed (all exact; they differ in speed)."""

    #: one backward pass per row (the reference)
    loop = "loop"
    #: torch.func's vmap over per-row gradients
    vmap = "vmap"
    #: gradood's engine: per-layer norms from one batched backward pass
    engine = "engine"


class FdrMethod(StrEnum):
    """Benjamini-Hochberg (PRDS p-values, as conformal ones are), Storey's adaptive BH (BH at level
    q / pi0_hat, pi0_hat the estimated in-distribution share; valid for conformal p-values, Marandon et
    al. 2024) or Benjamini-Yekutieli (any dependence)."""

    bh = "bh"
    storey = "storey"
    by = "by"


class Combination(StrEnum):
    """How a combined test merges its components' (smooth) log p-values into one statistic.

    ``adaptive`` learns from each night which tests see its OOD rows (:mod:`gradood.stats.adaptive`),
    on top of Fisher's method over the components.
    """

    fisher = "fisher"
    tippett = "tippett"
    adaptive = "adaptive"


class TestName(StrEnum):
    """The single tests every suite fits; ``paper`` is the paper's S(x)."""

    __test__ = False  # not a pytest class

    paper = "paper"
    fullcov = "fullcov"
    fisher_layers = "fisher_layers"
    gradnorm = "gradnorm"
    typicality = "typicality"
    nll = "nll"
    #: -log2 p(x) minus the input's PNG size in bits; fitted only where the features carry that column
    complexity = "complexity"
