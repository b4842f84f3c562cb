"""`make demo`: the whole story against the service, as an HTTP client would tell it.

Renders a proxy task, uploads its unlabeled images as a zip (POST /v1/datasets), starts a CoFT job
(POST /v1/jobs), shows its stage, progress and ETA until it finishes (GET /v1/jobs/{id}), then labels
the task's labelled test images with the adapted classifier (POST /v1/classifiers/{id}/predict) and
with zero-shot CLIP (POST /v1/zero-shot/predict), and prints both accuracies.

    python -m app.demo --start-server          # starts `python -m app.serve` on a temporary data dir
    python -m app.demo --url http://host:8000 --api-key KEY   # against a running service

Only httpx talks to the service; nothing of `app` is imported for the story itself.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import uuid
import zipfile
from pathlib import Path
from typing import Iterator

import httpx
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

from app.serve import free_port
from coft import PROXY_TASKS, ProxyTask, load_proxy_task

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BATCH = 64  # the service's default COFT_MAX_PREDICT_IMAGES; a smaller limit is detected and obeyed
console = Console(highlight=False)


class DemoError(RuntimeError):
    pass


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def zip_images(images) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:  # PNGs are compressed already
        for i, image in enumerate(images):
            archive.writestr(f"unlabeled/{i:05d}.png", png_bytes(image))
    return buffer.getvalue()


def deep_merge(base: dict, overrides: dict) -> dict:
    merged = dict(base)
    for key, value in overrides.items():
        merged[key] = deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(
            merged.get(key), dict) else value
    return merged


def problem(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return f"HTTP {response.status_code}: {response.text[:500]}"
    if isinstance(body, dict):
        return f"HTTP {response.status_code} {body.get('type', '')}: {body.get('detail') or body}"
    return f"HTTP {response.status_code}: {body}"


def check(response: httpx.Response, what: str) -> dict:
    if response.is_error:
        raise DemoError(f"{what} failed: {problem(response)}")
    return response.json()


# --- the server, when --start-server ---------------------------------------------------------------

@contextlib.contextmanager
def local_server(workdir: Path) -> Iterator[tuple[str, str, subprocess.Popen, Path]]:
    """`python -m app.serve` on a free loopback port and a fresh data dir; stopped with SIGINT (Ctrl-C)."""
    port, key = free_port(), f"coft_demo_{secrets.token_urlsafe(24)}"
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL", "COFT_REDIS_URL",
                                                              "COFT_DATABASE_URL")}
    env.update(HOST="127.0.0.1", PORT=str(port), COFT_DATA_DIR=str(workdir / "data"), COFT_BOOTSTRAP_API_KEY=key,
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    log_path = workdir / "serve.log"
    with log_path.open("w") as log:
        # Its own session: Ctrl-C reaches only the demo, which then stops the service in order.
        server = subprocess.Popen([sys.executable, "-m", "app.serve"], env=env, cwd=REPO, stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
        try:
            yield f"http://127.0.0.1:{port}", key, server, log_path
        finally:
            if server.poll() is None:
                server.send_signal(signal.SIGINT)
                try:
                    server.wait(60)
                except subprocess.TimeoutExpired:
                    os.killpg(server.pid, signal.SIGKILL)
                    server.wait()
            console.print(f"service stopped (exit code {server.returncode})")


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def wait_ready(client: httpx.Client, server: subprocess.Popen | None, log_path: Path | None,
               timeout_s: float = 300) -> None:
    deadline, last = time.monotonic() + timeout_s, "no answer"
    with console.status("waiting for the service (/readyz): database, Redis, a worker"):
        while time.monotonic() < deadline:
            if server is not None and server.poll() is not None:
                raise DemoError(f"the service exited with code {server.returncode}:\n{log_tail(log_path)}")
            try:
                response = client.get("/readyz", timeout=5)
                if response.status_code == 200:
                    return
                last = problem(response)
            except httpx.HTTPError as error:
                last = repr(error)
            time.sleep(0.5)
    raise DemoError(f"the service was not ready within {timeout_s:.0f} s ({last})"
                    + (f":\n{log_tail(log_path)}" if log_path else ""))


# --- the story ---------------------------------------------------------------------------------------

def upload_dataset(client: httpx.Client, task: ProxyTask) -> str:
    archive = zip_images(task.train_images)
    dataset = check(client.post("/v1/datasets", files={"file": (f"{task.name}.zip", archive, "application/zip")},
                                timeout=300), "POST /v1/datasets")
    console.print(f"POST /v1/datasets ({len(archive) / 2**20:.1f} MB zip) -> {dataset['id']}: "
                  f"{dataset['num_images']} images, {dataset['num_rejected']} rejected")
    return dataset["id"]


def start_job(client: httpx.Client, dataset_id: str, class_names: list[str], config: dict) -> dict:
    body = {"dataset_id": dataset_id, "class_names": class_names, "method": "coft", "config": config}
    headers = {"Idempotency-Key": f"demo-{uuid.uuid4()}"}
    for attempt in range(3):  # a lost answer is safe to retry: the same key returns the same job
        try:
            job = check(client.post("/v1/jobs", json=body, headers=headers), "POST /v1/jobs")
            break
        except httpx.TransportError:
            if attempt == 2:
                raise
            time.sleep(1)
    console.print(f"POST /v1/jobs -> {job['id']} ({job['status']}), config {json.dumps(config)}")
    return job


def format_eta(eta_s: float | None) -> str:
    if eta_s is None:
        return "ETA -:--"
    minutes, seconds = divmod(int(round(eta_s)), 60)
    return f"ETA {minutes}:{seconds:02d}"


def watch_job(client: httpx.Client, job: dict, interval_s: float = 1.0) -> dict:
    columns = [TextColumn("{task.description:<22}"), BarColumn(), TaskProgressColumn(),
               TextColumn("{task.fields[eta]}"), TimeElapsedColumn()]
    with Progress(*columns, console=console) as progress:
        bar = progress.add_task(job["status"], total=1.0, eta="")
        while True:
            try:
                job = check(client.get(f"/v1/jobs/{job['id']}"), f"GET /v1/jobs/{job['id']}")
            except httpx.TransportError as error:  # keep watching through a blip
                progress.console.print(f"[yellow]poll failed ({error!r}); retrying")
                time.sleep(interval_s)
                continue
            stage = job["stage"] or job["status"]
            progress.update(bar, completed=job["progress"], description=stage, eta=format_eta(job["eta_s"]))
            if job["status"] == "succeeded":
                progress.update(bar, completed=1.0, description="succeeded", eta="")
                return job
            if job["status"] in ("failed", "cancelled"):
                error = job.get("error") or {}
                raise DemoError(f"job {job['id']} {job['status']} at stage {job['stage']}: "
                                f"{error.get('code', '')} {error.get('message', '')}".rstrip())
            time.sleep(interval_s)


def predict_all(client: httpx.Client, path: str, images: list[bytes], batch: int,
                data: dict | None = None) -> list[str]:
    """Labels for every image, in order, in requests of at most `batch` (fewer if the service says so)."""
    labels: list[str] = []
    while len(labels) < len(images):
        chunk = images[len(labels):len(labels) + batch]
        files = [("images", (f"{len(labels) + i:05d}.png", content, "image/png")) for i, content in enumerate(chunk)]
        response = client.post(path, files=files, data=data, timeout=300)
        if response.status_code == 422 and "too-many-images" in response.text and batch > 1:
            limit = re.search(r"at most (\d+) images", response.text)
            batch = int(limit.group(1)) if limit else batch // 2
            continue
        labels += [p["label"] for p in check(response, f"POST {path}")["predictions"]]
    return labels


def accuracy(predicted: list[str], task: ProxyTask) -> float:
    truth = [task.class_names[label] for label in task.test_labels]
    return sum(p == t for p, t in zip(predicted, truth)) / len(truth)


def story(client: httpx.Client, task: ProxyTask, config: dict, batch: int) -> dict[str, float]:
    dataset_id = upload_dataset(client, task)
    job = watch_job(client, start_job(client, dataset_id, task.class_names, config))
    metrics = {k: round(v, 3) if isinstance(v, float) else v for k, v in job["metrics"].items()
               if k in ("s_star_size", "agreement", "clean_fraction_model1", "clean_fraction_model2")}
    console.print(f"job {job['id']} succeeded -> classifier {job['classifier_id']}"
                  + (f"; label-free metrics: {json.dumps(metrics)}" if metrics else ""))
    test_images = [png_bytes(image) for image in task.test_images]
    with console.status(f"labelling {len(test_images)} test images (adapted classifier, then zero-shot)"):
        adapted = predict_all(client, f"/v1/classifiers/{job['classifier_id']}/predict", test_images, batch)
        zero_shot = predict_all(client, "/v1/zero-shot/predict", test_images, batch,
                                data={"class_names": task.class_names})
    return {"zero-shot": accuracy(zero_shot, task), "coft": accuracy(adapted, task)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=os.environ.get("COFT_URL", "http://127.0.0.1:8000"))
    parser.add_argument("--api-key", default=os.environ.get("COFT_API_KEY"))
    parser.add_argument("--task", default="digits-handwritten", choices=sorted(PROXY_TASKS))
    parser.add_argument("--num-train", type=int, default=600)
    parser.add_argument("--num-test", type=int, default=300)
    parser.add_argument("--config", type=json.loads, default={},
                        help='JSON overrides of the job config, e.g. \'{"phase1": {"epochs": 1}}\'')
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help="images per predict request")
    parser.add_argument("--start-server", action="store_true",
                        help="start `python -m app.serve` on a free port and a temporary data dir, stop it after")
    args = parser.parse_args(argv)
    if not isinstance(args.config, dict):
        parser.error("--config must be a JSON object")
    if not args.start_server and not args.api_key:
        parser.error("give --api-key (or COFT_API_KEY), or --start-server")
    # Digits change class when mirrored: no horizontal flips in the augmentations.
    flips = {} if PROXY_TASKS[args.task].flip_invariant else {"phase1": {"hflip": False}, "phase2": {"hflip": False}}
    config = deep_merge(flips, args.config)

    with contextlib.ExitStack() as stack:
        server = log_path = None
        if args.start_server:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="coft-demo-")))
            args.url, args.api_key, server, log_path = stack.enter_context(local_server(workdir))
            console.print(f"started the service (python -m app.serve) at {args.url}, data in {workdir}")
        try:
            with console.status(f"rendering proxy task {args.task}"):
                task = load_proxy_task(args.task, args.num_train, args.num_test)
            console.print(f"proxy task {task.name}: {task.spec.description}; {len(task.train_images)} unlabeled "
                          f"images, {len(task.test_images)} labelled test images, "
                          f"classes: {', '.join(task.class_names)}")
            client = stack.enter_context(httpx.Client(base_url=args.url, timeout=60,
                                                      headers={"Authorization": f"Bearer {args.api_key}"}))
            wait_ready(client, server, log_path, timeout_s=300 if server else 30)
            accuracies = story(client, task, config, args.batch_size)
        except (DemoError, httpx.HTTPError) as error:
            console.print(f"[red]demo failed: {error}")
            return 1
        except KeyboardInterrupt:
            console.print("[yellow]interrupted")
            return 130
    print(f"\ntest accuracy on {task.name} ({len(task.test_images)} images): zero-shot "
          f"{100 * accuracies['zero-shot']:.1f}%  ->  CoFT {100 * accuracies['coft']:.1f}%  "
          f"({100 * (accuracies['coft'] - accuracies['zero-shot']):+.1f} points, no labels used)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
