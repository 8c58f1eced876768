"""attention-gym as a second, independent oracle where it has the same mask."""

import pytest
import torch
from torch.nn.attention.flex_attention import create_mask, noop_mask

import flexmask as fm

gym = pytest.importorskip("attn_gym.masks", reason="attn-gym is in the `gym` extra")
doc_masks = pytest.importorskip("attn_gym.masks.document_mask")

SIZES = [(37, 37), (128, 128), (200, 200)]


def gym_dense(mask_mod, q_len, kv_len):
    return create_mask(mask_mod, 1, 1, q_len, kv_len, "cpu")


def ours(mask, q_len, kv_len):
    return fm.to_dense(mask, q_len, kv_len, device="cpu")


@pytest.mark.parametrize(("q_len", "kv_len"), SIZES)
def test_causal(q_len, kv_len):
    assert torch.equal(ours(fm.causal(), q_len, kv_len), gym_dense(gym.causal_mask, q_len, kv_len))


@pytest.mark.parametrize(("q_len", "kv_len"), SIZES)
@pytest.mark.parametrize("prefix", [0, 5, 64])
def test_prefix_lm(q_len, kv_len, prefix):
    want = gym_dense(gym.generate_prefix_lm_mask(prefix), q_len, kv_len)
    assert torch.equal(ours(fm.prefix_lm(prefix), q_len, kv_len), want)


@pytest.mark.parametrize(("q_len", "kv_len"), SIZES)
@pytest.mark.parametrize("window", [1, 4, 50])
def test_sliding_window_keeps_one_key_less_than_gym(q_len, kv_len, window):
    # attention-gym's generate_sliding_window(w) keeps w + 1 keys; ours keeps exactly w.
    want = gym_dense(gym.generate_sliding_window(window), q_len, kv_len)
    assert torch.equal(ours(fm.sliding_window(window + 1), q_len, kv_len), want)
    if window < q_len:  # otherwise both are plain causal
        assert not torch.equal(ours(fm.sliding_window(window), q_len, kv_len), want)


@pytest.mark.parametrize("lengths", [[10, 20, 7], [1, 1, 35], [128, 72]])
def test_documents(lengths):
    n = sum(lengths)
    offsets = doc_masks.length_to_offsets(lengths, "cpu")
    full_docs = gym_dense(doc_masks.generate_doc_mask_mod(noop_mask, offsets), n, n)
    causal_docs = gym_dense(doc_masks.generate_doc_mask_mod(gym.causal_mask, offsets), n, n)
    assert torch.equal(ours(fm.packed(lengths), n, n), full_docs)
    assert torch.equal(ours(fm.packed(lengths) & fm.causal(), n, n), causal_docs)
    ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    assert torch.equal(ours(fm.document(ids) & fm.causal(), n, n), causal_docs)


def test_gym_mask_mods_compose_with_ours():
    mask = fm.chunked(16) & gym.generate_sliding_window(3)
    want = gym_dense(gym.generate_sliding_window(3), 40, 40) & ours(fm.chunked(16), 40, 40)
    assert torch.equal(ours(mask, 40, 40), want)


@pytest.mark.parametrize(("q_len", "kv_len"), SIZES)
@pytest.mark.parametrize(("window", "dilation"), [(0, 1), (4, 2), (16, 3), (50, 1)])
def test_dilated_window(q_len, kv_len, window, dilation):
    want = gym_dense(gym.generate_dilated_sliding_window(window, dilation), q_len, kv_len)
    assert torch.equal(ours(fm.dilated_window(window, dilation), q_len, kv_len), want)


@pytest.mark.parametrize("n", [37, 128, 200])
@pytest.mark.parametrize("indices", [[0], [0, 5, 36], []])
def test_global_tokens_with_a_window_is_longformer(n, indices):
    is_global = torch.zeros(n, dtype=torch.bool)
    is_global[indices] = True
    want = gym_dense(gym.generate_global_sliding_window(3, is_global), n, n)
    assert torch.equal(ours(fm.local_window(3, 3) | fm.global_tokens(indices), n, n), want)


@pytest.mark.parametrize(("side", "kernel"), [(8, 3), (16, 5), (16, 7)])
def test_neighborhood_2d_is_natten(side, kernel):
    # attention-gym's generate_natten on a square canvas and kernel (its x/y naming mixes rows
    # and columns, which only square ones hide).
    n = side * side
    want = gym_dense(gym.generate_natten(side, side, kernel, kernel), n, n)
    assert torch.equal(ours(fm.neighborhood_2d(side, side, kernel), n, n), want)
