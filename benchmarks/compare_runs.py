"""Before and after: the goals of ``gpubo bench --json`` runs of two builds.

Each side is one or more result files (``gpubo bench --json``, one run
each); the runs of a side are combined as ``gpubo bench --runs N`` combines
them (each goal judged on its median over the runs, with the spread), and
the fixed costs of each run (section 2a, recomputed here from the
throughput samples so that a build without that section is measured the
same way) are reduced to their medians. Run the two builds' benches
alternately, on the same machine, with the same settings::

    for i in 1 2 3; do
        (cd before && python -m gpubo bench --json > /tmp/before-$i.json)
        (cd after && python -m gpubo bench --json > /tmp/after-$i.json)
    done
    python benchmarks/compare_runs.py --before /tmp/before-*.json --after /tmp/after-*.json

Prints a table per section and, with ``--json``, the same figures as JSON;
``--report`` prints the after side's whole report instead, as ``gpubo bench
--runs N`` prints it for its runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import Any

from gpubo.bench import combine_runs, fixed_costs, render_table
from gpubo.bench import tables as bench_tables


def _load(paths: list[str]) -> list[dict[str, Any]]:
    runs = []
    for path in paths:
        with open(path) as f:
            runs.append(json.load(f))
    return runs


def _fixed(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per case label, the median over runs of each fixed cost (us)."""
    seen: dict[str, dict[str, list[float]]] = {}
    for run in runs:
        for row in fixed_costs(run["throughput"]):
            label = f"{row['backend']}/{row['durability']}/checksums {row['checksums_where']}"
            for name in ("evict_fixed_us", "restore_fixed_us", "raw_d2h_fixed_us", "raw_h2d_fixed_us"):
                seen.setdefault(label, {}).setdefault(name, []).append(row[name])
    return {label: {k: statistics.median(v) for k, v in cols.items()} for label, cols in seen.items()}


def _ratio(value: Any) -> float:
    return float(value["of_medians"] if isinstance(value, dict) else value)


def _limits(runs: list[dict[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """Per case of 1 MiB and up, each run's eviction against its limit (the
    slower of the paired raw D2H and a plain page-cache write of the same
    bytes, so the larger of evict/D2H and evict/write) and restore/H2D."""
    seen: dict[str, dict[str, list[float]]] = {}
    for run in runs:
        for t in run["throughput"]:
            if t["nbytes"] < 1 << 20:
                continue
            for c in t["cases"]:
                case = f"{c['backend']}/{c['durability']}/checksums {c['checksums_where']}"
                label = f"{t['nbytes'] >> 20} MiB {case}"
                limit = max(_ratio(c["evict_vs_d2h"]), _ratio(c["evict_vs_write"]))
                row = seen.setdefault(label, {"evict_vs_limit": [], "restore_vs_h2d": []})
                row["evict_vs_limit"].append(limit)
                row["restore_vs_h2d"].append(_ratio(c["restore_vs_h2d"]))
    return seen


def compare(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> dict[str, Any]:
    """The goals of both sides (by name, in the after side's order) and their fixed costs."""
    b, a = combine_runs(before), combine_runs(after)
    old = {g["goal"]: g for g in b["goals"]}
    rows = []
    for g in a["goals"]:
        o = old.get(g["goal"])
        rows.append(
            {
                "goal": g["goal"],
                "target": g["target"],
                "unit": g["unit"],
                "higher": g["higher"],
                "before": None if o is None else o["value"],
                "before_spread": None if o is None else o["spread"],
                "before_met": None if o is None else o["met"],
                "after": g["value"],
                "after_spread": g["spread"],
                "after_met": g["met"],
            }
        )
    return {
        "before_runs": len(before),
        "after_runs": len(after),
        "before_gpubo": b["machine"]["gpubo"],
        "after_gpubo": a["machine"]["gpubo"],
        "goals": rows,
        "fixed_cost_before": _fixed(before),
        "fixed_cost_after": _fixed(after),
        "limit_before": _limits(before),
        "limit_after": _limits(after),
    }


def _v(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}{unit}" if abs(value) >= 100 else f"{value:.2f}{unit}"


def _spread(spread: list[float] | None, unit: str) -> str:
    return "-" if spread is None else f"{_v(spread[0], '')}-{_v(spread[1], unit)}"


def _met(met: bool | None) -> str:
    return "-" if met is None else ("met" if met else "missed")


def tables(c: dict[str, Any]) -> str:
    goal_rows = [
        [
            r["goal"],
            ("" if r["higher"] else "<= ") + _v(r["target"], r["unit"]),
            _v(r["before"], r["unit"]),
            _spread(r["before_spread"], r["unit"]),
            _met(r["before_met"]),
            _v(r["after"], r["unit"]),
            _spread(r["after_spread"], r["unit"]),
            _met(r["after_met"]),
        ]
        for r in c["goals"]
    ]
    fixed_rows = []
    for label, after in c["fixed_cost_after"].items():
        before = c["fixed_cost_before"].get(label, {})
        fixed_rows.append(
            [label]
            + [
                f"{before.get(k, float('nan')):.0f} -> {after[k]:.0f}"
                for k in ("evict_fixed_us", "restore_fixed_us", "raw_d2h_fixed_us", "raw_h2d_fixed_us")
            ]
        )

    def med(values: list[float] | None) -> str:
        if not values:
            return "-"
        return f"{statistics.median(values):.2f}x ({min(values):.2f}-{max(values):.2f})"

    limit_rows = []
    for label, after_row in c["limit_after"].items():
        before_row = c["limit_before"].get(label, {})
        limit_rows.append(
            [
                label,
                med(before_row.get("evict_vs_limit")),
                med(after_row["evict_vs_limit"]),
                med(before_row.get("restore_vs_h2d")),
                med(after_row["restore_vs_h2d"]),
            ]
        )
    return "\n".join(
        [
            f"Goals: median over {c['before_runs']} runs before, {c['after_runs']} after "
            "(spread: lowest-highest run)",
            render_table(
                ["goal", "target", "before", "spread", "", "after", "spread", ""],
                goal_rows,
            ),
            "",
            "Fixed cost per operation at the smallest size (us, median over runs; before -> after)",
            render_table(["case", "evict", "restore", "raw D2H", "raw H2D"], fixed_rows),
            "",
            "Eviction against its limit (the slower of the raw D2H and a page-cache write of the "
            "same bytes) and restore against the raw H2D: median over runs (lowest-highest)",
            render_table(["case", "evict/limit before", "after", "restore/H2D before", "after"], limit_rows),
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", nargs="+", required=True, help="result files of the old build")
    parser.add_argument("--after", nargs="+", required=True, help="result files of the new build")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument(
        "--report",
        action="store_true",
        help="print instead the after side's whole report, as gpubo bench --runs N prints it",
    )
    args = parser.parse_args(argv)
    try:
        before, after = _load(args.before), _load(args.after)
        result = compare(before, after)
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.report:
        print(bench_tables(combine_runs(after)))
    else:
        print(json.dumps(result, indent=2) if args.json else tables(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
