"""A Seldon Core (v1) Python model class, run by `seldon-core-microservice Scaler`.

The microservice passes `model_uri` to __init__ (model-proxy's SELDON_MICROSERVICE preset
sends the config's model_uri as that parameter, as Seldon does for its own servers), calls
load() before serving, and answers `/api/v1.0/predictions` with predict()'s result.
"""

import json
from pathlib import Path

import numpy as np


class Scaler:
    def __init__(self, model_uri: str | None = None) -> None:
        self.model_uri = model_uri
        self.factor: float | None = None

    def load(self) -> None:
        # a real model would fetch s3://... or gs://... here; this one reads a local JSON file
        weights = json.loads(Path(self.model_uri or "weights.json").read_text())
        self.factor = float(weights["factor"])

    def predict(self, X: np.ndarray, features_names: list[str] | None = None) -> np.ndarray:
        assert self.factor is not None, "load() has not run"
        return np.asarray(X, dtype=np.float64) * self.factor

    def tags(self) -> dict[str, str | None]:
        # returned in every response's meta.tags: shows which weights answered
        return {"model_uri": self.model_uri}

    def health_status(self) -> dict[str, float]:
        # /health/status, the preset's readiness endpoint, calls this: an exception makes it
        # answer 500, so the proxy holds traffic until the model can serve
        if self.factor is None:
            raise RuntimeError("the model is not loaded")
        return {"factor": self.factor}
