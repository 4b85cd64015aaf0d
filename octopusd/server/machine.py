"""The server's round state machine: a pure transition table, no I/O.

``WAIT_SILOS → (PUBLISH_GLOBAL → COLLECT → AGGREGATE → [EVALUATE] → CHECKPOINT) × comm_round →
FINISH → DONE``. The daemon feeds :class:`Event` objects to :meth:`ServerMachine.handle` and performs
the :class:`Effect` objects it returns, in order. Everything that decides whether a message
counts (run, round, selection, duplicates) lives here, so it is tested without a broker.

Network events (silo status, updates, timers) are legal in every state: out of place they are
dropped with a reason. Daemon-internal completions (``GLOBAL_PUBLISHED``, ``AGGREGATED``, ...) in a
state that did not ask for them raise :class:`~octopusd.errors.TransitionError`.
"""
from __future__ import annotations

import enum
import random
from dataclasses import dataclass, field
from typing import Any, Callable

from octopusd.errors import ExitCode, TransitionError


class State(enum.Enum):
    WAIT_SILOS = "wait_silos"
    PUBLISH_GLOBAL = "publish_global"
    COLLECT = "collect"
    AGGREGATE = "aggregate"
    EVALUATE = "evaluate"
    CHECKPOINT = "checkpoint"
    FINISH = "finish"
    DONE = "done"
    FAILED = "failed"


class Ev(enum.Enum):
    SILO_ONLINE = "silo_online"          # rank
    SILO_OFFLINE = "silo_offline"        # rank
    UPDATE_RECEIVED = "update_received"  # rank, round, msg_id
    UPDATE_VERIFIED = "update_verified"  # rank, round
    UPDATE_REJECTED = "update_rejected"  # rank, round, reason
    TIMER = "timer"                      # name, round
    GLOBAL_PUBLISHED = "global_published"
    AGGREGATED = "aggregated"
    EVALUATED = "evaluated"
    CHECKPOINTED = "checkpointed"
    FINISHED = "finished"
    SHUTDOWN = "shutdown"


@dataclass(frozen=True)
class Event:
    kind: Ev
    rank: int = 0
    round: int = -1
    name: str = ""
    detail: str = ""


@dataclass(frozen=True)
class Effect:
    """Something for the daemon to do: ``kind`` names it, ``args`` carries its data."""

    kind: str
    args: dict[str, Any] = field(default_factory=dict)


def _fx(kind: str, **args: Any) -> Effect:
    return Effect(kind, args)


@dataclass
class ServerMachine:
    silos_total: int
    per_round: int
    comm_round: int
    min_silos: int = 0             # 0: every selected silo
    eval_every: int = 1
    deadline_s: float = 600.0
    give_up_s: float = 3600.0
    wait_timeout_s: float = 3600.0
    seed: int = 0
    offline_grace_s: float = 0.0   # how long a selected silo may be offline before it is dropped
    state: State = State.WAIT_SILOS
    round: int = 0
    online: set[int] = field(default_factory=set)
    selected: tuple[int, ...] = ()
    pending: set[int] = field(default_factory=set)    # updates being fetched this round
    received: set[int] = field(default_factory=set)   # updates folded into the aggregate
    seen_msg_ids: set[str] = field(default_factory=set)
    deadline_passed: bool = False
    suspect: set[int] = field(default_factory=set)    # selected, offline, within the grace

    # -- derived --------------------------------------------------------------------------
    def quorum(self) -> int:
        need = self.min_silos or len(self.selected) or self.per_round
        return max(1, min(need, len(self.selected) or need))

    def start_quorum(self) -> int:
        return max(1, min(self.per_round, self.min_silos or self.per_round))

    def select(self, round_: int) -> tuple[int, ...]:
        candidates = sorted(self.online)
        if len(candidates) <= self.per_round:
            return tuple(candidates)
        return tuple(sorted(random.Random(self.seed * 1_000_003 + round_).sample(candidates, self.per_round)))

    # -- driver ---------------------------------------------------------------------------
    def handle(self, event: Event) -> list[Effect]:
        handler = TABLE.get((self.state, event.kind))
        if handler is None:
            raise TransitionError("server", self.state, event.kind)
        return handler(self, event)

    def start(self, round_: int = 0) -> list[Effect]:
        """Begin (or resume at) ``round_``: wait for silos."""
        self.round = round_
        self.state = State.WAIT_SILOS
        return [_fx("set_timer", name="wait_silos", delay=self.wait_timeout_s, round=round_)]

    def resume_collect(self, round_: int, selected: tuple[int, ...]) -> list[Effect]:
        """Adopt round ``round_`` that a previous server process already announced to ``selected``.

        The silos may have trained it and their updates may be queued for us: collecting them
        (rather than announcing the round again) is what keeps a crash from costing a round.
        """
        chosen = tuple(sorted({r for r in selected if 1 <= r <= self.silos_total}))
        if not chosen:
            return self.start(round_)
        self.round, self.selected = round_, chosen
        self.pending, self.received, self.suspect, self.deadline_passed = set(), set(), set(), False
        self.state = State.COLLECT
        return [_fx("log", msg="round_adopted", round=round_, selected=list(chosen))] + self._published(
            Event(Ev.GLOBAL_PUBLISHED, round=round_))

    # -- transitions ----------------------------------------------------------------------
    def _wait_online(self, ev: Event) -> list[Effect]:
        if not 1 <= ev.rank <= self.silos_total:
            return self._drop(ev, "no such silo rank")
        self.online.add(ev.rank)
        if len(self.online) >= self.start_quorum():
            return [_fx("cancel_timer", name="wait_silos")] + self._publish()
        return [_fx("log", msg="waiting_for_silos", online=sorted(self.online), need=self.start_quorum())]

    def _wait_offline(self, ev: Event) -> list[Effect]:
        self.online.discard(ev.rank)
        return []

    def _publish(self) -> list[Effect]:
        self.state = State.PUBLISH_GLOBAL
        self.selected = self.select(self.round)
        self.pending, self.received, self.suspect, self.deadline_passed = set(), set(), set(), False
        return [_fx("publish_global", round=self.round, selected=self.selected)]

    def _published(self, ev: Event) -> list[Effect]:
        self.state = State.COLLECT
        return [_fx("set_timer", name="deadline", delay=self.deadline_s, round=self.round),
                _fx("set_timer", name="give_up", delay=self.give_up_s, round=self.round)]

    def _any_online(self, ev: Event) -> list[Effect]:
        if not 1 <= ev.rank <= self.silos_total:  # must never count toward quorum or selection
            return self._drop(ev, "no such silo rank")
        self.online.add(ev.rank)
        if ev.rank in self.suspect:
            self.suspect.discard(ev.rank)
            return [_fx("cancel_timer", name=f"offline:{ev.rank}"),
                    _fx("log", msg="silo_back_online", silo=ev.rank, round=self.round)]
        return []

    def _any_offline(self, ev: Event) -> list[Effect]:
        self.online.discard(ev.rank)
        return []

    def _collect_offline(self, ev: Event) -> list[Effect]:
        self.online.discard(ev.rank)
        if ev.rank not in self.selected or ev.rank in self.received or ev.rank in self.suspect:
            return []
        if self.offline_grace_s > 0:
            # A broker restart makes every client's last will fire: wait to see if it comes back.
            self.suspect.add(ev.rank)
            return [_fx("set_timer", name=f"offline:{ev.rank}", delay=self.offline_grace_s, round=self.round),
                    _fx("log", msg="silo_offline_in_round", silo=ev.rank, round=self.round,
                        grace_s=self.offline_grace_s)]
        return self._drop_from_round(ev.rank)

    def _drop_from_round(self, rank: int) -> list[Effect]:
        self.selected = tuple(r for r in self.selected if r != rank)
        self.pending.discard(rank)
        self.suspect.discard(rank)
        fx = [_fx("log", msg="silo_dropped_from_round", silo=rank, round=self.round)]
        return fx + self._maybe_close()

    def _drop(self, ev: Event, reason: str) -> list[Effect]:
        return [_fx("drop", reason=reason, silo=ev.rank, round=ev.round, ev=ev.kind.value)]

    def _update_elsewhere(self, ev: Event) -> list[Effect]:
        return self._drop(ev, f"not collecting (state {self.state.value})")

    def _update_received(self, ev: Event) -> list[Effect]:
        if ev.round != self.round:
            return self._drop(ev, f"update for round {ev.round}, collecting round {self.round}")
        if ev.rank not in self.selected:
            return self._drop(ev, "sender not selected for this round")
        if ev.rank in self.received or ev.rank in self.pending:
            return self._drop(ev, "duplicate update")
        if ev.name and ev.name in self.seen_msg_ids:
            return self._drop(ev, "duplicate message id")
        if ev.name:
            self.seen_msg_ids.add(ev.name)
        self.pending.add(ev.rank)
        return [_fx("fetch_update", rank=ev.rank, round=ev.round, msg_id=ev.name)]

    def _update_verified(self, ev: Event) -> list[Effect]:
        if ev.round != self.round or ev.rank not in self.pending:
            return self._drop(ev, "verified update no longer wanted")
        self.pending.discard(ev.rank)
        self.received.add(ev.rank)
        return [_fx("fold_update", rank=ev.rank, round=ev.round)] + self._maybe_close()

    def _update_rejected(self, ev: Event) -> list[Effect]:
        if ev.round == self.round:
            self.pending.discard(ev.rank)
        return [_fx("log", msg="update_rejected", silo=ev.rank, round=ev.round, reason=ev.detail)]

    def _maybe_close(self) -> list[Effect]:
        everyone = set(self.selected) <= self.received
        quorum_met = len(self.received) >= self.quorum()
        if (everyone and self.received) or (self.deadline_passed and quorum_met):
            self.state = State.AGGREGATE
            return [_fx("cancel_timer", name="deadline"), _fx("cancel_timer", name="give_up"),
                    _fx("aggregate", round=self.round, silos=tuple(sorted(self.received)))]
        return []

    def _collect_timer(self, ev: Event) -> list[Effect]:
        if ev.round != self.round:
            return self._drop(ev, "stale timer")
        if ev.name == "deadline":
            self.deadline_passed = True
            missing = sorted(set(self.selected) - self.received)
            return [_fx("log", msg="round_deadline", round=self.round, missing=missing,
                        received=len(self.received), quorum=self.quorum())] + self._maybe_close()
        if ev.name.startswith("offline:"):
            rank = int(ev.name.split(":", 1)[1])
            if rank in self.suspect and rank not in self.online and rank not in self.received:
                return self._drop_from_round(rank)
            return self._drop(ev, "silo came back")
        if ev.name == "give_up":
            return self._fail(ExitCode.QUORUM_LOST,
                              f"round {self.round}: {len(self.received)} of quorum {self.quorum()} "
                              f"reported before the give-up time")
        return self._drop(ev, f"unknown timer {ev.name}")

    def _wait_timer(self, ev: Event) -> list[Effect]:
        if ev.name == "wait_silos" and ev.round == self.round:
            return self._fail(ExitCode.QUORUM_LOST, f"only {len(self.online)} of "
                              f"{self.start_quorum()} silos came online in time")
        return self._drop(ev, "stale timer")

    def _fail(self, code: ExitCode, reason: str) -> list[Effect]:
        self.state = State.FAILED
        return [_fx("fail", code=int(code), reason=reason)]

    def _aggregated(self, ev: Event) -> list[Effect]:
        last = self.round == self.comm_round - 1
        if last or (self.round + 1) % self.eval_every == 0:
            self.state = State.EVALUATE
            return [_fx("evaluate", round=self.round)]
        self.state = State.CHECKPOINT
        return [_fx("checkpoint", round=self.round)]

    def _evaluated(self, ev: Event) -> list[Effect]:
        self.state = State.CHECKPOINT
        return [_fx("checkpoint", round=self.round)]

    def _checkpointed(self, ev: Event) -> list[Effect]:
        if self.round + 1 >= self.comm_round:
            self.state = State.FINISH
            return [_fx("publish_finish", reason="completed")]
        self.round += 1
        if len(self.online) >= self.start_quorum():
            return self._publish()
        self.state = State.WAIT_SILOS
        return [_fx("set_timer", name="wait_silos", delay=self.wait_timeout_s, round=self.round)]

    def _finished(self, ev: Event) -> list[Effect]:
        self.state = State.DONE
        return [_fx("exit", code=int(ExitCode.OK))]

    def _shutdown(self, ev: Event) -> list[Effect]:
        self.state = State.DONE
        return [_fx("exit", code=int(ExitCode.OK), reason="signal")]

    def _ignore_in_final(self, ev: Event) -> list[Effect]:
        return self._drop(ev, f"run is {self.state.value}")


_Handler = Callable[[ServerMachine, Event], list[Effect]]
_NETWORK = (Ev.SILO_ONLINE, Ev.SILO_OFFLINE, Ev.UPDATE_RECEIVED, Ev.UPDATE_VERIFIED,
            Ev.UPDATE_REJECTED, Ev.TIMER, Ev.SHUTDOWN)


def _table() -> dict[tuple[State, Ev], _Handler]:
    M = ServerMachine
    t: dict[tuple[State, Ev], _Handler] = {}
    for s in State:
        t[(s, Ev.SILO_ONLINE)] = M._any_online
        t[(s, Ev.SILO_OFFLINE)] = M._any_offline
        t[(s, Ev.UPDATE_RECEIVED)] = M._update_elsewhere
        t[(s, Ev.UPDATE_VERIFIED)] = M._update_elsewhere
        t[(s, Ev.UPDATE_REJECTED)] = M._update_rejected
        t[(s, Ev.TIMER)] = lambda m, e: m._drop(e, "timer not relevant")
        t[(s, Ev.SHUTDOWN)] = M._shutdown
    t[(State.WAIT_SILOS, Ev.SILO_ONLINE)] = M._wait_online
    t[(State.WAIT_SILOS, Ev.SILO_OFFLINE)] = M._wait_offline
    t[(State.WAIT_SILOS, Ev.TIMER)] = M._wait_timer
    t[(State.PUBLISH_GLOBAL, Ev.GLOBAL_PUBLISHED)] = M._published
    t[(State.COLLECT, Ev.SILO_OFFLINE)] = M._collect_offline
    t[(State.COLLECT, Ev.UPDATE_RECEIVED)] = M._update_received
    t[(State.COLLECT, Ev.UPDATE_VERIFIED)] = M._update_verified
    t[(State.COLLECT, Ev.TIMER)] = M._collect_timer
    t[(State.AGGREGATE, Ev.AGGREGATED)] = M._aggregated
    t[(State.EVALUATE, Ev.EVALUATED)] = M._evaluated
    t[(State.CHECKPOINT, Ev.CHECKPOINTED)] = M._checkpointed
    t[(State.FINISH, Ev.FINISHED)] = M._finished
    for s in (State.DONE, State.FAILED):
        for e in _NETWORK:
            t[(s, e)] = M._ignore_in_final
    return t


TABLE = _table()
