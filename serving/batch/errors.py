"""The batch engine's errors: each message is one line that says what is wrong and how to fix it."""

from __future__ import annotations

from serving.contract.errors import MlrolloutError


class BatchScoringError(MlrolloutError, ValueError):
    """The input, output or model cannot be scored; the message says what is wrong and how to fix it."""


class SchemaMismatchError(BatchScoringError):
    """The input table does not match the model card's input schema (missing or mistyped column)."""


def one_line(text: object, limit: int = 300) -> str:
    """``text`` with every run of whitespace and control characters (newlines included) collapsed to
    one space, at most ``limit`` characters: for third-party messages (pyarrow's can span lines and
    quote raw bytes) and for whole error lines."""
    flat = " ".join("".join(c if c.isprintable() else " " for c in str(text)).split())
    return flat if len(flat) <= limit else flat[: limit - 3].rstrip() + "..."
