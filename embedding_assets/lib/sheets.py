"""Read one sheet of a spreadsheet file (.xlsx, .xlsm, .xls, .xlsb, .ods or UTF-8 .csv) as rows of cell values.

Workbooks are read with python-calamine. Two things calamine does not report are read from the
.xlsx/.xlsm package itself: which sheet is active, and cells whose formula has no saved value or
that hold an error value (calamine returns both as empty cells).
"""

from __future__ import annotations

import csv
import io
import re
import threading
import zipfile
from collections import Counter
from concurrent.futures import Future, wait
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

WORKBOOK_SUFFIXES = (".xlsx", ".xlsm", ".xls", ".xlsb", ".ods")
SUPPORTED_SUFFIXES = (*WORKBOOK_SUFFIXES, ".csv")
_ZIP_SUFFIXES = {".xlsx", ".xlsm", ".xlsb", ".ods"}
_OOXML_SUFFIXES = {".xlsx", ".xlsm"}
_OLE2_SIGNATURE = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"
_ZIP_SIGNATURE = b"PK\x03\x04"
_ENCRYPTION_STREAM = "EncryptionInfo".encode("utf-16-le")
_CSV_DELIMITERS = ",;\t"
_CSV_SNIFFED_LINES = 20

Cell = object  # str, int, float, bool, date, datetime, time or timedelta, as python-calamine returns them


class SheetError(ValueError):
    """The file or sheet cannot be read; `problems` says why, in words a user can act on."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


@dataclass(frozen=True)
class SheetInfo:
    name: str
    visible: bool


@dataclass
class Sheet:
    """The cells of one sheet, row 1 column 1 first; `rows[r][c]` is sheet row r + 1, column c + 1."""

    name: str
    rows: list[list[Cell]]
    sheets: list[SheetInfo]
    how_chosen: str
    package_path: Path | None = None  # an .xlsx/.xlsm package whose cells calamine reads as empty can be looked up
    _hidden: Future | None = field(default=None, repr=False)

    def hidden_cells(self) -> tuple[dict[tuple[int, int], str], dict[tuple[int, int], str]]:
        """Cells read as empty that are not: {(row, column): formula} without a saved value, {(row, column): error value}."""
        if self.package_path is None:
            return {}, {}
        if self._hidden is None:  # not scanned while the sheet was parsed: scan now
            self._hidden = Future()
            _settle(self._hidden, _package_hidden_cells, self.package_path, self.name)
        return self._hidden.result()

    def note(self) -> str:
        """Which sheet was read, and the workbook's other sheets."""
        others = [f"{s.name!r}" + ("" if s.visible else " (hidden)") for s in self.sheets if s.name != self.name]
        text = f"read sheet {self.name!r} ({self.how_chosen})"
        return f"{text}; other sheets: {', '.join(others)}" if others else text


def column_letter(index: int) -> str:
    """1 -> 'A', 27 -> 'AA'."""
    letters = ""
    while index:
        index, remainder = divmod(index - 1, 26)
        letters = chr(65 + remainder) + letters
    return letters


def read_sheet(path: Path, sheet: str | int | None = None) -> Sheet:
    """One sheet of the file: the named one, else the workbook's active sheet when visible, else its first visible one."""
    suffix = _check_file(path)
    if suffix == ".csv":
        return _read_csv(path, sheet)
    return _read_workbook(path, suffix, sheet)


def _check_file(path: Path) -> str:
    if not path.exists():
        raise SheetError(["file not found"])
    if not path.is_file():
        raise SheetError(["not a file"])
    with path.open("rb") as handle:
        head = handle.read(8)
    if not head:
        raise SheetError(["the file is empty (0 bytes)"])
    suffix = path.suffix.lower()
    if head == _OLE2_SIGNATURE and _ENCRYPTION_STREAM in path.read_bytes():
        raise SheetError(["is a password-protected workbook; save it without a password"])
    if suffix in _ZIP_SUFFIXES and head == _OLE2_SIGNATURE:
        return ".xls"  # an old-format workbook saved under a new name: calamine reads it as what it is
    if suffix in _ZIP_SUFFIXES and not head.startswith(_ZIP_SIGNATURE):
        kind = suffix[1:]
        raise SheetError([f"is not an .{kind} workbook (an .{kind} file is a zip archive; this one is not)"])
    if suffix == ".xls" and head != _OLE2_SIGNATURE:
        if head.startswith(_ZIP_SIGNATURE):
            return ".xlsx"  # a new-format workbook saved under an old name
        raise SheetError(["is not an .xls workbook (an .xls file is an OLE2 compound file; this one is not)"])
    if suffix not in SUPPORTED_SUFFIXES:
        supported = ", ".join(SUPPORTED_SUFFIXES)
        raise SheetError([f"unsupported file type {suffix or '(no extension)'!r} (supported: {supported})"])
    return suffix


# --- CSV -------------------------------------------------------------------------------------------


def _read_csv(path: Path, sheet: str | int | None) -> Sheet:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SheetError(
            [f"is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); save it as CSV UTF-8"]
        ) from exc
    delimiter = _csv_delimiter([line for line in _first_lines(text, _CSV_SNIFFED_LINES) if line.strip()])
    try:
        rows = list(csv.reader(io.StringIO(text, newline=""), delimiter=delimiter))
    except csv.Error as exc:
        raise SheetError([f"cannot be read as CSV ({exc})"]) from exc
    name = path.stem
    if not any(any(cell.strip() for cell in row) for row in rows):
        raise SheetError(["the CSV file holds no cells"])
    if sheet not in (None, 0, name):
        raise SheetError([f"a CSV file has one sheet; no sheet named {sheet!r}"])
    return Sheet(name=name, rows=rows, sheets=[SheetInfo(name, True)], how_chosen="a CSV file")


def _first_lines(text: str, count: int) -> list[str]:
    """`text.splitlines()[:count]`, without splitting the whole text when its start holds them."""
    lines = text[:_CSV_HEAD_CHARACTERS].splitlines()
    # Each of the first `count` lines ends within the head only when the head holds more lines than that.
    return lines[:count] if len(lines) > count else text.splitlines()[:count]


_CSV_HEAD_CHARACTERS = 1 << 16


def _csv_delimiter(lines: list[str]) -> str:
    """The delimiter most lines hold the same number of (title lines and commas inside answers aside)."""

    def steady_count(delimiter: str) -> int:
        counts = Counter(line.count(delimiter) for line in lines)
        return max(counts.items(), key=lambda item: (item[1], item[0]))[0] if counts else 0

    return max(_CSV_DELIMITERS, key=steady_count)


# --- workbooks -------------------------------------------------------------------------------------


def _read_workbook(path: Path, suffix: str, sheet: str | int | None) -> Sheet:
    import python_calamine

    package = _open_package(path, suffix) if suffix in _ZIP_SUFFIXES else None
    hidden: Future | None = None
    try:
        try:
            if suffix == path.suffix.lower():
                book = python_calamine.CalamineWorkbook.from_path(str(path))
            else:
                with path.open("rb") as handle:
                    book = python_calamine.CalamineWorkbook.from_filelike(handle)
        except python_calamine.PasswordError as exc:
            raise SheetError(["is a password-protected workbook; save it without a password"]) from exc
        except Exception as exc:  # calamine raises several unrelated types for a damaged file
            raise SheetError([f"cannot be read as an {suffix} workbook ({type(exc).__name__}: {exc})"]) from exc
        with book:
            infos = [
                SheetInfo(m.name, m.visible == python_calamine.SheetVisibleEnum.Visible)
                for m in book.sheets_metadata
            ]
            name, how = _choose_sheet(infos, sheet, _active_sheet(package, suffix, infos))
            ooxml = package is not None and suffix in _OOXML_SUFFIXES
            if ooxml and _part_size(package, name) >= _BACKGROUND_SCAN_BYTES:
                # calamine parses the sheet without holding the GIL: meanwhile, look for its hidden cells
                hidden = _in_background(_package_hidden_cells, path, name)
            chosen = book.get_sheet_by_name(name)
            rows = chosen.to_python(skip_empty_area=False)
            if not any(any(v != "" for v in row) for row in rows):
                raise SheetError([_empty_sheet_problem(book, infos, name)])
            merged = chosen.merged_cell_ranges or []
        _fill_merged_cells(rows, merged)
        return Sheet(
            name=name, rows=rows, sheets=infos, how_chosen=how, package_path=path if ooxml else None, _hidden=hidden
        )
    finally:
        if package is not None:
            package.close()
        if hidden is not None:
            wait([hidden])  # nothing is left running once the sheet is read; a failure surfaces when asked for


def _open_package(path: Path, suffix: str) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise SheetError([f"cannot be read as an {suffix} workbook ({type(exc).__name__}: {exc})"]) from exc


def _choose_sheet(infos: list[SheetInfo], sheet: str | int | None, active: int | None) -> tuple[str, str]:
    names = [s.name for s in infos]
    if isinstance(sheet, str):
        if sheet in names:
            return sheet, "named in the configuration"
        folded = [n for n in names if n.strip().casefold() == sheet.strip().casefold()]
        if len(folded) == 1:
            return folded[0], "named in the configuration"
        raise SheetError([f"no sheet named {sheet!r} (sheets: {', '.join(map(repr, names))})"])
    if isinstance(sheet, int):
        if not 0 <= sheet < len(infos):
            raise SheetError([f"no sheet number {sheet + 1} (the workbook has {len(infos)})"])
        return names[sheet], f"sheet number {sheet + 1}"
    if active is not None and 0 <= active < len(infos) and infos[active].visible:
        return names[active], "the active sheet"
    visible = [s.name for s in infos if s.visible]
    if not visible:
        raise SheetError([f"every sheet is hidden ({', '.join(map(repr, names))}); name the sheet to read"])
    return visible[0], "the first visible sheet"


def _empty_sheet_problem(book, infos: list[SheetInfo], name: str) -> str:
    with_data = []
    for info in infos:
        if info.name != name:
            cells = book.get_sheet_by_name(info.name).to_python()
            if any(any(v != "" for v in row) for row in cells):
                with_data.append(f"{info.name!r}" + ("" if info.visible else " (hidden)"))
    hint = f"; the data may be on sheet {', '.join(with_data)}: set the sheet name" if with_data else ""
    return f"sheet {name!r} is empty{hint}"


def _fill_merged_cells(rows: list[list[Cell]], merged: list[tuple[tuple[int, int], tuple[int, int]]]) -> None:
    """Give every cell of a merged range the range's value (a category merged over its rows)."""
    for (top, left), (bottom, right) in merged:
        if top >= len(rows) or left >= len(rows[top]):
            continue
        value = rows[top][left]
        for r in range(top, min(bottom, len(rows) - 1) + 1):
            row = rows[r]
            for c in range(left, min(right, len(row) - 1) + 1):
                row[c] = value


_ACTIVE_TAB = re.compile(rb'<(?:\w+:)?workbookView\b[^>]*?\bactiveTab="(\d+)"')
_ODS_ACTIVE_TABLE = re.compile(rb'config:name="ActiveTable"[^>]*>([^<]*)<')


def _active_sheet(package: zipfile.ZipFile | None, suffix: str, infos: list[SheetInfo]) -> int | None:
    """Index of the sheet the workbook opens on, when the format says (.xlsx, .xlsm, .ods)."""
    if package is None:
        return None
    try:
        if suffix in _OOXML_SUFFIXES:
            match = _ACTIVE_TAB.search(package.read("xl/workbook.xml"))
            return int(match.group(1)) if match else 0
        if suffix == ".ods" and "settings.xml" in package.namelist():
            import html

            match = _ODS_ACTIVE_TABLE.search(package.read("settings.xml"))
            if match:
                name = html.unescape(match.group(1).decode("utf-8"))
                return next((i for i, s in enumerate(infos) if s.name == name), None)
    except (KeyError, zipfile.BadZipFile):
        return None
    return None


# --- formulas without a saved value and error cells in .xlsx/.xlsm ---------------------------------

_SHEET_ENTRY = re.compile(rb"<(?:\w+:)?sheet\b([^>]*)/?>")
_ATTRIBUTE = re.compile(rb'([\w:]+)="([^"]*)"')
_RELATIONSHIP = re.compile(rb"<(?:\w+:)?Relationship\b([^>]*)/?>")
_FORMULA_OR_ERROR = re.compile(rb'<f[\s>/]|\bt="e"')
_CELL_REF = re.compile(rb'\br="([A-Z]+)(\d+)"')
_FORMULA_TEXT = re.compile(rb"<(?:\w+:)?f\b[^>]*?(?:/>|>(.*?)</(?:\w+:)?f>)", re.S)
_VALUE = re.compile(rb"<(?:\w+:)?v>(.*?)</(?:\w+:)?v>", re.S)


def _sheet_part(package: zipfile.ZipFile, name: str) -> str | None:
    import html

    relation_id = None
    for entry in _SHEET_ENTRY.finditer(package.read("xl/workbook.xml")):
        attributes = {k.split(b":")[-1]: v for k, v in _ATTRIBUTE.findall(entry.group(1))}
        if html.unescape(attributes.get(b"name", b"").decode("utf-8")) == name:
            relation_id = attributes.get(b"id")
            break
    if relation_id is None:
        return None
    for entry in _RELATIONSHIP.finditer(package.read("xl/_rels/workbook.xml.rels")):
        attributes = dict(_ATTRIBUTE.findall(entry.group(1)))
        if attributes.get(b"Id") == relation_id:
            target = attributes[b"Target"].decode("utf-8")
            return target.lstrip("/") if target.startswith("/") else str(PurePosixPath("xl") / target)
    return None


_BACKGROUND_SCAN_BYTES = 2_000_000  # below, starting a thread costs about what the scan does


def _part_size(package: zipfile.ZipFile, name: str) -> int:
    """Uncompressed size of the sheet's part (0 when it cannot be found)."""
    try:
        part = _sheet_part(package, name)
        return package.getinfo(part).file_size if part else 0
    except (KeyError, zipfile.BadZipFile):
        return 0


def _in_background(function, *args) -> Future:
    """Run `function(*args)` on a new thread; the future holds its result or exception."""
    future: Future = Future()
    threading.Thread(target=_settle, args=(future, function, *args), name="hidden-cells", daemon=True).start()
    return future


def _settle(future: Future, function, *args) -> None:
    try:
        future.set_result(function(*args))
    except BaseException as exc:  # handed to whoever asks for the result
        future.set_exception(exc)


def _package_hidden_cells(path: Path, name: str) -> tuple[dict[tuple[int, int], str], dict[tuple[int, int], str]]:
    with zipfile.ZipFile(path) as package:
        return _hidden_cells(package, name)


def _hidden_cells(package: zipfile.ZipFile, name: str) -> tuple[dict[tuple[int, int], str], dict[tuple[int, int], str]]:
    """Cells calamine reads as empty: formulas without a saved value, and error values."""
    import html

    part = _sheet_part(package, name)
    if part is None:
        return {}, {}
    try:
        xml = package.read(part)
    except KeyError:
        return {}, {}
    unsaved: dict[tuple[int, int], str] = {}
    errors: dict[tuple[int, int], str] = {}
    if not (_holds(xml, b"<f", 1) or _holds(xml, b't="e"', 3)):
        return unsaved, errors
    for hit in _FORMULA_OR_ERROR.finditer(xml):
        start = xml.rfind(b"<c ", 0, hit.start())
        end = xml.find(b"</c>", hit.start())
        end = len(xml) if end < 0 else end
        cell = xml[start:end]
        ref = _CELL_REF.search(cell)
        if ref is None:
            continue
        position = (int(ref.group(2)), _column_index(ref.group(1).decode()))
        value = _VALUE.search(cell)
        saved = html.unescape(value.group(1).decode("utf-8")) if value else ""
        if b't="e"' in cell[: cell.find(b">")]:
            errors[position] = saved
        elif not saved:
            formula = _FORMULA_TEXT.search(cell)
            text = formula.group(1) if formula and formula.group(1) else None
            unsaved[position] = "=" + html.unescape(text.decode("utf-8")) if text else "(shared formula)"
    return unsaved, errors


def _holds(xml: bytes, needle: bytes, rare: int) -> bool:
    """`needle in xml`, found through the needle's byte at `rare`, which cell markup seldom holds: memchr finds
    that byte many times faster than the general search finds the needle."""
    byte = needle[rare : rare + 1]
    at = xml.find(byte, rare)
    for _ in range(_RARE_BYTE_HITS):
        if at < 0:
            return False
        if xml.startswith(needle, at - rare):
            return True
        at = xml.find(byte, at + 1)
    return at >= 0 and xml.find(needle, at - rare) >= 0  # not rare in this sheet after all


_RARE_BYTE_HITS = 256


def _column_index(letters: str) -> int:
    index = 0
    for letter in letters:
        index = index * 26 + ord(letter) - 64
    return index
