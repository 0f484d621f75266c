"""llmship's plugin for vLLM: the load format that streams a version's weights from S3 and
checks each tensor against the signed manifest (serving/weight_stream.py). vLLM calls
register() in each of its processes (its `vllm.general_plugins` entry point, which a replica
puts on the engine's path: weight_stream.plugin_site). Imported only inside the engine."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from serving.weight_stream import LOAD_FORMAT, StreamPlan, verified


def register() -> None:
    from vllm.model_executor.model_loader import register_model_loader
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader

    class VerifiedStreamLoader(BaseModelLoader):
        """The Run:ai Model Streamer's read from S3 (as vLLM's runai_streamer format), each
        tensor checked before the model has it."""

        def __init__(self, load_config) -> None:
            super().__init__(load_config)
            # vLLM's handlers are on its "vllm" logger: these lines land in the engine's log.
            self.log = logging.getLogger("vllm.llmship")
            extra = load_config.model_loader_extra_config or {}
            self.plan = StreamPlan.model_validate(
                json.loads(Path(extra["plan"]).read_text(encoding="utf-8"))
            )

        def download_model(self, model_config) -> None:
            pass  # nothing to fetch: the weights are read from S3 as they load

        def load_weights(self, model, model_config) -> None:
            started = time.perf_counter()
            model.load_weights(self.tensors())
            # vLLM's own loaders' line: a replica's cold start reads its load phase from it
            # (serving/cold_start.py).
            self.log.info("Loading weights took %.2f seconds", time.perf_counter() - started)

        def tensors(self):
            from runai_model_streamer import SafetensorsStreamer
            from runai_model_streamer_s3.credentials.credentials import S3Credentials

            # The replica's read-only identity, in the engine's environment (never its
            # command line): serving/replica.py.
            credentials = S3Credentials(
                access_key_id=os.environ.get("AWS_ACCESS_KEY_ID"),
                secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY"),
                region_name=self.plan.region,
                endpoint=self.plan.endpoint,
            )
            with SafetensorsStreamer() as streamer:
                streamer.stream_files(
                    [f.uri for f in self.plan.files], s3_credentials=credentials, device="cpu"
                )
                yield from verified(streamer.get_tensors(), self.plan, say=self.log.info)

    register_model_loader(LOAD_FORMAT)(VerifiedStreamLoader)
