"""Content that parses but must not be published."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from embedding_assets.lib.faq import Template

SPREADSHEET_ERRORS = frozenset(
    {"#REF!", "#N/A", "#VALUE!", "#DIV/0!", "#NAME?", "#NULL!", "#NUM!", "#SPILL!", "#CALC!", "#GETTING_DATA"}
)

_LONGEST_ERROR = max(map(len, SPREADSHEET_ERRORS))
_TEXT_FIELDS = ("category", "subcategory", "question", "answer", "priority", "audience")  # Template.fields() order


def faq_content_problems(
    templates: Sequence[Template],
    published_ids: Mapping[str, set[str]] | None = None,
    max_removed_share: float = 0.5,
) -> list[str]:
    """Content that parses but must not be published: spreadsheet error text, conflicting duplicates,
    or a sheet that lost more than `max_removed_share` of a version's published templates."""
    problems = []
    for t in templates:
        for name in _TEXT_FIELDS:
            value = getattr(t, name)
            if len(value) <= _LONGEST_ERROR and value.upper() in SPREADSHEET_ERRORS:
                problems.append(f"row {t.source_row}, {name}: spreadsheet error value {value!r}")
    answers: dict[tuple[str, str, str], Template] = {}
    for t in templates:
        key = (t.category.casefold(), t.subcategory.casefold(), t.question.casefold())
        first = answers.setdefault(key, t)
        if first is not t and first.answer != t.answer:
            problems.append(
                f"row {t.source_row}: question {t.question!r} repeats row {first.source_row} "
                "in the same subcategory with a different answer"
            )
    current = {t.template_id for t in templates}
    for key, ids in sorted((published_ids or {}).items()):
        removed = len(ids - current)
        if ids and removed / len(ids) > max_removed_share:
            problems.append(
                f"the sheet drops {removed} of the {len(ids)} templates published for {key} "
                f"(more than {max_removed_share:.0%}); raise max_removed_share to publish it"
            )
    return problems
