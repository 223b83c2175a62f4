"""``python -m serving.rollout``: start | status | pause | resume | promote | abort | report | operator."""

from __future__ import annotations

import argparse
import json
import re
import sys

from serving.contract.errors import MlrolloutError
from serving.rollout import cohorts, gates
from serving.rollout import controller as ctl
from serving.rollout.gates import Gate
from serving.rollout.machine import RolloutSpec, parse_steps
from serving.rollout.metrics import PROVIDERS, Target
from serving.rollout.routers import ROUTERS, RouterError, build_router
from serving.rollout.store import ConfigMapStore, FileStateStore, StateStore, StoreError

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """``30s``, ``1m``, ``1m30s``, ``500ms``, ``2.5s`` (a bare number means seconds) -> seconds."""
    t = text.strip()
    if re.fullmatch(r"\d+(\.\d+)?", t):
        secs = float(t)
    else:
        parts = _DURATION.findall(t)
        if not parts or "".join(n + u for n, u in parts) != t:
            raise argparse.ArgumentTypeError(f"invalid duration {text!r}: use e.g. 30s, 1m, 1m30s or 500ms")
        secs = sum(float(n) * _UNIT[u] for n, u in parts)
    if secs <= 0:
        raise argparse.ArgumentTypeError(f"duration must be positive, got {text!r}")
    return secs


def steps_arg(text: str) -> tuple[int, ...]:
    """``--steps``: :func:`machine.parse_steps`, checked by :class:`RolloutSpec` (one line, exit 2)."""
    try:
        steps = parse_steps(text)
        RolloutSpec(steps=steps)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"invalid --steps {text!r}: {e}") from None
    return steps


class _Parser(argparse.ArgumentParser):
    """Bad arguments: one line that says what is wrong (not the whole usage block), exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _store_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("state (where the rollout's state persists)")
    g.add_argument("--state-file", help="local JSON state file (local stack)")
    g.add_argument(
        "--state-configmap",
        help="ConfigMap whose key `state` holds it (cluster; default for start: <route or isvc>-rollout)",
    )
    g.add_argument("--namespace", default="default", help="Kubernetes namespace (default: default)")
    g.add_argument("--kubeconfig", help="kubeconfig path (default: in-cluster config, else ~/.kube/config)")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(
        prog="python -m serving.rollout",
        description="Progressive canary delivery with ML-aware gates (success rate, p99, prediction drift).",
    )
    sub = ap.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser(
        "start", help="start a rollout (or resume the live one for the same versions) and drive it"
    )
    s.add_argument("--router", required=True, choices=list(ROUTERS))
    s.add_argument("--model", required=True, help="model name (the runtime's `model` metric label)")
    s.add_argument("--stable-version", required=True)
    s.add_argument("--canary-version", required=True)
    spec = RolloutSpec()
    s.add_argument("--steps", type=steps_arg, default=spec.steps, help="canary weights, e.g. 10,25,50,100")
    s.add_argument(
        "--interval", type=parse_duration, default=spec.interval_s, help="analysis interval, e.g. 30s, 1m"
    )
    s.add_argument(
        "--threshold",
        type=int,
        default=spec.threshold,
        help=f"failed checks before rollback (default {spec.threshold})",
    )
    s.add_argument(
        "--max-inconclusive",
        type=int,
        default=spec.max_inconclusive,
        help="inconclusive analyses in a row before pausing",
    )
    s.add_argument(
        "--watch-after-promotion",
        type=int,
        default=spec.post_promotion_intervals,
        metavar="N",
        help="after promotion, compare the new stable with the previous version's baseline for N more "
        "intervals; a failure restores the previous model (default 0: no watch)",
    )
    s.add_argument(
        "--shadow",
        action="store_true",
        help="a shadow step before the first weight: the canary answers a mirrored copy of every request "
        "at weight 0 (nobody sees its answers) and only a passing analysis of it lets the canary take "
        "live traffic (local_proxy, gateway_api)",
    )
    for router in ROUTERS.values():
        router.add_arguments(s)
    cohorts.add_arguments(s)
    m = s.add_argument_group("metrics")
    m.add_argument("--metrics", choices=list(PROVIDERS), default="prometheus")
    m.add_argument("--prometheus-url", default="http://127.0.0.1:9090")
    m.add_argument("--stable-metrics-url", default="", help="stable runtime /metrics URL (scrape)")
    m.add_argument("--canary-metrics-url", default="", help="canary runtime /metrics URL (scrape)")
    g = s.add_argument_group("gates")
    d = gates.DEFAULTS
    g.add_argument("--min-success-rate", type=float, default=d["min_success_rate"])
    g.add_argument("--max-p99-ms", type=float, default=d["max_p99_ms"])
    g.add_argument(
        "--min-requests",
        type=int,
        default=d["min_requests"],
        help="canary requests a window needs to be conclusive",
    )
    g.add_argument(
        "--max-drift", type=float, default=d["max_drift"], help="max JS distance (or PSI) canary vs stable"
    )
    g.add_argument("--drift-method", choices=["js", "psi"], default=d["drift_method"])
    g.add_argument("--drift-bins", type=int, default=d["drift_bins"])
    g.add_argument(
        "--min-predictions",
        type=int,
        default=d["min_predictions"],
        help="predictions per side for the drift gate",
    )
    g.add_argument("--no-drift-gate", action="store_true")
    g.add_argument("--min-accuracy", type=float, help="enable the accuracy gate on labelled feedback")
    g.add_argument("--max-accuracy-drop", type=float, default=d["max_accuracy_drop"])
    g.add_argument("--min-labelled", type=int, default=d["min_labelled"])
    g.add_argument(
        "--min-agreement",
        type=float,
        help="with --shadow: the label agreement gate, the least share of mirrored rows whose predicted "
        "label the canary and stable agree on (the local stack's HAProxy mirror pairs the answers)",
    )
    g.add_argument(
        "--min-agreement-rows",
        type=int,
        default=gates.AgreementGate.min_rows,
        help="mirrored rows the label agreement gate needs to be conclusive",
    )
    c = s.add_argument_group("comparisons with stable (sequential tests, valid at every interval)")
    c.add_argument(
        "--compare",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="judge canary vs stable (error rate, latency histograms, drift test, accuracy) at a stated "
        "false-rollback rate, beside the absolute p99 limit (the default); --no-compare: the absolute "
        "gates alone (success rate, p99, drift distance, accuracy floor)",
    )
    c.add_argument(
        "--alpha", type=float, default=d["alpha"], help="the rollout's false-rollback rate (default 0.01)"
    )
    c.add_argument(
        "--max-error-increase",
        type=float,
        default=d["max_error_increase"],
        help="smallest error-rate increase worth catching, as a share (0.005 = 0.5 points)",
    )
    c.add_argument(
        "--latency-min-effect",
        type=float,
        default=d["latency_min_effect"],
        help="smallest slowdown worth catching: P(canary slower than stable) - 1/2",
    )
    c.add_argument(
        "--drift-min-effect",
        type=float,
        default=d["drift_min_effect"],
        help="smallest score-histogram change worth catching (Cohen's w)",
    )
    c.add_argument(
        "--accuracy-min-effect",
        type=float,
        help="enable the accuracy comparison: smallest accuracy drop worth catching (0.02 = 2 points)",
    )
    s.add_argument(
        "--report-dir",
        default="rollout-report",
        help="where the text report and PNG timeline go at the end (default: ./rollout-report)",
    )
    s.add_argument("--no-report", action="store_true", help="write no report at the end")
    s.add_argument("--max-seconds", type=parse_duration, help="stop driving after this long (state is kept)")
    s.add_argument("--force", action="store_true", help="replace a live rollout of other versions")
    _store_args(s)

    for verb, helptext in (
        ("status", "show phase, step, weights and the last decision's evidence"),
        ("pause", "hold the current weight and stop analysing"),
        ("resume", "continue a paused rollout at the same step"),
        ("promote", "send all traffic to the canary now (skips remaining steps)"),
        ("abort", "send all traffic back to stable now"),
    ):
        c = sub.add_parser(verb, help=helptext)
        _store_args(c)
        c.add_argument(
            "--name",
            help="a ModelRollout in --namespace: the operator applies the command (serving/rollout/crctl.py)",
        )
        if verb != "status":
            c.add_argument(
                "--timeout", type=parse_duration, default=30.0, help="with --name: wait this long for the ack"
            )
        if verb == "status":
            c.add_argument("--json", action="store_true")
        if verb in ("pause", "promote", "abort"):
            c.add_argument("--reason")
    rp = sub.add_parser("report", help="write the text report and PNG timeline of the stored rollout")
    _store_args(rp)
    rp.add_argument("--out", required=True)
    _operator_args(sub)
    return ap


def _operator_args(sub) -> None:
    o = sub.add_parser(
        "operator", help="run the in-cluster operator: reconcile ModelRollouts (serving/rollout/operator.py)"
    )
    o.add_argument("--namespace", help="watch ModelRollouts in this namespace only (default: all)")
    o.add_argument("--kubeconfig", help="kubeconfig path (default: in-cluster config, else ~/.kube/config)")
    o.add_argument("--prometheus-url", default="", help="Prometheus for rollouts without spec.metrics.url")
    o.add_argument(
        "--interval-floor",
        type=parse_duration,
        help="shortest analysis interval (a spec's shorter one is raised)",
    )
    o.add_argument("--lease-name", default="mlrollout-operator", help="the leader-election Lease")
    o.add_argument("--lease-namespace", default="default", help="the Lease's namespace")
    o.add_argument("--identity", help="this replica's name in the Lease (default: host name + random)")
    o.add_argument("--lease-duration", type=parse_duration, default=15.0, help="Lease duration (default 15s)")
    o.add_argument("--metrics-port", type=int, help="serve the operator's Prometheus metrics on this port")
    o.add_argument("--max-workers", type=int, default=32, help="rollouts driven at once (default 32)")
    o.add_argument("--resync", type=parse_duration, default=30.0, help="full relist period (default 30s)")
    o.add_argument("--notify-url", action="append", type=_http_url, metavar="URL",
                   help="POST a JSON notification of each rollout's decisions here (repeatable)")  # fmt: skip
    o.add_argument("--notify-slack-url", action="append", type=_http_url, metavar="URL",
                   help="POST a Slack-compatible message of each decision here (repeatable)")  # fmt: skip


def _http_url(text: str) -> str:
    if not text.startswith(("http://", "https://")) or len(text) < 10:
        raise argparse.ArgumentTypeError(f"invalid URL {text!r}: use http://... or https://...")
    return text


def cmd_operator(a: argparse.Namespace) -> int:
    from serving.rollout import operator

    return operator.main(a)


def _store(a: argparse.Namespace, default_cm: str = "", owner: str = "") -> StateStore:
    if a.state_file:
        return FileStateStore(a.state_file)
    name = a.state_configmap or default_cm
    if name:
        return ConfigMapStore(name, a.namespace, owner_isvc=owner, kubeconfig=a.kubeconfig)
    raise ValueError(
        "say where the state lives: --state-file PATH (local) or --state-configmap NAME (cluster)"
    )


def gates_from_args(a: argparse.Namespace) -> list[Gate]:
    out = gates.defaults(
        drift=not a.no_drift_gate, compare=a.compare, **{k: getattr(a, k) for k in gates.DEFAULTS}
    )
    if a.min_agreement is not None:  # the shadow step's own gate (not in DEFAULTS: it is local only)
        out.append(gates.AgreementGate(a.min_agreement, a.min_agreement_rows))
    return out


def cmd_start(a: argparse.Namespace) -> int:
    # everything the flags say is checked first (one line, exit 2); then the store: ownership, the stored
    # record, the router and the metrics backend, each refused before anything is written
    router = ROUTERS[a.router]
    router_cfg = router.config_from_args(a)
    if cohorts.from_args(a) and "cohort" not in router_cfg:
        raise ValueError(f"--router {a.router} cannot route by cohort; use local_proxy or gateway_api")
    default_cm, owner = router.state_location(router_cfg)
    spec = RolloutSpec(
        steps=a.steps,
        interval_s=a.interval,
        threshold=a.threshold,
        max_inconclusive=a.max_inconclusive,
        post_promotion_intervals=a.watch_after_promotion,
        shadow=a.shadow,
    )
    stable = Target(a.model, a.stable_version, a.stable_metrics_url)
    canary = Target(a.model, a.canary_version, a.canary_metrics_url)
    if a.metrics == "scrape" and not (a.stable_metrics_url and a.canary_metrics_url):
        raise ValueError("--metrics scrape needs --stable-metrics-url and --canary-metrics-url")
    metrics_cfg = (
        {"provider": "prometheus", "url": a.prometheus_url}
        if a.metrics == "prometheus"
        else {"provider": "scrape"}
    )
    try:
        record = ctl.new_record(spec, gates_from_args(a), stable, canary, router_cfg, metrics_cfg)
    except ctl.RecordError as e:
        raise ValueError(_flag_hint(str(e))) from None
    store = _store(a, default_cm, owner)
    try:
        rec = ctl.drive(store, record, force=a.force, max_seconds=a.max_seconds)
    except KeyboardInterrupt:
        print(
            f"\ncontroller stopped; state kept in {store.where()}. "
            "Re-run the same command to resume, or abort.",
            file=sys.stderr,
        )
        return 130
    if a.report_dir and not a.no_report and rec.phase in ("Promoted", "RolledBack", "Aborted"):
        from serving.rollout.report import write_report

        txt, png = write_report(rec, a.report_dir)
        print(f"report: {txt}\ntimeline: {png}")
    phase = rec.phase
    return 0 if phase == "Promoted" else (3 if phase in ("RolledBack", "Aborted") else 0)


def _flag_hint(message: str) -> str:
    """A record-field message in the words of the flags that set the field."""
    for field, flag in (
        ("canary.version", "--canary-version"),
        ("router: ", ""),
        ("spec.post_promotion_intervals", "--watch-after-promotion"),
    ):
        if message.startswith(field):
            return message.replace(field, flag, 1)
    return message


def _loaded(store: StateStore) -> ctl.RolloutRecord:
    rec = ctl.load_record(store)
    if rec is None or rec.state is None:
        raise StoreError(f"no rollout in {store.where()}")
    return rec


def cmd_status(a: argparse.Namespace) -> int:
    store = _store(a)
    rec = _loaded(store)
    if a.json:
        print(json.dumps(rec.to_dict(), indent=1))
        return 0
    st = rec.rollout_state
    steps = rec.spec["steps"]
    live = ""
    try:
        live = " (router reports stable {}% / canary {}%)".format(*build_router(rec.router).get_weights())
    except (RouterError, OSError, ValueError, ImportError) as e:
        live = f" (router unreachable: {e})"
    except Exception as e:  # kubernetes ApiException, config errors
        live = f" (router unreachable: {type(e).__name__})"
    print(f"{rec.canary['model']}: {rec.stable['version']} -> {rec.canary['version']}")
    print(
        f"phase {st.phase.value}, step {st.step_index + 1}/{len(steps)} {steps}, "
        f"canary weight {st.weight}%{live}{cohorts.note(rec.router.get('cohort'), st.weight)}"
    )
    print(
        f"analyses {st.analyses}, failed checks {st.failed_checks}/{rec.spec['threshold']}, "
        f"inconclusive in a row {st.inconclusive_checks}/{rec.spec['max_inconclusive']}"
    )
    if n := rec.spec.get("post_promotion_intervals"):
        print(f"watch after promotion: {st.watch_passes}/{n} intervals passed")
    print(f"reason: {st.reason}")
    if not st.phase.terminal:
        try:
            who = store.owner()
        except Exception as e:  # the status of the rollout matters more than its owner's
            print(f"controller: unknown ({type(e).__name__})")
        else:
            print(
                f"controller: PID {who.get('pid', '?')} on {who.get('host', '?')}"
                if who is not None
                else "controller: none running (re-run the start command to resume)"
            )
    last = next((h for h in reversed(st.history) if h.get("evidence")), None)
    if last:
        from serving.rollout.gates import GateResult

        print("last analysis evidence:")
        for g in last["evidence"]:
            print("  " + GateResult.from_dict(g).summary())
    return 0


def cmd_verb(a: argparse.Namespace) -> int:
    rec = ctl.command(_store(a), a.cmd, reason=getattr(a, "reason", None))
    st = rec.state
    print(f"{a.cmd}: phase {st['phase']}, canary weight {st['weight']}% ({st['reason']})")
    return 0


def cmd_modelrollout(a: argparse.Namespace) -> int:
    """``status|pause|resume|promote|abort --name NAME``: on a ModelRollout, through the operator."""
    from serving.rollout import crctl

    if a.state_file or a.state_configmap:
        raise ValueError("--name acts on a ModelRollout: leave out --state-file and --state-configmap")
    return crctl.run(a.cmd, a.namespace, a.name, kubeconfig=a.kubeconfig, reason=getattr(a, "reason", None),
                     wait_s=getattr(a, "timeout", 0.0), as_json=getattr(a, "json", False))  # fmt: skip


def cmd_report(a: argparse.Namespace) -> int:
    from serving.rollout.report import write_report

    rec = _loaded(_store(a))
    txt, png = write_report(rec, a.out)
    print(txt.read_text())
    print(f"report: {txt}\ntimeline: {png}")
    return 0


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)

    handlers = {"start": cmd_start, "status": cmd_status, "report": cmd_report, "operator": cmd_operator}
    if getattr(a, "name", None):
        handlers[a.cmd] = cmd_modelrollout
    try:
        return handlers.get(a.cmd, cmd_verb)(a)
    # MlrolloutError: the store, routers, metrics, state machine, controller, model package.
    # ValueError too: flag and gate checks (here, gates.py, controller.py) still raise plain ones.
    except (MlrolloutError, ValueError, OSError) as e:
        # one line that says what to fix (an exception's text may span lines: join them)
        print("error: " + (" ".join(str(e).split()) or type(e).__name__), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
