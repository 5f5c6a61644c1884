"""The trainer's entry point: `python -m finetune_trainer --config FILE` and `finetune train --config FILE`.

Exit codes (the operator's failure semantics rest on them): 0 done; 2 permanent (a bad config or data
set: the message names the field, file or line); 143 stopped by SIGTERM after checkpointing; anything
else is retryable. A one-line summary goes to the termination log ($FINETUNE_TERMINATION_LOG, else
/dev/termination-log when writable).

With FINETUNE_RESTART_STRATEGY=InPlace this process is the pod's elastic agent (elastic.py), which starts the
training processes and restarts the gang's in place; without it, it trains (or starts NPROC_PER_NODE processes).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import TextIO

from .config import ConfigError, load_trainer_config
from .contract import (
    COLLECTIVE_TIMEOUT_ENV,
    DEFAULT_COLLECTIVE_TIMEOUT_SECONDS,
    RESTART_STRATEGY_ENV,
    ExitCode,
    RestartStrategy,
)
from .distributed import (
    LaunchEnv,
    StoppedWhileWaiting,
    check_gpus,
    collective_timed_out,
    launch_env_from_environ,
    launch_local_workers,
    seconds_from_env,
)
from .metrics import ProgressHook, write_termination_message

log = logging.getLogger("finetune_trainer")


def run(config_path: str, on_progress: ProgressHook | None = None) -> int:
    """Train with the config at config_path and the distributed env of this process; return the exit code.

    on_progress(ProgressReport) is called on rank 0 with each progress.json update.
    """
    _configure_logging(rank=None)
    try:
        config = load_trainer_config(config_path)
        launch_env = launch_env_from_environ()
        check_gpus(launch_env)
    except ConfigError as e:
        return _finish(ExitCode.PERMANENT, f"config error: {e}", writes_message=True)
    in_place = os.environ.get(RESTART_STRATEGY_ENV) == RestartStrategy.IN_PLACE
    if in_place and not launch_env.worker_process:
        from .elastic import run_agent  # this process is the pod's elastic agent; the workers train

        try:
            code, message = run_agent(config_path, launch_env)
        except ConfigError as e:
            return _finish(ExitCode.PERMANENT, f"config error: {e}", writes_message=True)
        _finish(code, message or f"exit {code}", writes_message=message is not None)
        return code
    if launch_env.needs_local_launch:
        code, message = launch_local_workers(config_path, launch_env)
        if message:
            write_termination_message(message)
        return code
    return _train(config, launch_env, on_progress)


def _train(config, launch_env: LaunchEnv, on_progress: ProgressHook | None) -> int:
    import torch

    from .loop import Recipe, StopRequest  # torch and transformers load here, not for a bad config
    from .progress_configmap import ConfigMapProgressReporter
    from .prometheus import PrometheusProgress

    _configure_logging(rank=launch_env.rank)
    _quiet_libraries()
    writes_message = launch_env.local_rank == 0 or os.environ.get("FINETUNE_LOCAL_WORKER") == "1"
    # Rank 0 reports: the caller's hook, plus in a pod the progress ConfigMap and the Prometheus endpoint.
    configmap = ConfigMapProgressReporter.from_env() if launch_env.rank == 0 else None
    prometheus = PrometheusProgress.from_env() if launch_env.rank == 0 else None
    hooks = [hook for hook in (on_progress, configmap, prometheus) if hook is not None]
    stop = StopRequest().install()
    recipe = Recipe(config, launch_env, stop, hooks)
    try:
        recipe.setup()
        outcome = recipe.train()
        if outcome == "stopped":
            return _finish(ExitCode.STOPPED, recipe.termination_message(outcome), writes_message)
        recipe.save_outputs()
        return _finish(ExitCode.DONE, recipe.termination_message(outcome), writes_message)
    except ConfigError as e:
        return _finish(ExitCode.PERMANENT, f"permanent error: {e}", writes_message)
    except torch.cuda.OutOfMemoryError as e:  # outside a step (a step's names its batch): loading, eval, saving
        first_line = (str(e).strip().splitlines() or [""])[0]
        message = (
            f"permanent error: CUDA out of memory while loading, evaluating or saving ({first_line}): the model "
            "does not fit this GPU with room to train (use a GPU with more memory), or an evaluation batch does "
            "not (lower training.batchSize)"
        )
        return _finish(ExitCode.PERMANENT, message, writes_message)
    except StoppedWhileWaiting as e:
        return _finish(ExitCode.STOPPED, f"{e}; nothing trained yet", writes_message)
    except KeyboardInterrupt:
        return _finish(130, "interrupted", writes_message)
    except Exception as e:
        log.exception("training failed")
        if collective_timed_out(e):
            waited = seconds_from_env(COLLECTIVE_TIMEOUT_ENV, DEFAULT_COLLECTIVE_TIMEOUT_SECONDS)
            message = (
                f"stalled: a collective waited {waited:g} s ({COLLECTIVE_TIMEOUT_ENV}) for a peer rank that did not "
                f"answer (hung, frozen or cut off); retryable: {e}"
            )
            return _finish(ExitCode.PEER_STALLED, message, writes_message)
        return _finish(ExitCode.RETRYABLE, f"error (retryable): {type(e).__name__}: {e}", writes_message)
    finally:
        recipe.cleanup()
        if configmap is not None:
            configmap.close()  # the last report goes out (or is given up on) before the process ends
        stop.uninstall()


def _finish(code: int, message: str, writes_message: bool) -> int:
    (log.info if code in (ExitCode.DONE, ExitCode.STOPPED) else log.error)("%s (exit %d)", message, code)
    if writes_message:
        write_termination_message(message)
    return code


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (run() may be called again with stderr redirected)."""

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _value: TextIO) -> None:
        pass


class _RankFormatter(logging.Formatter):
    def __init__(self, rank: int | None):
        prefix = f"rank {rank} " if rank is not None else ""
        super().__init__(f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s")


def _configure_logging(rank: int | None) -> None:
    """Log to stderr (stdout carries the JSON metric lines); rank 0 at INFO, the others WARNING."""
    handler = next((h for h in log.handlers if isinstance(h, _StderrHandler)), None)
    if handler is None:
        handler = _StderrHandler()
        log.addHandler(handler)
    handler.setFormatter(_RankFormatter(rank))
    log.setLevel(logging.INFO if not rank else logging.WARNING)


def _quiet_libraries() -> None:
    """Progress bars and deprecation chatter of transformers and peft would drown the metric lines."""
    for noisy in ("transformers", "peft"):
        warnings.filterwarnings("ignore", category=FutureWarning, module=noisy)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
