"""The Transformers parity matrix: family x feature x max |Δ| of flexmask against the family's own
eager attention (and sdpa where it has one), on the tiny models of ``tests/hf_families.py``:
``make bench-hf``. Writes ``benchmarks/results/hf_parity.{json,md}``.

Features: a padded prefill (the largest difference over every layer's hidden states and the
output, on real tokens); cached greedy ``generate`` with Transformers' growing cache and with a
static one (the tokens must be identical; the cell is the largest score difference); a packed
row (documents marked by restarting position ids) against the same row under eager, and against
each document run alone where the family packs; a tree of candidates through ``verify_tree``
against each path run alone. ``tests/test_hf_families.py`` asserts every cell <= 1e-5.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import transformers
from _results import save

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the tests' model zoo

import flexmask as fm
import flexmask.hf as hf
from tests.hf_families import FAMILIES, PROMPTS, layer_outputs, packed_row, padded, prefill_inputs

COLUMNS = ["prefill", "generate", "generate (static cache)", "packed row",
           "packed: documents alone", "tree: paths alone"]  # fmt: skip


def worst(got: list[torch.Tensor], want: list[torch.Tensor], rows=...) -> float:
    return max(float((a[rows] - b[rows]).abs().max()) for a, b in zip(got, want, strict=True))


def prefill(ours, ref, kind: str) -> float:
    inputs, rows = prefill_inputs(kind)
    return worst(layer_outputs(ours, kind, **inputs), layer_outputs(ref, kind, **inputs), rows)


def generate(ours, ref, kind: str, cache: str) -> float:
    ids, am = padded("left" if kind == "decoder" else "right")
    kw = dict(attention_mask=am, max_new_tokens=6, min_new_tokens=6, do_sample=False,
              pad_token_id=0, output_scores=True, return_dict_in_generate=True,
              cache_implementation=cache)  # fmt: skip
    a, b = ours.generate(ids, **kw), ref.generate(ids, **kw)
    if not torch.equal(a.sequences, b.sequences):
        return float("inf")  # other tokens: printed as such, and the test fails
    return max(float((x - y).abs().max()) for x, y in zip(a.scores, b.scores, strict=True))


def packed(ours, ref) -> float:
    ids, pos = packed_row()
    kw = {"input_ids": ids, "position_ids": pos, "use_cache": False}
    return worst(layer_outputs(ours, "decoder", **kw), layer_outputs(ref, "decoder", **kw))


def documents_alone(ours, eager) -> float:
    ids, pos = packed_row()
    got = ours(ids, position_ids=pos, use_cache=False).logits[0]
    alone = torch.cat([eager(torch.tensor([p])).logits[0] for p in PROMPTS])
    return float((got - alone).abs().max())


def tree_paths(ours, eager) -> float:
    context, tree = torch.tensor([40, 41]), fm.Tree.from_paths([[5, 6], [5, 7], [8]])
    result = hf.verify_tree(ours, context, tree)
    out = 0.0
    for row in tree.paths:
        path = row[row >= 0]
        alone = eager(torch.cat([context, tree.tokens[path]])[None]).logits[0, len(context) :]
        out = max(out, float((result.logits[path] - alone).abs().max()))
    return out


@torch.no_grad()
def main() -> None:
    hf.register("flexmask")
    rows = []
    for name, family in FAMILIES.items():
        ours = family.build("flexmask")
        refs = ["eager", "sdpa"] if family.sdpa else ["eager"]
        models = {r: family.build(r) for r in refs}
        for ref, model in models.items():
            cells: dict[str, float | None] = dict.fromkeys(COLUMNS)
            cells["prefill"] = prefill(ours, model, family.kind)
            if family.kind != "encoder":
                cells["generate"] = generate(ours, model, family.kind, "dynamic")
            if family.kind == "decoder":
                cells["generate (static cache)"] = generate(ours, model, "decoder", "static")
                cells["packed row"] = packed(ours, model)
                if ref == "eager":
                    cells["tree: paths alone"] = tree_paths(ours, model)
                    if family.packing:
                        cells["packed: documents alone"] = documents_alone(ours, model)
            rows.append({"family": name, "kind": family.kind, "against": ref, **cells})
            print(rows[-1], flush=True)

    def cell(x: float | None) -> str:
        return "—" if x is None else ("other tokens" if x == float("inf") else f"{x:.1e}")

    save("hf_parity", rows, ["family", "kind", "flexmask vs", *COLUMNS], "lll" + "r" * len(COLUMNS),
         lambda r: [r["family"], r["kind"], r["against"], *(cell(r[c]) for c in COLUMNS)],
         transformers=transformers.__version__)  # fmt: skip


if __name__ == "__main__":
    main()
