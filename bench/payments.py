#!/usr/bin/env python3
"""Benchmark of the payment checks (ray_on_golem section 7, Payments).

Figures (median of --runs runs, µs per document on this machine):
  - `Spending.decide` on honest debit notes: the whole acceptance logic (counters against the
    elapsed time, amount against the counters and the prices, the budget), exact decimals;
  - baseline measured in the same run: golem-core's own checks of a debit note
    (`validate_payment_calculated_cost` + `validate_payment_max_cost`), which the
    DefaultPaymentManager runs before accepting;
  - `AgreementAccount.exposure`: what the budget policy computes per agreement each second.

    /work/venv/bin/python bench/payments.py [--notes 2000] [--runs 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ray_on_golem as rog  # noqa: E402

TERMS = rog.PriceTerms(usage_vector=("golem.usage.cpu_sec", "golem.usage.duration_sec"),
                       prices=(Decimal("0.000027777777777778"), Decimal("0.000005555555555556")),
                       start=Decimal("0.001"), cpu_threads=8, debit_note_interval_s=180)


def honest_notes(count: int) -> list[tuple[str, Decimal, list[float], float]]:
    """Debit notes of `count // 50` agreements, 50 notes each, every 180 s, half the CPUs busy."""
    notes = []
    for i in range(count):
        elapsed = 180.0 * (i % 50 + 1)
        counters = [round(elapsed * 4, 6), round(elapsed, 6)]
        amount = TERMS.cost([Decimal(str(c)) for c in counters]).quantize(Decimal("1e-18"))
        notes.append((f"agreement-{i // 50}", amount, counters, elapsed))
    return notes


def ours(notes) -> float:
    spending = rog.Spending(Decimal(10**9))
    start = time.perf_counter()
    for agreement, amount, counters, elapsed in notes:
        verdict = spending.decide(TERMS, "debit_note", agreement, "activity", amount, counters, elapsed)
        assert verdict.accept, verdict
    return (time.perf_counter() - start) / len(notes) * 1e6


def golem_core(notes) -> float:
    from golem.resources.utils.infrastructure import InfrastructureProps
    from golem.resources.utils.payment import (
        LinearCoeffs,
        validate_payment_calculated_cost,
        validate_payment_max_cost,
    )

    coeffs = LinearCoeffs(usage_vector=list(TERMS.usage_vector), price_cpu_sec=TERMS.prices[0],
                          price_duration_sec=TERMS.prices[1], price_initial=TERMS.start)
    inf = InfrastructureProps.from_properties({"golem.inf.cpu.threads": TERMS.cpu_threads})
    start = time.perf_counter()
    for _, amount, counters, elapsed in notes:
        validate_payment_calculated_cost(coeffs=coeffs, amount=amount, usage_counter_vector=counters)
        validate_payment_max_cost(coeffs=coeffs, inf=inf, duration=timedelta(seconds=elapsed), amount=amount)
    return (time.perf_counter() - start) / len(notes) * 1e6


def exposure(count: int) -> float:
    spending = rog.Spending(Decimal(10**9))
    accounts = [rog.AgreementAccount(f"a{i}", None, "0x" + "00" * 20, TERMS, 1000.0 + i) for i in range(count)]
    start = time.perf_counter()
    for account in accounts:
        account.exposure(spending, account.covered_until(5000.0))
    return (time.perf_counter() - start) / count * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--notes", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    notes = honest_notes(args.notes)
    ours(notes[:100]), golem_core(notes[:100])  # warm-up: imports, caches
    rows = {"Spending.decide (ours)": [], "golem-core checks (baseline)": [], "AgreementAccount.exposure": []}
    for _ in range(args.runs):
        rows["Spending.decide (ours)"].append(ours(notes))
        rows["golem-core checks (baseline)"].append(golem_core(notes))
        rows["AgreementAccount.exposure"].append(exposure(args.notes))
    baseline = statistics.median(rows["golem-core checks (baseline)"])
    print(f"payment checks: {args.notes} debit notes, median of {args.runs} runs")
    print(f"{'what':32} {'µs/document':>12} {'vs baseline':>12}")
    for name, values in rows.items():
        median = statistics.median(values)
        print(f"{name:32} {median:12.1f} {median / baseline:11.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
