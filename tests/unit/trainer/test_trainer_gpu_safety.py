"""What keeps a GPU run from failing slowly: no GPU when one was asked for, out of memory, NCCL hangs."""

from __future__ import annotations

import os

import pytest
import torch

from finetune_trainer import model as model_lib
from finetune_trainer.config import LoraSpec
from finetune_trainer.contract import GPUS_PER_WORKER_ENV
from finetune_trainer.distributed import (
    FLIGHT_RECORDER_DIR,
    LaunchEnv,
    missing_gpus_message,
    nccl_environ,
    nvidia_driver_version,
)
from finetune_trainer.entrypoint import run
from tests.trainer.harness import write_config


def test_a_worker_that_asked_for_a_gpu_and_has_no_cuda_exits_2_at_once(tmp_path, monkeypatch, tiny_model, tiny_data):
    monkeypatch.setenv(GPUS_PER_WORKER_ENV, "1")
    config = write_config(tmp_path / "config.yaml", tiny_model, tiny_data, tmp_path / "out")
    assert run(str(config)) == 2
    message = (tmp_path / "termination.log").read_text()
    assert "spec.gpusPerWorker is 1 but this worker sees no CUDA device" in message
    assert f"torch {torch.__version__} is a CPU-only build" in message and "gpusPerWorker: 0" in message
    assert not (tmp_path / "out").exists()  # nothing loaded, nothing written


def test_gpus_per_worker_0_trains_on_the_cpu_as_before(tmp_path, monkeypatch, tiny_model, tiny_data):
    monkeypatch.setenv(GPUS_PER_WORKER_ENV, "0")
    config = write_config(tmp_path / "config.yaml", tiny_model, tiny_data, tmp_path / "out", maxSteps=1)
    assert run(str(config)) == 0


@pytest.mark.parametrize(
    ("requested", "processes", "devices", "expected"),
    [
        (0, 1, 0, None),
        (1, 1, 1, None),
        (8, 8, 8, None),
        (1, 1, 0, "sees no CUDA device for its 1 process"),
        (8, 8, 4, "sees 4 CUDA devices for its 8 processes"),
    ],
)
def test_missing_gpus_message(requested, processes, devices, expected):
    message = missing_gpus_message(requested, processes, devices, "13.0", "570.86.15")
    if expected is None:
        assert message is None
    else:
        assert expected in message and "built for CUDA 13.0" in message and "driver is 570.86.15" in message


def test_the_driver_version_is_read_from_the_kernel_module(tmp_path):
    version = tmp_path / "version"
    version.write_text(
        "NVRM version: NVIDIA UNIX x86_64 Kernel Module  570.86.15  Wed Jan 22 00:00:00 UTC 2025\n"
        "GCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n"
    )
    assert nvidia_driver_version(str(version)) == "570.86.15"
    assert nvidia_driver_version(str(tmp_path / "absent")) is None


def test_the_operator_tells_each_worker_its_gpus():
    from finetune_operator.api import FineTuneJob
    from finetune_operator.builders import build_worker_pod
    from finetune_operator.config import OperatorSettings

    job = FineTuneJob.model_validate(
        {
            "metadata": {"name": "j", "namespace": "n", "uid": "u"},
            "spec": {"model": "m", "dataset": {"path": "/d"}, "gpusPerWorker": 4, "workers": 2},
        }
    )
    env = {
        var["name"]: var.get("value")
        for var in build_worker_pod(job, 1, 0, OperatorSettings())["spec"]["containers"][0]["env"]
    }
    assert env[GPUS_PER_WORKER_ENV] == "4" and env["NPROC_PER_NODE"] == "4"


def test_nccl_settings_are_added_before_init_and_the_env_wins(tmp_path):
    added = nccl_environ({}, str(tmp_path))
    assert added["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert added["TORCH_NCCL_DUMP_ON_TIMEOUT"] == "1" and int(added["TORCH_NCCL_TRACE_BUFFER_SIZE"]) > 0
    assert added["NCCL_DEBUG"] == "WARN"
    assert added["TORCH_NCCL_DEBUG_INFO_TEMP_FILE"] == str(tmp_path / FLIGHT_RECORDER_DIR / "rank-")
    assert nccl_environ({"NCCL_DEBUG": "INFO"}, None).get("NCCL_DEBUG") is None
    assert "TORCH_NCCL_DEBUG_INFO_TEMP_FILE" not in nccl_environ({}, None)


def test_a_cuda_out_of_memory_in_the_step_exits_2_naming_the_tokens_and_the_knobs(
    tmp_path, monkeypatch, tiny_model, tiny_data
):
    def out_of_memory(self, input_ids, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.11 GiB total)")

    monkeypatch.setattr(model_lib.SupervisedLoss, "forward", out_of_memory)
    config = write_config(
        tmp_path / "config.yaml", tiny_model, tiny_data, tmp_path / "out", gradientAccumulationSteps=1
    )
    assert run(str(config)) == 2
    message = (tmp_path / "termination.log").read_text()
    assert message.startswith("permanent error: CUDA out of memory: a micro-batch of ")
    tokens = int(message.split("a micro-batch of ")[1].split()[0])
    assert tokens > 0
    for knob in ("training.maxTokensPerBatch", "training.gradientCheckpointing", "gradientCheckpointingEveryNLayers"):
        assert knob in message
    assert "Tried to allocate 20.00 GiB" in message


def test_lora_targets_all_linear_alone(tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    assert model_lib.lora_targets(["all-linear"], model) == "all-linear"
    assert model_lib.lora_targets(None, model) == ["q_proj", "v_proj"]  # peft's Llama default, as documented
    assert model_lib.lora_targets(["o_proj"], model) == ["o_proj"]
    with pytest.raises(ValueError, match="already adapts every linear layer"):
        LoraSpec(target_modules=["all-linear", "q_proj"])


def test_all_linear_adapts_every_projection_but_not_the_head(tmp_path, tiny_model, tiny_data):
    from finetune_trainer.config import load_trainer_config
    from finetune_trainer.loop import Recipe

    config = write_config(
        tmp_path / "config.yaml", tiny_model, tiny_data, tmp_path / "out", lora={"targetModules": ["all-linear"]}
    )
    recipe = Recipe(load_trainer_config(config), LaunchEnv())
    try:
        recipe.setup()
        adapted = {
            name.split(".")[-1] for name, module in recipe.peft_model.named_modules() if hasattr(module, "lora_A")
        }
    finally:
        recipe.cleanup()
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_deterministic_requests_deterministic_algorithms_for_the_run_only(tmp_path, monkeypatch, tiny_model, tiny_data):
    from finetune_trainer.config import load_trainer_config
    from finetune_trainer.loop import Recipe

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    config = write_config(tmp_path / "config.yaml", tiny_model, tiny_data, tmp_path / "out", deterministic=True)
    recipe = Recipe(load_trainer_config(config), LaunchEnv())
    try:
        recipe.setup()
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        recipe.cleanup()
    assert not torch.are_deterministic_algorithms_enabled()


def test_a_cuda_out_of_memory_while_loading_exits_2_too(tmp_path, monkeypatch, tiny_model, tiny_data):
    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 16.00 GiB")

    monkeypatch.setattr(model_lib, "load_model", out_of_memory)
    config = write_config(tmp_path / "config.yaml", tiny_model, tiny_data, tmp_path / "out")
    assert run(str(config)) == 2
    message = (tmp_path / "termination.log").read_text()
    assert message.startswith("permanent error: CUDA out of memory while loading, evaluating or saving")
    assert "Tried to allocate 16.00 GiB" in message
