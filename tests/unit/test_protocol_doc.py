"""docs/protocol.md is normative and self-contained: its message tables agree with wire/messages.py.

A message table row reads ``| kind | `NAME` | fields |``; the fields cell lists the fields after the kind,
in order, separated by ``;`` (outside parentheses), each starting with its name in backticks and then its
type (``uint``, ``int``, ``number``, ``float``, ``str``, ``bool``, ``bin``, ``nil``, ``array of X``,
``map``, joined by ``or``), up to the first ``(`` or ``:``; ``—`` for a message without fields.  The
body (version 2) has exactly one row per message type, naming every field; the version-1 appendix names
a prefix of each type's fields.
"""

from __future__ import annotations

import re
import types
import typing
from pathlib import Path
from typing import Any, NamedTuple

from slabcast.wire import messages as M
from slabcast.wire import protocol as P

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
_ROW = re.compile(r"^\|\s*(\d+)\s*\|\s*`([A-Z_]+)`\s*\|")
_TYPE_WORDS = {"uint", "int", "number", "float", "str", "bool", "bin", "nil", "array", "map"}


class Row(NamedTuple):
    line: int
    kind: int
    name: str
    fields: list[tuple[str, str]]  # (name, its type phrase)
    appendix: bool


def _cells(line: str) -> list[str]:
    """The cells of a table row (``\\|`` is a pipe inside a cell)."""
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


def _items(cell: str) -> list[str]:
    """``cell`` split at each ``;`` outside parentheses and backticks."""
    items, depth, tick, start = [], 0, False, 0
    for i, ch in enumerate(cell):
        if ch == "`":
            tick = not tick
        elif not tick and ch == "(":
            depth += 1
        elif not tick and ch == ")":
            depth -= 1
        elif not tick and depth == 0 and ch == ";":
            items.append(cell[start:i])
            start = i + 1
    items.append(cell[start:])
    return [item.strip() for item in items if item.strip()]


def _rows() -> list[Row]:
    rows, appendix = [], False
    for number, line in enumerate(DOC.read_text().splitlines(), start=1):
        if line.startswith("## "):
            appendix = line.startswith("## Appendix")
        m = _ROW.match(line)
        if not m:
            continue
        cells = _cells(line)
        assert len(cells) == 3, f"protocol.md:{number}: a message row has 3 cells (kind, name, fields): {line!r}"
        fields = []
        if not cells[2].startswith(("—", "-")):
            for item in _items(cells[2]):
                f = re.match(r"`(\w+)`\s*(.*)", item)
                assert f, f"protocol.md:{number}: {m[2]}: each field starts with its name in backticks: {item!r}"
                fields.append((f[1], re.split(r"[(:]", f[2], maxsplit=1)[0]))
        rows.append(Row(number, int(m[1]), m[2], fields, appendix))
    return rows


def _categories(hint: Any) -> list[Any]:
    """The alternatives of a field's type, unions flattened."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return [c for a in typing.get_args(hint) for c in _categories(a)]
    return [hint]


def _word(hint: Any, alternatives: list[Any]) -> str:
    """The word protocol.md uses for one alternative of a field's type."""
    if hint is type(None):
        return "nil"
    if hint is bool:
        return "bool"
    if hint is int:
        return "number" if float in alternatives else "uint|int"
    if hint is float:
        return "number" if int in alternatives else "float|number"
    if hint is str:
        return "str"
    if hint is bytes:
        return "bin"
    if typing.get_origin(hint) is tuple:
        return "array"
    if typing.get_origin(hint) is dict:
        return "map"
    raise AssertionError(f"no protocol.md word for {hint!r}")


def _type_errors(message: str, field: str, hint: Any, phrase: str) -> list[str]:
    """What the type phrase of ``field`` gets wrong (nothing for a field of any type)."""
    if hint is Any:
        return []
    alternatives = _categories(hint)
    elements = [a for a in alternatives if typing.get_origin(a) is tuple]
    words = re.findall(r"\b\w+\b", re.sub(r"array of (\w+?)s?\b", "array", phrase))
    words = [w for w in words if w in _TYPE_WORDS]
    errors = []
    wanted = {_word(a, alternatives) for a in alternatives}
    for want in wanted:
        if not set(want.split("|")) & set(words):
            errors.append(f"{message}.{field}: its type phrase {phrase!r} does not say {want}")
    allowed = {w for want in wanted for w in want.split("|")}
    for word in sorted(set(words) - allowed):
        errors.append(f"{message}.{field}: its type phrase {phrase!r} says {word}, which the field is not")
    for element in elements:
        said = re.search(r"array of (\w+?)s?\b", phrase)
        item = typing.get_args(element)[0]
        item_alternatives = _categories(item)
        want = {w for a in item_alternatives for w in _word(a, item_alternatives).split("|")}
        if said is None or said[1] not in want:
            errors.append(f"{message}.{field}: {phrase!r} should say 'array of' {' or '.join(sorted(want))}")
    return errors


def test_every_message_has_one_row_in_the_version_2_tables_naming_its_fields_in_order():
    rows = [r for r in _rows() if not r.appendix]
    problems = []
    for kind, cls in sorted(M.MESSAGES.items()):
        name = P.NAMES[kind]
        mine = [r for r in rows if r.kind == kind]
        if len(mine) != 1:
            problems.append(f"{name} ({kind}): {len(mine)} rows in the version-2 tables (lines "
                            f"{[r.line for r in mine]}), expected 1")  # fmt: skip
            continue
        said = [f for f, _ in mine[0].fields]
        if said != list(cls._fields):
            problems.append(
                f"protocol.md:{mine[0].line}: {name} names fields {said}, the table has {list(cls._fields)}"
            )
    assert not problems, "\n".join(problems)


def test_every_field_has_its_type():
    problems = []
    for row in _rows():
        if row.appendix or row.kind not in M.MESSAGES:
            continue
        cls = M.MESSAGES[row.kind]
        hints = typing.get_type_hints(cls, vars(M))
        for field, phrase in row.fields:
            if field in hints:
                problems += [
                    f"protocol.md:{row.line}: {e}" for e in _type_errors(row.name, field, hints[field], phrase)
                ]
    assert not problems, "\n".join(problems)


def test_no_row_names_a_kind_or_a_field_the_table_lacks():
    rows = _rows()
    assert len(rows) >= len(M.MESSAGES), "protocol.md's message tables were not found"
    problems = []
    for row in rows:
        if P.NAMES.get(row.kind) != row.name:
            problems.append(f"protocol.md:{row.line}: kind {row.kind} is {P.NAMES.get(row.kind)}, not {row.name}")
            continue
        fields = list(M.MESSAGES[row.kind]._fields)
        said = [f for f, _ in row.fields]
        if row.appendix:  # version 1 knew the first fields of a message
            if said != fields[: len(said)]:
                problems.append(f"protocol.md:{row.line}: version-1 {row.name} names {said}, not a prefix of {fields}")
        elif set(said) - set(fields):
            problems.append(f"protocol.md:{row.line}: {row.name} names {sorted(set(said) - set(fields))}, "
                            f"which it does not have")  # fmt: skip
    assert not problems, "\n".join(problems)


def test_the_codes_flags_and_limits_are_the_tables():
    """Every END and ERROR code, chunk flag and queue limit of wire/protocol.py is in protocol.md, as it is."""
    text = DOC.read_text()
    for const in (c for c in dir(P) if c.startswith(("END_", "ERR_"))):
        assert f"`{getattr(P, const)}`" in text, f"protocol.md does not name the code {getattr(P, const)!r} ({const})"
    for name in ("NOTICE_BACKLOG", "NOTICE_HWM", "MAX_BATCH"):
        value = getattr(P, name)
        assert f"{value:,}" in text or str(value) in text, f"protocol.md does not give {name} = {value}"
    assert f"version {P.VERSION}" in text.splitlines()[0]
    for flag in ("FLAG_DISCONTINUITY", "FLAG_INLINE", "FLAG_PARTIAL"):
        bit = getattr(P, flag).bit_length() - 1
        assert re.search(rf"bit {bit}\b", text), f"protocol.md does not describe {flag} (bit {bit})"
