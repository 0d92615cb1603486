"""vLLM engine arguments from the task (`LLMTask.engine`, issue 13): the ones set win; unset ones are
the project's CPU settings on CPU (what every engine here ran with before) and vLLM's on a GPU."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from transformers import AutoConfig

from cornserve_builtins.llm import EngineArgs, LLMTask
from flyte_cornserve.descriptors import descriptor_for
from flyte_cornserve.executors.vllm_engine import CPU_MAX_MODEL_LEN, engine_settings, kv_cache_bytes
from flyte_cornserve.models import resolve_model
from flyte_cornserve.task import Resources


@pytest.fixture(scope="module")
def text_config():
    return AutoConfig.from_pretrained(resolve_model("tiny-llava")).text_config


def settings(task: LLMTask, text_config, gpu: bool) -> dict:
    """What the executor of `task` passes to vLLM, from the args its descriptor starts it with."""
    return engine_settings(descriptor_for(task).executor_args()["engine"], text_config, gpu, max_num_seqs=64)


def test_unset_on_cpu_are_the_projects_cpu_settings(text_config) -> None:
    tokens = min(CPU_MAX_MODEL_LEN, text_config.max_position_embeddings)
    assert settings(LLMTask(model_id="tiny-llava"), text_config, gpu=False) == {
        "dtype": "float32", "enforce_eager": True, "max_model_len": tokens, "tensor_parallel_size": 1,
        "kv_cache_memory_bytes": kv_cache_bytes(text_config, 64, tokens, 4),
    }


def test_unset_on_a_gpu_are_vllms_own(text_config) -> None:
    assert settings(LLMTask(model_id="tiny-llava"), text_config, gpu=True) == {
        "dtype": "auto", "enforce_eager": False, "max_model_len": text_config.max_position_embeddings,
        "tensor_parallel_size": 1, "gpu_memory_utilization": 0.9,
    }


def test_the_ones_set_win_and_split_the_deployment(text_config) -> None:
    engine = EngineArgs(max_model_len=128, dtype="bfloat16", enforce_eager=True, gpu_memory_utilization=0.5,
                        kv_cache_memory="1Gi", tensor_parallel_size=2)
    task = LLMTask(model_id="tiny-llava", engine=engine, resources=Resources(gpu=2))
    assert settings(task, text_config, gpu=True) == {
        "dtype": "bfloat16", "enforce_eager": True, "max_model_len": 128, "tensor_parallel_size": 2,
        "gpu_memory_utilization": 0.5, "kv_cache_memory_bytes": 2**30,
    }
    on_cpu = settings(LLMTask(model_id="tiny-llava", engine=EngineArgs(dtype="bfloat16")), text_config, gpu=False)
    assert on_cpu["kv_cache_memory_bytes"] == kv_cache_bytes(text_config, 64, on_cpu["max_model_len"], 2)
    assert task.deployment_id() != LLMTask(model_id="tiny-llava", resources=Resources(gpu=2)).deployment_id()
    # a length over the model's is the model's
    assert settings(LLMTask(model_id="tiny-llava", engine=EngineArgs(max_model_len=10**6)), text_config,
                    gpu=False)["max_model_len"] == text_config.max_position_embeddings


@pytest.mark.parametrize("config, message", [
    ({"engine": {"tensor_parallel_size": 2}}, "engine.tensor_parallel_size=2 needs resources with gpu >= 2"),
    ({"engine": {"kv_cache_memory": "lots"}}, "'lots' is not a quantity like 512Mi or 4Gi"),
    ({"engine": {"dtype": "float8"}}, "engine.dtype"),
    ({"engine": {"gpu_memory_utilization": 1.5}}, "engine.gpu_memory_utilization"),
])
def test_bad_engine_args_name_the_field(config, message) -> None:
    with pytest.raises(ValidationError) as failed:
        LLMTask(model_id="tiny-llava", **config)
    assert message in str(failed.value), str(failed.value)
