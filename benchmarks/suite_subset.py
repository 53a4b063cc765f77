"""Runs part of a stress suite (some settings and methods) as a suite of its own.

Usage::

    python -m benchmarks.suite_subset full --name full-core --settings tiny_qwen2_5_3b \\
        --methods adamw,adamw+clip1,adamw+clip0.5,reference,governor,governor+clip,effective-lr

The subset keeps everything else of the suite (steps, seeds, data, multipliers, faults of the
kept settings); controls need their source method in the list, and ``--faults`` must include
``none``. The report goes to ``--out/--name`` like any suite's, and says which command made it.
For when the whole suite does not fit the time at hand: its parts land one by one.

Run ids do not depend on the suite, so the parts can also build the whole suite in its own
folder (``--name full``, one part after another), and ``lbw-stress full --out results --collect``
then reports every finished run under the whole suite's spec, listing each part's command.
"""

import argparse
import dataclasses

from lbw.train import stress


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("suite", choices=sorted(stress.SUITES))
    parser.add_argument("--name", required=True, help="the subset's name (its folder)")
    parser.add_argument("--settings", required=True, help="comma-separated setting names")
    parser.add_argument("--methods", required=True, help="comma-separated method names")
    parser.add_argument("--faults", default="none", help="comma-separated faults (default: none)")
    parser.add_argument("--out", default="runs")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    spec = stress.SUITES[args.suite]()
    names = args.methods.split(",")
    settings = []
    for name in args.settings.split(","):
        setting = spec.setting(name)
        kept = tuple(m for m in spec.methods_of(setting) if m in names)
        settings.append(dataclasses.replace(setting, methods=kept))
    faults = {f: spec.faults[f] for f in args.faults.split(",")}
    subset = spec.replaced(
        name=args.name,
        description=f"A subset of `{args.suite}`: settings {args.settings}; methods "
        f"{args.methods}; faults {args.faults}. " + spec.description,
        settings=tuple(settings),
        methods=tuple(m for m in spec.methods if m.name in names),
        faults=faults,
        fault_methods=tuple(m for m in spec.fault_methods if m in names),
        multiplier_methods={
            m: tuple(n for n in kept if n in names) for m, kept in spec.multiplier_methods.items()
        },
    )
    stress.run_suite(
        subset,
        args.out,
        workers=args.workers,
        progress=False,
        command="python -m benchmarks.suite_subset " + " ".join(__import__("sys").argv[1:]),
        machine=stress.machine(),
    )


if __name__ == "__main__":
    main()
