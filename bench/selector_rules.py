"""How each label-free score would have chosen, on VALIDATION fields: the measurement behind lmadda.selection.selector's default.

Reads the per-crop scores and validation Pearson that bench/adapt_recipes.py kept for every candidate
of every target (bench/results/adapt_recipes_selection.jsonl) and replays `lmadda.selection.selector.decide`
with each score and fallback rule. Per rule it prints, over the targets: the mean regret against the
best candidate by validation labels, how often the choice fell below the unadapted model by more than
0.01 (harm), and the share of the unadapted-to-best gap it recovered.

    .venv/bin/python bench/selector_rules.py [--results bench/results/adapt_recipes_selection.jsonl]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from lmadda.selection.selector import SCORES, UNADAPTED, decide

RULES = [(0.5 + 1e-9, 0.0), (0.75, 0.1), (0.75, 0.25), (0.9, 0.25), (0.75, 0.5)]  # (min_win_fraction, min_gain)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="bench/results/adapt_recipes_selection.jsonl")
    args = parser.parse_args()
    targets = [json.loads(line) for line in Path(args.results).read_text().splitlines() if line.strip()]
    latest = {(t["experiment"], t["target"]): t for t in targets}  # a re-run target replaces its earlier record
    print(f"{len(latest)} targets: " + ", ".join(f"{e}/{t}" for e, t in latest))
    print(f"\n{'score (+guard)':22s} {'win':>5s} {'gain':>5s} {'regret':>7s} {'harm':>5s} {'recovered':>9s}  choices")
    for score, guard in [(score, None) for score in SCORES] + [("feature_gap", "consensus"), ("output_w1", "consensus")]:
        for win, gain in RULES:
            regrets, harms, recovered, picks = [], 0, [], []
            for (experiment, target), record in latest.items():
                pearson = record["val_pearson"]
                # the study's candidates: FDA needs source images at run time, so no checkpoint carries it
                per_crop = {name: np.asarray(values) for name, values in record["per_crop"][score].items() if name != "fda"}
                floor = record.get("floor", {}).get(score)  # targets recorded before the floor existed have none
                guarded = None if guard is None else {n: np.asarray(v) for n, v in record["per_crop"][guard].items() if n != "fda"}
                choice = decide(per_crop, score, floor=None if floor is None else np.asarray(floor), guard=guarded,
                                min_win_fraction=win, min_gain=gain)
                pearson = {name: value for name, value in pearson.items() if name != "fda"}
                best = max(pearson.values())
                chosen, base = pearson[choice.chosen], pearson[UNADAPTED]
                regrets.append(best - chosen)
                harms += chosen < base - 0.01
                if best - base >= 0.05:
                    recovered.append((chosen - base) / (best - base))
                picks.append(choice.chosen.split(":")[0] + (":" + choice.chosen.split(":")[1] if ":" in choice.chosen else ""))
            label = score + (f"+{guard}" if guard else "")
            print(f"{label:22s} {win:5.2f} {gain:5.2f} {np.mean(regrets):7.3f} {harms:5d} "
                  f"{np.mean(recovered) if recovered else float('nan'):9.0%}  {', '.join(picks)}")


if __name__ == "__main__":
    main()
