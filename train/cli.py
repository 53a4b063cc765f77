"""``lbw-train``: train a decoder from the command line (``python -m train.cli`` works too)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
from typing import Any, NoReturn

from train.config import FaultConfig, TrainConfig, UserError

_DEFAULTS = TrainConfig()
_FAULT_DEFAULTS = FaultConfig()

EPILOG = """\
data sources (--data):
  wikitext2     the WikiText-2 sample shipped with this package (offline default):
                trains on its validation split and evaluates on its test split
  wikitext103   Hugging Face Salesforce/wikitext, wikitext-103-raw-v1 (train / validation);
                needs the Hub or a datasets cache
  hf:NAME[:CONFIG]  any Hugging Face dataset with a text column (--text-field)
  files         local text files: --train-files A.txt B.txt --eval-files C.txt
  tfds:NAME     a TFDS dataset through tfds.data_source (pip install 'lbw-optax[tfds]')

files written to --out-dir:
  metrics.jsonl   one JSON line per log interval ("kind": "train") and per evaluation
                  ("kind": "eval"); see the README for every field
  summary.json    the final summary
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

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def one_line(message: Any) -> str:
    """``message`` on one line (the lines of a multi-line message joined by spaces)."""
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        message = f"expected comma-separated step numbers, got {text!r}"
        raise argparse.ArgumentTypeError(message) from None


def _override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected FIELD=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _mesh(text: str) -> str:
    from train.sharding import parse_mesh

    try:
        parse_mesh(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def build_parser() -> argparse.ArgumentParser:
    from train.optimizers import available_optimizers

    p = ArgumentParser(
        prog="lbw-train",
        description="Train a Qwen2.5/LLaMA-style decoder (full or LoRA) with a governed optimizer, "
        "logging telemetry as JSON lines and saving resumable Orbax checkpoints.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = _DEFAULTS
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        default=d.model,
        help="model preset name (default: %(default)s); the tiny_* presets train on a CPU",
    )
    g.add_argument(
        "--model-override",
        type=_override,
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="replace a field of the preset, e.g. num_layers=2 "
        "(repeatable; VALUE is read as JSON when it parses)",
    )
    g.add_argument(
        "--tokenizer",
        default=d.tokenizer,
        metavar="DIR",
        help="local Hugging Face tokenizer directory (default: the byte-level tokenizer)",
    )
    g.add_argument(
        "--lora-rank",
        type=int,
        default=d.lora_rank,
        help="0 trains every parameter; "
        "r > 0 adds rank-r LoRA adapters and trains only them (default: %(default)s)",
    )
    g.add_argument(
        "--lora-alpha",
        type=float,
        default=d.lora_alpha,
        help="LoRA scale numerator; "
        "the adapter output is scaled by alpha / rank (default: %(default)s)",
    )
    g.add_argument(
        "--lora-targets",
        default=",".join(d.lora_targets),
        help="comma-separated projections that get adapters (default: %(default)s)",
    )

    g.add_argument(
        "--init-from",
        default=d.init_from,
        metavar="DIR",
        help="start from the weights of this Hugging Face-format model directory (e.g. an "
        "earlier run's --export-to) instead of a random initialisation; LoRA adapters go on top",
    )

    g = p.add_argument_group("optimizer")
    g.add_argument(
        "--optimizer",
        default=d.optimizer,
        metavar="NAME",
        help=f"optimizer by name, one of: {', '.join(available_optimizers())} (default: "
        "%(default)s); adamw+clip clips the global norm at --clip-threshold; lbw (over "
        "--inner), lbw+clip and lbw+sgg run under the LBW guard with --policy; prodigy and "
        "dadapt-adamw take --lr as a multiplier of their learned step (1.0 is the authors')",
    )
    g.add_argument(
        "--lr",
        "--learning-rate",
        dest="learning_rate",
        type=float,
        default=d.learning_rate,
        help="peak learning rate (default: %(default)s)",
    )
    g.add_argument(
        "--schedule",
        default=d.schedule,
        choices=("cosine", "constant"),
        help="after the warm-up: cosine decay to --min-lr-ratio × peak at the last "
        "step, or constant (default: %(default)s)",
    )
    g.add_argument(
        "--warmup-steps",
        type=int,
        default=d.warmup_steps,
        help="linear warm-up steps from 0 (default: %(default)s)",
    )
    g.add_argument(
        "--min-lr-ratio",
        type=float,
        default=d.min_lr_ratio,
        help="final cosine learning rate as a fraction of the peak (default: %(default)s)",
    )
    g.add_argument(
        "--weight-decay",
        type=float,
        default=d.weight_decay,
        help="AdamW decoupled weight decay (default: %(default)s)",
    )
    g.add_argument("--b1", type=float, default=d.b1, help="AdamW β1 (default: %(default)s)")
    g.add_argument("--b2", type=float, default=d.b2, help="AdamW β2 (default: %(default)s)")
    g.add_argument("--eps", type=float, default=d.eps, help="AdamW ε (default: %(default)s)")
    g.add_argument(
        "--clip-threshold",
        type=float,
        default=d.clip_threshold,
        help="global-norm threshold of adamw+clip and lbw+clip (default: %(default)s)",
    )
    g.add_argument(
        "--policy",
        default=d.policy,
        choices=("governor", "reference"),
        help="governance policy of lbw, lbw+clip and lbw+sgg (default: %(default)s)",
    )
    g.add_argument(
        "--inner",
        default=d.inner,
        choices=("adamw", "lion", "muon", "adafactor", "sgd"),
        help="the optimizer that --optimizer lbw governs (default: %(default)s)",
    )
    g.add_argument(
        "--optimizer-arg",
        type=_override,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="keyword argument of the optimizer's library factory, e.g. recluster_every=10 "
        "for sgg or s_init=0.01 for mechanic (repeatable; VALUE is read as JSON when it parses)",
    )
    g.add_argument(
        "--peak-lr-in-state",
        action="store_true",
        help="hold the peak learning rate in the optimizer state, not in the compiled step, so "
        "that runs in one process that differ only in it share one compilation",
    )

    g = p.add_argument_group("data")
    g.add_argument("--data", default=d.data, help="data source, see below (default: %(default)s)")
    g.add_argument(
        "--train-files",
        nargs="+",
        default=list(d.train_files),
        metavar="FILE",
        help="training text files for --data files",
    )
    g.add_argument(
        "--eval-files",
        nargs="+",
        default=list(d.eval_files),
        metavar="FILE",
        help="evaluation text files for --data files",
    )
    g.add_argument(
        "--train-split",
        default=d.train_split,
        help="training split of hf:/tfds: sources (default: train)",
    )
    g.add_argument(
        "--eval-split",
        default=d.eval_split,
        help="evaluation split of hf:/tfds: "
        "sources (default: validation, or test when TFDS has no validation split)",
    )
    g.add_argument(
        "--text-field",
        default=d.text_field,
        help="column or feature holding the text (default: %(default)s)",
    )
    g.add_argument(
        "--data-dir", default=d.data_dir, help="datasets/TFDS cache directory (default: theirs)"
    )
    g.add_argument(
        "--seq-len",
        type=int,
        default=d.seq_len,
        help="tokens per training sequence (default: %(default)s)",
    )
    g.add_argument(
        "--batch-size",
        type=int,
        default=d.batch_size,
        help="sequences per step (default: %(default)s)",
    )

    g = p.add_argument_group("run")
    g.add_argument(
        "--steps", type=int, default=d.steps, help="optimizer updates (default: %(default)s)"
    )
    g.add_argument(
        "--seed",
        type=int,
        default=d.seed,
        help="seeds model init, data shuffle and data RNG (default: %(default)s)",
    )
    g.add_argument(
        "--eval-every",
        type=int,
        default=d.eval_every,
        help="evaluate every N steps; always at the end (default: %(default)s, only at the end)",
    )
    g.add_argument(
        "--eval-batches",
        type=int,
        default=d.eval_batches,
        help="batches in the fixed "
        "evaluation set, the first windows of the evaluation text "
        "(default: %(default)s)",
    )
    g.add_argument(
        "--log-every",
        type=int,
        default=d.log_every,
        help="telemetry line every N steps (default: %(default)s)",
    )
    g.add_argument(
        "--out-dir",
        default=d.out_dir,
        help="run directory for metrics.jsonl, "
        "summary.json and checkpoints/ (default: %(default)s)",
    )
    g.add_argument(
        "--export-to",
        default=d.export_to,
        metavar="DIR",
        help="at the end, write the trained model there in Hugging Face format (LoRA merged)",
    )
    g.add_argument(
        "--checkpoint-every",
        type=int,
        default=d.checkpoint_every,
        help="save a checkpoint every N steps and at the end; 0: never (default: %(default)s)",
    )
    g.add_argument(
        "--keep-checkpoints",
        type=int,
        default=d.keep_checkpoints,
        help="keep the last K checkpoints (default: %(default)s)",
    )
    g.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out-dir from its "
        "latest checkpoint (same flags as the original run); a finished run is left as it is",
    )
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh in an --out-dir that holds another run's results (its metrics.jsonl, "
        "summary.json and checkpoints/ are replaced); without it such a folder is refused",
    )
    g.add_argument(
        "--resume-step",
        type=int,
        default=None,
        help="with --resume: continue from "
        "this checkpoint step instead of the latest (later ones are discarded)",
    )
    g.add_argument(
        "--quiet",
        action="store_true",
        help="no progress bar and no messages (the bar is also off when stderr is not a terminal)",
    )

    g = p.add_argument_group("devices (see the README's Scaling out section)")
    g.add_argument(
        "--mesh",
        type=_mesh,
        default=d.mesh,
        metavar="data=D,fsdp=F",
        help="shard over a D×F device mesh: FSDP over 'fsdp', batches over both axes "
        "(default: one device)",
    )
    g.add_argument(
        "--coordinator",
        default=None,
        metavar="HOST:PORT",
        help="multi-process run: address of process 0's coordinator (or JAX_COORDINATOR_ADDRESS)",
    )
    g.add_argument(
        "--num-processes",
        type=int,
        default=None,
        help="multi-process run: number of processes (or JAX_NUM_PROCESSES)",
    )
    g.add_argument(
        "--process-id",
        type=int,
        default=None,
        help="multi-process run: this process's id, 0 to N-1 (or JAX_PROCESS_ID)",
    )

    f = _FAULT_DEFAULTS
    g = p.add_argument_group("fault injection (steps count from 1)")
    g.add_argument(
        "--grad-spike-steps",
        type=_ints,
        default=(),
        metavar="K1,K2",
        help="multiply the gradients by --grad-spike-factor at these steps",
    )
    g.add_argument(
        "--grad-spike-factor",
        type=float,
        default=f.grad_spike_factor,
        help="gradient spike factor (default: %(default)s)",
    )
    g.add_argument(
        "--nan-loss-steps",
        type=_ints,
        default=(),
        metavar="K1,K2",
        help="make the loss (and so the gradients) NaN at these steps",
    )
    g.add_argument(
        "--nan-grad-steps",
        type=_ints,
        default=(),
        metavar="K1,K2",
        help="make the gradients NaN at these steps (the loss stays finite)",
    )
    g.add_argument(
        "--corrupt-start",
        type=int,
        default=None,
        metavar="K",
        help="first step of a burst of corrupted batches (random tokens)",
    )
    g.add_argument(
        "--corrupt-steps",
        type=int,
        default=f.corrupt_steps,
        metavar="N",
        help="length of the corrupted burst (default: %(default)s)",
    )
    g.add_argument(
        "--lr-shock-start",
        type=int,
        default=None,
        metavar="K",
        help="first step of a learning-rate shock",
    )
    g.add_argument(
        "--lr-shock-steps",
        type=int,
        default=f.lr_shock_steps,
        metavar="N",
        help="length of the learning-rate shock (default: %(default)s)",
    )
    g.add_argument(
        "--lr-shock-factor",
        type=float,
        default=f.lr_shock_factor,
        help="learning-rate shock factor (default: %(default)s)",
    )
    return p


_FAULT_FIELDS = {f.name for f in dataclasses.fields(FaultConfig)}


# Flags of the process launch, not of the run (so not part of the config).
_DISTRIBUTED_FIELDS = ("coordinator", "num_processes", "process_id")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` of parsed arguments."""
    values = vars(args).copy()
    for name in _DISTRIBUTED_FIELDS:
        values.pop(name, None)
    faults = FaultConfig(**{k: values.pop(k) for k in _FAULT_FIELDS})
    values["model_overrides"] = dict(values.pop("model_override"))
    values["optimizer_args"] = dict(values.pop("optimizer_arg"))
    values["lora_targets"] = tuple(t for t in values["lora_targets"].split(",") if t)
    return TrainConfig(faults=faults, **values)


def _resume_command(argv: list[str]) -> str:
    args = [a for a in argv if a not in ("--resume", "--overwrite")]
    return shlex.join(["lbw-train", *args, "--resume"])


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``lbw-train``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except (TypeError, ValueError) as e:
        parser.error(str(e))

    from train.loop import check_config

    try:
        check_config(config)
    except UserError as e:
        parser.error(str(e))

    from train.sharding import initialize_distributed

    try:  # Before JAX touches a device.
        initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    except ValueError as e:
        parser.error(str(e))

    from train.checkpoint import has_checkpoints
    from train.loop import Interrupted, NonFiniteError, train

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
    if not config.quiet:
        keys = ("status", "step", "loss", "eval_loss", "eval_perplexity", "tokens_per_s")
        print(json.dumps({k: summary.get(k) for k in keys}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
