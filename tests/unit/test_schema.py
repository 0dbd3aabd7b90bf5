"""Schema mapping, id stability and reject reasons (pure: no files, no Ray)."""

from __future__ import annotations

import pytest

from mixray.config import FieldMap
from mixray.schema import Rejected, RejectReason, content_key, derived_id, map_record

ALPACA = FieldMap()
GSM8K = FieldMap(instruction="question", input=None, output="answer")
SHAREGPT = FieldMap(conversations="conversations", id="id")


def test_alpaca_record_maps_onto_schema():
    ex = map_record({"instruction": "Add.", "input": "2 and 3", "output": "5"}, ALPACA, "alpaca", "general")
    assert not isinstance(ex, Rejected)
    assert (ex["source"], ex["task"], ex["instruction"], ex["input"], ex["output"]) == (
        "alpaca", "general", "Add.", "2 and 3", "5")
    assert ex["messages"] is None and ex["quality"] is None and ex["_own_id"] is None


def test_missing_optional_input_becomes_empty():
    ex = map_record({"instruction": "Hi", "output": "Hello"}, ALPACA, "a", "a")
    assert ex["input"] == ""


def test_gsm8k_field_map():
    ex = map_record({"question": "1+1?", "answer": "2\n#### 2"}, GSM8K, "gsm8k", "math")
    assert (ex["instruction"], ex["input"], ex["output"], ex["task"]) == ("1+1?", "", "2\n#### 2", "math")


def test_sharegpt_conversation_takes_first_exchange_and_keeps_all_turns():
    rec = {"id": "abc", "conversations": [
        {"from": "system", "value": "be nice"},
        {"from": "human", "value": "Q1"}, {"from": "gpt", "value": "A1"},
        {"from": "human", "value": "Q2"}, {"from": "gpt", "value": "A2"}]}
    ex = map_record(rec, SHAREGPT, "sharegpt", "general")
    assert (ex["instruction"], ex["output"], ex["_own_id"]) == ("Q1", "A1", "abc")
    assert [m["role"] for m in ex["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert ex["messages"][-1]["content"] == "A2"


@pytest.mark.parametrize(
    ("record", "fields", "reason", "needle"),
    [
        ({"input": "x", "output": "y"}, ALPACA, RejectReason.MISSING_FIELD, "'instruction'"),
        ({"instruction": "x", "output": "   "}, ALPACA, RejectReason.EMPTY_FIELD, "'output'"),
        ({"instruction": 3, "output": "y"}, ALPACA, RejectReason.WRONG_TYPE, "must be a string, got int"),
        ({"instruction": "x", "input": ["a"], "output": "y"}, ALPACA, RejectReason.WRONG_TYPE, "'input'"),
        ({"instruction": "bad \udcff byte", "output": "y"}, ALPACA, RejectReason.INVALID_UTF8, "UTF-8"),
        (["not", "a", "dict"], ALPACA, RejectReason.NOT_AN_OBJECT, "got list"),
        ({"id": 1, "conversations": [{"from": "gpt", "value": "A"}]}, SHAREGPT,
         RejectReason.BAD_CONVERSATION, "no non-empty user turn"),
        ({"id": 1, "conversations": "hello"}, SHAREGPT, RejectReason.WRONG_TYPE, "list of turns"),
        ({"id": 1, "conversations": [{"from": "alien", "value": "A"}]}, SHAREGPT,
         RejectReason.WRONG_TYPE, "unknown role"),
        ({"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},
         SHAREGPT, RejectReason.MISSING_FIELD, "(id)"),
        ({"id": {"x": 1}, "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},
         SHAREGPT, RejectReason.WRONG_TYPE, "(id)"),
    ],
)
def test_reject_reasons(record, fields, reason, needle):
    out = map_record(record, fields, "src", "src")
    assert isinstance(out, Rejected)
    assert out.reason == reason
    assert needle in out.detail


def test_quality_field_must_be_a_finite_number():
    fm = FieldMap(quality="score")
    ok = map_record({"instruction": "a", "output": "b", "score": 3}, fm, "s", "s")
    assert ok["quality"] == 3.0
    for bad in ("high", float("nan"), True):
        out = map_record({"instruction": "a", "output": "b", "score": bad}, fm, "s", "s")
        assert isinstance(out, Rejected) and out.reason == RejectReason.WRONG_TYPE


def test_ids_are_stable_and_content_derived():
    k1 = content_key("a", "b", "c", None)
    assert k1 == content_key("a", "b", "c", None)
    # field boundaries matter: ("ab", "", "c") is not ("a", "b", "c")
    assert k1 != content_key("ab", "", "c", None)
    assert derived_id("alpaca", k1, 1) == f"alpaca/{k1[:16]}"
    assert derived_id("alpaca", k1, 2) == f"alpaca/{k1[:16]}-2"
    assert derived_id("other", k1, 1) != derived_id("alpaca", k1, 1)


def test_quality_numeric_strings_are_coerced_by_the_declared_type():
    """Issue 11: CSV (and some JSON) sources carry numbers as strings."""
    fm = FieldMap(quality="score")
    for text, want in (("0.25", 0.25), (" 3 ", 3.0), ("-1e2", -100.0), ("+.5", 0.5)):
        assert map_record({"instruction": "a", "output": "b", "score": text}, fm, "s", "s")["quality"] == want
    for bad in ("nan", "inf", "1_000", "0x10", "1,5", "high", "true"):
        out = map_record({"instruction": "a", "output": "b", "score": bad}, fm, "s", "s")
        assert isinstance(out, Rejected) and out.reason == RejectReason.WRONG_TYPE, bad
    out = map_record({"instruction": "a", "output": "b", "score": "  "}, fm, "s", "s")
    assert isinstance(out, Rejected) and out.reason == RejectReason.MISSING_FIELD


def test_invalid_utf8_in_id_and_quality_is_rejected_as_invalid_utf8():
    for rec, fm in (({"id": "x\udcff", "instruction": "a", "output": "b"}, FieldMap(id="id")),
                    ({"q": "0.5\udcff", "instruction": "a", "output": "b"}, FieldMap(quality="q"))):
        out = map_record(rec, fm, "s", "s")
        assert isinstance(out, Rejected) and out.reason == RejectReason.INVALID_UTF8, out
        out.detail.encode("utf-8")  # the detail itself is writable
