"""flex_attend, and kernel options passed through to flex (the module's and flex_attend's)."""

import pytest
import torch

import flexmask as fm
import flexmask.runners as runners
from tests import reference as ref


def qkv(shape=(2, 4, 200, 8), heads_kv=2, seed=3):
    """The shape of the other compiled-flex tests (n=200): compiled once per process."""
    gen = torch.Generator().manual_seed(seed)
    b, h, s, d = shape
    return (torch.randn(b, h, s, d, generator=gen),
            *(torch.randn(b, heads_kv, s, d, generator=gen) for _ in range(2)))  # fmt: skip


@pytest.fixture
def captured(monkeypatch):
    """What the compiled flex kernel is called with, without compiling it."""
    calls = []

    def fake(q, k, v, **kw):
        calls.append(kw)
        return torch.zeros_like(q)

    monkeypatch.setattr(runners, "_compiled_flex", lambda: fake)
    return calls


@pytest.mark.slow
def test_flex_attend_matches_the_float64_golden_with_nan_in_the_pads():
    mask = fm.causal() & fm.padding([200, 70])
    oracle = (ref.causal(200, 200) & ref.padding(200, 200, [200, 70]))[:, None]
    q, k, v = qkv()
    want = ref.attention(q.double(), k.double(), v.double(), oracle)
    for t in (q, k, v):
        t[1, :, 70:] = float("nan")
    with torch.no_grad():
        out = fm.flex_attend(q, k, v, mask)
    assert bool(out.isfinite().all()) and bool((out[1, :, 70:] == 0).all())
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # a ready BlockMask gives the same
        again = fm.flex_attend(q.nan_to_num(), k.nan_to_num(), v.nan_to_num(),
                               fm.block_mask(mask, 200, device="cpu"))  # fmt: skip
    torch.testing.assert_close(again[0], out[0])


def test_kernel_options_reach_flex(captured):
    q, k, v = qkv()
    options = {"BLOCK_M": 32, "PRESCALE_QK": True}
    with torch.no_grad():
        fm.flex_attend(q, k, v, fm.causal(), kernel_options=options)
        attn = fm.MultiheadFlexAttention(32, 4, backend="flex", kernel_options=options)
        attn(torch.randn(2, 200, 32), mask=fm.sliding_window(16))
    assert [c["kernel_options"] for c in captured] == [options, options]
    with torch.no_grad():  # none given: none passed on CPU (flexmask's tiles are for CUDA)
        fm.flex_attend(q, k, v, fm.causal())
    assert captured[-1]["kernel_options"] is None


def test_a_forward_tile_of_the_caller_replaces_flexmasks(monkeypatch):
    q = torch.zeros(1, 1, 256, 8)
    bm = fm.block_mask(fm.causal(), 256, block_size=64, device="cpu")
    monkeypatch.setattr(
        runners, "kernel_tiles", lambda q, sizes: {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64}
    )
    merged = runners._kernel_options(q, bm, runners.Options(kernel_options={"num_stages": 2}))
    assert merged == {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64, "num_stages": 2}
    mine = runners._kernel_options(q, bm, runners.Options(kernel_options={"BLOCK_M": 32}))
    assert mine == {"BLOCK_M": 32}


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda q, k, v: fm.flex_attend(q.requires_grad_(), k, v), ValueError,
         r"flex_attend cannot train on CPU: .*sparse_attention"),
        (lambda q, k, v: fm.flex_attend(q.double(), k.double(), v.double()), TypeError,
         r"flex_attend on CPU supports"),
        (lambda q, k, v: fm.flex_attend(q[0], k, v), ValueError,
         r"flex_attend\(q=...\) must be a 4-D tensor"),
        (lambda q, k, v: fm.flex_attend(q, k, v, kernel_options=[("BLOCK_M", 64)]), TypeError,
         r"flex_attend\(kernel_options=...\) must be None or a dict"),
        (lambda q, k, v: fm.flex_attend(q, k, v, score_mod=3), TypeError,
         r"flex_attend\(score_mod=...\) must be a callable"),
        (lambda q, k, v: fm.flex_attend(q, k, v, fm.block_mask(fm.causal(), 128, device="cpu")),
         ValueError, r"flex_attend\(mask=BlockMask\)"),
        (lambda q, k, v: fm.MultiheadFlexAttention(32, 4, kernel_options={1: 2}), TypeError,
         r"MultiheadFlexAttention\(kernel_options=...\) must be None or a dict"),
    ],
)  # fmt: skip
def test_flex_attend_refuses_what_it_cannot_do(captured, call, error, message):
    with pytest.raises(error, match=message):
        call(*qkv())
    assert not captured  # refused before any kernel ran


FLEX_CASES = ["global_tokens_2d", "packed_rows", "from_cu_seqlens_causal", "dilated_window_16_2"]


@pytest.mark.slow
@pytest.mark.parametrize("name", [*FLEX_CASES, "neighborhood_2d"])
def test_the_peers_masks_run_in_compiled_flex(name):
    """FlexAttention lowers a mask_mod into its kernel, where a reduction cannot go:
    global_tokens' comparison with every index failed to compile until binding turned it into a
    per-position lookup. Each mask against the float64 golden through compiled flex."""
    from tests.test_masks import CASES

    if name == "neighborhood_2d":
        mask, oracle = fm.neighborhood_2d(16, 16, 5), ref.neighborhood_2d(16, 16, 5)
    else:
        mask, oracle = CASES[name](256, 256)
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(3, 2, 256, 8, generator=gen) for _ in range(3))
    with torch.no_grad():
        out = fm.flex_attend(q, k, v, mask, block_size=64)
    want = ref.attention(q.double(), k.double(), v.double(), oracle[:, None])
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
