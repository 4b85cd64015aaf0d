"""Specification of the silo master's round state machine (octopusd/silo/machine.py): pure, no I/O."""
from __future__ import annotations

import itertools

import pytest

from octopusd.errors import ExitCode, TransitionError
from octopusd.server.machine import Effect
from octopusd.silo.machine import TABLE, Ev, Event, SiloMachine, State

RANK = 1
ANNOUNCEMENTS = (Ev.ROUND_START, Ev.FINISH, Ev.SHUTDOWN, Ev.GROUP_FAILED)
# Completions the daemon reports, each legal only in the state that asked for it.
COMPLETIONS = {
    Ev.GROUP_READY: State.STARTING,
    Ev.GLOBAL_FETCHED: State.FETCH,
    Ev.GLOBAL_REJECTED: State.FETCH,
    Ev.TRAINED: State.TRAIN,
    Ev.TRAIN_FAILED: State.TRAIN,
    Ev.UPLOADED: State.UPLOAD,
}
REPRESENTATIVE = {
    Ev.GROUP_READY: Event(Ev.GROUP_READY),
    Ev.GROUP_FAILED: Event(Ev.GROUP_FAILED, detail="torchrun exited 1"),
    Ev.ROUND_START: Event(Ev.ROUND_START, round=1, selected=(RANK, 2), token="env-1"),
    Ev.GLOBAL_FETCHED: Event(Ev.GLOBAL_FETCHED, round=0),
    Ev.GLOBAL_REJECTED: Event(Ev.GLOBAL_REJECTED, round=0, detail="digest mismatch"),
    Ev.TRAINED: Event(Ev.TRAINED, round=0),
    Ev.TRAIN_FAILED: Event(Ev.TRAIN_FAILED, round=0, detail="nan loss"),
    Ev.UPLOADED: Event(Ev.UPLOADED, round=0),
    Ev.FINISH: Event(Ev.FINISH),
    Ev.SHUTDOWN: Event(Ev.SHUTDOWN),
}
BUSY = (State.FETCH, State.TRAIN, State.UPLOAD)


def kinds(effects: list[Effect]) -> list[str]:
    return [fx.kind for fx in effects]


def announce(round_: int, selected: tuple[int, ...] = (RANK, 2), token: object = None) -> Event:
    return Event(Ev.ROUND_START, round=round_, selected=selected, token=token or f"env-{round_}")


def idle_machine() -> SiloMachine:
    m = SiloMachine(RANK)
    m.start()
    m.handle(Event(Ev.GROUP_READY))
    assert m.state is State.IDLE
    return m


def run_round(m: SiloMachine, round_: int) -> list[Effect]:
    """Announce ``round_`` and complete fetch, train and upload."""
    fx = m.handle(announce(round_))
    for ev in (Ev.GLOBAL_FETCHED, Ev.TRAINED, Ev.UPLOADED):
        fx += m.handle(Event(ev, round=round_))
    return fx


# -- the table, exhaustively --------------------------------------------------------------------

@pytest.mark.parametrize(("state", "ev"), list(itertools.product(State, Ev)),
                         ids=lambda x: x.value)
def test_every_state_and_event_is_handled_or_raises_as_the_table_says(state, ev):
    """An event either has a TABLE entry and yields a list of effects, or raises TransitionError."""
    m = SiloMachine(RANK, state=state, current=0 if state in BUSY else -1)
    event = REPRESENTATIVE[ev]
    if (state, ev) in TABLE:
        effects = m.handle(event)
        assert isinstance(effects, list)
        assert all(isinstance(fx, Effect) for fx in effects)
    else:
        with pytest.raises(TransitionError) as info:
            m.handle(event)
        assert info.value.state is state and info.value.event is ev
        assert m.state is state, "an illegal event must not change the state"


def test_announcements_and_signals_are_legal_in_every_state():
    """ROUND_START, FINISH, SHUTDOWN and GROUP_FAILED have a handler in every state."""
    assert [(s, e) for s in State for e in ANNOUNCEMENTS if (s, e) not in TABLE] == []


def test_completions_are_legal_only_in_the_state_that_asked_for_them():
    """GROUP_READY, GLOBAL_FETCHED, TRAINED, ... appear in TABLE for exactly one state each."""
    legal = {(s, e) for (s, e) in TABLE if e in COMPLETIONS}
    assert legal == {(state, ev) for ev, state in COMPLETIONS.items()}


@pytest.mark.parametrize("ev", ANNOUNCEMENTS, ids=lambda e: e.value)
def test_after_done_everything_is_dropped(ev):
    """In DONE, announcements and signals are dropped without effects beyond a log line."""
    m = SiloMachine(RANK, state=State.DONE)
    assert kinds(m.handle(REPRESENTATIVE[ev])) == ["drop"]
    assert m.state is State.DONE


# -- the happy path ---------------------------------------------------------------------------------

def test_a_round_goes_fetch_train_upload_and_back_to_idle():
    """STARTING → GROUP_READY (online) → ROUND_START → fetch_global → train → upload → IDLE."""
    m = SiloMachine(RANK)
    assert kinds(m.start()) == ["launch_group"]
    assert m.handle(Event(Ev.GROUP_READY)) == [Effect("publish_status", {"state": "online"})]
    assert m.state is State.IDLE
    assert m.handle(announce(0, token="envelope")) == [
        Effect("fetch_global", {"round": 0, "token": "envelope"})]
    assert m.state is State.FETCH and m.current == 0
    assert m.handle(Event(Ev.GLOBAL_FETCHED, round=0)) == [Effect("train", {"round": 0})]
    assert m.state is State.TRAIN
    assert m.handle(Event(Ev.TRAINED, round=0)) == [Effect("upload", {"round": 0})]
    assert m.state is State.UPLOAD
    assert m.handle(Event(Ev.UPLOADED, round=0)) == []
    assert m.state is State.IDLE and m.last_done == 0 and m.current == -1


def test_consecutive_rounds_each_run_once():
    """Rounds 0, 1, 2 announced one after the other each produce one fetch, train and upload."""
    m = idle_machine()
    fx = [f for r in range(3) for f in run_round(m, r)]
    assert kinds(fx) == ["fetch_global", "train", "upload"] * 3
    assert m.last_done == 2


# -- announcements that are not for us --------------------------------------------------------------

def test_a_round_that_does_not_select_this_silo_is_dropped():
    """ROUND_START without this silo's rank in ``selected`` is dropped and the silo stays idle."""
    m = idle_machine()
    fx = m.handle(announce(0, selected=(2, 3)))
    assert kinds(fx) == ["drop"] and fx[0].args["reason"] == "silo not selected this round"
    assert m.state is State.IDLE


def test_a_round_already_uploaded_is_dropped():
    """A redelivered (retained) announcement of a finished round does not train it again."""
    m = idle_machine()
    run_round(m, 0)
    fx = m.handle(announce(0))
    assert kinds(fx) == ["drop"] and fx[0].args["reason"] == "round already handled"
    assert m.state is State.IDLE


def test_an_older_round_is_dropped():
    """An announcement older than the last uploaded round is dropped."""
    m = idle_machine()
    run_round(m, 3)
    assert kinds(m.handle(announce(1))) == ["drop"]


@pytest.mark.parametrize("state", BUSY, ids=lambda s: s.value)
def test_the_round_in_progress_announced_again_is_dropped(state):
    """The announcement of the round being worked on is dropped, not queued."""
    m = SiloMachine(RANK, state=state, current=4)
    fx = m.handle(announce(4))
    assert kinds(fx) == ["drop"] and m.next_job is None


# -- announcements while busy -----------------------------------------------------------------------

@pytest.mark.parametrize("state", BUSY, ids=lambda s: s.value)
def test_an_announcement_while_busy_is_queued_and_started_after_upload(state):
    """A new round arriving mid-round is kept and fetched as soon as the upload completes."""
    m = idle_machine()
    m.handle(announce(0))
    steps = [(State.FETCH, Ev.GLOBAL_FETCHED), (State.TRAIN, Ev.TRAINED)]
    for s, ev in steps:
        if m.state is state:
            break
        m.handle(Event(ev, round=0))
    assert m.state is state
    fx = m.handle(announce(1, token="next"))
    assert kinds(fx) == ["log"] and m.state is state and m.current == 0
    for s, ev in steps + [(State.UPLOAD, Ev.UPLOADED)]:
        if m.state is s:
            fx = m.handle(Event(ev, round=0))
    assert fx == [Effect("fetch_global", {"round": 1, "token": "next"})]
    assert m.state is State.FETCH and m.current == 1 and m.next_job is None


def test_only_the_newest_queued_announcement_is_kept():
    """Two rounds announced while busy: the newer one runs next, the older one is skipped."""
    m = idle_machine()
    m.handle(announce(0))
    m.handle(Event(Ev.GLOBAL_FETCHED, round=0))
    m.handle(announce(2, token="two"))
    m.handle(announce(1, token="one"))
    m.handle(Event(Ev.TRAINED, round=0))
    fx = m.handle(Event(Ev.UPLOADED, round=0))
    assert fx == [Effect("fetch_global", {"round": 2, "token": "two"})]


def test_an_announcement_while_starting_runs_once_the_group_is_ready():
    """A round announced before the trainer group is up is fetched right after GROUP_READY."""
    m = SiloMachine(RANK)
    m.start()
    assert kinds(m.handle(announce(0, token="early"))) == ["log"]
    fx = m.handle(Event(Ev.GROUP_READY))
    assert fx == [Effect("publish_status", {"state": "online"}),
                  Effect("fetch_global", {"round": 0, "token": "early"})]


def test_a_queued_round_is_also_started_after_a_failed_round():
    """After TRAIN_FAILED the silo logs it, goes idle and starts the queued round."""
    m = idle_machine()
    m.handle(announce(0))
    m.handle(Event(Ev.GLOBAL_FETCHED, round=0))
    m.handle(announce(1))
    fx = m.handle(Event(Ev.TRAIN_FAILED, round=0, detail="nan loss"))
    assert kinds(fx) == ["log", "fetch_global"] and m.current == 1
    assert m.last_done == -1, "a failed round is not marked done"


def test_a_rejected_global_model_returns_to_idle():
    """GLOBAL_REJECTED logs the reason and waits for the next announcement."""
    m = idle_machine()
    m.handle(announce(0))
    fx = m.handle(Event(Ev.GLOBAL_REJECTED, round=0, detail="digest mismatch"))
    assert kinds(fx) == ["log"] and fx[0].args["reason"] == "digest mismatch"
    assert m.state is State.IDLE


# -- finishing, shutdown, failure -------------------------------------------------------------------

FINISHED = [Effect("stop_group"), Effect("publish_status", {"state": "finished"}),
            Effect("exit", {"code": 0})]


def test_finish_while_idle_stops_the_group_and_exits_zero():
    """FINISH in IDLE: stop the group, publish 'finished', exit 0."""
    m = idle_machine()
    assert m.handle(Event(Ev.FINISH)) == FINISHED
    assert m.state is State.DONE


def test_finish_during_train_waits_for_the_step_then_exits_zero():
    """FINISH mid-training is deferred; when training ends the silo stops without uploading."""
    m = idle_machine()
    m.handle(announce(0))
    m.handle(Event(Ev.GLOBAL_FETCHED, round=0))
    fx = m.handle(Event(Ev.FINISH))
    assert kinds(fx) == ["log"] and m.state is State.TRAIN
    assert m.handle(Event(Ev.TRAINED, round=0)) == FINISHED
    assert m.state is State.DONE


def test_finish_during_fetch_does_not_start_training():
    """FINISH while fetching: once the fetch ends the silo stops instead of training."""
    m = idle_machine()
    m.handle(announce(0))
    m.handle(Event(Ev.FINISH))
    assert m.handle(Event(Ev.GLOBAL_FETCHED, round=0)) == FINISHED


def test_finish_during_upload_lets_the_upload_complete():
    """FINISH while uploading: the upload completes, then the silo stops."""
    m = idle_machine()
    m.handle(announce(0))
    m.handle(Event(Ev.GLOBAL_FETCHED, round=0))
    m.handle(Event(Ev.TRAINED, round=0))
    m.handle(Event(Ev.FINISH))
    assert m.handle(Event(Ev.UPLOADED, round=0)) == FINISHED
    assert m.last_done == 0


def test_finish_wins_over_a_queued_round():
    """A queued announcement is not started once FINISH has arrived."""
    m = idle_machine()
    m.handle(announce(0))
    m.handle(Event(Ev.GLOBAL_FETCHED, round=0))
    m.handle(announce(1))
    m.handle(Event(Ev.FINISH))
    assert kinds(m.handle(Event(Ev.TRAINED, round=0))) == ["stop_group", "publish_status", "exit"]


@pytest.mark.parametrize("state", [s for s in State if s is not State.DONE], ids=lambda s: s.value)
def test_shutdown_stops_the_group_goes_offline_and_exits_zero(state):
    """SHUTDOWN in any live state: stop_group, publish 'offline', exit 0, without waiting."""
    m = SiloMachine(RANK, state=state, current=0 if state in BUSY else -1)
    assert m.handle(Event(Ev.SHUTDOWN)) == [
        Effect("stop_group"), Effect("publish_status", {"state": "offline"}),
        Effect("exit", {"code": 0, "reason": "signal"})]
    assert m.state is State.DONE


@pytest.mark.parametrize("state", [s for s in State if s is not State.DONE], ids=lambda s: s.value)
def test_group_failure_exits_with_trainer_failed(state):
    """GROUP_FAILED publishes 'offline' and exits with ExitCode.TRAINER_FAILED."""
    m = SiloMachine(RANK, state=state, current=0 if state in BUSY else -1)
    fx = m.handle(Event(Ev.GROUP_FAILED, detail="torchrun exited 1"))
    assert fx == [Effect("publish_status", {"state": "offline"}),
                  Effect("exit", {"code": int(ExitCode.TRAINER_FAILED), "reason": "torchrun exited 1"})]
    assert m.state is State.DONE


@pytest.mark.parametrize(("state", "ev"), [
    (State.FETCH, Ev.GLOBAL_FETCHED), (State.FETCH, Ev.GLOBAL_REJECTED),
    (State.TRAIN, Ev.TRAINED), (State.TRAIN, Ev.TRAIN_FAILED), (State.UPLOAD, Ev.UPLOADED),
], ids=lambda x: x.value)
def test_a_completion_for_the_wrong_round_raises(state, ev):
    """A completion naming a round other than the one in progress raises TransitionError."""
    m = SiloMachine(RANK, state=state, current=3)
    with pytest.raises(TransitionError):
        m.handle(Event(ev, round=2))
    assert m.state is state and m.current == 3
