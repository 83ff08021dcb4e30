"""Read the FAQ sheet into normalised templates with stable ids."""

from __future__ import annotations

import functools
import gc
import hashlib
import importlib.metadata
import math
import re
import sys
import unicodedata
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import compress, repeat
from operator import not_
from pathlib import Path

from embedding_assets.lib.sheets import Sheet, SheetError, column_letter, read_sheet

_MAX_LISTED_PROBLEMS = 20
HEADER_SEARCH_ROWS = 20
# Format characters (Unicode category Cf: zero-width space and joiners, BOM, soft hyphen, bidi
# marks, ...) and control characters that are not whitespace: invisible in the sheet, so dropped.
_INVISIBLE = re.compile(
    "[\x00-\x08\x0e-\x1b\x7f-\x84\x86-\x9f\xad\u0600-\u0605\u061c\u06dd\u070f\u0890\u0891\u08e2"
    "\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb\U000110bd\U000110cd"
    "\U00013430-\U0001343f\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0001\U000e0020-\U000e007f]"
)


def normalize_text(value: object) -> str:
    """Unicode NFC, invisible characters dropped, trimmed, every run of whitespace collapsed to one space."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return _tidy(unicodedata.normalize("NFC", str(value)))


def _tidy(text: str) -> str:
    """`normalize_text` of a text already in NFC."""
    if text.isprintable():  # so its only whitespace is " "
        if "  " not in text and text[:1] != " " and text[-1:] != " ":
            return text  # the common case, quickly
        while "  " in text:
            text = text.replace("  ", " ")
        return text.strip(" ")
    collapsed = " ".join(text.split())
    if collapsed.isprintable():  # no format or control character left: nothing invisible to drop
        return collapsed
    return " ".join(_INVISIBLE.sub("", collapsed).split())


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


@functools.cache
def faq_reader_code() -> str:
    """SHA-256 of the reader's own source and its spreadsheet library's version: a parse depends on them."""
    from embedding_assets.lib import sheets

    digest = hashlib.sha256()
    for module in (sys.modules[__name__], sheets):
        digest.update(Path(module.__file__).read_bytes())
    digest.update(importlib.metadata.version("python-calamine").encode())
    return digest.hexdigest()


def templates_digest(templates: Sequence[Template]) -> str:
    """SHA-256 of every field of every template, in order: equal exactly when the templates are."""
    rows = "\x1e".join(
        f"{t.template_id}\x1f{t.category}\x1f{t.subcategory}\x1f{t.question}\x1f{t.answer}\x1f"
        f"{t.priority}\x1f{t.audience}\x1f{t.source_row}"
        for t in templates
    )
    return hashlib.sha256(rows.encode("utf-8", "surrogatepass")).hexdigest()


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


def _derived_template_ids(category: list[str], subcategory: list[str], question: list[str]) -> list[str]:
    """`derived_template_id` of each row, without a Python call per row."""
    folded = zip(map(str.casefold, category), map(str.casefold, subcategory), map(str.casefold, question))
    return ["t-" + _sha256(key.encode("utf-8")).hexdigest()[:12] for key in map("\x1f".join, folded)]


_sha256 = hashlib.sha256


def is_derived_id(template_id: str) -> bool:
    """Whether the id was derived by the reader (the sheet had no id column)."""
    return _DERIVED_ID.fullmatch(template_id) is not None


_DERIVED_ID = re.compile(r"t-[0-9a-f]{12}(?:-[0-9]+)?")
_MAKE_IT_TEXT = "make the cell text (Format Cells → Text and retype it, or start it with an apostrophe)"
_TEXT_FIELDS = frozenset(REQUIRED_FIELDS)


@dataclass(frozen=True)
class FaqSheet:
    """What `read_faq` read: the templates, the sheet and header row they came from."""

    templates: list[Template]
    sheet: str
    header_row: int
    note: str
    other_sheets: list[str]


def header_key(name: object) -> str:
    """What two headers must share to be the same column: case, spacing and invisible characters aside."""
    return normalize_text(name).casefold()


def read_faq(
    path: str | Path,
    columns: FaqColumns = FaqColumns(),
    sheet: str | int | None = None,
    header_row: int | None = None,
) -> FaqSheet:
    """Read the FAQ sheet; raise FaqError listing every problem (file, row, column)."""
    collecting = gc.isenabled()
    gc.disable()  # a sheet is hundreds of thousands of new objects and no cycles: collecting meanwhile only costs
    try:
        return _read_faq(Path(path), columns, sheet, header_row)
    finally:
        if collecting:
            gc.enable()


def _read_faq(path: Path, columns: FaqColumns, sheet: str | int | None, header_row: int | None) -> FaqSheet:
    try:
        grid = read_sheet(path, sheet)
    except SheetError as exc:
        raise FaqError(path, exc.problems) from exc
    header_index, positions = _find_header(path, grid, columns, header_row)
    headers = {field: _cell_text(grid.rows[header_index], col) for field, col in positions.items()}
    has_ids = "template_id" in positions
    first = header_index + 1
    data = grid.rows[first:]
    count = len(data)
    width = max(positions.values()) + 1
    sheet_columns = list(zip(*data)) if data else [()] * width  # one pass over the rows, all columns at once
    if len(sheet_columns) < width:  # a row ends before the last column read (a short CSV line)
        data = [row if len(row) >= width else [*row, *[""] * (width - len(row))] for row in data]
        sheet_columns = list(zip(*data))
    found: list[tuple[int, str]] = []  # (row, problem), sorted by row at the end
    # Column by column, in the order of _FIELDS; a column the sheet does not have reads as empty.
    cells = [
        _column_text(list(sheet_columns[positions[field]]), field, first + 1, headers[field], found)
        if field in positions
        else [""] * count
        for field in _FIELDS
    ]
    blank_rows = _check_incomplete_rows(grid, first, cells, positions, headers, found)
    if has_ids:
        _check_ids(cells[-1], blank_rows, first, headers["template_id"], found)
    found.sort(key=lambda item: item[0])
    problems = [problem for _, problem in found]
    if problems:
        raise FaqError(path, problems)
    source_rows = range(first + 1, first + 1 + count)
    if blank_rows:
        kept = [i not in blank_rows for i in range(count)]
        cells = [list(compress(column, kept)) for column in cells]
        source_rows = list(compress(source_rows, kept))
    if not source_rows:
        raise FaqError(path, ["the sheet has a header but no templates"])
    category, subcategory, question, answer, priority, audience, ids = cells
    if not has_ids:
        ids = _disambiguate(_derived_template_ids(category, subcategory, question))
    templates = _new_templates(ids, category, subcategory, question, answer, priority, audience, source_rows)
    return FaqSheet(
        templates=templates,
        sheet=grid.name,
        header_row=header_index + 1,
        note=f"{grid.note()}; headers in row {header_index + 1}",
        other_sheets=[s.name for s in grid.sheets if s.name != grid.name],
    )


_FIELDS = (*REQUIRED_FIELDS, *OPTIONAL_FIELDS, "template_id")


def _check_incomplete_rows(
    grid: Sheet, first: int, cells: list[list[str]], positions: dict[str, int], headers: dict[str, str], found: list
) -> set[int]:
    """Empty cells: blank rows are returned (to skip), hidden values filled in, empty required cells reported."""
    present = [k for k, field in enumerate(_FIELDS) if field in positions]
    empty = {k: set() if all(cells[k]) else set(compress(range(len(cells[k])), map(not_, cells[k]))) for k in present}
    blank_rows = set.intersection(*empty.values())  # a column the sheet lacks is empty in every row
    for k in present:
        empty[k] -= blank_rows
    if grid.package_path is not None and any(empty.values()):
        _fill_hidden_cells(grid, first, cells, empty, positions, headers, found)
    missing = []
    for k, field in enumerate(REQUIRED_FIELDS):
        column = cells[k]
        missing.extend((i, k) for i in empty[k] if not column[i] and column[i] is not _REPORTED)
    for i, k in sorted(missing):
        row = first + 1 + i
        found.append((row, f"row {row}, column {headers[REQUIRED_FIELDS[k]]!r}: empty {REQUIRED_FIELDS[k]}"))
    return blank_rows


def _fill_hidden_cells(
    grid: Sheet,
    first: int,
    cells: list[list[str]],
    empty: dict[int, set[int]],
    positions: dict[str, int],
    headers: dict[str, str],
    found: list,
) -> None:
    """Empty-looking .xlsx cells: a formula whose value was never saved is refused, an error value is read."""
    unsaved, errors = grid.hidden_cells()
    if not unsaved and not errors:
        return
    fields_at: dict[int, list[int]] = {}  # sheet column (1-based) -> indices into _FIELDS
    for k, field in enumerate(_FIELDS):
        if field in positions:
            fields_at.setdefault(positions[field] + 1, []).append(k)

    def hidden(found_cells: dict[tuple[int, int], str]) -> list[tuple[int, int, str]]:
        """(data row index, field index, text) of each hidden cell in an empty cell of a read column."""
        return sorted(
            (row - first - 1, k, text)
            for (row, col), text in found_cells.items()
            for k in fields_at.get(col, ())
            if row - first - 1 in empty[k] and cells[k][row - first - 1] is not _REPORTED
        )

    for i, k, formula in hidden(unsaved):
        row = first + 1 + i
        found.append((
            row,
            f"row {row}, column {headers[_FIELDS[k]]!r}: formula {formula} has no saved value; "
            "open and save the workbook in Excel or LibreOffice, or paste the values",
        ))
        cells[k][i] = _REPORTED
    for i, k, value in hidden(errors):
        cells[k][i] = value


def _check_ids(ids: list[str], blank_rows: set[int], first: int, header: str, found: list) -> None:
    """Every id present and used once."""
    if "" not in ids and len(set(ids)) == len(ids):
        return
    id_rows: dict[str, int] = {}
    for i, template_id in enumerate(ids):
        if i in blank_rows:
            continue
        row = first + 1 + i
        if template_id in id_rows:
            found.append((
                row,
                f"row {row}, column {header!r}: duplicate id {template_id!r} (first used in row {id_rows[template_id]})",
            ))
        elif not template_id:
            if template_id is not _REPORTED:
                found.append((row, f"row {row}, column {header!r}: empty id"))
        else:
            id_rows[template_id] = row


def _new_templates(
    ids: list[str],
    category: list[str],
    subcategory: list[str],
    question: list[str],
    answer: list[str],
    priority: list[str],
    audience: list[str],
    rows: Sequence[int],
) -> list[Template]:
    """Template(...) per row without its frozen __init__, which sets each field through object.__setattr__ (the reader's largest cost)."""
    templates = list(map(_new_object, repeat(Template, len(ids))))
    for template, template_id, category_, subcategory_, question_, answer_, priority_, audience_, row in zip(
        templates, ids, category, subcategory, question, answer, priority, audience, rows
    ):
        fields = template.__dict__
        fields["template_id"] = template_id
        fields["category"] = category_
        fields["subcategory"] = subcategory_
        fields["question"] = question_
        fields["answer"] = answer_
        fields["priority"] = priority_
        fields["audience"] = audience_
        fields["source_row"] = row
    return templates


_new_object = object.__new__


def parse_faq(
    path: str | Path,
    columns: FaqColumns = FaqColumns(),
    sheet: str | int | None = None,
    header_row: int | None = None,
) -> list[Template]:
    """Parse the FAQ sheet into templates; raise FaqError listing every problem (file, row, column)."""
    return read_faq(path, columns, sheet, header_row).templates


class _Reported(str):
    """An unusable cell whose problem is already listed: empty, but not to be reported as empty again."""


_REPORTED = _Reported()


def _cell_text(cells: list, col: int) -> str:
    value = cells[col] if col < len(cells) else ""
    return normalize_text(_number_text(value) if isinstance(value, float) else value)


def _number_text(value: float) -> str | float:
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else value


def _typed_cell_text(value: object, field: str, row: int, header: str, problems: list[str]) -> str:
    """A number, date or logical cell: an integer id, priority or audience reads as its digits; anything else is refused."""
    where = f"row {row}, column {header!r}"
    if isinstance(value, bool):
        problems.append(f"{where}: holds the logical value {str(value).upper()}, not text; {_MAKE_IT_TEXT}")
    elif isinstance(value, (int, float)):
        if field not in _TEXT_FIELDS and float(value).is_integer() and abs(value) < 1e15:
            return str(int(value))
        shown = _number_text(float(value))
        problems.append(
            f"{where}: holds the number {shown}, not text; the sheet may show it otherwise (its number format "
            f"is not read), so {_MAKE_IT_TEXT}"
        )
    else:
        shown = value.isoformat() if hasattr(value, "isoformat") else str(value)
        problems.append(
            f"{where}: holds a date or time ({shown}), not text; the sheet shows it through its number format, "
            f"which is not read, so {_MAKE_IT_TEXT}"
        )
    return _REPORTED


def _column_text(values: list, field: str, first_row: int, header: str, found: list[tuple[int, str]]) -> list[str]:
    """One column's cells as normalised text; a cell that is not text is reported and read as empty."""
    if field in _REPEATING_FIELDS:  # a few distinct values: check and normalise each once
        distinct = set(values)
        reported = []
        if any(type(value) is not str for value in distinct):
            typed = _report_typed_cells(values, field, first_row, header, found)
            reported = [i for i in typed if values[i] is _REPORTED]
            distinct = set(values)
        normalised = {value: normalize_text(value) for value in distinct}
        if any(key != text for key, text in normalised.items()):
            values = [normalised[value] for value in values]
            for i in reported:  # normalising made them plain empty strings
                values[i] = _REPORTED
        return values
    # Mostly distinct, mostly clean: a few passes over the whole column find the cells to tidy.
    if set(map(type, values)) != {str}:
        _report_typed_cells(values, field, first_row, header, found)
    # Joined by single spaces (no character composes with one), a cell's stray space shows as a double one.
    spaced = " ".join(filter(None, values))
    if not (spaced.isascii() or unicodedata.is_normalized("NFC", spaced)):
        return [value if value is _REPORTED else normalize_text(value) for value in values]
    if not spaced.isprintable():
        spaced = _tidy_unprintable_cells(values, spaced)
    if _DOUBLE_SPACE.search(spaced) or spaced[:1] == " " or spaced[-1:] == " ":
        return [v if "  " not in v and v[:1] != " " and v[-1:] != " " else _tidy(v) for v in values]
    return values


def _tidy_unprintable_cells(values: list[str], spaced: str) -> str:
    """Tidy, in place, the cells holding a character that is not printable; the column's cells joined by spaces after."""
    breaks = [character for character in _BREAKS if character in spaced]
    flat = spaced
    for character in breaks:
        flat = flat.replace(character, " ")
    if breaks and flat.isprintable():
        # Only line breaks and tabs: each becomes a space (runs of spaces are collapsed after), so the
        # column's joined text is `flat` and only the cells holding one change.
        for character in breaks:
            for i in compress(range(len(values)), map(str.__contains__, values, repeat(character))):
                values[i] = values[i].replace(character, " ")
        return flat
    for i in compress(range(len(values)), map(not_, map(str.isprintable, values))):
        values[i] = _tidy(values[i])  # an invisible or control character, or a space other than " "
    return " ".join(filter(None, values))


def _report_typed_cells(values: list, field: str, first_row: int, header: str, found: list[tuple[int, str]]) -> list[int]:
    """Replace each number, date or logical cell by its text or, reported, by an empty one; their indices."""
    typed = [i for i, value in enumerate(values) if type(value) is not str]
    for i in typed:
        problems: list[str] = []
        values[i] = _typed_cell_text(values[i], field, first_row + i, header, problems)
        found.extend((first_row + i, problem) for problem in problems)
    return typed


_DOUBLE_SPACE = re.compile("  ")
_BREAKS = "\n\r\t"  # the only unprintable characters of most cells; any other whitespace is unprintable too
_REPEATING_FIELDS = frozenset({"category", "subcategory", "priority", "audience"})


def _find_header(
    path: Path, grid: Sheet, columns: FaqColumns, header_row: int | None
) -> tuple[int, dict[str, int]]:
    """The header row (0-based) and each field's column; the first row holding every required header wins."""
    wanted = {field: header_key(getattr(columns, field)) for field in (*REQUIRED_FIELDS, *OPTIONAL_FIELDS, "template_id")}
    if header_row is not None:
        if not 1 <= header_row <= len(grid.rows):
            raise FaqError(path, [f"header_row {header_row} is outside sheet {grid.name!r} ({len(grid.rows)} rows)"])
        candidates = [header_row - 1]
    else:
        candidates = range(min(HEADER_SEARCH_ROWS, len(grid.rows)))
    best: tuple[int, int, dict[str, int]] | None = None
    for index in candidates:
        positions = _positions(grid.rows[index], wanted)
        required = sum(field in positions for field in REQUIRED_FIELDS)
        if required == len(REQUIRED_FIELDS):
            _check_unique(path, grid.rows[index], index, positions)
            return index, positions
        nonblank = any(_cell_text(grid.rows[index], c) for c in range(len(grid.rows[index])))
        if nonblank and (best is None or len(positions) > best[1]):
            best = (index, len(positions), positions)
    index, _, positions = best if best is not None else (candidates[0], 0, {})
    found = ", ".join(repr(t) for t in (_cell_text(grid.rows[index], c) for c in range(len(grid.rows[index]))) if t)
    problems = [
        f"row {index + 1}: missing required column {getattr(columns, field)!r} (found columns: {found or 'none'})"
        for field in REQUIRED_FIELDS
        if field not in positions
    ]
    problems.append(header_hint(grid.name, header_row, len(candidates)))
    raise FaqError(path, problems)


def header_hint(sheet: str, header_row: int | None, searched_rows: int) -> str:
    """Where the headers were looked for, and how to point at other ones."""
    where = f"row {header_row} (the configured header row)" if header_row else f"rows 1–{searched_rows}"
    return (
        f"headers are looked for in {where} of sheet {sheet!r}, in any case and spacing; to name the sheet, "
        "header row or columns use the [faq] table of embedding_assets.toml, EMBEDDING_ASSETS_FAQ_* variables "
        "or the faq resource's config"
    )


def _positions(cells: list, wanted: dict[str, str]) -> dict[str, int]:
    keys: dict[str, int] = {}
    for col in range(len(cells)):
        keys.setdefault(header_key(_cell_text(cells, col)), col)
    return {field: keys[key] for field, key in wanted.items() if key in keys}


def _check_unique(path: Path, cells: list, index: int, positions: dict[str, int]) -> None:
    problems = []
    for field, col in positions.items():
        key = header_key(_cell_text(cells, col))
        twins = [c for c in range(len(cells)) if c != col and header_key(_cell_text(cells, c)) == key]
        if twins:
            letters = ", ".join(column_letter(c + 1) for c in [col, *twins])
            problems.append(f"row {index + 1}: columns {letters} all have the header {_cell_text(cells, col)!r}; rename all but one")
    if problems:
        raise FaqError(path, problems)


def missing_id_column_problems(
    templates: Sequence[Template], published_ids: Mapping[str, set[str]], id_header: str = FaqColumns.template_id
) -> list[str]:
    """When the sheet has no id column but a published version has explicit ids, say so (ids were derived)."""
    if not templates or not all(is_derived_id(t.template_id) for t in templates):
        return []
    problems = []
    for key, ids in sorted(published_ids.items()):
        explicit = sorted(i for i in ids if not is_derived_id(i))
        if explicit:
            problems.append(
                f"the sheet has no id column {id_header!r}, so every id was derived from category, subcategory "
                f"and question, but the store published for {key} holds {len(explicit)} explicit id(s) "
                f"(such as {explicit[0]!r}); restore the {id_header!r} column, or name the id column "
                "(id_column / EMBEDDING_ASSETS_FAQ_ID_COLUMN)"
            )
    return problems


def _disambiguate(ids: list[str]) -> list[str]:
    """Repeated (category, subcategory, question) rows get distinct ids: t-…, t-…-2, t-…-3."""
    if len(set(ids)) == len(ids):
        return ids
    seen: Counter[str] = Counter()
    result = []
    for template_id in ids:
        seen[template_id] += 1
        count = seen[template_id]
        result.append(f"{template_id}-{count}" if count > 1 else template_id)
    return result
