"""cifar-serve under load, on loopback only, against in-process prediction in the same run.
Prints figures; asserts nothing.

    python -m benchmarks.serve MODEL [--images 256] [--data-dir ../shared/data/cifar10]

For batching off (--max-batch-size 1) and on (32), a fresh server; at each concurrency (1, 8,
32) a fixed number of uploads of real test images (PNG files, as a client sends them), with a
time limit, so the run always ends: requests/s and p50/p99 latency, raw and normalised by the
3x3-convolution rate in fp32 (what the server computes in) measured in the same run
(benchmarks/harness.py). The reference is ``load_classifier(MODEL).predict`` on the same files
in this process (decode included).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import time
from pathlib import Path

import httpx

from benchmarks.harness import DEFAULT_DATA, REPO, call_times, launch_server, machine, normalised, rate_label, reference_rate, stop_server

#: what the served model computes in (load_classifier and the exports are float32)
PRECISION = "32-true"


async def load(url: str, files: list[bytes], concurrency: int, limit_s: float) -> dict:
    latencies: list[float] = []
    queue = list(range(len(files)))
    deadline = time.perf_counter() + limit_s
    failures = 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal failures
        while queue and time.perf_counter() < deadline:
            i = queue.pop()
            t = time.perf_counter()
            r = await client.post(url, files={"file": ("x.png", files[i], "image/png")}, data={"top_k": "1"})
            latencies.append(time.perf_counter() - t)
            failures += r.status_code != 200

    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=concurrency)) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    wall = time.perf_counter() - start
    lat = sorted(latencies)
    return {"requests": len(lat), "failures": failures, "rps": len(lat) / wall,
            "p50_ms": 1000 * statistics.median(lat), "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))]}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    p.add_argument("--images", type=int, default=256, help="uploads per measurement")
    p.add_argument("--time-limit", type=float, default=60.0, help="seconds per measurement at most")
    args = p.parse_args()
    paths = sorted((args.data_dir / "test").rglob("*.png"))[:: max(1, 10000 // args.images)][: args.images]
    files = [f.read_bytes() for f in paths]

    from cifar_lightning import load_classifier

    clf = load_classifier(args.model)
    clf.predict(paths[:32])
    in_process = len(paths) / call_times(lambda: clf.predict(paths))[0]
    rate = reference_rate(PRECISION)
    print(f"{machine()}; {rate_label(PRECISION, rate)} (the model computes in fp32); model {args.model} "
          f"(test-time views level {clf.tta})")  # fmt: skip
    print(f"in-process load_classifier(...).predict on the same {len(paths)} files: {in_process:.1f} images/s")
    print("normalised ms = raw ms x rate / 1000 GFLOP/s")
    print(f"{'batching':<12}{'concurrency':>12}{'requests':>10}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'norm p50':>10}{'norm p99':>10}"
          f"{'vs in-process':>15}")  # fmt: skip
    results = {}
    for batch in (1, 32):
        proc, url = launch_server(args.model, "--max-batch-size", str(batch), cwd=REPO, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            asyncio.run(load(f"{url}/predict", files[:16], 4, 30))  # warm-up
            for concurrency in (1, 8, 32):
                r = asyncio.run(load(f"{url}/predict", files, concurrency, args.time_limit))
                results[batch, concurrency] = r
                label = "off" if batch == 1 else f"on ({batch})"
                failed = f"  ({r['failures']} failed)" if r["failures"] else ""
                print(f"{label:<12}{concurrency:>12}{r['requests']:>10}{r['rps']:>9.1f}{r['p50_ms']:>9.0f}{r['p99_ms']:>9.0f}"
                      f"{normalised(r['p50_ms'], rate):>10.0f}{normalised(r['p99_ms'], rate):>10.0f}"
                      f"{r['rps'] / in_process:>14.0%}{failed}", flush=True)  # fmt: skip
        finally:
            stop_server(proc)
    print(f"batching on vs off at concurrency 32: {results[32, 32]['rps'] / results[1, 32]['rps']:.2f}x")


if __name__ == "__main__":
    main()
