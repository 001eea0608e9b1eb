"""Soak test of `unskill serve` on loopback: rounds of 64 concurrent normal streams with hostile traffic beside
them (bad seeds, underflowing temperatures, oversized and chunked bodies, invalid UTF-8, bad JSON, clients
that disconnect mid-stream) for a fixed time, watching the server's resident memory.

    python benchmarks/soak.py --model /work/cache/smollm2 --stats out/math.npz --minutes 30 \
        --out benchmarks/results/soak_smollm2.json

Every normal request must end with a finish reason and [DONE] (an answer or a refusal); one that errors, breaks
off or times out counts as lost. Every hostile request must get its expected status (400, 413, or 200 for the
temperature that underflows) in OpenAI's error shape. RSS is read from /proc after the first (warm-up) round
and at the end; the target is an end value within 10 % of the warm-up one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve_load  # noqa: E402
from serve_load import QUESTIONS, free_port  # noqa: E402

KEY = "soak"


def start_server(args, port: int):
    extra = ("--max-tokens", "256") + (("--threads", str(args.threads)) if args.threads else ())
    return serve_load.start_server(args, port, api_key=KEY, extra=extra, wait_s=180)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def chat(content, **fields) -> bytes:
    return json.dumps({"model": "soak", "messages": [{"role": "user", "content": content}], **fields}).encode()


def chunked_body():
    async def chunks():
        for _ in range(32):
            yield b" " * (64 << 10)   # 2 MB with no content-length
    return chunks()


# (name, body, expected status): this cases, each sent while normal streams run.
HOSTILE = [
    ("seed -1", lambda: chat("Write a python function.", temperature=0.7, seed=-1, max_tokens=8), 400),
    ("seed 2**64", lambda: chat("Write a python function.", temperature=0.7, seed=2 ** 64, max_tokens=8), 400),
    ("temperature 5e-324", lambda: chat("Name a color.", temperature=5e-324, seed=1, max_tokens=8), 200),
    ("invalid UTF-8", lambda: b'{"messages": [{"role": "user", "content": "caf\xe9 \xff"}]}', 400),
    ("2 MB chunked", chunked_body, 413),
    ("bad JSON", lambda: b'{"messages": [', 400),
    ("max_tokens over the limit", lambda: chat("hi", max_tokens=10 ** 6), 400),
    ("empty prompt", lambda: chat("   "), 400),
    ("unknown role", lambda: json.dumps({"messages": [{"role": "wizard", "content": "x"}]}).encode(), 400),
    ("top_p 0", lambda: chat("hi", top_p=0), 400),
]


async def normal_stream(http, url: str, question: str, index: int, max_tokens: int, timeout: float) -> str:
    """'answered' | 'refused' | 'lost: why'."""
    sampling = {"temperature": 0.7, "seed": index} if index % 3 == 0 else {}
    body = chat(question, max_tokens=max_tokens, stream=True, **sampling)
    finish, done = None, False
    try:
        async with asyncio.timeout(timeout):
            async with http.stream("POST", url, content=body) as response:
                if response.status_code != 200:
                    return f"lost: status {response.status_code}"
                async for line in response.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        done = True
                        break
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        return f"lost: error event {chunk['error']['message'][:80]}"
                    if chunk["choices"] and chunk["choices"][0]["finish_reason"]:
                        finish = chunk["choices"][0]["finish_reason"]
    except (TimeoutError, httpx.HTTPError) as exc:
        return f"lost: {type(exc).__name__}"
    if not done or finish is None:
        return "lost: stream ended without a finish reason"
    return "refused" if finish == "content_filter" else "answered"


async def hostile(http, url: str, name: str, make_body, expected: int) -> str | None:
    """None when the server answered as expected, else what went wrong."""
    try:
        response = await http.post(url, content=make_body())
    except httpx.HTTPError as exc:
        return f"{name}: {type(exc).__name__}"
    if response.status_code != expected:
        return f"{name}: status {response.status_code}, expected {expected}"
    if expected >= 400:
        error = response.json().get("error")
        if not (isinstance(error, dict) and {"message", "type", "param", "code"} <= set(error)):
            return f"{name}: not OpenAI's error shape: {response.text[:80]}"
    return None


async def disconnect(http, url: str) -> None:
    """A client that leaves after the first chunk."""
    try:
        async with http.stream("POST", url, content=chat("Write a long python program.", max_tokens=200,
                                                           stream=True)) as response:
            async for _ in response.aiter_lines():
                break
    except httpx.HTTPError:
        pass


async def one_round(base: str, args, round_number: int) -> tuple[list[str], list[str]]:
    url = base + "/v1/chat/completions"
    limits = httpx.Limits(max_connections=args.streams + len(HOSTILE) + args.disconnects + 8)
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    async with httpx.AsyncClient(headers=headers, timeout=args.request_timeout,
                                 limits=limits) as http:
        normal = [normal_stream(http, url, QUESTIONS[(i + round_number) % len(QUESTIONS)], i, args.max_tokens,
                                args.request_timeout) for i in range(args.streams)]
        bad = [hostile(http, url, name, body, status) for name, body, status in HOSTILE]
        leaving = [disconnect(http, url) for _ in range(args.disconnects)]
        results = await asyncio.gather(*normal, *bad, *leaving)
    outcomes, problems = results[:args.streams], [r for r in results[args.streams:args.streams + len(HOSTILE)] if r]
    return outcomes, problems


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--stats", action="append", default=[])
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--streams", type=int, default=64, help="concurrent normal streams per round")
    p.add_argument("--disconnects", type=int, default=8, help="clients per round that leave after the first chunk")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--request-timeout", type=float, default=900.0)
    p.add_argument("--out")
    args = p.parse_args()
    port = free_port()
    server = start_server(args, port)
    base = f"http://127.0.0.1:{port}"
    counts = {"answered": 0, "refused": 0, "lost": 0}
    lost, problems, series = [], [], []
    started = time.monotonic()
    try:
        round_number = 0
        while round_number == 0 or time.monotonic() - started < args.minutes * 60:
            outcomes, round_problems = asyncio.run(one_round(base, args, round_number))
            for outcome in outcomes:
                key = outcome.split(":")[0]
                counts[key] += 1
                if key == "lost":
                    lost.append(outcome)
            problems += round_problems
            health = httpx.get(base + "/health", timeout=10).json()
            series.append({"round": round_number, "s": round(time.monotonic() - started),
                           "rss_mb": round(rss_mb(server.pid)), "active": health["active"],
                           "waiting": health["waiting"]})
            print(json.dumps(series[-1] | counts | {"last_lost": lost[-1:], "hostile_wrong": round_problems}),
                  flush=True)
            round_number += 1
    finally:
        server.terminate()
        server.wait(timeout=60)
    warm, end = series[0]["rss_mb"], series[-1]["rss_mb"]
    growth = (end - warm) / warm
    report = {
        "model": args.model, "stats": args.stats, "minutes": round((time.monotonic() - started) / 60, 1),
        "rounds": len(series), "streams_per_round": args.streams, "disconnects_per_round": args.disconnects,
        "hostile_per_round": [name for name, _, _ in HOSTILE], "max_tokens": args.max_tokens,
        "max_batch": args.max_batch, "normal": counts, "lost": lost[:10], "hostile_wrong": problems[:10],
        "idle_slots_at_end": series[-1]["active"] == 0 and series[-1]["waiting"] == 0,
        "rss_mb": {"after_warmup": warm, "end": end, "max": max(s["rss_mb"] for s in series),
                   "growth": round(growth, 3), "series": [s["rss_mb"] for s in series]},
        "passed": counts["lost"] == 0 and not problems and abs(growth) <= 0.10,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared: figures are not quiet)",
        "command": "python benchmarks/soak.py " + " ".join(sys.argv[1:]),
    }
    print(json.dumps({k: v for k, v in report.items() if k != "lost"}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
