"""Diagnostic (session 30): label propagation (Zhou et al. 2004) from S* over a kNN graph of the frozen proxy features, against zero-shot's labels.

    python benchmarks/runs/issue12/labelprop-s30.py NUM_TRAIN   # precision on U and accuracy on the test split
"""
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from coft.backbone import load_backbone
from coft.config import CoFTConfig
from coft.image_cache import cached_images
from coft.prompts import template_features
from coft.pseudo_labels import s_star
from coft.schedule import round_top_k
from coft.stages import encode
from coft.proxy.tasks import DEV_TASKS, load_task

def propagate(features, seeds, seed_labels, classes, k=10, alpha=0.99, iters=30):
    sim = features @ features.T
    sim.fill_diagonal_(-1)
    values, idx = sim.topk(k, dim=1)
    w = torch.zeros_like(sim).scatter_(1, idx, values.clamp(min=0) ** 3)
    w = w + w.T
    d = w.sum(1).clamp(min=1e-8)
    s = w / d.sqrt()[:, None] / d.sqrt()[None, :]
    y = torch.zeros(len(features), classes); y[seeds, seed_labels] = 1
    f = y.clone()
    for _ in range(iters):
        f = alpha * s @ f + (1 - alpha) * y
    return f

bb = load_backbone("proxy", device="cpu")
config = CoFTConfig()
n = int(sys.argv[1])
for name in DEV_TASKS:
    task = load_task(name, n, 300)
    train = cached_images(task.train_images, bb.preprocess_cfg, bb.device)
    test = cached_images(task.test_images, bb.preprocess_cfg, bb.device, train_scale=None)
    text = template_features(bb, task.class_names, config.pseudo_labels)
    ftr, fte = encode(bb, train, 256), encode(bb, test, 256)
    truth, ttruth = torch.tensor(task.train_labels), torch.tensor(task.test_labels)
    probs = (bb.logit_scale * ftr @ text.T).softmax(1)
    C = len(task.class_names)
    k = round_top_k(config, 1, len(ftr), C)
    idx, lab = s_star(probs, k, len(ftr))
    zs = probs.argmax(1)
    out = [f"{name}@{n}: zero-shot on U {100*(zs==truth).float().mean():.1f}, test {100*((fte@text.T).argmax(1)==ttruth).float().mean():.1f}; S* {100*(lab==truth[idx]).float().mean():.1f} ({len(idx)})"]
    allf = torch.cat([ftr, fte])
    for kk in (10, 20):
        for alpha in (0.9, 0.99):
            f = propagate(allf, idx, lab, C, kk, alpha)
            pu, pt = f[:len(ftr)].argmax(1), f[len(ftr):].argmax(1)
            # combined: propagated scores (normalised) times zero-shot probs
            fn = f / f.sum(1, keepdim=True).clamp(min=1e-8)
            comb = (fn[:len(ftr)].clamp(min=1e-6).log() + probs.log()).argmax(1)
            out.append(f"k{kk} a{alpha}: U {100*(pu==truth).float().mean():.1f} test {100*(pt==ttruth).float().mean():.1f} comb-U {100*(comb==truth).float().mean():.1f}")
    print("; ".join(out), flush=True)
