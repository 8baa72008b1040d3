"""The benchmark suite (``tests/benchmarks``, which pytest does not collect) still runs end to end.

Every part runs at tiny sizes (``--smoke``); its figures mean nothing here and no goal is checked.
What is checked: each part produced its rows and a table, the claim runs stayed exact (no task
claimed twice, no error, nothing left claimed) and the query plans of the scale part use indexes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.benchmarks.__main__ import main
from tests.support import postgres_admin_url


def test_every_benchmark_part_runs_and_the_claim_runs_stay_exact(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report_path = tmp_path / "bench.json"
    on_postgres = postgres_admin_url() is not None
    main(["--smoke", "--json", str(report_path), *(["--postgres"] if on_postgres else [])])
    report = json.loads(report_path.read_text())

    assert report["failed_parts"] == []
    results = report["results"]
    expected = {
        "cold start",
        "latency (SDK client)",
        "latency (raw rpc)",
        "claims (sqlite)",
        "scale",
        "memory",
    }
    if on_postgres:
        expected.add("claims (postgresql)")
    assert {result["part"] for result in results} == expected
    for result in results:
        assert math.isfinite(result["value"]), result
    claim_runs = [result for result in results if result["part"].startswith("claims")]
    # Per engine: the raw floor, the service and end to end over stdio.
    assert len(claim_runs) == 3 * (2 if on_postgres else 1)
    for run in claim_runs:
        extra = run["extra"]
        assert extra["claimed"] > 0, run
        assert (extra["double_claims"], extra["errors"], extra["not_completed"]) == (0, 0, 0), run
    plan_lines = [line.strip() for line in report["plans"]]
    assert any(line.startswith("SEARCH tasks USING") for line in plan_lines)
    assert not any(line.startswith("SCAN tasks") for line in plan_lines), plan_lines

    printed = capsys.readouterr().out
    assert "measurement" in printed
    assert "EXPLAIN QUERY PLAN" in printed
