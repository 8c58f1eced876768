"""The block-sparse CPU path (``sparse_attention``, ``backend="sparse"``) and backend dispatch,
against a float64 softmax golden on the dense oracle."""

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import flexmask as fm
import flexmask.dispatch as dispatch
from flexmask.runners import MaskForms
from flexmask.sparse_plan import _PLANS
from tests import reference as ref
from tests.test_attention import E, H, _dense4, golden, masks_and_oracles
from tests.test_masks import expressions


def rel_err(got, want):
    """Norm-wise relative error (0 when both are 0)."""
    scale = want.norm().item()
    err = (got.double() - want).norm().item()
    return err / scale if scale else err


def run_both(mask, dense, bsz, nh, nkv, s_q, s_kv, dim, block_size, dtype, seed=0):
    """Forward and gradients of the sparse path in ``dtype`` and of the float64 golden on the
    dense mask ``dense`` (broadcastable to ``[B, H, S, S_kv]``)."""
    gen = torch.Generator().manual_seed(seed)
    q64 = torch.randn(bsz, nh, s_q, dim, generator=gen, dtype=torch.float64)
    k64 = torch.randn(bsz, nkv, s_kv, dim, generator=gen, dtype=torch.float64)
    v64 = torch.randn(bsz, nkv, s_kv, dim, generator=gen, dtype=torch.float64)
    grad = torch.randn(bsz, nh, s_q, dim, generator=gen, dtype=torch.float64)
    q, k, v = (t.to(dtype).requires_grad_() for t in (q64, k64, v64))
    out = fm.sparse_attention(q, k, v, mask, block_size=block_size)
    got = (out, *torch.autograd.grad(out, (q, k, v), grad.to(dtype)))
    q64, k64, v64 = (t.requires_grad_() for t in (q64, k64, v64))
    want = ref.attention(q64, k64, v64, dense)
    return got, (want, *torch.autograd.grad(want, (q64, k64, v64), grad))


@given(
    pair=expressions(23, 29),
    block_size=st.sampled_from([16, 32]),
    heads=st.sampled_from([(2, 2), (4, 2), (2, 1)]),
)
def test_matches_float64_golden_for_random_masks(pair, block_size, heads):
    """Every mask family and composition, q_len != kv_len, sizes that are not block multiples,
    GQA, fully masked rows: forward and the three gradients, in float64."""
    mask, oracle = pair
    got, want = run_both(mask, _dense4(oracle), 2, *heads, 23, 29, 8, block_size, torch.float64)
    for g, w in zip(got, want, strict=True):
        assert not g.isnan().any()
        assert rel_err(g, w) < 1e-12


def _more_cases(s):
    """Bidirectional documents and a prefix: query blocks that read the same keys are merged
    into one SDPA call."""
    return {
        "bidirectional_documents": (fm.packed([150, 150]), ref.packed(s, s, [150, 150])),
        "prefix_padding": (
            fm.prefix_lm(140) & fm.padding([s, 200]),
            ref.prefix_lm(s, s, 140) & ref.padding(s, s, [s, 200]),
        ),
    }


@pytest.mark.parametrize(
    "name",
    ["causal", "causal_padding", "window_or_chunk", "documents", "bidirectional_documents",
     "prefix_padding"],
)  # fmt: skip
@pytest.mark.parametrize("heads", [(4, 4), (4, 2)])
def test_float32_within_2e6_of_float64_golden(name, heads):
    mask, oracle = {**masks_and_oracles(300, 300), **_more_cases(300)}[name]
    got, want = run_both(mask, _dense4(oracle), 2, *heads, 300, 300, 32, 64, torch.float32)
    for g, w in zip(got, want, strict=True):
        assert rel_err(g, w) < 2e-6


def test_fully_masked_rows_give_zeros_and_zero_gradients():
    mask = fm.causal() & fm.padding([40, 0], side="left")  # row 1 sees nothing at all
    q = torch.randn(2, 2, 40, 8, requires_grad=True)
    k = torch.randn(2, 2, 40, 8, requires_grad=True)
    out = fm.sparse_attention(q, k, k, mask, block_size=16)
    out.sum().backward()
    assert not out.isnan().any() and not q.grad.isnan().any() and not k.grad.isnan().any()
    assert out[1].eq(0).all() and q.grad[1].eq(0).all() and k.grad[1].eq(0).all()
    assert out[0].ne(0).any()


def _causal_squares(bm, grouped=False):
    """The (mask row, first block, blocks) of the plan's causal squares; ``grouped``: the
    squares of each SDPA call together."""
    runs = [r for r in fm.sparse_plan.plan(bm).runs if r.causal]
    calls = [[(r.row, int(q[0]), len(q)) for q in r.seq_blocks()[0]] for r in runs]
    return calls if grouped else [square for call in calls for square in call]


DOC_ROWS = [[0] * 256 + [1] * 256, [0] * 128 + [1] * 300 + [2] * 84]


@pytest.mark.parametrize(
    "name, squares",
    [
        ("aligned documents", [(0, 0, 2), (0, 2, 2), (0, 4, 4)]),
        ("causal", [(0, 0, 8)]),
        ("unaligned documents", [(0, 0, 1)]),  # later blocks straddle documents
        ("documents per batch row", [(0, 0, 4), (0, 4, 4), (1, 0, 2), (1, 2, 4)]),
        ("strictly causal", []),  # causal-looking blocks, but no diagonal
        ("causal, queries past the keys", [(0, 0, 7)]),  # block 7 would see padded keys
        ("equal squares apart", [(0, 0, 2), (0, 3, 2), (0, 5, 3)]),  # bidirectional doc between
    ],
)
def test_causal_squares_are_exact(name, squares):
    """Documents of a packed causal batch run as SDPA's is_causal squares; the plan takes a square
    only where the elements are exactly causal, and the result equals the float64 golden."""
    s, s_kv = (512, 480) if name == "causal, queries past the keys" else (512, 512)
    docs = torch.tensor([0] * 128 + [1] * 64 + [2] * 128 + [3] * 192)
    same, bidirectional = docs[:, None] == docs, (docs == 1)[:, None]

    def apart(b, h, q, kv):  # documents 0, 2, 3 causal, document 1 bidirectional
        return (docs[q] == docs[kv]) & ((kv <= q) | (docs[q] == 1))

    mask, dense = {
        "equal squares apart": (apart, (same & (ref.causal(s, s)[0] | bidirectional))[None]),
        "aligned documents": (fm.packed([128, 128, 256]) & fm.causal(),
                              ref.packed(s, s, [128, 128, 256]) & ref.causal(s, s)),
        "causal": (fm.causal(), ref.causal(s, s)),
        "unaligned documents": (fm.packed([100, 412]) & fm.causal(),
                                ref.packed(s, s, [100, 412]) & ref.causal(s, s)),
        "documents per batch row": (fm.document(torch.tensor(DOC_ROWS)) & fm.causal(),
                                    ref.document(s, s, DOC_ROWS) & ref.causal(s, s)),
        "strictly causal": (lambda b, h, q, kv: kv < q, ref.causal(s, s).tril(-1)),
        "causal, queries past the keys": (lambda b, h, q, kv: kv <= q, ref.causal(s, s_kv)),
    }[name]  # fmt: skip
    bsz = dense.shape[0]
    bm = fm.block_mask(mask, s, s_kv, batch=bsz, block_size=64, device="cpu", compile=False)
    assert _causal_squares(bm) == squares
    if name in ("aligned documents", "equal squares apart"):  # equal squares: one batched call
        assert _causal_squares(bm, grouped=True)[0] == squares[:2]
    got, want = run_both(bm, _dense4(dense), bsz, 4, 2, s, s_kv, 8, 64, torch.float64)
    for g, w in zip(got, want, strict=True):
        assert rel_err(g, w) < 1e-12


@pytest.mark.parametrize("mod_name", [None, "alibi", "relative_bias"])
@pytest.mark.parametrize("mask_name", ["causal, capped", "packed"])
def test_causal_squares_take_a_score_mod(monkeypatch, mask_name, mod_name):
    """A long causal run is cut at CAUSAL_SQUARE_MAX_TOKENS (a bias spans the whole square);
    equal documents are one batched call. With a score_mod the squares' bias and causal mask are
    added as one mask. Forward, backward (the table's gradient too) and double backward (the
    explicit softmax) equal the golden."""
    from tests.test_score_mods import _bias_fn

    monkeypatch.setattr(fm.sparse_plan, "CAUSAL_SQUARE_MAX_TOKENS", 128)
    mask, dense, calls = {
        "causal, capped": (fm.causal(), ref.causal(300, 300), [[(0, 0, 2)]]),
        "packed": (fm.packed([128, 128, 44]) & fm.causal(),
                   ref.packed(300, 300, [128, 128, 44]) & ref.causal(300, 300),
                   [[(0, 0, 2), (0, 2, 2)], [(0, 4, 1)]]),
    }[mask_name]  # fmt: skip
    bm = fm.block_mask(mask, 300, block_size=64, device="cpu", compile=False)
    assert _causal_squares(bm, grouped=True) == calls
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 4, 300, 8, generator=gen, dtype=torch.float64, requires_grad=True)
               for _ in range(3))  # fmt: skip
    table = torch.randn(4, 9, generator=gen, dtype=torch.float64, requires_grad=True)
    mod = {None: None, "alibi": fm.alibi(4), "relative_bias": fm.relative_bias(table)}[mod_name]
    leaves = (q, k, v, table) if mod_name == "relative_bias" else (q, k, v)
    out = fm.sparse_attention(q, k, v, bm, score_mod=mod)
    want = ref.attention(q, k, v, dense, scores_fn=mod and _bias_fn(mod))
    assert rel_err(out, want) < 1e-12
    grads = torch.autograd.grad(out.square().sum(), leaves, create_graph=True)
    wants = torch.autograd.grad(want.square().sum(), leaves, create_graph=True)
    for g, w in zip(grads, wants, strict=True):
        assert rel_err(g, w) < 1e-12
    second = torch.autograd.grad(sum(g.square().sum() for g in grads), leaves)
    second_want = torch.autograd.grad(sum(w.square().sum() for w in wants), leaves)
    for g, w in zip(second, second_want, strict=True):
        assert rel_err(g, w) < 1e-10


def test_per_head_block_mask_and_shared_batch_row():
    """A plain callable that depends on the head (a per-head BlockMask, GQA keys) and a
    one-row BlockMask broadcast over the batch."""

    def per_head(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx >= 0) & (q_idx - kv_idx < 8 * (h + 1))

    heads = torch.arange(4)[:, None, None]
    pos = torch.arange(70)
    oracle = (pos[:, None] >= pos) & (pos[:, None] - pos < 8 * (heads + 1))  # [4, 70, 70]
    bm = fm.block_mask(per_head, 70, heads=4, block_size=16, device="cpu", compile=False)
    got, want = run_both(bm, oracle[None], 3, 4, 2, 70, 70, 8, 16, torch.float64)
    for g, w in zip(got, want, strict=True):
        assert rel_err(g, w) < 1e-12


def test_block_mask_evaluated_once_per_block_mask(monkeypatch):
    calls = []
    evaluate = fm.sparse_plan.evaluate_tiles

    def counted(*args):
        calls.append(1)
        return evaluate(*args)

    monkeypatch.setattr(fm.sparse_plan, "evaluate_tiles", counted)
    bm = fm.block_mask(fm.causal() & fm.padding([50]), 64, block_size=16, device="cpu")
    q = torch.randn(1, 2, 64, 8)
    first = fm.sparse_attention(q, q, q, bm)
    n = len(calls)
    assert n > 0
    assert torch.equal(fm.sparse_attention(q, q, q, bm), first)
    assert len(calls) == n  # the second call reused the plan
    assert any(entry[0] is bm for entry in _PLANS.values())


def test_plain_callables_are_evaluated_afresh():
    """A mask_mod reading a buffer the caller refills in place: every call sees the new values
    (flexmask cannot see what a plain callable reads, so nothing built from it is cached)."""
    doc = torch.zeros(64, dtype=torch.long)

    def same_doc(b, h, q_idx, kv_idx):
        return doc[q_idx] == doc[kv_idx]

    torch.manual_seed(0)
    q = torch.randn(1, 2, 64, 8, dtype=torch.float64)
    for step in range(3):
        doc.copy_(torch.arange(64) // (8 * (step + 1)))  # new documents, same buffer
        oracle = ref.document(64, 64, doc.tolist())[:, None]
        got = fm.sparse_attention(q, q, q, same_doc, block_size=16)
        torch.testing.assert_close(got, ref.attention(q, q, q, oracle))


def test_module_sparse_backend_trains_like_the_golden():
    torch.manual_seed(4)
    x = torch.randn(2, 45, E)
    module = fm.MultiheadFlexAttention(E, H, num_kv_heads=2, backend="sparse", block_size=16)
    mask, oracle = masks_and_oracles(45)["documents"]
    xg = x.clone().requires_grad_()
    module(xg, mask=mask).square().sum().backward()
    ghost = copy.deepcopy(module).double()
    x64 = x.double().requires_grad_()
    golden(ghost, x64, _dense4(oracle)).square().sum().backward()
    assert rel_err(xg.grad, x64.grad) < 2e-6
    # All parameter gradients as one vector: the key bias's is exactly 0 in exact arithmetic.
    grads = torch.cat([p.grad.flatten() for p in module.parameters()])
    assert rel_err(grads, torch.cat([g.grad.flatten() for g in ghost.parameters()])) < 2e-6


def test_sparse_backend_with_a_cache_matches_sdpa():
    torch.manual_seed(5)
    module = fm.MultiheadFlexAttention(E, H, backend="sparse", block_size=16).eval()
    prompt, step = torch.randn(2, 20, E), torch.randn(2, 1, E)
    outs = {}
    for backend in ("sparse", "sdpa"):
        module.backend = backend
        cache = fm.KVCache(2, 40, H, E // H)
        with torch.no_grad():
            outs[backend] = torch.cat(
                [module(prompt, mask=fm.causal(), cache=cache),
                 module(step, mask=fm.causal(), cache=cache)], dim=1)  # fmt: skip
    torch.testing.assert_close(outs["sparse"], outs["sdpa"], rtol=1e-5, atol=1e-6)


# -- dispatch -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mask", "grad", "expected"),
    [
        (None, False, "sdpa"),
        (fm.full(), True, "sdpa"),
        (fm.causal(), True, "sdpa"),  # SDPA's is_causal kernel
        (fm.causal(), False, "sdpa"),
        (fm.sliding_window(16), True, "sparse"),  # density 0.13 at 256 tokens
        (fm.packed([64] * 4) & fm.causal(), False, "sparse"),  # 0.16
        (fm.causal() & fm.padding([256, 200]), True, "sparse"),  # 0.44
        (~fm.sliding_window(8), False, "sdpa"),  # everything but a band: 1.0
    ],
)
def test_auto_dispatch_on_cpu(mask, grad, expected):
    module = fm.MultiheadFlexAttention(E, H, block_size=32)
    module.requires_grad_(grad)
    assert module.backend_for(torch.zeros(2, 256, E), mask=mask) == expected
    assert expected in dispatch.BACKENDS  # what backend= takes


@pytest.mark.parametrize(
    ("facts", "expected"),
    [
        ({}, "flex"),
        ({"needs_grad": True}, "flex"),  # flex trains on accelerators
        ({"dropout": True}, "sdpa"),  # flex has no dropout
        ({"shapes_vary": True}, "sdpa"),  # a new length every call would be a compile each
        ({"shapes_vary": True, "score_mod": True}, "flex"),  # only flex applies a score_mod fast
    ],
)
def test_auto_dispatch_on_an_accelerator(facts, expected):
    q = torch.empty(2, H, 256, E // H, device="meta")  # not CPU: stands in for CUDA
    forms = MaskForms(fm.sliding_window(16))
    call = dict(needs_grad=False, dropout=False, score_mod=False, softmax_only=False,
                decoding=False, shapes_vary=False) | facts  # fmt: skip
    assert dispatch.choose("auto", dispatch.Call(q, 256, **call), forms) == expected


def test_blocks_torch_cannot_train_go_to_sdpa(monkeypatch):
    """Where torch's backward kernel has no tile for the blocks (bf16 at 64 on an H200, found
    by ``make gpu-check``), auto trains with SDPA and flex says why it cannot; inference and
    blocks of 128 stay on flex."""
    q = torch.empty(2, H, 256, E // H, device="meta")  # not CPU: stands in for CUDA

    def refuse(q, sizes):
        return "no tile of 128 keys divides 64" if sizes[1] % 128 else None

    monkeypatch.setattr(dispatch, "backward_tiles_refuse", refuse)
    call = dict(dropout=False, score_mod=False, softmax_only=False, decoding=False,
                shapes_vary=False)  # fmt: skip
    for block_size, grad, expected in [
        (64, True, "sdpa"),
        (64, False, "flex"),
        (128, True, "flex"),
    ]:
        forms = MaskForms(fm.sliding_window(16), block_size=block_size)
        facts = dispatch.Call(q, 256, needs_grad=grad, **call)
        assert dispatch.choose("auto", facts, forms) == expected
    with pytest.raises(ValueError, match=r"backend='flex' cannot train here: no tile of 128 keys"):
        dispatch.choose("flex", dispatch.Call(q, 256, needs_grad=True, **call),
                        MaskForms(fm.sliding_window(16), block_size=64))  # fmt: skip
    from flexmask.runners import backward_tiles_refuse

    assert backward_tiles_refuse(torch.zeros(1, 1, 256, 8), (64, 64)) is None  # not CUDA


def test_square_causal_runs_sdpa_is_causal_once_its_block_mask_is_built(monkeypatch):
    """The GPU benchmark built the BlockMask first, and auto then ran the dense mask instead
    of ``is_causal`` (3-4x slower on an H200)."""
    import flexmask.runners as runners

    q, k, v = (torch.randn(1, 2, 64, 8) for _ in range(3))
    forms = MaskForms(fm.causal(), block_size=16)
    forms.block_mask(q, 64)
    monkeypatch.setattr(runners, "masked_sdpa", lambda *a, **kw: pytest.fail("dense mask ran"))
    out = runners.sdpa(q, k, v, forms, runners.Options())
    assert torch.equal(
        out, torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    )


def test_auto_dispatch_threshold_can_be_overridden():
    x = torch.zeros(2, 256, E)
    mask = fm.causal() & fm.padding([256, 200])  # density 0.44
    assert fm.MultiheadFlexAttention(E, H, block_size=32).backend_for(x, mask=mask) == "sparse"
    strict = fm.MultiheadFlexAttention(E, H, block_size=32, sparse_max_density=0.3)
    assert strict.backend_for(x, mask=mask) == "sdpa"
    assert dispatch.SPARSE_MAX_DENSITY > 0.3


@pytest.mark.parametrize("name", ["none", "causal", "causal_padding", "documents"])
def test_auto_training_matches_golden_whatever_it_picks(name):
    torch.manual_seed(6)
    x = torch.randn(2, 64, E)
    module = fm.MultiheadFlexAttention(E, H, block_size=16)
    mask, oracle = masks_and_oracles(64)[name]
    xg = x.clone().requires_grad_()
    out = module(xg, mask=mask)
    out.square().sum().backward()
    ghost = copy.deepcopy(module).double()
    x64 = x.double().requires_grad_()
    want = golden(ghost, x64, _dense4(oracle))
    want.square().sum().backward()
    assert rel_err(out, want) < 2e-6
    assert rel_err(xg.grad, x64.grad) < 2e-6


def test_sparse_refuses_score_mod_and_bad_inputs():
    module = fm.MultiheadFlexAttention(E, H, backend="sparse", score_mod=lambda s, b, h, q, k: s)
    with pytest.raises(ValueError, match="has no other score_mod"):
        module(torch.randn(1, 8, E), mask=fm.causal())
    q = torch.randn(1, 4, 32, 8)
    with pytest.raises(ValueError, match="4-D tensor"):
        fm.sparse_attention(q[0], q, q)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        fm.sparse_attention(q, q[:, :3], q[:, :3])
    with pytest.raises(TypeError, match="one floating dtype"):
        fm.sparse_attention(q, q.double(), q)
    bm = fm.block_mask(fm.causal(), 48, block_size=16, device="cpu")
    with pytest.raises(ValueError, match=r"flexmask.block_mask\(mask, q_len=32, kv_len=32\)"):
        fm.sparse_attention(q, q, q, bm)
    with pytest.raises(ValueError, match="dropout_p"):
        fm.sparse_attention(q, q, q, dropout_p=1.0)


def test_sparse_dropout_only_while_training():
    torch.manual_seed(3)
    x = torch.randn(2, 40, E, requires_grad=True)
    module = fm.MultiheadFlexAttention(E, H, dropout=0.5, backend="sparse", block_size=16)
    mask = fm.sliding_window(12)
    a, b = module(x, mask=mask), module(x, mask=mask)
    assert not torch.equal(a, b)
    a.sum().backward()  # dropout masks are kept for the backward pass
    assert x.grad is not None and not x.grad.isnan().any()
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(module(x, mask=mask), module(x, mask=mask), rtol=0, atol=0)


def test_backend_for_says_what_forward_runs():
    module = fm.MultiheadFlexAttention(E, H, block_size=16)
    x = torch.randn(2, 64, E)
    assert module.backend_for(x, mask=fm.causal()) == "sdpa"  # its is_causal kernel
    assert module.backend_for(x, torch.randn(2, 48, E), mask=fm.causal()) == "sparse"
    assert module.backend_for(x, mask=fm.packed([32, 32]) & fm.causal()) == "sparse"
    assert module.backend_for(x) == "sdpa"
    module.backend = "flex"
    with torch.no_grad():
        assert module.backend_for(x) == "flex"
    with pytest.raises(ValueError, match="cannot train on CPU"):  # the weights need gradients
        module.backend_for(x)
