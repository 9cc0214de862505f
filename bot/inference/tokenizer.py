"""Tokenizers: the World vocabulary that ships inside the ``rwkv`` package, or a ``20B_tokenizer.json``."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Protocol

from bot.errors import ModelLoadError

WORLD = "rwkv_vocab_v20230424"


class Tokenizer(Protocol):
    name: str

    def encode(self, text: str) -> list[int]: ...

    def decode(self, tokens: list[int]) -> str: ...

    def decode_bytes(self, tokens: list[int]) -> bytes: ...

    def unknown_ids(self, vocab_size: int) -> list[int]:
        """Ids the model can emit but this tokenizer cannot decode (sampling bans them)."""
        ...


class WorldTokenizer:
    def __init__(self) -> None:
        spec = importlib.util.find_spec("rwkv")
        if spec is None or not spec.submodule_search_locations:
            raise ModelLoadError("the 'rwkv' package is not installed")
        root = Path(next(iter(spec.submodule_search_locations)))
        module_spec = importlib.util.spec_from_file_location("_raven_rwkv_tokenizer", root / "rwkv_tokenizer.py")
        assert module_spec is not None and module_spec.loader is not None
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        self._trie = module.TRIE_TOKENIZER(str(root / f"{WORLD}.txt"))
        self.name = WORLD

    def encode(self, text: str) -> list[int]:
        return list(self._trie.encode(text))

    def decode_bytes(self, tokens: list[int]) -> bytes:
        table = self._trie.idx2token
        return b"".join(table.get(t, b"") for t in tokens)

    def unknown_ids(self, vocab_size: int) -> list[int]:
        table = self._trie.idx2token
        return [i for i in range(1, vocab_size) if i not in table]

    def decode(self, tokens: list[int]) -> str:
        return self.decode_bytes(tokens).decode("utf-8", errors="replace")


class HFTokenizer:
    """``20B_tokenizer.json`` (Pile / Raven RWKV-4 models), loaded with the ``tokenizers`` library."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer as _Tokenizer

        if not path.is_file():
            raise ModelLoadError(f"tokenizer file {path} does not exist (RAVEN_TOKENIZER)")
        try:
            self._tok = _Tokenizer.from_file(str(path))
        except Exception as exc:
            raise ModelLoadError(f"tokenizer file {path} is not a tokenizers JSON file: {exc}") from exc
        self.name = path.name

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text).ids)

    def decode(self, tokens: list[int]) -> str:
        return str(self._tok.decode(tokens))

    def decode_bytes(self, tokens: list[int]) -> bytes:
        return self.decode(tokens).encode("utf-8")

    def unknown_ids(self, vocab_size: int) -> list[int]:
        size = int(self._tok.get_vocab_size())
        return list(range(size, vocab_size))


@functools.lru_cache(maxsize=4)
def load_tokenizer(spec: str) -> Tokenizer:
    """Tokenizers are immutable and take ~1 s to build, so one per process is shared."""
    if spec == WORLD:
        return WorldTokenizer()
    return HFTokenizer(Path(spec))
