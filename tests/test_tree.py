"""Trees of candidates, shifted masks, and the Transformers mask conversions (against the legacy
AttentionMaskConverter, where the installed transformers still ships it)."""

import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import flexmask as fm
from tests import reference as ref
from tests.test_masks import expressions

PATHS = st.lists(st.lists(st.integers(0, 5), min_size=1, max_size=5), min_size=1, max_size=6)


@given(PATHS, st.integers(0, 4))
def test_from_paths_is_a_depth_first_trie(paths, context_len):
    t = fm.Tree.from_paths(paths)
    n = t.num_nodes
    parents = t.parents.tolist()
    assert all(-1 <= p < i for i, p in enumerate(parents))
    # depth-first: every subtree is a contiguous range starting at its root
    for i in range(n):
        inside = [j for j in range(n) if i in t.ancestors(j)]
        assert inside == list(range(i, i + len(inside)))
    # shared prefixes are shared nodes: no two siblings carry the same token
    siblings = {(p, int(tok)) for p, tok in zip(parents, t.tokens, strict=True)}
    assert len(siblings) == n
    # the root-to-leaf paths are exactly the input paths that are not prefixes of others
    got = {tuple(t.tokens[row[row >= 0]].tolist()) for row in t.paths}
    want = {tuple(p) for p in paths}
    assert got == {p for p in want if not any(q != p and q[: len(p)] == p for q in want)}
    assert t.depth.tolist() == [len(t.ancestors(i)) - 1 for i in range(n)]
    assert torch.equal(t.position_ids(context_len), context_len + t.depth)
    size = context_len + n
    dense = fm.to_dense(t.mask(context_len), size)[0, 0]
    assert torch.equal(dense, ref.tree(size, size, parents, context_len)[0])


def test_from_parents_keeps_duplicates():
    you, are, a, not_ = 11, 12, 13, 14  # "You are a" / "You are not" / "You are a" again
    t = fm.Tree.from_parents(
        [-1, 0, 1, -1, 3, 4, -1, 6, 7], [you, are, a, you, are, not_, you, are, a]
    )
    assert t.num_nodes == 9 and t.leaves.tolist() == [2, 5, 8]
    assert t.paths.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert t.ancestors(8) == [6, 7, 8]
    assert fm.Tree.from_parents([-1, 0]).tokens.tolist() == [0, 0]


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: fm.Tree.from_paths([]), ValueError, r"needs at least one path"),
        (
            lambda: fm.Tree.from_paths([[1], []]),
            ValueError,
            r"path 1 must be a non-empty list of ints",
        ),
        (
            lambda: fm.Tree.from_paths([[1, -2]]),
            ValueError,
            r"path 0 holds -2; tokens are ints >= 0",
        ),
        (lambda: fm.Tree.from_paths("abc"), TypeError, r"needs a list of token lists, got str"),
        (lambda: fm.Tree.from_parents([1, 0]), ValueError, r"has a cycle through node 0"),
        (lambda: fm.Tree.from_parents([-1, 2, 1, 0]), ValueError, r"has a cycle through node 1"),
        (
            lambda: fm.Tree.from_parents([-1, 2, -1]),
            ValueError,
            r"node 1 has parent 2; every parent must be -1",
        ),
        (lambda: fm.Tree.from_parents([-1, -3]), ValueError, r"node 1 has parent -3"),
        (lambda: fm.Tree.from_parents([-1, 0], [5]), ValueError, r"1 tokens for 2 nodes"),
        (lambda: fm.Tree.from_parents([]), ValueError, r"needs at least one node"),
        (
            lambda: fm.Tree.from_paths([[1]]).ancestors(3),
            ValueError,
            r"needs a node in 0..0, got 3",
        ),
    ],
)
def test_bad_trees(call, error, match):
    with pytest.raises(error, match=match):
        call()


# -- shifted ------------------------------------------------------------------------------------


@st.composite
def shifted_problems(draw):
    q, kv, offset = draw(st.integers(1, 20)), draw(st.integers(1, 30)), draw(st.integers(0, 12))
    mask, oracle = draw(expressions(q + offset, kv, max_leaves=3))
    return mask, oracle, q, kv, offset


@given(shifted_problems(), st.booleans())
def test_shifted_is_the_bigger_mask_seen_from_q_offset(problem, as_tensor):
    mask, oracle, q, kv, offset = problem  # oracle built for q + offset queries
    o = torch.tensor(offset) if as_tensor else offset
    if as_tensor and q + offset > kv:
        return  # a tensor offset assumes its queries stay inside the keys (see shifted)
    want = oracle[:, offset:]
    got = fm.to_dense(mask, q, kv, q_offset=o)[:, 0]
    assert torch.equal(got, want.expand_as(got))
    bm = fm.block_mask(
        mask, q, kv, q_offset=o, block_size=16, device="cpu", compile=False, cache=False
    )
    dense = fm.block_mask_to_dense(bm)[:, 0]
    assert torch.equal(dense, want.expand_as(dense))


def test_shifted_repr_equality_and_errors():
    assert fm.shifted(fm.causal(), 3) == fm.shifted(fm.causal(), 3)
    assert repr(fm.shifted(fm.causal(), torch.tensor(3), kv_offset=1)) == (
        "shifted(causal(), q_offset=tensor(3), kv_offset=1)"
    )
    with pytest.raises(ValueError, match=r"shifted\(q_offset=...\) needs a value >= 0, got -1"):
        fm.shifted(fm.causal(), -1)
    with pytest.raises(ValueError, match=r"needs a 0-D or 1-D tensor, got shape \(1, 2\)"):
        fm.shifted(fm.causal(), torch.tensor([[1, 2]]))  # [B] is one offset per row: allowed
    with pytest.raises(TypeError, match=r"shifted\(q_offset=...\) needs an integer tensor"):
        fm.shifted(fm.causal(), 1.5)


# -- Transformers 2-D / 4-D masks ---------------------------------------------------------------
# flexmask against tests/reference.py's oracle of the legacy AttentionMaskConverter's documented
# behaviour (always), and that oracle against the real class where the installed transformers
# still ships it (removed in 5.24): each test skips on its own, never the whole module.

try:
    from transformers import modeling_attn_mask_utils as mask_utils
except ImportError:
    mask_utils = None
Converter = getattr(mask_utils, "AttentionMaskConverter", None)
needs_converter = pytest.mark.skipif(
    Converter is None,
    reason="transformers.modeling_attn_mask_utils.AttentionMaskConverter is not installed "
    "(removed in transformers 5.24); the oracle tests above still run",
)
MIN = torch.finfo(torch.float32).min
LEFT = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1]])
PAD_2D = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])


def test_from_hf_attention_mask_any_pattern():
    am = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 1, 1, 1]])
    real = am.bool()
    want = real[:, :, None] & real[:, None, :]
    assert torch.equal(fm.to_dense(fm.from_hf_attention_mask(am), 5)[:, 0], want)
    assert torch.equal(fm.to_hf_4d(fm.from_hf_attention_mask(am), 5, boolean=True)[:, 0], want)
    keys = fm.from_hf_attention_mask(am, keys_only=True)
    assert torch.equal(fm.to_dense(keys, 3, 5)[:, 0], ref.key_padding(3, 5, am.tolist()))


@pytest.mark.parametrize("past", [0, 3])
def test_causal_4d_with_and_without_past_keys(past):
    want = ref.legacy_causal_4d(2, 4, 4 + past)
    assert torch.equal(fm.to_hf_4d(fm.causal(), 4, 4 + past, batch=2, q_offset=past), want)


@pytest.mark.parametrize("q_len", [6, 2])  # prefill, and 2 new tokens after 4 cached
def test_left_padding_2d_to_causal_4d(q_len):
    want = ref.legacy_to_4d(LEFT, q_len, 6)
    keys_only = fm.causal() & fm.from_hf_attention_mask(LEFT, keys_only=True)
    assert torch.equal(fm.to_hf_4d(keys_only, q_len, 6, q_offset=6 - q_len), want)
    # Legacy masks pad keys only; with left padding a pad query sees only pad keys, so masking
    # pad queries as well gives the same mask.
    both = fm.causal() & fm.from_hf_attention_mask(LEFT)
    assert torch.equal(fm.to_hf_4d(both, q_len, 6, q_offset=6 - q_len), want)


def test_bidirectional_with_padding():
    want = ref.legacy_to_4d(PAD_2D, 5, 5, is_causal=False)
    keys_only = fm.from_hf_attention_mask(PAD_2D, keys_only=True)
    assert torch.equal(fm.to_hf_4d(keys_only, 5), want)
    got = fm.to_hf_4d(fm.from_hf_attention_mask(PAD_2D), 5)  # pads hidden as queries too
    real = PAD_2D.bool()[:, None, :, None].expand_as(got)
    assert torch.equal(got[real], want[real])
    # Legacy pad queries still see the real keys; these see nothing (their output is zeros).
    assert bool((got[~real] == MIN).all()) and bool((want[~real] == 0).any())


@pytest.mark.parametrize("past", [0, 5])
def test_sliding_window_legacy_keeps_one_key_more(past):
    w = 3
    want = ref.legacy_causal_4d(1, 4, 4 + past, sliding_window=w)
    assert torch.equal(fm.to_hf_4d(fm.sliding_window(w + 1), 4, 4 + past, q_offset=past), want)
    assert not torch.equal(fm.to_hf_4d(fm.sliding_window(w), 4, 4 + past, q_offset=past), want)


def test_prefix_tokens_are_seen_by_every_query():
    # p-tuning / prefix tuning: p virtual tokens in the cache, their keys visible to all queries.
    p, am = 3, torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    full_am = torch.cat([torch.ones(2, p, dtype=am.dtype), am], dim=1)
    want = ref.legacy_prepare_4d_causal(full_am, 2, 4, past=p)
    keys_only = fm.causal() & fm.from_hf_attention_mask(full_am, keys_only=True)
    assert torch.equal(fm.to_hf_4d(keys_only, 4, p + 4, q_offset=p), want)
    got = fm.to_hf_4d(fm.causal() & fm.from_hf_attention_mask(full_am), 4, p + 4, q_offset=p)
    real = am.bool()[:, None, :, None].expand_as(got)
    assert torch.equal(got[real], want[real])
    assert bool((got[..., :p][real[..., :p]] == 0).all())  # every real query sees the prefix


def test_fully_masked_rows_stay_masked():
    # _unmask_unattended let a row that sees nothing attend to everything (an SDPA workaround);
    # flexmask keeps it fully masked, and its attention returns zeros there, never NaN.
    expanded = fm.to_hf_4d(fm.causal() & fm.from_hf_attention_mask(LEFT), 6)
    unmasked = ref.legacy_unmask_unattended(expanded, MIN)
    empty = (expanded == MIN).all(-1)
    assert bool(empty.any())
    assert bool((unmasked[empty] == 0).all()) and bool((expanded[empty] == MIN).all())
    assert torch.equal(unmasked[~empty], expanded[~empty])


# The oracle against the real class, where it is installed.


@needs_converter
@pytest.mark.parametrize(("q_len", "past", "window"), [(4, 0, None), (4, 3, None), (4, 5, 3),
                                                      (2, 4, None), (1, 6, 2)])  # fmt: skip
def test_oracle_equals_the_legacy_causal_4d(q_len, past, window):
    got = Converter(is_causal=True, sliding_window=window).to_causal_4d(
        2, q_len, q_len + past, dtype=torch.float32
    )
    assert torch.equal(got, ref.legacy_causal_4d(2, q_len, q_len + past, window))


@needs_converter
@pytest.mark.parametrize(("mask_2d", "q_len", "causal"), [(LEFT, 6, True), (LEFT, 2, True),
                                                          (LEFT, 1, True), (PAD_2D, 5, False)])  # fmt: skip
def test_oracle_equals_the_legacy_to_4d(mask_2d, q_len, causal):
    kv = mask_2d.shape[1]
    got = Converter(is_causal=causal).to_4d(mask_2d, q_len, key_value_length=kv,
                                            dtype=torch.float32)  # fmt: skip
    assert torch.equal(got, ref.legacy_to_4d(mask_2d, q_len, kv, is_causal=causal))


@needs_converter
def test_oracle_equals_the_legacy_prepare_and_unmask():
    p, am = 3, torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    full_am = torch.cat([torch.ones(2, p, dtype=am.dtype), am], dim=1)
    got = mask_utils._prepare_4d_causal_attention_mask(full_am, (2, 4), torch.zeros(2, 4, 8), p)
    assert torch.equal(got, ref.legacy_prepare_4d_causal(full_am, 2, 4, past=p))
    expanded = ref.legacy_to_4d(LEFT, 6, 6)
    with warnings.catch_warnings():  # deprecated in its last releases
        warnings.simplefilter("ignore")
        unmasked = Converter._unmask_unattended(expanded, MIN)
    assert torch.equal(unmasked, ref.legacy_unmask_unattended(expanded, MIN))


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (
            lambda: fm.from_hf_attention_mask([[1, 0]]),
            TypeError,
            r"needs a \[batch, seq_len\] tensor of 0/1, got list",
        ),
        (
            lambda: fm.from_hf_attention_mask(torch.ones(1, 1, 2, 2)),
            ValueError,
            r"needs a 2-D \[batch, seq_len\] tensor of 0/1, got shape \(1, 1, 2, 2\); a 4-D mask is already expanded",
        ),
        (
            lambda: fm.from_hf_attention_mask(torch.tensor([[1, 2]])),
            ValueError,
            r"holds values other than 0 and 1: \[1, 2\]",
        ),
        (
            lambda: fm.from_hf_attention_mask(torch.ones(1, 3)),
            TypeError,
            r"needs integers or bools \(1 = token\), got torch.float32",
        ),
        (
            lambda: fm.to_hf_4d(fm.from_hf_attention_mask(torch.ones(1, 5, dtype=torch.long)), 4),
            ValueError,
            r"the attention mask covers 5 positions but the mask is built for q_len=4, kv_len=4",
        ),
        (
            lambda: fm.to_hf_4d(fm.causal(), 4, dtype=torch.long),
            TypeError,
            r"to_hf_4d\(dtype=...\) needs a floating dtype",
        ),
        (
            lambda: fm.to_hf_4d(fm.causal(), 4, boolean=1),
            TypeError,
            r"to_hf_4d\(boolean=...\) must be True or False",
        ),
        (
            lambda: fm.to_dense(fm.causal(), 4, q_offset=-2),
            ValueError,
            r"shifted\(q_offset=...\) needs a value >= 0",
        ),
    ],
)
def test_bad_conversions(call, error, match):
    with pytest.raises(error, match=match):
        call()
