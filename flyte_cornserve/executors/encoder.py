"""The encoder executor: a vision encoder (Llava-style tower + projector, or any HF vision model)
or a text encoder (mean-pooled sentence embeddings), batched, writing embeddings to the sidecar.

Images are fetched here, from wherever the reference points (`media`): image bytes never travel
through Redis. Embeddings never go back through Redis either: each is `put` into the node's sidecar
and only its `TensorRef` is the invocation's output.

Outputs are content-addressed (`content_ids`): an item's id hashes the deployment's output identity
and the bytes fetched (or the text), so that the same content is encoded once while its tensor is in
a sidecar. In a batch, equal ids are encoded once. An id already stored is a hit: pinned once per
item, not encoded. Each other id is claimed, and only its claimer encodes it (single flight); an id
another encoder has claimed is waited for, then pinned, or claimed in turn if that encoder died.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import os
import pathlib
import re
import logging
import socket
import threading
import time
import uuid
from typing import Any, Protocol

import redis
from pydantic import ValidationError

from flyte_cornserve.descriptors import TaskExecutionDescriptor
from flyte_cornserve.metrics import ExecutorMetrics, TensorCacheMetrics
from flyte_cornserve.models import resolve_model
from flyte_cornserve.phases import LOADING_WEIGHTS, phase
from flyte_cornserve.protocol.invocations import ErrorKind, Invocation, Outcome, Priority
from flyte_cornserve.sidecar.client import Transfer
from flyte_cornserve.sidecar.errors import TensorIdTaken
from flyte_cornserve.task import TensorRef

from flyte_cornserve import redis_server
from flyte_cornserve.protocol.content import content_digest, content_id, count_lookups, tensor_source

from .content_ids import output_identity
from .handler import Handler
from .media import MediaError, read_bytes

log = logging.getLogger(__name__)

#: Part of the outputs' identity: bump it with any change here that changes the embeddings of the
#: same model and input, so that outputs computed before are not found again.
ENCODER_VERSION = 1

#: How long an output stays in its sidecar as cache once its consumers released it (unless its room
#: is needed first): a request for the same content meanwhile is a hit.
CACHED_TTL_S = 600.0

#: How long a claim on an id lasts: longer than encoding and storing a batch. An encoder that dies
#: holding claims delays those waiting for them this long at most; one slower than this loses only
#: single flight (a waiter encodes too, and the second put finds the first's tensor: a hit).
CLAIM_TTL_S = 10.0

#: How long a batch waits for another encoder's output before it looks again (stored? claim gone?).
WAIT_SLICE_S = 1.0

#: Marks the items whose task turned the tensor cache off (`TaskOptions.tensor_cache`): no content id.
UNCACHED = "~"

#: The `op` and `path` of an item's transfer (in its deck) when its embeddings were found stored, not put.
HIT, CACHE = "hit", "cache"


class TensorStore(Protocol):
    """The part of the sidecar client (`SidecarClient`) an encoder needs."""

    def put_many(self, tensors: list[Any], *, pins: int, ttl: float, ids: list[str | None] | None = None,
                 trace: list[Transfer] | None = None) -> list[TensorRef]: ...

    def pin_many(self, ids: list[str], pins: int | list[int] = 1) -> list[TensorRef | None]: ...

    def claim_many(self, ids: list[str], claimer: str, ttl: float) -> list[bool]: ...

    def unclaim_many(self, ids: list[str], claimer: str) -> None: ...

    def wait_published(self, id: str, timeout: float) -> bool: ...


class BadItem(ValueError):
    """This item cannot be encoded (missing or undecodable image, ...): that invocation's error."""

    def __init__(self, message: str, recoverable: bool = False) -> None:
        super().__init__(message)
        self.kind = ErrorKind.RECOVERABLE if recoverable else ErrorKind.USER


def read_image(reference: str) -> bytes:
    """The bytes behind an image reference (a path, a URL, a data: URL: what `media.read_bytes` reads)."""
    try:
        return read_bytes(reference)
    except MediaError as exc:
        raise BadItem(str(exc), exc.recoverable) from None


def decode_image(raw: bytes, reference: str):
    """A PIL image from the bytes `read_image` read for `reference` (which the errors name)."""
    from PIL import Image, UnidentifiedImageError

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
        self._producer = descriptor.task.compact_json()  # what its outputs' refs name as their producer
        self.deployment_id = descriptor.task.deployment_id()
        self._encode = None
        self._cache: TensorCacheMetrics | None = None
        self._counted = threading.local()  # this thread's batch: [hits, misses, bytes saved]
        self._redis: redis.Redis | None = None  # where the deployment's lookups are counted

    def instrument(self, metrics: ExecutorMetrics) -> None:
        self._cache = TensorCacheMetrics(metrics)

    async def start(self) -> None:
        self._redis = redis_server.connect()
        self._encode = await asyncio.to_thread(self._load)

    async def stop(self) -> None:
        if self._redis is not None:
            self._redis.close()

    def _load(self):
        """Phases: downloading the model (one not in the Hugging Face cache) or building it (a tiny
        one, on first use), loading weights. No warm-up: the first encode costs a few milliseconds
        more than the next ones, not worth a phase."""
        path = resolve_model(self.model_id)
        self.output_identity = output_identity(self.model_id, self.modality, path, ENCODER_VERSION)
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
        return await asyncio.to_thread(self._handle, batch)  # fetching, hashing, decoding, encoding: off the loop

    def _handle(self, batch: list[Invocation]) -> list[Outcome]:
        self._counted.items = [0, 0, 0]
        try:
            return self._handle_counted(batch)
        finally:
            self._publish_counts(*self._counted.items)

    def _publish_counts(self, hits: int, misses: int, bytes_saved: int) -> None:
        """Add the batch's lookups to the deployment's counts in Redis (`cornserve status`)."""
        if not (hits or misses):
            return
        try:
            with self._redis.pipeline(transaction=False) as pipe:
                count_lookups(pipe, self.deployment_id, hits, misses, bytes_saved)
                pipe.execute()
        except redis.RedisError as exc:  # counts are for people; the outcomes stand
            log.warning("could not count %d hits and %d misses: %s", hits, misses, exc)

    def _handle_counted(self, batch: list[Invocation]) -> list[Outcome]:
        contents: dict[int, bytes] = {}
        digests: dict[int, str] = {}
        outcomes: list[Outcome | None] = [None] * len(batch)
        for i, invocation in enumerate(batch):
            try:
                data = self.input_model.model_validate(invocation.input).data
                contents[i] = read_image(data) if self.modality == "image" else data.encode()
            except ValidationError as exc:
                outcomes[i] = Outcome.failed(f"invalid input: {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']}")
            except BadItem as exc:
                outcomes[i] = Outcome.failed(str(exc), exc.kind)
        todo: dict[str, list[int]] = {}  # content id (or UNCACHED + index) -> the items that have it
        for i, content in contents.items():
            digests[i] = content_digest(content)
            key = content_id(self.output_identity, digests[i]) if batch[i].tensors.cache else f"{UNCACHED}{i}"
            todo.setdefault(key, []).append(i)
        claimer = f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"  # this batch, in its claims
        try:
            while todo:
                todo = self._serve(batch, contents, todo, outcomes, claimer)
        except Exception as exc:  # noqa: BLE001  Redis away beyond its client's retries: what is served stays so
            for i, outcome in enumerate(outcomes):
                if outcome is None:
                    outcomes[i] = Outcome.failed(f"could not look the embeddings up: {type(exc).__name__}: {exc}",
                                                 ErrorKind.RECOVERABLE)
        return [self._with_source(outcome, batch[i], digests.get(i)) for i, outcome in enumerate(outcomes)]

    def _with_source(self, outcome: Outcome, invocation: Invocation, digest: str | None) -> Outcome:
        """The outcome, its ref saying how to compute it again from this item's own input."""
        if outcome.output is None or digest is None:
            return outcome
        reference = self._reference(invocation) if self.modality == "image" else None
        ref = dict(outcome.output["embeddings"], source=tensor_source(self._producer, reference, digest))
        return dataclasses.replace(outcome, output={"embeddings": TensorRef.model_validate(ref).model_dump(mode="json")})

    def _serve(self, batch: list[Invocation], contents: dict[int, bytes], todo: dict[str, list[int]],
               outcomes: list[Outcome | None], claimer: str) -> dict[str, list[int]]:
        """Serve the ids that can be served now: those stored (hits), those this batch claims
        (encoded and stored here) and the items whose task turned the cache off (encoded, stored
        under a fresh id). Returns the others: claimed by another encoder (once waited a while for
        one of them), or stored by another one meanwhile (hits next time)."""
        mine = {key: todo.pop(key) for key in [key for key in todo if key.startswith(UNCACHED)]}
        ids = list(todo)
        if ids:
            began, clock = time.time(), time.perf_counter()
            found = self.store.pin_many(ids, [self._pins(batch, todo[key]) for key in ids])
            seconds = time.perf_counter() - clock
            for key, ref in zip(ids, found, strict=True):
                if ref is not None:
                    hit = Transfer(HIT, ref.id, tuple(ref.shape), ref.dtype, ref.nbytes, CACHE, seconds, began)
                    self._served(batch, todo.pop(key), ref, hit, outcomes)
        ids = list(todo)
        if ids:
            mine |= {key: todo.pop(key) for key, won in zip(ids, self.store.claim_many(ids, claimer, CLAIM_TTL_S),
                                                            strict=True) if won}
        if mine:
            claimed = [key for key in mine if not key.startswith(UNCACHED)]
            try:
                todo.update(self._encode_and_store(batch, contents, mine, outcomes))
            finally:
                if claimed:
                    self.store.unclaim_many(claimed, claimer)
        elif todo:
            self.store.wait_published(next(iter(todo)), WAIT_SLICE_S)
        return todo

    @staticmethod
    def _pins(batch: list[Invocation], indices: list[int]) -> int:
        """The pins one tensor gets for these items: each item's consumers."""
        return sum(batch[i].pins for i in indices)

    def _encode_and_store(self, batch: list[Invocation], contents: dict[int, bytes], mine: dict[str, list[int]],
                          outcomes: list[Outcome | None]) -> dict[str, list[int]]:
        """Encode each claimed id once, from its items' content, and store its tensor. Returns the ids
        whose tensor another encoder stored first."""
        inputs: dict[str, Any] = {}
        items: dict[str, list[int]] = {}
        for key, indices in mine.items():
            for n, i in enumerate(indices):  # equal bytes decode alike; a failure names its own item's reference
                try:
                    inputs[key] = self._decode(contents[i], batch[i])
                except BadItem as exc:
                    outcomes[i] = Outcome.failed(str(exc), exc.kind)
                    continue
                items[key] = indices[n:]
                break
        if not inputs:
            return {}
        try:
            tensors = dict(zip(inputs, [tensor.contiguous() for tensor in self._encode(list(inputs.values()))],
                               strict=True))
        except Exception:  # noqa: BLE001  one bad item must not fail its batch: each alone, then
            tensors = self._encode_one_by_one(batch, inputs, items, outcomes)
        return self._store(batch, tensors, items, outcomes)

    def _decode(self, raw: bytes, invocation: Invocation) -> Any:
        return decode_image(raw, self._reference(invocation)) if self.modality == "image" else raw.decode()

    def _encode_one_by_one(self, batch: list[Invocation], inputs: dict[str, Any], items: dict[str, list[int]],
                           outcomes: list[Outcome | None]) -> dict[str, Any]:
        """The batch's encode failed: encode each input alone, so only the items at fault fail.

        An input that cannot be encoded alone is its items' fault (a user error), unless none of
        several could (the model, not the inputs: recoverable)."""
        tensors: dict[str, Any] = {}
        unencodable: list[tuple[str, str]] = []
        for key, item in inputs.items():
            try:
                (tensor,) = self._encode([item])
            except Exception as exc:  # noqa: BLE001
                unencodable.append((key, f"{type(exc).__name__}: {exc}"))
                continue
            tensors[key] = tensor.contiguous()
        kind = ErrorKind.RECOVERABLE if len(inputs) > 1 and len(unencodable) == len(inputs) else ErrorKind.USER
        for key, error in unencodable:
            for i in items[key]:
                what = f"image {self._reference(batch[i])[:200]!r}" if self.modality == "image" else "text"
                outcomes[i] = Outcome.failed(f"cannot encode {what}: {error[:500]}", kind)
        return tensors

    def _store(self, batch: list[Invocation], tensors: dict[str, Any], items: dict[str, list[int]],
               outcomes: list[Outcome | None]) -> dict[str, list[int]]:
        """Put each tensor under its id, pinned once per consumer of its items (one `put_many` per
        pin count and TTL); a put that fails is tried again tensor by tensor, so only the tensors at
        fault fail (their sidecar's trouble: recoverable). Returns the ids whose tensor another
        encoder had put first."""
        groups: dict[tuple[int, float], list[str]] = {}
        for key in tensors:
            groups.setdefault((self._pins(batch, items[key]), self._ttl(batch, key, items[key])), []).append(key)
        raced: dict[str, list[int]] = {}
        for (pins, ttl), keys in groups.items():
            try:
                self._put(batch, tensors, keys, pins, ttl, items, outcomes)
            except Exception:  # noqa: BLE001  one at fault must not fail the others: each alone, then
                raced |= self._put_one_by_one(batch, tensors, keys, pins, ttl, items, outcomes)
        return raced

    @staticmethod
    def _ttl(batch: list[Invocation], key: str, indices: list[int]) -> float:
        """How long the tensor stays as cache once released: the longest its items' tasks ask for;
        none for a fresh id that consumers will release (nobody else can look it up)."""
        if key.startswith(UNCACHED) and any(batch[i].pins for i in indices):
            return 0.0
        return max(CACHED_TTL_S if batch[i].tensors.ttl_s is None else batch[i].tensors.ttl_s for i in indices)

    def _put_one_by_one(self, batch: list[Invocation], tensors: dict[str, Any], keys: list[str], pins: int,
                        ttl: float, items: dict[str, list[int]], outcomes: list[Outcome | None]) -> dict[str, list[int]]:
        raced: dict[str, list[int]] = {}
        for key in keys:
            try:
                self._put(batch, tensors, [key], pins, ttl, items, outcomes)
            except TensorIdTaken:  # the same content, put by another encoder meanwhile: a hit
                raced[key] = items[key]
            except Exception as exc:  # noqa: BLE001
                for i in items[key]:
                    outcomes[i] = Outcome.failed(f"could not store the embeddings: {type(exc).__name__}: {exc}",
                                                 ErrorKind.RECOVERABLE)
        return raced

    def _put(self, batch: list[Invocation], tensors: dict[str, Any], keys: list[str], pins: int, ttl: float,
             items: dict[str, list[int]], outcomes: list[Outcome | None]) -> None:
        trace: list[Transfer] = []
        ids = [None if key.startswith(UNCACHED) else key for key in keys]
        refs = self.store.put_many([tensors[key] for key in keys], pins=pins, ttl=ttl, ids=ids, trace=trace)
        for key, ref, transfer in zip(keys, refs, trace, strict=True):
            self._served(batch, items[key], ref, transfer, outcomes)

    def _served(self, batch: list[Invocation], indices: list[int], ref: TensorRef, transfer: Transfer,
                outcomes: list[Outcome | None]) -> None:
        """Items `indices` have the embeddings `ref`: the first one by `transfer` (its put here, or a
        hit), the others by a hit."""
        hit = transfer if transfer.op == HIT else dataclasses.replace(transfer, op=HIT, path=CACHE)
        for n, i in enumerate(indices):
            # an interactive invocation's outcome keeps its tensor's transfer, for its deck
            kept = ((hit if n else transfer).to_json(),) if batch[i].priority is Priority.INTERACTIVE else ()
            outcomes[i] = Outcome(output={"embeddings": ref.model_dump(mode="json")}, transfers=kept)
        hits = len(indices) - (transfer.op != HIT)
        self._cache.misses.inc(len(indices) - hits)
        self._cache.hits.inc(hits)
        self._cache.bytes_saved.inc(hits * ref.nbytes)
        counted = self._counted.items
        counted[0], counted[1], counted[2] = counted[0] + hits, counted[1] + len(indices) - hits, counted[2] + hits * ref.nbytes

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
