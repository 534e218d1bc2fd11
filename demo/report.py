"""The demo's outputs a person reads: a table per round and a PNG of the curves."""

from __future__ import annotations

import math
from pathlib import Path

from trainer.plots import plot_curves


def _f(x, fmt: str = ".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


CHECKS = {"reward": "the reward-model gate", "eval_set": "the eval-set gate", "kl": "the KL budget",
          "canary": "the canary"}


def describe_trial(t: dict) -> str:
    lo, hi = t["interval"]
    bound = " (the trial's bound was reached: undecided means rolled back)" if t["bounded"] else ""
    return (f"canary {t['canary']} beside {t['stable']}: {t['action']} after {t['requests']} requests "
            f"({t['canary_requests']} on the canary) in {t['seconds']:.0f} s{bound}; mean score canary "
            f"{t['mean']['canary']:.3f} (n {t['n']['canary']}) vs stable {t['mean']['stable']:.3f} "
            f"(n {t['n']['stable']}), difference {t['difference']:+.3f}, interval [{lo:+.3f}, {hi:+.3f}]: {t['reason']}")


def print_round_table(rounds: list[dict], base_gold: float, log=print) -> None:
    head = (f"{'round':>5} {'version':>7} {'deployed':>8} {'thumbs':>6} {'rating':>6} {'pref':>5} {'corr':>5} "
            f"{'implicit':>8} {'RM acc':>6} {'KL':>6} {'gold acc':>8} {'live acc':>8} {'p50 ms':>7} {'p99 ms':>7} {'train s':>7}")
    log(head)
    log(f"{'base':>5} {1:>7} {'yes':>8} {'':>6} {'':>6} {'':>5} {'':>5} {'':>8} {'':>6} {'':>6} {_f(base_gold):>8}")
    for r in rounds:
        e = r["events"]
        log(f"{r['round']:>5} {r['version']:>7} {('yes' if r['deployed'] else 'no'):>8} {e['thumbs']:>6} {e['rating']:>6} "
            f"{e['preference']:>5} {e['correction']:>5} {e['implicit']:>8} {_f(r['rm_pairwise_accuracy']):>6} "
            f"{_f(r['kl']):>6} {_f(r['gold_accuracy']):>8} {_f(r['live_accuracy']):>8} {_f(r['p50_ms'], '.1f'):>7} "
            f"{_f(r['p99_ms'], '.1f'):>7} {_f(r['train_seconds'], '.0f'):>7}")
        if r["gate"]:
            log(f"      gate refused: {'; '.join(r['gate'])}")
        if r.get("canary"):
            log(f"      {describe_trial(r['canary'])}")
        if r.get("stopped_by"):
            log(f"      not deployed (candidate gold acc {_f(r.get('candidate_gold_accuracy'))}): "
                f"stopped by {', '.join(CHECKS.get(c, c) for c in r['stopped_by'])}")


def write_report_png(path: Path, result: dict) -> Path:
    rounds = result["rounds"]

    def series(key: str, base=None) -> tuple[list[int], list[float]]:
        xs = [r["round"] for r in rounds]
        ys = [float("nan") if r[key] is None else r[key] for r in rounds]
        return ([0] + xs, [base] + ys) if base is not None else (xs, ys)

    return plot_curves(path, "fuseloop demo: the model getting better", {
        "gold accuracy (test split, greedy)": series("gold_accuracy", result["base_gold_accuracy"]),
        "live accuracy (served answers)": series("live_accuracy"),
        "KL to reference": series("kl", 0.0),
        "RM held-out pairwise accuracy": series("rm_pairwise_accuracy"),
    }, xlabel="round (0 = base)")
