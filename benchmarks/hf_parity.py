"""Max logit differences of flexmask's Transformers support, model × attention × case:
``make bench-hf``. Writes ``benchmarks/results/hf_parity.{json,md}``.

Cases: a tree of candidates in one pass vs each path alone (trie, and a tree with duplicated
branches); a left-padded batch vs each prompt alone (real tokens); and, for the flexmask
backend, flexmask vs sdpa on a padded prefill and on cached greedy decode steps.
"""

from __future__ import annotations

import torch
import transformers
from _results import save

import flexmask as fm
import flexmask.hf as hf

VOCAB, IMPLS, KINDS = 97, ("eager", "sdpa", "flexmask"), ("llama", "qwen2", "gpt2")
TREES = {
    "tree (trie)": fm.Tree.from_paths([[5, 6, 7], [5, 6, 8], [5, 9], [40, 41]]),
    "tree (duplicates)": fm.Tree.from_parents(
        [-1, 0, 1, -1, 3, 4, -1, 6, 7], [11, 12, 13, 11, 12, 14, 11, 12, 13]
    ),
}
PROMPTS = [[5, 6, 7, 8, 9, 10], [21, 22, 23], [31, 32, 33, 34]]


def tiny(kind: str, impl: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(
            vocab_size=VOCAB,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=128,
            bos_token_id=None,
            eos_token_id=None,
        )
        return transformers.GPT2LMHeadModel._from_config(cfg, attn_implementation=impl).eval()
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=None,
        eos_token_id=None,
    )
    config, cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[kind]
    return cls._from_config(config(**common), attn_implementation=impl).eval()


@torch.no_grad()
def tree_diff(model: torch.nn.Module, impl: str, tree: fm.Tree) -> float:
    ctx = torch.arange(20, 26)
    x = hf.tree_inputs(ctx, tree)
    mask = (
        {"flexmask_mask": x["flexmask_mask"]}
        if impl == "flexmask"
        else {"attention_mask": x["attention_mask"]}
    )
    nodes = model(x["input_ids"], position_ids=x["position_ids"], **mask).logits[0, 6:]
    worst = 0.0
    for row in tree.paths:
        path = row[row >= 0]
        alone = model(torch.cat([ctx, tree.tokens[path]])[None]).logits[0, 6:]
        worst = max(worst, float((nodes[path] - alone).abs().max()))
    return worst


def left_padded() -> tuple[torch.Tensor, torch.Tensor]:
    n = max(map(len, PROMPTS))
    ids = torch.zeros(len(PROMPTS), n, dtype=torch.long)
    am = torch.zeros_like(ids)
    for i, p in enumerate(PROMPTS):
        ids[i, n - len(p) :], am[i, n - len(p) :] = torch.tensor(p), 1
    return ids, am


@torch.no_grad()
def padding_diff(model: torch.nn.Module) -> float:
    ids, am = left_padded()
    out = model(ids, attention_mask=am, position_ids=(am.cumsum(-1) - 1).clamp(min=0)).logits
    return max(
        float((out[i, -len(p) :] - model(torch.tensor([p])).logits[0]).abs().max())
        for i, p in enumerate(PROMPTS)
    )


@torch.no_grad()
def vs_sdpa(model: torch.nn.Module, ref: torch.nn.Module) -> tuple[float, float]:
    ids, am = left_padded()
    real = am.bool()
    prefill = float(
        (model(ids, attention_mask=am).logits - ref(ids, attention_mask=am).logits)[real]
        .abs()
        .max()
    )
    kw = dict(
        attention_mask=am,
        max_new_tokens=6,
        do_sample=False,
        pad_token_id=0,
        output_scores=True,
        return_dict_in_generate=True,
    )
    a, b = model.generate(ids, **kw), ref.generate(ids, **kw)
    assert torch.equal(a.sequences, b.sequences)
    decode = max(float((x - y).abs().max()) for x, y in zip(a.scores, b.scores, strict=True))
    return prefill, decode


def main() -> None:
    hf.register("flexmask")
    rows = []
    for kind in KINDS:
        models = {impl: tiny(kind, impl) for impl in IMPLS}
        for impl, model in models.items():
            cells = {name: tree_diff(model, impl, t) for name, t in TREES.items()}
            cells["left padding"] = padding_diff(model)
            if impl == "flexmask":
                cells["vs sdpa, prefill"], cells["vs sdpa, cached decode"] = vs_sdpa(
                    model, models["sdpa"]
                )
            rows.append({"model": kind, "attention": impl, **cells})
            print(rows[-1])
    cols = [
        "tree (trie)",
        "tree (duplicates)",
        "left padding",
        "vs sdpa, prefill",
        "vs sdpa, cached decode",
    ]
    save("hf_parity", rows, ["model", "attention", *cols], "ll" + "r" * len(cols),
         lambda r: [r["model"], r["attention"], *(f"{r[c]:.1e}" if c in r else "—" for c in cols)],
         transformers=transformers.__version__)  # fmt: skip


if __name__ == "__main__":
    main()
