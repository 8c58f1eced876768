"""The ``flexmask`` command: ``render``, ``describe`` and ``list`` masks written as expressions;
``tune`` measures ``auto``'s CPU thresholds (sparse path, flex, dense SDPA) on this machine.

Exit status 0 on success, 2 for bad arguments, a bad expression, work too large for the memory or
an output path that cannot be written: a one-line message on stderr (after the subcommand's usage
for argument errors), never a traceback.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from collections.abc import Sequence

import torch

from . import __version__, tuning
from .diagnose import check, describe
from .expr import FACTORIES, parse_mask
from .viz import save_mask_png

EAGER_LIMIT = 2**24  # (q, kv) pairs up to which describe builds its BlockMask eagerly


def main(argv: Sequence[str] | None = None) -> int:
    parser, commands = _parser()
    args, extra = parser.parse_known_args(argv)  # exits with status 2 on bad arguments
    if extra:  # the subcommand's own usage, not the top level's
        commands[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        args.run(args)
    except (ValueError, TypeError, OSError, RecursionError, MemoryError) as err:
        print(f"flexmask {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    return 0


def _one_line(err: BaseException) -> str:
    if isinstance(err, OSError) and err.filename is not None:
        return f"cannot write {err.filename}: {err.strerror or err}"
    if isinstance(err, RecursionError):
        return "the expression is nested too deeply"
    if isinstance(err, MemoryError):
        return "out of memory; use shorter lengths"
    text = getattr(err, "summary", None) or str(err)
    return " ".join(text.split())


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(
        prog="flexmask",
        description="Draw and describe attention masks written as flexmask expressions.",
        epilog="EXPR is what repr(mask) prints, e.g. "
        '"(sliding_window(256) | prefix_lm(64)) & padding(lengths=[900, 4096])"; '
        "`flexmask list` shows the factories.",
    )
    parser.add_argument("--version", action="version", version=f"flexmask {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    render = sub.add_parser("render", help="write a PNG of a mask with its BlockMask blocks")
    _problem_args(render)
    render.add_argument("--batch", type=int, default=0, help="batch row to draw (default 0)")
    render.add_argument("--head", type=int, default=0, help="head to draw (default 0)")
    render.add_argument("--no-blocks", action="store_true", help="leave out the block overlay")
    render.add_argument("--title", help="picture title (default: the expression)")
    render.add_argument("-o", "--output", required=True, help="the PNG file to write")
    render.set_defaults(run=_render)

    desc = sub.add_parser("describe", help="print densities, block counts, memory and problems")
    _problem_args(desc)
    desc.set_defaults(run=_describe)

    listing = sub.add_parser("list", help="print every factory with its meaning")
    listing.set_defaults(run=_list)

    tune = sub.add_parser("tune", help="measure auto's CPU thresholds (sparse, flex, dense) here")
    tune.add_argument(
        "--show", action="store_true", help="print what was measured; measure nothing"
    )
    tune.add_argument(
        "--dtype", action="append", choices=["float32", "bfloat16", "float16"],
        help="a dtype to measure (repeatable; default: float32 and bfloat16)",
    )  # fmt: skip
    tune.set_defaults(run=_tune)
    return parser, {"render": render, "describe": desc, "list": listing, "tune": tune}


def _problem_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("expr", metavar="EXPR", help="the mask, e.g. 'causal() & padding([900, 4096])'")
    p.add_argument("--q-len", type=int, required=True, help="number of queries")
    p.add_argument("--kv-len", type=int, help="number of keys (default: --q-len)")
    p.add_argument("--block-size", type=int, default=128, help="BlockMask block size (128)")


def _render(args: argparse.Namespace) -> None:
    mask = parse_mask(args.expr)
    out = save_mask_png(mask, args.output, args.q_len, args.kv_len, batch=args.batch,
                        head=args.head, block_size=args.block_size,
                        show_blocks=not args.no_blocks, title=args.title)  # fmt: skip
    print(out)


def _describe(args: argparse.Namespace) -> None:
    mask = parse_mask(args.expr)
    kv_len = args.kv_len or args.q_len
    # Eager building materialises q x kv; past a few million pairs the compiled builder is faster.
    compile = isinstance(args.q_len, int) and args.q_len * kv_len > EAGER_LIMIT
    kw = {"block_size": args.block_size, "device": "cpu", "compile": compile}
    print(describe(mask, args.q_len, args.kv_len, **kw))
    problems = check(mask, args.q_len, args.kv_len, **kw)
    if not problems:
        print("check: no problems found")
    for problem in problems:
        print(f"check: {problem}")


def _list(args: argparse.Namespace) -> None:
    rows = [(_call(name, f), _summary(f)) for name, f in FACTORIES.items()]
    width = max(len(sig) for sig, _ in rows)
    for sig, summary in rows:
        print(f"{sig:<{width}}  {summary}")


def _tune(args: argparse.Namespace) -> None:
    if not args.show:
        if not tuning.enabled():
            raise ValueError(f"measuring is off ({tuning.TUNING_ENV}=off); unset it to measure.")
        dtypes = [getattr(torch, name) for name in args.dtype or ["float32", "bfloat16"]]
        tuning.calibrate(dtypes, log=print)
    measured = tuning.stored()
    where = "measured on this machine" if measured else "nothing measured yet (flexmask tune)"
    print(f"{where}: {tuning.path()}")
    for dtype, modes in measured.items():
        for mode, entry in modes.items():
            won = ", ".join(f"{c['cost']:.2f}: sparse {c['sparse_ms']:.1f} ms / dense "
                            f"{c['dense_ms']:.1f} ms" for c in entry["cases"])  # fmt: skip
            print(f"{dtype} {mode}: sparse path up to cost {entry['max_density']:.2f} "
                  f"(cost: times) {won}")  # fmt: skip
            if "flex" in entry:
                print(f"{dtype} {mode}: {_flex_verdict(entry)}")


def _flex_verdict(entry: dict) -> str:
    """What the flex measurement of an inference entry means for ``auto``."""
    flex = entry["flex"]
    if flex["error"]:
        return f"flex could not run here ({flex['error']}): never picked"
    times = ", ".join(f"{c['cost']:.2f}: {c['flex_ms']:.1f} ms" for c in entry["cases"])
    verdict = (f"picked up to cost {flex['max_density']:.2f}"
               if flex["vs_sparse"] <= tuning.FLEX_MARGIN else "not picked")  # fmt: skip
    return (
        f"flex at {flex['vs_sparse']:.2f}x the sparse path's time (picked at most "
        f"{tuning.FLEX_MARGIN}): {verdict} (cost: times) {times}"
    )


def _call(name: str, f: object) -> str:
    """``padding(lengths, side='right')``: the call without annotations."""
    params = inspect.signature(f).parameters.values()  # type: ignore[arg-type]
    shown = [p.name if p.default is p.empty else f"{p.name}={p.default!r}" for p in params]
    return f"{name}({', '.join(shown)})"


def _summary(f: object) -> str:
    doc = inspect.getdoc(f) or ""
    return doc.splitlines()[0].replace("``", "") if doc else ""


if __name__ == "__main__":
    raise SystemExit(main())
