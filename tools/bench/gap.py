"""`edgecollab bench gap`: does the worker's confidence signal tell right answers from wrong?

Reads two `bench sampling --details` outputs on the same labelled set: the general model's
(the role it plays in the stack) and the expert's. Per domain:

- how well each signal (`confidence`, the mean probability of the first tokens; `entropy`,
  negated) separates the general model's right answers from its wrong ones: AUROC (0.5: no
  better than chance; 1: every right answer scores above every wrong one);
- a threshold chosen on one half of the items (even positions) for the rule the orchestrator
  applies, "below it, the expert's answer is the answer", maximising that rule's accuracy
  (ties: the fewest questions to the expert), then checked on the other half (odd positions),
  and the same with the halves swapped;
- the general model alone, the expert alone, and the best any rule could do (right when
  either is right) on each half.

Prints JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tools.common import print_json

Item = dict[str, object]


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("gap", help="the knowledge-gap signal: AUROC and a held-out threshold")
    parser.add_argument("--general", type=Path, required=True, help="bench sampling JSON")
    parser.add_argument("--expert", type=Path, required=True, help="bench sampling JSON")
    parser.add_argument("--setting", default="baseline", help="the general model's setting")
    parser.add_argument("--expert-setting", default="baseline")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    general = _items(args.general, args.setting)
    expert = _items(args.expert, args.expert_setting)
    report: dict[str, object] = {
        "general": {"file": str(args.general), "setting": args.setting},
        "expert": {"file": str(args.expert), "setting": args.expert_setting},
        "domains": {d: analyse(general[d], expert.get(d, [])) for d in general},
    }
    print_json(report)
    return 0


def _items(path: Path, setting: str) -> dict[str, list[Item]]:
    try:
        data = json.loads(path.read_text())
        domains = data["settings"][setting]["domains"]
    except (OSError, ValueError, KeyError) as exc:
        raise SystemExit(f"bench gap: {path}: no setting {setting!r} ({exc})") from None
    return {d: list(r["items"]) for d, r in domains.items()}


def analyse(general: list[Item], expert: list[Item]) -> dict[str, object]:
    """AUROC of both signals; with the expert's answers, the held-out threshold rule."""
    scored = [g for g in general if g["confidence"] is not None]
    right = [bool(g["correct"]) for g in scored]
    result: dict[str, object] = {
        "n": len(scored),
        "general_correct": sum(right),
        "auroc": {
            "confidence": auroc([float(g["confidence"]) for g in scored], right),  # type: ignore[arg-type]
            "entropy": auroc([-float(g["entropy"]) for g in scored], right),  # type: ignore[arg-type]
            "confidence_even": auroc(
                [float(g["confidence"]) for g in scored[0::2]],
                right[0::2],  # type: ignore[arg-type]
            ),
            "confidence_odd": auroc(
                [float(g["confidence"]) for g in scored[1::2]],
                right[1::2],  # type: ignore[arg-type]
            ),
        },
    }
    by_id = {str(e["id"]): bool(e["correct"]) for e in expert}
    paired = [(g, by_id[str(g["id"])]) for g in scored if str(g["id"]) in by_id]
    if paired:
        halves = (paired[0::2], paired[1::2])
        result["halves"] = {
            "chosen_on_even": held_out(*halves),
            "chosen_on_odd": held_out(halves[1], halves[0]),
        }
    return result


def auroc(scores: list[float], right: list[bool]) -> float | None:
    """P(a right answer scores above a wrong one), ties counting half (None: one class only)."""
    pos = [s for s, r in zip(scores, right, strict=True) if r]
    neg = [s for s, r in zip(scores, right, strict=True) if not r]
    if not pos or not neg:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return round(wins / (len(pos) * len(neg)), 3)


Pair = tuple[Item, bool]  # the general model's item, and whether the expert was right


def held_out(choose: list[Pair], check: list[Pair]) -> dict[str, object]:
    """The threshold best on `choose`, and what every arm scores on `check`."""
    candidates = sorted({0.0, *(float(g["confidence"]) + 1e-6 for g, _ in choose)})  # type: ignore[arg-type]
    best = max(candidates, key=lambda t: (_rule(choose, t)[0], -_rule(choose, t)[1]))
    correct, asked = _rule(check, best)
    return {
        "threshold": round(best, 4),
        "chosen_on": len(choose),
        "checked_on": len(check),
        "general_alone": sum(bool(g["correct"]) for g, _ in check),
        "expert_alone": sum(e for _, e in check),
        "cooperating": correct,
        "asked_expert": asked,
        "either_right": sum(bool(g["correct"]) or e for g, e in check),
    }


def _rule(pairs: list[Pair], threshold: float) -> tuple[int, int]:
    """(right answers, questions to the expert) when below `threshold` the expert answers."""
    asked = [float(g["confidence"]) < threshold for g, _ in pairs]  # type: ignore[arg-type]
    correct = sum(e if a else bool(g["correct"]) for (g, e), a in zip(pairs, asked, strict=True))
    return correct, sum(asked)
