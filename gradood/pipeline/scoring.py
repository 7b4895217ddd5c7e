"""Scoring stages (Ray Data callables over dicts of numpy arrays; nothing here imports Ray).

:class:`TailSampler` picks the night's rows that train the adaptive combined test and returns their
tails; :class:`Scorer` scores every feature row with the suite (and that night's test).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from gradood.pipeline.tables import feature_matrix, object_column
from gradood.stats.adaptive import AdaptiveNight, training_mask
from gradood.stats.suite import DetectorSuite


class TailSampler:
    """Ray Data stage: the night's complete rows whose uniform of (seed, row id) falls below ``rate``,
    as ``row_index`` and ``tails`` (-log p~ of every test, the adaptive test's training input)."""

    def __init__(self, detector: dict[str, Any], group_size: int, rate: float, seed: int) -> None:
        self.suite = DetectorSuite.from_dict(detector["suite"])
        self.layers = list(detector["layers"])
        self.min_sqnorm = float(detector["fit"]["min_sqnorm"])
        self.group_size, self.rate, self.seed = group_size, rate, seed

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        complete = np.asarray(batch["n_rows"]) == self.group_size
        keep = complete & training_mask(self.seed, [str(i) for i in batch["id"]], self.rate)
        kept = {c: np.asarray(v)[keep] for c, v in batch.items()}  # features of the training rows only
        x = feature_matrix(kept, self.layers, self.min_sqnorm)
        return {
            "row_index": np.asarray(batch["row_index"])[keep],
            "tails": self.suite.tails(x),
        }


class Scorer:
    """Ray Data stage: feature rows in; every test's score and p-value, the chosen test's, the 3 most
    deviant layers and the component that drove the combined p-value out (flags need the whole run)."""

    def __init__(
        self,
        detector: dict[str, Any],
        test: str,
        group_size: int = 1,
        top_k: int = 3,
        night: AdaptiveNight | None = None,
    ) -> None:
        self.group_size = group_size
        self.night = night
        self.suite = DetectorSuite.from_dict(detector["suite"])
        self.layers = list(detector["layers"])
        self.min_sqnorm = float(detector["fit"]["min_sqnorm"])
        self.columns = [str(name) for name in self.suite.feature_names_in_]
        self.test = test
        self.top_k = top_k

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = pd.DataFrame(
            feature_matrix(batch, self.layers, self.min_sqnorm), columns=self.columns, copy=False
        )
        results = self.suite.score_all(x, self.night, combined=self.test == "combined")
        names, z = self.suite.top_layers(x, k=self.top_k)
        chosen = results[self.test]
        out = {
            "id": np.asarray(batch["id"]),
            "ood_score": chosen["score"],
            "p_value": chosen["p_index"] / (self.suite.calibration_size(self.test) + 1),
            "driver": results["driver"] if self.test == "combined" else np.full(len(x), self.test, object),
            "log_prob": np.asarray(batch["log_prob"], np.float64),
            "n_rows": np.asarray(batch["n_rows"]),
            # a set that lost members is scored for reference, but gets no p-value or flag
            "complete_set": np.asarray(batch["n_rows"]) == self.group_size,
            "row_index": np.asarray(batch["row_index"]),
            "top_layers": list_column([list(n) for n in names]),
            "top_z": list_column([list(map(float, r)) for r in z]),
        }
        for name in self.suite.tests_:
            out[f"score:{name}"] = results[name]["score"]
            out[f"p_value:{name}"] = results[name]["p_index"] / (self.suite.calibration_size(name) + 1)
        if "member_ids" in batch:
            out["member_ids"] = list_column([[str(m) for m in ms] for ms in batch["member_ids"]])
        return out


def list_column(rows: list[list]) -> np.ndarray:
    """A 1-D object array of Python lists, which Ray Data turns into an Arrow list column (numpy would
    build a 2-D array from equal-length rows, and arrays of arrays end up as pickled objects)."""
    return object_column(rows)
