"""Load on predict: N concurrent clients on loopback call `POST /v1/classifiers/{id}/predict` for T
seconds; prints throughput, p50/p99 latency and the error count (any non-200 answer or failed call),
next to the in-process throughput of the same classifier on the same images, and their ratio.

    python benchmarks/load_predict.py --clients 32 --seconds 20              # starts `app.serve` itself
    python benchmarks/load_predict.py --url URL --api-key KEY --classifier clf_...

With no --url it starts the whole service (`python -m app.serve`, a temporary data dir), uploads a
few images and runs a zero-shot job on the shipped proxy model to get a classifier, then loads it.
The per-tenant predict rate limit is raised for that server: this measures the service, not the
limiter. It runs once per --images-per-request value (default 1 and 16).

In-process: the classifier's exported artifact loaded here (`coft.Classifier.load`), the same image
bytes decoded, transformed and classified in batches of COFT_PREDICT_MAX_BATCH (the batcher's
largest forward pass), for the same duration, while the server sits idle: what the model costs with
no HTTP, no multipart and no queueing. The ratio is HTTP images/s over in-process images/s.

When it starts the service itself it also prints the API process's CPU per request, and its event
loop's: the loop is where every request's path runs, so its time per request is what limits one API
process, and it moves less with the machine's speed of the moment than requests/s do.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.demo import local_server, wait_ready  # noqa: E402


def png(seed: int, size: int = 64) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def make_classifier(client: httpx.Client) -> str:
    """Upload 8 images and run a zero-shot job on the proxy model (seconds): its classifier."""
    import zipfile

    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        for i in range(8):
            z.writestr(f"img{i}.png", png(i))
    dataset = client.post("/v1/datasets", files={"file": ("load.zip", archive.getvalue())})
    dataset.raise_for_status()
    job = client.post("/v1/jobs", json={"dataset_id": dataset.json()["id"], "method": "zero-shot",
                                        "class_names": ["circle", "square", "triangle", "star"]})
    job.raise_for_status()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        state = client.get(f"/v1/jobs/{job.json()['id']}").json()
        if state["status"] == "succeeded":
            return state["classifier_id"]
        if state["status"] in ("failed", "cancelled"):
            raise SystemExit(f"setup job {state['status']}: {state['error']}")
        time.sleep(0.5)
    raise SystemExit("setup job did not finish within 300 s")


async def load(url: str, key: str, classifier_id: str, clients: int, seconds: float,
               images_per_request: int) -> tuple[list[float], int, dict[str, int]]:
    """Each client sends one request at a time, back to back, until the time is up."""
    files = [("images", (f"x{i}.png", png(100 + i), "image/png")) for i in range(images_per_request)]
    latencies: list[float] = []
    errors: dict[str, int] = {}
    deadline = time.monotonic() + seconds
    # Each client its own connection pool, as separate users have. One pool shared by all 32 costs the
    # clients more CPU the more requests are in flight (httpcore scans every connection for each one),
    # CPU taken from the server under test: 3.6-8 ms per request against about 3 (benchmarks/RESULTS.md).
    async def one_client() -> None:
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60,
                                     limits=httpx.Limits(max_connections=1)) as http:
            while time.monotonic() < deadline:
                started = time.perf_counter()
                try:
                    response = await http.post(f"/v1/classifiers/{classifier_id}/predict", files=files)
                    outcome = None if response.status_code == 200 else f"HTTP {response.status_code}"
                except httpx.HTTPError as error:
                    outcome = type(error).__name__
                if outcome is None:
                    latencies.append(time.perf_counter() - started)
                else:
                    errors[outcome] = errors.get(outcome, 0) + 1

    await asyncio.gather(*(one_client() for _ in range(clients)))
    return latencies, sum(errors.values()), errors


def report(latencies: list[float], error_count: int, errors: dict[str, int], clients: int, seconds: float,
           images_per_request: int) -> None:
    ordered = sorted(latencies)
    percentile = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else float("nan")  # noqa: E731
    print(f"clients: {clients}, duration: {seconds:.0f} s, images per request: {images_per_request}")
    print(f"requests: {len(latencies) + error_count} ({len(latencies)} ok, {error_count} errors {errors or ''})")
    print(f"throughput: {len(latencies) / seconds:.1f} requests/s ({len(latencies) * images_per_request / seconds:.1f}"
          " images/s)")
    print(f"latency: p50 {percentile(0.50):.1f} ms, p99 {percentile(0.99):.1f} ms, "
          f"mean {statistics.fmean(ordered) * 1000 if ordered else float('nan'):.1f} ms")
    print(f"errors: {error_count}")


class ApiCpu:
    """CPU seconds of the API process (uvicorn, a child of `app.serve`) and of its main thread, which
    runs the event loop."""

    def __init__(self, serve_pid: int):
        children = psutil.Process(serve_pid).children(recursive=True)
        self.process = next(c for c in children if "uvicorn" in " ".join(c.cmdline()))

    def read(self) -> tuple[float, float]:
        loop = next(t for t in self.process.threads() if t.id == self.process.pid)
        total = self.process.cpu_times()
        return total.user + total.system, loop.user_time + loop.system_time


def in_process(client: httpx.Client, classifier_id: str, seconds: float, batch_size: int,
               images_per_request: int) -> float:
    """Images/s of the exported classifier here: decode + transform + forward, batch by batch."""
    import tarfile

    import torch

    from coft import Classifier, decode_image

    blobs = [png(100 + i) for i in range(images_per_request)]
    with tempfile.TemporaryDirectory() as directory:
        archive = Path(directory) / "artifact.tar.gz"
        with client.stream("GET", f"/v1/classifiers/{classifier_id}/export") as response:
            response.raise_for_status()
            with archive.open("wb") as out:
                for chunk in response.iter_bytes():
                    out.write(chunk)
        with tarfile.open(archive) as tar:
            tar.extractall(directory, filter="data")
        classifier = Classifier.load(Path(directory) / classifier_id)
    transform = classifier.transform()
    batch = [blobs[i % len(blobs)] for i in range(batch_size)]
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        classifier.probabilities(torch.stack([transform(decode_image(blob)) for blob in batch]))
        done += len(batch)
    return done / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--images-per-request", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--url", help="a running service (default: start one)")
    parser.add_argument("--api-key", default=os.environ.get("COFT_API_KEY"))
    parser.add_argument("--classifier", help="a classifier id of that tenant (default: make one)")
    parser.add_argument("--no-in-process", action="store_true", help="HTTP only (e.g. a remote --url)")
    args = parser.parse_args(argv)
    max_batch = int(os.environ.get("COFT_PREDICT_MAX_BATCH", "64"))

    def run(url: str, key: str, api_cpu: ApiCpu | None = None) -> int:
        failed = 0
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as client:
            classifier_id = args.classifier or make_classifier(client)
            # Warm up: the first predict loads the classifier into the API's cache.
            client.post(f"/v1/classifiers/{classifier_id}/predict",
                        files=[("images", ("w.png", png(0)))]).raise_for_status()
            for count in args.images_per_request:
                client_cpu = time.process_time()  # this process is the clients alone: the server is another
                server_before = api_cpu.read() if api_cpu else None
                latencies, error_count, errors = asyncio.run(
                    load(url, key, classifier_id, args.clients, args.seconds, count))
                client_cpu = time.process_time() - client_cpu
                report(latencies, error_count, errors, args.clients, args.seconds, count)
                print(f"clients' CPU: {client_cpu:.1f} s in {args.seconds:.0f} s "
                      f"({100 * client_cpu / args.seconds:.0f}% of one core, taken from the server's 2)")
                if api_cpu and latencies:
                    process_s, loop_s = (after - before for after, before in zip(api_cpu.read(), server_before))
                    print(f"API process CPU: {1000 * process_s / len(latencies):.2f} ms per request, its event loop "
                          f"{1000 * loop_s / len(latencies):.2f} ms ({100 * loop_s / args.seconds:.0f}% of a core)")
                failed += error_count
                if not args.no_in_process:
                    local = in_process(client, classifier_id, args.seconds, max_batch, count)
                    http = len(latencies) * count / args.seconds
                    print(f"in-process: {local:.1f} images/s (batches of {max_batch}); "
                          f"HTTP / in-process: {http / local:.2f}\n", flush=True)
        return 1 if failed else 0

    if args.url:
        if not args.api_key:
            parser.error("--url needs --api-key (or COFT_API_KEY)")
        return run(args.url, args.api_key)
    os.environ["COFT_RATE_LIMIT_PREDICT"] = "1000000/minute"  # inherited by the server started below
    with tempfile.TemporaryDirectory(prefix="coft-load-") as workdir, local_server(Path(workdir)) as (url, key, server,
                                                                                                      log):
        with httpx.Client(base_url=url, timeout=10) as probe:
            wait_ready(probe, server, log)
        return run(url, key, ApiCpu(server.pid))


if __name__ == "__main__":
    sys.exit(main())
