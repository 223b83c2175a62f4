"""The gate-quality benchmark (serving/bench/gates.py) at a tiny size: its vectorised path equals the
real gates and machine rollout by rollout, its table and targets have the cells asked for, and the
comparisons keep false rollbacks of good canaries low where Flagger-style checks miss bad ones."""

from __future__ import annotations

import json

from serving.bench import gates as bench


def test_vectorised_path_is_the_real_gates_and_machine():
    kinds = (bench.KINDS[0], bench.KINDS[2], bench.KINDS[5], bench.KINDS[8])
    assert bench.check_equivalence(6, seed=5, kinds=kinds, rates=(10, 100)) == 0


def test_tiny_run_has_every_cell_and_the_comparisons_hold_their_error_rate(tmp_path):
    kinds = (bench.KINDS[0], bench.KINDS[6])  # good, latency x3
    cells = bench.run(200, rates=(100,), kinds=kinds)
    assert {(c["kind"], c["policy"]) for c in cells} == {(k.name, p) for k in kinds for p in bench.POLICIES}
    by = {(c["kind"], c["policy"]): c for c in cells}
    good, slow = by[("good", "compare")], by[("latency x3", "compare")]
    # alpha = 0.01 for the whole rollout: of 200 good rollouts at most 5 may roll back (the full bench
    # measures 0.19 % at 100 req/s over 1600)
    assert good["rolled_back"] <= 0.025 and good["median_minutes_to_promote"] == 4
    assert slow["rolled_back"] >= 0.99 and slow["median_requests_before_rollback"] <= 700
    # a 3x slower canary stays far under Flagger's p99 <= 500 ms limit: Flagger-style promotes it
    assert by[("latency x3", "flagger")]["promoted"] >= 0.99
    text = bench.table(cells)
    assert "| good | 100 |" in text and "| latency x3 | 100 |" in text
    assert any(line.startswith("PASS 100 req/s good: false rollbacks") for line in bench.check_targets(cells))
    png = bench.plot(cells, tmp_path / "g.png")
    assert png.stat().st_size > 10_000
    json.dumps(cells)  # the JSON the bench writes
