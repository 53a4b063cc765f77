"""Token files in nanoGPT's layout (``--data tokens:DIR``): ``DIR/train.bin`` and
``DIR/val.bin`` hold raw little-endian token ids, memory-mapped when read, with their dtype in
``DIR/meta.json``; ``lbw-train tokenize TEXT DIR`` writes them (:func:`write_token_files`)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from lbw.train.data import DataError, TokenSplits, check_text_file, tokenize

TOKEN_FILES = {"train": "train.bin", "eval": "val.bin"}  # nanoGPT's names.
META_NAME = "meta.json"
TOKEN_DTYPES = ("uint16", "uint32")
_CHUNK_TOKENS = 1 << 24  # Tokens read at a time when scanning a token file.


def _token_meta(directory: Path) -> dict[str, Any]:
    """``meta.json`` of a token folder (``{}`` without one), its ``dtype`` checked."""
    path = directory / META_NAME
    if not path.exists():
        return {}
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{str(path)!r} is not readable JSON: {e}.") from None
    if not isinstance(meta, dict) or meta.get("dtype", "uint16") not in TOKEN_DTYPES:
        raise DataError(
            f'{str(path)!r}: "dtype" must be one of {", ".join(TOKEN_DTYPES)}, got '
            f"{meta.get('dtype') if isinstance(meta, dict) else meta!r}."
        )
    return meta


def _max_token(tokens: np.ndarray) -> int:
    """The largest id in ``tokens``, read in chunks (a memory map stays unread in memory)."""
    return max(
        int(tokens[i : i + _CHUNK_TOKENS].max()) for i in range(0, len(tokens), _CHUNK_TOKENS)
    )


def read_token_files(directory: str | os.PathLike, vocab_size: int) -> TokenSplits:
    """Memory-maps ``train.bin`` and ``val.bin`` of a token folder (see the module docstring).

    Args:
      directory: the folder.
      vocab_size: the run's tokenizer's vocabulary size; a ``meta.json`` that records another
        is refused, and every id must be below it.

    Raises:
      DataError: naming the folder or file: missing, empty, not a whole number of tokens, an
        id outside the vocabulary, a ``meta.json`` of another tokenizer.
    """
    folder = Path(directory)
    if not folder.is_dir():
        raise DataError(
            f"data='tokens:{directory}': no such folder; give a folder with "
            f"{' and '.join(TOKEN_FILES.values())} (lbw-train tokenize TEXT FOLDER makes one)."
        )
    meta = _token_meta(folder)
    if meta.get("vocab_size", vocab_size) != vocab_size:
        raise DataError(
            f"{str(folder)!r} was tokenized with a vocabulary of {meta['vocab_size']} ids "
            f"({meta.get('tokenizer', 'tokenizer not recorded')}), the run's tokenizer has "
            f"{vocab_size}; pass the --tokenizer it was made with."
        )
    dtype = np.dtype(meta.get("dtype", "uint16")).newbyteorder("<")
    splits = {}
    for split, name in TOKEN_FILES.items():
        path = folder / name
        if not path.is_file():
            raise DataError(f"{str(path)!r} does not exist; a token folder needs {name}.")
        size = path.stat().st_size
        if size == 0 or size % dtype.itemsize:
            raise DataError(
                f"{str(path)!r} holds {size} bytes, not a whole, non-zero number of "
                f"{dtype.name} tokens; check the dtype in {META_NAME}."
            )
        tokens = np.memmap(path, dtype=dtype, mode="r")
        largest = _max_token(tokens)
        if largest >= vocab_size:
            raise DataError(
                f"{str(path)!r} holds token id {largest}, outside the vocabulary of "
                f"{vocab_size} ids; pass the --tokenizer it was made with (or check the dtype "
                f"in {META_NAME})."
            )
        splits[split] = tokens
    where = f"token files {str(folder)!r} ({dtype.name}): train on {TOKEN_FILES['train']}"
    return TokenSplits(
        splits["train"], splits["eval"], f"{where}, eval on {TOKEN_FILES['eval']}", vocab_size
    )


def write_token_files(
    text_file: str | os.PathLike,
    directory: str | os.PathLike,
    tokenizer: Any,
    *,
    tokenizer_name: str,
    val_fraction: float = 0.1,
) -> dict[str, Any]:
    """Tokenizes a UTF-8 text file into a token folder that ``data="tokens:DIR"`` reads: the
    first ``1 - val_fraction`` of its tokens into ``train.bin``, the rest into ``val.bin``,
    uint16 when the vocabulary fits (else uint32), and ``meta.json``. Each file is written
    under a temporary name and renamed when complete.

    Returns:
      The ``meta.json`` written: ``dtype``, ``vocab_size``, ``tokenizer``, ``train_tokens``,
      ``val_tokens``.

    Raises:
      DataError: for a missing, empty, binary or non-UTF-8 text file, a ``val_fraction``
        outside (0, 1), or too little text for both files.
    """
    if not 0 < val_fraction < 1:
        raise DataError(f"--val-fraction must be between 0 and 1, got {val_fraction!r}.")
    check_text_file("text", os.fspath(text_file))
    tokens = tokenize(Path(text_file).read_text(encoding="utf-8"), tokenizer)
    dtype = "uint16" if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else "uint32"
    cut = round(len(tokens) * (1 - val_fraction))
    if not 0 < cut < len(tokens):
        raise DataError(
            f"{os.fspath(text_file)!r} has {len(tokens)} tokens, too few for a training and a "
            f"validation file at --val-fraction {val_fraction}."
        )
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {
        "dtype": dtype,
        "vocab_size": tokenizer.vocab_size,
        "tokenizer": tokenizer_name,
        "train_tokens": cut,
        "val_tokens": len(tokens) - cut,
    }
    parts = {"train": tokens[:cut], "eval": tokens[cut:]}
    for split, name in TOKEN_FILES.items():
        tmp = folder / f"{name}.tmp"
        parts[split].astype(np.dtype(dtype).newbyteorder("<")).tofile(tmp)
        os.replace(tmp, folder / name)
    tmp = folder / f"{META_NAME}.tmp"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, folder / META_NAME)
    return meta
