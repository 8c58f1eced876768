"""Decode latency per token under Transformers' ``generate``: sdpa against flexmask (``auto``, and
``flex`` with a static cache), on tiny Llama models built from configs: ``make bench-hf``.

Per token = (T(1 + N new tokens) - T(1 new token)) / N, so the prefill and generate's set-up
cancel; medians of ``REPEATS`` runs taken round-robin. Batch 8 is left-padded (row ``i`` has
``prompt - i`` real tokens), so its masks carry padding. ``flex`` is measured with a static
cache only: with Transformers' growing cache every step has a new shape, which flex would
compile afresh. Writes ``benchmarks/results/hf_decode.{json,md}``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import transformers
from _results import save

import flexmask.hf as hf

MODELS = {
    "2 layers, width 64": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2),
    "4 layers, width 256": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                num_attention_heads=8, num_key_value_heads=4),
}  # fmt: skip
NEW, REPEATS = 24, 9


def build(shape: dict, impl: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=97, max_position_embeddings=2048,
                                      bos_token_id=None, eos_token_id=None, pad_token_id=0,
                                      **shape)  # fmt: skip
    return transformers.LlamaForCausalLM._from_config(config, attn_implementation=impl).eval()


def prompts(batch: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts: row ``i`` has ``n - i`` real tokens."""
    ids = torch.randint(1, 97, (batch, n), generator=torch.Generator().manual_seed(0))
    am = (torch.arange(n)[None] >= torch.arange(batch)[:, None]).long()
    return ids * am, am


def per_token_ms(models: dict, ids: torch.Tensor, am: torch.Tensor, cache: str) -> dict:
    kw = dict(attention_mask=am, do_sample=False, pad_token_id=0, cache_implementation=cache)

    def run(model: torch.nn.Module, new: int) -> float:
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=new, min_new_tokens=new, **kw)
        return time.perf_counter() - start

    times: dict[str, dict[int, list[float]]] = {m: {1: [], 1 + NEW: []} for m in models}
    with torch.no_grad():
        for model in models.values():  # warm-up: flex compiles its two graphs here
            run(model, 1 + NEW)
        for _ in range(REPEATS):
            for name, model in models.items():
                for new in (1, 1 + NEW):
                    times[name][new].append(run(model, new))
    return {name: (statistics.median(t[1 + NEW]) - statistics.median(t[1])) / NEW * 1e3
            for name, t in times.items()}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one configuration: a smoke run")
    quick = ap.parse_args().quick
    auto, flex = hf.register("flexmask"), hf.register("flexmask-flex", backend="flex")
    rows = []
    configs = [(m, b, p) for m in MODELS for b in (1, 8) for p in (8, 1024)]
    for shape_name, batch, n in configs[:1] if quick else configs:
        shape = MODELS[shape_name]
        ids, am = prompts(batch, n)
        for cache in ("dynamic", "static"):
            impls = {"sdpa": "sdpa", "flexmask auto": auto}
            if cache == "static":
                impls["flexmask flex"] = flex
            ms = per_token_ms({k: build(shape, v) for k, v in impls.items()}, ids, am, cache)
            row = {"model": shape_name, "batch": batch, "prompt": n, "cache": cache,
                   **{f"{k} ms": v for k, v in ms.items()},
                   "auto / sdpa": ms["flexmask auto"] / ms["sdpa"],
                   "flex / sdpa": ms["flexmask flex"] / ms["sdpa"] if "flexmask flex" in ms
                   else None}  # fmt: skip
            rows.append(row)
            print(row, flush=True)

    def cell(x: float | None, spec: str) -> str:
        return "—" if x is None else format(x, spec)

    save("hf_decode_quick" if quick else "hf_decode", rows,
         ["model", "batch", "prompt", "cache", "sdpa ms/token", "flexmask auto", "auto / sdpa",
          "flexmask flex", "flex / sdpa"], "lrrlrrrrr",
         lambda r: [r["model"], str(r["batch"]), str(r["prompt"]), r["cache"],
                    f"{r['sdpa ms']:.2f}", f"{r['flexmask auto ms']:.2f}",
                    f"{r['auto / sdpa']:.2f}", cell(r.get("flexmask flex ms"), ".2f"),
                    cell(r["flex / sdpa"], ".2f")],
         transformers=transformers.__version__, new_tokens=NEW)  # fmt: skip


if __name__ == "__main__":
    main()
