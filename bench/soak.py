"""Soak: the stack's memory after many invocations, against its plateau after the first 1,000.

    .venv/bin/python bench/soak.py [--invocations 10000] [--wave 1000] [--concurrency 8] [--images 64]

On a private stack (bench/stack.py, as bench/batch.py starts it: an embedded redis-server and
`cornserve up --foreground`), the encoder and the LLM (tiny Llava) are deployed and driven through
one `Dispatcher` in this process with interactive `Dispatcher.run` calls, `--concurrency` at a time,
in a fixed rotation of cheap invocations:

  text     `LLMTask` on a text prompt, max_tokens=1                               (1 invocation)
  caption  `EncoderTask` on one image (its embeddings go to the sidecar), then    (2 invocations)
           `LLMTask` on the Llava prompt with those embeddings, max_tokens=1 (it consumes the tensor,
           so the sidecar's arena is freed as it is in a workflow run)

The batch path (batch runner, chunk files) is not driven here: bench/batch.py soaks it.

After every `--wave` invocations (1,000 by default) the bench samples, from /proc (psutil):
  - the RSS of every service, each the sum over its process tree: the control plane (`cornserve
    up` itself, with any child of its that is no service), the sidecar, each executor with its
    children (vLLM's engine core), and the embedded redis-server;
  - Redis's `used_memory` (INFO memory) and its key count (DBSIZE).

Plateau: the sample after the first wave (1,000 invocations), taken as is; no median. Growth = the
sample at the end / the plateau. The table also shows the largest sample seen in between. At the end
the Redis keys are grouped by prefix (ids replaced by `*`), split into keys with and without a TTL.
An ended invocation's record stays until its submitter collected it and 1,000 newer invocations were
submitted (docs/protocol.md, "Retention"): after the first wave the records in Redis should stay at
about 1,000; keys without a TTL that grow are leaks.

Last line: `RESULT invocations=N max_rss_growth=G redis_memory_growth=M redis_keys_growth=K`
(target: every growth <= 1.05); max_rss_growth is the largest over the cornserve services (control
plane, sidecar, executors); the redis-server's RSS is in the table, and follows used_memory.
The raw figures go to `$CORNSERVE_HOME/bench/soak/last.json`.
"""

from __future__ import annotations

import asyncio
import collections
import json
import pathlib
import re
import sys
import time

import click
import psutil

BENCH = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from batch import make_dataset, process_role  # noqa: E402
from stack import PrivateStack  # noqa: E402

MODEL_ID = "tiny-llava"
MiB = 1024 * 1024
TARGET = 1.05


# --- sampling ---------------------------------------------------------------------------------------

def service_rss(stack: PrivateStack) -> dict[str, int]:
    """RSS per service, each summed over its process tree. Services are the control plane's direct
    children (by role: "sidecar", "executor encoder", "executor vllm", ...; a second one of a role
    is "role #2"), the control plane itself (with children that are none of those), and the
    embedded redis-server (a child of this process)."""
    services: dict[str, int] = {}

    def tree(process: psutil.Process) -> int:
        total = 0
        for p in [process, *process.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                continue
        return total

    def add(role: str, rss: int) -> None:
        key, n = role, 1
        while key in services:
            n += 1
            key = f"{role} #{n}"
        services[key] = rss

    try:
        plane = psutil.Process(stack.process.pid)
        services["control-plane"] = plane.memory_info().rss
        for child in sorted(plane.children(), key=lambda c: c.create_time()):
            try:
                role = process_role(child)
                rss = tree(child)
            except psutil.Error:
                continue
            if role in ("sidecar",) or role.startswith("executor"):
                add(role, rss)
            else:  # resource trackers and the like: the control plane's own
                services["control-plane"] += rss
    except psutil.Error:
        pass
    for child in psutil.Process().children():
        try:
            if process_role(child) == "redis":
                add("redis-server", tree(child))
        except psutil.Error:
            continue
    return services


def redis_figures(client) -> dict[str, int]:
    """used_memory, the key count, and the keys without a TTL (those that never go by themselves)."""
    keys = list(client.scan_iter(count=1000))
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.ttl(key)
    persistent = sum(ttl < 0 for ttl in pipe.execute())
    return {"used_memory": int(client.info("memory")["used_memory"]), "keys": int(client.dbsize()),
            "keys_no_ttl": persistent}


def retained_bytes(client, sample: int = 200) -> dict[str, float]:
    """MEMORY USAGE of an ended invocation's keys (its record and events stream), averaged over
    `sample` of them, and how many records Redis holds."""
    records = []
    for key in client.scan_iter(match="cornserve:invocation:*", count=1000):
        if not key.endswith(b":events"):
            records.append(key)
        if len(records) >= sample:
            break
    usage = [(client.memory_usage(key) or 0) + (client.memory_usage(key + b":events") or 0) for key in records]
    notify = list(client.scan_iter(match="cornserve:notify:*", count=1000))
    count = sum(not key.endswith(b":events") for key in client.scan_iter(match="cornserve:invocation:*", count=1000))
    return {"per_invocation_bytes": sum(usage) / max(1, len(usage)), "sampled": len(usage), "records": count,
            "notify_streams": len(notify), "notify_entries": sum(client.xlen(key) for key in notify),
            "notify_bytes": sum(client.memory_usage(key) or 0 for key in notify)}


def key_groups(client) -> dict[str, dict[str, int]]:
    """Keys grouped by their prefix with ids (hex runs, numbers) replaced by `*`: {group: {ttl, no_ttl}}."""
    groups: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    pattern = re.compile(r"[0-9a-f]{8,}|\d+")
    keys = list(client.scan_iter(count=1000))
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.ttl(key)
    for key, ttl in zip(keys, pipe.execute()):
        name = key.decode(errors="replace") if isinstance(key, bytes) else key
        groups[pattern.sub("*", name)]["ttl" if ttl >= 0 else "no_ttl"] += 1
    return {group: dict(counts) for group, counts in sorted(groups.items(), key=lambda g: -sum(g[1].values()))}


# --- the load ---------------------------------------------------------------------------------------

async def drive(stack: PrivateStack, total: int, wave: int, concurrency: int, images: list[str],
                on_wave) -> dict:
    """Run `total` invocations (units of one or two), calling `on_wave(n)` at every multiple of
    `wave` once all invocations before it ended (units never straddle a wave boundary)."""
    from cornserve_builtins.encoder import EncoderInput, EncoderTask
    from cornserve_builtins.llm import LLMInput, LLMTask, SamplingParams

    from flyte_cornserve import redis_server
    from flyte_cornserve.models.tiny import PROMPT, llava_prompt
    from flyte_cornserve.services.dispatcher import Dispatcher

    dispatcher = Dispatcher(redis_server.connect_async(stack.url))
    encoder = EncoderTask(model_id=MODEL_ID)
    llm = LLMTask(model_id=MODEL_ID, sampling=SamplingParams(max_tokens=1))
    caption_prompt = llava_prompt(PROMPT, 1)
    counts = collections.Counter()
    latencies: dict[str, list[float]] = collections.defaultdict(list)

    async def text(i: int) -> None:
        started = time.perf_counter()
        await dispatcher.run(llm, LLMInput(prompt=f"soak text number {i}: describe a red square"))
        latencies["text"].append(time.perf_counter() - started)
        counts["text"] += 1

    async def caption(i: int) -> None:
        started = time.perf_counter()
        embedded = await dispatcher.run(encoder, EncoderInput(data=images[i % len(images)]))
        await dispatcher.run(llm, LLMInput(prompt=caption_prompt, embeddings=[embedded.embeddings]))
        latencies["caption"].append(time.perf_counter() - started)
        counts["caption"] += 1

    done = 0
    unit = 0
    while done < total:
        target = min(total, (done // wave + 1) * wave)
        semaphore = asyncio.Semaphore(concurrency)
        jobs = []

        async def guarded(job) -> None:
            async with semaphore:
                await job

        while done < target:
            if unit % 3 != 2 and target - done >= 2:  # two captions, then one text, and so on
                jobs.append(guarded(caption(unit)))
                done += 2
            else:
                jobs.append(guarded(text(unit)))
                done += 1
            unit += 1
        started = time.perf_counter()
        await asyncio.gather(*jobs)
        print(f"  {done} invocations ({time.perf_counter() - started:.1f} s for this wave)", flush=True)
        on_wave(done)
    await dispatcher.redis.aclose()
    return {"counts": dict(counts),
            "median_latency_s": {kind: sorted(values)[len(values) // 2] for kind, values in latencies.items()}}


# --- the run ----------------------------------------------------------------------------------------

@click.command()
@click.option("--invocations", default=10_000, show_default=True, help="invocations in all")
@click.option("--wave", default=1000, show_default=True, help="invocations between samples; the plateau is the first")
@click.option("--concurrency", default=8, show_default=True, help="units (text, caption) in flight at once")
@click.option("--images", "image_count", default=64, show_default=True, help="distinct images the captions rotate over")
def main(invocations: int, wave: int, concurrency: int, image_count: int) -> None:
    from flyte_cornserve.home import cornserve_home

    if invocations < 2 * wave:
        raise click.BadParameter("needs at least two waves: a plateau and an end", param_hint="--invocations")
    results = soak(invocations, wave, concurrency, image_count)
    last = cornserve_home() / "bench" / "soak" / "last.json"
    last.parent.mkdir(parents=True, exist_ok=True)
    last.write_text(json.dumps(results, indent=1))
    report(results)
    print(f"(raw figures: {last})")
    print(result_line(results))


def soak(invocations: int, wave: int, concurrency: int = 8, image_count: int = 64) -> dict:
    """Start a private stack, deploy, drive `invocations` in waves of `wave`, sample after each; the raw figures."""
    import redis

    from cornserve_builtins.encoder import EncoderTask
    from cornserve_builtins.llm import LLMTask

    from flyte_cornserve.home import cornserve_home, use_project_tmp
    from flyte_cornserve.models import resolve_model

    use_project_tmp()
    resolve_model(MODEL_ID)
    _, rows = make_dataset(cornserve_home() / "bench" / "batch" / "data-seed0", image_count)
    images = [row["images"][0] for row in rows]

    samples: list[dict] = []
    started = time.perf_counter()
    with PrivateStack() as stack:
        print("private stack up; deploying the encoder and the LLM (tiny Llava) ...", flush=True)
        stack.deploy(EncoderTask(model_id=MODEL_ID), LLMTask(model_id=MODEL_ID))
        print(f"deployed in {time.perf_counter() - started:.1f} s; {invocations} invocations in waves of {wave}",
              flush=True)
        client = redis.Redis.from_url(stack.url)

        def on_wave(n: int) -> None:
            samples.append({"invocations": n, "t_s": time.perf_counter() - started,
                            "rss": service_rss(stack), **redis_figures(client)})

        load = asyncio.run(drive(stack, invocations, wave, concurrency, images, on_wave))
        groups = key_groups(client)
        retained = retained_bytes(client)
        client.close()

    return {"invocations": invocations, "wave": wave, "concurrency": concurrency, "load": load,
            "samples": samples, "key_groups_at_end": groups, "retained": retained,
            "wall_s": time.perf_counter() - started}


def growths(results: dict) -> dict:
    first, last = results["samples"][0], results["samples"][-1]
    rss = {service: last["rss"][service] / first["rss"][service]
           for service in first["rss"].keys() & last["rss"].keys() if first["rss"][service]}
    services = {service: growth for service, growth in rss.items() if service != "redis-server"}
    return {"rss": rss, "max_service_rss": max(services.values()),
            "used_memory": last["used_memory"] / first["used_memory"],
            "keys": last["keys"] / max(1, first["keys"]),
            "keys_no_ttl": last["keys_no_ttl"] / max(1, first["keys_no_ttl"])}


def report(results: dict) -> None:
    samples = results["samples"]
    first, last = samples[0], samples[-1]
    grown = growths(results)
    print(f"\nplateau: the sample after {first['invocations']} invocations; end: after {last['invocations']}")
    print(f"load: {results['load']['counts']}, median latency "
          + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in results["load"]["median_latency_s"].items()))
    print(f"\n{'service':24}{'at ' + str(first['invocations']):>12}{'max between':>13}"
          f"{'at ' + str(last['invocations']):>12}{'growth':>9}")
    services = sorted(first["rss"].keys() | last["rss"].keys())
    for service in services:
        a, b = first["rss"].get(service), last["rss"].get(service)
        peak = max((s["rss"].get(service, 0) for s in samples), default=0)
        growth = grown["rss"].get(service)
        flag = "" if growth is None or growth <= TARGET else "  > 1.05"
        print(f"{service + ' RSS MiB':24}{_fmt(a, MiB):>12}{_fmt(peak, MiB):>13}{_fmt(b, MiB):>12}"
              f"{_ratio(growth):>9}{flag}")
    for field, label, unit in (("used_memory", "redis used_memory MiB", MiB), ("keys", "redis keys", 1),
                               ("keys_no_ttl", "redis keys without TTL", 1)):
        peak = max(s[field] for s in samples)
        flag = "" if grown[field] <= TARGET else "  > 1.05"
        print(f"{label:24}{_fmt(first[field], unit):>12}{_fmt(peak, unit):>13}{_fmt(last[field], unit):>12}"
              f"{_ratio(grown[field]):>9}{flag}")
    print("\nper wave (MiB; keys):")
    print(f"{'invocations':>12}" + "".join(f"{service[:14]:>16}" for service in services)
          + f"{'used_memory':>13}{'keys':>9}{'no TTL':>8}")
    for s in samples:
        print(f"{s['invocations']:>12}" + "".join(f"{_fmt(s['rss'].get(service), MiB):>16}" for service in services)
              + f"{_fmt(s['used_memory'], MiB, '.2f'):>13}{s['keys']:>9}{s['keys_no_ttl']:>8}")
    print("\nredis keys at the end, by prefix (ttl = expires by itself; no ttl = stays):")
    for group, counts in list(results["key_groups_at_end"].items())[:15]:
        print(f"  {group:60}{counts.get('ttl', 0):>8} ttl{counts.get('no_ttl', 0):>8} no ttl")
    retained = results["retained"]
    added = last["invocations"] - first["invocations"]
    print(f"an ended invocation's record + events stream: {retained['per_invocation_bytes']:.0f} B (MEMORY USAGE, "
          f"mean of {retained['sampled']}); {retained['records']} records in Redis at the end, after {added} "
          f"invocations since the plateau; used_memory grew by {(last['used_memory'] - first['used_memory']) / MiB:.2f} MiB")
    print(f"notify streams (a submitter's completions; its reader trims what it read): "
          f"{retained['notify_streams']} holding {retained['notify_entries']} entries, "
          f"{retained['notify_bytes'] / MiB:.2f} MiB")
    print("max_rss_growth is over the cornserve services (control plane, sidecar, executors); the redis-server's "
          "RSS follows used_memory")


def result_line(results: dict) -> str:
    grown = growths(results)
    return (f"RESULT invocations={results['samples'][-1]['invocations']} "
            f"max_rss_growth={grown['max_service_rss']:.3f} redis_memory_growth={grown['used_memory']:.3f} "
            f"redis_keys_growth={grown['keys']:.3f}")


def _fmt(value: float | None, unit: float, spec: str = ".0f") -> str:
    return "n/a" if value is None else format(value / unit, spec)


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    sys.exit(main())
