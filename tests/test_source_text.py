"""Captions as sources give them (`_text`): text is kept, bytes are decoded, and what is not valid
UTF-8 or not text at all is a reject reason, never a failure or a stored Python repr."""

from __future__ import annotations

from pipeline.data.sources import _text


def test_captions_are_text_or_a_reject_reason():
    assert _text(None, "caption") == ("", None)
    assert _text("a shirt", "caption") == ("a shirt", None)
    assert _text(7, "caption") == ("7", None)
    assert _text("a shirt".encode(), "caption") == ("a shirt", None)
    assert _text(b"a \xff shirt", "caption") == ("a \ufffd shirt", "bad-utf8: caption is not valid UTF-8")
    assert _text("a \udcff shirt", "caption") == ("a \ufffd shirt", "bad-utf8: caption is not valid UTF-8")
    for value, kind in (([1], "list"), ({"a": 1}, "dict"), (True, "bool")):
        assert _text(value, "caption") == ("", f"bad-row: caption is a JSON {kind}, not text")
