"""Session 21 diagnostic (run from the repo root: python benchmarks/runs/issue12/labels-s21.py TASK SEED): how right are Phase I's labels on U against zero-shot's, and their combinations? (labels only to measure)"""
import sys, json, torch
sys.path.insert(0, "/work/main"); sys.path.insert(0, "/work/main/benchmarks")
from pathlib import Path
from tune_dev import _run, NO_FLIP, _merge
from coft.proxy.tasks import load_task
from coft.backbone import load_backbone, PROXY_MODEL
from coft.phase1 import PromptModel, score_images
from coft.config import CoFTConfig
from coft.image_cache import cached_images
from coft.stages import TrainedPrompts, ZeroShot
from coft.prompts import template_features
task_name, seed = sys.argv[1], int(sys.argv[2])
d = Path(f"/tmp/labdiag/{task_name}-{seed}")
task = load_task(task_name, 1000, 300)
result = _run(task, seed, {"phase2": {"epochs": 0}}, checkpoint_dir=d)
config = CoFTConfig.from_dict(_merge(NO_FLIP, {}) | {"seed": seed})
backbone = load_backbone(PROXY_MODEL, None, "cpu")
truth = torch.tensor(task.train_labels)
test_truth = torch.tensor(task.test_labels)
out = {}
for split, imgs, y in (("U", task.train_images, truth), ("test", task.test_images, test_truth)):
    src = cached_images(imgs, backbone.preprocess_cfg, "cpu", train_scale=None)
    text = template_features(backbone, task.class_names, config.pseudo_labels)
    from coft.stages import encode
    feats = encode(backbone, src, 256)
    pz = (backbone.logit_scale * feats @ text.T).softmax(1)
    probs = {"zs": pz}
    for i in (1, 2):
        tp = TrainedPrompts(**torch.load(d / f"phase1-model{i}.pt", weights_only=True))
        m = PromptModel(backbone, task.class_names, config.phase1, 0); m.load_state_dict(tp.state)
        sp, sn = score_images(m, backbone, src, 256)
        probs[f"p1m{i}"] = (sp * m.scale).softmax(1)
    probs["p1ens"] = (probs["p1m1"] + probs["p1m2"]) / 2
    probs["poe_m1"] = (probs["p1m1"].log() + probs["zs"].log()).softmax(1)
    probs["poe_ens"] = (probs["p1ens"].log() + probs["zs"].log()).softmax(1)
    probs["mix_m1"] = (probs["p1m1"] + probs["zs"]) / 2
    out[split] = {k: round(100 * float((v.argmax(1) == y).float().mean()), 1) for k, v in probs.items()}
print(task_name, seed, json.dumps(out), flush=True)
