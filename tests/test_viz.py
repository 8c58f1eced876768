"""Pictures: the counts behind them against the dense oracle; the PNG writers' promises."""

import os
import struct
import zlib
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import flexmask as fm
from flexmask.evaluation import tile_counts
from flexmask.masks import Tiles
from flexmask.viz import mask_picture, score_weights
from tests import reference as ref
from tests.test_masks import expressions


def oracle_tiles(dense: torch.Tensor, size: int) -> torch.Tensor:
    """Allowed pairs per ``size x size`` tile of a 2-D mask, zero-padded at the edges."""
    q, kv = dense.shape
    nq, nk = -(-q // size), -(-kv // size)
    padded = torch.zeros(nq * size, nk * size, dtype=torch.long)
    padded[:q, :kv] = dense
    return padded.view(nq, size, nk, size).sum((1, 3))


@st.composite
def tiled(draw):
    q, kv = draw(st.integers(1, 70)), draw(st.integers(1, 70))
    mask, oracle = draw(expressions(q, kv, max_leaves=4))
    b = draw(st.integers(0, oracle.shape[0] - 1))
    return mask, oracle[b], q, kv, b, draw(st.sampled_from([1, 2, 5, 16, 64]))


@given(tiled())
def test_tile_bounds_are_sound_and_counts_exact(problem):
    mask, dense, q, kv, b, size = problem
    bound = mask.bind(q, kv)
    all_true, any_true = bound.tile_bounds(Tiles(b, size, q, kv))
    want = oracle_tiles(dense, size)
    area = oracle_tiles(torch.ones(q, kv, dtype=torch.bool), size)
    assert bool((want[all_true] == area[all_true]).all())  # "all allowed" is never wrong
    assert bool((want[~any_true] == 0).all())  # "none allowed" is never wrong
    if bound.exact_bounds:  # then an undecided tile is certainly mixed
        mixed = any_true & ~all_true
        assert bool(((want[mixed] > 0) & (want[mixed] < area[mixed])).all())
    assert torch.equal(tile_counts(mask, q, kv, size, b=b, device="cpu"), want)


def test_tile_counts_in_bands_of_query_tiles():
    # Very wide problems are counted a band of query tiles at a time (q_from > 0 in Tiles).
    q, kv = 5, 2**18 + 7
    ids = torch.randint(0, 3, (kv,))
    mask = (fm.document(ids) & fm.prefix_lm(kv // 2)) | fm.sliding_window(3)
    qi, ki = torch.arange(q)[:, None], torch.arange(kv)[None, :]
    same_doc = ids[:q, None] == ids[None, :]
    dense = (same_doc & ((ki < kv // 2) | (ki <= qi))) | ((ki <= qi) & (qi - ki < 3))
    assert torch.equal(tile_counts(mask, q, kv, 1, device="cpu"), dense.long())


def test_structured_masks_decide_most_tiles():
    # The point of the bounds: a long causal mask evaluates only its diagonal tiles.
    n, size = 4096, 128
    all_true, any_true = fm.causal().tile_bounds(Tiles(0, size, n, n))
    undecided = int((any_true & ~all_true).sum())
    assert undecided == n // size


@pytest.mark.parametrize(
    ("mask", "oracle", "n"),
    [
        (
            fm.causal() & fm.padding([200, 77]),
            ref.causal(200, 200) & ref.padding(200, 200, [200, 77]),
            200,
        ),
        (
            fm.sliding_window(40) | fm.prefix_lm(9),
            ref.sliding_window(150, 150, 40) | ref.prefix_lm(150, 150, 9),
            150,
        ),
        (
            fm.packed([50, 30, 53]) & fm.causal(),
            ref.packed(133, 133, [50, 30, 53]) & ref.causal(133, 133),
            133,
        ),
    ],
)
@pytest.mark.parametrize("max_pixels", [1024, 20, 3])  # token per pixel, pixels < block, > block
def test_mask_picture_matches_the_oracle(mask, oracle, n, max_pixels):
    b = oracle.shape[0] - 1
    pic = mask_picture(mask, n, batch=b, block_size=16, max_pixels=max_pixels)
    assert torch.equal(pic.kinds.long(), ref.block_kinds(oracle, 16)[b])
    assert pic.allowed == int(oracle[b].sum())
    p = pic.pixel
    assert pic.fraction.shape == (-(-n // p),) * 2
    want = oracle_tiles(oracle[b], p) / oracle_tiles(torch.ones(n, n, dtype=torch.bool), p)
    assert torch.allclose(pic.fraction, want.float())
    if max_pixels == 1024:
        assert p == 1
    else:  # the pixel is a divisor or a multiple of the block, and the picture fits
        assert (16 % p == 0 or p % 16 == 0) and -(-n // p) <= max_pixels


def test_to_ascii_of_a_batch_row_and_rectangles():
    mask = fm.causal() & fm.padding([3, 2], side="left")
    assert fm.to_ascii(mask, 3, batch=1) == ref.render(
        ref.padding(3, 3, [3, 2], "left")[1] & ref.causal(3, 3)[0]
    )
    assert fm.to_ascii(fm.causal(), 2, 3) == "■ ⬚ ⬚\n■ ■ ⬚"


# -- score maps -------------------------------------------------------------------------------


def test_score_weights_match_a_float64_softmax_and_mark_masked_pairs():
    torch.manual_seed(0)
    attn = fm.MultiheadFlexAttention(32, 4, num_kv_heads=2)
    q, k, _ = attn.project(torch.randn(2, 12, 32))
    mask = fm.causal() & fm.padding([12, 7])
    oracle = (ref.causal(12, 12) & ref.padding(12, 12, [12, 7]))[1]
    weights, allowed, expr = score_weights(q, k, mask, 1, 3, None)
    assert torch.equal(allowed, oracle)
    assert expr == repr(mask)
    scores = q[1, 3].double() @ k[1, 1].double().T / 8**0.5  # head 3 reads kv head 3 // 2
    want = torch.softmax(scores.masked_fill(~oracle, float("-inf")), -1).nan_to_num(0.0)
    assert torch.allclose(weights, want.detach())
    assert torch.equal(weights.sum(-1) > 0.5, oracle.any(-1))  # pad rows: no weight, no NaN
    bm = fm.block_mask(mask, 12, block_size=16, device="cpu", compile=False)
    assert torch.equal(score_weights(q, k, bm, 1, 3, None)[1], oracle)


# -- the PNG writers ----------------------------------------------------------------------------

WRITERS = {
    "mask": lambda p: fm.save_mask_png(fm.causal() & fm.padding([20, 9]), p, 20, block_size=16),
    "mask_plain": lambda p: fm.save_mask_png(fm.chunked(5), p, 300, show_blocks=False),
    "block_mask": lambda p: fm.save_block_mask_png(
        fm.block_mask(fm.sliding_window(100), 600, block_size=64, device="cpu", compile=False), p
    ),
    "scores": lambda p: fm.save_scores_png(
        torch.ones(1, 2, 6, 4), torch.ones(1, 2, 6, 4), p, mask=fm.causal(), head=1
    ),
    "grid": lambda p: fm.save_grid_png([fm.causal(), fm.sliding_window(3)], p, 10, block_size=16),
    "grid_rows": lambda p: fm.save_grid_png(fm.padding([5, 8]), p, 8, block_size=16),
}


def png_chunks(data: bytes) -> list[bytes]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, i = [], 8
    while i < len(data):
        (length,) = struct.unpack(">I", data[i : i + 4])
        kind = data[i + 4 : i + 8]
        body = data[i + 8 : i + 8 + length]
        assert struct.unpack(">I", data[i + 8 + length : i + 12 + length])[0] == zlib.crc32(
            kind + body
        )
        chunks.append(kind)
        i += 12 + length
    return chunks


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_writers_make_deterministic_pngs_in_new_folders(tmp_path, name):
    target = tmp_path / "new" / "deeper" / f"{name}.png"
    out = WRITERS[name](target)
    assert out == target and target.is_file()
    first = target.read_bytes()
    chunks = png_chunks(first)
    assert b"tEXt" not in chunks and b"tIME" not in chunks  # no version or time stamps
    assert WRITERS[name](str(target)) == target  # str paths too
    assert target.read_bytes() == first
    assert sorted(os.listdir(target.parent)) == [target.name]  # no temporary file left


def test_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    def fail(self, *args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(Figure, "savefig", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        fm.save_mask_png(fm.causal(), tmp_path / "x.png", 8)
    assert list(tmp_path.iterdir()) == []


def test_writers_never_touch_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out_dir = tmp_path / "out"
    fm.save_mask_png(fm.causal(), out_dir / "a.png", 8, block_size=16)
    assert sorted(p.name for p in Path(tmp_path).iterdir()) == ["out"]


@given(
    lengths=st.lists(st.integers(1, 40), min_size=1, max_size=6),
    size=st.sampled_from([1, 3, 16]),
    order=st.booleans(),
)
def test_packed_documents_and_causal_have_exact_bounds(lengths, size, order):
    """The one composition without padding whose bounds are exact: no tile is evaluated."""
    n = sum(lengths)
    mask = fm.packed(lengths) & fm.causal() if order else fm.causal() & fm.packed(lengths)
    bound = mask.bind(n, n)
    assert bound.exact_bounds
    all_true, any_true = bound.tile_bounds(Tiles(0, size, n, n))
    want = oracle_tiles(ref.packed(n, n, lengths)[0] & ref.causal(n, n)[0], size)
    area = oracle_tiles(torch.ones(n, n, dtype=torch.bool), size)
    assert torch.equal(all_true, want == area)
    assert torch.equal(any_true, want > 0)
    assert not (fm.document([0, 1, 0]) & fm.causal()).bind(3, 3).exact_bounds  # unsorted ids
