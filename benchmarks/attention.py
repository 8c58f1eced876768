"""Attention time per mask family, size and dtype: flexmask's backends against their peers, in
the same run (``make bench``; ``--backward`` times forward + backward; ``--quick`` is the smoke
run CI does). Writes ``benchmarks/results/attention_{forward,backward}[_quick].{json,md}``
(``report.py`` draws them under ``figures/bench/``).

Peers: SDPA with the dense boolean mask, SDPA ``is_causal`` (causal only), compiled
``flex_attention`` (forward only on CPU) on the BlockMask of ``torch.compile(create_block_mask)``
(attention-gym's mask_mods where it has them), naive eager softmax attention (up to 2048
tokens). flexmask: ``sparse`` (``sparse_attention``) and ``auto`` (``MultiheadFlexAttention``'s
dispatch, timed with the dispatch itself). Every time excludes building masks (built once per
model and reused by every layer); compiling happens in the warm-up.

GFLOP/s are credited for the *visited* blocks (partial + full blocks of the BlockMask, what a
block-sparse kernel computes) whatever the method computes, and separately for the allowed
elements; the matmul peak of the run is the roofline.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from _results import save
from harness import Progress, attention_flops, device, matmul_peak, measure
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import flexmask as fm
from flexmask.coverage import as_dense_mask
from flexmask.dispatch import Call, choose
from flexmask.runners import MaskForms, masked_sdpa

HEADS, HEAD_DIM = 8, 64


def families(n: int) -> dict[str, tuple[fm.MaskMod, object | None, int]]:
    """name -> (flexmask mask, attention-gym mask_mod or None, batch)."""
    try:
        from attn_gym.masks import causal_mask, generate_prefix_lm_mask, generate_sliding_window
        from attn_gym.masks.document_mask import generate_doc_mask_mod
    except ImportError:  # the gym extra is optional: flex then runs flexmask's own mask_mod
        causal_mask = generate_prefix_lm_mask = generate_sliding_window = None  # type: ignore[assignment]

    def gym(make, *args):
        return None if make is None else make(*args)

    def docs(k: int):
        lengths = [n // k] * k
        offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
        gym_docs = None if causal_mask is None else generate_doc_mask_mod(causal_mask, offsets)
        return fm.packed(lengths) & fm.causal(), gym_docs, 1

    gen = torch.Generator().manual_seed(0)
    nodes = min(256, n // 4)
    parents = [-1] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, nodes)]
    return {
        "causal": (fm.causal(), causal_mask, 1),
        "sliding_window(256)": (fm.sliding_window(256), gym(generate_sliding_window, 255), 1),
        "sliding_window(1024)": (fm.sliding_window(1024), gym(generate_sliding_window, 1023), 1),
        "8 documents": docs(8),
        "32 documents": docs(32),
        "prefix_lm(S/4)": (fm.prefix_lm(n // 4), gym(generate_prefix_lm_mask, n // 4), 1),
        "padding batch of 4": (fm.causal() & fm.padding([n, n // 2, n // 4, n // 8]), None, 4),
        f"tree of {nodes} after a context": (fm.tree(parents, n - nodes), None, 1),
    }


@functools.cache
def compiled_create_block_mask():
    return torch.compile(create_block_mask)


@functools.cache
def compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


def naive(q, k, v, dense):
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    weights = torch.softmax(scores.masked_fill(~dense, float("-inf")), -1).nan_to_num(0.0)
    return weights @ v


def sdpa_block_rates(dtype: torch.dtype, dev: torch.device, backward: bool) -> dict[str, float]:
    """GFLOP/s of SDPA itself on the shapes the sparse path gives it for a sliding window of 256
    (64 query blocks of 128 against 3 key blocks), unmasked and with the window's element mask
    on its two partial blocks: the ceiling of a path built on SDPA calls."""
    q = torch.randn(64, HEADS, 128, HEAD_DIM, dtype=dtype, device=dev, requires_grad=backward)
    k = torch.randn(64, HEADS, 384, HEAD_DIM, dtype=dtype, device=dev, requires_grad=backward)
    grad = torch.randn_like(q)
    pos = torch.arange(128, device=dev)
    seen = torch.cat([pos[None, :] > pos[:, None], torch.ones(128, 128, dtype=torch.bool,
                      device=dev), pos[None, :] <= pos[:, None]], dim=1)  # fmt: skip
    window = torch.zeros((), dtype=dtype, device=dev).masked_fill(~seen, float("-inf"))
    methods = {
        "unmasked": lambda: F.scaled_dot_product_attention(q, k, k),
        "window mask": lambda: F.scaled_dot_product_attention(q, k, k, attn_mask=window),
    }
    if backward:
        methods = {m: _with_backward(fn, grad) for m, fn in methods.items()}
    times = measure(methods, warmup=2, repeats=5, dev=dev)
    flops = attention_flops(64 * 128 * 384, HEAD_DIM, HEADS, backward=backward)
    return {m: flops / t.median_s / 1e9 for m, t in times.items()}


def run_case(name, mask, gym_mask, bsz, n, dtype, backward, dev, warmup, repeats):
    heads = HEADS if bsz == 1 else HEADS // bsz  # the same B*H everywhere
    gen = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(bsz, heads, n, HEAD_DIM, generator=gen, device=dev, dtype=dtype)
               for _ in range(3))  # fmt: skip
    grad = torch.randn_like(q)
    if backward:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
    batch = bsz if mask.uses_batch else None
    bm = fm.block_mask(mask, n, batch=batch, device=dev)
    # [B, 1, S, S], with its coverage found once, as the module caches it for every layer
    dense = as_dense_mask(fm.to_dense(mask, n, batch=bsz if mask.uses_batch else 1, device=dev))
    with torch._dynamo.config.patch(recompile_limit=64):
        torch_bm = compiled_create_block_mask()(gym_mask or mask, batch, None, n, n, dev)

    methods = {
        "sdpa dense": lambda: masked_sdpa(q, k, v, dense),
        "sparse": lambda: fm.sparse_attention(q, k, v, bm),
    }
    if not (backward and dev.type == "cpu"):  # FlexAttention has no CPU backward
        methods["flex"] = lambda: compiled_flex()(q, k, v, block_mask=torch_bm)
    if name == "causal":
        methods["sdpa is_causal"] = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    if n <= 2048:
        methods["naive"] = lambda: naive(q, k, v, dense.allowed)
    forward = dict(methods)

    def auto_pick() -> str:
        """What MultiheadFlexAttention(backend="auto") runs for this call (its dispatch)."""
        call = Call(q=q, s_kv=n, needs_grad=torch.is_grad_enabled() and q.requires_grad,
                    dropout=False, score_mod=False, softmax_only=False, decoding=False,
                    shapes_vary=False)  # fmt: skip
        forms = MaskForms(mask)
        backend = choose("auto", call, forms)
        if backend == "sdpa":
            return "sdpa is_causal" if forms.causal(q, n) else "sdpa dense"
        return backend

    def auto():
        return forward[auto_pick()]()

    methods["auto"] = auto
    with torch.set_grad_enabled(backward):
        picked = auto_pick()
        if backward:
            methods = {m: _with_backward(fn, grad) for m, fn in methods.items()}
        timings = measure(methods, warmup=warmup, repeats=repeats, dev=dev,
                          budget_s=0.0 if repeats == 1 else 3.0)  # fmt: skip

    kinds = fm.evaluation.block_kinds(bm)  # per head: [B or 1, 1, QB, KVB]
    visited = int((kinds > 0).sum()) * bm.BLOCK_SIZE[0] * bm.BLOCK_SIZE[1]
    visited *= bsz if batch is None else 1
    allowed = int(dense.allowed.expand(bsz, 1, n, n).sum())
    flops = functools.partial(attention_flops, head_dim=HEAD_DIM, heads=heads, backward=backward)
    rows = []
    for method, t in timings.items():
        rows.append({
            "family": name, "tokens": n, "dtype": str(dtype).removeprefix("torch."),
            "method": method, "ms": t.ms, "spread": t.spread,
            "element_density": allowed / (bsz * n * n),
            "block_density": float((kinds > 0).float().mean()),
            "gflops_visited": flops(visited) / t.median_s / 1e9,
            "gflops_allowed": flops(allowed) / t.median_s / 1e9,
            "auto_picks": picked,
        })  # fmt: skip
    return rows


def _with_backward(fn, grad):
    def run():
        fn().backward(grad)

    return run


def plan(quick: bool, backward: bool) -> list[tuple[int, torch.dtype, list[str] | None]]:
    """(tokens, dtype, families or None for all): what finishes in reasonable time here."""
    if quick:
        return [(512, torch.float32, ["causal", "sliding_window(256)", "8 documents"])]
    sparse_friendly = ["sliding_window(256)", "sliding_window(1024)", "8 documents",
                       "32 documents"]  # fmt: skip
    goal = ["sliding_window(256)", "8 documents"]  # the cases, in bfloat16 too
    if backward:
        return [(1024, torch.float32, None), (4096, torch.float32, None),
                (8192, torch.float32, ["causal", *sparse_friendly]),
                (4096, torch.bfloat16, ["causal", *sparse_friendly]),
                (8192, torch.bfloat16, goal)]  # fmt: skip
    return [(1024, torch.float32, None), (2048, torch.float32, None), (4096, torch.float32, None),
            (8192, torch.float32, None), (16384, torch.float32, sparse_friendly),
            (4096, torch.bfloat16, None), (8192, torch.bfloat16, goal)]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backward", action="store_true", help="time forward + backward")
    parser.add_argument("--quick", action="store_true", help="a smoke run (CI)")
    parser.add_argument("--case", type=int, help=argparse.SUPPRESS)  # run one case (a child)
    parser.add_argument("--rows-to", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    dev = device()
    warmup, repeats = (1, 1) if args.quick else (1, 5)
    cases = [(n, dtype, name, spec) for n, dtype, names in plan(args.quick, args.backward)
             for name, spec in families(n).items() if names is None or name in names]  # fmt: skip
    if args.case is not None:
        n, dtype, name, (mask, gym_mask, bsz) = cases[args.case]
        rows = run_case(name, mask, gym_mask, bsz, n, dtype, args.backward, dev, warmup, repeats)
        args.rows_to.write_text(json.dumps(rows))
        return
    dtypes = {c[1] for c in cases}
    peaks = {str(d).removeprefix("torch."): matmul_peak(d, dev) for d in dtypes}
    sdpa_rates = {str(d).removeprefix("torch."): sdpa_block_rates(d, dev, args.backward)
                  for d in dtypes}  # fmt: skip
    bar, rows = Progress(len(cases)), []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (n, dtype, name, _) in enumerate(cases):
            bar.step(f"{n} {name} {dtype}")
            # A fresh process per case: what one case compiles and caches (graphs, BlockMasks,
            # allocator pools) never adds up to the next one's memory (16384 tokens ran out).
            out = Path(tmp) / f"{i}.json"
            extra = ["--backward"] if args.backward else []
            extra += ["--quick"] if args.quick else []
            subprocess.run([sys.executable, __file__, "--case", str(i), "--rows-to", str(out),
                            *extra], check=True)  # fmt: skip
            rows += json.loads(out.read_text())
    for r in rows:
        r["peak_fraction"] = r["gflops_visited"] / peaks[r["dtype"]]
    kind = "backward" if args.backward else "forward"
    name = f"attention_{kind}" + ("_quick" if args.quick else "")
    save(
        name, rows,
        ["family", "tokens", "dtype", "elem density", "block density", "method", "ms", "spread",
         "GFLOP/s visited", "GFLOP/s allowed", "of matmul peak", "auto picks"], "lrlrrlrrrrrl",
        lambda r: [r["family"], str(r["tokens"]), r["dtype"], f"{r['element_density']:.3f}",
                   f"{r['block_density']:.3f}", r["method"], f"{r['ms']:.1f}",
                   f"{r['spread']:.0%}", f"{r['gflops_visited']:.0f}", f"{r['gflops_allowed']:.0f}",
                   f"{r['peak_fraction']:.0%}", r["auto_picks"]],
        device=str(dev), kind=kind, matmul_peak_gflops=peaks, sdpa_block_gflops=sdpa_rates,
        heads=HEADS, head_dim=HEAD_DIM,
        repeats=repeats,
    )  # fmt: skip
    summarise(name, rows)


def summarise(name: str, rows: list[dict]) -> None:
    """Per case: the fastest method, auto's ratio to it, sparse against flex and dense SDPA."""
    cases: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        cases.setdefault((r["family"], r["tokens"], r["dtype"]), {})[r["method"]] = r
    summary = []
    for (family, n, dtype), by in cases.items():
        fastest = min((m for m in by if m != "auto"), key=lambda m: by[m]["ms"])

        def ratio(a: str, b: str, by: dict = by) -> float | None:
            return by[b]["ms"] / by[a]["ms"] if a in by and b in by else None

        picked = by["auto"]["auto_picks"] if "auto" in by else None
        summary.append({
            "family": family, "tokens": n, "dtype": dtype, "fastest": fastest,
            "auto_picks": picked or "—",
            # the picked backend's own time: what the choice costs, free of re-timing noise
            "picked_over_fastest": ratio(fastest, picked) if picked else None,
            "auto_over_fastest": by["auto"]["ms"] / by[fastest]["ms"] if "auto" in by else None,
            "flex_over_sparse": ratio("sparse", "flex"),
            "dense_over_sparse": ratio("sparse", "sdpa dense"),
            "sparse_gflops": by["sparse"]["gflops_visited"] if "sparse" in by else None,
        })  # fmt: skip

    def fmt(x: float | None, spec: str) -> str:
        return "—" if x is None else format(x, spec)

    save(
        f"{name}_summary", summary,
        ["family", "tokens", "dtype", "fastest", "auto picks", "picked / fastest",
         "auto (timed) / fastest", "flex / sparse", "SDPA dense / sparse",
         "sparse GFLOP/s visited"], "lrllrrrrrr",
        lambda r: [r["family"], str(r["tokens"]), r["dtype"], r["fastest"], r["auto_picks"],
                   fmt(r["picked_over_fastest"], ".2f"), fmt(r["auto_over_fastest"], ".2f"),
                   fmt(r["flex_over_sparse"], ".2f"),
                   fmt(r["dense_over_sparse"], ".2f"), fmt(r["sparse_gflops"], ".0f")],
    )  # fmt: skip


if __name__ == "__main__":
    main()
