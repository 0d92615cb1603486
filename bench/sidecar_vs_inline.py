"""Embeddings through the sidecar vs inline over vLLM's OpenAI HTTP API, in one run (issue 4).

    .venv/bin/python bench/sidecar_vs_inline.py [--requests 200] [--concurrency 16]

ours:     LLM invocations whose image embeddings were `put` into this node's sidecar; each invocation
          carries only a TensorRef, the vLLM executor fetches the tensor from shared memory.
baseline: the same embeddings sent inline, base64 of `torch.save(tensor)`, in chat requests to
          `vllm.entrypoints.openai.api_server --enable-mm-embeds` on the same model.
Both: the tiny Llava model, greedy, 64 tokens at most, `concurrency` requests in flight; the latency
of a request is from its submission to its answer. Servers are started one after the other, never
side by side, so each has the machine to itself.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import pathlib
import socket
import statistics
import subprocess
import sys
import time

import httpx
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from stack import PrivateStack  # noqa: E402

from cornserve_builtins.llm import LLMInput, LLMTask  # noqa: E402
from flyte_cornserve import redis_server  # noqa: E402
from flyte_cornserve.descriptors import descriptor_for  # noqa: E402
from flyte_cornserve.home import use_project_tmp  # noqa: E402
from flyte_cornserve.models import resolve_model  # noqa: E402
from flyte_cornserve.models.tiny import PROMPT  # noqa: E402
from flyte_cornserve.protocol.invocations import InvocationStore, State  # noqa: E402
from flyte_cornserve.sidecar.client import SidecarClient  # noqa: E402

MAX_TOKENS = 64


def embeddings(count: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(16, 64, generator=generator) * 0.1 for _ in range(count)]


async def closed_loop(concurrency: int, count: int, one) -> tuple[float, list[float]]:
    """`count` calls of `one(i)` with `concurrency` in flight; (wall seconds, latencies)."""
    latencies: list[float] = []
    next_index = iter(range(count))

    async def client() -> None:
        for i in next_index:
            started = time.perf_counter()
            await one(i)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return time.perf_counter() - started, latencies


async def through_sidecar(tensors: list[torch.Tensor], concurrency: int) -> tuple[float, list[float]]:
    task = LLMTask(model_id="tiny-llava")
    descriptor = descriptor_for(task)
    store = InvocationStore(redis_server.connect_async())
    sidecar = SidecarClient()
    refs = [sidecar.put(t) for t in tensors]

    async def one(i: int) -> None:
        payload = descriptor.encode_request(LLMInput(prompt=PROMPT, embeddings=[refs[i]]))
        payload["sampling"]["max_tokens"] = MAX_TOKENS
        record = await store.wait(await store.submit(task.deployment_id(), payload), 120)
        assert record.state == State.DONE, record.error

    return await closed_loop(concurrency, len(tensors), one)


async def inline_http(port: int, tensors: list[torch.Tensor], concurrency: int) -> tuple[float, list[float]]:
    def encoded(tensor: torch.Tensor) -> str:
        buffer = io.BytesIO()
        torch.save(tensor, buffer)
        return base64.b64encode(buffer.getvalue()).decode()

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=120) as http:
        model = (await http.get("/v1/models")).json()["data"][0]["id"]

        async def one(i: int) -> None:
            content = [{"type": "image_embeds", "image_embeds": encoded(tensors[i])}, {"type": "text", "text": PROMPT}]
            reply = await http.post("/v1/chat/completions", json={
                "model": model, "messages": [{"role": "user", "content": content}],
                "max_tokens": MAX_TOKENS, "temperature": 0,
            })
            reply.raise_for_status()

        return await closed_loop(concurrency, len(tensors), one)


def start_http_server(model_dir: pathlib.Path) -> tuple[subprocess.Popen, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
               "--host", "127.0.0.1", "--port", str(port), "--enable-mm-embeds",
               "--limit-mm-per-prompt", '{"image": 0}', "--enforce-eager", "--max-model-len", "256",
               "--dtype", "float32", "--seed", "0"]  # fmt: skip
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    server = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in server.stdout:
        if "Application startup complete" in line:
            return server, port
    raise RuntimeError(f"vLLM's HTTP server exited with {server.wait()}")


def summary(name: str, wall: float, latencies: list[float]) -> tuple[float, float, float]:
    ordered = sorted(latencies)
    p50 = statistics.median(ordered) * 1000
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1000
    throughput = len(latencies) / wall
    print(f"{name:34}{throughput:>12.1f}{p50:>10.1f}{p99:>10.1f}")
    return throughput, p50, p99


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    use_project_tmp()
    model_dir = resolve_model("tiny-llava")
    tensors = embeddings(args.requests)

    with PrivateStack() as stack:
        stack.deploy(LLMTask(model_id="tiny-llava"))
        asyncio.run(through_sidecar(tensors[:args.concurrency], args.concurrency))  # warm-up
        ours = asyncio.run(through_sidecar(tensors, args.concurrency))

    server, port = start_http_server(model_dir)
    try:
        asyncio.run(inline_http(port, tensors[:args.concurrency], args.concurrency))  # warm-up
        inline = asyncio.run(inline_http(port, tensors, args.concurrency))
    finally:
        server.terminate()
        server.wait(timeout=60)

    print(f"{'':34}{'req/s':>12}{'p50 ms':>10}{'p99 ms':>10}")
    tp_ours, p50_ours, p99_ours = summary("sidecar (TensorRef) + executor", *ours)
    tp_inline, p50_inline, p99_inline = summary("inline base64 over OpenAI HTTP", *inline)
    print(f"RESULT requests={args.requests} concurrency={args.concurrency} "
          f"ours_rps={tp_ours:.1f} inline_rps={tp_inline:.1f} throughput_ratio={tp_ours / tp_inline:.2f} "
          f"ours_p50_ms={p50_ours:.1f} ours_p99_ms={p99_ours:.1f} "
          f"inline_p50_ms={p50_inline:.1f} inline_p99_ms={p99_inline:.1f}")


if __name__ == "__main__":
    main()
