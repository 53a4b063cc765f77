"""Text → tokens → fixed-length batches, with a seeded shuffle and a position that can be saved.

Sources (``TrainConfig.data``):

* ``"wikitext2"``: the WikiText-2 sample shipped in this package (``train/data/wikitext-2``):
  **trains on its validation split and evaluates on its test split** (the train split is not
  shipped). Works offline.
* ``"wikitext103"``: Hugging Face ``datasets``, ``Salesforce/wikitext`` / ``wikitext-103-raw-v1``
  (train split / validation split), when the Hub is reachable or the dataset is cached.
* ``"hf:NAME"`` or ``"hf:NAME:CONFIG"``: any Hugging Face dataset with a text column.
* ``"files"``: local text files (``train_files`` / ``eval_files``), read with the ``datasets``
  text loader.
* ``"tfds:NAME"``: a TFDS dataset through ``tfds.data_source`` (needs ``tensorflow-datasets``,
  the ``tfds`` extra; TensorFlow itself is not needed).
* ``"tokens:DIR"``: token files already tokenized, in nanoGPT's layout: ``DIR/train.bin`` and
  ``DIR/val.bin`` hold raw little-endian token ids, memory-mapped (never read whole). Their
  dtype is ``DIR/meta.json``'s ``"dtype"`` (``"uint16"`` or ``"uint32"``), uint16 without a
  ``meta.json`` (as nanoGPT's GPT-2 files). ``lbw-train tokenize TEXT DIR``
  (:func:`train.token_files.write_token_files`) makes such a folder from a text file.

Every text source is read as one text stream per split (rows joined by newlines) and tokenized;
the tokens of each split are cut into non-overlapping windows of ``seq_len + 1`` tokens (inputs
and shifted targets). Training
batches visit the windows in a fresh permutation each epoch, drawn from ``(seed, epoch)``; the
position in that order is a :class:`DataPosition` that checkpoints save and restore.
"""

from __future__ import annotations

import codecs
import dataclasses
import gzip
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lbw.train.config import FaultConfig, TrainConfig, UserError

SHIPPED_DIR = Path(__file__).resolve().parent / "data" / "wikitext-2"
WIKITEXT103 = ("Salesforce/wikitext", "wikitext-103-raw-v1")
NAMED_SOURCES = ("wikitext2", "wikitext103", "files")
PREFIXED_SOURCES = ("hf:", "tfds:", "tokens:")


class DataError(UserError):
    """Data that cannot be used: unknown source, missing files, empty or too-short text."""


@dataclasses.dataclass(frozen=True)
class TextSplits:
    """The raw text of a source: a training and an evaluation stream, and where they come from."""

    train: str
    eval: str
    description: str


def _join(rows: Iterable[str]) -> str:
    return "".join(row if row.endswith("\n") else row + "\n" for row in rows)


def _shipped(name: str) -> str:
    path = SHIPPED_DIR / f"{name}.txt.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return f.read()


def _hf(name: str, config_name: str | None, cfg: TrainConfig, defaults: tuple[str, str]):
    import datasets

    train_split = cfg.train_split or defaults[0]
    eval_split = cfg.eval_split or defaults[1]
    out = []
    for split in (train_split, eval_split):
        try:
            ds = datasets.load_dataset(name, config_name, split=split, cache_dir=cfg.data_dir)
        except Exception as e:  # Offline without a cache, unknown name or split: many types.
            raise DataError(
                f"Could not load Hugging Face dataset {name!r} (config {config_name!r}, split "
                f"{split!r}): {type(e).__name__}: {e}. It must be reachable on the Hub or "
                "already in the datasets cache."
            ) from e
        if cfg.text_field not in ds.column_names:
            raise DataError(
                f"Dataset {name!r} split {split!r} has no column {cfg.text_field!r}; columns: "
                f"{ds.column_names}. Choose one with --text-field."
            )
        out.append(_join(ds[cfg.text_field]))
    where = f"{name}" + (f" ({config_name})" if config_name else "")
    return TextSplits(out[0], out[1], f"{where}: train on {train_split!r}, eval on {eval_split!r}")


def check_text_file(kind: str, path: str) -> None:
    """Raises :class:`DataError` naming ``path`` unless it is a non-empty UTF-8 text file (read
    in chunks: the ``datasets`` text loader would fail later with an error that names no file)."""
    if not os.path.isfile(path):
        raise DataError(f"{kind}: no such file {path!r}; give an existing text file.")
    decoder = codecs.getincrementaldecoder("utf-8")()
    has_text, offset = False, 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            if b"\0" in chunk:
                raise DataError(
                    f"{kind}: {path!r} holds NUL bytes at byte {offset + chunk.index(0)}: "
                    "it looks binary, not text; give UTF-8 text files."
                )
            try:
                has_text = bool(decoder.decode(chunk).strip()) or has_text
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{kind}: {path!r} is not UTF-8 text (an invalid byte near byte "
                    f"{offset + e.start}); re-save it as UTF-8."
                ) from None
            offset += len(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise DataError(f"{kind}: {path!r} ends in a truncated UTF-8 character.") from None
    if not has_text:
        raise DataError(f"{kind}: {path!r} is empty (no text); give a file with text in it.")


def _files(cfg: TrainConfig) -> TextSplits:
    for kind, files in (("train_files", cfg.train_files), ("eval_files", cfg.eval_files)):
        if not files:
            raise DataError(f"data='files' needs {kind} (--{kind.replace('_', '-')}).")
        for f in files:
            check_text_file(kind, f)
    import datasets

    files = {"train": list(cfg.train_files), "eval": list(cfg.eval_files)}
    ds = datasets.load_dataset("text", data_files=files, cache_dir=cfg.data_dir)
    return TextSplits(
        _join(ds["train"]["text"]),
        _join(ds["eval"]["text"]),
        f"local files: train on {list(cfg.train_files)}, eval on {list(cfg.eval_files)}",
    )


def _tfds(name: str, cfg: TrainConfig) -> TextSplits:
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DataError(
            "data='tfds:…' needs tensorflow-datasets: pip install 'lbw-optax[tfds]'."
        ) from e
    try:
        # Empty when the dataset info is not prepared yet (e.g. under tfds.testing.mock_data).
        splits = set(tfds.builder(name, data_dir=cfg.data_dir).info.splits.keys())
    except Exception as e:
        raise DataError(f"Unknown or unavailable TFDS dataset {name!r}: {e}") from e
    train_split = cfg.train_split or "train"
    eval_split = cfg.eval_split or (
        "test" if splits and "validation" not in splits else "validation"
    )
    out = []
    for split in (train_split, eval_split):
        if splits and split not in splits:
            raise DataError(
                f"TFDS dataset {name!r} has no split {split!r}; splits: {sorted(splits)}."
            )
        try:
            source = tfds.data_source(name, split=split, data_dir=cfg.data_dir)
        except Exception as e:
            raise DataError(f"Cannot open TFDS dataset {name!r} split {split!r}: {e}") from e
        rows = []
        for record in source:
            if cfg.text_field not in record:
                raise DataError(
                    f"TFDS dataset {name!r} has no feature {cfg.text_field!r}; features: "
                    f"{sorted(record)}. Choose one with --text-field."
                )
            text = record[cfg.text_field]
            rows.append(text.decode("utf-8") if isinstance(text, bytes) else str(text))
        out.append(_join(rows))
    where = f"TFDS {name}: train on {train_split!r}, eval on {eval_split!r}"
    return TextSplits(out[0], out[1], where)


def load_text(cfg: TrainConfig) -> TextSplits:
    """Reads the training and evaluation text of ``cfg.data``.

    Raises:
      DataError: for an unknown source name, missing files or an unreachable dataset.
    """
    data = cfg.data
    if data == "wikitext2":
        return TextSplits(
            _shipped("valid"),
            _shipped("test"),
            "shipped WikiText-2 sample: train on its validation split, eval on its test split",
        )
    if data == "wikitext103":
        return _hf(*WIKITEXT103, cfg, defaults=("train", "validation"))
    if data == "files":
        return _files(cfg)
    if data.startswith("hf:"):
        name, _, config_name = data[3:].partition(":")
        if not name:
            raise DataError(f"data={data!r}: give a dataset name after 'hf:'.")
        return _hf(name, config_name or None, cfg, defaults=("train", "validation"))
    if data.startswith("tfds:"):
        if not data[5:]:
            raise DataError(f"data={data!r}: give a dataset name after 'tfds:'.")
        return _tfds(data[5:], cfg)
    if data.startswith("tokens:"):
        raise DataError(f"data={data!r} holds tokens, not text; read it with load_tokens.")
    raise DataError(
        f"Unknown data source {data!r}; known: {', '.join(NAMED_SOURCES)}, or a name prefixed "
        f"with {', '.join(PREFIXED_SOURCES)}."
    )


@dataclasses.dataclass(frozen=True)
class TokenSplits:
    """The token ids of a source: training and evaluation (1-D arrays, possibly memory-mapped),
    where they come from, and the size of the vocabulary they index."""

    train: np.ndarray
    eval: np.ndarray
    description: str
    vocab_size: int


def load_tokens(cfg: TrainConfig, tokenizer: Any) -> TokenSplits:
    """The training and evaluation tokens of ``cfg.data``: a ``tokens:`` folder memory-mapped
    (:func:`train.token_files.read_token_files`), any other source read (:func:`load_text`) and
    tokenized.

    Raises:
      DataError: as :func:`load_text` and :func:`train.token_files.read_token_files`.
    """
    if cfg.data.startswith("tokens:"):
        from lbw.train.token_files import read_token_files

        return read_token_files(cfg.data[len("tokens:") :], tokenizer.vocab_size)
    text = load_text(cfg)
    return TokenSplits(
        tokenize(text.train, tokenizer, what="training text"),
        tokenize(text.eval, tokenizer, what="evaluation text"),
        text.description,
        tokenizer.vocab_size,
    )


def tokenize(text: str, tokenizer: Any, *, what: str = "text") -> np.ndarray:
    """Token ids of ``text`` as a 1-D integer array (uint16 when the vocabulary allows).

    The byte-level tokenizer takes a vectorised path (the UTF-8 bytes are the ids).
    """
    if not text.strip():
        raise DataError(f"The {what} is empty.")
    dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
    from lbw.models import ByteTokenizer

    if isinstance(tokenizer, ByteTokenizer):
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(dtype)
    lines = text.splitlines(keepends=True)
    chunk = 1000
    ids: list[int] = []
    for i in range(0, len(lines), chunk):
        ids.extend(tokenizer.encode("".join(lines[i : i + chunk])))
    return np.asarray(ids, dtype)


def windows(tokens: np.ndarray, seq_len: int) -> int:
    """How many non-overlapping windows of ``seq_len + 1`` tokens ``tokens`` holds."""
    return max(0, (len(tokens) - 1) // seq_len)


def _window_batch(tokens: np.ndarray, seq_len: int, indices: Sequence[int]) -> np.ndarray:
    starts = np.asarray(indices, np.int64)[:, None] * seq_len
    return tokens[starts + np.arange(seq_len + 1)].astype(np.int32)  # [B, seq_len + 1]


@dataclasses.dataclass(frozen=True)
class DataPosition:
    """Where the training stream is: the epoch and the next batch within that epoch."""

    epoch: int = 0
    batch: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch}

    @classmethod
    def from_dict(cls, d: dict[str, int]) -> DataPosition:
        return cls(epoch=int(d["epoch"]), batch=int(d["batch"]))


class Batches:
    """Seeded, shuffled training batches of shape ``[batch_size, seq_len + 1]``.

    Each epoch visits ``batches_per_epoch`` batches of distinct windows, in the permutation
    ``np.random.default_rng([seed, epoch])``; the last incomplete batch of windows is dropped.
    """

    def __init__(self, tokens: np.ndarray, *, seq_len: int, batch_size: int, seed: int):
        n = windows(tokens, seq_len)
        if n < batch_size:
            raise DataError(
                f"The training text has {len(tokens)} tokens: {n} windows of seq_len + 1 = "
                f"{seq_len + 1}, fewer than one batch of {batch_size}. It needs at least "
                f"{batch_size * seq_len + 1} tokens; use more text, a shorter --seq-len or a "
                "smaller --batch-size."
            )
        self.tokens = tokens
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.num_windows = n
        self.batches_per_epoch = n // batch_size
        self.position = DataPosition()
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            self._perm_epoch = epoch
        return self._perm

    def next(self) -> np.ndarray:
        """The batch at the current position; advances the position."""
        epoch, b = self.position.epoch, self.position.batch
        perm = self._permutation(epoch)
        size, per_epoch = self.batch_size, self.batches_per_epoch
        batch = _window_batch(self.tokens, self.seq_len, perm[b * size : (b + 1) * size])
        b += 1
        self.position = DataPosition(epoch + (b == per_epoch), b % per_epoch)
        return batch


class DataStream:
    """Training batches for each step, with the run's faults applied, and a restorable state.

    The state (:meth:`state` / :meth:`restore`) is the :class:`DataPosition` plus the PCG64
    state of the data RNG that draws corrupted tokens; both go into every checkpoint.
    """

    def __init__(self, batches: Batches, faults: FaultConfig, *, vocab_size: int, seed: int):
        self.batches = batches
        self.faults = faults
        self.vocab_size = vocab_size
        self.rng = np.random.Generator(np.random.PCG64(seed))

    def batch(self, step: int) -> np.ndarray:
        """The batch of ``step`` (steps count from 1); call once per step, in order."""
        batch = self.batches.next()
        if self.faults.corrupted(step):
            batch = self.rng.integers(0, self.vocab_size, size=batch.shape, dtype=np.int32)
        return batch

    def state(self) -> dict[str, Any]:
        return {"position": self.batches.position.to_dict(), "rng": self.rng.bit_generator.state}

    def restore(self, state: dict[str, Any]) -> None:
        self.batches.position = DataPosition.from_dict(state["position"])
        self.rng.bit_generator.state = state["rng"]


def eval_set(tokens: np.ndarray, *, seq_len: int, batch_size: int, num_batches: int) -> np.ndarray:
    """The fixed evaluation set: the first windows of the evaluation text, in order.

    Returns:
      int32 ``[n, batch_size, seq_len + 1]`` with ``n = min(num_batches, available)`` ≥ 1.
    """
    n = min(num_batches, windows(tokens, seq_len) // batch_size)
    if n < 1:
        raise DataError(
            f"The evaluation text has {len(tokens)} tokens, fewer than one batch of "
            f"{batch_size} windows of {seq_len + 1}; it needs at least {batch_size * seq_len + 1}."
        )
    idx = np.arange(n * batch_size)
    return _window_batch(tokens, seq_len, idx).reshape(n, batch_size, seq_len + 1)
