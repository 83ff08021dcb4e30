"""Read the FAQ workbook into normalised templates with stable ids."""

from __future__ import annotations

import hashlib
import math
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

_WHITESPACE = re.compile(r"\s+")
_MAX_LISTED_PROBLEMS = 20
HEADER_ROW = 1


def normalize_text(value: object) -> str:
    """Unicode NFC, trimmed, every run of whitespace collapsed to one space."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    text = unicodedata.normalize("NFC", str(value))
    return _WHITESPACE.sub(" ", text).strip()


@dataclass(frozen=True)
class FaqColumns:
    """Header names of the workbook's columns."""

    category: str = "Основная категория"
    subcategory: str = "Подкатегория"
    question: str = "Пример вопроса"
    priority: str = "Приоритет"
    audience: str = "Целевая аудитория"
    answer: str = "Шаблонный ответ"
    template_id: str = "ID"


REQUIRED_FIELDS = ("category", "subcategory", "question", "answer")
OPTIONAL_FIELDS = ("priority", "audience")


@dataclass(frozen=True)
class Template:
    """One FAQ template as read from the sheet."""

    template_id: str
    category: str
    subcategory: str
    question: str
    answer: str
    priority: str
    audience: str
    source_row: int

    def fields(self) -> dict[str, str]:
        return {
            "category": self.category,
            "subcategory": self.subcategory,
            "question": self.question,
            "answer": self.answer,
            "priority": self.priority,
            "audience": self.audience,
        }


class FaqError(ValueError):
    """The FAQ workbook cannot be used; the message names the file, row and column."""

    def __init__(self, path: str | Path, problems: list[str]):
        self.path = str(path)
        self.problems = problems
        listed = problems[:_MAX_LISTED_PROBLEMS]
        more = len(problems) - len(listed)
        lines = [f"FAQ {self.path} is not usable:"] + [f"  - {p}" for p in listed]
        if more:
            lines.append(f"  - … and {more} more problem(s)")
        super().__init__("\n".join(lines))


def derived_template_id(category: str, subcategory: str, question: str) -> str:
    """Id for a sheet without an id column: it follows the template, not its row number."""
    key = "\x1f".join(part.casefold() for part in (category, subcategory, question))
    return "t-" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:12]


_OLE2_SIGNATURE = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
_ZIP_SIGNATURE = b"PK\x03\x04"


def _check_file(path: Path) -> None:
    """Refuse what is not an .xlsx before the reader does, with a message a user can act on."""
    if not path.exists():
        raise FaqError(path, ["file not found"])
    if not path.is_file():
        raise FaqError(path, ["not a file"])
    with path.open("rb") as handle:
        head = handle.read(8)
    if not head:
        raise FaqError(path, ["the file is empty (0 bytes)"])
    if head == _OLE2_SIGNATURE:
        raise FaqError(
            path,
            ["is a password-protected workbook or an old .xls file; save it as an .xlsx without a password"],
        )
    if not head.startswith(_ZIP_SIGNATURE):
        raise FaqError(path, ["is not an .xlsx workbook (an .xlsx file is a zip archive; this one is not)"])


def _open_workbook(path: Path, *, data_only: bool):
    import openpyxl

    try:
        return openpyxl.load_workbook(path, data_only=data_only)
    except Exception as exc:  # openpyxl and zipfile raise many unrelated types for a bad file
        raise FaqError(path, [f"cannot be read as an .xlsx workbook ({type(exc).__name__}: {exc})"]) from exc


def _select_sheet(path: Path, book, sheet: str | int):
    names = book.sheetnames
    if isinstance(sheet, str):
        if sheet not in names:
            raise FaqError(path, [f"no sheet named {sheet!r} (sheets: {', '.join(map(repr, names))})"])
        return book[sheet]
    chosen = book.worksheets[sheet]
    if chosen.max_row <= 1 and chosen.max_column <= 1 and chosen.cell(1, 1).value is None:
        others = [ws.title for ws in book.worksheets if ws is not chosen and ws.max_row > 1]
        hint = f"; the data may be on sheet {', '.join(map(repr, others))}: set the sheet name" if others else ""
        raise FaqError(path, [f"sheet {chosen.title!r} is empty{hint}"])
    return chosen


def _fill_merged_cells(sheet) -> None:
    """Give every cell of a merged range the range's value (a category merged over its rows)."""
    for merged in list(sheet.merged_cells.ranges):
        value = sheet.cell(merged.min_row, merged.min_col).value
        sheet.unmerge_cells(str(merged))
        for row in sheet.iter_rows(
            min_row=merged.min_row, max_row=merged.max_row, min_col=merged.min_col, max_col=merged.max_col
        ):
            for cell in row:
                cell.value = value


def _read_sheet(path: Path, sheet: str | int) -> pd.DataFrame:
    """The sheet as a frame of raw cell values; formulas read as the value the workbook saved."""
    import pandas as pd  # imported here: the CLI's other commands start faster without it

    _check_file(path)
    book = _open_workbook(path, data_only=False)
    chosen = _select_sheet(path, book, sheet)
    formulas = {(c.row, c.column): c.value for row in chosen.iter_rows() for c in row if c.data_type == "f"}
    if formulas:
        book = _open_workbook(path, data_only=True)
        chosen = book[chosen.title]
        unsaved = [(r, c, f) for (r, c), f in formulas.items() if chosen.cell(r, c).value is None]
        if unsaved:
            raise FaqError(
                path,
                [
                    f"row {r}, column {chosen.cell(HEADER_ROW, c).value!r}: formula {f} has no saved value; "
                    "open and save the workbook in Excel or LibreOffice, or paste the values"
                    for r, c, f in unsaved
                ],
            )
    _fill_merged_cells(chosen)
    rows = list(chosen.iter_rows(values_only=True))
    header = rows[0] if rows else ()
    columns = [str(name) if name is not None else f"Unnamed: {i}" for i, name in enumerate(header)]
    return pd.DataFrame([list(r) for r in rows[1:]], columns=columns, dtype=object)


def _column_positions(path: Path, frame: pd.DataFrame, columns: FaqColumns) -> dict[str, object]:
    by_name = {normalize_text(name): name for name in frame.columns if not str(name).startswith("Unnamed:")}
    positions: dict[str, object] = {}
    missing = []
    for field in REQUIRED_FIELDS + OPTIONAL_FIELDS + ("template_id",):
        header = getattr(columns, field)
        if header in by_name:
            positions[field] = by_name[header]
        elif field in REQUIRED_FIELDS:
            missing.append(header)
    if missing:
        found = ", ".join(repr(n) for n in by_name) or "none"
        raise FaqError(
            path,
            [f"row {HEADER_ROW}: missing required column {name!r} (found columns: {found})" for name in missing],
        )
    return positions


def parse_faq(path: str | Path, columns: FaqColumns = FaqColumns(), sheet: str | int = 0) -> list[Template]:
    """Parse the workbook; raise FaqError listing every problem (file, row, column)."""
    path = Path(path)
    frame = _read_sheet(path, sheet)
    positions = _column_positions(path, frame, columns)
    has_ids = "template_id" in positions

    problems: list[str] = []
    templates: list[Template] = []
    id_rows: dict[str, int] = {}
    for offset, record in enumerate(frame.to_dict("records")):
        row = offset + HEADER_ROW + 1
        values = {field: normalize_text(record[col]) for field, col in positions.items()}
        if not any(values.values()):
            continue
        for field in REQUIRED_FIELDS:
            if not values[field]:
                problems.append(f"row {row}, column {getattr(columns, field)!r}: empty {field}")
        if has_ids:
            template_id = values["template_id"]
            if not template_id:
                problems.append(f"row {row}, column {columns.template_id!r}: empty id")
            elif template_id in id_rows:
                problems.append(
                    f"row {row}, column {columns.template_id!r}: duplicate id {template_id!r} "
                    f"(first used in row {id_rows[template_id]})"
                )
            else:
                id_rows[template_id] = row
        else:
            template_id = derived_template_id(values["category"], values["subcategory"], values["question"])
        templates.append(
            Template(
                template_id=template_id,
                category=values["category"],
                subcategory=values["subcategory"],
                question=values["question"],
                answer=values["answer"],
                priority=values.get("priority", ""),
                audience=values.get("audience", ""),
                source_row=row,
            )
        )
    if problems:
        raise FaqError(path, problems)
    if not templates:
        raise FaqError(path, ["the sheet has a header but no templates"])
    return templates if has_ids else _disambiguate(templates)


def _disambiguate(templates: list[Template]) -> list[Template]:
    """Give repeated (category, subcategory, question) rows distinct ids: t-…, t-…-2, t-…-3."""
    seen: Counter[str] = Counter()
    result = []
    for template in templates:
        seen[template.template_id] += 1
        count = seen[template.template_id]
        if count > 1:
            template = replace(template, template_id=f"{template.template_id}-{count}")
        result.append(template)
    return result
