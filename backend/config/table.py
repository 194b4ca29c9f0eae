"""The README's table of environment variables, rendered from `Settings` so the two agree.

`python -m backend.config.table` rewrites the table in README.md (`make schemas` runs it);
a test fails when the README is behind the code.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from pydantic.fields import FieldInfo

from backend.config.settings import Settings

README = Path(__file__).resolve().parents[2] / "README.md"
BEGIN = "<!-- settings table: rendered from backend/config/settings.py by `make schemas` -->"
END = "<!-- end of settings table -->"


def shown_default(field: FieldInfo) -> str:
    """The default as the table shows it: a phrase where the value alone would mislead."""
    extra = field.json_schema_extra
    if isinstance(extra, dict) and isinstance(extra.get("shown_default"), str):
        return str(extra["shown_default"])
    value = field.default
    if value is None or value == []:
        return "—"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"  # as it is written in the environment
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"`{value}`"


def render() -> str:
    """The table, markers included."""
    lines = [BEGIN, "| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        if field.description is None:
            raise ValueError(f"Settings.{name} has no description")
        lines.append(f"| `{name.upper()}` | {shown_default(field)} | {field.description} |")
    lines.append(END)
    return "\n".join(lines)


def for_help() -> str:
    """The same variables as plain text, for `python -m backend --help`."""
    lines = ["settings, from the environment (or a .env file):"]
    for name, field in Settings.model_fields.items():
        default = shown_default(field).replace("`", "")
        lines.append(f"  {name.upper()} (default: {default})")
        text = (field.description or "").replace("`", "").replace("**", "")
        lines.extend(textwrap.wrap(text, 88, initial_indent="      ", subsequent_indent="      "))
    return "\n".join(lines)


def rewritten(readme: str) -> str:
    """`readme` with its table replaced by the current one."""
    head, found, rest = readme.partition(BEGIN)
    if not found:
        raise ValueError(f"README.md has no line {BEGIN!r}")
    _, found, tail = rest.partition(END)
    if not found:
        raise ValueError(f"README.md has no line {END!r}")
    return head + render() + tail


def main() -> None:
    README.write_text(rewritten(README.read_text()))
    print("wrote the settings table in README.md")


if __name__ == "__main__":
    main()
