"""Training generative models as a Ray Train (V2) job: ``train_model(cfg)`` on the driver, one
:func:`~gradood.train.worker.train_loop_per_worker` per rank. This is the only package besides
gradood.pipeline that imports Ray; the Ray-free loop lives in :mod:`gradood.train.loop`."""

from gradood.train.trainer import TrainResult, train_model

__all__ = ["TrainResult", "train_model"]
