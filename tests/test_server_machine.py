"""Specification of the server's round state machine (octopusd/server/machine.py): pure, no I/O."""
from __future__ import annotations

import itertools

import pytest

from octopusd.errors import ExitCode, TransitionError
from octopusd.server.machine import TABLE, Effect, Ev, Event, ServerMachine, State

NETWORK = (Ev.SILO_ONLINE, Ev.SILO_OFFLINE, Ev.UPDATE_RECEIVED, Ev.UPDATE_VERIFIED,
           Ev.UPDATE_REJECTED, Ev.TIMER, Ev.SHUTDOWN)
# The daemon's completions, each legal only in the state that asked for it.
COMPLETIONS = {
    Ev.GLOBAL_PUBLISHED: State.PUBLISH_GLOBAL,
    Ev.AGGREGATED: State.AGGREGATE,
    Ev.EVALUATED: State.EVALUATE,
    Ev.CHECKPOINTED: State.CHECKPOINT,
    Ev.FINISHED: State.FINISH,
}
REPRESENTATIVE = {
    Ev.SILO_ONLINE: Event(Ev.SILO_ONLINE, rank=1),
    Ev.SILO_OFFLINE: Event(Ev.SILO_OFFLINE, rank=1),
    Ev.UPDATE_RECEIVED: Event(Ev.UPDATE_RECEIVED, rank=1, round=0, name="msg-1"),
    Ev.UPDATE_VERIFIED: Event(Ev.UPDATE_VERIFIED, rank=1, round=0),
    Ev.UPDATE_REJECTED: Event(Ev.UPDATE_REJECTED, rank=1, round=0, detail="bad digest"),
    Ev.TIMER: Event(Ev.TIMER, name="deadline", round=0),
    Ev.GLOBAL_PUBLISHED: Event(Ev.GLOBAL_PUBLISHED, round=0),
    Ev.AGGREGATED: Event(Ev.AGGREGATED, round=0),
    Ev.EVALUATED: Event(Ev.EVALUATED, round=0),
    Ev.CHECKPOINTED: Event(Ev.CHECKPOINTED, round=0),
    Ev.FINISHED: Event(Ev.FINISHED),
    Ev.SHUTDOWN: Event(Ev.SHUTDOWN),
}
# What the daemon answers each effect with, as ServerDaemon._perform does.
FOLLOW = {"publish_global": Ev.GLOBAL_PUBLISHED, "aggregate": Ev.AGGREGATED,
          "evaluate": Ev.EVALUATED, "checkpoint": Ev.CHECKPOINTED, "publish_finish": Ev.FINISHED}
BOOKKEEPING = {"log", "drop", "set_timer", "cancel_timer"}


def machine(**kw) -> ServerMachine:
    args = dict(silos_total=2, per_round=2, comm_round=3, seed=7)
    args.update(kw)
    return ServerMachine(**args)


def feed(m: ServerMachine, event: Event) -> list[Effect]:
    """Handle ``event`` and the completions its effects lead to, like ServerDaemon._dispatch."""
    pending, out = [event], []
    while pending:
        for fx in m.handle(pending.pop(0)):
            out.append(fx)
            if fx.kind in FOLLOW:
                pending.append(Event(FOLLOW[fx.kind], round=fx.args.get("round", m.round)))
    return out


def kinds(effects: list[Effect], *, all_: bool = False) -> list[str]:
    return [fx.kind for fx in effects if all_ or fx.kind not in BOOKKEEPING]


def of_kind(effects: list[Effect], kind: str) -> list[Effect]:
    return [fx for fx in effects if fx.kind == kind]


def collecting(m: ServerMachine | None = None, **kw) -> tuple[ServerMachine, list[Effect]]:
    """A machine brought online and into COLLECT of round 0 the way the daemon would."""
    m = m or machine(**kw)
    fx = m.start()
    # Every silo but the last was already online (retained status), so with min_silos set the
    # round does not start before all of them are there.
    m.online.update(range(1, m.silos_total))
    fx += feed(m, Event(Ev.SILO_ONLINE, rank=m.silos_total))
    assert m.state is State.COLLECT
    return m, fx


def report(m: ServerMachine, rank: int, round_: int | None = None, msg: str | None = None) -> list[Effect]:
    """A silo announces an update and the daemon verifies it."""
    r = m.round if round_ is None else round_
    fx = feed(m, Event(Ev.UPDATE_RECEIVED, rank=rank, round=r, name=msg or f"m-{rank}-{r}"))
    if of_kind(fx, "fetch_update"):
        fx += feed(m, Event(Ev.UPDATE_VERIFIED, rank=rank, round=r))
    return fx


# -- the table, exhaustively --------------------------------------------------------------------

@pytest.mark.parametrize(("state", "ev"), list(itertools.product(State, Ev)),
                         ids=lambda x: x.value)
def test_every_state_and_event_is_handled_or_raises_as_the_table_says(state, ev):
    """An event either has a TABLE entry and yields a list of effects, or raises TransitionError."""
    m = machine(state=state, round=0, selected=(1, 2), online={1, 2})
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


def test_network_events_are_legal_in_every_state():
    """Silo status, updates, timers and shutdown have a handler in every state."""
    missing = [(s, e) for s in State for e in NETWORK if (s, e) not in TABLE]
    assert missing == []


def test_completions_are_legal_only_in_the_state_that_asked_for_them():
    """Daemon completions (GLOBAL_PUBLISHED, AGGREGATED, ...) appear in TABLE for one state each."""
    legal = {(s, e) for (s, e) in TABLE if e in COMPLETIONS}
    assert legal == {(state, ev) for ev, state in COMPLETIONS.items()}


@pytest.mark.parametrize("state", [State.DONE, State.FAILED], ids=lambda s: s.value)
@pytest.mark.parametrize("ev", NETWORK, ids=lambda e: e.value)
def test_network_events_after_the_run_are_dropped(state, ev):
    """Once DONE or FAILED, any network event (even SHUTDOWN) is dropped and changes nothing."""
    m = machine(state=state, round=2, selected=(1, 2), online={1, 2})
    assert kinds(m.handle(REPRESENTATIVE[ev]), all_=True) == ["drop"]
    assert m.state is state


# -- a whole run ----------------------------------------------------------------------------------

def test_three_rounds_with_two_silos_produce_the_expected_effects():
    """start() to DONE: per round publish, 2 fetches, 2 folds, aggregate, evaluate, checkpoint."""
    m = machine(comm_round=3)
    fx = m.start()
    assert kinds(fx, all_=True) == ["set_timer"]
    fx += feed(m, Event(Ev.SILO_ONLINE, rank=1))
    fx += feed(m, Event(Ev.SILO_ONLINE, rank=2))
    for r in range(3):
        assert m.state is State.COLLECT and m.round == r
        fx += feed(m, Event(Ev.UPDATE_RECEIVED, rank=1, round=r, name=f"a{r}"))
        fx += feed(m, Event(Ev.UPDATE_RECEIVED, rank=2, round=r, name=f"b{r}"))
        fx += feed(m, Event(Ev.UPDATE_VERIFIED, rank=2, round=r))
        fx += feed(m, Event(Ev.UPDATE_VERIFIED, rank=1, round=r))
    one_round = ["publish_global", "fetch_update", "fetch_update", "fold_update", "fold_update",
                 "aggregate", "evaluate", "checkpoint"]
    assert kinds(fx) == one_round * 3 + ["publish_finish", "exit"]
    assert m.state is State.DONE
    assert of_kind(fx, "exit")[0].args["code"] == ExitCode.OK == 0
    assert [f.args["round"] for f in of_kind(fx, "publish_global")] == [0, 1, 2]
    assert all(f.args["selected"] == (1, 2) for f in of_kind(fx, "publish_global"))
    assert [f.args["silos"] for f in of_kind(fx, "aggregate")] == [(1, 2)] * 3


def test_each_round_arms_a_deadline_and_a_give_up_timer_and_cancels_them_on_close():
    """COLLECT starts both round timers; closing the round cancels both."""
    m, fx = collecting()
    armed = {(f.args["name"], f.args["round"]) for f in of_kind(fx, "set_timer")}
    assert {("deadline", 0), ("give_up", 0)} <= armed
    fx = report(m, 1) + report(m, 2)
    assert {f.args["name"] for f in of_kind(fx, "cancel_timer")} == {"deadline", "give_up"}


def test_the_round_starts_only_once_enough_silos_are_online():
    """WAIT_SILOS publishes nothing until per_round silos are online, then cancels its timer."""
    m = machine()
    m.start()
    assert kinds(feed(m, Event(Ev.SILO_ONLINE, rank=1)), all_=True) == ["log"]
    assert m.state is State.WAIT_SILOS
    fx = feed(m, Event(Ev.SILO_ONLINE, rank=2))
    assert kinds(fx, all_=True)[:2] == ["cancel_timer", "publish_global"]
    assert m.state is State.COLLECT


def test_with_min_silos_the_round_starts_once_that_many_are_online():
    """min_silos=1 lets the round start with the first silo online, selecting only that one."""
    m = machine(min_silos=1)
    m.start()
    fx = feed(m, Event(Ev.SILO_ONLINE, rank=2))
    assert of_kind(fx, "publish_global")[0].args == {"round": 0, "selected": (2,)}


@pytest.mark.parametrize("state", [State.WAIT_SILOS, State.COLLECT], ids=lambda s: s.value)
@pytest.mark.parametrize("rank", [0, 3, 99])
def test_a_rank_outside_the_federation_never_counts_as_online(state, rank):
    """SILO_ONLINE for a rank outside 1..silos_total is dropped and not added to ``online``."""
    m = machine(state=state, selected=(1, 2), online={1})
    fx = m.handle(Event(Ev.SILO_ONLINE, rank=rank))
    assert kinds(fx, all_=True) == ["drop"]
    assert m.online == {1} and m.state is state


def test_waiting_too_long_for_silos_fails_with_quorum_lost():
    """The wait_silos timer of the current round fails the run with ExitCode.QUORUM_LOST."""
    m = machine()
    m.start()
    m.handle(Event(Ev.SILO_ONLINE, rank=1))
    fx = m.handle(Event(Ev.TIMER, name="wait_silos", round=0))
    assert kinds(fx, all_=True) == ["fail"] and fx[0].args["code"] == ExitCode.QUORUM_LOST
    assert m.state is State.FAILED


# -- duplicates and foreign updates ---------------------------------------------------------------

def test_a_second_update_from_the_same_silo_in_the_same_round_is_dropped():
    """A repeat UPDATE_RECEIVED (new msg id) while fetching or after folding is never fetched again."""
    m, _ = collecting()
    fx = feed(m, Event(Ev.UPDATE_RECEIVED, rank=1, round=0, name="first"))
    fx += feed(m, Event(Ev.UPDATE_RECEIVED, rank=1, round=0, name="again-while-fetching"))
    fx += feed(m, Event(Ev.UPDATE_VERIFIED, rank=1, round=0))
    fx += feed(m, Event(Ev.UPDATE_RECEIVED, rank=1, round=0, name="again-after-fold"))
    fx += feed(m, Event(Ev.UPDATE_VERIFIED, rank=1, round=0))
    assert len(of_kind(fx, "fetch_update")) == 1
    assert len(of_kind(fx, "fold_update")) == 1
    assert [d.args["reason"] for d in of_kind(fx, "drop")] == [
        "duplicate update", "duplicate update", "verified update no longer wanted"]
    assert m.received == {1} and m.state is State.COLLECT


def test_a_redelivered_message_id_is_dropped():
    """An update whose message id was already seen is dropped, even after the first was rejected."""
    m, _ = collecting()
    feed(m, Event(Ev.UPDATE_RECEIVED, rank=1, round=0, name="same-id"))
    feed(m, Event(Ev.UPDATE_REJECTED, rank=1, round=0, detail="digest mismatch"))
    fx = feed(m, Event(Ev.UPDATE_RECEIVED, rank=1, round=0, name="same-id"))
    assert kinds(fx, all_=True) == ["drop"]
    assert fx[0].args["reason"] == "duplicate message id"


def test_a_rejected_update_lets_the_same_silo_send_again():
    """After UPDATE_REJECTED the silo's next update (new msg id) is fetched and folded."""
    m, _ = collecting()
    feed(m, Event(Ev.UPDATE_RECEIVED, rank=1, round=0, name="broken"))
    fx = feed(m, Event(Ev.UPDATE_REJECTED, rank=1, round=0, detail="digest mismatch"))
    assert kinds(fx, all_=True) == ["log"] and m.pending == set()
    fx = report(m, 1, msg="fixed")
    assert kinds(fx) == ["fetch_update", "fold_update"]
    assert m.received == {1}


def test_an_update_for_another_round_is_dropped():
    """Late (earlier round) and early (later round) updates are dropped without fetching."""
    m, _ = collecting()
    m.round = 1
    fx = feed(m, Event(Ev.UPDATE_RECEIVED, rank=1, round=0, name="late"))
    fx += feed(m, Event(Ev.UPDATE_RECEIVED, rank=1, round=2, name="early"))
    assert kinds(fx, all_=True) == ["drop", "drop"]
    assert m.pending == set() and m.seen_msg_ids == set()


def test_an_update_from_an_unselected_silo_is_dropped():
    """A silo not selected for the round cannot contribute to it."""
    m, _ = collecting(silos_total=3, per_round=2)
    outsider = ({1, 2, 3} - set(m.selected)).pop()
    fx = feed(m, Event(Ev.UPDATE_RECEIVED, rank=outsider, round=0, name="x"))
    assert kinds(fx, all_=True) == ["drop"]
    assert fx[0].args["reason"] == "sender not selected for this round"


def test_updates_outside_collect_are_dropped():
    """An update announced while the server aggregates is dropped, not counted toward next round."""
    m = machine(state=State.AGGREGATE, selected=(1, 2), online={1, 2})
    fx = m.handle(Event(Ev.UPDATE_RECEIVED, rank=1, round=0, name="m"))
    assert kinds(fx, all_=True) == ["drop"]
    assert m.pending == set() and m.seen_msg_ids == set()


# -- deadlines and quorum ---------------------------------------------------------------------------

def test_deadline_with_quorum_met_closes_the_round_with_the_silos_received():
    """At the deadline, min_silos reports suffice: aggregate over the silos that reported."""
    m, _ = collecting(min_silos=1)
    report(m, 2)
    fx = m.handle(Event(Ev.TIMER, name="deadline", round=0))
    assert kinds(fx) == ["aggregate"] and fx[-1].args["silos"] == (2,)
    assert m.state is State.AGGREGATE


def test_deadline_without_quorum_waits_for_more_reports():
    """Past the deadline but short of quorum the round stays open; the next report closes it."""
    m, _ = collecting(silos_total=3, per_round=3, min_silos=2)
    report(m, 1)
    fx = m.handle(Event(Ev.TIMER, name="deadline", round=0))
    assert kinds(fx) == [] and m.state is State.COLLECT
    fx = report(m, 3)
    assert of_kind(fx, "aggregate")[0].args["silos"] == (1, 3)


def test_give_up_without_quorum_fails_with_quorum_lost():
    """The give_up timer of the current round fails the run with ExitCode.QUORUM_LOST."""
    m, _ = collecting(min_silos=2)
    report(m, 1)
    m.handle(Event(Ev.TIMER, name="deadline", round=0))
    fx = m.handle(Event(Ev.TIMER, name="give_up", round=0))
    assert kinds(fx, all_=True) == ["fail"]
    assert fx[0].args["code"] == int(ExitCode.QUORUM_LOST)
    assert m.state is State.FAILED


def test_stale_timers_are_dropped():
    """Timers armed for another round neither close nor fail the current round."""
    m, _ = collecting(min_silos=1)
    m.round = 1
    report(m, 1)
    for name in ("deadline", "give_up", "wait_silos"):
        fx = m.handle(Event(Ev.TIMER, name=name, round=0))
        assert kinds(fx, all_=True) == ["drop"] and fx[0].args["reason"] == "stale timer"
    assert m.state is State.COLLECT and not m.deadline_passed


def test_stale_wait_timer_is_dropped_while_waiting():
    """A wait_silos timer from an earlier round does not fail a later wait."""
    m = machine()
    m.start(round_=2)
    fx = m.handle(Event(Ev.TIMER, name="wait_silos", round=1))
    assert kinds(fx, all_=True) == ["drop"] and m.state is State.WAIT_SILOS


# -- silos leaving and rejoining --------------------------------------------------------------------

def test_a_silo_going_offline_mid_collect_is_dropped_and_the_round_closes_with_the_others():
    """Offline during COLLECT removes the silo from the round; the others suffice to close it."""
    m, _ = collecting(silos_total=3, per_round=3)
    report(m, 1)
    report(m, 3)
    fx = feed(m, Event(Ev.SILO_OFFLINE, rank=2))
    assert kinds(fx) == ["aggregate", "evaluate", "checkpoint"]
    assert of_kind(fx, "aggregate")[0].args["silos"] == (1, 3)
    assert m.state is State.WAIT_SILOS and m.round == 1   # 2 of 3 online: wait for the third
    late = feed(m, Event(Ev.UPDATE_RECEIVED, rank=2, round=0, name="late"))
    assert kinds(late, all_=True) == ["drop"]


def test_a_silo_that_already_reported_stays_in_the_round_when_it_goes_offline():
    """Going offline after its update was folded does not remove the silo's contribution."""
    m, _ = collecting()
    report(m, 1)
    m.handle(Event(Ev.SILO_OFFLINE, rank=1))
    fx = report(m, 2)
    assert of_kind(fx, "aggregate")[0].args["silos"] == (1, 2)


def test_a_silo_that_rejoins_is_left_out_of_this_round_and_selected_next_round():
    """A dropped silo back online mid-round cannot report this round but is selected next round."""
    m, _ = collecting(silos_total=3, per_round=3)
    m.handle(Event(Ev.SILO_OFFLINE, rank=2))
    m.handle(Event(Ev.SILO_ONLINE, rank=2))
    assert m.selected == (1, 3) and m.online == {1, 2, 3}
    assert kinds(report(m, 2), all_=True) == ["drop"]
    fx = report(m, 1) + report(m, 3)
    assert of_kind(fx, "aggregate")[0].args["silos"] == (1, 3)
    assert of_kind(fx, "publish_global")[0].args == {"round": 1, "selected": (1, 2, 3)}


def test_too_few_silos_online_after_a_round_waits_for_them():
    """If fewer than per_round silos are online when the next round starts, the server waits."""
    m, _ = collecting()
    for rank in (1, 2):
        m.handle(Event(Ev.UPDATE_RECEIVED, rank=rank, round=0, name=f"m{rank}"))
        m.handle(Event(Ev.UPDATE_VERIFIED, rank=rank, round=0))
    assert m.state is State.AGGREGATE
    m.handle(Event(Ev.SILO_OFFLINE, rank=2))
    fx = feed(m, Event(Ev.AGGREGATED, round=0))
    assert m.state is State.WAIT_SILOS and m.round == 1
    assert [(f.args["name"], f.args["round"]) for f in of_kind(fx, "set_timer")] == [("wait_silos", 1)]
    fx = feed(m, Event(Ev.SILO_ONLINE, rank=2))
    assert of_kind(fx, "publish_global")[0].args == {"round": 1, "selected": (1, 2)}


# -- evaluation frequency -----------------------------------------------------------------------------

@pytest.mark.parametrize(("comm_round", "every", "evaluated"), [
    (5, 2, [1, 3, 4]),
    (4, 2, [1, 3]),
    (3, 1, [0, 1, 2]),
    (3, 10, [2]),
])
def test_evaluation_runs_every_nth_round_and_always_on_the_last(comm_round, every, evaluated):
    """eval_every=N evaluates rounds N-1, 2N-1, ... (0-based) and always the last round."""
    m = machine(comm_round=comm_round, eval_every=every)
    _, fx = collecting(m)
    while m.state is State.COLLECT:
        fx += report(m, 1) + report(m, 2)
    assert m.state is State.DONE
    assert [f.args["round"] for f in of_kind(fx, "evaluate")] == evaluated
    assert [f.args["round"] for f in of_kind(fx, "checkpoint")] == list(range(comm_round))


# -- selection ---------------------------------------------------------------------------------------

def test_select_is_deterministic_per_seed_and_round():
    """Two machines with the same seed and online silos select the same silos for each round."""
    a = machine(silos_total=10, per_round=3, seed=42, online=set(range(1, 11)))
    b = machine(silos_total=10, per_round=3, seed=42, online=set(range(1, 11)))
    picks = [a.select(r) for r in range(20)]
    assert picks == [b.select(r) for r in range(20)]
    assert picks == [a.select(r) for r in range(20)], "select() must not consume hidden state"
    assert len(set(picks)) > 1, "selection should vary across rounds"
    other = machine(silos_total=10, per_round=3, seed=43, online=set(range(1, 11)))
    assert [other.select(r) for r in range(20)] != picks


@pytest.mark.parametrize("online", [{1, 2, 3, 4, 5}, {2, 4, 6, 8}, {3, 9, 10}])
def test_select_picks_per_round_of_the_online_silos(online):
    """select() returns per_round distinct online silos, sorted."""
    m = machine(silos_total=10, per_round=3, online=set(online))
    for r in range(10):
        chosen = m.select(r)
        assert len(chosen) == 3 and len(set(chosen)) == 3
        assert set(chosen) <= online and list(chosen) == sorted(chosen)


def test_select_takes_everyone_when_few_are_online():
    """With no more online silos than per_round, every online silo is selected."""
    m = machine(silos_total=5, per_round=3, online={4, 2})
    assert m.select(0) == (2, 4)


# -- shutdown -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("state", [s for s in State if s not in (State.DONE, State.FAILED)],
                         ids=lambda s: s.value)
def test_shutdown_exits_cleanly_from_any_live_state(state):
    """SHUTDOWN ends the run with exit code 0 and reason 'signal'."""
    m = machine(state=state, selected=(1, 2), online={1, 2})
    fx = m.handle(Event(Ev.SHUTDOWN))
    assert fx == [Effect("exit", {"code": 0, "reason": "signal"})]
    assert m.state is State.DONE
