"""The encoder executor: a vision encoder (Llava-style tower + projector, or any HF vision model)
or a text encoder (mean-pooled sentence embeddings), batched, writing embeddings to the sidecar.

Images are fetched here, from wherever the reference points (`media`): image bytes never travel
through Redis. Embeddings never go back through Redis either: each is `put` into the node's sidecar
and only its `TensorRef` is the invocation's output.
"""

from __future__ import annotations

import asyncio
import io
import pathlib
import re
from typing import Any, Protocol

from pydantic import ValidationError

from flyte_cornserve.descriptors import TaskExecutionDescriptor
from flyte_cornserve.models import resolve_model
from flyte_cornserve.phases import LOADING_WEIGHTS, phase
from flyte_cornserve.protocol.invocations import ErrorKind, Invocation, Outcome, Priority
from flyte_cornserve.sidecar.client import Transfer
from flyte_cornserve.task import TensorRef

from .handler import Handler
from .media import MediaError, read_bytes


#: How long an output stays in its sidecar as cache once its consumer released it: none yet. Its id
#: is random, so nothing could find it again; content-addressed ids (docs/architecture.md, "Tensor
#: lifetime", step 2) will make a cached output a hit.
OUTPUT_TTL_S = 0.0


class TensorStore(Protocol):
    """The part of the sidecar client an encoder needs."""

    def put_many(self, tensors: list[Any], *, ttl: float, trace: list[Transfer] | None = None) -> list[TensorRef]: ...


class BadItem(ValueError):
    """This item cannot be encoded (missing or undecodable image, ...): that invocation's error."""

    def __init__(self, message: str, recoverable: bool = False) -> None:
        super().__init__(message)
        self.kind = ErrorKind.RECOVERABLE if recoverable else ErrorKind.USER


def decode_image(reference: str):
    """A PIL image from a reference `media.read_bytes` reads (a path, a URL, a data: URL)."""
    from PIL import Image, UnidentifiedImageError

    try:
        raw = read_bytes(reference)
    except MediaError as exc:
        raise BadItem(str(exc), exc.recoverable) from None
    try:
        image = Image.open(io.BytesIO(raw))  # reads the header only: no pixel is decoded yet
        _check_pixels(reference, image.size)
        image.load()
        return image.convert("RGB")
    except BadItem:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:  # (the warning if made an error)
        raise BadItem(_too_large(reference, exc)) from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise BadItem(f"undecodable image {reference[:200]!r}: {exc}") from None


def _check_pixels(reference: str, size: tuple[int, int]) -> None:
    """Refuse, before decoding it, an image over PIL's pixel limit (`Image.MAX_IMAGE_PIXELS`): PIL
    itself refuses one over twice that at `Image.open`, and only warns below."""
    from PIL import Image

    limit, pixels = Image.MAX_IMAGE_PIXELS, size[0] * size[1]
    if limit is not None and pixels > limit:
        raise BadItem(f"image {reference[:200]!r} is too large: {size[0]}x{size[1]} = {pixels} pixels, over the "
                      f"limit of {limit} pixels (a decompression bomb?)")


def _too_large(reference: str, exc: Exception) -> str:
    """The message for PIL's refusal at `Image.open` (which says how many pixels, not the size)."""
    from PIL import Image

    pixels = re.search(r"\((\d+) pixels\)", str(exc))
    if pixels is None or Image.MAX_IMAGE_PIXELS is None:
        return f"image {reference[:200]!r} is too large: {exc}"
    return (f"image {reference[:200]!r} is too large: {pixels[1]} pixels, over the limit of "
            f"{Image.MAX_IMAGE_PIXELS} pixels (a decompression bomb?)")


class EncoderHandler(Handler):
    max_batch_size = 64
    max_wait_s = 0.0  # items queued while it encodes make the next batch; batches of a batch come whole
    max_in_flight = 64

    def __init__(self, descriptor: TaskExecutionDescriptor, store: TensorStore) -> None:
        args = descriptor.executor_args()
        self.model_id: str = args["model_id"]
        self.modality: str = args["modality"]
        self.input_model, _ = descriptor.task.io_models()
        self.store = store
        self._encode = None

    async def start(self) -> None:
        self._encode = await asyncio.to_thread(self._load)

    def _load(self):
        """Phases: building the model (a tiny one, on first use), loading weights. No warm-up: the
        first encode costs a few milliseconds more than the next ones, not worth a phase."""
        path = resolve_model(self.model_id)
        with phase(LOADING_WEIGHTS):
            import torch
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(path)
            torch.set_grad_enabled(False)
            # One thread: batches of small images gain little from more, and a second OpenMP thread
            # sharing a core with another busy process (vLLM's worker spins between its steps) stalls
            # every parallel region at its barrier: an encode took 90 ms instead of 5.
            torch.set_num_threads(1)
            if self.modality == "text":
                return _text_encoder(path)
            if hasattr(config, "vision_config") and hasattr(config, "text_config"):
                return _llava_vision_encoder(path)
            return _plain_vision_encoder(path)

    async def handle(self, batch: list[Invocation]) -> list[Outcome]:
        return await asyncio.to_thread(self._handle, batch)  # fetching, decoding, encoding: off the loop

    def _handle(self, batch: list[Invocation]) -> list[Outcome]:
        items: dict[int, Any] = {}
        outcomes: list[Outcome | None] = [None] * len(batch)
        for i, invocation in enumerate(batch):
            try:
                data = self.input_model.model_validate(invocation.input).data
                items[i] = decode_image(data) if self.modality == "image" else data
            except ValidationError as exc:
                outcomes[i] = Outcome.failed(f"invalid input: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}")
            except BadItem as exc:
                outcomes[i] = Outcome.failed(str(exc), exc.kind)
        if items:
            try:
                self._encode_and_store(batch, items, outcomes)
            except Exception:  # noqa: BLE001  one bad item must not fail its batch: each alone, then
                self._one_by_one(batch, items, outcomes)
        return outcomes  # type: ignore[return-value]

    def _encode_and_store(self, batch: list[Invocation], items: dict[int, Any], outcomes: list[Outcome | None]) -> None:
        trace: list[Transfer] = []
        refs = self.store.put_many([tensor.contiguous() for tensor in self._encode(list(items.values()))],
                                   ttl=OUTPUT_TTL_S, trace=trace)
        for (i, ref), transfer in zip(zip(items, refs, strict=True), trace, strict=True):
            # an interactive invocation's outcome keeps its tensor's transfer, for its deck
            kept = (transfer.to_json(),) if batch[i].priority is Priority.INTERACTIVE else ()
            outcomes[i] = Outcome(output={"embeddings": ref.model_dump(mode="json")}, transfers=kept)

    def _one_by_one(self, batch: list[Invocation], items: dict[int, Any], outcomes: list[Outcome | None]) -> None:
        """The batch failed: encode and store each item alone, so only the items at fault fail.

        An item that cannot be encoded alone is its input's fault (a user error), unless none of
        several could (the model, not the inputs: recoverable); one whose embeddings cannot be
        stored met the sidecar's trouble (recoverable)."""
        unencodable: list[tuple[int, str]] = []
        for i, item in items.items():
            try:
                tensors = [tensor.contiguous() for tensor in self._encode([item])]
            except Exception as exc:  # noqa: BLE001
                unencodable.append((i, f"{type(exc).__name__}: {exc}"))
                continue
            try:
                trace: list[Transfer] = []
                (ref,) = self.store.put_many(tensors, ttl=OUTPUT_TTL_S, trace=trace)
            except Exception as exc:  # noqa: BLE001
                outcomes[i] = Outcome.failed(f"could not store the embeddings: {type(exc).__name__}: {exc}",
                                             ErrorKind.RECOVERABLE)
                continue
            kept = (trace[0].to_json(),) if batch[i].priority is Priority.INTERACTIVE and trace else ()
            outcomes[i] = Outcome(output={"embeddings": ref.model_dump(mode="json")}, transfers=kept)
        kind = ErrorKind.RECOVERABLE if len(items) > 1 and len(unencodable) == len(items) else ErrorKind.USER
        for i, error in unencodable:
            what = f"image {self._reference(batch[i])[:200]!r}" if self.modality == "image" else "text"
            outcomes[i] = Outcome.failed(f"cannot encode {what}: {error[:500]}", kind)

    def _reference(self, invocation: Invocation) -> str:
        return str(invocation.input.get("data", ""))


def _llava_vision_encoder(path: pathlib.Path):
    """Vision tower + projector of a Llava-style checkpoint: exactly what the LLM's image slots take."""
    from transformers import AutoImageProcessor, LlavaForConditionalGeneration

    processor = AutoImageProcessor.from_pretrained(path)
    model = LlavaForConditionalGeneration.from_pretrained(path).eval()
    model.lm_head = None  # only the vision side is used here
    model.model.language_model = None

    def encode(images: list) -> list:
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        features = model.get_image_features(pixel_values=pixels)
        features = getattr(features, "pooler_output", features)
        return list(features)

    return encode


def _plain_vision_encoder(path: pathlib.Path):
    from transformers import AutoImageProcessor, AutoModel

    processor = AutoImageProcessor.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()

    def encode(images: list) -> list:
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        return list(model(pixel_values=pixels).last_hidden_state)

    return encode


def _text_encoder(path: pathlib.Path):
    """Sentence embeddings: the mean of the last hidden states over the real (unpadded) tokens."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()

    def encode(texts: list[str]) -> list:
        tokens = tokenizer(texts, return_tensors="pt", padding=True, truncation=True)
        hidden = model(**tokens).last_hidden_state
        mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return list((hidden * mask).sum(1) / mask.sum(1))

    return encode
