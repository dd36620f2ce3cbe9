"""A custom MLServer runtime, the case of MLServer's "custom inference runtimes" page: load()
reads the model's weights, predict() answers V2 inference requests, predict_stream() streams
one response per word (what `/v2/models/<name>/infer_stream` serves as Server-Sent Events)."""

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
from mlserver import MLModel
from mlserver.codecs import NumpyCodec, StringCodec
from mlserver.logging import logger
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import to_absolute_path


class Scaler(MLModel):
    async def load(self) -> bool:
        # parameters.uri of model-settings.json, relative to that file (not required to
        # exist yet, unlike what get_model_uri() returns)
        parameters = self.settings.parameters
        if parameters is None or not parameters.uri:
            raise ValueError("model-settings.json needs parameters.uri: the weights file")
        weights = Path(to_absolute_path(self.settings, parameters.uri))
        logger.info("loading weights from %s", weights)
        self._factor = await asyncio.to_thread(_read_factor, weights)
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        values = NumpyCodec.decode_input(payload.inputs[0])
        scaled = np.asarray(values, dtype=np.float64) * self._factor
        return InferenceResponse(
            model_name=self.name, outputs=[NumpyCodec.encode_output("scaled", scaled)]
        )

    async def predict_stream(
        self, payloads: AsyncIterator[InferenceRequest]
    ) -> AsyncIterator[InferenceResponse]:
        payload = await payloads.__anext__()
        [text] = StringCodec.decode_input(payload.inputs[0])
        for word in text.split():
            yield InferenceResponse(
                model_name=self.name, outputs=[StringCodec.encode_output("word", [word])]
            )


def _read_factor(weights: Path) -> float:
    # Stands in for a slow download: until the weights file exists the model is loading,
    # MLServer answers 400 on /v2/models/<name>/ready, and model-proxy's /ready says 503.
    while not weights.is_file():
        time.sleep(0.1)
    return float(json.loads(weights.read_text())["factor"])
