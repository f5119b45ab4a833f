"""``python -m bench [--only NAME[,NAME]] [--quick] [--repeats N] [--out PATH] [--param NAME=VALUE ...]``

Runs the registered benchmarks, prints a Markdown table of figures with their references, ratios and
targets, and writes the full record (machine, min/median/max of every figure) as JSON.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from datetime import datetime

from bench import registry, report


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n", 1)[1])
    p.add_argument("--only", default="", help="comma-separated benchmark names or bench modules (default: all)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the machinery, not the machine")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per figure (default 5, --quick 2)")
    p.add_argument(
        "--out",
        default=None,
        help="results directory (default bench/results: <timestamp>.json + latest.json) or a .json file",
    )
    p.add_argument("--list", action="store_true", help="list the registered benchmarks and exit")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="a setting an entry reads (e.g. threshold=0.75 for bigan_time_to_accuracy); repeatable")
    args = p.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        p.error("--repeats must be >= 1")
    if any("=" not in kv for kv in args.param):
        p.error("--param takes NAME=VALUE")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    entries = registry.load_all()
    if args.list:
        print("\n".join(entries))
        return 0
    only = [n.strip() for n in args.only.split(",") if n.strip()]
    try:
        entries = registry.select(entries, only)
    except KeyError as err:
        print(f"error: {err.args[0]}", file=sys.stderr)
        return 2
    ctx = registry.Context(quick=args.quick, repeats=args.repeats or (2 if args.quick else 5),
                           params=dict(kv.split("=", 1) for kv in args.param))

    started = datetime.now().astimezone()
    machine = report.machine_info()
    figures: list[registry.Figure] = []
    errors: dict[str, str] = {}
    seconds: dict[str, float] = {}
    for name, fn in entries.items():
        print(f"[bench] {name} ({'quick, ' if ctx.quick else ''}{ctx.repeats} repeats)", file=sys.stderr)
        t0 = time.perf_counter()
        try:
            for f in fn(ctx):
                f.benchmark = name
                figures.append(f)
        except Exception as err:  # one broken entry must not hide the others' figures
            traceback.print_exc()
            errors[name] = f"{type(err).__name__}: {err}".splitlines()[0]
        seconds[name] = time.perf_counter() - t0
    machine["load_average_end"] = report.machine_info()["load_average"]

    payload = {
        "started": started.isoformat(timespec="seconds"),
        "argv": sys.argv[1:] if argv is None else list(argv),
        "quick": ctx.quick,
        "repeats": ctx.repeats,
        "machine": machine,
        "benchmarks": {n: {"seconds": seconds[n], "error": errors.get(n)} for n in entries},
        "figures": [f.as_dict() for f in figures],
    }
    paths = report.write_json(payload, args.out)
    m, sizes = machine, "quick sizes" if ctx.quick else "full sizes"
    print(f"\n{m['cpu_model']}, {m['cores']} cores, torch {m['versions']['torch']}, {m['torch_threads']} threads")
    print(f"load average {m['load_average'][0]:.1f} at start; {sizes}, {ctx.repeats} repeats\n")
    print(report.table(figures, errors))
    print(f"\nvalue: median [min–max] of {ctx.repeats} repeats; ratio = value median / reference median")
    print("results: " + ", ".join(str(p) for p in paths))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
