"""``--data tokens:DIR`` (memory-mapped token files, nanoGPT's layout) and the converter
``lbw-train tokenize TEXT DIR``."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lbw import models
from lbw.train import DataError, TrainConfig
from lbw.train.cli import main
from lbw.train.data import load_tokens
from lbw.train.token_files import read_token_files
from tests.train_helpers import TINY_FLAGS, train_losses

FLAGS = ["--seq-len=32", "--batch-size=4", "--eval-batches=2", "--log-every=1", "--quiet"]
TEXT = "Il était une fois un café où l'on parlait de tokens.\n" * 60


def _run(capsys, args) -> tuple[int, str, list[str]]:
    try:
        status = main(args)
    except SystemExit as e:
        status = e.code
    out, err = capsys.readouterr()
    return status, out, err.splitlines()


@pytest.mark.slow  # Compiles several programs: .ci/run runs it with -m slow.
def test_tokenize_then_train_on_the_token_files(tmp_path, capsys):
    text = tmp_path / "corpus.txt"
    text.write_text(TEXT, encoding="utf-8")
    out = tmp_path / "tokens"
    status, stdout, err = _run(capsys, ["tokenize", str(text), str(out)])
    assert status == 0, err
    ids = np.frombuffer(TEXT.encode("utf-8"), np.uint8)  # Byte-level: the ids are the bytes.
    cut = round(len(ids) * 0.9)
    np.testing.assert_array_equal(np.fromfile(out / "train.bin", "<u2"), ids[:cut])
    np.testing.assert_array_equal(np.fromfile(out / "val.bin", "<u2"), ids[cut:])
    meta = json.loads((out / "meta.json").read_text())
    assert meta == {
        "dtype": "uint16",
        "vocab_size": models.ByteTokenizer.vocab_size,
        "tokenizer": "byte-level",
        "train_tokens": cut,
        "val_tokens": len(ids) - cut,
    }
    assert json.loads(stdout)["train_tokens"] == cut

    splits = load_tokens(TrainConfig(data=f"tokens:{out}"), models.ByteTokenizer())
    assert isinstance(splits.train, np.memmap) and isinstance(splits.eval, np.memmap)
    run = tmp_path / "run"
    args = [*FLAGS, *TINY_FLAGS, "--steps=3", f"--data=tokens:{out}", f"--out-dir={run}"]
    status, _, err = _run(capsys, args)
    assert status == 0, err
    assert sorted(train_losses(run / "metrics.jsonl")) == [1, 2, 3]
    assert "token files" in json.loads((run / "summary.json").read_text())["data"]

    # The converter does not overwrite a token folder without --overwrite.
    status, _, err = _run(capsys, ["tokenize", str(text), str(out)])
    assert status == 2 and "--overwrite" in err[0] and len(err) == 1
    assert _run(capsys, ["tokenize", str(text), str(out), "--overwrite"])[0] == 0


def test_uint32_from_meta_and_uint16_without_it(tmp_path):
    ids = np.arange(1000, dtype=np.uint32) % 259
    (tmp_path / "train.bin").write_bytes(ids.astype("<u4").tobytes())
    (tmp_path / "val.bin").write_bytes(ids[:100].astype("<u4").tobytes())
    (tmp_path / "meta.json").write_text(json.dumps({"dtype": "uint32"}))
    splits = read_token_files(tmp_path, vocab_size=259)
    assert splits.train.dtype == np.dtype("<u4")
    np.testing.assert_array_equal(splits.train, ids)
    (tmp_path / "meta.json").unlink()  # nanoGPT's files have none: uint16.
    (tmp_path / "train.bin").write_bytes(ids.astype("<u2").tobytes())
    (tmp_path / "val.bin").write_bytes(ids[:100].astype("<u2").tobytes())
    np.testing.assert_array_equal(read_token_files(tmp_path, vocab_size=259).train, ids)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("no-folder", "no such folder"),
        ("no-val", "val.bin"),
        ("odd-bytes", "not a whole"),
        ("id-too-large", "token id 300"),
        ("other-vocab", "vocabulary of 50257"),
        ("bad-dtype", "dtype"),
    ],
)
def test_bad_token_folders_are_one_line_errors(tmp_path, capsys, case, message):
    folder = tmp_path / "tokens"
    if case != "no-folder":
        folder.mkdir()
        ids = np.arange(2000, dtype="<u2") % 250
        if case == "id-too-large":
            ids[1500] = 300
        (folder / "train.bin").write_bytes(ids.tobytes() + (b"\0" if case == "odd-bytes" else b""))
        if case != "no-val":
            (folder / "val.bin").write_bytes(ids[:500].tobytes())
        if case in ("other-vocab", "bad-dtype"):
            meta = {"vocab_size": 50257} if case == "other-vocab" else {"dtype": "int8"}
            (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=message):
        read_token_files(folder, vocab_size=259)
    run = tmp_path / "run"
    args = [*FLAGS, *TINY_FLAGS, "--steps=1", f"--data=tokens:{folder}", f"--out-dir={run}"]
    status, _, err = _run(capsys, args)
    assert status == 1 and len(err) == 1 and err[0].startswith("lbw-train: error: "), err
    assert message in err[0]
    assert not run.exists()


def test_tokenize_refuses_bad_input(tmp_path, capsys):
    missing = tmp_path / "missing.txt"
    status, _, err = _run(capsys, ["tokenize", str(missing), str(tmp_path / "out")])
    assert status == 1 and len(err) == 1 and str(missing) in err[0]
    text = tmp_path / "a.txt"
    text.write_text(TEXT)
    status, _, err = _run(capsys, ["tokenize", str(text), str(tmp_path / "o"), "--val-fraction=1"])
    assert status == 1 and "--val-fraction" in err[0]
    assert not (tmp_path / "out").exists()
