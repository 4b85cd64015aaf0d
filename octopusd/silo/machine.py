"""The silo master's round state machine: a pure transition table, no I/O.

``STARTING → IDLE → (FETCH → TRAIN → UPLOAD → IDLE) per selected round → DONE``. The daemon feeds
:class:`Event` objects and performs the returned :class:`~octopusd.server.machine.Effect` objects.
Round announcements are network events, legal everywhere: one that is stale, duplicate, or not
for this silo is dropped; one that arrives while busy is kept as the next job. Completions the
daemon reports in the wrong state raise :class:`~octopusd.errors.TransitionError`.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Callable

from octopusd.errors import ExitCode, TransitionError
from octopusd.server.machine import Effect


class State(enum.Enum):
    STARTING = "starting"    # launching the trainer group
    IDLE = "idle"            # waiting for a round that selects this silo
    FETCH = "fetch"          # downloading and verifying the global model
    TRAIN = "train"          # the trainer group is training
    UPLOAD = "upload"        # uploading the update and announcing it
    DONE = "done"


class Ev(enum.Enum):
    GROUP_READY = "group_ready"
    GROUP_FAILED = "group_failed"        # the group died and could not be relaunched
    ROUND_START = "round_start"          # round, selected
    GLOBAL_FETCHED = "global_fetched"    # round
    GLOBAL_REJECTED = "global_rejected"  # round, detail
    TRAINED = "trained"                  # round
    TRAIN_FAILED = "train_failed"        # round, detail
    UPLOADED = "uploaded"                # round
    FINISH = "finish"
    SHUTDOWN = "shutdown"


@dataclass(frozen=True)
class Event:
    kind: Ev
    round: int = -1
    selected: tuple[int, ...] = ()
    detail: str = ""
    token: Any = None      # opaque daemon data (the announcement envelope)


def _fx(kind: str, **args: Any) -> Effect:
    return Effect(kind, args)


@dataclass
class SiloMachine:
    rank: int
    state: State = State.STARTING
    current: int = -1          # round being worked on
    last_done: int = -1        # highest round whose update was uploaded
    newest: int = -1           # highest round announced (to anyone): older rounds are closed
    next_job: Event | None = None
    finishing: bool = False

    def handle(self, event: Event) -> list[Effect]:
        handler = TABLE.get((self.state, event.kind))
        if handler is None:
            raise TransitionError(f"silo {self.rank}", self.state, event.kind)
        return handler(self, event)

    def start(self) -> list[Effect]:
        self.state = State.STARTING
        return [_fx("launch_group")]

    # -- transitions ----------------------------------------------------------------------
    def _wanted(self, ev: Event) -> str | None:
        """Why an announcement is not for us, or None if it is."""
        if self.rank not in ev.selected:
            return "silo not selected this round"
        if ev.round <= self.last_done or ev.round == self.current:
            return "round already handled"
        if ev.round < self.newest:
            # The server announces a round only after closing the one before: this one is over
            # (e.g. announcements queued for us while this silo master was down).
            return "a newer round was announced"
        return None

    def _announce(self, ev: Event) -> list[Effect]:
        self.newest = max(self.newest, ev.round)
        why = self._wanted(ev)
        if why:
            return [_fx("drop", reason=why, round=ev.round)]
        if self.state is State.IDLE:
            return self._begin(ev)
        # Busy (or still starting): remember only the newest announcement.
        if self.next_job is None or ev.round > self.next_job.round:
            self.next_job = ev
        return [_fx("log", msg="round_queued", round=ev.round, busy_with=self.current)]

    def _begin(self, ev: Event) -> list[Effect]:
        self.state, self.current, self.next_job = State.FETCH, ev.round, None
        return [_fx("fetch_global", round=ev.round, token=ev.token)]

    def _idle(self) -> list[Effect]:
        self.state, self.current = State.IDLE, -1
        if self.finishing:
            return self._finish(None)
        if self.next_job is not None and self._wanted(self.next_job) is None:
            return self._begin(self.next_job)
        self.next_job = None
        return []

    def _group_ready(self, ev: Event) -> list[Effect]:
        return [_fx("publish_status", state="online")] + self._idle()

    def _fetched(self, ev: Event) -> list[Effect]:
        self._same_round(ev)
        if self.finishing:  # the run is over: do not start training a round nobody will use
            return self._idle()
        self.state = State.TRAIN
        return [_fx("train", round=ev.round)]

    def _rejected(self, ev: Event) -> list[Effect]:
        self._same_round(ev)
        return [_fx("log", msg="global_model_rejected", round=ev.round, reason=ev.detail)] + self._idle()

    def _trained(self, ev: Event) -> list[Effect]:
        self._same_round(ev)
        if self.finishing:  # the server has finished: an upload would never be read
            return self._idle()
        self.state = State.UPLOAD
        return [_fx("upload", round=ev.round)]

    def _train_failed(self, ev: Event) -> list[Effect]:
        self._same_round(ev)
        return [_fx("log", msg="round_training_failed", round=ev.round, reason=ev.detail)] + self._idle()

    def _uploaded(self, ev: Event) -> list[Effect]:
        self._same_round(ev)
        self.last_done = max(self.last_done, ev.round)
        return self._idle()

    def _finish(self, ev: Event | None) -> list[Effect]:
        if self.state in (State.FETCH, State.TRAIN, State.UPLOAD) and ev is not None:
            # Let the current step end cleanly; FINISH takes effect when it does.
            self.finishing = True
            return [_fx("log", msg="finish_after_current_step", round=self.current)]
        self.state = State.DONE
        return [_fx("stop_group"), _fx("publish_status", state="finished"), _fx("exit", code=int(ExitCode.OK))]

    def _group_failed(self, ev: Event) -> list[Effect]:
        self.state = State.DONE
        return [_fx("publish_status", state="offline"),
                _fx("exit", code=int(ExitCode.TRAINER_FAILED), reason=ev.detail)]

    def _shutdown(self, ev: Event) -> list[Effect]:
        self.state = State.DONE
        return [_fx("stop_group"), _fx("publish_status", state="offline"),
                _fx("exit", code=int(ExitCode.OK), reason="signal")]

    def _ignore(self, ev: Event) -> list[Effect]:
        return [_fx("drop", reason=f"silo is {self.state.value}", round=ev.round)]

    def _same_round(self, ev: Event) -> None:
        if ev.round != self.current:
            raise TransitionError(f"silo {self.rank}", self.state, f"{ev.kind} for round {ev.round}")


_Handler = Callable[[SiloMachine, Event], list[Effect]]


def _table() -> dict[tuple[State, Ev], _Handler]:
    M = SiloMachine
    t: dict[tuple[State, Ev], _Handler] = {}
    for s in State:
        t[(s, Ev.ROUND_START)] = M._announce
        t[(s, Ev.FINISH)] = M._finish
        t[(s, Ev.SHUTDOWN)] = M._shutdown
        t[(s, Ev.GROUP_FAILED)] = M._group_failed
    t[(State.STARTING, Ev.GROUP_READY)] = M._group_ready
    t[(State.FETCH, Ev.GLOBAL_FETCHED)] = M._fetched
    t[(State.FETCH, Ev.GLOBAL_REJECTED)] = M._rejected
    t[(State.TRAIN, Ev.TRAINED)] = M._trained
    t[(State.TRAIN, Ev.TRAIN_FAILED)] = M._train_failed
    t[(State.UPLOAD, Ev.UPLOADED)] = M._uploaded
    for e in (Ev.ROUND_START, Ev.FINISH, Ev.SHUTDOWN, Ev.GROUP_FAILED):
        t[(State.DONE, e)] = M._ignore
    return t


TABLE = _table()
