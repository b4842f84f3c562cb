"""Paired comparison of two sets of runs printed by `tune_dev.py pipeline` (one line per task and seed).

    python benchmarks/paired.py runs/a.log runs/b.log [--stage final] [--names A B]
    python benchmarks/paired.py runs/x.log runs/x.log --phase2 '{}' '{"lr": 0.0005}' [--stage model1]
        `tune_dev.py phase2` lines instead, side A those of the first override set, B of the second
        (stages: model1, model2, final). Override set `phase1` is the Phase I models the clean sets
        come from (model1 and model2 only): `--phase2 phase1 '{}' --stage model1`.
    python benchmarks/paired.py runs/x.log runs/x.log --overrides '{}' '{"phase1": {"hflip": true}}'
        `tune_dev.py pipeline` lines of one override set per side, where one log holds several.
    python benchmarks/paired.py runs/a.log runs/b.log --accuracy fixmatch-da fixmatch-da
        `accuracy.py` lines (`TASK METHOD seed N: ACCURACY (...s)`) of one method per side.
    python benchmarks/paired.py runs/x.log runs/x.log --stage final --stage-b phase1_model1
        two accuracies of the same runs (side B reads `--stage-b`).

Pairs runs by (task, seed); prints each side's per-task mean over seeds, then the paired difference
B - A: its mean over all pairs and the standard error of that mean (std of the differences / sqrt(n)).
A difference within about two standard errors of zero is noise.
"""

from __future__ import annotations

import argparse
import ast
import math
import re
import statistics
from pathlib import Path

LINE = re.compile(r"^(?P<task>\S+) (?P<method>\S+) seed (?P<seed>\d+) (?P<overrides>.*?): test (?P<accuracy>\{.*?\});")
ACCURACY_LINE = re.compile(r"^(?P<task>\S+) (?P<method>\S+) seed (?P<seed>\d+): (?P<accuracy>[\d.]+) \(")
PHASE2_LINE = re.compile(r"^(?P<task>\S+) seed (?P<seed>\d+) phase2 (?P<overrides>.*?): test model1/model2/final "
                         r"(?P<model1>[\d.]+) / (?P<model2>[\d.]+)(?: / (?P<final>[\d.]+))?;")


def read_runs(path: Path, stage: str, phase2_overrides: str | None = None,
              overrides: str | None = None, accuracy_method: str | None = None) -> dict[tuple[str, int], float]:
    runs = {}
    for line in path.read_text().splitlines():
        if accuracy_method is not None:
            match = ACCURACY_LINE.match(line)
            if match and match["method"] == accuracy_method:
                runs[(match["task"], int(match["seed"]))] = float(match["accuracy"])
            continue
        if phase2_overrides is not None:
            match = PHASE2_LINE.match(line)
            if match and match["overrides"] == phase2_overrides and match[stage] is not None:
                runs[(match["task"], int(match["seed"]))] = float(match[stage])
            continue
        match = LINE.match(line)
        if match and (overrides is None or match["overrides"] == overrides):
            accuracy = ast.literal_eval(match["accuracy"])
            runs[(match["task"], int(match["seed"]))] = float(accuracy[stage])
    return runs


def compare(a: dict, b: dict, names: tuple[str, str]) -> str:
    pairs = sorted(set(a) & set(b))
    if not pairs:
        raise SystemExit("no (task, seed) in both files")
    tasks = sorted({task for task, _ in pairs})
    lines = [f"| task | {names[0]} | {names[1]} | {names[1]} - {names[0]} |", "|---|---|---|---|"]
    for task in tasks:
        seeds = [seed for t, seed in pairs if t == task]
        left, right = [a[(task, s)] for s in seeds], [b[(task, s)] for s in seeds]
        lines.append(f"| {task} (seeds {', '.join(map(str, seeds))}) | "
                     f"{' / '.join(f'{v:.1f}' for v in left)} = {statistics.mean(left):.1f} | "
                     f"{' / '.join(f'{v:.1f}' for v in right)} = {statistics.mean(right):.1f} | "
                     f"{statistics.mean(right) - statistics.mean(left):+.1f} |")
    differences = [b[p] - a[p] for p in pairs]
    error = statistics.stdev(differences) / math.sqrt(len(differences)) if len(differences) > 1 else float("nan")
    lines.append(f"| **mean of {len(pairs)} paired runs** | {statistics.mean(a[p] for p in pairs):.1f} | "
                 f"{statistics.mean(b[p] for p in pairs):.1f} | "
                 f"**{statistics.mean(differences):+.2f} ± {error:.2f}** (SE) |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    parser.add_argument("--stage", default="final", help="which accuracy to compare (final, zero_shot, ...)")
    parser.add_argument("--stage-b", default=None, help="side B's accuracy, when it is another (default: --stage)")
    parser.add_argument("--names", nargs=2, default=None)
    parser.add_argument("--phase2", nargs=2, metavar=("A_OVERRIDES", "B_OVERRIDES"),
                        help="compare `tune_dev.py phase2` lines of these two override sets, as printed")
    parser.add_argument("--overrides", nargs=2, metavar=("A_OVERRIDES", "B_OVERRIDES"),
                        help="compare `tune_dev.py pipeline` lines of these two override sets, as printed")
    parser.add_argument("--accuracy", nargs=2, metavar=("A_METHOD", "B_METHOD"),
                        help="compare `accuracy.py` lines of these two methods, as printed")
    args = parser.parse_args()
    phase2 = args.phase2 or (None, None)
    overrides = args.overrides or (None, None)
    methods = args.accuracy or (None, None)
    names = tuple(args.names) if args.names else (args.a.stem, args.b.stem)
    print(compare(read_runs(args.a, args.stage, phase2[0], overrides[0], methods[0]),
                  read_runs(args.b, args.stage_b or args.stage, phase2[1], overrides[1], methods[1]), names))


if __name__ == "__main__":
    main()
