"""Session 21 diagnostics on Phase I's labels (labels only to measure), from the repo root:

    python benchmarks/runs/issue12/phase1-labels-s21.py mix TASK SEED     # log labels-s21.log
        how right zero-shot's, Phase I's and their combinations' labels are, on U and on the test split
    python benchmarks/runs/issue12/phase1-labels-s21.py pairs TASK SEED   # log diverse-s21.log
        the collaborative filter when the two Phase I models differ more than by their seed: pairs of
        models with contexts from "a photo of a" (ours) and from random (the spec's, context_init "").
        Per pair: how often their labels on U agree, each clean set's size and precision, and the
        AUROC of the validating model's p_clean.

Phase I comes from a default CoFT run up to the filter, the one `tune_dev.py filter` caches.
"""
import json
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[3]), str(Path(__file__).resolve().parents[2])]
from tune_dev import CACHE, NO_FLIP, _auroc, _merge, _run  # noqa: E402
from coft.backbone import PROXY_MODEL, load_backbone  # noqa: E402
from coft.config import CoFTConfig  # noqa: E402
from coft.image_cache import cached_images  # noqa: E402
from coft.phase1 import PromptModel, score_images  # noqa: E402
from coft.prompts import template_features  # noqa: E402
from coft.proxy.tasks import load_task  # noqa: E402
from coft.stages import TrainedPrompts, collaborative_filter, encode  # noqa: E402

RANDOM_CONTEXTS = {"phase1": {"context_init": ""}}


def phase1_models(task, seed: int, backbone, overrides: dict, directory: Path) -> list[PromptModel]:
    """Both Phase I models of the run with `overrides` (run up to the filter once, then cached)."""
    _run(task, seed, _merge(overrides, {"phase2": {"epochs": 0}}), checkpoint_dir=directory)
    config = CoFTConfig.from_dict(_merge(NO_FLIP, overrides) | {"seed": seed})
    models = []
    for i in (1, 2):
        model = PromptModel(backbone, task.class_names, config.phase1, 0)
        model.load_state_dict(TrainedPrompts(**torch.load(directory / f"phase1-model{i}.pt", weights_only=True)).state)
        models.append(model.eval())
    return models


def accuracy(probabilities: torch.Tensor, truth: torch.Tensor) -> float:
    return round(100 * float((probabilities.argmax(1) == truth).float().mean()), 1)


def label_mixes(task, seed: int, backbone, models: list[PromptModel]) -> dict:
    text = template_features(backbone, task.class_names, CoFTConfig().pseudo_labels)
    out = {}
    for split, images, labels in (("U", task.train_images, task.train_labels), ("test", task.test_images, task.test_labels)):
        source = cached_images(images, backbone.preprocess_cfg, "cpu", train_scale=None)
        probs = {"zs": (backbone.logit_scale * encode(backbone, source, 256) @ text.T).softmax(1)}
        for i, model in enumerate(models, start=1):
            probs[f"p1m{i}"] = (score_images(model, backbone, source, 256)[0] * model.scale).softmax(1)
        probs["p1ens"] = (probs["p1m1"] + probs["p1m2"]) / 2
        probs["poe_m1"] = (probs["p1m1"].log() + probs["zs"].log()).softmax(1)
        probs["poe_ens"] = (probs["p1ens"].log() + probs["zs"].log()).softmax(1)
        probs["mix_m1"] = (probs["p1m1"] + probs["zs"]) / 2
        out[split] = {name: accuracy(p, torch.tensor(labels)) for name, p in probs.items()}
    return out


def filter_pairs(task, seed: int, backbone, models: dict) -> list[tuple[str, dict]]:
    images = cached_images(task.train_images, backbone.preprocess_cfg, "cpu", train_scale=None)
    truth = torch.tensor(task.train_labels)
    rows = []
    for pair in ((("phrase", 1), ("phrase", 2)), (("phrase", 1), ("random", 2)), (("random", 1), ("random", 2))):
        filtered = collaborative_filter([models[kind][i - 1] for kind, i in pair], backbone, images, len(images),
                                        torch.zeros(0, dtype=torch.long), 256, lambda f, m: None)
        out = {"agree": round(100 * float((filtered.labels[0] == filtered.labels[1]).float().mean()), 1)}
        for w in (0, 1):
            right, clean = filtered.labels[w] == truth, filtered.clean[w].bool()
            out[f"m{w + 1}"] = {"labels": round(100 * float(right.float().mean()), 1), "kept": int(clean.sum()),
                                "kept_right": round(100 * float(right[clean].float().mean()), 1),
                                "auroc": round(_auroc(filtered.p_clean[w], right), 3)}
        rows.append(("+".join(f"{kind}{i}" for kind, i in pair), out))
    return rows


mode, name, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
task = load_task(name, 1000, 300)
backbone = load_backbone(PROXY_MODEL, None, "cpu")
ours = phase1_models(task, seed, backbone, {}, CACHE / f"{name}-seed{seed}")
if mode == "mix":
    print(name, seed, json.dumps(label_mixes(task, seed, backbone, ours)), flush=True)
else:
    spec = phase1_models(task, seed, backbone, RANDOM_CONTEXTS, Path(f"/tmp/coft-diverse/{name}-seed{seed}"))
    for pair, out in filter_pairs(task, seed, backbone, {"phrase": ours, "random": spec}):
        print(name, seed, pair, json.dumps(out), flush=True)
