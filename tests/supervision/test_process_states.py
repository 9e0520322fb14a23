"""The one process life shared by workers and script plugins: transitions, grace, backoff."""

from __future__ import annotations

import pytest

from lmcached.supervision.states import (
    TRANSITIONS,
    WORKER_STATE_NAMES,
    WORKER_UP,
    IllegalTransition,
    ProcessLife,
    ProcessState,
    RestartPolicy,
)

S = ProcessState
POLICY = RestartPolicy(grace=1.0, backoff=0.5, backoff_cap=3.0, max_retries=3)


def started(at: float) -> ProcessLife:
    life = ProcessLife("test")
    life.advance(S.STARTING, now=at)
    return life


def test_a_transition_outside_the_table_raises_naming_the_process():
    life = ProcessLife("worker 3")
    with pytest.raises(IllegalTransition, match=r"worker 3: illegal transition STOPPED->RUNNING"):
        life.advance(S.RUNNING)
    assert life.state is S.STOPPED


def test_every_state_has_a_row_and_a_published_worker_name():
    assert set(TRANSITIONS) == set(ProcessState) == set(WORKER_STATE_NAMES)
    assert WORKER_UP == "up"  # clients test the map for this word


def test_start_succeeds_only_after_the_grace_period():
    life = started(at=100.0)
    assert not life.succeeded(100.9, POLICY)
    assert life.succeeded(101.0, POLICY)


def test_fast_failures_double_the_backoff_up_to_the_cap_then_fatal():
    life = started(at=0.0)
    delays = []
    for now in (0.1, 1.2, 2.3):
        delays.append(life.exited(now, POLICY))
        life.advance(S.BACKOFF)
        life.advance(S.STARTING, now=now + 1.0)
    assert delays == [0.5, 1.0, 2.0]
    assert life.exited(3.4, POLICY) is None  # a fourth fast failure in a row, max_retries 3
    assert POLICY.delay(3) == 2.0 and POLICY.delay(4) == 3.0  # capped at backoff_cap


def test_an_exit_after_a_successful_start_backs_off_from_the_start_again():
    life = started(at=0.0)
    life.exited(0.1, POLICY)
    life.advance(S.BACKOFF)
    life.advance(S.STARTING, now=1.0)
    life.advance(S.RUNNING)
    assert life.exited(5.0, POLICY) == 0.5
    assert life.fast_failures == 0
    life.advance(S.BACKOFF)
    assert not life.due(5.4) and life.due(5.5)


def test_no_retry_limit_means_never_fatal():
    policy = RestartPolicy(grace=1.0, backoff=0.1, backoff_cap=0.2)
    life = started(at=0.0)
    assert all(life.exited(0.0, policy) == pytest.approx(min(0.2, 0.1 * 2**i)) for i in range(50))
