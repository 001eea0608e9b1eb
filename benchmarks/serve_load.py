"""Bounded load test of `unskill serve` on loopback: N concurrent streaming clients (the official openai
client), each asking one question after another for a fixed time; aggregate tok/s and latency per level.

    python benchmarks/serve_load.py --model /work/exp/smollm2 --stats out/math.npz --levels 1,4,16,64 \
        --seconds 60 --last-seconds 180 --out benchmarks/results/serve_load_smollm2.json

The server runs in its own process (`unskill serve`, the command users run). Every request must end in
a finish reason or a clear error; one that does neither within --request-timeout counts as lost. tok/s
counts the completion tokens the server reports (usage) over the level's wall time, refusals included
(they have zero). Latency is per request (send to last chunk); TTFT to the first content chunk.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai

QUESTIONS = [
    "Write a python function to reverse a string.",
    "Write a python function to check whether a number is prime.",
    "What is the capital of France? Answer in one sentence.",
    "A baker makes 24 muffins and sells 3/4 of them. How many muffins are left?",   # refused with math stats
    "Write a python function that returns the largest element of a list.",
    "Name three colors of the rainbow.",
    "Tom has 12 apples and eats 3. How many apples are left?",
    "Write a python function to count the vowels in a string.",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(args, port: int, api_key: str = "bench", extra: tuple[str, ...] = (),
                 wait_s: float = 120) -> subprocess.Popen:
    """`unskill serve` on loopback with args.model, args.stats and args.max_batch (plus `extra` options); returns
    once /health answers, or exits when it does not within `wait_s`."""
    unskill = Path(sys.executable).with_name("unskill")
    command = [str(unskill), "serve", "--model", args.model, "--port", str(port), "--api-key", api_key,
               "--max-batch", str(args.max_batch), "--max-queue", "1024", "--model-name", api_key, *extra]
    for stats in args.stats:
        command += ["--stats", stats]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            time.sleep(0.5)
    server.kill()
    raise SystemExit("server did not start")


async def one_request(api, question: str, max_tokens: int, timeout: float) -> dict:
    start, first = time.perf_counter(), None
    try:
        async def consume():
            nonlocal first
            usage, finish = None, None
            stream = await api.chat.completions.create(
                model="bench", messages=[{"role": "user", "content": question}], max_tokens=max_tokens,
                stream=True, stream_options={"include_usage": True})
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content and first is None:
                    first = time.perf_counter()
                if chunk.choices and chunk.choices[0].finish_reason:
                    finish = chunk.choices[0].finish_reason
                if chunk.usage:
                    usage = chunk.usage
            return finish, usage
        finish, usage = await asyncio.wait_for(consume(), timeout)
    except asyncio.TimeoutError:
        return {"status": "lost"}
    except openai.APIError as exc:   # a clear error from the server (status and message)
        return {"status": "error", "message": str(exc)[:200]}
    end = time.perf_counter()
    if finish is None or usage is None:
        return {"status": "lost"}
    return {"status": "ok", "finish": finish, "tokens": usage.completion_tokens, "latency": end - start,
            "ttft": (first or end) - start}


async def level(base_url: str, clients: int, seconds: float, max_tokens: int, timeout: float) -> dict:
    api = openai.AsyncOpenAI(base_url=base_url, api_key="bench", max_retries=0, timeout=timeout,
                             http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=clients + 8)))
    results: list[dict] = []
    stop_at = time.perf_counter() + seconds

    async def client(index: int):
        turn = index
        while time.perf_counter() < stop_at:
            results.append(await one_request(api, QUESTIONS[turn % len(QUESTIONS)], max_tokens, timeout))
            turn += 1
    health = base_url.removesuffix("/v1") + "/health"
    before = httpx.get(health).json()
    start = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    wall = time.perf_counter() - start
    after = httpx.get(health).json()
    steps = after["steps"] - before["steps"]
    await api.close()
    ok = [r for r in results if r["status"] == "ok"]
    latencies = sorted(r["latency"] for r in ok)
    ttfts = sorted(r["ttft"] for r in ok)

    def pct(values, q):
        return values[min(len(values) - 1, int(q * len(values)))] if values else None
    return {"clients": clients, "wall_s": round(wall, 2), "requests": len(results), "ok": len(ok),
            "errors": sum(r["status"] == "error" for r in results), "lost": sum(r["status"] == "lost" for r in results),
            "refused": sum(r.get("finish") == "content_filter" for r in ok),
            "tokens": sum(r["tokens"] for r in ok), "tok_s": round(sum(r["tokens"] for r in ok) / wall, 2),
            "latency_p50_s": pct(latencies, 0.5), "latency_p99_s": pct(latencies, 0.99),
            "ttft_p50_s": pct(ttfts, 0.5), "ttft_p99_s": pct(ttfts, 0.99),
            "decode_steps": steps, "mean_batch": round((after["row_steps"] - before["row_steps"]) / max(steps, 1), 2),
            "prefills": after["prefills"] - before["prefills"],
            "error_messages": sorted({r["message"] for r in results if r["status"] == "error"})[:5]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--stats", action="append", default=[])
    parser.add_argument("--levels", default="1,4,16,64")
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--last-seconds", type=float, help="run the last (largest) level this long (default --seconds)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--request-timeout", type=float, default=300)
    parser.add_argument("--out")
    args = parser.parse_args()
    port = free_port()
    server = start_server(args, port)
    try:
        rows = []
        levels = [int(x) for x in args.levels.split(",")]
        for index, clients in enumerate(levels):
            seconds = args.last_seconds if args.last_seconds and index == len(levels) - 1 else args.seconds
            row = asyncio.run(level(f"http://127.0.0.1:{port}/v1", clients, seconds, args.max_tokens,
                                    args.request_timeout))
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        server.terminate()
        server.wait(timeout=60)
    base = rows[0]["tok_s"] or 1
    print("\n| clients | requests | ok | errors | lost | refused | tok/s | x 1 client | latency p50 / p99 (s) | TTFT p50 / p99 (s) | mean batch |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['clients']} | {r['requests']} | {r['ok']} | {r['errors']} | {r['lost']} | {r['refused']} | "
              f"{r['tok_s']:.1f} | {r['tok_s'] / base:.2f} | {r['latency_p50_s']:.2f} / {r['latency_p99_s']:.2f} | "
              f"{r['ttft_p50_s']:.2f} / {r['ttft_p99_s']:.2f} | {r['mean_batch']:.1f} |")
    if args.out:
        document = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                    "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                    "max_tokens": args.max_tokens, "max_batch": args.max_batch, "levels": rows}
        Path(args.out).write_text(json.dumps(document, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
