"""Session 21 diagnostic (from the repo root: python benchmarks/runs/issue12/diverse-s21.py TASK SEED): the
collaborative filter when the two Phase I models differ more than by their seed. Pairs, from cached default
runs (contexts from "a photo of a") and runs with the spec's random contexts ('{"phase1": {"context_init": ""}}'):
phrase+phrase (the default), phrase+random, random+random. Per pair: how often the models' labels on U agree,
each clean set's size and precision, and the AUROC of the validating model's p_clean (labels only to measure)."""
import json, sys
from pathlib import Path
import torch
sys.path.insert(0, str(Path(__file__).resolve().parents[3])); sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tune_dev import _run, _auroc, NO_FLIP, _merge  # noqa: E402
from coft.backbone import PROXY_MODEL, load_backbone  # noqa: E402
from coft.config import CoFTConfig  # noqa: E402
from coft.image_cache import cached_images  # noqa: E402
from coft.phase1 import PromptModel  # noqa: E402
from coft.proxy.tasks import load_task  # noqa: E402
from coft.stages import TrainedPrompts, collaborative_filter  # noqa: E402

name, seed = sys.argv[1], int(sys.argv[2])
task = load_task(name, 1000, 300)
backbone = load_backbone(PROXY_MODEL, None, "cpu")
runs = {"phrase": ({}, Path(f"/tmp/coft-tune-dev/{name}-seed{seed}")),
        "random": ({"phase1": {"context_init": ""}}, Path(f"/tmp/coft-diverse/{name}-seed{seed}"))}
models = {}
for kind, (overrides, directory) in runs.items():
    _run(task, seed, _merge(overrides, {"phase2": {"epochs": 0}}), checkpoint_dir=directory)
    config = CoFTConfig.from_dict(_merge(NO_FLIP, overrides) | {"seed": seed})
    for i in (1, 2):
        model = PromptModel(backbone, task.class_names, config.phase1, 0)
        model.load_state_dict(TrainedPrompts(**torch.load(directory / f"phase1-model{i}.pt", weights_only=True)).state)
        models[kind, i] = model.eval()
images = cached_images(task.train_images, backbone.preprocess_cfg, "cpu", train_scale=None)
truth = torch.tensor(task.train_labels)
for pair in ((("phrase", 1), ("phrase", 2)), (("phrase", 1), ("random", 2)), (("random", 1), ("random", 2))):
    filtered = collaborative_filter([models[pair[0]], models[pair[1]]], backbone, images, len(images), torch.zeros(0, dtype=torch.long), 256, lambda f, m: None)
    out = {"agree": round(100 * float((filtered.labels[0] == filtered.labels[1]).float().mean()), 1)}
    for w in (0, 1):
        right = filtered.labels[w] == truth
        clean = filtered.clean[w].bool()
        out[f"m{w + 1}"] = {"labels": round(100 * float(right.float().mean()), 1), "kept": int(clean.sum()),
                            "kept_right": round(100 * float(right[clean].float().mean()), 1),
                            "auroc": round(_auroc(filtered.p_clean[w], right), 3)}
    print(name, seed, "+".join(f"{k}{i}" for k, i in pair), json.dumps(out), flush=True)
