"""``lbw-train``: train a decoder from the command line (``python -m lbw.train.cli`` works too)."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import re
import shlex
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

from lbw.train.config import TrainConfig, UserError
from lbw.train.interrupts import Sigint, handling_sigint

# The only flags not named after their field (the first name is the one ``--help`` shows).
ALIASES = {
    "learning_rate": ("--lr", "--learning-rate"),
    "model_overrides": ("--model-override", "--model-overrides"),
    "optimizer_args": ("--optimizer-arg", "--optimizer-args"),
}

# Flags of the process launch, not of the run (so not part of the config).
_LAUNCH_FLAGS = {
    "--coordinator": (str, "HOST:PORT", "process 0's coordinator (or JAX_COORDINATOR_ADDRESS)"),
    "--num-processes": (int, "N", "number of processes (or JAX_NUM_PROCESSES)"),
    "--process-id": (int, "ID", "this process's id, 0 to N-1 (or JAX_PROCESS_ID)"),
}

EPILOG = """\
optimizers (--optimizer): adamw+clip clips the global norm at --clip-threshold; lbw, lbw+clip
  and lbw+sgg run under the LBW guard with --policy

data sources (--data):
  wikitext2     the WikiText-2 sample shipped with this package (offline default):
                trains on its validation split and evaluates on its test split
  wikitext103   Hugging Face Salesforce/wikitext, wikitext-103-raw-v1 (train / validation);
                needs the Hub or a datasets cache
  hf:NAME[:CONFIG]  any Hugging Face dataset with a text column (--text-field)
  files         local text files: --train-files A.txt B.txt --eval-files C.txt
  tfds:NAME     a TFDS dataset through tfds.data_source (pip install 'lbw-optax[tfds]')
  tokens:DIR    token files DIR/train.bin and DIR/val.bin (nanoGPT's layout, memory-mapped);
                'lbw-train tokenize TEXT DIR [--tokenizer T]' makes them from a text file

files written to --out-dir:
  metrics.jsonl   one JSON line per log interval ("kind": "train") and per evaluation
                  ("kind": "eval"); see docs/training.md for every field
  summary.json    the final summary
  events.out.tfevents.*  TensorBoard event files (not with --no-tensorboard)
  checkpoints/    Orbax checkpoints (with --checkpoint-every)

errors: a bad flag, a data file that is missing, empty, binary or not UTF-8, an --out-dir that
is a file or holds another run's results, a --resume without a checkpoint: one line
"lbw-train: error: ..." naming what to fix, and nothing written. Ctrl-C stops the run between
two steps, saves a checkpoint (with --checkpoint-every) and prints the command that resumes it.

non-finite loss: with a guarded optimizer (lbw, lbw+clip, lbw+sgg, skip-step, apply-if-finite)
the step is held and training goes on;
otherwise the run stops at the next log interval or checkpoint with exit status 3 and a
message naming the first non-finite step.

exit status: 0 done (or --resume of a finished run: nothing to do), 1 error (data, checkpoint,
output folder), 2 bad arguments, 3 non-finite loss, 130 interrupted (Ctrl-C).
"""


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line, ``prog: error: ...`` (pointing to
    ``--help`` instead of printing the usage), with exit status 2."""

    context = ""  # Said before each error (the config file being read).

    def error(self, message: str) -> NoReturn:
        text = f"{self.context}{one_line(message)}"
        self.exit(2, f"{self.prog}: error: {text} (see {self.prog} --help)\n")


def one_line(message: Any) -> str:
    """``message`` on one line (the lines of a multi-line message joined by spaces)."""
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def field_docs(cls: type) -> dict[str, tuple[str, str]]:
    """``{field: (section, text)}`` from the Google-style docstrings of ``cls`` and its bases:
    a section is a line ``Title:``, an entry ``  name: text`` (or ``  a, b: text`` for several
    fields) continued by more indented lines."""
    docs: dict[str, tuple[str, str]] = {}
    for klass in reversed(cls.__mro__):
        section, entries, text = None, [], []
        for line in inspect.cleandoc(klass.__doc__ or "").splitlines():
            entry = re.fullmatch(r"  (\w+(?:, \w+)*): (.*)", line)
            if line and not line[0].isspace():
                section = line[:-1] if line.endswith(":") else None
            elif section and entry:
                text = [entry[2]]
                entries.extend((name, section, text) for name in entry[1].split(", "))
            elif section and line.startswith("    ") and text:
                text.append(line.strip())
        for name, section, text in entries:
            docs[name] = (section, " ".join(text))
    return docs


def _plain(text: str, flags: dict[str, str]) -> str:
    """``text`` without Sphinx markup, a quoted field name written as its flag."""
    text = re.sub(r":\w+:`~?([^`]+)`", r"\1", text)
    text = re.sub(r"``([^`]+)``", lambda m: flags.get(m[1], m[1]), text)
    return text.replace("%", "%%")  # argparse formats help strings with %.


def _unwrap(hint: Any) -> Any:
    """``X`` for ``X | None``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def _items(kind: type):
    def parse(text: str) -> tuple[Any, ...]:
        return tuple(kind(item) for item in text.split(",") if item.strip())

    parse.__name__ = kind.__name__  # Named in argparse's "invalid int value" errors.
    return parse


def _key_value(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _show(value: Any) -> str:
    if isinstance(value, tuple | list):
        return ",".join(map(str, value))
    return str(value)


def _flag(name: str) -> str:
    return ALIASES.get(name, ("--" + name.replace("_", "-"),))[0]


def _add_fields(
    parser: argparse.ArgumentParser,
    cls: type,
    group: Any = None,
    choices: Mapping[str, Sequence[str]] | None = None,
) -> None:
    """Adds one flag per field of the dataclass ``cls`` to ``group``, or else to the argument
    group of the field's docstring section; the fields of a nested dataclass go to a group
    named by its docstring's summary. ``choices`` lists the values a field takes from an open
    registry (its help lists them; a bad one is refused when the config is checked)."""
    docs, hints, groups = field_docs(cls), typing.get_type_hints(cls), {}
    choices = choices or {}
    flags = {name: _flag(name) for name in hints}
    for field in dataclasses.fields(cls):
        hint = _unwrap(hints[field.name])
        if dataclasses.is_dataclass(hint):
            summary = inspect.cleandoc(hint.__doc__ or hint.__name__).splitlines()[0]
            title = summary[0].lower() + summary[1:].rstrip(".")
            _add_fields(parser, hint, parser.add_argument_group(title), choices)
            continue
        section, text = docs.get(field.name, ("", ""))
        if group is None and section not in groups:
            groups[section] = parser.add_argument_group(section.lower() or None)
        default = field.default_factory() if field.default is dataclasses.MISSING else field.default
        kwargs: dict[str, Any] = {"dest": field.name, "default": default}
        text = _plain(text, flags).rstrip(".")
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin is typing.Literal:
            kwargs.update(type=type(args[0]), choices=args)
        elif origin is tuple:
            kwargs.update(type=_items(args[0]), nargs="+", metavar=args[0].__name__.upper())
            text += "; one or more, separated by spaces or commas"
        elif origin is dict:
            kwargs.update(type=_key_value, action="append", default=None, metavar="KEY=VALUE")
            text += "; repeatable, VALUE is read as JSON when it parses"
        else:
            kwargs["type"] = hint
        if field.name in choices:
            text += f"; one of: {', '.join(choices[field.name])}"
        if hint is bool:
            text += " (default: %(default)s)"
        elif default not in (None, "", (), {}):
            text += f" (default: {_show(default)})".replace("%", "%%")
        names = ALIASES.get(field.name, (flags[field.name],))
        (group or groups[section]).add_argument(*names, help=text, **kwargs)


def build_parser(config: type = TrainConfig) -> argparse.ArgumentParser:
    """The parser of ``lbw-train``: one flag per field of ``config`` (a dataclass like
    :class:`~train.config.TrainConfig`; nested dataclasses such as ``faults`` flattened), with
    the help text of the field's docstring entry and the type, choices and default of its
    annotation; plus the flags of a multi-process launch."""
    from lbw.train.optimizers import available_optimizers

    p = ArgumentParser(
        prog="lbw-train",
        description="Train a Qwen2.5/LLaMA-style decoder (full or LoRA) with a governed optimizer, "
        "logging telemetry as JSON lines and saving resumable Orbax checkpoints.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--config",
        metavar="FILE",
        help="a TOML file (or YAML: .yaml, .yml) that gives flags of the run: each key is a "
        "flag's name without -- (seq-len = 256, lr = 3e-4, model-override = {num_layers = 2}); "
        "flags on the command line override it",
    )
    _add_fields(p, config, choices={"optimizer": available_optimizers()})
    g = p.add_argument_group("multi-process run (see docs/scaling.md)")
    for flag, (kind, metavar, text) in _LAUNCH_FLAGS.items():
        g.add_argument(flag, type=kind, metavar=metavar, help=text)
    return p


def config_from_args(args: argparse.Namespace, config: type = TrainConfig) -> Any:
    """The ``config`` (by default a :class:`TrainConfig`) of arguments parsed by
    :func:`build_parser`."""
    values, hints, kwargs = vars(args), typing.get_type_hints(config), {}
    for field in dataclasses.fields(config):
        hint, value = _unwrap(hints[field.name]), values.get(field.name)
        if dataclasses.is_dataclass(hint):
            value = config_from_args(args, hint)
        elif typing.get_origin(hint) is tuple and isinstance(value, list):
            value = tuple(item for items in value for item in items)
        elif typing.get_origin(hint) is dict:
            value = field.default_factory() if value is None else dict(value)
        kwargs[field.name] = value
    return config(**kwargs)


def _field_names(cls: type) -> set[str]:
    """The fields of the dataclass ``cls`` that are flags (a nested dataclass's own fields)."""
    hints, names = typing.get_type_hints(cls), set()
    for field in dataclasses.fields(cls):
        hint = _unwrap(hints[field.name])
        names |= _field_names(hint) if dataclasses.is_dataclass(hint) else {field.name}
    return names


def field_flags(parser: argparse.ArgumentParser, config: type = TrainConfig) -> dict[str, Any]:
    """Flag name without ``--`` → its ``argparse`` action, for every flag of a field of
    ``config`` (nested dataclasses included), under each of its names."""
    fields = _field_names(config)
    return {
        name[2:]: action
        for action in parser._actions
        if action.dest in fields
        for name in action.option_strings
        if not name.startswith("--no-")
    }


def _file_tokens(key: str, value: Any, action: argparse.Action) -> list[str]:
    """The command-line tokens that set ``--key`` to a config file's ``value``."""
    flag = f"--{key}"
    if value is None:
        raise ValueError(f"{key} is empty (null); leave it out to keep the default")
    if isinstance(action, argparse.BooleanOptionalAction):
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false, got {value!r}")
        return [flag if value else f"--no-{key}"]
    if action.nargs == "+":
        items = value if isinstance(value, list) else [value]
        return [f"{flag}={','.join(map(str, items))}"]
    if isinstance(action, argparse._AppendAction):
        if not isinstance(value, dict):
            raise ValueError(f"{key} must be a table of KEY = VALUE, got {value!r}")
        return [f"{flag}={k}={json.dumps(v)}" for k, v in value.items()]
    if isinstance(value, dict | list):
        raise ValueError(f"{key} takes one value, got {value!r}")
    return [f"{flag}={value}"]


def config_file_tokens(path: str, parser: argparse.ArgumentParser) -> list[str]:
    """The command-line tokens equivalent to the config file ``path``: TOML (read with
    ``tomllib``), or YAML for a ``.yaml``/``.yml`` name; a table whose keys are flag names
    without ``--`` and whose values are a flag's value (a list for a flag of several values, a
    table for ``model-override``/``optimizer-arg``, true/false for a switch).

    Raises:
      UserError: for an unreadable file, an unknown key (the closest flag is suggested) or a
        value of the wrong kind.
    """
    import difflib

    where = f"--config {path}"
    try:
        text = Path(path).read_bytes()
        if Path(path).suffix in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text) or {}
        else:
            import tomllib

            values = tomllib.loads(text.decode("utf-8"))
    except OSError as e:
        raise UserError(f"{where}: cannot read it ({e.strerror}).") from None
    except Exception as e:  # tomllib.TOMLDecodeError, yaml.YAMLError, UnicodeDecodeError.
        raise UserError(f"{where}: not valid TOML/YAML: {one_line(e)}") from None
    if not isinstance(values, dict):
        raise UserError(f"{where}: expected a table of flag = value, got {values!r}.")
    flags = field_flags(parser)
    tokens = []
    for key, value in values.items():
        if key not in flags:
            close = difflib.get_close_matches(str(key), flags, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UserError(
                f"{where}: unknown key {key!r}{hint} (keys are lbw-train's flags without --)"
            )
        try:
            tokens += _file_tokens(key, value, flags[key])
        except ValueError as e:
            raise UserError(f"{where}: {e}.") from None
    return tokens


def parse_config(argv: list[str]) -> tuple[ArgumentParser, argparse.Namespace, TrainConfig]:
    """The parser, the parsed arguments and the :class:`TrainConfig` of ``lbw-train``'s flags
    ``argv``, with ``--config FILE`` read first (:func:`config_file_tokens`) and the command
    line's flags over it. Exits with status 2 and one line for a bad flag, file or value."""
    parser = build_parser()
    path = parser.parse_known_args(argv)[0].config
    tokens = []
    if path is not None:
        try:
            tokens = config_file_tokens(path, parser)
        except UserError as e:
            parser.error(str(e))
        parser.context = f"--config {path}: "
        parser.parse_args(tokens)  # The file's values alone, so that an error names the file.
        parser.context = ""
    args = parser.parse_args([*tokens, *argv])
    try:
        return parser, args, config_from_args(args)
    except (TypeError, ValueError) as e:
        parser.error(str(e))


def _resume_command(argv: list[str]) -> str:
    args = [a for a in argv if a not in ("--resume", "--overwrite")]
    return shlex.join(["lbw-train", *args, "--resume"])


def tokenize_main(argv: list[str]) -> int:
    """``lbw-train tokenize TEXT OUT``: a text file to the token folder ``--data tokens:OUT``
    reads (:func:`train.token_files.write_token_files`); returns the exit status."""
    p = ArgumentParser(
        prog="lbw-train tokenize",
        description="Tokenize a UTF-8 text file into OUT/train.bin and OUT/val.bin (raw "
        "little-endian token ids, nanoGPT's layout) and OUT/meta.json, for --data tokens:OUT.",
    )
    p.add_argument("text", help="a UTF-8 text file")
    p.add_argument("out", help="the token folder to write (created if missing)")
    p.add_argument(
        "--tokenizer",
        default=None,
        help="a local Hugging Face tokenizer directory (default: the byte-level tokenizer); "
        "train with the same --tokenizer",
    )
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="the fraction of the tokens, at the end, that goes to val.bin (default: %(default)s)",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace the token files of an existing OUT"
    )
    args = p.parse_args(argv)
    from lbw.train.token_files import META_NAME, TOKEN_FILES, write_token_files

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        p.error(f"{args.out!r} is a file; give a folder")
    there = [n for n in (*TOKEN_FILES.values(), META_NAME) if (out / n).exists()]
    if there and not args.overwrite:
        p.error(f"{args.out!r} already holds {', '.join(there)}; pass --overwrite to replace them")
    from lbw.models import load_tokenizer

    try:
        tokenizer = load_tokenizer(args.tokenizer)
        meta = write_token_files(
            args.text,
            out,
            tokenizer,
            tokenizer_name=args.tokenizer or "byte-level",
            val_fraction=args.val_fraction,
        )
    except (UserError, ValueError, FileNotFoundError, OSError) as e:
        print(f"lbw-train tokenize: error: {one_line(e)}", file=sys.stderr)
        return 1
    print(json.dumps({"out": str(out), **meta}))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``lbw-train``; returns the exit status.

    Ctrl-C at any moment, from the first import of JAX on, ends it with status 130 and one
    line on stderr (see :mod:`train.interrupts`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    with handling_sigint() as sigint:
        try:
            if argv and argv[0] == "tokenize":
                return tokenize_main(argv[1:])
            return _train_main(argv, sigint)
        except KeyboardInterrupt:
            print("lbw-train: interrupted", file=sys.stderr)
            return 130


def stress_main(argv: list[str] | None = None) -> int:
    """Entry point of ``lbw-stress``; returns the exit status.

    The stress package imports JAX, Flax and Matplotlib when it loads, so the entry point is
    here, in a module that imports none of them: a Ctrl-C while they import ends it with status
    130 and one line, as for ``lbw-train``."""
    with handling_sigint():
        try:
            from lbw.train.stress.cli import main as stress

            return stress(argv)
        except KeyboardInterrupt:
            print("lbw-stress: interrupted", file=sys.stderr)
            return 130


def _train_main(argv: list[str], sigint: Sigint) -> int:
    """``lbw-train`` with the flags ``argv``; a Ctrl-C during training says how to resume."""
    parser, args, config = parse_config(argv)
    sigint.check()  # JAX is imported.

    from lbw.train.setup import check_config

    try:
        check_config(config)
    except UserError as e:
        parser.error(str(e))

    from lbw.train.sharding import initialize_distributed

    try:  # Before JAX touches a device.
        initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    except ValueError as e:
        parser.error(str(e))
    sigint.check()

    from lbw.train.checkpoint import has_checkpoints
    from lbw.train.loop import Interrupted, NonFiniteError, train

    def fail(message: Any, status: int) -> int:
        print(f"lbw-train: error: {one_line(message)}", file=sys.stderr)
        return status

    try:
        summary = train(config)
    except NonFiniteError as e:
        return fail(e, 3)
    except (UserError, ValueError, FileNotFoundError) as e:
        return fail(e, 1)
    except KeyboardInterrupt as e:
        resumable = (
            e.checkpoint
            if isinstance(e, Interrupted)
            else has_checkpoints(f"{config.out_dir}/checkpoints")
        )
        what = str(e) if isinstance(e, Interrupted) else "interrupted"
        hint = f"; resume with: {_resume_command(argv)}" if resumable else ""
        print(f"lbw-train: {what}{hint}", file=sys.stderr)
        return 130
    keys = ("status", "step", "loss", "eval_loss", "eval_perplexity", "tokens_per_s")
    print(json.dumps({k: summary.get(k) for k in keys}))  # Even with --quiet: the result.
    return 0


if __name__ == "__main__":
    sys.exit(main())
