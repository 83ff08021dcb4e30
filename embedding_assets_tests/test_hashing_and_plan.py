from __future__ import annotations

import hashlib

import numpy as np
import pytest

from embedding_assets.lib.faq import Template
from embedding_assets_tests.conftest import make_template
from embedding_assets.lib.hashing import (
    HashedTemplate, content_hash, hash_templates, hash_version_templates, hashed_if_known, render_text,
)
from embedding_assets.lib.model_versions import DEFAULT_TEXT_TEMPLATE, ModelVersion
from embedding_assets.lib.plan import ChangePlan, StoredTemplate, build_change_plan
from embedding_assets.lib.verification import compare_store

KEY = "test-v1"


_template = make_template


def _stored(item: HashedTemplate) -> StoredTemplate:
    t = item.template
    return StoredTemplate(
        t.template_id, item.content_hash, t.category, t.subcategory, t.question, t.answer, t.priority,
        t.audience, t.source_row,
    )


def _published(templates: list[Template]) -> dict[str, StoredTemplate]:
    return {h.template_id: _stored(h) for h in hash_templates(templates, DEFAULT_TEXT_TEMPLATE)}


def _ids(items: list[HashedTemplate]) -> list[str]:
    return [i.template_id for i in items]


# --- hashing --------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "abc", "Подкатегория: Вопрос?\nОтвет.", "й vs и\u0306", "emoji 🙂"])
def test_content_hash_is_sha256_of_utf8(text: str) -> None:
    assert content_hash(text) == hashlib.sha256(text.encode("utf-8")).hexdigest()


def test_content_hash_known_value() -> None:
    assert content_hash("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_render_text_default_template() -> None:
    t = _template(1)
    assert DEFAULT_TEXT_TEMPLATE == "{subcategory}: {question}\n{answer}"
    assert render_text(t, DEFAULT_TEXT_TEMPLATE) == "Подкатегория 1: Вопрос номер 1?\nОтвет номер 1."


@pytest.mark.parametrize("text_template", [
    DEFAULT_TEXT_TEMPLATE, "{category}|{subcategory}|{question}|{answer}|{priority}|{audience}",
    "{question!r:>60} {{literal}}", "{question}",
])
def test_hash_templates_equals_render_text_then_sha256(text_template: str) -> None:
    templates = [_template(i) for i in range(1, 4)]
    expected = [
        HashedTemplate(t, render_text(t, text_template), content_hash(render_text(t, text_template))) for t in templates
    ]
    assert hash_templates(templates, text_template) == expected


@pytest.mark.parametrize("text_template", ["{template_id}: {question}", "{source_row}", "{missing}", "{question"])
def test_hash_templates_fails_as_render_text_on_a_field_a_version_may_not_name(text_template: str) -> None:
    with pytest.raises((KeyError, ValueError)) as rendered:
        render_text(_template(1), text_template)
    with pytest.raises(rendered.type, match=str(rendered.value)):
        hash_templates([_template(1)], text_template)


def test_render_text_custom_template_uses_all_fields() -> None:
    t = _template(1)
    text = render_text(t, "{category}|{subcategory}|{question}|{answer}|{priority}|{audience}")
    assert text == "Карты|Подкатегория 1|Вопрос номер 1?|Ответ номер 1.|высокий|все клиенты"


def test_hash_templates_hashes_rendered_text() -> None:
    templates = [_template(1), _template(2)]
    hashed = hash_templates(templates, DEFAULT_TEXT_TEMPLATE)
    assert [h.template for h in hashed] == templates
    assert [h.template_id for h in hashed] == ["T-1", "T-2"]
    for h in hashed:
        assert h.text == render_text(h.template, DEFAULT_TEXT_TEMPLATE)
        assert h.content_hash == hashlib.sha256(h.text.encode("utf-8")).hexdigest()


def _hash_of(template: Template) -> str:
    return hash_templates([template], DEFAULT_TEXT_TEMPLATE)[0].content_hash


@pytest.mark.parametrize(
    "changes",
    [
        {"priority": "низкий"},
        {"audience": "новые клиенты"},
        {"source_row": 77},
        {"template_id": "OTHER"},
        {"category": "Кредиты"},
    ],
)
def test_fields_outside_the_text_do_not_change_the_hash(changes: dict) -> None:
    assert _hash_of(_template(1, **changes)) == _hash_of(_template(1))


@pytest.mark.parametrize(
    "changes",
    [
        {"answer": "Другой ответ."},
        {"question": "Другой вопрос?"},
        {"subcategory": "Другая подкатегория"},
    ],
)
def test_embedded_fields_change_the_hash(changes: dict) -> None:
    assert _hash_of(_template(1, **changes)) != _hash_of(_template(1))


def test_template_that_embeds_priority_hashes_priority() -> None:
    text_template = "{question} ({priority})"
    a = hash_templates([_template(1)], text_template)[0]
    b = hash_templates([_template(1, priority="низкий")], text_template)[0]
    assert a.text == "Вопрос номер 1? (высокий)"
    assert a.content_hash != b.content_hash


# --- change plans ---------------------------------------------------------------------------------

BASE = [_template(1), _template(2), _template(3)]


@pytest.mark.parametrize(
    ("published", "current", "rebuild", "expected"),
    [
        pytest.param(
            [], BASE, False,
            {"new": ["T-1", "T-2", "T-3"], "modified": [], "unchanged": [], "metadata_updated": [], "deleted": []},
            id="empty-store-all-new",
        ),
        pytest.param(
            BASE, BASE, False,
            {"new": [], "modified": [], "unchanged": ["T-1", "T-2", "T-3"], "metadata_updated": [], "deleted": []},
            id="identical-all-unchanged",
        ),
        pytest.param(
            BASE, [BASE[0], _template(2, answer="Новый ответ."), BASE[2]], False,
            {"new": [], "modified": ["T-2"], "unchanged": ["T-1", "T-3"], "metadata_updated": [], "deleted": []},
            id="answer-edited-modified",
        ),
        pytest.param(
            BASE, [BASE[0], _template(2, priority="низкий"), BASE[2]], False,
            {"new": [], "modified": [], "unchanged": ["T-1", "T-2", "T-3"], "metadata_updated": ["T-2"],
             "deleted": []},
            id="priority-edited-metadata",
        ),
        pytest.param(
            BASE, [BASE[0], BASE[1], _template(3, audience="VIP")], False,
            {"new": [], "modified": [], "unchanged": ["T-1", "T-2", "T-3"], "metadata_updated": ["T-3"],
             "deleted": []},
            id="audience-edited-metadata",
        ),
        pytest.param(
            BASE, [_template(3, source_row=2), _template(1, source_row=3), _template(2, source_row=4)], False,
            {"new": [], "modified": [], "unchanged": ["T-3", "T-1", "T-2"], "metadata_updated": ["T-3", "T-1", "T-2"],
             "deleted": []},
            id="rows-moved-metadata-only",
        ),
        pytest.param(
            [_template(9), *BASE, _template(5)], [BASE[1]], False,
            {"new": [], "modified": [], "unchanged": ["T-2"], "metadata_updated": [],
             "deleted": ["T-1", "T-3", "T-5", "T-9"]},
            id="ids-removed-deleted-sorted",
        ),
        pytest.param(
            BASE, [_template(4), BASE[0], _template(2, question="Иначе?")], False,
            {"new": ["T-4"], "modified": ["T-2"], "unchanged": ["T-1"], "metadata_updated": [], "deleted": ["T-3"]},
            id="mixed",
        ),
        pytest.param(
            BASE, [BASE[0], _template(2, answer="Новый ответ."), _template(4)], True,
            {"new": ["T-1", "T-2", "T-4"], "modified": [], "unchanged": [], "metadata_updated": [], "deleted": []},
            id="rebuild-everything-new",
        ),
    ],
)
def test_build_change_plan(published: list[Template], current: list[Template], rebuild: bool, expected: dict) -> None:
    hashed = hash_templates(current, DEFAULT_TEXT_TEMPLATE)
    plan = build_change_plan(hashed, _published(published), model_version=KEY, base_generation=7, rebuild=rebuild)
    assert plan.model_version == KEY
    assert plan.base_generation == 7
    assert plan.rebuild is rebuild
    assert {
        "new": _ids(plan.new),
        "modified": _ids(plan.modified),
        "unchanged": _ids(plan.unchanged),
        "metadata_updated": _ids(plan.metadata_updated),
        "deleted": plan.deleted,
    } == expected
    assert plan.counts() == {name: len(value) for name, value in expected.items()}


def test_modified_item_carries_new_hash_and_text() -> None:
    edited = _template(2, answer="Новый ответ.")
    plan = build_change_plan(
        hash_templates([edited], DEFAULT_TEXT_TEMPLATE), _published([_template(2)]),
        model_version=KEY, base_generation=1,
    )
    assert plan.modified[0].text == "Подкатегория 2: Вопрос номер 2?\nНовый ответ."
    assert plan.modified[0].content_hash == content_hash("Подкатегория 2: Вопрос номер 2?\nНовый ответ.")
    assert plan.modified[0].template == edited


def test_has_changes() -> None:
    hashed = hash_templates(BASE, DEFAULT_TEXT_TEMPLATE)
    same = build_change_plan(hashed, _published(BASE), model_version=KEY, base_generation=1)
    assert same.has_changes is False
    moved = build_change_plan(
        hash_templates([_template(1, source_row=10)], DEFAULT_TEXT_TEMPLATE), _published([_template(1)]),
        model_version=KEY, base_generation=1,
    )
    assert moved.has_changes is True
    deleted = build_change_plan([], _published(BASE), model_version=KEY, base_generation=1)
    assert deleted.has_changes is True
    assert deleted.deleted == ["T-1", "T-2", "T-3"]
    rebuild_empty = build_change_plan([], {}, model_version=KEY, base_generation=None, rebuild=True)
    assert rebuild_empty.has_changes is True
    assert ChangePlan(KEY, None).has_changes is False


def test_texts_to_embed_deduplicates_identical_texts() -> None:
    twin_a = _template(1)
    twin_b = _template(1, template_id="T-1-copy", source_row=50, priority="низкий")
    edited = _template(2, answer="Новый ответ.")
    hashed = hash_templates([twin_a, twin_b, edited, _template(3)], DEFAULT_TEXT_TEMPLATE)
    assert hashed[0].content_hash == hashed[1].content_hash
    plan = build_change_plan(hashed, _published([_template(2), _template(3)]), model_version=KEY, base_generation=1)
    assert _ids(plan.new) == ["T-1", "T-1-copy"]
    assert _ids(plan.modified) == ["T-2"]
    assert plan.texts_to_embed() == {
        hashed[0].content_hash: "Подкатегория 1: Вопрос номер 1?\nОтвет номер 1.",
        hashed[2].content_hash: "Подкатегория 2: Вопрос номер 2?\nНовый ответ.",
    }


def test_texts_to_embed_excludes_unchanged_and_metadata_updates() -> None:
    hashed = hash_templates([_template(1, priority="низкий"), _template(2)], DEFAULT_TEXT_TEMPLATE)
    plan = build_change_plan(hashed, _published([_template(1), _template(2)]), model_version=KEY, base_generation=1)
    assert plan.texts_to_embed() == {}


def test_counts_and_target_rows() -> None:
    published = _published([_template(1), _template(2), _template(3), _template(4)])
    current = [_template(1), _template(2, answer="x"), _template(3, source_row=99), _template(5), _template(6)]
    plan = build_change_plan(
        hash_templates(current, DEFAULT_TEXT_TEMPLATE), published, model_version=KEY, base_generation=3
    )
    assert plan.counts() == {"new": 2, "modified": 1, "deleted": 1, "unchanged": 2, "metadata_updated": 1}
    assert plan.target_rows == 5


@pytest.mark.parametrize(
    ("published", "current", "rebuild", "target_rows"),
    [
        ([], [], False, 0),
        ([], BASE, False, 3),
        (BASE, [], False, 0),
        (BASE, BASE[:2], False, 2),
        (BASE, BASE, True, 3),
        (BASE, BASE[:1], True, 1),
    ],
)
def test_target_rows(published: list[Template], current: list[Template], rebuild: bool, target_rows: int) -> None:
    plan = build_change_plan(
        hash_templates(current, DEFAULT_TEXT_TEMPLATE), _published(published),
        model_version=KEY, base_generation=None, rebuild=rebuild,
    )
    assert plan.target_rows == target_rows


def test_rebuild_counts() -> None:
    plan = build_change_plan(
        hash_templates(BASE, DEFAULT_TEXT_TEMPLATE), _published(BASE), model_version=KEY, base_generation=2,
        rebuild=True,
    )
    assert plan.counts() == {"new": 3, "modified": 0, "deleted": 0, "unchanged": 0, "metadata_updated": 0}
    assert len(plan.texts_to_embed()) == 3


def test_a_store_compared_with_another_list_keeps_the_run_hashes_cached() -> None:
    version = ModelVersion("v", "local", "m", 2, text_template=DEFAULT_TEXT_TEMPLATE)
    run_list = [make_template(n) for n in range(3)]
    other_list = [make_template(n) for n in range(3)]
    hashed = hash_version_templates(run_list, version)
    report = compare_store(
        version, other_list, [h.template_id for h in hashed], [h.content_hash for h in hashed],
        np.ones((3, 2), dtype=np.float32),
    )
    assert report.healthy
    assert hashed_if_known(run_list, version) == hashed
