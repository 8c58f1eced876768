"""block_mask against the dense oracle block by block; the cache; describe and check."""

import functools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch._dynamo.utils import counters

import flexmask as fm
from flexmask.evaluation import block_kinds
from tests import reference as ref
from tests.test_masks import CASES, expressions


@st.composite
def problems(draw):
    block = draw(st.sampled_from([16, 32, 64, 128]))
    q = draw(st.integers(1, 4 * block + 3))
    kv = draw(st.integers(1, 4 * block + 3))
    mask, oracle = draw(expressions(q, kv, max_leaves=4))
    return mask, oracle, q, kv, block


@given(problems())
def test_block_mask_agrees_with_dense_block_by_block(problem):
    mask, oracle, q, kv, block = problem
    bm = fm.block_mask(mask, q, kv, block_size=block, device="cpu", compile=False, cache=False)
    assert bm.seq_lengths == (q, kv)
    kinds = block_kinds(bm)[:, 0]  # full exactly on all-True tiles, empty exactly on all-False
    want = ref.block_kinds(oracle, block)
    assert torch.equal(kinds, want.expand_as(kinds))
    dense = fm.block_mask_to_dense(bm)[:, 0]
    assert torch.equal(dense, oracle.expand_as(dense))


@pytest.mark.parametrize("block", [16, 64])
@pytest.mark.parametrize("name", sorted(CASES))
def test_every_factory_marks_full_and_empty_blocks_exactly(name, block):
    for q, kv in ((200, 200), (130, 260)):
        mask, oracle = CASES[name](q, kv)
        bm = fm.block_mask(mask, q, kv, block_size=block, device="cpu", cache=False)
        kinds = block_kinds(bm)[:, 0]
        want = ref.block_kinds(oracle, block)
        assert torch.equal(kinds, want.expand_as(kinds)), (q, kv)


@pytest.mark.parametrize("name", sorted(CASES))
def test_rectangular_blocks_equal_torchs(name):
    """block_size=(q_block, kv_block), as torch's BLOCK_SIZE: the same tables as its builder,
    on and off block multiples, and the dense oracle back."""
    for q, kv in ((256, 256), (200, 200), (130, 260)):
        mask, oracle = CASES[name](q, kv)
        for sizes in ((32, 64), (64, 16)):
            kw = dict(block_size=sizes, device="cpu", cache=False)
            ours = fm.block_mask(mask, q, kv, method="tiles", **kw)
            theirs = fm.block_mask(mask, q, kv, method="create_block_mask", compile=False, **kw)
            assert sizes == ours.BLOCK_SIZE
            ref.assert_same_block_tables(ours, theirs)
            dense = fm.block_mask_to_dense(ours)[:, 0]
            assert torch.equal(dense, oracle.expand_as(dense)), (q, kv, sizes)


def test_rectangular_blocks_in_the_module_and_sparse_attention():
    """The module's sparse path and sparse_attention on (q_block, kv_block) blocks against the
    float64 golden, forward and backward."""
    mask = fm.causal() & fm.padding([200, 77]) | fm.chunked(40)
    oracle = ref.causal(200, 200) & ref.padding(200, 200, [200, 77]) | ref.chunked(200, 200, 40)
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 4, 200, 8, generator=gen, dtype=torch.float64, requires_grad=True)
               for _ in range(3))  # fmt: skip
    out = fm.sparse_attention(q, k, v, mask, block_size=(32, 64))
    want = ref.attention(q, k, v, oracle[:, None])
    torch.testing.assert_close(out, want)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    want_grads = torch.autograd.grad(want.sum(), (q, k, v))
    for got, expected in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(got, expected)
    attn = fm.MultiheadFlexAttention(32, 4, backend="sparse", block_size=(64, 32))
    assert attn.block_size == (64, 32)
    x = torch.randn(2, 200, 32)
    square = fm.MultiheadFlexAttention(32, 4, backend="sdpa")
    square.load_state_dict(attn.state_dict())
    torch.testing.assert_close(attn(x, mask=mask), square(x, mask=mask), rtol=1e-5, atol=1e-6)


@given(problems(), st.sampled_from([None, 3]))
def test_tiles_build_the_same_block_mask_as_torch(problem, heads):
    mask, _, q, kv, block = problem
    kw = dict(block_size=block, device="cpu", cache=False, heads=heads)
    tiles = fm.block_mask(mask, q, kv, method="tiles", **kw)
    torch_bm = fm.block_mask(mask, q, kv, method="create_block_mask", compile=False, **kw)
    ref.assert_same_block_tables(tiles, torch_bm)


def test_tiles_refuse_plain_callables():
    def causal_fn(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx

    with pytest.raises(
        ValueError, match=r"method='tiles'\) needs a mask made of flexmask factories"
    ):
        fm.block_mask(causal_fn, 64, device="cpu", method="tiles")
    with pytest.raises(ValueError, match=r"block_mask\(method=...\) must be one of"):
        fm.block_mask(fm.causal(), 64, device="cpu", method="fast")
    auto = fm.block_mask(causal_fn, 64, block_size=16, device="cpu", compile=False)  # falls back
    assert torch.equal(
        block_kinds(auto), block_kinds(fm.block_mask(fm.causal(), 64, block_size=16, device="cpu"))
    )


def test_block_mask_shapes_follow_batch_and_heads():
    bm = fm.block_mask(fm.causal(), 256, device="cpu", compile=False)
    assert bm.kv_num_blocks.shape == (1, 1, 2)
    bm = fm.block_mask(fm.causal() & fm.padding([3, 4, 5]), 256, device="cpu", compile=False)
    assert bm.kv_num_blocks.shape == (3, 1, 2)  # batch inferred from the per-batch lengths
    bm = fm.block_mask(fm.causal(), 256, 384, batch=2, heads=3, device="cpu", compile=False)
    assert bm.kv_num_blocks.shape == (2, 3, 2) and bm.seq_lengths == (256, 384)
    assert isinstance(bm.mask_mod, fm.MaskMod)


def test_cache_keys_by_value_for_scalar_masks_and_identity_otherwise():
    a = fm.block_mask(fm.sliding_window(64), 256, device="cpu", compile=False)
    assert fm.block_mask(fm.sliding_window(64), 256, device="cpu", compile=False) is a
    assert fm.block_mask(fm.sliding_window(64), 256, block_size=64, device="cpu",
                         compile=False) is not a  # fmt: skip
    pad = fm.padding([100])
    b = fm.block_mask(pad, 256, device="cpu", compile=False)
    assert fm.block_mask(pad, 256, device="cpu", compile=False) is b
    assert fm.block_mask(fm.padding([100]), 256, device="cpu", compile=False) is not b
    assert fm.block_mask(pad, 256, device="cpu", compile=False, cache=False) is not b
    assert fm.cache_info()["size"] == 4
    fm.clear_cache()
    assert fm.cache_info()["size"] == 0


def test_cache_is_bounded():
    for w in range(1, fm.cache_info()["maxsize"] + 10):
        fm.block_mask(fm.sliding_window(w), 32, block_size=16, device="cpu", compile=False)
    assert fm.cache_info()["size"] == fm.cache_info()["maxsize"]


def test_describe_counts_match_the_oracle():
    q, kv, block = 300, 260, 64
    mask, oracle = CASES["padding_left"](q, kv)
    mask = mask & fm.causal()
    oracle = oracle & ref.causal(q, kv)
    stats = fm.describe(mask, q, kv, block_size=block, device="cpu", compile=False)
    kinds = ref.block_kinds(oracle, block)
    assert stats.shape == (3, 1, q, kv)
    assert stats.full_blocks == int((kinds == 2).sum())
    assert stats.partial_blocks == int((kinds == 1).sum())
    assert stats.empty_blocks == int((kinds == 0).sum())
    assert stats.element_density == pytest.approx(oracle.float().mean().item())
    assert stats.masked_rows == int((~oracle.any(-1)).sum())
    assert stats.dense_bytes == 3 * q * kv
    assert 0 < stats.block_mask_bytes < stats.dense_bytes
    assert stats.block_density == pytest.approx((kinds > 0).float().mean().item())
    text = str(stats)
    assert repr(mask) in text and "partial" in text and "masked rows" in text


def test_describe_a_block_mask_alone():
    bm = fm.block_mask(fm.causal(), 256, device="cpu", compile=False)
    stats = fm.describe(bm)
    assert (stats.full_blocks, stats.partial_blocks, stats.empty_blocks) == (1, 2, 1)
    assert stats.element_density == pytest.approx(ref.causal(256, 256).float().mean().item())
    sliced = fm.describe(fm.block_mask(fm.causal(), 256, batch=2, device="cpu", compile=False)[0])
    assert sliced.element_density is None and "unknown" in str(sliced)


def test_check_finds_fully_masked_rows():
    mask = fm.causal() & fm.padding([60, 64], side="left")
    problems = fm.check(mask, 64, device="cpu", compile=False)
    assert problems == ["4 of 128 query rows see no key (they get zeros): b=0 rows 0..3"]


def test_check_finds_masks_that_ignore_batch_or_heads():
    problems = fm.check(fm.causal(), 100, batch=2, heads=4, device="cpu", compile=False)
    assert len(problems) == 2
    assert "ignores b" in problems[0] and "ignores h" in problems[1]

    def per_head(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) | (h == 0)

    assert fm.check(per_head, 100, heads=4, device="cpu", compile=False) == []


def test_check_reports_masks_that_fail_under_vmap():
    def python_if(b, h, q_idx, kv_idx):
        return bool(q_idx >= kv_idx)

    (problem,) = fm.check(python_if, 16, device="cpu", compile=False)
    assert "fails under vmap" in problem and "torch.where" in problem


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_compiled_build_equals_eager(name):
    mask, _ = CASES[name](300, 300)
    kw = dict(block_size=128, device="cpu", cache=False, method="create_block_mask")
    compiled = fm.block_mask(mask, 300, compile=True, **kw)
    eager = fm.block_mask(mask, 300, compile=False, **kw)
    assert torch.equal(block_kinds(compiled), block_kinds(eager))
    assert torch.equal(fm.block_mask_to_dense(compiled), fm.block_mask_to_dense(eager))


@pytest.mark.slow
def test_new_tensor_values_never_recompile():
    """Changing lengths, document ids, parents or a tensor prefix at fixed shapes: no recompile."""
    S = 256
    build = functools.partial(fm.block_mask, device="cpu", method="create_block_mask")
    build(fm.causal(), S)  # compile the builder once first
    for make in (
        lambda i: fm.causal() & fm.padding([S - i, 10 + i]),
        lambda i: fm.causal() & fm.padding([S - i, 10 + i], side="left"),
        lambda i: fm.document([min(j // (10 + i), 9) for j in range(S)]) & fm.causal(),
        lambda i: fm.tree([-1] + [max(0, j - 1 - i) for j in range(1, S - 6)], context_len=6),
        lambda i: fm.prefix_lm(torch.tensor(3 + i)),
        lambda i: fm.shifted(fm.sliding_window(40), torch.tensor(5 * i)),  # decode offsets
    ):
        build(make(0), S)  # first build of this structure compiles
        counters.clear()
        for i in range(1, 4):
            mask = make(i)
            bm = build(mask, S)
            assert torch.equal(fm.block_mask_to_dense(bm), fm.to_dense(mask, S, device="cpu"))
        assert counters["stats"]["unique_graphs"] == 0, f"recompiled for {make(1)!r}"
