"""The filter's quality over seeds, from the lines `tune_dev.py filter` prints (one per task, seed, model).

    python benchmarks/filter_auroc.py runs/a.log [runs/b.log ...]

Per task and model, the mean over seeds of: how many of the model's labels on U are right, the
kept and rejected sets (images, precision), and the AUROC of the other model's p_clean next to that
of the labelling model's own confidence. Then their paired difference over every (task, seed, model)
with its standard error.
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
from pathlib import Path

LINE = re.compile(r"^(?P<task>\S+) seed (?P<seed>\d+) model (?P<model>\d): labels on U (?P<right>[\d.]+)% right; "
                  r"kept (?P<kept>\d+) at (?P<kept_precision>[\d.]+)%, rejected (?P<rejected>\d+) at "
                  r"(?P<rejected_precision>[\d.]+)%; AUROC of the other model's p_clean (?P<p_clean>[\d.]+), "
                  r"of the labelling model's own confidence (?P<confidence>[\d.]+)")
FIELDS = ["right", "kept", "kept_precision", "rejected", "rejected_precision", "p_clean", "confidence"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logs", nargs="+", type=Path)
    args = parser.parse_args()
    rows: dict[tuple[str, int, int], dict[str, float]] = {}
    for path in args.logs:
        for line in path.read_text().splitlines():
            if match := LINE.match(line):
                rows[(match["task"], int(match["seed"]), int(match["model"]))] = {f: float(match[f]) for f in FIELDS}
    if not rows:
        raise SystemExit("no `tune_dev.py filter` lines in those files")
    print("| dev task | model | seeds | labels on U right (%) | kept: images (precision %) | rejected: images "
          "(precision %) | AUROC of the other model's p_clean | AUROC of the labelling model's own confidence |")
    print("|---|---|---|---|---|---|---|---|")
    for task, model in sorted({(task, model) for task, _, model in rows}):
        seeds = sorted(seed for t, seed, m in rows if (t, m) == (task, model))
        mean = {f: statistics.mean(rows[(task, s, model)][f] for s in seeds) for f in FIELDS}
        print(f"| {task} | {model} | {', '.join(map(str, seeds))} | {mean['right']:.1f} | {mean['kept']:.0f} "
              f"({mean['kept_precision']:.1f}) | {mean['rejected']:.0f} ({mean['rejected_precision']:.1f}) | "
              f"{mean['p_clean']:.3f} | {mean['confidence']:.3f} |")
    differences = [row["p_clean"] - row["confidence"] for row in rows.values()]
    error = statistics.stdev(differences) / math.sqrt(len(differences)) if len(differences) > 1 else float("nan")
    print(f"\np_clean AUROC - own-confidence AUROC over {len(differences)} (task, seed, model): "
          f"{statistics.mean(differences):+.3f} ± {error:.3f} (SE)")


if __name__ == "__main__":
    main()
