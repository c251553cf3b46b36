"""Record formats -> normalised samples, and the errors a malformed record gives."""

from __future__ import annotations

import pytest

from mmtune.data.formats import FORMATS, detect_format, normalize
from mmtune.errors import ConfigError, DataError


def test_alpaca_with_input_system_and_history():
    rec = {"instruction": "Add the numbers.", "input": "7 + 12", "output": "19", "system": "Be brief.",
           "history": [["Hi", "Hello!"], ["What is 1+1?", "2"]]}
    assert normalize(rec, "alpaca") == {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "What is 1+1?"}, {"role": "assistant", "content": "2"},
        {"role": "user", "content": "Add the numbers.\n7 + 12"}, {"role": "assistant", "content": "19"},
    ]}


def test_alpaca_without_input_or_system():
    assert normalize({"instruction": "Say hi", "input": "", "output": "hi"}, "alpaca") == {"messages": [
        {"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]}


def test_sharegpt_roles_and_system():
    rec = {"system": "You are terse.", "conversations": [
        {"from": "human", "value": "a"}, {"from": "gpt", "value": "b"},
        {"from": "user", "value": "c"}, {"from": "assistant", "value": "d"}]}
    assert normalize(rec, "sharegpt")["messages"] == [
        {"role": "system", "content": "You are terse."}, {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    rec2 = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "a"},
                              {"from": "gpt", "value": "b"}]}
    assert [m["role"] for m in normalize(rec2, "sharegpt")["messages"]] == ["system", "user", "assistant"]


def test_messages_multiturn_system_and_text_parts():
    rec = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": [{"type": "text", "text": "he"},
                                                                                        {"type": "text", "text": "llo"}]},
                        {"role": "assistant", "content": "A1"}, {"role": "user", "content": "u2"},
                        {"role": "assistant", "content": "A2"}]}
    out = normalize(rec, "messages")["messages"]
    assert out[1] == {"role": "user", "content": "hello"}
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user", "assistant"]


def test_text_with_custom_field():
    assert normalize({"body": "Some document."}, "text", text_field="body") == {"text": "Some document."}


@pytest.mark.parametrize("rec,fmt", [
    ({"instruction": "x", "output": "y"}, "alpaca"),
    ({"conversations": [{"from": "human", "value": "x"}]}, "sharegpt"),
    ({"messages": [{"from": "human", "value": "x"}]}, "sharegpt"),
    ({"messages": [{"role": "user", "content": "x"}]}, "messages"),
    ({"text": "doc"}, "text"),
])
def test_auto_detection(rec, fmt):
    assert detect_format(rec) == fmt


def test_auto_detection_fails_with_the_keys_present():
    with pytest.raises(DataError) as e:
        normalize({"prompt": "x", "completion": "y"}, "auto")
    assert e.value.reason == "missing_field" and "completion, prompt" in str(e.value)


def _err(rec, fmt) -> DataError:
    with pytest.raises(DataError) as e:
        normalize(rec, fmt)
    return e.value


def test_unknown_role_names_role_and_allowed():
    e = _err({"conversations": [{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}]}, "sharegpt")
    assert e.reason == "unknown_role" and e.field == "conversations[1].from"
    assert "'bot'" in e.problem and "human, user, gpt, assistant, system" in e.problem
    e = _err({"messages": [{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}]}, "messages")
    assert e.reason == "unknown_role" and "'tool'" in e.problem and "system, user, assistant" in e.problem


def test_empty_assistant_is_an_error():
    e = _err({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "  "}]}, "messages")
    assert (e.reason, e.field) == ("empty_assistant", "messages[1]")
    assert _err({"instruction": "a", "output": ""}, "alpaca").reason == "empty_assistant"
    e = _err({"system": "s", "conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": ""}]},
             "sharegpt")
    assert (e.reason, e.field) == ("empty_assistant", "conversations[1]")


@pytest.mark.parametrize("rec,fmt,reason,field", [
    ({"input": "x", "output": "y"}, "alpaca", "missing_field", "instruction"),
    ({"instruction": "x"}, "alpaca", "missing_field", "output"),
    ({"instruction": 3, "output": "y"}, "alpaca", "wrong_type", "instruction"),
    ({"instruction": "x", "output": "y", "history": [["only one"]]}, "alpaca", "wrong_type", "history[0]"),
    ({"conversations": [{"from": "human"}]}, "sharegpt", "missing_field", "conversations[0].value"),
    ({"messages": [{"role": "user"}]}, "messages", "missing_field", "messages[0].content"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "messages", "bad_turn_order", "messages[0]"),
    ({"messages": [{"role": "user", "content": "x"}]}, "messages", "bad_turn_order", "messages[0]"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "s"},
                   {"role": "assistant", "content": "y"}]}, "messages", "bad_turn_order", "messages[1]"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "u"}]},
                   {"role": "assistant", "content": "y"}]}, "messages", "unsupported_content", "messages[0].content[0]"),
    ({"messages": []}, "messages", "empty_conversation", "messages"),
    ({"text": "   "}, "text", "empty_text", "text"),
    (["not", "an", "object"], "auto", "not_an_object", None),
])
def test_malformed_records(rec, fmt, reason, field):
    e = _err(rec, fmt)
    assert (e.reason, e.field) == (reason, field)


def test_unknown_format_name_lists_valid():
    with pytest.raises(ConfigError, match="valid: alpaca, messages, sharegpt, text.*Did you mean 'alpaca'"):
        normalize({"text": "x"}, "alpacca")
    assert FORMATS.names() == ["alpaca", "messages", "sharegpt", "text"]
