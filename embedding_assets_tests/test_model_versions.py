from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from embedding_assets.lib.model_versions import (
    DEFAULT_TEXT_TEMPLATE,
    KEY_PATTERN,
    LexicalSignal,
    ModelVersion,
    ModelVersionError,
    View,
    load_model_versions,
)
from embedding_assets_tests.conftest import PROJECT_ROOT

REPO_MODEL_VERSIONS = PROJECT_ROOT / "model_versions.toml"

VALID = """
[[model_version]]
key = "a-v1"
provider = "local"
model = "multilingual-e5-small"
dimension = 384
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "model_versions.toml"
    path.write_text(text, encoding="utf-8")
    return path


def _version_toml(**overrides: str | None) -> str:
    """One [[model_version]] table; values are TOML literals, None drops a setting."""
    settings = {"key": '"a-v1"', "provider": '"local"', "model": '"multilingual-e5-small"', "dimension": "384"}
    settings.update(overrides)
    lines = ["[[model_version]]"] + [f"{name} = {value}" for name, value in settings.items() if value is not None]
    return "\n".join(lines) + "\n"


def test_repo_model_versions() -> None:
    versions = load_model_versions(REPO_MODEL_VERSIONS)
    assert versions == [
        ModelVersion(
            key="e5-small-v1",
            provider="local",
            model="multilingual-e5-small",
            dimension=384,
            text_template="{subcategory}: {question}\n{answer}",
            active=False,
            batch_size=32,
            settings={"variant": "original"},
        ),
        ModelVersion(
            key="e5-small-views-v1",
            provider="local",
            model="multilingual-e5-small",
            dimension=384,
            text_template="{subcategory}: {question}\n{answer}",
            active=True,
            batch_size=32,
            settings={"variant": "original"},
            views=(
                View("qa", "{subcategory}: {question}\n{answer}", 1.0),
                View("question", "{question}", 0.25),
            ),
            fusion="sum",
            lexical=LexicalSignal("char_ngrams", 0.03),
        ),
    ]
    assert versions[0].embedded_fields() == versions[1].embedded_fields() == {"subcategory", "question", "answer"}


def test_defaults(tmp_path: Path) -> None:
    (version,) = load_model_versions(_write(tmp_path, VALID))
    assert version == ModelVersion("a-v1", "local", "multilingual-e5-small", 384)
    assert version.text_template == DEFAULT_TEXT_TEMPLATE
    assert version.active is True
    assert version.batch_size == 32
    assert version.settings == {}


def test_several_versions_keep_their_order(tmp_path: Path) -> None:
    text = (
        _version_toml(key='"b-v2"', dimension="3", active="false", batch_size="8", settings='{ variant = "x" }')
        + _version_toml(key='"a.v_1"', text_template='"{question}"')
    )
    versions = load_model_versions(_write(tmp_path, text))
    assert [v.key for v in versions] == ["b-v2", "a.v_1"]
    assert (versions[0].dimension, versions[0].active, versions[0].batch_size, versions[0].settings) == (
        3, False, 8, {"variant": "x"},
    )
    assert versions[1].text_template == "{question}"


@pytest.mark.parametrize("key", ["e5", "0", "a.b_c-d", "a" * 63])
def test_valid_keys(tmp_path: Path, key: str) -> None:
    (version,) = load_model_versions(_write(tmp_path, _version_toml(key=f'"{key}"')))
    assert version.key == key


@pytest.mark.parametrize(
    ("toml_text", "message"),
    [
        pytest.param(
            _version_toml(key='"E5-Small"'),
            "{path}: model version 'E5-Small': key must match " + KEY_PATTERN.pattern
            + " (lowercase letters, digits, '.', '_', '-')",
            id="uppercase-key",
        ),
        pytest.param(
            _version_toml(key='"e5 small"'),
            "{path}: model version 'e5 small': key must match " + KEY_PATTERN.pattern
            + " (lowercase letters, digits, '.', '_', '-')",
            id="key-with-space",
        ),
        pytest.param(
            _version_toml(key='"-e5"'),
            "{path}: model version '-e5': key must match " + KEY_PATTERN.pattern
            + " (lowercase letters, digits, '.', '_', '-')",
            id="key-starts-with-dash",
        ),
        pytest.param(
            _version_toml(key='"' + "a" * 64 + '"'),
            "{path}: model version '" + "a" * 64 + "': key must match " + KEY_PATTERN.pattern
            + " (lowercase letters, digits, '.', '_', '-')",
            id="key-too-long",
        ),
        pytest.param(
            _version_toml(key='"e5-small\\n"'),
            "{path}: model version 'e5-small\\n': key must match " + KEY_PATTERN.pattern
            + " (lowercase letters, digits, '.', '_', '-')",
            id="key-with-trailing-newline",
        ),
        pytest.param(
            _version_toml(key="5"),
            "{path}: model version 5: key must match " + KEY_PATTERN.pattern
            + " (lowercase letters, digits, '.', '_', '-')",
            id="key-not-a-string",
        ),
        pytest.param(
            _version_toml(provider='"cohere"'),
            "{path}: model version 'a-v1': provider must be one of local, openai",
            id="unknown-provider",
        ),
        pytest.param(
            _version_toml(dimension=None),
            "{path}: model version 'a-v1': missing required setting 'dimension'",
            id="missing-dimension",
        ),
        pytest.param(
            _version_toml(key=None),
            "{path}: model version None: missing required setting 'key'",
            id="missing-key",
        ),
        pytest.param(
            _version_toml(model=None),
            "{path}: model version 'a-v1': missing required setting 'model'",
            id="missing-model",
        ),
        pytest.param(
            _version_toml(dimension='"384"'),
            "{path}: model version 'a-v1': dimension must be an integer between 1 and 16000",
            id="dimension-string",
        ),
        pytest.param(
            _version_toml(dimension="384.0"),
            "{path}: model version 'a-v1': dimension must be an integer between 1 and 16000",
            id="dimension-float",
        ),
        pytest.param(
            _version_toml(dimension="true"),
            "{path}: model version 'a-v1': dimension must be an integer between 1 and 16000",
            id="dimension-bool",
        ),
        pytest.param(
            _version_toml(dimension="0"),
            "{path}: model version 'a-v1': dimension must be an integer between 1 and 16000",
            id="dimension-zero",
        ),
        pytest.param(
            _version_toml(dimension="16001"),
            "{path}: model version 'a-v1': dimension must be an integer between 1 and 16000",
            id="dimension-too-large",
        ),
        pytest.param(
            _version_toml(batch_size="0"),
            "{path}: model version 'a-v1': batch_size must be a positive integer",
            id="batch-size-zero",
        ),
        pytest.param(
            _version_toml() + _version_toml(dimension="3") + _version_toml(key='"b"') + _version_toml(key='"b"'),
            "{path}: duplicate model version key(s) a-v1, b",
            id="duplicate-keys",
        ),
        pytest.param(
            _version_toml(normalize="true", device='"cpu"'),
            "{path}: model version 'a-v1': unknown setting(s) device, normalize",
            id="unknown-setting",
        ),
        pytest.param(
            _version_toml(text_template='"{question} {title}"'),
            "{path}: model version 'a-v1': text_template may use category, subcategory, question, answer, "
            "priority, audience and must use question (got question, title)",
            id="text-template-unknown-field",
        ),
        pytest.param(
            _version_toml(text_template='"{subcategory}: {answer}"'),
            "{path}: model version 'a-v1': text_template may use category, subcategory, question, answer, "
            "priority, audience and must use question (got answer, subcategory)",
            id="text-template-without-question",
        ),
        pytest.param(
            _version_toml(text_template='"plain text"'),
            "{path}: model version 'a-v1': text_template may use category, subcategory, question, answer, "
            "priority, audience and must use question (got no fields)",
            id="text-template-no-fields",
        ),
        pytest.param(
            _version_toml(text_template='"{question} {0}"'),
            "{path}: model version 'a-v1': text_template may use category, subcategory, question, answer, "
            "priority, audience and must use question (got 0, question)",
            id="text-template-positional-index",
        ),
        pytest.param(
            _version_toml(text_template='"{question} {}"'),
            "{path}: model version 'a-v1': text_template may use category, subcategory, question, answer, "
            "priority, audience and must use question",
            id="text-template-empty-placeholder",
        ),
        pytest.param(
            "[model_version]\nkey = ",
            "{path}: invalid TOML (",
            id="invalid-toml",
        ),
        pytest.param(
            "",
            "{path}: declare at least one [[model_version]]",
            id="empty-file",
        ),
        pytest.param(
            "[other]\nkey = 1\n",
            "{path}: declare at least one [[model_version]]",
            id="no-versions",
        ),
    ],
)
def test_invalid_model_versions(tmp_path: Path, toml_text: str, message: str) -> None:
    path = _write(tmp_path, toml_text)
    with pytest.raises(ModelVersionError) as exc_info:
        load_model_versions(path)
    assert str(exc_info.value).startswith(message.replace("{path}", str(path), 1))


def test_text_template_invalid_format_string(tmp_path: Path) -> None:
    path = _write(tmp_path, _version_toml(text_template='"{question"'))
    with pytest.raises(ModelVersionError) as exc_info:
        load_model_versions(path)
    assert str(exc_info.value) == (
        f"{path}: model version 'a-v1': text_template is not a valid format string "
        "(expected '}' before end of string)"
    )


def test_invalid_toml_message(tmp_path: Path) -> None:
    path = _write(tmp_path, 'key = "unterminated\n')
    with pytest.raises(ModelVersionError) as exc_info:
        load_model_versions(path)
    message = str(exc_info.value)
    assert message.startswith(f"{path}: invalid TOML (")
    assert "line 1" in message


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ModelVersionError) as exc_info:
        load_model_versions(path)
    assert str(exc_info.value) == f"model versions file {path} not found"


def test_model_version_error_is_value_error() -> None:
    assert issubclass(ModelVersionError, ValueError)


# --- fingerprint ----------------------------------------------------------------------------------

BASE_VERSION = ModelVersion(
    key="a-v1", provider="local", model="multilingual-e5-small", dimension=384,
    text_template=DEFAULT_TEXT_TEMPLATE, active=True, batch_size=32, settings={"variant": "original"},
)


@pytest.mark.parametrize(
    "changes",
    [
        {"model": "multilingual-e5-base"},
        {"dimension": 768},
        {"text_template": "{question}\n{answer}"},
        {"settings": {"variant": "quantized"}},
        {"settings": {}},
        {"settings": {"variant": "original", "extra": 1}},
        {"provider": "other"},
    ],
)
def test_fingerprint_changes_with_vector_settings(changes: dict) -> None:
    assert replace(BASE_VERSION, **changes).fingerprint() != BASE_VERSION.fingerprint()


@pytest.mark.parametrize(
    "changes",
    [
        {"batch_size": 1},
        {"batch_size": 256},
        {"active": False},
        {"key": "another-key"},
        {"batch_size": 1, "active": False},
    ],
)
def test_fingerprint_ignores_batch_size_and_activity(changes: dict) -> None:
    assert replace(BASE_VERSION, **changes).fingerprint() == BASE_VERSION.fingerprint()


def test_fingerprint_is_stable_sha256_hex() -> None:
    fingerprint = BASE_VERSION.fingerprint()
    assert len(fingerprint) == 64
    assert int(fingerprint, 16) >= 0
    assert fingerprint == replace(BASE_VERSION).fingerprint()


def test_fingerprint_ignores_settings_order() -> None:
    a = replace(BASE_VERSION, settings={"x": 1, "y": 2})
    b = replace(BASE_VERSION, settings={"y": 2, "x": 1})
    assert a.fingerprint() == b.fingerprint()
