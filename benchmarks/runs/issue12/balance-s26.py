"""Scratch diagnostic (session 26): are CoFT's pseudo-labels and predictions class-imbalanced where the
true classes are balanced, and does a label-free prior correction of the final classifier help?

    OMP_NUM_THREADS=1 python benchmarks/runs/issue12/balance-s26.py TASK SEED   # from the repo root

One default CoFT run (no hflip, U = 600, 300 test images). Printed per set: its class histogram and
its imbalance (largest class / smallest class, and KL from uniform in nats). Then the final
classifier's test accuracy with its logits shifted by -tau * log(its own mean probability per class
on U): tau = 0 is the classifier as it is; tau = 1 divides out the class prior it predicts on U
(DebiasPL-style logit adjustment, from U alone). Labels are used only to measure.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tune_dev import _run  # noqa: E402

from coft.proxy.tasks import load_task  # noqa: E402


def histogram(labels: torch.Tensor, classes: int) -> str:
    counts = torch.bincount(labels, minlength=classes).float()
    share = counts / counts.sum()
    kl = float((share[share > 0] * (share[share > 0] * classes).log()).sum())
    ratio = float(counts.max() / counts.min()) if counts.min() > 0 else float("inf")
    return f"{counts.int().tolist()} max/min {ratio:.1f} KL {kl:.3f}"


def main(task_name: str, seed: int) -> None:
    task = load_task(task_name, 600, 300)
    classes = len(task.class_names)
    result = _run(task, seed, {})
    truth_u, truth_test = torch.tensor(task.train_labels), torch.tensor(task.test_labels)
    print(f"{task_name} seed {seed} accuracy {({k: round(100 * v, 1) for k, v in result.metrics['accuracy'].items()})}")
    print(f"  true U        {histogram(truth_u, classes)}")
    for name in ("zero_shot", "s_star", "filter_model1", "clean_model1", "filter_model2", "clean_model2"):
        indices, labels = result.selections[name]
        print(f"  {name:13s} {histogram(labels, classes)}")
    on_u = result.predictions.probabilities
    print(f"  final on U    {histogram(on_u.argmax(dim=1), classes)}")
    test = result.classifier.predict(task.test_images).probabilities
    prior = on_u.mean(dim=0)
    for tau in (0.0, 0.5, 1.0):
        adjusted = test.log() - tau * prior.log()
        accuracy = 100 * float((adjusted.argmax(dim=1) == truth_test).float().mean())
        print(f"  tau {tau}: test {accuracy:.1f}  predicted {histogram(adjusted.argmax(dim=1), classes)}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
