"""Comma lists as users type them ("0.7, 0.5", "4,7,10"): one parser for the CLI, the app and the
method parameters, so every surface accepts and rejects the same text with the same message."""
from __future__ import annotations

from typing import Any, Callable, Iterable

_NOUNS = {int: "integers", float: "numbers", str: "names"}


def comma_list(text: str | Iterable[Any], kind: Callable[[Any], Any] = str, what: str = "the list",
               error: type[Exception] = ValueError, example: str | None = None, noun: str | None = None) -> list:
    """Split `text` on commas, strip blanks, drop empty parts and convert each with `kind`.

    A non-string iterable is converted item by item. An empty list is returned as it is (the
    caller decides whether empty means "default" or is an error).

    Args:
        text: e.g. "0.7, 0.5" or [0.7, 0.5].
        kind: int, float, str or any one-argument converter.
        what: how the message names the list, e.g. "--keep-rates".
        error: the exception class raised for an unconvertible part.
        example: a valid list quoted in the message, e.g. "4,7,10".
        noun: what each part is, for the message (default from `kind`: "integers", "numbers", ...).
    Raises:
        `error` with a one-line message naming `what`, the expected kind and the text given.
    """
    parts = [part.strip() for part in text.split(",")] if isinstance(text, str) else list(text)
    parts = [part for part in parts if part != ""]
    try:
        return [kind(part) for part in parts]
    except (TypeError, ValueError):
        noun = noun or _NOUNS.get(kind, "values")
        hint = f" such as {example}" if example else ""
        raise error(f"{what} must be comma-separated {noun}{hint}, got {text!r}") from None
