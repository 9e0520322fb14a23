"""Smoke test of the tiers benchmark: it runs end to end and reports every row it promises."""

from __future__ import annotations

import shutil

import pytest

from lmcached.bench.tiers import render_tiers, run_tiers


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_tiers_section_runs_and_reports_each_case(tmp_path) -> None:
    rows = run_tiers(sizes=[256 * 1024], bytes_per_point=1 << 20, repeats=1, workdir=str(tmp_path))
    cases = {r["case"] for r in rows}
    assert {
        "remote cold retrieve",
        "remote promoted retrieve",
        "disk retrieve, page cache warm",
        "disk retrieve, page cache cold",
    } <= cases
    assert all(r["gbps"] > 0 and r["baseline_gbps"] > 0 for r in rows)
    drop = next(r for r in rows if r["case"].endswith("disk_drop_cache=on"))
    assert drop["page_cache_resident"] < 0.5  # the option does drop the written pages
    assert "redis-py GET" in render_tiers(rows)
