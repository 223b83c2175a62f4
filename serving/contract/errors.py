"""The base class of mlrollout's own errors.

Every error the project raises on purpose (a bad model package, bad data, a refused flag, an
unreachable metrics backend...) derives from :class:`MlrolloutError`, so a CLI catches the project's
errors in one clause and prints their one-line message, while a bug (any other exception) still
shows its traceback. The concrete classes keep their builtin bases too (``ValueError``,
``RuntimeError``), so code that catches those keeps working.
"""

from __future__ import annotations


class MlrolloutError(Exception):
    """An error mlrollout raises on purpose; its message says what to fix."""
