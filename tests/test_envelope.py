"""MQTT envelopes: round trips of every message type, one refusal per validation rule, fuzzing."""
from __future__ import annotations

import os

import math
from typing import Any, Callable

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from octopusd.envelope import (
    SCHEMA_VERSION,
    Envelope,
    MsgType,
    PayloadRef,
    decode_envelope,
    encode_envelope,
    sha256_hex,
)
from octopusd.errors import EnvelopeError

FUZZ = settings(
    derandomize=not os.environ.get("OCTOPUSD_FUZZ_RANDOM"), max_examples=int(os.environ.get("OCTOPUSD_FUZZ_EXAMPLES", 2000)), deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
SHA = "ab" * 32
KEY_REF = PayloadRef(sha256=SHA, size=1234, key="runs/r1/round/3/global.octt")
INLINE_REF = PayloadRef.for_data(b"\x00\x01tiny payload")


def env(t: MsgType, body: dict[str, Any], **kw: Any) -> Envelope:
    return Envelope(type=t, run_id=kw.pop("run_id", "run-2024.01_a"), round=kw.pop("round", 3),
                    sender=kw.pop("sender", 1), body=body, **kw)


MINIMAL = {
    MsgType.STATUS: {"state": "online"},
    MsgType.ROUND_START: {"selected": [1], "payload": KEY_REF},
    MsgType.UPDATE: {"payload": INLINE_REF, "num_samples": 1},
    MsgType.FINISH: {"reason": ""},
}
FULL = {
    MsgType.STATUS: {"state": "finished", "num_samples": 0, "detail": "d" * 512},
    MsgType.ROUND_START: {"selected": [3, 1, 2], "payload": INLINE_REF, "deadline_s": 0.5},
    MsgType.UPDATE: {"payload": KEY_REF, "num_samples": 60000, "train_loss": 0.25,
                     "train_seconds": 0},
    MsgType.FINISH: {"reason": "r" * 256, "final_payload": KEY_REF},
}


def wire_of(e: Envelope) -> dict[str, Any]:
    return msgpack.unpackb(encode_envelope(e), raw=False)


VALID_WIRE = wire_of(env(MsgType.UPDATE, dict(FULL[MsgType.UPDATE], payload=INLINE_REF)))


def packed(mutate: Callable[[dict[str, Any]], Any]) -> bytes:
    wire = msgpack.unpackb(msgpack.packb(VALID_WIRE), raw=False)  # deep copy
    mutate(wire)
    return msgpack.packb(wire, use_bin_type=True)


# ------------------------------------------------------------------------------------------
# Round trips and helpers
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bodies", [MINIMAL, FULL], ids=["minimal", "full"])
@pytest.mark.parametrize("t", list(MsgType), ids=lambda t: t.value)
def test_round_trip_every_type(t, bodies):
    e = env(t, bodies[t])
    data = encode_envelope(e)
    assert isinstance(data, bytes)
    back = decode_envelope(data)
    assert back == e
    assert back.type is t and isinstance(back.sent_at, float)
    for value in back.body.values():
        assert not isinstance(value, dict)  # PayloadRef maps became objects


@pytest.mark.parametrize("ref", [KEY_REF, INLINE_REF], ids=["key", "inline"])
def test_payload_ref_round_trip_and_accessor(ref):
    back = decode_envelope(encode_envelope(env(MsgType.UPDATE, {"payload": ref, "num_samples": 5})))
    assert back.payload_ref() == ref and isinstance(back.body["payload"], PayloadRef)
    assert env(MsgType.STATUS, {"state": "online"}).payload_ref() is None


def test_payload_ref_wire_form_omits_the_unused_field():
    b = wire_of(env(MsgType.ROUND_START, {"selected": [1], "payload": KEY_REF}))["b"]
    assert b["payload"] == {"sha256": SHA, "size": 1234, "key": KEY_REF.key}
    b = wire_of(env(MsgType.UPDATE, {"payload": INLINE_REF, "num_samples": 1}))["b"]
    assert set(b["payload"]) == {"sha256", "size", "inline"}


def test_payload_ref_map_in_body_is_accepted_when_encoding():
    body = {"payload": {"sha256": SHA, "size": 1, "inline": b"x"}, "num_samples": 2}
    e = env(MsgType.UPDATE, body)
    assert e.payload_ref() == PayloadRef(sha256=SHA, size=1, inline=b"x")
    assert decode_envelope(encode_envelope(e)).body["payload"] == e.payload_ref()


def test_explicit_nil_for_the_unused_ref_field_is_accepted():
    data = packed(lambda w: w["b"]["payload"].update(key=None))
    assert decode_envelope(data).payload_ref() == INLINE_REF


def test_wire_keys_and_defaults():
    e = env(MsgType.STATUS, {"state": "online"})
    w = wire_of(e)
    assert set(w) == {"v", "t", "run", "r", "s", "id", "ts", "b"}
    assert w["v"] == SCHEMA_VERSION == e.schema and w["t"] == "status" and w["id"] == e.msg_id
    assert len(e.msg_id) == 32 and e.msg_id != env(MsgType.STATUS, {"state": "online"}).msg_id


def test_signature_round_trips():
    e = env(MsgType.STATUS, {"state": "offline"}, sig=b"\x00" * 256)
    assert wire_of(e)["sig"] == b"\x00" * 256
    assert decode_envelope(encode_envelope(e)).sig == b"\x00" * 256


@pytest.mark.parametrize(("rnd", "sender"), [(-1, 0), (0, 2**31 - 1), (2**31 - 1, 1)])
def test_round_and_sender_bounds_accepted(rnd, sender):
    e = env(MsgType.STATUS, {"state": "online"}, round=rnd, sender=sender)
    assert decode_envelope(encode_envelope(e)) == e


def test_nan_train_loss_and_int_numbers_are_accepted():
    body = {"payload": KEY_REF, "num_samples": 3, "train_loss": float("nan"), "train_seconds": 2}
    back = decode_envelope(encode_envelope(env(MsgType.UPDATE, body, sent_at=5)))
    assert math.isnan(back.body["train_loss"]) and back.body["train_seconds"] == 2.0
    assert back.sent_at == 5.0 and isinstance(back.sent_at, float)


def test_decode_accepts_bytearray_and_memoryview():
    data = encode_envelope(env(MsgType.STATUS, {"state": "online"}))
    assert decode_envelope(bytearray(data)) == decode_envelope(memoryview(data))


def test_sha256_hex_and_for_data():
    digest = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    for data in (b"hello", bytearray(b"hello"), memoryview(b"hello")):
        assert sha256_hex(data) == digest
    assert PayloadRef.for_data(b"hello") == PayloadRef(digest, 5, inline=b"hello")
    assert PayloadRef.for_data(b"hello", key="k") == PayloadRef(digest, 5, key="k")
    assert PayloadRef(digest, 5, inline=bytearray(b"hello")).inline == b"hello"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sha256": SHA.upper(), "size": 1, "key": "k"}, "sha256"),
        ({"sha256": SHA, "size": -1, "key": "k"}, "size"),
        ({"sha256": SHA, "size": 1}, "exactly one of 'key' and 'inline'"),
        ({"sha256": SHA, "size": 1, "key": "k", "inline": b"x"}, "exactly one"),
        ({"sha256": SHA, "size": 2, "inline": b"x"}, "holds 1 bytes but size says 2"),
    ],
)
def test_payload_ref_constructor_validates(kwargs, match):
    with pytest.raises(EnvelopeError, match=match):
        PayloadRef(**kwargs)


# ------------------------------------------------------------------------------------------
# Encoder refusals: a sender cannot publish what its peers would reject
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("e", "match"),
    [
        (env(MsgType.STATUS, {"state": "online"}, run_id="bad/run"), "run:"),
        (env(MsgType.STATUS, {"state": "sleeping"}), "b.state"),
        (env(MsgType.STATUS, {"state": "online", "extra": 1}), "unknown key"),
        (env("bogus", {}), "unknown message type"),  # type: ignore[arg-type]
        (env(MsgType.STATUS, {"state": "online"}, schema=2), "unsupported schema version 2"),
        (env(MsgType.STATUS, {"state": "online"}, sig=b"x" * 257), "sig"),
        (env(MsgType.STATUS, {"state": "online"}, msg_id=""), "id:"),
        (env(MsgType.STATUS, ["state"]), "b: must be a map"),  # type: ignore[arg-type]
    ],
)
def test_encode_validates(e, match):
    with pytest.raises(EnvelopeError, match=match):
        encode_envelope(e)


def test_encode_refuses_non_envelope_and_oversize():
    with pytest.raises(EnvelopeError, match="expected an Envelope"):
        encode_envelope({"v": 1})  # type: ignore[arg-type]
    big = env(MsgType.UPDATE, {"payload": PayloadRef.for_data(b"x" * 5000), "num_samples": 1})
    with pytest.raises(EnvelopeError, match="over the limit of 4096"):
        encode_envelope(big, max_bytes=4096)


# ------------------------------------------------------------------------------------------
# Decoder refusals: one case per rule, each naming the field
# ------------------------------------------------------------------------------------------


def body_of(t: MsgType, **changes: Any) -> Callable[[dict[str, Any]], None]:
    """Mutation: make the wire envelope a ``t`` message whose full body has ``changes``."""
    base = msgpack.unpackb(msgpack.packb(wire_of(env(t, FULL[t]))["b"]), raw=False)

    def mutate(w: dict[str, Any]) -> None:
        w["t"] = t.value
        w["b"] = base
        for k, v in changes.items():
            if v is DROP:
                base.pop(k)
            else:
                base[k] = v
    return mutate


def ref_of(**changes: Any) -> Callable[[dict[str, Any]], None]:
    """Mutation: change fields of the update's payload ref (DROP removes one)."""
    def mutate(w: dict[str, Any]) -> None:
        ref = w["b"]["payload"]
        for k, v in changes.items():
            if v is DROP:
                ref.pop(k)
            else:
                ref[k] = v
    return mutate


DROP = object()
S, RS, U, F = MsgType.STATUS, MsgType.ROUND_START, MsgType.UPDATE, MsgType.FINISH
REJECT: list[tuple[str, Callable[[dict[str, Any]], Any], str]] = [
    # top level
    ("v missing", lambda w: w.pop("v"), "v: missing schema version"),
    ("v=2", lambda w: w.update(v=2), "unsupported schema version 2"),
    ("v='1'", lambda w: w.update(v="1"), "unsupported schema version '1'"),
    ("v=True", lambda w: w.update(v=True), "unsupported schema version True"),
    ("missing id", lambda w: w.pop("id"), r"missing key\(s\) \['id'\]"),
    ("missing b", lambda w: w.pop("b"), r"missing key\(s\) \['b'\]"),
    ("unknown key", lambda w: w.update(extra=1), r"unknown key\(s\) \[\"'extra'\"\]"),
    ("bytes key", lambda w: w.update({b"b": 1}), r"unknown key\(s\)"),
    ("t unknown", lambda w: w.update(t="hello"), "t: unknown message type 'hello'"),
    ("t int", lambda w: w.update(t=1), "t: unknown message type 1"),
    ("run empty", lambda w: w.update(run=""), "run: length 0"),
    ("run long", lambda w: w.update(run="a" * 129), "run: length 129"),
    ("run slash", lambda w: w.update(run="a/b"), "run: 'a/b' does not match"),
    ("run wildcard", lambda w: w.update(run="a+#"), "run: .* does not match"),
    ("run unicode", lambda w: w.update(run="r\u00e9"), "run: .* does not match"),
    ("run int", lambda w: w.update(run=5), "run: must be a str, got int"),
    ("r -2", lambda w: w.update(r=-2), r"r: -2 is out of range \[-1, 2147483648\)"),
    ("r 2**31", lambda w: w.update(r=2**31), "r: 2147483648 is out of range"),
    ("r bool", lambda w: w.update(r=True), "r: must be an int, got bool"),
    ("r float", lambda w: w.update(r=1.0), "r: must be an int, got float"),
    ("r nil", lambda w: w.update(r=None), "r: must be an int, got nil"),
    ("s -1", lambda w: w.update(s=-1), "s: -1 is out of range"),
    ("s 2**31", lambda w: w.update(s=2**31), "s: 2147483648 is out of range"),
    ("s bool", lambda w: w.update(s=False), "s: must be an int, got bool"),
    ("id empty", lambda w: w.update(id=""), "id: length 0"),
    ("id long", lambda w: w.update(id="a" * 65), "id: length 65"),
    ("id dot", lambda w: w.update(id="a.b"), "id: 'a.b' does not match"),
    ("id bytes", lambda w: w.update(id=b"abc"), "id: must be a str, got bytes"),
    ("ts nan", lambda w: w.update(ts=float("nan")), "ts: must be finite"),
    ("ts inf", lambda w: w.update(ts=float("inf")), "ts: must be finite"),
    ("ts str", lambda w: w.update(ts="now"), "ts: must be a number, got str"),
    ("ts bool", lambda w: w.update(ts=True), "ts: must be a number, got bool"),
    ("b list", lambda w: w.update(b=[1]), "b: must be a map, got list"),
    ("b bytes key", lambda w: w["b"].update({b"num_samples": 1}), "b: keys must be str"),
    ("sig str", lambda w: w.update(sig="abc"), "sig: must be bytes, got str"),
    ("sig nil", lambda w: w.update(sig=None), "sig: must be bytes, got nil"),
    ("sig long", lambda w: w.update(sig=b"x" * 257), "sig: 257 bytes is over the limit of 256"),
    # status
    ("status extra", body_of(S, extra=1), r"b: unknown key\(s\) \['extra'\] for a 'status'"),
    ("status no state", body_of(S, state=DROP), r"b: missing required key\(s\) \['state'\]"),
    ("status state", body_of(S, state="asleep"), "b.state: must be one of"),
    ("status state bytes", body_of(S, state=b"online"), "b.state: must be one of"),
    ("status samples<0", body_of(S, num_samples=-1), "b.num_samples: -1 is out of range"),
    ("status samples bool", body_of(S, num_samples=True), "b.num_samples: must be an int"),
    ("status samples float", body_of(S, num_samples=1.0), "b.num_samples: must be an int"),
    ("status samples nil", body_of(S, num_samples=None), "b.num_samples: must be an int, got nil"),
    ("status detail long", body_of(S, detail="d" * 513), "b.detail: length 513"),
    ("status detail int", body_of(S, detail=1), "b.detail: must be a str"),
    # round_start
    ("rs no selected", body_of(RS, selected=DROP), r"missing required key\(s\) \['selected'\]"),
    ("rs no payload", body_of(RS, payload=DROP), r"missing required key\(s\) \['payload'\]"),
    ("rs selected empty", body_of(RS, selected=[]), "b.selected: must hold 1..100000"),
    ("rs selected map", body_of(RS, selected={"1": 1}), "b.selected: must be a list"),
    ("rs selected 0", body_of(RS, selected=[1, 0]), r"b.selected\[1\]: 0 is out of range"),
    ("rs selected big", body_of(RS, selected=[2**31]), r"b.selected\[0\]: .* out of range"),
    ("rs selected bool", body_of(RS, selected=[True]), r"b.selected\[0\]: must be an int"),
    ("rs selected dup", body_of(RS, selected=[1, 2, 1]), "b.selected: silo ranks must be distinct"),
    ("rs selected many", body_of(RS, selected=list(range(1, 100_002))), "must hold 1..100000"),
    ("rs deadline 0", body_of(RS, deadline_s=0), "b.deadline_s: must be > 0.0"),
    ("rs deadline <0", body_of(RS, deadline_s=-1.5), "b.deadline_s: must be > 0.0"),
    ("rs deadline inf", body_of(RS, deadline_s=float("inf")), "b.deadline_s: must be finite"),
    ("rs deadline bool", body_of(RS, deadline_s=True), "b.deadline_s: must be a number"),
    ("rs deadline str", body_of(RS, deadline_s="5"), "b.deadline_s: must be a number"),
    # update
    ("update no payload", body_of(U, payload=DROP), r"missing required key\(s\) \['payload'\]"),
    ("update no samples", body_of(U, num_samples=DROP), r"missing .*\['num_samples'\]"),
    ("update samples 0", body_of(U, num_samples=0), "b.num_samples: 0 is out of range"),
    ("update samples bool", body_of(U, num_samples=True), "b.num_samples: must be an int"),
    ("update loss str", body_of(U, train_loss="0.1"), "b.train_loss: must be a number"),
    ("update loss nil", body_of(U, train_loss=None), "b.train_loss: must be a number"),
    ("update secs <0", body_of(U, train_seconds=-0.1), "b.train_seconds: must be >= 0.0"),
    ("update secs nan", body_of(U, train_seconds=float("nan")), "b.train_seconds: must be finite"),
    ("update extra", body_of(U, selected=[1]), r"unknown key\(s\) \['selected'\] for a 'update'"),
    # finish
    ("finish no reason", body_of(F, reason=DROP), r"missing required key\(s\) \['reason'\]"),
    ("finish reason long", body_of(F, reason="r" * 257), "b.reason: length 257"),
    ("finish reason int", body_of(F, reason=0), "b.reason: must be a str"),
    ("finish bad ref", body_of(F, final_payload={"sha256": SHA}),
     "b.final_payload: missing key 'size'"),
    # PayloadRef
    ("ref list", lambda w: w["b"].update(payload=[SHA, 1]), "b.payload: must be a map, got list"),
    ("ref unknown key", ref_of(url="x"), r"b.payload: unknown key\(s\)"),
    ("ref no sha", ref_of(sha256=DROP), "b.payload: missing key 'sha256'"),
    ("ref sha upper", ref_of(sha256=SHA.upper()), "b.payload.sha256: .* does not match"),
    ("ref sha short", ref_of(sha256=SHA[:-1]), "b.payload.sha256: length 63"),
    ("ref sha bytes", ref_of(sha256=bytes.fromhex(SHA)), "b.payload.sha256: must be a str"),
    ("ref size -1", ref_of(size=-1), "b.payload.size: -1 is out of range"),
    ("ref size bool", ref_of(size=True), "b.payload.size: must be an int"),
    ("ref no size", ref_of(size=DROP), "b.payload: missing key 'size'"),
    ("ref both", ref_of(key="k"), "b.payload: exactly one of 'key' and 'inline'"),
    ("ref neither", ref_of(inline=DROP), "b.payload: exactly one of 'key' and 'inline'"),
    ("ref both nil", ref_of(inline=None, key=None), "b.payload: exactly one of"),
    ("ref key empty", ref_of(inline=DROP, key=""), "b.payload.key: length 0"),
    ("ref key long", ref_of(inline=DROP, key="k" * 1025), "b.payload.key: length 1025"),
    ("ref key nul", ref_of(inline=DROP, key="a\x00b"), "b.payload.key: must not contain NUL"),
    ("ref key bytes", ref_of(inline=DROP, key=b"k"), "b.payload.key: must be a str"),
    ("ref inline str", ref_of(inline="abc", size=3), "b.payload.inline: must be bytes, got str"),
    ("ref inline size", ref_of(size=999), "b.payload.inline: holds .* bytes but size says 999"),
]


@pytest.mark.parametrize(("mutate", "match"), [r[1:] for r in REJECT], ids=[r[0] for r in REJECT])
def test_decode_rejects(mutate, match):
    with pytest.raises(EnvelopeError, match=match):
        decode_envelope(packed(mutate))


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "not valid msgpack"),
        (b"\xc1", "not valid msgpack"),
        (msgpack.packb(VALID_WIRE) + b"\x00", "not valid msgpack: ExtraData"),
        (msgpack.packb(VALID_WIRE)[:-3], "not valid msgpack"),
        (msgpack.packb([VALID_WIRE]), "must be a msgpack map, got list"),
        (msgpack.packb("status"), "must be a msgpack map, got str"),
        (msgpack.packb({1: 1}), "not valid msgpack.*map key"),
        (b"\x81\xa1v\xd4\x05\x00", "not valid msgpack.*ext"),
        (msgpack.packb({"v": msgpack.Timestamp(1, 0)}), "not valid msgpack"),
        (b"\x91" * 100_000, "not valid msgpack"),  # nested too deep
        (b"\xdd\xff\xff\xff\xff", "not valid msgpack"),  # 4G-element array header
        (b"\xc6\x7f\xff\xff\xff", "not valid msgpack"),  # 2 GB bin header
    ],
    ids=["empty", "reserved byte", "trailing", "truncated", "list", "str", "int key", "ext",
         "timestamp", "deep", "huge array", "huge bin"],
)
def test_decode_rejects_bad_msgpack_and_shapes(data, match):
    with pytest.raises(EnvelopeError, match=match):
        decode_envelope(data)


def test_decode_size_limit_and_input_type():
    data = encode_envelope(env(MsgType.STATUS, {"state": "online"}))
    assert decode_envelope(data, max_bytes=len(data))
    limit = len(data) - 1
    with pytest.raises(EnvelopeError, match=f"{len(data)} bytes, over the limit of {limit}"):
        decode_envelope(data, max_bytes=len(data) - 1)
    with pytest.raises(EnvelopeError, match="expected bytes, got str"):
        decode_envelope("{}")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------
# Fuzzing: whatever the bytes, the result is an Envelope or an EnvelopeError
# ------------------------------------------------------------------------------------------


def decode_or_envelope_error(data: bytes) -> None:
    try:
        e = decode_envelope(data)
    except EnvelopeError as exc:
        assert str(exc)
        return
    assert isinstance(e, Envelope) and isinstance(e.type, MsgType)
    again = decode_envelope(encode_envelope(e))  # anything accepted re-encodes
    assert again.msg_id == e.msg_id and again.body.keys() == e.body.keys()


TOP_KEYS = st.sampled_from(["v", "t", "run", "r", "s", "id", "ts", "b", "sig"])
BODY_KEYS = st.sampled_from(["state", "selected", "payload", "num_samples", "detail", "deadline_s",
                             "train_loss", "train_seconds", "reason", "final_payload"])
REF_KEYS = st.sampled_from(["sha256", "size", "key", "inline"])
KEYS = TOP_KEYS | BODY_KEYS | REF_KEYS | st.text(max_size=3)
LEAVES = (
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.integers(-2, 3) | st.floats()
    | st.text(max_size=8) | st.binary(max_size=8)
    | st.sampled_from(["status", "update", "round_start", "finish", SHA, "online", "k"])
)
OBJECTS = st.recursive(
    LEAVES,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=6),
    max_leaves=20,
)


@FUZZ
@given(st.binary(max_size=200))
def test_fuzz_arbitrary_bytes(data):
    decode_or_envelope_error(data)


@settings(FUZZ, max_examples=1000)
@given(OBJECTS | st.fixed_dictionaries(
    {"v": st.just(1), "t": LEAVES, "run": LEAVES, "r": LEAVES, "s": LEAVES, "id": LEAVES,
     "ts": LEAVES, "b": OBJECTS}, optional={"sig": LEAVES}))
def test_fuzz_arbitrary_msgpack_objects(obj):
    decode_or_envelope_error(msgpack.packb(obj, use_bin_type=True))


VALID_BODIES = [wire_of(env(t, b[t])) for b in (MINIMAL, FULL) for t in MsgType]


@settings(FUZZ, max_examples=1000)
@given(st.sampled_from(VALID_BODIES), st.dictionaries(TOP_KEYS, OBJECTS, max_size=1),
       st.dictionaries(BODY_KEYS, OBJECTS, max_size=1),
       st.dictionaries(REF_KEYS, LEAVES, max_size=2))
def test_fuzz_near_valid_envelopes(wire, top_changes, body_changes, ref_changes):
    wire = dict(wire, **top_changes)
    if isinstance(wire.get("b"), dict):
        wire["b"] = dict(wire["b"], **body_changes)
        if isinstance(wire["b"].get("payload"), dict):
            wire["b"]["payload"] = dict(wire["b"]["payload"], **ref_changes)
    decode_or_envelope_error(msgpack.packb(wire, use_bin_type=True))


@FUZZ
@given(st.sampled_from([encode_envelope(env(t, b[t])) for b in (MINIMAL, FULL) for t in MsgType]),
       st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255), st.booleans()),
                min_size=1, max_size=3))
def test_fuzz_mutated_valid_encodings(data, edits):
    blob = bytearray(data)
    for pos, byte, insert in edits:
        if insert:
            blob.insert(pos % (len(blob) + 1), byte)
        else:
            blob[pos % len(blob)] = byte
    decode_or_envelope_error(bytes(blob))
