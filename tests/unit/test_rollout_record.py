"""The typed rollout record: the stores' JSON stays the format the dict-based controller wrote.

The fixtures under ``tests/fixtures/rollout/`` are state files written by the controller before the record
became a dataclass (the FileStateStore of commit b21d9a2 running this suite's fake World: a promoted
rollout, and one resumed by an operator, whose ``baselines.step`` is null).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from serving.rollout import controller as ctl
from serving.rollout.machine import RolloutSpec, RolloutState
from serving.rollout.record import RECORD_KIND, RolloutRecord, validate_record
from serving.rollout.stats import Snapshot
from serving.rollout.store import CorruptRecord, FileStateStore, StoreError, _trim
from tests.unit.test_rollout_controller import (
    CANARY,
    DEAD_ROUTER,
    GATES,
    SCRAPE,
    STABLE,
    Clock,
    FakeCoreV1,
    cm_store,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "rollout"
OLD = sorted(FIXTURES.glob("record-*-v1alpha1.json"))


def test_the_old_format_fixtures_are_there():
    assert [p.name for p in OLD] == ["record-promoted-v1alpha1.json", "record-resumed-v1alpha1.json"]


@pytest.mark.parametrize("path", OLD, ids=lambda p: p.stem)
def test_an_old_record_round_trips_field_by_field(path):
    old = json.loads(path.read_text())
    rec = RolloutRecord.from_dict(old)
    new = rec.to_dict()
    assert set(new) == set(old)
    for key in old:
        assert new[key] == old[key], key
        assert json.dumps(new[key], sort_keys=True) == json.dumps(old[key], sort_keys=True), key
    assert rec.extra == {} and rec.kind == RECORD_KIND
    # the typed views read what the dicts hold
    assert rec.rollout_spec == RolloutSpec.from_dict(old["spec"])
    assert rec.rollout_state == RolloutState.from_dict(old["state"]) and rec.phase == old["state"]["phase"]
    assert rec.stable_target == STABLE and rec.canary_target == CANARY
    assert [g.name for g in rec.gate_objects()] == [g.name for g in GATES]
    assert rec.rollout_baseline == {k: Snapshot.from_dict(v) for k, v in old["baselines"]["rollout"].items()}
    step = old["baselines"]["step"]
    assert rec.step_baseline == (
        None if step is None else {k: Snapshot.from_dict(v) for k, v in step.items()}
    )


@pytest.mark.parametrize("path", OLD, ids=lambda p: p.stem)
def test_the_file_store_rewrites_an_old_state_file_byte_for_byte(tmp_path, path):
    sf = tmp_path / "state.json"
    sf.write_bytes(path.read_bytes())
    store = FileStateStore(sf)
    assert store.load() == RolloutRecord.from_dict(json.loads(path.read_text()))
    store.update(lambda rec: rec)
    assert sf.read_bytes() == path.read_bytes()
    # and what the new code writes is what the old code read: JSON that validate_record accepts
    assert validate_record(json.loads(sf.read_text())) == json.loads(path.read_text())


@pytest.mark.parametrize("path", OLD, ids=lambda p: p.stem)
def test_the_configmap_store_rewrites_an_old_state_key_byte_for_byte(path):
    core = FakeCoreV1()
    old = _trim(json.loads(path.read_text()))  # what the dict-based ConfigMapStore wrote for this record
    assert old == json.dumps(json.loads(path.read_text()), separators=(",", ":"), sort_keys=True)
    store = cm_store(core, Clock())
    store.update(lambda _r: RolloutRecord.from_dict(json.loads(path.read_text())))
    core.obj["data"]["state"] = old
    assert store.load().to_dict() == json.loads(old)
    store.update(lambda rec: rec)
    assert core.obj["data"]["state"] == old


def test_missing_optional_and_unknown_keys_are_kept_as_they_were():
    full = ctl.new_record(RolloutSpec(interval_s=30), GATES, STABLE, CANARY, DEAD_ROUTER, SCRAPE).to_dict()
    assert full["spec"]["interval_s"] == 30 and isinstance(full["spec"]["interval_s"], int)  # not 30.0
    sparse = {
        k: v for k, v in full.items() if k not in ("state", "pending", "baselines", "timeline", "created_at")
    }
    sparse["x-annotation"] = {"by": "hand"}
    rec = RolloutRecord.from_dict(sparse)
    assert rec.to_dict() == sparse and rec.extra == {"x-annotation": {"by": "hand"}}
    assert (
        rec.state is None and rec.timeline == [] and rec.created_at == 0
    )  # what the code read in their place
    rec.timeline = [{"t": 1.0, "weight": 0, "action": "none"}]
    assert rec.to_dict()["timeline"] == rec.timeline and "baselines" not in rec.to_dict()


def test_a_record_owns_its_data():
    d = json.loads(OLD[0].read_text())
    rec = RolloutRecord.from_dict(d)
    rec.state["phase"] = "Paused"
    rec.timeline.clear()
    assert d == json.loads(OLD[0].read_text())
    out = rec.to_dict()
    out["spec"]["threshold"] = 9
    assert rec.spec["threshold"] == 2
    assert RolloutRecord.from_dict(out) != rec


def test_the_stores_validate_the_json_before_building_a_record(tmp_path):
    sf = tmp_path / "state.json"
    d = json.loads(OLD[0].read_text())
    d["state"]["step_index"] = 99
    sf.write_text(json.dumps(d))
    store = FileStateStore(sf)
    with pytest.raises(
        CorruptRecord, match=r"state\.step_index: 99 is out of range.*; move it away or fix it"
    ):
        store.load()
    with pytest.raises(StoreError, match="corrupt rollout record"):
        store.update(lambda rec: rec)
    assert store.load(corrupt_ok=True) is None
    before = sf.read_bytes()
    with pytest.raises(CorruptRecord, match="pass --force to replace it"):
        ctl.begin(store, ctl.new_record(RolloutSpec(), GATES, STABLE, CANARY, DEAD_ROUTER, SCRAPE))
    assert sf.read_bytes() == before


def test_update_with_returns_the_record_and_what_fn_computed(tmp_path):
    store = FileStateStore(tmp_path / "state.json")
    new = ctl.new_record(RolloutSpec(), GATES, STABLE, CANARY, DEAD_ROUTER, SCRAPE)
    rec, was = store.update_with(lambda old: (new, old))
    assert rec is new and was is None
    rec, n = store.update_with(lambda old: (None, len(old.gates)))
    assert rec is None and n == len(GATES) and store.load() is None
    with pytest.raises(TypeError, match="RolloutRecord objects, not dict"):
        store.update(lambda _old: new.to_dict())
    assert not (tmp_path / "state.json").exists()
