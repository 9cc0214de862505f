"""Tokenizers: the World vocabulary shipped in the rwkv package, and a tokenizers JSON file
(the form of ``20B_tokenizer.json`` for Pile/Raven RWKV-4 models)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bot.errors import ModelLoadError
from bot.inference.tokenizer import WORLD, load_tokenizer


def test_world_tokenizer_round_trips_text_and_names_undecodable_ids() -> None:
    tokenizer = load_tokenizer(WORLD)
    text = "User: héllo wörld, 你好 🙂\n\nAssistant:"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.encode("\n\n") == [261]
    unknown = tokenizer.unknown_ids(65536)
    assert 65535 in unknown and 261 not in unknown
    assert tokenizer.decode_bytes([65535]) == b""  # never raises on an id the model may emit


def test_a_tokenizers_json_file_is_loaded_from_a_path(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    built = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    built.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "20B_tokenizer.json"
    built.save(str(path))
    tokenizer = load_tokenizer(str(path))
    assert tokenizer.name == "20B_tokenizer.json"
    assert tokenizer.encode("hello world") == [1, 2]
    assert tokenizer.decode([1, 2]) == "hello world"
    assert tokenizer.unknown_ids(5) == [3, 4]


def test_a_missing_or_malformed_tokenizer_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_tokenizer(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ModelLoadError, match="not a tokenizers JSON file"):
        load_tokenizer(str(bad))
