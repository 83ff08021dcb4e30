"""Render the text each template is embedded as, and hash exactly that text."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from embedding_assets.lib.faq import Template


@dataclass(frozen=True)
class HashedTemplate:
    """A template with the text a model version embeds and that text's SHA-256."""

    template: Template
    text: str
    content_hash: str

    @property
    def template_id(self) -> str:
        return self.template.template_id


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def render_text(template: Template, text_template: str) -> str:
    return text_template.format(**template.fields())


def hash_templates(templates: list[Template], text_template: str) -> list[HashedTemplate]:
    hashed = []
    for template in templates:
        text = render_text(template, text_template)
        hashed.append(HashedTemplate(template=template, text=text, content_hash=content_hash(text)))
    return hashed
