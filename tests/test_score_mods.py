"""The score_mod library against peers' definitions (attention-gym's ALiBi, Transformers' ALiBi
slopes) and against the float64 golden of the module, forward and backward."""

import pytest
import torch

import flexmask as fm
from tests import reference as ref
from tests.test_attention import E, H, assert_close, golden

S = 40


def on_grid(mod, shape=(2, H, S, S), seed=0):
    """A score_mod on every score of ``shape``, by broadcasting (the mods are written with
    broadcasting tensor operations, as flex and the explicit softmax call them)."""
    b, h, q, kv = (torch.arange(n) for n in shape)
    scores = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return scores, mod(
        scores, b[:, None, None, None], h[None, :, None, None], q[:, None], kv[None, :]
    )


@pytest.mark.parametrize("heads", [1, 2, 4, 8, 16])
def test_alibi_is_attention_gyms(heads):
    gym = pytest.importorskip("attn_gym.mods", reason="attn-gym is in the `gym` extra")
    _, ours = on_grid(fm.alibi(heads), shape=(1, heads, S, S))
    _, theirs = on_grid(gym.generate_alibi_bias(heads), shape=(1, heads, S, S))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)


@pytest.mark.parametrize("heads", [3, 6, 8, 12, 20])
def test_alibi_slopes_are_transformers(heads):
    """Transformers' build_alibi_tensor (BLOOM) gives ``slope[h] * kv``; ours ``slope[h] *
    (kv - q)``: equal slopes, and a per-row constant the softmax ignores."""
    bloom = pytest.importorskip("transformers.models.bloom.modeling_bloom")
    theirs = bloom.build_alibi_tensor(torch.ones(1, S), heads, torch.float64)  # [H, 1, S]
    _, ours = on_grid(fm.alibi(heads), shape=(1, heads, S, S))
    scores_zero = ours - on_grid(fm.alibi(heads), shape=(1, heads, S, S))[0]  # the bias alone
    torch.testing.assert_close(scores_zero[0, :, 0, :], theirs[:, 0, :], rtol=1e-6, atol=1e-9)


def test_softcap_and_compose():
    scores, capped = on_grid(fm.softcap(2.0))
    torch.testing.assert_close(capped, 2.0 * torch.tanh(scores / 2.0))
    assert bool((capped.abs() < 2.0).all())
    both = fm.compose(fm.alibi(H), fm.softcap(2.0))
    _, got = on_grid(both)
    _, biased = on_grid(fm.alibi(H))
    torch.testing.assert_close(got, 2.0 * torch.tanh(biased / 2.0))
    assert repr(both) == f"compose(alibi({H}), softcap(2.0))"


def _bias_fn(mod):
    """The golden's scores_fn: the mod applied to [B, H, S, S] float64 scores."""

    def scores_fn(scores):
        b, h, q, kv = (torch.arange(n) for n in scores.shape)
        return mod(scores, b[:, None, None, None], h[None, :, None, None], q[:, None], kv[None, :])

    return scores_fn


@pytest.mark.parametrize("name", ["alibi", "softcap", "alibi_then_softcap"])
def test_the_module_with_a_score_mod_matches_the_golden(name):
    mod = {"alibi": fm.alibi(H), "softcap": fm.softcap(0.5),
           "alibi_then_softcap": fm.compose(fm.alibi(H), fm.softcap(0.5))}[name]  # fmt: skip
    torch.manual_seed(0)
    attn = fm.MultiheadFlexAttention(E, H, score_mod=mod)
    x = torch.randn(2, S, E, requires_grad=True)
    mask = fm.causal() & fm.padding([S, 25])
    dense = (ref.causal(S, S) & ref.padding(S, S, [S, 25]))[:, None]
    got = attn(x, mask=mask)
    x64 = x.detach().double().requires_grad_()
    want = golden(attn, x64, dense, scores_fn=_bias_fn(mod))
    assert_close(got, want.detach(), rel=1e-5)
    got.sum().backward()
    want.sum().backward()
    assert_close(x.grad, x64.grad, rel=1e-5)


def test_relative_bias_trains_its_table():
    torch.manual_seed(1)
    table = torch.nn.Parameter(torch.randn(H, 9))  # R = 4
    attn = fm.MultiheadFlexAttention(E, H, score_mod=fm.relative_bias(table))
    x = torch.randn(2, S, E)
    attn(x, mask=fm.causal()).square().sum().backward()
    table64 = table.detach().double().requires_grad_()
    want = golden(attn, x.double(), ref.causal(S, S)[:, None],
                  scores_fn=_bias_fn(fm.relative_bias(table64)))  # fmt: skip
    want.square().sum().backward()
    assert_close(table.grad, table64.grad, rel=1e-5)
    used = table.grad.abs().sum(0) > 0  # causal: offsets kv - q <= 0 only, columns 0..R
    assert used.tolist() == [True] * 5 + [False] * 4


# -- the sparse path: additive mods as a bias on each run ------------------------------------------

SPARSE_S, SPARSE_H, SPARSE_KV = 300, 4, 2
DOCS = [[0] * 100 + [1] * 120 + [2] * 80, [0] * 150 + [1] * 150]


def _sparse_case(name):
    """(mask, its dense oracle [B, 1, S, S]) with runs of every kind: strided windows, causal
    documents per batch row, and merged bidirectional documents (query blocks sharing keys)."""
    s = SPARSE_S
    return {
        "window": (fm.sliding_window(40), ref.sliding_window(s, s, 40)[None]),
        "causal_documents": (fm.causal() & fm.document(torch.tensor(DOCS)),
                             (ref.causal(s, s) & ref.document(s, s, DOCS))[:, None]),
        "documents": (fm.document(torch.tensor(DOCS)), ref.document(s, s, DOCS)[:, None]),
    }[name]  # fmt: skip


def _mods(table):
    return {"alibi": fm.alibi(SPARSE_H), "relative_bias": fm.relative_bias(table),
            "both": fm.compose(fm.alibi(SPARSE_H), fm.relative_bias(table))}  # fmt: skip


@pytest.mark.parametrize("mask_name", ["window", "causal_documents", "documents"])
@pytest.mark.parametrize("mod_name", ["alibi", "relative_bias", "both"])
@pytest.mark.parametrize("block_size", [64, (64, 32)])
def test_sparse_path_adds_additive_mods_as_the_golden(mask_name, mod_name, block_size):
    """sparse_attention(score_mod=...) equals a float64 softmax of the modded scores under the
    dense oracle, forward and backward, gradients of q, k, v and the table included (GQA)."""
    mask, dense = _sparse_case(mask_name)
    gen = torch.Generator().manual_seed(3)
    table = torch.randn(SPARSE_H, 9, generator=gen, requires_grad=True)
    q = torch.randn(2, SPARSE_H, SPARSE_S, 16, generator=gen, requires_grad=True)
    k, v = (torch.randn(2, SPARSE_KV, SPARSE_S, 16, generator=gen, requires_grad=True)
            for _ in range(2))  # fmt: skip
    got = fm.sparse_attention(q, k, v, mask, block_size=block_size,
                              score_mod=_mods(table)[mod_name])  # fmt: skip
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v, table)]
    want = ref.attention(*leaves64[:3], dense, scores_fn=_bias_fn(_mods(leaves64[3])[mod_name]))
    assert_close(got, want.detach(), rel=1e-5)
    seed = torch.randn(got.shape, generator=gen)
    inputs = [q, k, v] + ([table] if mod_name != "alibi" else [])
    grads = torch.autograd.grad(got, inputs, seed)
    wants = torch.autograd.grad(want, leaves64[: len(inputs)], seed.double())
    for name, g, w in zip("qkvt", grads, wants, strict=False):
        assert_close(g, w, rel=1e-5), name


def test_sparse_path_with_a_bias_passes_gradcheck():
    """float64 gradcheck and gradgradcheck (retain_graph recomputes the runs; create_graph
    takes the explicit path) through q, k, v and a relative-bias table."""
    gen = torch.Generator().manual_seed(4)
    mask = fm.sliding_window(10) & fm.document(torch.tensor([[0] * 12 + [1] * 20]))
    q, k, v = (torch.randn(1, 2, 32, 2, generator=gen, dtype=torch.float64, requires_grad=True)
               for _ in range(3))  # fmt: skip
    table = torch.randn(2, 5, generator=gen, dtype=torch.float64, requires_grad=True)

    def fn(q, k, v, table):
        mod = fm.compose(fm.alibi(2), fm.relative_bias(table))
        return fm.sparse_attention(q, k, v, mask, block_size=16, score_mod=mod)

    assert torch.autograd.gradcheck(fn, (q, k, v, table))
    assert torch.autograd.gradgradcheck(fn, (q, k, v, table))


def test_auto_trains_additive_mods_on_the_sparse_path():
    """Training on CPU under a window: auto takes the sparse path for ALiBi and a relative bias
    (O(S * window)), the explicit softmax for soft-capping, which the sparse path cannot add."""
    x = torch.randn(1, 1024, E)
    table = torch.zeros(H, 5, requires_grad=True)
    for mod, backend in ((fm.alibi(H), "sparse"), (fm.relative_bias(table), "sparse"),
                         (fm.compose(fm.alibi(H), fm.softcap(5.0)), "sdpa")):  # fmt: skip
        attn = fm.MultiheadFlexAttention(E, H, score_mod=mod)
        assert attn.backend_for(x, mask=fm.sliding_window(128)) == backend, mod


@pytest.mark.parametrize(
    "call",
    [
        lambda q: fm.sparse_attention(q, q, q, fm.causal(), score_mod=fm.softcap(5.0)),
        lambda q: fm.sparse_attention(q, q, q, fm.causal(), score_mod=lambda s, b, h, i, j: s),
        lambda q: fm.MultiheadFlexAttention(E, H, backend="sparse", score_mod=fm.softcap(5.0))(
            torch.randn(1, 8, E), mask=fm.causal()
        ),
    ],
    ids=["softcap", "plain_function", "module"],
)
def test_sparse_path_refuses_what_it_cannot_add(call):
    with pytest.raises(ValueError, match=r"additive score_mods \(alibi, relative_bias"):
        call(torch.randn(1, 2, 8, 4))


@pytest.mark.parametrize(
    "backend", ["sdpa", "sparse", pytest.param("flex", marks=pytest.mark.slow)]
)
@pytest.mark.parametrize("left_padded", [False, True])
def test_a_cached_call_gives_the_score_mod_cache_positions(backend, left_padded):
    """With a KV cache, the score_mod sees each query at its position in the cache, as it sees
    the keys: prefill then decode equals one call on the whole sequence. (A relative bias once
    measured a decode step's distances from position 0; ALiBi hid it, its row shift cancels.)"""
    torch.manual_seed(5)
    mod = fm.compose(fm.alibi(H), fm.relative_bias(torch.randn(H, 7)))
    attn = fm.MultiheadFlexAttention(E, H, score_mod=mod, backend=backend).eval()
    x = torch.randn(2, 12, E)
    lengths = torch.tensor([8, 5])
    cache = fm.KVCache(2, 16, H, E // H)
    with torch.no_grad():
        prompt = x[:, :8]
        if left_padded:  # row 1's 5 real tokens at the end of the prompt
            prompt = torch.stack([x[0, :8], torch.cat([torch.zeros(3, E), x[1, :5]])])
        first = attn(prompt, mask=fm.causal(), cache=cache, lengths=lengths,
                     padding_side="left" if left_padded else "right")  # fmt: skip
        steps = [attn(x[:, None, i], mask=fm.causal(), cache=cache) for i in range(8, 11)]
        for row, n in enumerate(lengths.tolist()):
            whole = attn(torch.cat([x[row : row + 1, :n], x[row : row + 1, 8:11]], 1),
                         mask=fm.causal())  # fmt: skip
            real = first[row, -n:] if left_padded else first[row, :n]
            assert_close(real, whole[0, :n], rel=1e-5)
            assert_close(torch.cat([s[row] for s in steps]), whole[0, n:], rel=1e-5)


@pytest.mark.slow
def test_flex_applies_the_score_mods_as_the_explicit_softmax():
    """Compiled flex on CPU (inference) with compose(alibi, softcap) equals the sdpa backend's
    explicit softmax."""
    mod = fm.compose(fm.alibi(4), fm.softcap(0.5))
    torch.manual_seed(2)
    x = torch.randn(2, 200, 32)  # the compiled tests' shape
    flex = fm.MultiheadFlexAttention(32, 4, score_mod=mod, backend="flex")
    explicit = fm.MultiheadFlexAttention(32, 4, score_mod=mod, backend="sdpa")
    explicit.load_state_dict(flex.state_dict())
    mask = fm.causal() & fm.padding([200, 70])
    with torch.no_grad():
        torch.testing.assert_close(flex(x, mask=mask), explicit(x, mask=mask), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: fm.alibi(0), ValueError, r"alibi\(num_heads=...\)"),
        (lambda: fm.alibi(2.0), TypeError, r"alibi\(num_heads=...\)"),
        (lambda: fm.softcap(0.0), ValueError, r"positive finite number, got 0.0"),
        (lambda: fm.softcap(float("inf")), ValueError, r"positive finite number"),
        (lambda: fm.softcap("30"), TypeError, r"softcap\(cap=...\) needs a number"),
        (lambda: fm.relative_bias(torch.zeros(2, 4)), ValueError, r"odd number of offsets"),
        (lambda: fm.relative_bias(torch.zeros(2, 5, dtype=torch.long)), TypeError, r"floating"),
        (lambda: fm.compose(), ValueError, r"at least one score_mod"),
        (lambda: fm.compose(fm.alibi(2), 3), TypeError, r"argument 1 is int"),
    ],
)
def test_score_mods_refuse_bad_arguments(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_score_pictures_show_the_weights_after_the_mod(tmp_path):
    """save_scores_png(score_mod=...) draws softmax(scale * q k^T + bias) under the mask: the
    weights equal the float64 golden's, and the title names the mod."""
    from flexmask.viz.picture import score_weights

    torch.manual_seed(3)
    q, k = torch.randn(1, 2, 12, 8), torch.randn(1, 2, 12, 8)
    mod = fm.alibi(2)
    weights, _, expr = score_weights(q, k, fm.causal(), 0, 1, None, mod)
    scores = (q[0, 1].double() @ k[0, 1].double().T) / 8**0.5
    scores = scores + (torch.arange(12)[None] - torch.arange(12)[:, None]) * 2.0**-8  # head 1
    want = torch.softmax(scores.masked_fill(~ref.causal(12, 12)[0], float("-inf")), -1)
    torch.testing.assert_close(weights, want)
    assert expr == "causal(), alibi(2)"
    path = fm.save_scores_png(q, k, tmp_path / "alibi.png", mask=fm.causal(), head=1, score_mod=mod)
    assert path.stat().st_size > 0
    with pytest.raises(TypeError, match=r"save_scores_png\(score_mod=...\) must be a callable"):
        fm.save_scores_png(q, k, tmp_path / "x.png", score_mod=3)


def test_rotary_positions_with_a_positional_score_mod_are_refused():
    """forward(positions=...) places tokens for rotary embeddings only; a score_mod reading
    q_idx/kv_idx would see slots, not those positions (a tree's candidates), so it is refused;
    soft-capping reads no position and is allowed."""
    x = torch.randn(1, 6, E)
    positions = torch.tensor([0, 1, 2, 2, 3, 3])  # a tree: siblings share a position
    for mod in (fm.alibi(H), fm.compose(fm.softcap(5.0), fm.relative_bias(torch.zeros(H, 3))),
                lambda s, b, h, q, kv: s):  # fmt: skip
        attn = fm.MultiheadFlexAttention(E, H, rope_theta=10000.0, score_mod=mod)
        with pytest.raises(ValueError, match=r"reads query and key indices"):
            attn(x, mask=fm.causal(), positions=positions)
    capped = fm.MultiheadFlexAttention(E, H, rope_theta=10000.0, score_mod=fm.softcap(5.0))
    assert capped(x, mask=fm.causal(), positions=positions).shape == x.shape
