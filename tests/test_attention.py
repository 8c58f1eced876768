"""MultiheadFlexAttention against a float64 golden built by hand and nn.MultiheadAttention."""

import copy
import warnings

import pytest
import torch

import flexmask as fm
from tests import reference as ref

E, H = 32, 4


def golden(module, x, dense, context=None, scores_fn=None):
    """The module's own computation, redone in float64 from its weights and a dense oracle."""

    def lin(layer, t):
        return t.double() @ layer.weight.double().T + layer.bias.double()

    src = x if context is None else context
    bsz, s, _ = x.shape
    d = module.head_dim
    q = lin(module.q_proj, x).view(bsz, s, -1, d).transpose(1, 2)
    k = lin(module.k_proj, src).view(bsz, src.shape[1], -1, d).transpose(1, 2)
    v = lin(module.v_proj, src).view(bsz, src.shape[1], -1, d).transpose(1, 2)
    out = ref.attention(q, k, v, dense, scores_fn)
    return lin(module.out_proj, out.transpose(1, 2).reshape(bsz, s, -1))


def assert_close(got, want, rel=2e-6, floor=0.0):
    scale = max(want.abs().max().item(), floor)  # floor: for gradients that are ~0 exactly
    err = (got.double() - want).abs().max().item()
    assert err <= rel * scale, f"max error {err:.3g} > {rel} x scale {scale:.3g}"


def masks_and_oracles(s, s_kv=None):
    s_kv = s_kv or s
    return {
        "none": (None, None),
        "causal": (fm.causal(), ref.causal(s, s_kv)),
        "causal_padding": (
            fm.causal() & fm.padding([s, s // 3], side="left"),
            ref.causal(s, s_kv) & ref.padding(s, s_kv, [s, s // 3], side="left"),
        ),
        "window_or_chunk": (
            fm.sliding_window(5) | fm.chunked(8),
            ref.sliding_window(s, s_kv, 5) | ref.chunked(s, s_kv, 8),
        ),
        "documents": (
            fm.packed([s // 2, s - s // 2]) & fm.causal(),
            ref.packed(s, s_kv, [s // 2, s - s // 2]) & ref.causal(s, s_kv),
        ),
    }


def _dense4(oracle):
    return None if oracle is None else oracle[:, None]  # [B or 1, 1, S, S_kv]


@pytest.fixture
def x():
    torch.manual_seed(0)
    return torch.randn(2, 19, E)


@pytest.mark.parametrize("case", sorted(masks_and_oracles(19)))
@pytest.mark.parametrize("kv_heads", [H, 2, 1])
def test_sdpa_matches_golden(x, case, kv_heads):
    torch.manual_seed(1)
    module = fm.MultiheadFlexAttention(E, H, num_kv_heads=kv_heads, backend="sdpa")
    mask, oracle = masks_and_oracles(19)[case]
    with torch.no_grad():
        out = module(x, mask=mask)
    assert_close(out, golden(module, x, _dense4(oracle)))


def test_fully_masked_rows_are_zero_not_nan(x):
    module = fm.MultiheadFlexAttention(E, H, backend="sdpa", bias=False)
    mask = fm.causal() & fm.padding([19, 4])
    out = module(x, mask=mask)
    assert not out.isnan().any()
    assert out[1, 4:].abs().max() == 0  # pad rows: zero attention, no bias
    out.sum().backward()
    for p in module.parameters():
        assert p.grad is not None and not p.grad.isnan().any()


def test_sdpa_layers_share_one_dense_mask(x):
    layers = [fm.MultiheadFlexAttention(E, H, backend="sdpa") for _ in range(3)]
    mask, oracle = masks_and_oracles(19)["causal_padding"]
    with torch.no_grad():
        for layer in layers:
            assert_close(layer(x, mask=mask), golden(layer, x, _dense4(oracle)))
    assert fm.cache_info()["dense_size"] == 1  # built by the first layer, reused by the others


def test_block_mask_input_uses_partial_blocks_exactly(x):
    module = fm.MultiheadFlexAttention(E, H, backend="sdpa")
    mask, oracle = masks_and_oracles(19)["causal_padding"]
    bm = fm.block_mask(mask, 19, block_size=16, device="cpu", compile=False)
    with torch.no_grad():
        out = module(x, mask=bm)
    assert_close(out, golden(module, x, _dense4(oracle)))


def test_cross_attention(x):
    torch.manual_seed(2)
    context = torch.randn(2, 11, E)
    module = fm.MultiheadFlexAttention(E, H, num_kv_heads=2, backend="sdpa")
    mask = fm.prefix_lm(3)
    with torch.no_grad():
        out = module(x, context, mask=mask)
    assert out.shape == x.shape
    assert_close(out, golden(module, x, ref.prefix_lm(19, 11, 3)[:, None], context))


def alibi(score, b, h, q_idx, kv_idx):
    return score - (h + 1) * 0.25 * (q_idx - kv_idx).abs()


def softcap(score, b, h, q_idx, kv_idx):
    return 5.0 * torch.tanh(score / 5.0)


def _alibi_scores(scores):
    s, s_kv = scores.shape[-2:]
    dist = (torch.arange(s)[:, None] - torch.arange(s_kv)[None, :]).abs().double()
    slopes = (torch.arange(scores.shape[1]) + 1).double()[:, None, None] * 0.25
    return scores - slopes * dist


@pytest.mark.parametrize(
    ("score_mod", "scores_fn"),
    [(alibi, _alibi_scores), (softcap, lambda s: 5.0 * torch.tanh(s / 5.0))],
    ids=["alibi", "softcap"],
)
def test_score_mod_on_sdpa_backend(x, score_mod, scores_fn):
    module = fm.MultiheadFlexAttention(E, H, num_kv_heads=2, score_mod=score_mod, backend="sdpa")
    mask, oracle = masks_and_oracles(19)["causal_padding"]
    with torch.no_grad():
        out = module(x, mask=mask)
    assert_close(out, golden(module, x, _dense4(oracle), scores_fn=scores_fn))


def _copy_from_torch_mha(mha):
    module = fm.MultiheadFlexAttention(E, H, backend="sdpa")
    wq, wk, wv = mha.in_proj_weight.chunk(3)
    bq, bk, bv = mha.in_proj_bias.chunk(3)
    with torch.no_grad():
        for layer, w, b in ((module.q_proj, wq, bq), (module.k_proj, wk, bk),
                            (module.v_proj, wv, bv)):  # fmt: skip
            layer.weight.copy_(w)
            layer.bias.copy_(b)
        module.out_proj.weight.copy_(mha.out_proj.weight)
        module.out_proj.bias.copy_(mha.out_proj.bias)
    return module


@pytest.mark.parametrize("causal", [False, True])
def test_matches_torch_multihead_attention(x, causal):
    torch.manual_seed(3)
    mha = torch.nn.MultiheadAttention(E, H, batch_first=True)
    module = _copy_from_torch_mha(mha)
    s = x.shape[1]
    blocked = ~ref.causal(s, s)[0] if causal else None  # torch: True = may NOT attend
    with torch.no_grad():
        want, _ = mha(x, x, x, attn_mask=blocked, need_weights=False)
        got = module(x, mask=fm.causal() if causal else None)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kv_heads", [H, 2])
def test_cpu_training_gradients_match_golden(x, kv_heads):
    torch.manual_seed(4)
    module = fm.MultiheadFlexAttention(E, H, num_kv_heads=kv_heads, backend="auto")
    mask, oracle = masks_and_oracles(19)["causal_padding"]
    xg = x.clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module(xg, mask=mask).square().sum().backward()

    ghost = copy.deepcopy(module).double()  # the same weights, in float64
    x64 = x.double().requires_grad_()
    golden(ghost, x64, _dense4(oracle)).square().sum().backward()
    assert_close(xg.grad, x64.grad, rel=1e-5)
    floor = max(g.grad.abs().max().item() for g in ghost.parameters())
    for p, g in zip(module.parameters(), ghost.parameters(), strict=True):
        assert_close(p.grad, g.grad, rel=1e-5, floor=floor)


def test_project_shapes(x):
    module = fm.MultiheadFlexAttention(E, H, num_kv_heads=2)
    q, k, v = module.project(x, torch.randn(2, 7, E))
    assert q.shape == (2, H, 19, E // H)
    assert k.shape == v.shape == (2, 2, 7, E // H)


def test_dropout_only_while_training(x):
    torch.manual_seed(5)
    module = fm.MultiheadFlexAttention(E, H, dropout=0.5, backend="sdpa")
    with torch.no_grad():
        a, b = module(x), module(x)
        assert not torch.equal(a, b)
        module.eval()
        assert torch.equal(module(x), module(x))


# -- the flex backend (compiled: slow) ------------------------------------------------------

S_FLEX = 200  # one shape for every flex test: compiled once


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(masks_and_oracles(S_FLEX)))
@pytest.mark.parametrize("kv_heads", [H, 2])
def test_flex_matches_golden(case, kv_heads):
    torch.manual_seed(6)
    x = torch.randn(2, S_FLEX, E)
    module = fm.MultiheadFlexAttention(E, H, num_kv_heads=kv_heads, backend="flex")
    mask, oracle = masks_and_oracles(S_FLEX)[case]
    with torch.no_grad():
        out = module(x, mask=mask)
    assert not out.isnan().any()
    assert_close(out, golden(module, x, _dense4(oracle)))


@pytest.mark.slow
def test_flex_with_score_mod_and_block_mask_matches_golden():
    torch.manual_seed(7)
    x = torch.randn(2, S_FLEX, E)
    module = fm.MultiheadFlexAttention(E, H, score_mod=alibi, backend="flex")
    mask, oracle = masks_and_oracles(S_FLEX)["causal_padding"]
    bm = fm.block_mask(mask, S_FLEX, device="cpu")
    with torch.no_grad():
        out = module(x, mask=bm)
    assert_close(out, golden(module, x, _dense4(oracle), scores_fn=_alibi_scores))


@pytest.mark.slow
def test_flex_auto_and_sdpa_agree_for_cpu_inference():
    torch.manual_seed(8)
    x = torch.randn(2, S_FLEX, E)
    module = fm.MultiheadFlexAttention(E, H, backend="auto")
    mask = fm.causal() & fm.padding([S_FLEX, 50])
    outs = {}
    with torch.no_grad():
        assert module.backend_for(x, mask=mask) == "sparse"  # few blocks visited, on CPU
        for backend in ("auto", "flex", "sdpa"):
            module.backend = backend
            outs[backend] = module(x, mask=mask)
    torch.testing.assert_close(outs["auto"], outs["sdpa"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outs["flex"], outs["sdpa"], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_flex_cross_attention_matches_golden():
    torch.manual_seed(9)
    x, context = torch.randn(2, S_FLEX, E), torch.randn(2, 150, E)
    module = fm.MultiheadFlexAttention(E, H, num_kv_heads=2, backend="flex")
    with torch.no_grad():
        out = module(x, context, mask=fm.prefix_lm(40))
    assert_close(out, golden(module, x, ref.prefix_lm(S_FLEX, 150, 40)[:, None], context))


def test_the_blog_posts_call_a_positional_mask_and_return_qk():
    """attn(x, block_mask) as the FlexAttention blog writes it: a mask (or BlockMask) in the
    context's place is the mask; return_qk gives the q and k the scores see."""
    torch.manual_seed(0)
    attn = fm.MultiheadFlexAttention(E, H, backend="sdpa")
    x = torch.randn(2, 12, E)
    mask = fm.causal() & fm.padding([12, 7])
    want = attn(x, mask=mask)
    assert torch.equal(attn(x, mask), want)
    bm = fm.block_mask(mask, 12, block_size=16, device="cpu")
    assert torch.equal(attn(x, bm), want)
    out, q, k = attn(x, mask, return_qk=True)
    pq, pk, _ = attn.project(x)
    assert torch.equal(out, want) and torch.equal(q, pq) and torch.equal(k, pk)
    context = torch.randn(2, 5, E)  # a tensor in that place is still a context
    assert attn(x, context).shape == (2, 12, E)
    with pytest.raises(TypeError, match=r"gives two masks"):
        attn(x, mask, mask=mask)
    with pytest.raises(TypeError, match=r"must be a tensor \[B, S_kv, E\] .* got list"):
        attn(x, [1, 2])
    with pytest.raises(ValueError, match=r"return_qk=True\) with a cache is not supported"):
        attn(x, mask=fm.causal(), cache=fm.KVCache(2, 16, H, E // H), return_qk=True)


class ArticleModule(torch.nn.Module):
    """The module of the FlexAttention blog post the project started from, redone here: one
    fused input projection without bias (d_in -> 3 d_out), heads of d_out / n_heads, an output
    projection with bias, and (output, queries, keys) returned. Attention in float64 by hand."""

    def __init__(self, d_in, d_out, n_heads):
        super().__init__()
        self.n_heads, self.d_out = n_heads, d_out
        self.in_proj = torch.nn.Linear(d_in, 3 * d_out, bias=False)
        self.out_proj = torch.nn.Linear(d_out, d_out)

    def forward(self, x, dense):
        b, s, _ = x.shape
        q, k, v = self.in_proj(x).view(b, s, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)
        out = ref.attention(q.double(), k.double(), v.double(), dense).to(x.dtype)
        return self.out_proj(out.transpose(1, 2).reshape(b, s, self.d_out)), q, k


def test_the_articles_module_is_one_constructor_call():
    """MultiheadFlexAttention(d_in, n_heads, out_dim=d_out, bias=False, out_bias=True) with the
    article's weights gives its output, queries and keys."""
    torch.manual_seed(0)
    d_in, d_out, heads = 24, 32, 4
    theirs = ArticleModule(d_in, d_out, heads)
    ours = fm.MultiheadFlexAttention(d_in, heads, out_dim=d_out, bias=False, out_bias=True,
                                     backend="sdpa")  # fmt: skip
    assert ours.q_proj.bias is None and ours.out_proj.bias is not None
    with torch.no_grad():
        for i, proj in enumerate((ours.q_proj, ours.k_proj, ours.v_proj)):
            proj.weight.copy_(theirs.in_proj.weight[i * d_out : (i + 1) * d_out])
        ours.out_proj.load_state_dict(theirs.out_proj.state_dict())
    x = torch.randn(2, 10, d_in)
    mask = fm.causal() & fm.padding([10, 6])
    bm = fm.block_mask(mask, 10, block_size=16, device="cpu")
    out, q, k = ours(x, bm, return_qk=True)
    want, want_q, want_k = theirs(x, fm.to_dense(mask, 10))
    torch.testing.assert_close(q, want_q)
    torch.testing.assert_close(k, want_k)
    torch.testing.assert_close(out[0], want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[1, :6], want[1, :6], rtol=1e-5, atol=1e-6)  # real rows
    assert out.shape == (2, 10, d_out)


def test_kdim_and_vdim_take_contexts_of_other_widths():
    """As nn.MultiheadAttention: keys from a kdim-wide source, values from a vdim-wide one
    (a pair); against torch's own module with the same weights."""
    torch.manual_seed(1)
    torch_mha = torch.nn.MultiheadAttention(32, 4, kdim=12, vdim=20, batch_first=True)
    ours = fm.MultiheadFlexAttention(32, 4, kdim=12, vdim=20, backend="sdpa")
    with torch.no_grad():
        ours.q_proj.weight.copy_(torch_mha.q_proj_weight)
        ours.k_proj.weight.copy_(torch_mha.k_proj_weight)
        ours.v_proj.weight.copy_(torch_mha.v_proj_weight)
        for i, proj in enumerate((ours.q_proj, ours.k_proj, ours.v_proj)):
            proj.bias.copy_(torch_mha.in_proj_bias[i * 32 : (i + 1) * 32])
        ours.out_proj.load_state_dict(torch_mha.out_proj.state_dict())
    x, keys, values = torch.randn(2, 7, 32), torch.randn(2, 9, 12), torch.randn(2, 9, 20)
    want, _ = torch_mha(x, keys, values, need_weights=False)
    torch.testing.assert_close(ours(x, (keys, values)), want, rtol=1e-5, atol=1e-6)
    assert "kdim=12, vdim=20" in repr(ours)
    with pytest.raises(ValueError, match=r"pass context=\(keys_source, values_source\)"):
        ours(x, keys)
    with pytest.raises(ValueError, match=r"kdim=12, vdim=20: give a context"):
        ours(x)
    with pytest.raises(ValueError, match=r"forward\(context=...\) must have shape \[B, S, 20\]"):
        ours(x, (keys, keys))
    with pytest.raises(ValueError, match=r"out_dim must be divisible by num_heads"):
        fm.MultiheadFlexAttention(32, 4, out_dim=30)
    with pytest.raises(TypeError, match=r"out_bias=...\) must be True or False"):
        fm.MultiheadFlexAttention(32, 4, out_bias=1)
