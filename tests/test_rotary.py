"""Rotary embeddings (MultiheadFlexAttention(rope_theta=...)) against Transformers' own
LlamaAttention with the same weights, and against running each path of a tree alone."""

import pytest
import torch

import flexmask as fm

llama = pytest.importorskip("transformers.models.llama.modeling_llama")
transformers = pytest.importorskip("transformers")

E, S = 64, 11


def pair(num_kv_heads):
    """Transformers' LlamaAttention (eager) and flexmask's module with its weights."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=E, num_attention_heads=4,
                                      num_key_value_heads=num_kv_heads, rope_theta=10000.0,
                                      attention_bias=False, intermediate_size=128,
                                      attn_implementation="eager")  # fmt: skip
    theirs = llama.LlamaAttention(config, layer_idx=0).eval()
    for p in theirs.parameters():
        torch.nn.init.normal_(p, std=0.15)  # big enough that a wrong rotation shows
    rope = llama.LlamaRotaryEmbedding(config)
    ours = fm.MultiheadFlexAttention(E, 4, num_kv_heads=num_kv_heads, bias=False,
                                     rope_theta=10000.0, backend="sdpa")  # fmt: skip
    with torch.no_grad():
        for a, b in (("q_proj", "q_proj"), ("k_proj", "k_proj"), ("v_proj", "v_proj"),
                     ("out_proj", "o_proj")):  # fmt: skip
            getattr(ours, a).weight.copy_(getattr(theirs, b).weight)
    return theirs, rope, ours


def causal_4d(s):
    return torch.full((s, s), float("-inf")).triu(1)[None, None]


@pytest.mark.parametrize("num_kv_heads", [4, 2])
def test_rotary_attention_equals_llamas(num_kv_heads):
    theirs, rope, ours = pair(num_kv_heads)
    x = torch.randn(2, S, E)
    positions = torch.tensor([list(range(3, 3 + S)), list(range(S))])  # one row shifted
    with torch.no_grad():
        want, _ = theirs(x, position_embeddings=rope(x, positions), attention_mask=causal_4d(S))
        got = ours(x, mask=fm.causal(), positions=positions)
        unrotated = fm.MultiheadFlexAttention(E, 4, num_kv_heads=num_kv_heads, bias=False,
                                              backend="sdpa")  # fmt: skip
        unrotated.load_state_dict(ours.state_dict())
        plain = unrotated(x, mask=fm.causal())
    assert (got - want).abs().max().item() <= 1e-5
    assert (plain - want).abs().max().item() > 0.1  # the rotation matters at these weights
    with torch.no_grad():  # default positions: arange(S)
        want0, _ = theirs(x, position_embeddings=rope(x, torch.arange(S)[None].expand(2, -1)),
                          attention_mask=causal_4d(S))  # fmt: skip
        assert (ours(x, mask=fm.causal()) - want0).abs().max().item() <= 1e-5


def test_a_cache_continues_the_positions():
    """Prefill then decode one token at a time on a KVCache equals one full pass."""
    _, _, ours = pair(2)
    x = torch.randn(2, S, E)
    cache = fm.KVCache(2, 32, 2, E // 4)
    with torch.no_grad():
        full = ours(x, mask=fm.causal())
        steps = [ours(x[:, :5], mask=fm.causal(), cache=cache)]
        for i in range(5, S):
            steps.append(ours(x[:, i : i + 1], mask=fm.causal(), cache=cache))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_a_tree_of_candidates_equals_each_path_alone():
    """Candidates verified in one pass with tree positions equal each root-to-leaf path run
    alone after the same context (positions continuing the context)."""
    _, _, ours = pair(2)
    context, parents = 4, [-1, 0, 0, 1, 2]  # two paths: 0-1-3 and 0-2-4
    tree = fm.Tree.from_parents(parents)
    x = torch.randn(1, context + len(parents), E)
    positions = torch.cat([torch.arange(context), tree.position_ids(context)])
    with torch.no_grad():
        out = ours(x, mask=fm.tree(parents, context_len=context), positions=positions)
        for path in ([0, 1, 3], [0, 2, 4]):
            idx = list(range(context)) + [context + i for i in path]
            alone = ours(x[:, idx], mask=fm.causal())
            torch.testing.assert_close(out[:, idx[context:]], alone[:, context:], rtol=1e-5,
                                       atol=1e-5)  # fmt: skip


def test_rotary_refusals():
    with pytest.raises(ValueError, match=r"rope_theta=...\) must be above 1"):
        fm.MultiheadFlexAttention(E, 4, rope_theta=0.5)
    with pytest.raises(TypeError, match=r"rope_theta=...\) must be a number or None"):
        fm.MultiheadFlexAttention(E, 4, rope_theta="10000")
    with pytest.raises(ValueError, match=r"head dim must be even, got 3"):
        fm.MultiheadFlexAttention(12, 4, rope_theta=10000.0)
    attn = fm.MultiheadFlexAttention(E, 4, rope_theta=10000.0)
    x = torch.randn(2, 5, E)
    with pytest.raises(ValueError, match=r"must be \[S\] or \[B, S\] = \[5\] or \[2, 5\]"):
        attn(x, positions=torch.arange(4))
    with pytest.raises(ValueError, match=r"cross-attention has two"):
        attn(x, torch.randn(2, 3, E))
    with pytest.raises(ValueError, match=r"this module has none"):
        fm.MultiheadFlexAttention(E, 4)(x, positions=torch.arange(5))
