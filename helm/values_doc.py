"""Generate the values table of a chart README from the `# --` comments in its values.yaml.

    python helm/values_doc.py helm/mlrollout-model            # rewrite the table in README.md
    python helm/values_doc.py helm/mlrollout-model --check    # exit 1 if README.md is out of date

Every leaf of values.yaml (a scalar, a list or an empty map) gets one row: its dotted key, type, default
and the `# --` comment written above it (or above its nearest documented parent). The table sits between
the markers `<!-- values:begin -->` and `<!-- values:end -->` in the chart's README.md.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import yaml

BEGIN, END = "<!-- values:begin -->", "<!-- values:end -->"
KEY_RE = re.compile(r"^(\s*)([A-Za-z0-9_]+):(?:\s|$)")


def comments_by_path(text: str, data: dict) -> dict[str, str]:
    """Map dotted key -> its `# --` comment (continuation `#` lines joined)."""
    out: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    pending: list[str] | None = None
    skip_deeper_than: int | None = None
    for line in text.splitlines():
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if skip_deeper_than is not None:
            if not stripped or indent > skip_deeper_than:
                continue
            skip_deeper_than = None
        if stripped.startswith("# --"):
            pending = [stripped[4:].strip()]
            continue
        if stripped.startswith("#"):
            if pending is not None:
                pending.append(stripped[1:].strip())
            continue
        m = KEY_RE.match(line)
        if not m:
            pending = None
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, m.group(2)))
        path = ".".join(k for _, k in stack)
        if pending is not None:
            out[path] = " ".join(p for p in pending if p)
        pending = None
        if isinstance(lookup(data, path), list):
            skip_deeper_than = indent
    return out


def lookup(data: dict, path: str):
    node = data
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def leaves(data, prefix: str = ""):
    """(dotted path, value) of every leaf: scalars, lists and empty maps."""
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from leaves(value, path + ".")
        else:
            yield path, value


def type_name(value) -> str:
    if value is None:
        return "null"
    return {bool: "bool", int: "int", float: "float", str: "string", list: "list", dict: "object"}.get(
        type(value), type(value).__name__
    )


def describe(path: str, docs: dict[str, str]) -> str:
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        doc = docs.get(".".join(parts[:i]))
        if doc:
            return doc if i == len(parts) else f"{doc} (part of `{'.'.join(parts[:i])}`)"
    return ""


def table(chart: Path) -> str:
    text = (chart / "values.yaml").read_text()
    data = yaml.safe_load(text)
    docs = comments_by_path(text, data)
    rows = ["| Key | Type | Default | Description |", "| --- | --- | --- | --- |"]
    for path, value in leaves(data):
        default = json.dumps(value, separators=(", ", ": "))
        desc = describe(path, docs).replace("|", "\\|")
        rows.append(f"| `{path}` | {type_name(value)} | `{default}` | {desc} |")
    return "\n".join(rows)


def render(readme: str, chart: Path) -> str:
    if BEGIN not in readme or END not in readme:
        raise SystemExit(f"{chart}/README.md: missing the markers {BEGIN} / {END}")
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{table(chart)}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("chart", type=Path, help="chart directory (holds values.yaml and README.md)")
    ap.add_argument("--check", action="store_true", help="exit 1 if README.md is not up to date")
    args = ap.parse_args(argv)
    readme_path = args.chart / "README.md"
    readme = readme_path.read_text()
    new = render(readme, args.chart)
    if args.check:
        if new != readme:
            print(
                f"{readme_path} is out of date: run python helm/values_doc.py {args.chart}", file=sys.stderr
            )
            return 1
        return 0
    readme_path.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
