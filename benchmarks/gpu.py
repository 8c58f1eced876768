"""The GPU benchmark that ``make gpu-check`` runs: bf16, B*H = 16 (2 rows of 8 heads), head dim 128.

- attention forward: flexmask (``auto`` as the module dispatches it, and ``flex``) against SDPA
  (its flash kernel with ``is_causal``, and with the dense mask) for causal, sliding_window(1024),
  8 documents & causal, and padding & causal, at 8k, 16k and 32k tokens;
- BlockMask building: flexmask's tile builder against compiled ``create_block_mask``, 32k and
  128k tokens;
- decode: one token per row after 4k and 32k cached tokens, ``KVCache`` with flex and with SDPA.

Attention rows give TFLOP/s on the BlockMask's visited blocks and their fraction of the bf16
matmul rate measured in the same run. Each section is written as soon as it ends, so a run cut
short still reports what it measured: ``--out DIR`` gets ``gpu.json`` and ``gpu.md``.
``--quick`` runs small sizes (``--device cpu --quick`` checks the script on a CPU).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from harness import attention_flops, matmul_peak, measure
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import create_block_mask

import flexmask as fm
from flexmask.dispatch import Call, choose
from flexmask.evaluation import block_kinds
from flexmask.runners import RUNNERS, MaskForms, Options, masked_sdpa

BATCH, HEADS, HEAD_DIM = 2, 8, 128


def families(n: int) -> dict[str, fm.MaskMod]:
    doc = n // 8
    return {
        "causal": fm.causal(),
        "sliding_window(1024)": fm.sliding_window(1024),
        "8 documents & causal": fm.packed([doc] * 7 + [n - 7 * doc]) & fm.causal(),
        "padding & causal": fm.padding([n, n // 2]) & fm.causal(),
    }


class Report:
    """Rows by section, rewritten to ``gpu.json`` and ``gpu.md`` after every section."""

    def __init__(self, out: Path, dev: torch.device, dtype: torch.dtype) -> None:
        self.out, self.sections = out, {}
        name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor()
        date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
        self.meta = {"device": name or dev.type, "torch": torch.__version__,
                     "dtype": str(dtype).removeprefix("torch."), "batch": BATCH, "heads": HEADS,
                     "head_dim": HEAD_DIM, "date": date}  # fmt: skip

    def add(self, section: str, rows: list[dict], header: list[str], cells) -> None:
        self.sections[section] = {"rows": rows, "header": header,
                                  "table": [cells(r) for r in rows]}  # fmt: skip
        self.write()

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        data = {"meta": self.meta, "sections": {k: v["rows"] for k, v in self.sections.items()}}
        (self.out / "gpu.json").write_text(json.dumps(data, indent=1))
        lines = ["# GPU benchmark", "", ", ".join(f"{k}: {v}" for k, v in self.meta.items())]
        for title, sec in self.sections.items():
            lines += ["", f"## {title}", "", "| " + " | ".join(sec["header"]) + " |",
                      "|" + "---|" * len(sec["header"])]  # fmt: skip
            lines += ["| " + " | ".join(row) + " |" for row in sec["table"]]
        (self.out / "gpu.md").write_text("\n".join(lines) + "\n")


def attention_rows(sizes, dev, dtype, peak, repeats) -> list[dict]:
    rows = []
    for n in sizes:
        gen = torch.Generator(device=dev).manual_seed(0)
        q, k, v = (torch.randn(BATCH, HEADS, n, HEAD_DIM, generator=gen, device=dev, dtype=dtype)
                   for _ in range(3))  # fmt: skip
        for name, mask in families(n).items():
            rows += attention_case(q, k, v, name, mask, dev, peak, repeats)
    return rows


def attention_case(q, k, v, name, mask, dev, peak, repeats) -> list[dict]:
    """One family at one length: flexmask (auto, as the module dispatches it, and flex) and SDPA."""
    n = q.shape[2]
    forms = MaskForms(mask)
    call = Call(q=q, s_kv=n, needs_grad=False, dropout=False, score_mod=False,
                softmax_only=False, decoding=False, shapes_vary=False)  # fmt: skip
    picked = choose("auto", call, forms)
    bm = forms.block_mask(q, n)
    methods = {
        "flexmask auto": lambda: RUNNERS[picked](q, k, v, forms, Options()),
        "flexmask flex": lambda: RUNNERS["flex"](q, k, v, forms, Options()),
    }
    if name == "causal":
        methods["sdpa is_causal"] = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if dev.type == "cuda":
            methods["sdpa flash is_causal"] = lambda: _flash_causal(q, k, v)
    else:
        dense = forms.dense(q, n)
        methods["sdpa dense mask"] = lambda: masked_sdpa(q, k, v, dense)
    with torch.no_grad():
        timings = measure(methods, warmup=2, repeats=repeats, dev=dev)
    visited = int((block_kinds(bm) > 0).sum()) * bm.BLOCK_SIZE[0] * bm.BLOCK_SIZE[1]
    visited *= BATCH // bm.kv_num_blocks.shape[0]
    flops = attention_flops(visited, HEAD_DIM, HEADS, backward=False)
    rows = []
    for method, t in timings.items():
        tflops = flops / t.median_s / 1e12
        rows.append({"family": name, "tokens": n, "method": method, "ms": t.ms,
                     "auto_runs": picked, "tflops_visited": tflops,
                     "of_matmul_rate": tflops * 1e3 / peak})  # fmt: skip
    return rows


def _flash_causal(q, k, v):
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def build_rows(sizes, dev, repeats) -> list[dict]:
    compiled = torch.compile(create_block_mask)
    rows = []
    for n in sizes:
        for name, mask in families(n).items():
            if name != "padding & causal":  # the others' builds cover it: same tiles
                rows += build_case(compiled, name, mask, n, dev, repeats)
    return rows


def build_case(compiled, name, mask, n, dev, repeats) -> list[dict]:
    batch = BATCH if mask.uses_batch else None
    on_device = mask.to(dev)
    methods = {
        "flexmask tiles": lambda: fm.block_mask(mask, n, batch=batch, device=dev, cache=False,
                                                method="tiles"),
        "compiled create_block_mask": lambda: compiled(on_device, batch, None, n, n, dev),
    }  # fmt: skip
    timings = measure(methods, warmup=2, repeats=repeats, dev=dev)
    return [{"family": name, "tokens": n, "method": m, "ms": t.ms} for m, t in timings.items()]


def decode_rows(cached, dev, dtype, repeats) -> list[dict]:
    return [row for n in cached for row in decode_case(n, dev, dtype, repeats)]


def decode_case(n, dev, dtype, repeats) -> list[dict]:
    """One new token per row after ``n`` cached tokens, flex and SDPA on the same cache."""
    embed = HEADS * HEAD_DIM
    cache = fm.KVCache(BATCH, n + 128, HEADS, HEAD_DIM, device=dev, dtype=dtype)
    cache.k.normal_()
    cache.v.normal_()
    x = torch.randn(BATCH, 1, embed, device=dev, dtype=dtype)
    kw = dict(device=dev, dtype=dtype)
    modules = {b: fm.MultiheadFlexAttention(embed, HEADS, backend=b, **kw).eval()
               for b in ("flex", "sdpa")}  # fmt: skip

    def step(module):
        cache.lengths.fill_(n)  # the cache holds n tokens; each step writes position n
        return module(x, mask=fm.causal(), cache=cache)

    with torch.no_grad():
        timings = measure({"flex": lambda: step(modules["flex"]),
                           "sdpa": lambda: step(modules["sdpa"])},
                          warmup=3, repeats=repeats, dev=dev)  # fmt: skip
    return [{"cached": n, "backend": b, "ms_per_step": t.ms} for b, t in timings.items()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "gpu-run")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    ap.add_argument("--budget", type=float, default=240.0, help="seconds; later sections skip")
    args = ap.parse_args()
    dev = torch.device(args.device)
    dtype = torch.bfloat16
    k = 1024
    sizes, builds, cached = ([8 * k, 16 * k, 32 * k], [32 * k, 128 * k], [4 * k, 32 * k])
    if args.quick:
        sizes, builds, cached = [512], [1024], [256]
    repeats = 3 if args.quick else 10
    start = time.perf_counter()
    report = Report(args.out, dev, dtype)
    peak = matmul_peak(dtype, dev, n=1024 if args.quick else 8192)
    report.meta["bf16_matmul_tflops"] = peak / 1e3
    sections = [
        ("attention forward", lambda: attention_rows(sizes, dev, dtype, peak, repeats),
         ["family", "tokens", "method", "ms", "TFLOP/s visited", "of matmul rate", "auto runs"],
         lambda r: [r["family"], str(r["tokens"]), r["method"], f"{r['ms']:.3f}",
                    f"{r['tflops_visited']:.1f}", f"{r['of_matmul_rate']:.0%}", r["auto_runs"]]),
        ("BlockMask building", lambda: build_rows(builds, dev, repeats),
         ["family", "tokens", "method", "ms"],
         lambda r: [r["family"], str(r["tokens"]), r["method"], f"{r['ms']:.2f}"]),
        ("decode step", lambda: decode_rows(cached, dev, dtype, repeats),
         ["cached tokens", "backend", "ms per step"],
         lambda r: [str(r["cached"]), r["backend"], f"{r['ms_per_step']:.3f}"]),
    ]  # fmt: skip
    for title, run, header, cells in sections:
        if time.perf_counter() - start > args.budget:
            report.add(title, [], ["skipped"], lambda r: [])
            print(f"{title}: skipped, past the {args.budget:.0f} s budget")
            continue
        report.add(title, run(), header, cells)
        print(f"{title}: done at {time.perf_counter() - start:.0f} s", flush=True)
    report.meta["seconds"] = round(time.perf_counter() - start, 1)
    report.write()
    print((args.out / "gpu.md").read_text())


if __name__ == "__main__":
    main()
