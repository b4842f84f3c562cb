"""Scratch diagnostic (session 25): how CoFT+'s round 2 could choose its S* without narrowing it.

    OMP_NUM_THREADS=1 python benchmarks/runs/issue12/round2-s25.py TASK SEED   # from the repo root

One Phase I model per round, as `benchmarks/diagnose.py rounds` trains it (no hflip, U = 600, 300
test images). Round 1 trains on zero-shot's S* (top-K per class, K from the share); round 2 trains a
fresh model on each of:
  constant  the top-K per class of round 1's softmax (the spec, today's default);
  product   the top-K per class of (round 1's softmax x zero-shot's softmax), labelled by its argmax;
  union     zero-shot's S* (its labels) plus round 1's top-K (round 1's labels where the two overlap).
Labels are used only to measure: each set's size and precision, and each model's test accuracy.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from diagnose import _accuracy, rounds_setup  # noqa: E402

from coft.phase1 import score_images, train_prompt_model  # noqa: E402
from coft.pseudo_labels import top_k_per_class  # noqa: E402


def main(task_name: str, seed: int) -> None:
    backbone, task, train_images, test_images, config, k, zero_shot = rounds_setup(task_name, 600)
    truth = torch.tensor(task.train_labels)

    def train_and_measure(name: str, indices: torch.Tensor, labels: torch.Tensor, round_: int):
        model, _ = train_prompt_model(backbone, task.class_names, train_images, indices, labels, config.phase1,
                                      seed=10 + 100 * round_ + 1000 * seed)
        test_pos, _ = score_images(model, backbone, test_images, 256)
        precision = 100 * float((labels == truth[indices]).float().mean())
        accuracy = 100 * _accuracy(test_pos.argmax(dim=1), task.test_labels)
        return model, f"{name}: S* {len(indices)} at {precision:.1f}% -> test {accuracy:.1f}"

    s_indices, s_labels = top_k_per_class(zero_shot, k)
    round1, line = train_and_measure("round1", s_indices, s_labels, 1)
    lines = [line]
    train_pos, _ = score_images(round1, backbone, train_images, 256)
    previous = (train_pos * round1.scale).softmax(dim=1)

    r_indices, r_labels = top_k_per_class(previous, k)
    lines.append(train_and_measure("constant", r_indices, r_labels, 2)[1])
    lines.append(train_and_measure("product", *top_k_per_class(previous * zero_shot, k), 2)[1])
    labels = torch.full((len(truth),), -1, dtype=torch.long)
    labels[s_indices] = s_labels
    labels[r_indices] = r_labels
    union = (labels >= 0).nonzero(as_tuple=True)[0]
    lines.append(train_and_measure("union", union, labels[union], 2)[1])
    print(f"{task_name} seed {seed} (K {k}): " + " | ".join(lines), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
