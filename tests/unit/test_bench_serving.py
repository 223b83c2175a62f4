"""The pure parts of the serving benchmark (serving/bench): wrk output parsing, same-round ratios,
target verdicts, profile summaries, answer checks. No servers, no timing assertions."""

from __future__ import annotations

import json
import math

import pytest

from serving.bench import profile, stats, wrk
from serving.bench.__main__ import parse_args
from serving.bench.servers import answer_has_probability, numbers_in

WRK_STDOUT = """Running 3s test @ http://127.0.0.1:40000/v2/models/m/infer
  1 threads and 8 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     2.10ms    0.50ms  12.00ms   90.00%
  9000 requests in 3.00s, 2.00MB read
Requests/sec:   3000.00
MLROLLOUT_WRK_RESULT {"requests":9000,"duration_us":3000000,"bytes":2000000,"errors":{"connect":0,"read":1,\
"write":0,"status":2,"timeout":0},"p50_us":2100,"p90_us":2900,"p99_us":7400,"mean_us":2150.5,"max_us":12000}
"""


def test_parse_output_reads_the_lua_result_line():
    r = wrk.parse_output(WRK_STDOUT)
    assert r.requests == 9000
    assert r.rps == pytest.approx(3000.0)
    assert (r.p50_ms, r.p90_ms, r.p99_ms) == (2.1, 2.9, 7.4)
    assert r.mean_ms == pytest.approx(2.1505)
    assert r.errors == {"connect": 0, "read": 1, "write": 0, "status": 2, "timeout": 0}
    assert r.error_count == 3


def test_parse_output_without_result_line_names_the_problem():
    with pytest.raises(wrk.WrkError, match="no result line"):
        wrk.parse_output("Running 3s test @ http://x\nunable to connect to 127.0.0.1:1 Connection refused\n")


def test_parse_output_with_a_broken_result_line_fails():
    with pytest.raises(wrk.WrkError, match="unreadable"):
        wrk.parse_output(wrk.MARKER + '{"requests": 1}\n')


def test_lua_script_embeds_the_body_verbatim_and_prints_json():
    body = json.dumps({"instances": [[1.0, 2.0]]})  # "]]" would end a plain Lua long string
    script = wrk.lua_script(body)
    assert f"wrk.body = [==[{body}]==]" in script
    assert 'wrk.method = "POST"' in script
    assert wrk.MARKER in script and "latency:percentile(99)" in script
    with pytest.raises(ValueError, match="long-bracket"):
        wrk.lua_script('{"a": "]==]"}')


def _cell(server, conc, rnd, rps, cpu_s=float("nan"), requests=1000):
    return stats.Cell(server, conc, rnd, rps, 1.0, 2.0, requests, 0, server_cpu_s=cpu_s)


def test_same_round_ratio_pairs_rounds_not_medians():
    cells = [
        _cell("a", 8, 1, 100), _cell("b", 8, 1, 50),   # ratio 2
        _cell("a", 8, 2, 300), _cell("b", 8, 2, 100),  # ratio 3
        _cell("a", 8, 3, 999),                         # no partner in round 3: skipped
        _cell("a", 1, 1, 10), _cell("b", 1, 1, 10),    # other concurrency: not mixed in
    ]  # fmt: skip
    r = stats.same_round_ratio(cells, "a", "b", 8)
    assert (r.median, r.low, r.high, r.n) == (2.5, 2.0, 3.0, 2)
    # the ratio of medians would differ (300/75 = 4 or 200/75): pairing is what is reported
    assert stats.same_round_ratio(cells, "a", "b", 1).median == 1.0


def test_same_round_ratio_skips_zero_denominators_and_handles_nothing():
    cells = [_cell("a", 8, 1, 100), _cell("b", 8, 1, 0)]
    r = stats.same_round_ratio(cells, "a", "b", 8)
    assert r.n == 0 and math.isnan(r.median)
    assert r.fmt() == "n/a"


def test_evaluate_gives_verdicts_and_an_inverted_cpu_ratio():
    cells = [
        _cell("rt", 8, 1, 700, cpu_s=0.25), _cell("floor", 8, 1, 1000, cpu_s=0.20),
        _cell("rt", 8, 2, 500, cpu_s=0.25), _cell("floor", 8, 2, 1000, cpu_s=0.20),
    ]  # fmt: skip
    met, missed, absent = stats.evaluate(
        cells,
        [
            stats.Target("t1", "rt", "floor", 8, 0.55),
            stats.Target("t2", "rt", "floor", 8, 0.65),
            stats.Target("t3", "rt", "mlserver", 8, 6),
        ],
    )
    assert met.ratio.median == pytest.approx(0.6) and met.verdict == "MET"
    assert missed.verdict == "MISSED"
    assert absent.met is None and absent.verdict == "NOT MEASURED"
    # CPU µs/request: floor 200 µs, rt 250 µs → rt does 0.8 of the floor's work per CPU second
    assert met.cpu_ratio.median == pytest.approx(0.8)
    text = stats.format_targets([met, missed])
    assert "MET" in text and "MISSED" in text and "0.60 [0.50–0.70]" in text


def test_summary_table_has_medians_spread_and_the_baseline_ratio():
    cells = [_cell("floor", 8, r, v, cpu_s=0.2) for r, v in ((1, 1000), (2, 1200), (3, 1100))]
    cells += [_cell("rt", 8, r, v, cpu_s=0.25) for r, v in ((1, 600), (2, 660), (3, 550))]
    summaries = stats.summarize(cells)
    assert summaries[("rt", 8)].rps.median == 600
    assert summaries[("rt", 8)].rps.rel_spread == pytest.approx(110 / 600)
    table = stats.format_table(summaries, ["rt", "floor"], "floor")
    rt_line = next(line for line in table.splitlines() if line.startswith("rt"))
    assert "600 [550–660]" in rt_line and "0.55" in rt_line  # 600 / 1100
    assert " 0.80 " in rt_line and " 250 " in rt_line  # CPU: 200 µs (floor) / 250 µs per request
    ratios = stats.format_ratios(cells, ["rt", "floor"], ["floor"])
    assert "c=8: 0.55 [0.50–0.60]" in ratios  # req/s per round: 0.60, 0.55, 0.50
    assert "c=8: 0.80 [0.80–0.80]" in ratios  # from CPU µs/request


COLLAPSED = [
    'process 1:"python -m serving";<module> (x.py:1);run (asyncio/runners.py:1);'
    "app (serving/runtime/asgi.py:10);run (onnxruntime/capi/onnxruntime_inference_collection.py:5) 30",
    'process 1:"python -m serving";<module> (x.py:1);run (asyncio/runners.py:1);'
    "app (serving/runtime/asgi.py:10);emit (logging/__init__.py:1110) 10",
    'process 1:"python -m serving";<module> (x.py:1);run (asyncio/runners.py:1);'
    "matches (starlette/routing.py:3);is_dataclass (dataclasses.py:9) 60",
    'process 1:"python -m serving";Thread._bootstrap (threading.py:1);Thread.run (threading.py:2) 50',
    'process 1:"python -m serving";<module> (x.py:1);run (asyncio/runners.py:1);'
    "BaseEventLoop._run_once (asyncio/base_events.py:1);EpollSelector.select (selectors.py:468) 25",
]


def test_profile_split_and_summary():
    stacks = profile.parse_collapsed(COLLAPSED)
    main, other = profile.split_threads(stacks)
    assert sum(n for _, n in other) == 50
    s = profile.summarize(main)
    assert s["samples"] == 100  # the 25 samples waiting in epoll are not work
    assert s["selector_wait_samples"] == 25
    assert s["layers"]["starlette"] == pytest.approx(0.60)  # is_dataclass counts toward its caller
    assert s["layers"]["onnxruntime"] == pytest.approx(0.30)
    assert sum(s["layers"].values()) == pytest.approx(1.0)
    assert s["probes"]["per-request logging (any logging/ frame)"] == pytest.approx(0.10)
    assert s["probes"]["route matching (fastapi/starlette routing matches)"] == pytest.approx(0.60)
    assert s["probes"]["runtime request code (serving/runtime/*)"] == pytest.approx(0.40)
    assert s["self"][0] == {"function": "is_dataclass (dataclasses.py)", "share": 0.6}
    assert "self time by layer" in profile.format_summary(s, "x")


def test_answer_check_finds_the_probability_anywhere_and_ignores_bools():
    v2 = {"outputs": [{"name": "label", "data": [0]}, {"name": "probabilities", "data": [0.546, 0.454]}]}
    assert answer_has_probability(v2, 0.45401)
    assert not answer_has_probability(v2, 0.47)
    assert numbers_in({"a": True, "b": [1, 2.5]}) == [1.0, 2.5]


def test_cli_quick_mode_and_bad_arguments():
    a = parse_args(["--quick"])
    assert (a.duration, a.warmup, a.repeats) == (3.0, 1.0, 1)
    assert a.concurrency == [1, 8, 32]
    assert "runtime-v2" in a.endpoints and "mlserver-sklearn" in a.endpoints
    with pytest.raises(SystemExit):
        parse_args(["--endpoints", "runtime-v2,triton"])
    with pytest.raises(SystemExit):
        parse_args(["--concurrency", "8,x"])
    with pytest.raises(SystemExit):
        parse_args(["--endpoints", "floor", "--profile", "runtime-v2"])


def test_markdown_table_pairs_rounds_for_every_ratio():
    cells = []
    for rnd, (floor, rt, ml) in enumerate(((1000, 600, 100), (1200, 840, 120)), start=1):
        cells += [
            _cell("floor", 8, rnd, floor, cpu_s=0.2),
            _cell("rt", 8, rnd, rt, cpu_s=0.25),
            _cell("ml", 8, rnd, ml, cpu_s=2.0),
        ]
    md = stats.format_markdown(cells, ["rt", "floor", "ml"], "floor", "ml")
    rt_row = next(line for line in md.splitlines() if line.startswith("| rt |"))
    # req/s ÷ floor per round: 0.60, 0.70; CPU: 200/250 = 0.80; ÷ ml per round: 6.0, 7.0
    assert rt_row == (
        "| rt | 8 | 720 [600–840] | 0.65 [0.60–0.70] | 0.80 [0.80–0.80] | 6.50 [6.00–7.00] "
        "| 1.00 | 2.00 | 250 |"
    )
