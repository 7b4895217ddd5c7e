"""Training generative models as a Ray Train (V2) job: ``train_model(cfg)`` on the driver, one
:func:`~gradood.train.worker.train_loop_per_worker` per rank, the rows read through Ray Data
(:mod:`gradood.train.data`). This is the only package besides gradood.pipeline that imports Ray; the
Ray-free loop lives in :mod:`gradood.train.loop`.

``train_model`` and ``TrainResult`` are imported on first use, so the Ray Data read tasks, which import
:mod:`gradood.train.read`, do not pay for torch and Ray Train.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gradood.train.trainer import TrainResult, train_model

__all__ = ["TrainResult", "train_model"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from gradood.train import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
