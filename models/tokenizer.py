"""Tokenizers: a byte-level one that needs no files, and any local Hugging Face tokenizer.

Both expose the same small interface (:class:`Tokenizer`): ``encode``, ``decode``,
``vocab_size`` and the ``bos_id`` / ``eos_id`` / ``pad_id`` special ids.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Protocol


class Tokenizer(Protocol):
    """What the training code needs from a tokenizer."""

    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as token ids 0–255, plus BOS = 256, EOS = 257 and PAD = 258.

    Example:
      >>> tok = ByteTokenizer()
      >>> tok.encode("hé", add_eos=True)
      [104, 195, 169, 257]
      >>> tok.decode([104, 195, 169, 257])
      'hé'
    """

    bos_id = 256
    eos_id = 257
    pad_id = 258
    vocab_size = 259

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.bos_id] * add_bos + ids + [self.eos_id] * add_eos

    def decode(self, ids: Sequence[int]) -> str:
        """Text of the byte ids in ``ids``; special ids are dropped, invalid UTF-8 replaced."""
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face tokenizer behind the :class:`Tokenizer` interface.

    ``pad_id`` falls back to ``eos_id`` (and ``bos_id`` to ``eos_id``) when the tokenizer
    defines none, as is usual for decoder-only models.
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.vocab_size = len(tokenizer)
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ValueError("The tokenizer defines no EOS token; set one before using it here.")
        self.eos_id = eos
        self.bos_id = eos if tokenizer.bos_token_id is None else tokenizer.bos_token_id
        self.pad_id = eos if tokenizer.pad_token_id is None else tokenizer.pad_token_id

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return [self.bos_id] * add_bos + list(ids) + [self.eos_id] * add_eos

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)


def load_tokenizer(path: str | os.PathLike | None = None) -> Tokenizer:
    """The byte-level tokenizer when ``path`` is None, else the Hugging Face tokenizer saved in
    the local directory ``path`` (read offline, with ``transformers.AutoTokenizer``)."""
    if path is None:
        return ByteTokenizer()
    if not os.path.isdir(path):
        raise FileNotFoundError(f"Tokenizer directory {os.fspath(path)!r} does not exist.")
    from transformers import AutoTokenizer

    return HFTokenizer(AutoTokenizer.from_pretrained(os.fspath(path), local_files_only=True))
