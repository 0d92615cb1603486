"""The encoder's other model kinds: a plain Hugging Face vision model, and a text encoder."""

from __future__ import annotations

import random

import pytest
import redis.asyncio as aioredis
import torch
from PIL import Image

from cornserve_builtins.encoder import EncoderTask, Modality
from flyte_cornserve.models import resolve_model
from flyte_cornserve.models.tiny import draw
from flyte_cornserve.protocol.invocations import InvocationStore, State
from flyte_cornserve.task import TensorRef

from .conftest import run
from .test_encoder import data_url


@pytest.fixture(scope="module")
def clip_vision_dir(tiny_llava, tmp_path_factory):
    """A standalone CLIP vision checkpoint (the tiny Llava's tower), as any HF vision model id would be."""
    from transformers import AutoImageProcessor, CLIPVisionModel, LlavaForConditionalGeneration

    target = tmp_path_factory.mktemp("clip-vision")
    llava = LlavaForConditionalGeneration.from_pretrained(tiny_llava)
    tower = CLIPVisionModel(llava.config.vision_config)
    tower.load_state_dict(llava.model.vision_tower.state_dict())
    tower.save_pretrained(target)
    AutoImageProcessor.from_pretrained(tiny_llava).save_pretrained(target)
    return target


def encode(redis_url: str, task: EncoderTask, data: str, sidecar_client) -> torch.Tensor:
    async def submit():
        store = InvocationStore(aioredis.Redis.from_url(redis_url))
        return await store.wait(await store.submit(task.deployment_id(), {"data": data}, timeout_s=60), 60)

    record = run(submit())
    assert record.state == State.DONE, record.error
    ref = TensorRef.model_validate(record.output["embeddings"])
    tensor = sidecar_client.get(ref, timeout=30).clone()
    sidecar_client.release(ref)
    return tensor


def test_a_plain_vision_model_gives_its_last_hidden_state(executors, clip_vision_dir, redis_url, sidecar_client):
    from transformers import AutoImageProcessor, CLIPVisionModel

    task = EncoderTask(model_id=str(clip_vision_dir))
    executors.start(task)
    image = draw("blue", "circle", "yellow", random.Random(5))
    got = encode(redis_url, task, data_url(image), sidecar_client)

    processor = AutoImageProcessor.from_pretrained(clip_vision_dir)
    model = CLIPVisionModel.from_pretrained(clip_vision_dir).eval()
    with torch.no_grad():
        expected = model(pixel_values=processor(images=Image.fromarray(image), return_tensors="pt")["pixel_values"]).last_hidden_state[0]
    assert got.shape == (17, 64)  # CLS + 16 patches
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_a_text_encoder_gives_mean_pooled_sentence_embeddings(executors, redis_url, sidecar_client):
    from transformers import AutoModel, AutoTokenizer

    task = EncoderTask(model_id="tiny-llama", modality=Modality.TEXT)
    executors.start(task)
    sentence = "a red square on a white background"
    got = encode(redis_url, task, sentence, sidecar_client)

    path = resolve_model("tiny-llama")
    tokens = AutoTokenizer.from_pretrained(path)(sentence, return_tensors="pt")
    with torch.no_grad():
        expected = AutoModel.from_pretrained(path).eval()(**tokens).last_hidden_state[0].mean(0)
    assert got.shape == (64,)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, encode(redis_url, task, "a blue circle", sidecar_client))
