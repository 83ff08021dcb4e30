"""The reader's output, pinned: the sample FAQ and generated workbooks full of the cells the reader
tidies (invisible characters, Excel escapes, line breaks, stray and other spaces, decomposed
letters, numbers in the id, priority and audience columns, merged cells, blank rows) read to the
exact templates, and so to the exact content hashes, that they always have. A change that makes
the reader faster must leave these digests alone; a change of what is published must update them
on purpose.
"""

from __future__ import annotations

import csv
import hashlib
import json
import unicodedata
from pathlib import Path

import pytest
from openpyxl import load_workbook

from embedding_assets.lib.faq import Template, parse_faq
from embedding_assets.lib.hashing import hash_templates
from embedding_assets.lib.model_versions import DEFAULT_TEXT_TEMPLATE
from embedding_assets_tests.conftest import SAMPLE_FAQ, read_rows, write_rows

# Edits of a cell's text, each a case the reader normalises (or a plain one); cells take them in turn.
EDITS = [
    lambda s: s,
    lambda s: s.replace(" ", " \u200b", 1),
    lambda s: "\ufeff" + s,
    lambda s: s.replace(" ", "\u00ad", 1),
    lambda s: "\u200e" + s + "\u200f",
    lambda s: s.replace(" ", "_x000D_\n", 1),
    lambda s: s.replace(" ", "_x0009_", 1),
    lambda s: s + "_x0000_",
    lambda s: s + " _x005F_x000D_",
    lambda s: s.replace(" ", "\n", 1),
    lambda s: s.replace(" ", "\r\n", 1),
    lambda s: s.replace(" ", "\t", 1),
    lambda s: s.replace(" ", "  ", 1),
    lambda s: "  " + s + " ",
    lambda s: s.replace(" ", "\u00a0", 1),
    lambda s: s.replace(" ", "\u3000", 1),
    lambda s: s.replace(" ", "\u2028", 1),
    lambda s: unicodedata.normalize("NFD", s + " йё"),
    lambda s: s + " \u2126",
    lambda s: s + " 🙂",
    lambda s: s.replace(" ", " \n ", 1),
    lambda s: s + "\n",
    lambda s: "\n" + s.replace(" ", "\n\n", 1),
    lambda s: s.replace(" ", "\u2060 \u200d", 1),
]
# Only line breaks, tabs and stray spaces: what multi-line answers usually hold.
BREAKS = [
    lambda s: s,
    lambda s: s,
    lambda s: s.replace(" ", "\n", 1),
    lambda s: s.replace(" ", "\r\n", 1),
    lambda s: s.replace(" ", "\t", 1),
    lambda s: s.replace(" ", " \n", 1),
    lambda s: s.replace(" ", "\n\n", 1),
    lambda s: s + "\n",
    lambda s: "\n" + s,
    lambda s: s.replace(" ", "  ", 1),
    lambda s: " " + s,
]


def _sample_rows() -> list[list]:
    return read_rows(SAMPLE_FAQ)


def _edited_rows(edits: list, *, numbers: bool) -> list[list]:
    """The sample's rows with every text cell edited in turn; optionally numbers where the reader takes them."""
    header, *rows = _sample_rows()
    edited = [header]
    for r, row in enumerate(rows):
        row = list(row)
        for c in range(1, len(row)):
            if isinstance(row[c], str) and row[c]:
                row[c] = edits[(r * 7 + c * 3) % len(edits)](row[c])
        if numbers and r % 11 == 3:
            row[0], row[4] = 1000 + r, r % 3 + 1
        if numbers and r % 13 == 5:
            row[5] = None
        if numbers and r % 17 == 8:
            row[5] = 2024
        edited.append(row)
        if r % 19 == 9:
            edited.append([None] * len(row))
    return edited


def _merge_categories(path: Path, rows: list[list]) -> Path:
    """Merge each run of equal categories into one cell holding the value, as sheets often do."""
    written = [list(row) for row in rows]
    runs: list[tuple[int, int]] = []
    start = 1
    for r in range(2, len(written) + 1):
        if r == len(written) or written[r][1] != written[start][1] or written[r][1] is None:
            if r - start > 1 and written[start][1] is not None:
                runs.append((start, r - 1))
            start = r
    for top, bottom in runs:
        for r in range(top + 1, bottom + 1):
            written[r][1] = None
    write_rows(path, written)
    book = load_workbook(path)
    for top, bottom in runs:
        book.active.merge_cells(start_row=top + 1, end_row=bottom + 1, start_column=2, end_column=2)
    book.save(path)
    return path


def _without_ids(rows: list[list]) -> list[list]:
    """No id column, and a few questions repeated (one behind a zero-width space) so ids are disambiguated."""
    plain = [row[1:] for row in rows]
    repeats = [list(plain[r]) for r in (1, 2, 5) if any(plain[r])]
    repeats[0][2] = repeats[0][2].replace(" ", " \u200b", 1)
    return [*plain, *repeats]


def _csv(path: Path, rows: list[list]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows(["" if v is None else v for v in row] for row in rows)
    return path


def _workbook(kind: str, directory: Path) -> Path:
    if kind == "sample":
        return SAMPLE_FAQ
    if kind == "everything":
        return _merge_categories(directory / "faq.xlsx", _edited_rows(EDITS, numbers=True))
    if kind == "line-breaks":
        return write_rows(directory / "faq.xlsx", _edited_rows(BREAKS, numbers=False))
    if kind == "everything-without-ids":
        return write_rows(directory / "faq.xlsx", _without_ids(_edited_rows(EDITS, numbers=True)))
    if kind == "line-breaks-csv":
        return _csv(directory / "faq.csv", _edited_rows(BREAKS, numbers=False))
    raise AssertionError(kind)


def _digests(templates: list[Template]) -> tuple[int, str, str]:
    fields = [[t.template_id, *t.fields().values(), t.source_row] for t in templates]
    hashes = [h.content_hash for h in hash_templates(templates, DEFAULT_TEXT_TEMPLATE)]
    return (
        len(templates),
        hashlib.sha256(json.dumps(fields, ensure_ascii=False).encode()).hexdigest(),
        hashlib.sha256("\n".join(hashes).encode()).hexdigest(),
    )


# (templates, SHA-256 of every field of every template, SHA-256 of their content hashes)
EXPECTED = {
    "sample": (
        90,
        "03fadcbe69314f13e56ffa4e35376959153b48db2fee8913cc2d38ddfca37e26",
        "40c224617a4d1af2e8b6407ec400b9e68e9609db65d0f601c937b66c8c5b2a8c",
    ),
    "everything": (
        90,
        "602c1998388a1e6534fb243a1fcabb96f9cc28625b7387dd73306fceed79bf91",
        "2ac50a53ff836b18fc2a2962b8cd6367dbc8c86a1902c650ce55699d84c67fc3",
    ),
    "line-breaks": (
        90,
        "1a169607fb25468c6444566f64987516a4ef2a659ba24c79fd8d3ec675c9211a",
        "40c224617a4d1af2e8b6407ec400b9e68e9609db65d0f601c937b66c8c5b2a8c",
    ),
    "everything-without-ids": (
        93,
        "28228fbd401e3d998697281b72ab409786cf358eaadc48775978de45d642292e",
        "4047ecfd10038feaaedf58e1add815d8ec9fbefefd404a76dc1076b82f25a5db",
    ),
    "line-breaks-csv": (
        90,
        "1a169607fb25468c6444566f64987516a4ef2a659ba24c79fd8d3ec675c9211a",
        "40c224617a4d1af2e8b6407ec400b9e68e9609db65d0f601c937b66c8c5b2a8c",
    ),
}


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_the_reader_publishes_exactly_what_it_always_has(tmp_path: Path, kind: str) -> None:
    assert _digests(parse_faq(_workbook(kind, tmp_path))) == EXPECTED[kind]


def test_the_generated_workbooks_hold_the_cases_they_are_for(tmp_path: Path) -> None:
    everything = parse_faq(_workbook("everything", tmp_path))
    merged = load_workbook(tmp_path / "faq.xlsx").active.merged_cells.ranges
    assert len(merged) >= 3
    assert {t.source_row for t in everything} != set(range(2, len(everything) + 2))  # blank rows skipped
    assert any(t.template_id.isdigit() for t in everything) and any(t.audience == "" for t in everything)
    texts = " ".join(t.question + t.answer for t in everything)
    assert "_x000D_" in texts and "\u200b" not in texts and "\n" not in texts and "  " not in texts


def test_line_breaks_and_stray_spaces_change_no_content_hash(tmp_path: Path) -> None:
    assert _digests(parse_faq(_workbook("line-breaks", tmp_path)))[2] == EXPECTED["sample"][2]


def test_every_whitespace_character_but_the_space_is_unprintable() -> None:
    """What lets the reader tidy a column whose only unprintable characters are line breaks and tabs by replacing them."""
    import sys

    spaces = [chr(c) for c in range(sys.maxunicode + 1) if chr(c).isspace()]
    assert [c for c in spaces if c.isprintable()] == [" "]
