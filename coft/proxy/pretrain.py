"""Pretrain the proxy CLIP: a small open_clip CLIP with a ViT vision tower, on the proxy corpus.

    python -m coft.proxy.pretrain --out coft/proxy/weights

No CLIP weights can be downloaded on our machines, so tests, benchmarks and the embedded default
use this model instead. It is an ordinary open_clip model saved in open_clip's local-dir format,
so everything that runs on it runs unchanged on a real CLIP.

The contrastive loss treats every caption that is true of an image as a positive of it (the
corpus knows which attributes each caption mentions), not just the caption drawn with it:
batches hold many images of "a seven." and plain InfoNCE would push them apart.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

PROXY_CONFIG_PATH = Path(__file__).with_name("proxy_clip.json")


def render_corpus(n_samples: int, seed: int, image_size: int, processes: int = 2):
    """Render n_samples (image, caption, attributes) triples; uint8 images [N, size, size, 3].

    Scenes are drawn at the renderer's size and resized like open_clip's test transform resizes
    (bicubic), so pretraining sees what the model later sees.
    """
    chunks = [(seed * 1_000_003 + i, min(4096, n_samples - start), image_size)
              for i, start in enumerate(range(0, n_samples, 4096))]
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        parts = pool.starmap(_render_chunk, chunks)
    images = np.concatenate([p[0] for p in parts])
    captions = [c for p in parts for c in p[1]]
    attributes = [a for p in parts for a in p[2]]
    return images, captions, attributes


def _render_chunk(seed: int, count: int, image_size: int):
    from coft.proxy.corpus import sample, scene_attributes
    from coft.proxy.render import render

    rng = np.random.default_rng(seed)
    images, captions, attributes = [], [], []
    for _ in range(count):
        scene, text, said = sample(rng)
        images.append(np.asarray(_resized(render(scene), image_size)))
        captions.append((text, said))
        attributes.append(scene_attributes(scene))
    return np.stack(images), captions, attributes


def _resized(image, size: int):
    from PIL import Image

    return image if image.size == (size, size) else image.resize((size, size), Image.Resampling.BICUBIC)


def match_matrix(said: list[dict], attributes: list[dict]) -> torch.Tensor:
    """M[i, j] = 1 when caption j is true of image i."""
    keys = sorted(attributes[0])
    codes = {k: {} for k in keys}

    def code(key, value):
        return codes[key].setdefault(value, len(codes[key]))

    image_codes = torch.tensor([[code(k, a[k]) for k in keys] for a in attributes])
    caption_codes = torch.tensor([[code(k, s[k]) if k in s else -1 for k in keys] for s in said])
    agree = (image_codes[:, None, :] == caption_codes[None, :, :]) | (caption_codes[None, :, :] == -1)
    return agree.all(dim=-1).float()


def multi_positive_clip_loss(image_features, text_features, logit_scale, matches) -> torch.Tensor:
    logits = logit_scale * image_features @ text_features.T
    image_targets = matches / matches.sum(dim=1, keepdim=True)
    text_targets = matches.T / matches.T.sum(dim=1, keepdim=True)
    return (F.cross_entropy(logits, image_targets) + F.cross_entropy(logits.T, text_targets)) / 2


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("weights"))
    parser.add_argument("--samples", type=int, default=200_000, help="distinct rendered image-caption pairs")
    parser.add_argument("--minutes", type=float, default=26.0, help="training time budget (rendering not included)")
    parser.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: time budget only)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-every", type=int, default=0, help="print held-in zero-shot accuracy every N steps")
    args = parser.parse_args(argv)

    import open_clip

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    config = json.loads(PROXY_CONFIG_PATH.read_text())
    model = open_clip.CLIP(**config["model_cfg"])
    tokenizer = open_clip.SimpleTokenizer(context_length=config["model_cfg"]["text_cfg"]["context_length"])
    mean = torch.tensor(config["preprocess_cfg"]["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(config["preprocess_cfg"]["std"]).view(1, 3, 1, 1)

    started = time.time()
    image_size = config["preprocess_cfg"]["size"]
    images, captions, attributes = render_corpus(args.samples, args.seed, image_size, processes=args.threads)
    texts = [c[0] for c in captions]
    said = [c[1] for c in captions]
    tokens = tokenizer(texts)
    print(f"rendered {len(texts)} pairs in {time.time() - started:.0f}s; "
          f"{len(set(texts))} distinct captions", flush=True)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    budget_s = args.minutes * 60
    warmup = 300
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(texts))
    cursor, step, train_start = 0, 0, time.time()
    while True:
        elapsed = time.time() - train_start
        if (args.max_steps and step >= args.max_steps) or elapsed > budget_s:
            break
        # The schedule runs on the clock (or on steps, given --max-steps): the time budget is the
        # contract, and how many steps fit in it depends on the machine and what else runs on it.
        progress = step / args.max_steps if args.max_steps else elapsed / budget_s
        lr = args.lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        if cursor + args.batch_size > len(order):
            order, cursor = rng.permutation(len(texts)), 0
        idx = order[cursor:cursor + args.batch_size]
        cursor += args.batch_size

        batch = torch.from_numpy(images[idx]).permute(0, 3, 1, 2).float().div_(255)
        batch = (_augment(batch, rng) - mean) / std
        image_features = F.normalize(model.encode_image(batch), dim=-1)
        text_features = F.normalize(model.encode_text(tokens[idx]), dim=-1)
        matches = match_matrix([said[i] for i in idx], [attributes[i] for i in idx])
        loss = multi_positive_clip_loss(image_features, text_features, model.logit_scale.exp(), matches)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        step += 1
        if step % 50 == 0:
            print(f"step {step} loss {loss.item():.3f} lr {lr:.2e} scale {model.logit_scale.exp().item():.1f} "
                  f"elapsed {time.time() - train_start:.0f}s", flush=True)
        if args.eval_every and step % args.eval_every == 0:
            model.eval()
            print(f"step {step} held-in zero-shot {held_in_zero_shot(model, tokenizer, mean, std, image_size, n=200)}", flush=True)
            model.train()

    model.eval()
    for task, accuracy in held_in_zero_shot(model, tokenizer, mean, std, image_size).items():
        print(f"held-in zero-shot accuracy, {task}: {accuracy:.3f}", flush=True)
    save(model, config, args.out)
    print(f"saved to {args.out} after {step} steps, {time.time() - started:.0f}s in all", flush=True)


@torch.no_grad()
def held_in_zero_shot(model, tokenizer, mean, std, image_size: int, n: int = 500) -> dict[str, float]:
    """Zero-shot accuracy on fresh scenes from the pretraining distribution: did it learn?"""
    from coft.proxy.corpus import random_scene
    from coft.proxy.render import DIGIT_WORDS, SHAPES, render

    rng = np.random.default_rng(12345)
    results = {}
    for kind, names in (("digit", DIGIT_WORDS), ("shape", SHAPES)):
        scenes = []
        while len(scenes) < n:
            scene = random_scene(rng)
            if scene.kind == kind:
                scenes.append(scene)
        pixels = torch.from_numpy(np.stack([np.asarray(_resized(render(s), image_size)) for s in scenes]))
        pixels = pixels.permute(0, 3, 1, 2).float() / 255
        image_features = F.normalize(model.encode_image((pixels - mean) / std), dim=-1)
        text_features = F.normalize(model.encode_text(tokenizer([f"a photo of a {c}." for c in names])), dim=-1)
        predicted = (image_features @ text_features.T).argmax(dim=1)
        results[kind] = (predicted == torch.tensor([s.label for s in scenes])).float().mean().item()
    return results


def _augment(batch: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """A small random translation (pad, crop back); colours stay, since captions name them."""
    pad = max(1, batch.shape[-1] // 16)
    padded = F.pad(batch, (pad, pad, pad, pad), mode="replicate")
    dx, dy = rng.integers(0, 2 * pad + 1, size=2)
    return padded[:, :, dy:dy + batch.shape[2], dx:dx + batch.shape[3]]


def save(model: torch.nn.Module, config: dict, out: Path) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    # Half precision halves the file; open_clip casts back to fp32 on load.
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "open_clip_model.safetensors"))
    (out / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n")


if __name__ == "__main__":
    main()
