"""Regenerate the versions table in infra/README.md from infra/versions.env.

    python infra/versions_table.py          # rewrite the table in place
    python infra/versions_table.py --check  # exit 1 when the table is out of date

The "used for" column is the comment line right above each key in versions.env (its first clause).
tests/unit/test_infra_config.py fails when the table and the file disagree.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

INFRA = Path(__file__).resolve().parent
BEGIN, END = "<!-- versions:begin -->", "<!-- versions:end -->"


def rows() -> list[tuple[str, str, str]]:
    out, comment = [], ""
    for line in (INFRA / "versions.env").read_text().splitlines():
        if line.startswith("#"):
            comment = line.lstrip("# ").strip()
            continue
        m = re.match(r"^([A-Z][A-Z0-9_]*)=(.*)$", line)
        if m:
            out.append((m.group(1), m.group(2), re.split(r"[:;(]", comment, maxsplit=1)[0].strip()))
        elif not line.strip():
            comment = ""
    return out


def table() -> str:
    lines = ["| key | value | used for |", "| --- | --- | --- |"]
    lines += [f"| `{k}` | `{v}` | {d} |" for k, v, d in rows()]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    readme = INFRA / "README.md"
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        print(f"{readme}: markers {BEGIN} / {END} are missing", file=sys.stderr)
        return 2
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{BEGIN}\n{table()}\n{END}{tail}"
    if "--check" in argv:
        if new != text:
            print(
                "infra/README.md versions table is out of date: run `python infra/versions_table.py`",
                file=sys.stderr,
            )
            return 1
        return 0
    readme.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
