"""``python -m tests.benchmarks``: run the benchmark parts, print the table, optionally write JSON.

Default: every part at a modest size (1M-task scale included). ``--quick``: smaller everything, about
two minutes. ``--smoke``: tiny sizes, to check that every part still runs (the figures mean nothing;
the test suite runs it). ``--only`` picks parts; ``--postgres`` adds the PostgreSQL claim runs (URL
from TASK_ORCHESTRATOR_TEST_POSTGRES_URL or ``--postgres-url``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.benchmarks import claims, latency, memory, scale, startup
from tests.benchmarks.common import Result, Workspace, machine
from tests.support import fresh_postgres_database, postgres_admin_url

PARTS = ("startup", "latency", "claims", "scale", "memory")


@dataclass(frozen=True)
class _Sizes:
    """How much each part does, per mode."""

    startup_repeats: int
    latency_calls: int
    claim_workers: tuple[int, ...]
    claim_seconds: float
    claim_rounds: int  # odd: the median is a real round
    scale_sizes: tuple[int, ...]
    scale_calls: int
    scale_rounds: int
    memory_calls: int
    memory_every: int = 500


_FULL = _Sizes(10, 1000, (1, 2, 4, 8, 16), 3.0, 5, (10_000, 100_000, 1_000_000), 500, 3, 10_000)
_QUICK = _Sizes(5, 300, (1, 2, 4, 8, 16), 1.5, 1, (10_000, 100_000), 200, 1, 2000)
_SMOKE = _Sizes(1, 20, (2,), 0.3, 1, (1_000, 2_000), 20, 1, 200, memory_every=50)


def _args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes: about two minutes")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes: checks that every part runs; figures meaningless"
    )
    parser.add_argument("--only", action="append", choices=PARTS, help="run only this part (repeatable)")
    parser.add_argument("--scale-max", type=int, default=None, help="largest scale size (default 1000000)")
    parser.add_argument("--postgres", action="store_true", help="also run the claim benchmark on PostgreSQL")
    parser.add_argument("--postgres-url", default=None, help="admin URL (default: the test env variable)")
    parser.add_argument("--workers", default=None, help="comma-separated W values (default 1,2,4,8,16)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the temporary databases")
    return parser.parse_args(argv)


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return ""
    text = f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}" if abs(value) < 1 else f"{value:.1f}"
    return f"{text} {unit}".strip()


def table(results: list[Result]) -> str:
    """The results as a fixed-width text table."""
    header = ("part", "measurement", "value", "floor", "ratio", "goal", "met")
    rows = [header]
    for r in results:
        met = "" if r.ok is None else "yes" if r.ok else "NO"
        ratio = "" if r.ratio is None else f"{r.ratio:.2f}x"
        extra = ""
        if "double_claims" in r.extra:
            extra = f" (dbl {r.extra['double_claims']}, err {r.extra['errors']})"
        if "call_ms" in r.extra:
            call = r.extra["call_ms"]
            extra += f" [call p99 {_fmt(call[99], 'ms')}, max {_fmt(call['max'], 'ms')}]"
        rows.append(
            (r.part, r.name + extra, _fmt(r.value, r.unit), _fmt(r.floor, r.unit), ratio, r.goal, met)
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the selected parts; exit 1 when any goal is missed."""
    args = _args(argv)
    parts = args.only or list(PARTS)
    mode = _SMOKE if args.smoke else _QUICK if args.quick else _FULL
    sizes = list(mode.scale_sizes)
    if args.scale_max:
        sizes = [n for n in (10_000, 100_000, 1_000_000) if n <= args.scale_max] or [args.scale_max]
    workers = [int(w) for w in args.workers.split(",")] if args.workers else list(mode.claim_workers)
    info = machine()
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()), flush=True)
    results: list[Result] = []
    plans: list[str] = []
    timings: dict[str, float] = {}
    root = Path(tempfile.mkdtemp(prefix="tom-bench-"))
    ws = Workspace(root)
    failed: list[str] = []
    try:
        for part in parts:
            started = time.perf_counter()
            print(f"-- {part} ...", file=sys.stderr, flush=True)
            try:
                if part == "startup":
                    results += startup.run(ws, repeats=mode.startup_repeats)
                elif part == "latency":
                    results += asyncio.run(latency.run(ws, calls=mode.latency_calls))
                elif part == "claims":
                    pg_url: str | None = None
                    kwargs: dict[str, Any] = {
                        "worker_counts": workers,
                        "seconds": mode.claim_seconds,
                        "rounds": mode.claim_rounds,
                    }
                    admin = args.postgres_url or postgres_admin_url()
                    if args.postgres and admin:
                        with fresh_postgres_database(admin) as pg_url:
                            results += claims.run(ws, postgres_url=pg_url, **kwargs)
                    else:
                        if args.postgres:
                            print("no PostgreSQL URL: skipping the PostgreSQL runs", file=sys.stderr)
                        results += claims.run(ws, **kwargs)
                elif part == "scale":
                    found, plans = scale.run(
                        ws, sizes=sizes, calls=mode.scale_calls, rounds=mode.scale_rounds
                    )
                    results += found
                elif part == "memory":
                    results += asyncio.run(memory.run(ws, calls=mode.memory_calls, every=mode.memory_every))
            except Exception as exc:  # one broken part must not lose the others' figures
                failed.append(part)
                print(f"-- {part} FAILED: {exc!r}", file=sys.stderr, flush=True)
            timings[part] = time.perf_counter() - started
            print(f"-- {part}: {timings[part]:.0f} s", file=sys.stderr, flush=True)
    finally:  # an interrupted run leaves no databases behind (the scale ones are large)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print()
    print(table(results))
    if plans:
        print("\nEXPLAIN QUERY PLAN (largest scale size):")
        print("\n".join(plans))
    if args.json:
        payload = {
            "machine": info,
            "options": vars(args) | {"json": str(args.json)},
            "seconds": timings,
            "results": [r.as_dict() for r in results],
            "plans": plans,
            "failed_parts": failed,
        }
        args.json.write_text(json.dumps(payload, indent=2, default=str))
    if failed:
        print("\nparts that failed: " + ", ".join(failed))
    return 0 if not failed and all(r.ok is not False for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
