"""Replay Ray's ASHA on a finished FIFO sweep's learning curves: what would early stopping have
saved, and would it have kept FIFO's winner, for other reduction factors, grace periods and orders
in which the trials are drawn?

    python -m bench.asha_replay runs/sweeps/bench-sweep-n16-fifo          # the sweep's own order
    python -m bench.asha_replay runs/sweeps/bench-sweep-n16-fifo --orders 300 --rf 3 4 --grace 1 2

Why: a FIFO sweep trains every trial to its last epoch, so its curves say what every trial would
have reported at every rung. Feeding them, in draw order and ``concurrency`` at a time, to Ray's own
``AsyncHyperBandScheduler`` replays the decisions an ASHA sweep of the same trials makes, in
seconds instead of a sweep's hours (runs are deterministic: an ASHA sweep's curves match FIFO's
epoch by epoch). The one modelled part is timing, which decides the order in which asynchronous
results reach the rungs: a trial's epoch costs its ``train.batch_size`` (samples per step) plus a
fixed start-up cost per trial. Random draw orders (``--orders``) show how much a single measured
sweep owes to where the winner happened to be drawn.
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import random
import sys
from dataclasses import dataclass
from typing import Any

START_COST = 1.25  # a trial's start-up, in epochs of a batch-32 trial (~25 s vs ~20 s measured here)


@dataclass
class Curve:
    trial: str
    config: dict[str, Any]
    values: list[float]  # the metric after epoch 1, 2, ...

    @property
    def epoch_cost(self) -> float:
        return float(self.config.get("train.batch_size", 32)) / 32.0


@dataclass
class _Trial:  # what AsyncHyperBandScheduler reads from a trial
    trial_id: str


def load_curves(sweep_dir: str) -> tuple[list[Curve], str, str]:
    """Curves of a finished FIFO sweep, in draw order, with its metric and mode."""
    with open(os.path.join(sweep_dir, "sweep_summary.json")) as f:
        s = json.load(f)
    if s["scheduler"]["type"] != "fifo":
        raise ValueError(f"{sweep_dir} is a {s['scheduler']['type']} sweep; replay needs a fifo one "
                         f"(every trial trained to its last epoch)")
    from bench.sweep_asha_vs_fifo import in_draw_order

    curves = [Curve(t["trial"], t["config"], [v for _, v in t["curve"]]) for t in in_draw_order(s["trials"])]
    return curves, s["metric"], s["mode"]


def replay(curves: list[Curve], reduction_factor: float, grace_period: int, concurrency: int,
           mode: str = "max") -> tuple[int, float]:
    """(epochs trained, best metric seen) of ASHA over these trials, ``concurrency`` at a time."""
    from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler

    max_t = max(len(c.values) for c in curves)
    asha = AsyncHyperBandScheduler(time_attr="epoch", metric="m", mode=mode, max_t=max_t,
                                   grace_period=grace_period, reduction_factor=reduction_factor)
    events: list[tuple[float, int, int]] = []  # (finish time, trial index, epoch)
    waiting = list(range(len(curves)))
    epochs, best = 0, None

    def start(i: int, now: float) -> None:
        asha.on_trial_add(None, _Trial(str(i)))
        heapq.heappush(events, (now + START_COST + curves[i].epoch_cost, i, 1))

    for _ in range(min(concurrency, len(waiting))):
        start(waiting.pop(0), 0.0)
    while events:
        now, i, epoch = heapq.heappop(events)
        value = curves[i].values[epoch - 1]
        epochs += 1
        better = best is None or (value > best if mode == "max" else value < best)
        best = value if better else best
        action = asha.on_trial_result(None, _Trial(str(i)), {"epoch": epoch, "m": value})
        if action == TrialScheduler.STOP or epoch == len(curves[i].values):
            if waiting:
                start(waiting.pop(0), now)
        else:
            heapq.heappush(events, (now + curves[i].epoch_cost, i, epoch + 1))
    return epochs, float(best)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.asha_replay", description=__doc__.split("\n\n")[0])
    p.add_argument("sweep_dir", help="a finished FIFO sweep's folder (holds sweep_summary.json)")
    p.add_argument("--rf", type=float, nargs="+", default=[3, 4], help="reduction factors to replay")
    p.add_argument("--grace", type=int, nargs="+", default=[1], help="grace periods (epochs) to replay")
    p.add_argument("--concurrency", type=int, default=2, help="trials at a time (the sweep's concurrency)")
    p.add_argument("--orders", type=int, default=0, help="also replay this many random draw orders")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-gap", type=float, default=0.01, help="the quality goal, in metric units")
    p.add_argument("--max-ratio", type=float, default=0.40, help="the epoch goal, as a share of FIFO's")
    args = p.parse_args(argv)
    try:
        curves, metric, mode = load_curves(args.sweep_dir)
    except (OSError, ValueError, KeyError) as e:
        print(f"asha_replay: error: {e}", file=sys.stderr)
        return 2
    full = sum(len(c.values) for c in curves)
    fifo_best = (max if mode == "max" else min)(v for c in curves for v in c.values)
    print(f"FIFO: {len(curves)} trials, {full} epochs, best {metric} {fifo_best:.4f}")
    rng = random.Random(args.seed)
    orders = [list(range(len(curves)))] + [rng.sample(range(len(curves)), len(curves)) for _ in range(args.orders)]
    for rf in args.rf:
        for grace in args.grace:
            runs = [replay([curves[i] for i in order], rf, grace, args.concurrency, mode) for order in orders]
            gaps = [abs(fifo_best - b) for _, b in runs]
            ratios = [e / full for e, _ in runs]
            line = (f"rf {rf:g}, grace {grace}: draw order {runs[0][0]}/{full} epochs ({ratios[0]:.0%}), "
                    f"gap {100 * gaps[0]:.2f} pt")
            if args.orders:
                met = sum(g <= args.max_gap and r <= args.max_ratio for g, r in zip(gaps[1:], ratios[1:]))
                kept = sum(g <= args.max_gap for g in gaps[1:])
                line += (f"; {args.orders} random orders: mean {sum(ratios[1:]) / args.orders:.0%} of the epochs, "
                         f"mean gap {100 * sum(gaps[1:]) / args.orders:.2f} pt, within the gap in "
                         f"{kept / args.orders:.0%}, both goals in {met / args.orders:.0%}")
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
