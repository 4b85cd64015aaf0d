"""MQTT control envelopes: the msgpack messages server and silos exchange, and their validation.

This module owns the envelope schema (top-level fields and the body of each message type) and is
the only place envelopes are encoded or decoded. Decoding treats its input as hostile: size and
msgpack limits come first, then every field is type- and range-checked (``bool`` is never taken
for an ``int``), unknown keys are refused, and every failure raises
:class:`~octopusd.errors.EnvelopeError` naming the field, whatever the bytes.

Wire map (short keys)::

    {"v": schema, "t": type, "run": run_id, "r": round, "s": sender, "id": msg_id,
     "ts": sent_at, "b": body, ["sig": signature bytes]}

A :class:`PayloadRef` travels inside bodies as ``{"sha256", "size", "key" | "inline"}``; decoding
turns it into a :class:`PayloadRef` object and encoding turns it back. Encoding runs the same
checks as decoding, so a sender cannot publish an envelope its peers would reject.
"""
from __future__ import annotations

import enum
import hashlib
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from uuid import uuid4

import msgpack

from octopusd.errors import EnvelopeError

SCHEMA_VERSION = 1
MAX_ENVELOPE_BYTES = 16 * 2**20
MAX_SIG_BYTES = 256
MAX_SELECTED = 100_000
MAX_KEY_CHARS = 1024
_INT31 = 2**31
_RUN_ID = re.compile(r"[A-Za-z0-9_.-]{1,128}")
_MSG_ID = re.compile(r"[0-9a-zA-Z_-]{1,64}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_TOP_KEYS = frozenset({"v", "t", "run", "r", "s", "id", "ts", "b"})
_OPTIONAL_TOP_KEYS = frozenset({"sig"})
_REF_KEYS = frozenset({"sha256", "size", "key", "inline"})
_STATES = ("online", "offline", "finished")


class MsgType(str, enum.Enum):
    """Envelope message types (the wire value is the string)."""

    STATUS = "status"
    ROUND_START = "round_start"
    UPDATE = "update"
    FINISH = "finish"


def sha256_hex(data: bytes | bytearray | memoryview) -> str:
    """Lowercase hex SHA-256 of a bytes-like object, as carried in :attr:`PayloadRef.sha256`."""
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class PayloadRef:
    """Where a tensor payload is: an S3 ``key``, or ``inline`` bytes; exactly one is set.

    Constructing an invalid reference raises :class:`EnvelopeError`.
    """

    sha256: str
    size: int
    key: str | None = None
    inline: bytes | None = None

    def __post_init__(self) -> None:
        if isinstance(self.inline, (bytearray, memoryview)):
            object.__setattr__(self, "inline", bytes(self.inline))
        _check_ref_fields("PayloadRef", self.sha256, self.size, self.key, self.inline)

    @classmethod
    def for_data(cls, data: bytes | bytearray | memoryview, *,
                 key: str | None = None) -> PayloadRef:
        """Describe ``data``: stored under ``key`` when given, else carried inline."""
        size = memoryview(data).nbytes
        inline = None if key is not None else bytes(data)
        return cls(sha256=sha256_hex(data), size=size, key=key, inline=inline)


@dataclass(frozen=True)
class Envelope:
    """One control message. ``sender`` 0 is the server, N >= 1 is silo rank N."""

    type: MsgType
    run_id: str
    round: int
    sender: int
    body: Mapping[str, Any]
    msg_id: str = field(default_factory=lambda: uuid4().hex)
    sent_at: float = field(default_factory=time.time)
    schema: int = SCHEMA_VERSION
    sig: bytes | None = None

    def payload_ref(self) -> PayloadRef | None:
        """The body's ``"payload"`` as a :class:`PayloadRef`, or None when it has none."""
        ref = self.body.get("payload") if isinstance(self.body, Mapping) else None
        if ref is None or isinstance(ref, PayloadRef):
            return ref
        return _payload_ref("b.payload", ref)


# --------------------------------------------------------------------------------------------
# Field checks: each takes (field name, value) and returns the normalized value or raises.
# --------------------------------------------------------------------------------------------


def _fail(name: str, problem: str) -> EnvelopeError:
    return EnvelopeError(f"invalid envelope: {name}: {problem}")


def _tname(v: object) -> str:
    return "nil" if v is None else type(v).__name__


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int(name: str, v: object, lo: int, hi: int = 2**63) -> int:
    if not _is_int(v):
        raise _fail(name, f"must be an int, got {_tname(v)}")
    if not lo <= v < hi:  # type: ignore[operator]
        raise _fail(name, f"{v} is out of range [{lo}, {hi})")
    return v  # type: ignore[return-value]


def _number(name: str, v: object, *, finite: bool = True, lo: float | None = None,
            strict: bool = False) -> float:
    """A float or int (not bool) as float; ``lo`` is a lower bound, exclusive when ``strict``."""
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise _fail(name, f"must be a number, got {_tname(v)}")
    x = float(v)
    if finite and not math.isfinite(x):
        raise _fail(name, f"must be finite, got {x}")
    if lo is not None and (x <= lo if strict else x < lo):
        raise _fail(name, f"must be {'>' if strict else '>='} {lo}, got {x}")
    return x


def _str(name: str, v: object, max_len: int, *, min_len: int = 0,
         pattern: re.Pattern[str] | None = None) -> str:
    if not isinstance(v, str):
        raise _fail(name, f"must be a str, got {_tname(v)}")
    if not min_len <= len(v) <= max_len:
        raise _fail(name, f"length {len(v)} is outside [{min_len}, {max_len}]")
    if pattern is not None and not pattern.fullmatch(v):
        raise _fail(name, f"{v[:80]!r} does not match {pattern.pattern}")
    return v


def _check_ref_fields(name: str, sha256: object, size: object, key: object, inline: object) -> None:
    _str(f"{name}.sha256", sha256, 64, min_len=64, pattern=_SHA256)
    _int(f"{name}.size", size, 0)
    if (key is None) == (inline is None):
        raise _fail(name, "exactly one of 'key' and 'inline' must be set")
    if key is not None:
        _str(f"{name}.key", key, MAX_KEY_CHARS, min_len=1)
        if "\x00" in key:  # type: ignore[operator]
            raise _fail(f"{name}.key", "must not contain NUL")
    elif not isinstance(inline, bytes):
        raise _fail(f"{name}.inline", f"must be bytes, got {_tname(inline)}")
    elif len(inline) != size:
        raise _fail(f"{name}.inline", f"holds {len(inline)} bytes but size says {size}")


def _payload_ref(name: str, v: object) -> PayloadRef:
    if isinstance(v, PayloadRef):
        _check_ref_fields(name, v.sha256, v.size, v.key, v.inline)
        return v
    if not isinstance(v, dict):
        raise _fail(name, f"must be a map, got {_tname(v)}")
    extra = set(v) - _REF_KEYS
    if extra:
        raise _fail(name, f"unknown key(s) {sorted(map(repr, extra))}")
    for required in ("sha256", "size"):
        if required not in v:
            raise _fail(name, f"missing key {required!r}")
    sha, size, key, inline = v["sha256"], v["size"], v.get("key"), v.get("inline")
    _check_ref_fields(name, sha, size, key, inline)
    return PayloadRef(sha256=sha, size=size, key=key, inline=inline)


def _selected(name: str, v: object) -> list[int]:
    if not isinstance(v, (list, tuple)):
        raise _fail(name, f"must be a list, got {_tname(v)}")
    if not 1 <= len(v) <= MAX_SELECTED:
        raise _fail(name, f"must hold 1..{MAX_SELECTED} silo ranks, got {len(v)}")
    for i, rank in enumerate(v):
        _int(f"{name}[{i}]", rank, 1, _INT31)
    if len(set(v)) != len(v):
        raise _fail(name, "silo ranks must be distinct")
    return list(v)


def _state(name: str, v: object) -> str:
    if not isinstance(v, str) or v not in _STATES:
        raise _fail(name, f"must be one of {list(_STATES)}, got {v!r}")
    return v


_Check = Callable[[str, Any], Any]
#: Per message type: {body key: (required, check)}.
_BODIES: dict[MsgType, dict[str, tuple[bool, _Check]]] = {
    MsgType.STATUS: {
        "state": (True, _state),
        "num_samples": (False, lambda n, v: _int(n, v, 0)),
        "detail": (False, lambda n, v: _str(n, v, 512)),
    },
    MsgType.ROUND_START: {
        "selected": (True, _selected),
        "payload": (True, _payload_ref),
        "deadline_s": (False, lambda n, v: _number(n, v, lo=0.0, strict=True)),
    },
    MsgType.UPDATE: {
        "payload": (True, _payload_ref),
        "num_samples": (True, lambda n, v: _int(n, v, 1)),
        "train_loss": (False, lambda n, v: _number(n, v, finite=False)),
        "train_seconds": (False, lambda n, v: _number(n, v, lo=0.0)),
    },
    MsgType.FINISH: {
        "reason": (True, lambda n, v: _str(n, v, 256)),
        "final_payload": (False, _payload_ref),
    },
}


def _body(mtype: MsgType, body: object) -> dict[str, Any]:
    if not isinstance(body, Mapping):
        raise _fail("b", f"must be a map, got {_tname(body)}")
    bad_keys = [k for k in body if not isinstance(k, str)]
    if bad_keys:
        raise _fail("b", f"keys must be str, got {bad_keys[0]!r}")
    spec = _BODIES[mtype]
    extra = sorted(set(body) - set(spec))
    if extra:
        raise _fail("b", f"unknown key(s) {extra} for a {mtype.value!r} message")
    missing = [k for k, (required, _) in spec.items() if required and k not in body]
    if missing:
        raise _fail("b", f"missing required key(s) {missing} for a {mtype.value!r} message")
    return {k: check(f"b.{k}", body[k]) for k, (_, check) in spec.items() if k in body}


def _msg_type(v: object) -> MsgType:
    if isinstance(v, str):
        try:
            return MsgType(v)
        except ValueError:
            pass
    known = [t.value for t in MsgType]
    raise _fail("t", f"unknown message type {v!r}; known: {known}")


def _sig(v: object) -> bytes:
    if not isinstance(v, bytes):
        raise _fail("sig", f"must be bytes, got {_tname(v)}")
    if len(v) > MAX_SIG_BYTES:
        raise _fail("sig", f"{len(v)} bytes is over the limit of {MAX_SIG_BYTES}")
    return v


def _envelope(wire: object) -> Envelope:
    """Validate a decoded top-level map and build the :class:`Envelope`."""
    if not isinstance(wire, dict):
        raise EnvelopeError(f"invalid envelope: must be a msgpack map, got {_tname(wire)}")
    if "v" not in wire:
        raise _fail("v", "missing schema version")
    version = wire["v"]
    if not _is_int(version) or version != SCHEMA_VERSION:
        raise _fail("v", f"unsupported schema version {version!r} (this build: {SCHEMA_VERSION})")
    missing = sorted(_TOP_KEYS - set(wire))
    if missing:
        raise EnvelopeError(f"invalid envelope: missing key(s) {missing}")
    extra = set(wire) - _TOP_KEYS - _OPTIONAL_TOP_KEYS
    if extra:
        raise EnvelopeError(f"invalid envelope: unknown key(s) {sorted(map(repr, extra))}")
    mtype = _msg_type(wire["t"])
    return Envelope(
        type=mtype,
        run_id=_str("run", wire["run"], 128, min_len=1, pattern=_RUN_ID),
        round=_int("r", wire["r"], -1, _INT31),
        sender=_int("s", wire["s"], 0, _INT31),
        body=_body(mtype, wire["b"]),
        msg_id=_str("id", wire["id"], 64, min_len=1, pattern=_MSG_ID),
        sent_at=_number("ts", wire["ts"]),
        schema=version,  # type: ignore[arg-type]
        sig=_sig(wire["sig"]) if "sig" in wire else None,
    )


# --------------------------------------------------------------------------------------------
# Encoding and decoding
# --------------------------------------------------------------------------------------------


def _ref_to_wire(ref: PayloadRef) -> dict[str, Any]:
    wire: dict[str, Any] = {"sha256": ref.sha256, "size": ref.size}
    if ref.key is not None:
        wire["key"] = ref.key
    else:
        wire["inline"] = ref.inline
    return wire


def encode_envelope(env: Envelope, *, max_bytes: int = MAX_ENVELOPE_BYTES) -> bytes:
    """Validate ``env`` exactly as :func:`decode_envelope` would and return its msgpack bytes.

    Raises :class:`EnvelopeError` when the envelope is invalid or its encoding is over
    ``max_bytes`` (the receivers' default limit).
    """
    if not isinstance(env, Envelope):
        raise EnvelopeError(f"expected an Envelope, got {_tname(env)}")
    wire: dict[str, Any] = {
        "v": env.schema,
        "t": env.type.value if isinstance(env.type, MsgType) else env.type,
        "run": env.run_id, "r": env.round, "s": env.sender, "id": env.msg_id,
        "ts": env.sent_at, "b": env.body,
    }
    if env.sig is not None:
        wire["sig"] = env.sig
    checked = _envelope(wire)
    wire["b"] = {k: _ref_to_wire(v) if isinstance(v, PayloadRef) else v
                 for k, v in checked.body.items()}
    data = msgpack.packb(wire, use_bin_type=True)
    if len(data) > max_bytes:
        raise EnvelopeError(f"encoded envelope is {len(data)} bytes, over the limit of {max_bytes}")
    return data


def _reject_ext(code: int, data: bytes) -> Any:
    raise EnvelopeError(f"invalid envelope: msgpack extension type {code} is not allowed")


def _unpack(data: object, max_bytes: int) -> Any:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise EnvelopeError(f"expected bytes, got {_tname(data)}")
    size = memoryview(data).nbytes
    if size > max_bytes:
        raise EnvelopeError(f"envelope is {size} bytes, over the limit of {max_bytes}")
    try:
        return msgpack.unpackb(
            data, raw=False, strict_map_key=True, use_list=True, ext_hook=_reject_ext,
            max_ext_len=0, max_bin_len=max_bytes, max_str_len=4 * MAX_KEY_CHARS,
            max_array_len=MAX_SELECTED + 1, max_map_len=16,  # +1: let the field check say why
        )
    except EnvelopeError:
        raise
    except Exception as exc:
        raise EnvelopeError(f"envelope is not valid msgpack: {type(exc).__name__}: {exc}") from exc


def decode_envelope(data: bytes | bytearray | memoryview, *,
                    max_bytes: int = MAX_ENVELOPE_BYTES) -> Envelope:
    """Parse and validate an envelope; body ``PayloadRef`` maps become :class:`PayloadRef`.

    Raises :class:`EnvelopeError`, and nothing else, for any invalid input.
    """
    try:
        return _envelope(_unpack(data, max_bytes))
    except EnvelopeError:
        raise
    except Exception as exc:  # defence in depth: nothing else may escape a decoder
        raise EnvelopeError(f"malformed envelope: {type(exc).__name__}: {exc}") from exc
