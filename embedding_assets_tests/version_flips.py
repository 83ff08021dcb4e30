"""A store with two model versions whose rows tell them apart, and a writer that flips between them.

Version "ids-p" holds templates P-1..P-n, version "ids-q" Q-1..Q-n; before each promote the target
version is republished with answers naming that publish, so a response's hits reveal both the
version and the generation they were read from. Vectors are fixed per text (the query is embedded by
the real local model): the checks are about which rows answered, not ranking quality.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace

import numpy as np

from embedding_assets.lib.hashing import hash_templates
from embedding_assets.lib.model_versions import ModelVersion
from embedding_assets.lib.plan import build_change_plan
from embedding_assets_tests.conftest import make_template

TEMPLATES = 12
VERSIONS = {
    prefix: ModelVersion(key=f"ids-{prefix.lower()}", provider="local", model="multilingual-e5-small",
                         dimension=384, settings={"variant": "original"})
    for prefix in ("P", "Q")
}
QUERY = "Как заблокировать карту, если её украли?"


def vector_of(content_hash: str) -> np.ndarray:
    rng = np.random.default_rng(int(hashlib.sha256(content_hash.encode()).hexdigest()[:16], 16))
    vector = rng.normal(size=384).astype(np.float32)
    return vector / np.linalg.norm(vector)


def sheet(prefix: str, edit: int) -> list:
    return [
        replace(make_template(n, answer=f"Ответ {prefix}-{n}, публикация {edit}."),
                template_id=f"{prefix}-{n}")
        for n in range(1, TEMPLATES + 1)
    ]


def publish(store, version: ModelVersion, templates) -> int:
    info, published = store.published(version.key)
    plan = build_change_plan(
        hash_templates(templates, version.text_template), published,
        model_version=version.key, base_generation=info.generation if info else None,
    )
    vectors = {i.content_hash: vector_of(i.content_hash) for i in (*plan.new, *plan.modified)}
    return store.publish(version, plan, vectors).generation


class VersionFlipper:
    """Builds the two-version store, then flips the current version; records what each generation serves."""

    def __init__(self, store):
        self.store = store
        self.rows: dict[str, dict[str, str]] = {}
        self.served: dict[int, tuple[str, dict[str, str]]] = {}
        for prefix in ("P", "Q"):
            self._publish(prefix, 0)
        self.current = "P"  # the first version published becomes the current one
        self._record(self.store.generation())

    def _publish(self, prefix: str, edit: int) -> int:
        templates = sheet(prefix, edit)
        self.rows[prefix] = {t.template_id: t.answer for t in templates}
        return publish(self.store, VERSIONS[prefix], templates)

    def _record(self, generation: int) -> None:
        self.served[generation] = (VERSIONS[self.current].key, dict(self.rows[self.current]))

    def flip(self, edit: int) -> None:
        """Republish the other version with edited answers (one generation), then promote it (the next)."""
        target = "Q" if self.current == "P" else "P"
        self._record(self._publish(target, edit))
        self.store.promote(VERSIONS[target].key)
        self.current = target
        self._record(self.store.generation())

    def disagreeing(self, model_version: str, generation: int, hits: list[tuple[str, str]]) -> bool:
        """True when the hits are not exactly what (model_version, generation) serves."""
        return self.served.get(generation) != (model_version, dict(hits))
