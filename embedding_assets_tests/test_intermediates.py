"""Intermediate outputs pickled as columns, naming an earlier output's records by position."""

from __future__ import annotations

import hashlib
import pickle
from dataclasses import replace

import pytest

from embedding_assets.lib import intermediates
from embedding_assets.lib.hashing import hash_version_templates
from embedding_assets.lib.model_versions import ModelVersion
from embedding_assets.lib.plan import StoredTemplate, build_change_plan
from embedding_assets.store.base import template_row
from embedding_assets_tests.conftest import make_template

VERSION = ModelVersion(key="v", provider="local", model="m", dimension=4, text_template="{question}\n{answer}")


def stored(obj, sources=(), blobs=None):
    """The bytes of obj as the IO manager stores them, kept in `blobs` under their digest."""
    data, refs = intermediates.dumps(obj, sources)
    digest = hashlib.sha256(data).hexdigest()
    if blobs is not None:
        blobs[digest] = data
    return data, digest, refs


def test_records_round_trip_as_columns_and_cost_less_than_a_plain_pickle():
    templates = [make_template(n) for n in range(1, 200)]
    data, _, refs = stored(templates)
    assert intermediates.loads(data, read_blob=lambda digest: pytest.fail(digest)) == templates
    assert refs == ()
    assert len(data) < len(pickle.dumps(templates, protocol=pickle.HIGHEST_PROTOCOL))


def test_a_plan_names_the_hashed_templates_and_they_name_the_faq_by_position():
    templates = [make_template(n) for n in range(1, 50)]
    hashed = hash_version_templates(templates, VERSION)
    published = {h.template_id: StoredTemplate(*template_row(h)) for h in hashed[:40]}
    edited = [replace(h, content_hash="0" * 64) if n == 3 else h for n, h in enumerate(hashed)]
    plan = replace(build_change_plan(edited, published, model_version="v", base_generation=1), base=None)
    assert (len(plan.new), plan.modified, len(plan.unchanged)) == (9, [edited[3]], 39)
    blobs: dict[str, bytes] = {}

    _, faq_digest, _ = stored(templates, blobs=blobs)
    faq_source = intermediates.Source(faq_digest, (), templates)
    hashes_data, hashes_digest, hashes_refs = stored(edited, [faq_source], blobs)
    hashes_source = intermediates.Source(hashes_digest, hashes_refs, edited)
    plan_data, _, plan_refs = stored(plan, [faq_source, hashes_source], blobs)

    assert hashes_refs == (faq_digest,)
    assert set(plan_refs) == {faq_digest, hashes_digest}
    assert len(plan_data) < 2000  # positions, not the templates' texts again
    read = []
    loaded = intermediates.loads(plan_data, lambda digest: read.append(digest) or blobs[digest])
    assert loaded == plan
    assert sorted(read) == sorted([faq_digest, hashes_digest])  # each blob read once
    assert intermediates.loads(hashes_data, blobs.__getitem__) == edited


def test_records_not_in_any_source_are_stored_themselves():
    templates = [make_template(n) for n in range(1, 5)]
    other = intermediates.Source("f" * 64, (), [make_template(n) for n in range(1, 5)])  # equal, not the same objects
    data, _, refs = stored(templates, [other])
    assert refs == ()
    assert intermediates.loads(data, read_blob=lambda digest: pytest.fail(digest)) == templates


def test_bytes_naming_another_output_need_intermediates_loads():
    templates = [make_template(1)]
    data, _, _ = stored(list(templates), [intermediates.Source("a" * 64, (), templates)])
    with pytest.raises(pickle.UnpicklingError, match="intermediates.loads"):
        pickle.loads(data)

