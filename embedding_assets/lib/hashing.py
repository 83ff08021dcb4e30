"""Render the text each template is embedded as, and hash exactly that text."""

from __future__ import annotations

import hashlib
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from itertools import repeat

from embedding_assets.lib.faq import Template
from embedding_assets.lib.model_versions import ModelVersion


@dataclass(frozen=True)
class HashedTemplate:
    """A template with the text a model version embeds and that text's SHA-256.

    A version with several views embeds one text per view: `view_texts` and `view_hashes` hold them
    in the version's view order, `text` is the first one and `content_hash` hashes the view hashes.
    """

    template: Template
    text: str
    content_hash: str
    view_texts: tuple[str, ...] = ()
    view_hashes: tuple[str, ...] = ()

    @property
    def template_id(self) -> str:
        return self.template.template_id

    def embedded_texts(self) -> dict[str, str]:
        """Each text to embed by its own content hash (one entry for a single-view version)."""
        if not self.view_hashes:
            return {self.content_hash: self.text}
        return dict(zip(self.view_hashes, self.view_texts, strict=True))

    def vector_hashes(self) -> tuple[str, ...]:
        """The content hashes of this template's vectors, in view order."""
        return self.view_hashes or (self.content_hash,)


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def render_text(template: Template, text_template: str) -> str:
    return text_template.format(**template.fields())


@lru_cache(maxsize=64)
def _renderer(text_template: str) -> Callable[[Template], str]:
    """render_text for one text template: formatted from the template's own attributes when it names
    only its text fields (what a model version may name), else through render_text (which then raises)."""
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(text_template) if name is not None}
    except ValueError:
        names = None
    if names is None or not names <= _TEXT_FIELDS:
        return lambda template: render_text(template, text_template)
    format_fields = text_template.format_map
    return lambda template: format_fields(template.__dict__)


_TEXT_FIELDS = frozenset(Template.__dataclass_fields__) - {"template_id", "source_row"}
_new_hashed = object.__new__


def hash_templates(templates: list[Template], text_template: str) -> list[HashedTemplate]:
    render = _renderer(text_template)
    hashed = list(map(_new_hashed, repeat(HashedTemplate, len(templates))))
    for item, template in zip(hashed, templates):  # the frozen __init__ sets each field through object.__setattr__
        text = render(template)
        fields = item.__dict__
        fields["template"] = template
        fields["text"] = text
        fields["content_hash"] = content_hash(text)
        fields["view_texts"] = fields["view_hashes"] = ()
    return hashed


_LAST_HASHED: list = [None, None, None]  # (templates, views, result): a run hashes one FAQ list in several steps


def hash_version_templates(templates: list[Template], version: ModelVersion) -> list[HashedTemplate]:
    """The templates hashed as `version` embeds them: exactly hash_templates for a version without views.

    Hashing the same list object again as the same texts returns the previous result (a run's checks
    hash the FAQ its plan already hashed); the lists passed here are never changed in place.
    """
    known = hashed_if_known(templates, version)
    if known is not None:
        return known
    hashed = hash_templates_uncached(templates, version)
    _LAST_HASHED[:] = [templates, _views_key(version), hashed]
    return list(hashed)


def hashed_if_known(templates: Sequence[Template], version: ModelVersion) -> list[HashedTemplate] | None:
    """What hash_version_templates returned for this very list and version, if it is the last one hashed."""
    last_templates, last_views, last_result = _LAST_HASHED
    if last_templates is templates and last_views == _views_key(version) and len(last_result) == len(templates):
        return list(last_result)
    return None


def remember_hashed(templates: list[Template], version: ModelVersion, hashed: list[HashedTemplate]) -> None:
    """Record `hashed` as what hashing `templates` for `version` gives (it was, in an earlier run)."""
    _LAST_HASHED[:] = [templates, _views_key(version), list(hashed)]


def _views_key(version: ModelVersion) -> tuple:
    return (version.text_template, tuple((v.name, v.text_template) for v in version.views))


def hash_templates_uncached(templates: list[Template], version: ModelVersion) -> list[HashedTemplate]:
    """hash_version_templates without its cache, which is neither read nor replaced."""
    if not version.views:
        return hash_templates(templates, version.text_template)
    renderers = [_renderer(view.text_template) for view in version.views]
    hashed = []
    for template in templates:
        texts = tuple(render(template) for render in renderers)
        hashes = tuple(content_hash(text) for text in texts)
        combined = content_hash("\n".join(f"{v.name}:{h}" for v, h in zip(version.views, hashes, strict=True)))
        hashed.append(HashedTemplate(template, texts[0], combined, texts, hashes))
    return hashed


def hashed_digest(hashed: list[HashedTemplate]) -> str:
    """SHA-256 of each template's id and content hash, in order: what a published version must hold."""
    rows = "\n".join(f"{h.template.template_id}\t{h.content_hash}" for h in hashed)
    return hashlib.sha256(rows.encode("utf-8", "surrogatepass")).hexdigest()
