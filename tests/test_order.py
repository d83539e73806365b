"""The execution-order tracker and its prediction, alone (no model, no store)."""
from __future__ import annotations

from engine.offload.order import OrderTracker, predict

MODE = (True, True)  # (grad enabled, training)


def ev(kind: str, i: int) -> tuple:
    return (kind, i, (("param", f"u{i}"),))


STEP = [ev("F", 0), ev("F", 1), ev("F", 2), ev("B", 2), ev("B", 1), ev("B", 0)]


def run(tracker: OrderTracker, events: list, mode=MODE) -> None:
    tracker.start(mode)
    for e in events:
        tracker.observe(e)


def test_first_step_records_and_next_replays_in_sync():
    t = OrderTracker()
    assert t.trace is None and t.upcoming(2) is None  # nothing recorded yet: no prediction
    run(t, STEP)
    assert t.trace is None  # recorded when the step ends (the next start)
    t.start(MODE)
    assert t.trace == STEP and t.recorded == 1 and t.changes == 0
    assert t.in_sync and t.upcoming(2) == STEP[:2]
    for i, e in enumerate(STEP[:3]):
        t.observe(e)
        assert t.in_sync and t.pos == i + 1
    assert t.upcoming(2) == STEP[3:5]
    for e in STEP[3:]:
        t.observe(e)
    t.finish()  # the same order: not re-recorded
    assert t.recorded == 1 and t.changes == 0 and t.traces[MODE] == STEP


def test_upcoming_wraps_around_at_the_end_of_the_step():
    t = OrderTracker()
    run(t, STEP)
    run(t, STEP[:5])
    # one event left, then the next step starts the same way
    assert t.upcoming(3) == [STEP[5], STEP[0], STEP[1]]
    t.observe(STEP[5])
    assert t.upcoming(2) == STEP[:2]


def test_divergence_leaves_the_recording_and_re_records():
    t = OrderTracker()
    run(t, STEP)
    changed = [ev("F", 0), ev("F", 2), ev("F", 1), ev("B", 1), ev("B", 2), ev("B", 0)]
    run(t, changed[:1])
    assert t.in_sync
    t.observe(changed[1])
    assert not t.in_sync and t.upcoming(2) is None
    for e in changed[2:]:
        t.observe(e)
    t.start(MODE)
    assert t.changes == 1 and t.recorded == 2 and t.trace == changed and t.in_sync
    # a step that stops early (fewer events than recorded) re-records too
    run(t, changed[:3])
    t.finish()
    assert t.changes == 2 and t.traces[MODE] == changed[:3]


def test_modes_are_recorded_separately():
    t = OrderTracker()
    run(t, STEP, mode=(True, True))
    evals = [ev("F", 0), ev("F", 1), ev("F", 2)]
    run(t, evals, mode=(False, False))
    t.start((True, True))
    assert t.traces == {(True, True): STEP, (False, False): evals} and t.changes == 0
    assert t.upcoming(1) == [STEP[0]]


def test_events_before_any_step_start_a_direct_one():
    t = OrderTracker()
    t.observe(ev("F", 0))
    assert t.mode == ("direct",) and t.recording == [ev("F", 0)]


def test_predict_follows_the_recording_when_in_sync():
    t = OrderTracker()
    run(t, STEP)
    run(t, STEP[:1])
    # the fallbacks are not consulted while in sync
    assert predict(t, 2, "F", next_units=iter([("x",)]), unconsumed=iter([("y",)])) == [STEP[1][2], STEP[2][2]]
    assert predict(t, 0, "F", next_units=[("x",)]) == []


def test_predict_falls_back_to_registration_order_forward_and_unconsumed_calls_backward():
    t = OrderTracker()
    run(t, [ev("F", 0)])  # no recording of this mode: not in sync
    units = [("a",), (), ("c",), ("d",)]
    assert predict(t, 2, "F", next_units=units, unconsumed=[("z",)]) == [("a",), ()]
    assert predict(t, 5, "F", next_units=units) == units  # fewer than k left
    assert predict(t, 2, "B", next_units=units, unconsumed=[("z",), ("y",), ("x",)]) == [("z",), ("y",)]

    def lazy():  # read at most k, lazily
        yield ("z",)
        raise AssertionError("read past k")

    assert predict(t, 1, "B", unconsumed=lazy()) == [("z",)]
