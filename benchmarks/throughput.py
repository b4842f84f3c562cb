"""Throughput: every stage of a job next to the model's own compute, and next to the code before issue 11.

    python benchmarks/throughput.py --case proxy                 # 5,000 photo-sized JPEGs, CoFT and CoFT+, 1 thread
    python benchmarks/throughput.py --case vit-b-32 --threads 2  # ViT-B-32 at 224 px, random weights, short schedules
    python benchmarks/throughput.py --case vit-b-16 --device cuda --baseline none   # benchmarks/gpu_check.sh

For one generated image set and each method, in one run:
- this code: the job (coft.pipeline.adapt, as the CLI and the worker call it), timed stage by stage
  from the progress events (a stage's time includes writing its checkpoint);
- the model's compute: each stage again, alone, on inputs already on the device (`ReadyInputs`: the
  run's own test-time views, no decoding, no augmentation). It resumes the real run's checkpoints
  of the stages before it, so it performs exactly the same optimiser steps and forward passes on the
  same images, labels and clean sets. Stage time / compute time is the data path's overhead;
- the code before this issue (`--baseline`, a commit, default a0e568e): the same job in a
  subprocess on a checkout of that commit, with the same images, config and threads; after the two
  above, or with `--alongside` at the same time as them, on cores of its own (both then run on the
  same machine under the same load, in about half the wall time).
Also the decoded-image cache: its build rate, and its size. Peak GPU memory on CUDA.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from coft.backbone import load_backbone  # noqa: E402
from coft.config import CoFTConfig  # noqa: E402
from coft.data import open_images  # noqa: E402
from coft.image_cache import CachedImages, cached_images  # noqa: E402
from coft.pipeline import adapt  # noqa: E402
from coft.proxy.tasks import load_task  # noqa: E402

CASES = {
    # name: (model, images, config overrides); the proxy runs the default schedule, the real
    # architectures a short one (their steps cost seconds on a CPU).
    "proxy": ("proxy", 5000, {}),
    "vit-b-32": ("ViT-B-32", 300, {"pseudo_labels": {"top_k": 8}, "phase1": {"epochs": 2},
                                   "phase2": {"epochs": 1}}),
    "vit-b-16": ("ViT-B-16", 5000, {"phase1": {"epochs": 10}, "phase2": {"epochs": 3}}),
}
PHOTO_SIZE = (500, 375)
TASK = "digits-handwritten"  # photos of the proxy's digits, so zero-shot spreads over the classes


# --------------------------------------------------------------------------- inputs


def make_photos(directory: Path, count: int, threads: int) -> list[str]:
    """`count` photo-sized JPEGs: proxy scenes upscaled to 500x375 with sensor-like noise."""
    directory.mkdir(parents=True, exist_ok=True)
    task = load_task(TASK, num_train=count, num_test=0)

    def write(index: int) -> None:
        rng = np.random.default_rng(index)
        photo = np.asarray(task.train_images[index].resize(PHOTO_SIZE, Image.Resampling.BICUBIC), dtype=np.float32)
        photo = np.clip(photo + rng.normal(0, 6, photo.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(photo).save(buffer, "JPEG", quality=90)
        (directory / f"{index:06d}.jpg").write_bytes(buffer.getvalue())

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(write, range(count)))
    return task.class_names


def random_weights(model: str, directory: Path) -> str | None:
    """A checkpoint of the architecture with random weights, loaded through open_clip's own path."""
    if model == "proxy":
        return None
    import open_clip

    path = directory / f"{model}-random.pt"
    if not path.exists():
        torch.manual_seed(0)
        clip = open_clip.create_model(model, pretrained=None)
        torch.save(clip.state_dict(), path)
    return str(path)


class ReadyInputs:
    """An ImageSource whose every input is already on the device: the test-time views of a real run's
    cache, gathered by index. Augmentation is skipped: what remains is the model's own compute."""

    def __init__(self, source: CachedImages):
        self.fingerprint = source.fingerprint  # the real run's, so its checkpoints are resumed
        self.inputs = torch.cat([source.test_view(torch.arange(start, min(start + 512, len(source))))
                                 for start in range(0, len(source), 512)])

    def __len__(self) -> int:
        return len(self.inputs)

    def test_view(self, indices: torch.Tensor) -> torch.Tensor:
        return self.inputs[indices.to(self.inputs.device, non_blocking=True)]

    def pixels(self, indices: torch.Tensor) -> torch.Tensor:
        return self.test_view(indices)

    def view(self, pixels: torch.Tensor, augmentation) -> torch.Tensor:
        return pixels


def cache_formats(folder: Path, preprocess_cfg: dict, count: int = 64) -> str:
    """Why the cache holds raw uint8 rows: their size and read cost next to re-encoded JPEG rows
    (the other design: small JPEGs, decoded in batches, as torchvision.io.decode_jpeg does)."""
    from torchvision.io import decode_jpeg

    from coft.image_cache import train_size

    images = open_images(folder)
    count = min(count, len(images))
    size = train_size(preprocess_cfg, 1.15)
    rows = [images[i].resize((size[1], size[0]), Image.Resampling.BICUBIC) for i in range(count)]
    raw = np.stack([np.asarray(row).transpose(2, 0, 1) for row in rows])
    blobs = []
    for row in rows:
        buffer = io.BytesIO()
        row.save(buffer, "JPEG", quality=90)
        blobs.append(torch.tensor(bytearray(buffer.getvalue()), dtype=torch.uint8))
    with tempfile.TemporaryDirectory() as directory:
        mapped = np.memmap(Path(directory) / "rows.u8", dtype=np.uint8, mode="w+", shape=raw.shape)
        mapped[:] = raw
        order = np.random.default_rng(0).permutation(count)
        started = time.perf_counter()
        for _ in range(20):
            torch.from_numpy(mapped[order])
        read_us = (time.perf_counter() - started) / 20 / count * 1e6
        del mapped
    started = time.perf_counter()
    for _ in range(3):
        decode_jpeg(blobs)
    decode_us = (time.perf_counter() - started) / 3 / count * 1e6
    return (f"cache rows of {size[1]}x{size[0]}: raw uint8 {raw[0].nbytes} B, read from the memory map in "
            f"{read_us:.1f} us; as JPEG (quality 90) {np.mean([len(b) for b in blobs]):.0f} B, decoded on the CPU "
            f"in {decode_us:.1f} us (per image, {torch.get_num_threads()} thread(s))")


# --------------------------------------------------------------------------- timing


class LimitReached(Exception):
    pass


class StageTimes:
    """Wall time of each stage, from its first progress event to its "done" (or resumed) event."""

    def __init__(self, stop_after: str | None = None, sync: bool = False):
        self.stop_after, self.sync = stop_after, sync
        self.started: dict[str, float] = {}
        self.seconds: dict[str, float] = {}
        self.resumed: set[str] = set()

    def __call__(self, event) -> None:
        if self.sync:
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.started.setdefault(event.stage, now)
        if event.message == "resumed from checkpoint":
            self.resumed.add(event.stage)
        elif event.message == "done" and event.stage_fraction >= 1.0:
            self.seconds[event.stage] = now - self.started[event.stage]
            if event.stage == self.stop_after:
                raise LimitReached


def run_job(images, classes, method, backbone, config, checkpoint_dir, sync) -> tuple[dict, float, dict]:
    times = StageTimes(sync=sync)
    started = time.perf_counter()
    result = adapt(images, classes, method=method, backbone=backbone, config=config, progress=times,
                   checkpoint_dir=checkpoint_dir)
    return times.seconds, time.perf_counter() - started, result.metrics


def compute_limits(ready: ReadyInputs, classes, method, backbone, config, real_dir: Path, stages: list[str],
                   scratch: Path, sync: bool) -> dict[str, float]:
    """Each stage alone on ReadyInputs, resuming the real run's checkpoints of the stages before it."""
    limits = {}
    for position, stage in enumerate(stages):
        directory = scratch / f"limit-{stage}"
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        shutil.copy(real_dir / "run.json", directory / "run.json")
        for earlier in stages[:position]:
            shutil.copy(real_dir / f"{earlier}.pt", directory / f"{earlier}.pt")
        times = StageTimes(stop_after=stage, sync=sync)
        try:
            adapt(ready, classes, method=method, backbone=backbone, config=config, progress=times,
                  checkpoint_dir=directory)
        except LimitReached:
            pass
        if set(stages[:position]) - times.resumed:
            raise RuntimeError(f"the compute run of {stage} did not resume {set(stages[:position]) - times.resumed}")
        limits[stage] = times.seconds[stage]
        shutil.rmtree(directory)
    return limits


# --------------------------------------------------------------------------- the code before


BASELINE_JOB = r"""
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[5]))
from coft.backbone import load_backbone
from coft.config import CoFTConfig
from coft.data import open_images
from coft.pipeline import adapt
model, pretrained, folder, method = sys.argv[1], sys.argv[2] or None, sys.argv[3], sys.argv[4]
config = CoFTConfig.from_dict(json.loads(sys.argv[6]))
classes = json.loads(sys.argv[7])
backbone = load_backbone(model, pretrained, sys.argv[8])
if folder.startswith("task:"):  # the proxy task's own images, already decoded in memory
    from coft.proxy.tasks import load_task
    _, name, count = folder.split(":")
    images = load_task(name, num_train=int(count), num_test=0).train_images
else:
    images = open_images(folder)
started, seconds, first = {}, {}, time.perf_counter()
def progress(event):
    now = time.perf_counter()
    started.setdefault(event.stage, now)
    if event.message == "done" and event.stage_fraction >= 1.0:
        seconds[event.stage] = now - started[event.stage]
adapt(images, classes, method=method, backbone=backbone, config=config, progress=progress)
print(json.dumps({"stages": seconds, "job_s": time.perf_counter() - first}))
"""


def before_issue(overrides: dict) -> dict:
    """The overrides without the settings this issue added (the old config refuses unknown keys):
    with `coft_plus.shared_view` the old code runs the spec's two views, which is what it always did."""
    plus = {key: value for key, value in overrides.get("coft_plus", {}).items() if key != "shared_view"}
    return {**{key: value for key, value in overrides.items() if key != "coft_plus"},
            **({"coft_plus": plus} if plus else {})}


def baseline_checkout(commit: str, scratch: Path) -> Path:
    """The `coft` package as it was at `commit` (git archive: no worktree, nothing left in .git)."""
    target = scratch / f"baseline-{commit}"
    if not (target / "coft").exists():
        target.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "coft"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target


def start_baseline(tree: Path, model, pretrained, folder: Path | str, method, threads, overrides, classes,
                   device) -> subprocess.Popen:
    """The old job in a subprocess; its output goes to files beside the checkout (a pipe nobody reads
    while it runs would fill and stall it)."""
    environment = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": str(threads)}
    with open(tree / "job.out", "w") as out, open(tree / "job.err", "w") as err:
        return subprocess.Popen([sys.executable, "-c", BASELINE_JOB, model, pretrained or "", str(folder), method,
                                 str(threads), json.dumps(overrides), json.dumps(classes), device],
                                env=environment, cwd=tree, stdout=out, stderr=err)


def finish_baseline(job: subprocess.Popen, tree: Path) -> dict:
    job.wait()
    if job.returncode != 0:
        raise RuntimeError(f"the baseline job failed:\n{(tree / 'job.err').read_text()[-3000:]}")
    return json.loads((tree / "job.out").read_text().strip().splitlines()[-1])


# --------------------------------------------------------------------------- report


def table(method: str, real: dict, job_s: float, limits: dict, baseline: dict | None, cache: dict) -> str:
    lines = [f"### {method}", "",
             "| stage | this code (s) | model compute (s) | ratio | before (s) | speedup |",
             "|---|---|---|---|---|---|"]
    before = baseline["stages"] if baseline else {}
    for stage, seconds in real.items():
        limit = limits.get(stage)
        old = before.get(stage)
        lines.append(f"| {stage} | {seconds:.1f} | {f'{limit:.1f}' if limit else '-'} | "
                     f"{f'{seconds / limit:.2f}' if limit else '-'} | {f'{old:.1f}' if old else '-'} | "
                     f"{f'{old / seconds:.2f}x' if old else '-'} |")
    total_limit = sum(limits.values())
    old_job = baseline["job_s"] if baseline else None
    lines.append(f"| **whole job** | {job_s:.1f} | {total_limit:.1f} | {job_s / total_limit:.2f} | "
                 f"{f'{old_job:.1f}' if old_job else '-'} | {f'{old_job / job_s:.2f}x' if old_job else '-'} |")
    lines += ["", f"Decoded-image cache: {cache.get('images')} images in {cache.get('build_s')} s "
                  f"({cache.get('images_per_s')} images/s, {cache.get('threads')} threads), "
                  f"{cache.get('bytes', 0) / 2**20:.1f} MiB (test rows {cache.get('test_size')}, "
                  f"train rows {cache.get('train_size')})."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=sorted(CASES), default="proxy")
    parser.add_argument("--images", type=int, help="how many JPEGs (default: the case's)")
    parser.add_argument("--in-memory", action="store_true",
                        help="the proxy task's own 64 px images, decoded in memory, instead of JPEG files")
    parser.add_argument("--methods", nargs="*", default=["coft", "coft+"], choices=["coft", "coft+"])
    parser.add_argument("--config", type=json.loads, default={}, help="JSON overrides on top of the case's")
    parser.add_argument("--threads", type=int, default=1, help="torch threads and decoding threads")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--baseline", default="a0e568e", help='a commit to compare with, or "none"')
    parser.add_argument("--alongside", action="store_true",
                        help="run the baseline job at the same time as this code's (on cores of its own: "
                             "2 x --threads must fit), so both meet the same machine; half the wall time")
    parser.add_argument("--scratch", type=Path, help="where images, weights and checkpoints go (default: temp)")
    parser.add_argument("--json", type=Path, help="also write every number here")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    model, default_count, case_overrides = CASES[args.case]
    count = args.images or default_count
    scratch = args.scratch or Path(tempfile.mkdtemp(prefix="coft-throughput-"))
    folder = scratch / f"photos-{count}"
    classes = json.loads((scratch / "classes.json").read_text()) if (folder / "done").exists() else None
    if classes is None:
        started = time.perf_counter()
        classes = make_photos(folder, count, max(args.threads, os.cpu_count() or 1))
        (scratch / "classes.json").write_text(json.dumps(classes))
        (folder / "done").touch()
        print(f"generated {count} JPEGs of {PHOTO_SIZE[0]}x{PHOTO_SIZE[1]} in {time.perf_counter() - started:.0f} s",
              flush=True)
    pretrained = random_weights(model, scratch)
    backbone = load_backbone(model, pretrained, args.device)
    started = time.perf_counter()
    images = load_task(TASK, num_train=count, num_test=0).train_images if args.in_memory else open_images(folder)
    open_s = time.perf_counter() - started
    sync = backbone.device.type == "cuda"
    formats = cache_formats(folder, backbone.preprocess_cfg)
    what = "in-memory 64 px images" if args.in_memory else "JPEGs"
    print(f"case {args.case}: {model} ({'random weights' if pretrained else 'shipped weights'}) on {args.device}, "
          f"{len(images)} {what} (opened in {open_s:.1f} s, not part of the job), "
          f"{args.threads} thread(s)\n{formats}", flush=True)

    results = {"case": args.case, "model": model, "images": len(images), "in_memory": args.in_memory,
               "threads": args.threads,
               "device": args.device, "baseline": args.baseline, "cache_formats": formats, "methods": {}}
    for method in args.methods:
        overrides = json.loads(json.dumps(case_overrides))
        for key, value in args.config.items():
            overrides[key] = {**overrides.get(key, {}), **value} if isinstance(value, dict) else value
        config = CoFTConfig.from_dict({**overrides, "decode_threads": args.threads})
        real_dir = scratch / f"real-{method}"
        shutil.rmtree(real_dir, ignore_errors=True)
        baseline_job = None
        if args.baseline != "none":
            tree = baseline_checkout(args.baseline, scratch)
            launch = partial(start_baseline, tree, model, pretrained,
                             f"task:{TASK}:{count}" if args.in_memory else folder, method, args.threads,
                             before_issue(overrides), classes, args.device)
            baseline_job = launch() if args.alongside else None
        if sync:
            torch.cuda.reset_peak_memory_stats()
        real, job_s, metrics = run_job(images, classes, method, backbone, config, real_dir, sync)
        peak = torch.cuda.max_memory_allocated() / 2**30 if sync else None
        print(f"{method}: job {job_s:.1f} s", flush=True)
        # The real run's cache, reopened from its directory (nothing is decoded again).
        cached = cached_images(images, backbone.preprocess_cfg, backbone.device, directory=real_dir / "images",
                               train_scale=config.cache_scale, threads=args.threads)
        ready = ReadyInputs(cached)
        stages = [s for s in real if s not in ("decode",)]
        limits = compute_limits(ready, classes, method, backbone, config, real_dir, stages, scratch, sync)
        del ready, cached
        print(f"{method}: model compute {sum(limits.values()):.1f} s", flush=True)
        baseline = None
        if args.baseline != "none":
            baseline = finish_baseline(baseline_job or launch(), tree)
            print(f"{method}: before {baseline['job_s']:.1f} s", flush=True)
        results["methods"][method] = {"stages": real, "job_s": job_s, "limits": limits, "baseline": baseline,
                                      "image_cache": metrics.get("image_cache"), "peak_gpu_gib": peak}
        print("\n" + table(method, real, job_s, limits, baseline, metrics.get("image_cache", {})), flush=True)
        if peak is not None:
            print(f"Peak GPU memory: {peak:.1f} GiB")
        shutil.rmtree(real_dir, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if args.scratch is None:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
