"""What a Flyte user pays today for one encoding: a plain flytekit task that loads the model and
encodes one image, returning a `torch.Tensor` (flytekit's torch transformer stores it).

Run in a fresh process per call by bench/warm_vs_cold.py, as it would run in its own pod.
"""

import torch
from flytekit import task, workflow

from flyte_cornserve.executors.encoder import _llava_vision_encoder, decode_image
from flyte_cornserve.models import resolve_model


@task
def encode(image: str) -> torch.Tensor:
    encode_images = _llava_vision_encoder(resolve_model("tiny-llava"))
    with torch.no_grad():
        return encode_images([decode_image(image)])[0]


@workflow
def encode_one(image: str) -> torch.Tensor:
    return encode(image=image)
