"""Every bad input gets a ValueError/TypeError that names the argument, the expectation and the value."""

import pytest
import torch

import flexmask as fm

BAD_MASKS = [
    # (call, error, match)
    (
        lambda: fm.sliding_window(0),
        ValueError,
        r"sliding_window\(window=...\) needs a value >= 1, got 0",
    ),
    (
        lambda: fm.sliding_window(2.5),
        TypeError,
        r"sliding_window\(window=...\) needs an int, got float",
    ),
    (lambda: fm.sliding_window(True), TypeError, r"needs an int, got bool"),
    (
        lambda: fm.prefix_lm(-1),
        ValueError,
        r"prefix_lm\(prefix_len=...\) needs a value >= 0, got -1",
    ),
    (
        lambda: fm.prefix_lm([2, -3]),
        ValueError,
        r"prefix_lm\(prefix_len=...\) needs prefix lengths >= 0",
    ),
    (
        lambda: fm.prefix_lm(torch.ones(2, 2, dtype=torch.long)),
        ValueError,
        r"0-D or 1-D tensor, got shape \(2, 2\)",
    ),
    (lambda: fm.prefix_lm(1.5), TypeError, r"prefix_lm\(prefix_len=...\) needs an integer tensor"),
    (
        lambda: fm.padding(torch.tensor([[3, 4]])),
        ValueError,
        r"padding\(lengths=...\) needs a 1-D tensor, got shape \(1, 2\)",
    ),
    (
        lambda: fm.padding(torch.tensor([3.0])),
        TypeError,
        r"padding\(lengths=...\) needs an integer tensor, got dtype torch.float32",
    ),
    (
        lambda: fm.padding([3, -1]),
        ValueError,
        r"padding\(lengths=...\) needs lengths >= 0, got \[3, -1\]",
    ),
    (lambda: fm.padding([]), ValueError, r"padding\(lengths=...\) needs one length per batch row"),
    (
        lambda: fm.padding([3], side="top"),
        ValueError,
        r"padding\(side=...\) must be 'right' or 'left', got 'top'",
    ),
    (lambda: fm.padding("abc"), TypeError, r"padding\(lengths=...\) needs an integer tensor"),
    (
        lambda: fm.document(torch.zeros(2, 2, 2, dtype=torch.long)),
        ValueError,
        r"document\(doc_ids=...\) needs a 1-D or 2-D tensor",
    ),
    (
        lambda: fm.document([0.5, 1.0]),
        TypeError,
        r"document\(doc_ids=...\) needs an integer tensor",
    ),
    (lambda: fm.packed([2, -1]), ValueError, r"packed\(lengths=...\) needs lengths >= 0"),
    (
        lambda: fm.packed([]),
        ValueError,
        r"packed\(lengths=...\) needs at least one document length",
    ),
    (lambda: fm.chunked(0), ValueError, r"chunked\(chunk=...\) needs a value >= 1, got 0"),
    (lambda: fm.chunked("4"), TypeError, r"chunked\(chunk=...\) needs an int, got str"),
    (
        lambda: fm.tree([[-1, 0]]),
        ValueError,
        r"tree\(parents=...\) needs a 1-D tensor, got shape \(1, 2\)",
    ),
    (
        lambda: fm.tree(torch.tensor([-1.0, 0.0])),
        TypeError,
        r"tree\(parents=...\) needs an integer tensor",
    ),
    (
        lambda: fm.tree([-1, 1]),
        ValueError,
        r"node 1 has parent 1; every parent must be -1 \(a root\) or an earlier node",
    ),
    (lambda: fm.tree([-1, 0, 5]), ValueError, r"node 2 has parent 5"),
    (lambda: fm.tree([-2]), ValueError, r"node 0 has parent -2"),
    (lambda: fm.tree([]), ValueError, r"tree\(parents=...\) needs at least one node"),
    (
        lambda: fm.tree([-1], context_len=-1),
        ValueError,
        r"tree\(context_len=...\) needs a value >= 0",
    ),
    (
        lambda: fm.causal() & 3,
        TypeError,
        r"and_masks\(\) argument 1 must be a flexmask mask or a mask_mod callable .* got int 3",
    ),
    (lambda: fm.or_masks(), ValueError, r"or_masks\(\) needs at least one mask"),
    (
        lambda: fm.causal() | (lambda q, kv: q >= kv),
        TypeError,
        r"must take four arguments \(b, h, q_idx, kv_idx\), got a callable with signature \(q, kv\)",
    ),
    (lambda: fm.not_mask("causal"), TypeError, r"not_mask\(\) argument must be a flexmask mask"),
]


@pytest.mark.parametrize(("call", "error", "match"), BAD_MASKS)
def test_bad_mask_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()


def bm(mask, q_len=64, kv_len=None, **kw):
    return fm.block_mask(mask, q_len, kv_len, device=kw.pop("device", "cpu"), compile=False, **kw)


BAD_BUILDS = [
    (
        lambda: bm(fm.padding([65]), 64),
        ValueError,
        r"padding\(lengths=...\) has a length of 65, longer than the sequence \(q_len=64, kv_len=64\)",
    ),
    (
        lambda: bm(fm.padding([40], side="left"), 64, 32),
        ValueError,
        r"has a length of 40, longer than the sequence",
    ),
    (
        lambda: bm(fm.document([0] * 63), 64),
        ValueError,
        r"document\(...\): doc_ids has 63 positions but the mask is built for q_len=64, kv_len=64",
    ),
    (
        lambda: bm(fm.packed([30, 30]), 64),
        ValueError,
        r"packed\(...\): document lengths sum 60 positions",
    ),
    (
        lambda: bm(fm.tree([-1, 0], context_len=3), 64),
        ValueError,
        r"tree\(...\) covers context_len \+ nodes = 3 \+ 2 = 5 positions",
    ),
    (
        lambda: bm(fm.causal(), 64, block_size=24),
        ValueError,
        r"block_size=... must be a positive multiple of 16 \(e.g. 64 or 128\), got 24",
    ),
    (
        lambda: bm(fm.causal(), 64, block_size=0),
        ValueError,
        r"block_size=... must be a positive multiple of 16",
    ),
    (
        lambda: bm(fm.causal(), 64, block_size=64.0),
        TypeError,
        r"block_size=... must be an int or a pair \(q_block, kv_block\), got float",
    ),
    (
        lambda: bm(fm.causal(), 64, block_size=[64, 64]),
        TypeError,
        r"block_size=... must be an int or a pair \(q_block, kv_block\), got list",
    ),
    (
        lambda: bm(fm.causal(), 64, block_size=(64, 40)),
        ValueError,
        r"block_size=... must be a positive multiple of 16 \(e.g. 64 or 128\), got 40",
    ),
    (
        lambda: bm(fm.causal(), 0),
        ValueError,
        r"q_len=... must be a positive number of tokens, got 0",
    ),
    (
        lambda: bm(fm.causal(), 64, -5),
        ValueError,
        r"kv_len=... must be a positive number of tokens, got -5",
    ),
    (lambda: bm(fm.causal(), 64.0), TypeError, r"q_len=... must be an int, got float"),
    (
        lambda: bm(fm.padding([3, 4]), 64, batch=3),
        ValueError,
        r"batch=3 disagrees with the mask padding\(lengths=tensor\(\[3, 4\]\)\), whose per-batch tensors have 2 rows",
    ),
    (
        lambda: bm(fm.causal(), 64, batch=0),
        ValueError,
        r"batch=... must be None or a positive int, got 0",
    ),
    (
        lambda: bm(fm.causal(), 64, heads=-1),
        ValueError,
        r"heads=... must be None or a positive int, got -1",
    ),
    (
        lambda: bm(fm.padding([3]), 64, device="meta"),
        ValueError,
        r"device=... is 'meta', which holds shapes but no values",
    ),
    (
        lambda: bm(fm.padding([3]).to("meta"), 64, device="cpu"),
        ValueError,
        r"the mask padding\(.*\) holds meta tensors \(shapes, no values\)",
    ),
    (
        lambda: bm("causal", 64),
        TypeError,
        r"mask must be a flexmask mask or a mask_mod callable .* got str",
    ),
    (lambda: bm(lambda b, h, q: q, 64), TypeError, r"mask must take four arguments"),
    (
        lambda: fm.to_dense(fm.causal(), 8, heads=0),
        ValueError,
        r"heads=... must be a positive int, got 0",
    ),
    (
        lambda: fm.to_additive(torch.ones(2)),
        TypeError,
        r"to_additive\(dense=...\) needs a bool tensor .* got torch.float32",
    ),
    (
        lambda: fm.to_additive(torch.ones(2, dtype=torch.bool), torch.int32),
        TypeError,
        r"to_additive\(dtype=...\) needs a floating dtype",
    ),
    (
        lambda: fm.describe(fm.causal()),
        ValueError,
        r"describe\(mask, q_len=...\) needs q_len for a mask",
    ),
]


@pytest.mark.parametrize(("call", "error", "match"), BAD_BUILDS)
def test_bad_build_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()


MHA = fm.MultiheadFlexAttention
BAD_MODULES = [
    (
        lambda: MHA(30, 4),
        ValueError,
        r"MultiheadFlexAttention\(embed_dim=30, num_heads=4\): embed_dim must be divisible by num_heads",
    ),
    (
        lambda: MHA(32, 4, num_kv_heads=3),
        ValueError,
        r"MultiheadFlexAttention\(num_heads=4, num_kv_heads=3\): num_heads must be divisible by num_kv_heads",
    ),
    (
        lambda: MHA(32, 0),
        ValueError,
        r"MultiheadFlexAttention\(num_heads=...\) must be a positive int, got 0",
    ),
    (
        lambda: MHA(32, 4, backend="triton"),
        ValueError,
        r"MultiheadFlexAttention\(backend=...\) must be one of \('auto', 'flex', 'sdpa', 'sparse'\), got 'triton'",
    ),
    (
        lambda: MHA(32, 4, dropout=1.5),
        ValueError,
        r"MultiheadFlexAttention\(dropout=...\) must be in \[0, 1\), got 1.5",
    ),
    (
        lambda: MHA(32, 4, block_size=100),
        ValueError,
        r"block_size=... must be a positive multiple of 16",
    ),
    (
        lambda: MHA(32, 4, sparse_max_density=1.5),
        ValueError,
        r"MultiheadFlexAttention\(sparse_max_density=...\) must be a block density in \[0, 1\]",
    ),
    (
        lambda: MHA(32, 4, score_mod=3),
        TypeError,
        r"MultiheadFlexAttention\(score_mod=...\) must be a callable",
    ),
]


@pytest.mark.parametrize(("call", "error", "match"), BAD_MODULES)
def test_bad_module_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()


module = MHA(32, 4, backend="sdpa")
x = torch.randn(2, 10, 32)
BAD_FORWARDS = [
    (
        lambda: module(torch.randn(10, 32)),
        ValueError,
        r"forward\(x=...\) must have shape \[B, S, 32\] \(batch first, width last\), got \(10, 32\)",
    ),
    (
        lambda: module(torch.randn(2, 10, 16)),
        ValueError,
        r"forward\(x=...\) must have shape \[B, S, 32\].* got \(2, 10, 16\)",
    ),
    (
        lambda: module([1, 2]),
        TypeError,
        r"forward\(x=...\) must be a tensor \[B, S, 32\], got list",
    ),
    (
        lambda: module(x, torch.randn(3, 5, 32)),
        ValueError,
        r"forward\(context=...\) has batch 3 but x has batch 2",
    ),
    (
        lambda: module(x, torch.randn(2, 5, 8)),
        ValueError,
        r"forward\(context=...\) must have shape \[B, S, 32\]",
    ),
    (
        lambda: module(x, mask=bm(fm.causal(), 12)),
        ValueError,
        r"forward\(mask=BlockMask\) has shape \(1, 1, 12, 12\) but the input needs .* 10, 10\)",
    ),
    (
        lambda: module(x, mask=bm(fm.causal(), 10, batch=3)),
        ValueError,
        r"forward\(mask=BlockMask\) has shape \(3, 1, 10, 10\)",
    ),
    (
        lambda: module(x, mask=lambda q, kv: q),
        TypeError,
        r"forward\(mask=...\) must take four arguments",
    ),
    (
        lambda: module(x, mask=fm.padding([3, 4, 5])),
        ValueError,
        r"batch=2 disagrees with the mask padding",
    ),
    (
        lambda: MHA(32, 4, backend="flex")(x),
        ValueError,
        r"backend='flex' cannot train on CPU: FlexAttention has no CPU backward pass",
    ),
]


@pytest.mark.parametrize(("call", "error", "match"), BAD_FORWARDS)
def test_bad_forward_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()


Q4 = torch.ones(1, 4, 6, 8)
BM2 = fm.block_mask(fm.padding([5, 6]), 6, block_size=16, device="cpu", compile=False)
BM7 = fm.block_mask(fm.causal(), 7, block_size=16, device="cpu", compile=False)
BAD_PICTURES = [
    (
        lambda: fm.save_mask_png(fm.causal(), 123, 8),
        TypeError,
        r"save_mask_png\(path=...\) needs a file path \(str or pathlib.Path\), got int",
    ),
    (
        lambda: fm.save_mask_png(fm.causal(), "x.jpg", 8),
        ValueError,
        r"save_mask_png\(path=...\) writes PNG files, got 'x.jpg'; end it in '.png'",
    ),
    (
        lambda: fm.save_mask_png("causal()", "x.png", 8),
        TypeError,
        r"save_mask_png\(mask\) must be a flexmask mask or a mask_mod callable",
    ),
    (
        lambda: fm.save_mask_png(fm.causal(), "x.png", 0),
        ValueError,
        r"q_len=... must be a positive number of tokens, got 0",
    ),
    (
        lambda: fm.save_mask_png(fm.padding([3, 4]), "x.png", 8, batch=2),
        ValueError,
        r"batch=...\) is 2, out of range: there are 2 batch rows \(0..1\)",
    ),
    (
        lambda: fm.save_mask_png(fm.causal(), "x.png", 8, head=-1),
        ValueError,
        r"save_mask_png\(head=...\) must be an int >= 0, got -1",
    ),
    (
        lambda: fm.save_mask_png(fm.causal(), "x.png", 8, block_size=10),
        ValueError,
        r"block_size=... must be a positive multiple of 16",
    ),
    (
        lambda: fm.save_mask_png(fm.causal(), "x.png", 8, show_blocks="yes"),
        TypeError,
        r"show_blocks=...\) must be True or False, got 'yes'",
    ),
    (
        lambda: fm.save_mask_png(fm.padding([30]), "x.png", 8),
        ValueError,
        r"longer than the sequence",
    ),
    (
        lambda: fm.to_ascii(fm.causal(), 300),
        ValueError,
        r"to_ascii draws up to 256 tokens per side, got q_len=300.*save_mask_png",
    ),
    (
        lambda: fm.save_block_mask_png(fm.causal(), "x.png"),
        TypeError,
        r"save_block_mask_png\(block_mask=...\) needs a torch BlockMask, got _Causal",
    ),
    (
        lambda: fm.save_block_mask_png(BM2, "x.png", batch=2),
        ValueError,
        r"save_block_mask_png\(batch=...\) is 2, out of range: there are 2 batch rows",
    ),
    (
        lambda: fm.save_scores_png(torch.ones(2, 6, 8), Q4, "x.png"),
        ValueError,
        r"save_scores_png\(q=...\) needs a \[B, H, S, D\] tensor, got \(2, 6, 8\)",
    ),
    (
        lambda: fm.save_scores_png(Q4, torch.ones(1, 3, 6, 8), "x.png"),
        ValueError,
        r"q's heads a multiple of k's \(GQA\)",
    ),
    (
        lambda: fm.save_scores_png(Q4, Q4, "x.png", mask=BM7),
        ValueError,
        r"save_scores_png\(mask=...\) is a BlockMask for \(7, 7\) but q, k have q_len=6, kv_len=6",
    ),
    (
        lambda: fm.save_scores_png(Q4, Q4, "x.png", head=4),
        ValueError,
        r"save_scores_png\(head=...\) is 4, out of range: there are 4 heads",
    ),
    (
        lambda: fm.save_scores_png(Q4, Q4, "x.png", scale="1/8"),
        TypeError,
        r"save_scores_png\(scale=...\) must be a number, got '1/8'",
    ),
    (
        lambda: fm.save_scores_png(Q4, torch.ones(1, 4, 7, 8), "x.png", mask=fm.packed([3, 3])),
        ValueError,
        r"packed\(...\): document lengths sum 6 positions",
    ),
    (
        lambda: fm.save_grid_png([], "x.png", 8),
        TypeError,
        r"save_grid_png\(masks=...\) needs a mask or a non-empty list of masks, got list \[\]",
    ),
    (
        lambda: fm.save_grid_png([fm.causal(), 3], "x.png", 8),
        TypeError,
        r"save_grid_png\(masks\[1\]\) must be a flexmask mask",
    ),
    (
        lambda: fm.save_grid_png([fm.causal()], "x.png", 8, ncols=0),
        ValueError,
        r"save_grid_png\(ncols=...\) must be a positive int, got 0",
    ),
    (
        lambda: fm.save_grid_png(fm.causal(), "x.png", 8, heads=0),
        ValueError,
        r"save_grid_png\(heads=...\) must be a positive int, got 0",
    ),
]


@pytest.mark.parametrize(("call", "error", "match"), BAD_PICTURES)
def test_bad_picture_arguments(call, error, match, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(error, match=match):
        call()
    assert list(tmp_path.iterdir()) == []  # refused before anything was written
