"""Rank 0's Prometheus metrics (step, loss, tokens/s), served when FINETUNE_METRICS_PORT is set."""

from __future__ import annotations

import logging
import os

from .contract import ProgressReport

log = logging.getLogger(__name__)

PORT_ENV = "FINETUNE_METRICS_PORT"


class PrometheusProgress:
    """A progress hook that mirrors each progress update into gauges."""

    def __init__(self, port: int) -> None:
        from prometheus_client import Gauge, start_http_server

        self.step = Gauge("finetune_trainer_step", "Optimizer steps done.")
        self.total_steps = Gauge("finetune_trainer_total_steps", "Optimizer steps in the run.")
        self.loss = Gauge("finetune_trainer_loss", "Recent training loss.")
        self.tokens_per_second = Gauge("finetune_trainer_tokens_per_second", "Training throughput, all ranks.")
        self.checkpoint_step = Gauge("finetune_trainer_last_checkpoint_step", "Step of the newest checkpoint.")
        start_http_server(port)

    @classmethod
    def from_env(cls) -> PrometheusProgress | None:
        port = os.environ.get(PORT_ENV)
        if not port:
            return None
        try:
            return cls(int(port))
        except (ImportError, OSError, ValueError) as e:
            log.warning("no trainer metrics endpoint on port %s: %s", port, e)
            return None

    def __call__(self, progress: ProgressReport) -> None:
        for gauge, value in (
            (self.step, progress.step),
            (self.total_steps, progress.total_steps),
            (self.loss, progress.loss),
            (self.tokens_per_second, progress.tokens_per_second),
            (self.checkpoint_step, progress.last_checkpoint_step),
        ):
            if value is not None:
                gauge.set(value)
