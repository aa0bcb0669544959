"""The config a manifest stored, read back as transformers' config reads, without transformers."""

from __future__ import annotations

import copy
import pickle
from typing import Any

import pytest

from btdeploy.artifacts.stored_config import StoredConfig
from btdeploy.model.configs import build_config, config_fingerprint, max_text_length, num_image_tokens


@pytest.fixture(scope="module")
def stored() -> dict[str, Any]:
    return build_config("tiny").to_dict()


def test_every_value_reads_as_on_the_transformers_config(stored: dict[str, Any]) -> None:
    original = build_config("tiny")
    config = StoredConfig.from_export(stored)
    for part in (None, "text_config", "vision_config"):
        have = config if part is None else getattr(config, part)
        want = original if part is None else getattr(original, part)
        for key, value in (stored if part is None else stored[part]).items():
            if key not in ("text_config", "vision_config", "transformers_version"):  # to_dict adds the version
                assert getattr(have, key) == getattr(want, key) == value, (part, key)
    assert max_text_length(config) == max_text_length(original)
    assert num_image_tokens(config) == num_image_tokens(original)
    # A key the config lacks answers as on transformers' config: getattr's default, else AttributeError.
    assert getattr(config, "no_such_key", "default") == "default"
    with pytest.raises(AttributeError, match="no 'no_such_key'"):
        _ = config.text_config.no_such_key


def test_it_is_read_only_survives_pickle_and_copy_and_becomes_the_transformers_config(
    stored: dict[str, Any],
) -> None:
    config = StoredConfig.from_export(stored)
    with pytest.raises(AttributeError, match="read-only"):
        config.hidden_size = 1
    assert config.hidden_size == stored["hidden_size"]
    # to_dict is a copy: changing it changes nothing stored.
    values = config.to_dict()
    values["text_config"]["vocab_size"] = -1
    assert config.text_config.vocab_size == stored["text_config"]["vocab_size"]
    for other in (pickle.loads(pickle.dumps(config)), copy.deepcopy(config), copy.copy(config)):
        assert other.to_dict() == stored and other.vision_config.image_size == stored["vision_config"]["image_size"]
    assert config_fingerprint(config.to_transformers()) == config_fingerprint(build_config("tiny"))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: "a string", "expected a mapping of config keys, got str"),
        (lambda d: {**d, "model_type": "bert"}, "model_type is 'bert', not 'bridgetower'"),
        (lambda d: {**d, "vision_config": None}, "vision_config is not a mapping"),
        (lambda d: {**d, "text_config": {**d["text_config"], "pad_token_id": None}}, "text_config.pad_token_id is"),
        (lambda d: {**d, "hidden_size": "64"}, "hidden_size is '64', not an integer"),
        (lambda d: {**d, "vision_config": {**d["vision_config"], "image_size": True}}, "image_size is True"),
    ],
)
def test_a_stored_config_without_what_btdeploy_reads_is_refused_with_the_key(
    stored: dict[str, Any], change: Any, message: str
) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        StoredConfig.from_export(change(copy.deepcopy(stored)))
