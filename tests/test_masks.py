"""Every factory against its dense oracle; the algebra's laws; repr, equality, pictures."""

import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.nn.attention.flex_attention import create_block_mask, create_mask

import flexmask as fm
from flexmask.masks import Tiles
from tests import reference as ref

# Sizes that are and are not multiples of the block size, q_len != kv_len included.
SIZES = [(1, 1), (7, 7), (128, 128), (200, 200), (130, 260), (260, 130)]


def _doc_ids(n: int) -> list[int]:
    return [i * 5 // max(n, 1) for i in range(n)]  # 5 documents of near-equal length


def _parents(n: int) -> list[int]:
    return [-1] + [(i - 1) // 2 for i in range(1, n)]  # a binary tree in breadth-first order


def _restarting(n: int) -> list[int]:
    """Position ids of packed documents of 1, 2, 3, ... tokens: they restart at 0."""
    out, length = [], 1
    while len(out) < n:
        out += list(range(length))
        length += 1
    return out[:n]


def _split(n: int) -> list[int]:
    return [n // 3, n - n // 3 - n // 4, n // 4]


def _offsets(n: int) -> list[int]:
    """A varlen layout of ``n`` tokens in four sequences, one of them empty."""
    return [0, n // 3, n // 3, n - n // 4, n]


def _rows(n: int) -> list[list[int]]:
    """Per-row document lengths of ``n`` tokens, zero-padded."""
    return [_split(n), [n, 0, 0], [1, n - 1, 0]]


# name -> (q_len, kv_len) -> (mask, oracle [B, q_len, kv_len])
CASES = {
    "full": lambda q, kv: (fm.full(), ref.full(q, kv)),
    "causal": lambda q, kv: (fm.causal(), ref.causal(q, kv)),
    "sliding_window_1": lambda q, kv: (fm.sliding_window(1), ref.sliding_window(q, kv, 1)),
    "sliding_window_37": lambda q, kv: (fm.sliding_window(37), ref.sliding_window(q, kv, 37)),
    "local_window_0_0": lambda q, kv: (fm.local_window(0, 0), ref.local_window(q, kv, 0, 0)),
    # 14 and 15 keys: tiles whose corner sits exactly on the window's edge at blocks of 16
    "local_window_15_14": lambda q, kv: (fm.local_window(15, 14), ref.local_window(q, kv, 15, 14)),
    "local_window_14_15": lambda q, kv: (fm.local_window(14, 15), ref.local_window(q, kv, 14, 15)),
    "sink_tokens_5": lambda q, kv: (fm.sink_tokens(5), ref.sink_tokens(q, kv, 5)),
    "dilated_window_37_3": lambda q, kv: (
        fm.dilated_window(37, 3),
        ref.dilated_window(q, kv, 37, 3),
    ),
    # 16 at dilation 2: the window's edge on a block's edge at blocks of 16
    "dilated_window_16_2": lambda q, kv: (
        fm.dilated_window(16, 2),
        ref.dilated_window(q, kv, 16, 2),
    ),
    "global_tokens_1d": lambda q, kv: (
        fm.global_tokens([0, 63, 64]),
        ref.global_tokens(q, kv, [0, 63, 64]),
    ),
    "global_tokens_2d": lambda q, kv: (
        fm.global_tokens([[0, 17, 130], [5, -1, -1], [-1, -1, -1]]),
        ref.global_tokens(q, kv, [[0, 17, 130], [5, -1, -1], [-1, -1, -1]]),
    ),
    "from_cu_seqlens": lambda q, kv: (
        fm.from_cu_seqlens(_offsets(q), _offsets(kv)),
        ref.cu_seqlens(_offsets(q), _offsets(kv)),
    ),
    "from_cu_seqlens_causal": lambda q, kv: (
        fm.from_cu_seqlens(_offsets(q), _offsets(kv), causal=True),
        ref.cu_seqlens(_offsets(q), _offsets(kv), causal=True),
    ),
    "packed_rows": lambda q, kv: (
        fm.packed(_rows(max(q, kv))),
        ref.packed_rows(q, kv, _rows(max(q, kv))),
    ),
    "key_padding_right": lambda q, kv: (
        fm.key_padding([kv, 0, min(63, kv)]),  # 63: a block's last key at blocks of 16 and 64
        ref.key_padding_lengths(q, kv, [kv, 0, min(63, kv)]),
    ),
    "key_padding_left": lambda q, kv: (
        fm.key_padding([kv, 1, kv // 3], side="left"),
        ref.key_padding_lengths(q, kv, [kv, 1, kv // 3], side="left"),
    ),
    "chunked_48_start": lambda q, kv: (
        fm.chunked(48, start=[0, 5, 47]),
        ref.chunked_from(q, kv, 48, [0, 5, 47]),
    ),
    "from_position_ids": lambda q, kv: (
        fm.from_position_ids(_restarting(max(q, kv))),
        ref.document(q, kv, ref.documents_of_positions(_restarting(max(q, kv)))),
    ),
    "prefix_lm_int": lambda q, kv: (fm.prefix_lm(50), ref.prefix_lm(q, kv, 50)),
    "prefix_lm_batch": lambda q, kv: (fm.prefix_lm([0, 3, 140]), ref.prefix_lm(q, kv, [0, 3, 140])),
    "padding_right": lambda q, kv: (
        fm.padding([min(q, kv), 0, (q + 1) // 2]),
        ref.padding(q, kv, [min(q, kv), 0, (q + 1) // 2]),
    ),
    "padding_left": lambda q, kv: (
        fm.padding([kv, 1, kv // 3], side="left"),
        ref.padding(q, kv, [kv, 1, kv // 3], side="left"),
    ),
    "document_1d": lambda q, kv: (
        fm.document(_doc_ids(max(q, kv))),
        ref.document(q, kv, _doc_ids(max(q, kv))),
    ),
    "document_2d": lambda q, kv: (
        fm.document([_doc_ids(max(q, kv)), [0] * max(q, kv)]),
        ref.document(q, kv, [_doc_ids(max(q, kv)), [0] * max(q, kv)]),
    ),
    "packed": lambda q, kv: (fm.packed(_split(max(q, kv))), ref.packed(q, kv, _split(max(q, kv)))),
    "chunked_1": lambda q, kv: (fm.chunked(1), ref.chunked(q, kv, 1)),
    "chunked_48": lambda q, kv: (fm.chunked(48), ref.chunked(q, kv, 48)),
    "tree": lambda q, kv: (fm.tree(_parents(max(q, kv))), ref.tree(q, kv, _parents(max(q, kv)))),
    "tree_context": lambda q, kv: (
        fm.tree(_parents(max(q, kv) // 2 + 1), context_len=max(q, kv) - max(q, kv) // 2 - 1),
        ref.tree(q, kv, _parents(max(q, kv) // 2 + 1), max(q, kv) - max(q, kv) // 2 - 1),
    ),
}


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", sorted(CASES))
def test_factory_matches_oracle(name, size):
    q_len, kv_len = size
    mask, oracle = CASES[name](q_len, kv_len)
    dense = fm.to_dense(mask, q_len, kv_len, heads=2, device="cpu")
    assert dense.shape == (oracle.shape[0], 2, q_len, kv_len)
    assert torch.equal(dense, oracle[:, None].expand_as(dense))


@pytest.mark.parametrize("name", sorted(CASES))
def test_factory_is_a_torch_mask_mod(name):
    """A MaskMod goes straight into torch's create_mask (left padding once bound to a length)."""
    mask, oracle = CASES[name](200, 200)
    dense = create_mask(mask.bind(200, 200), oracle.shape[0], 1, 200, 200, "cpu")
    assert torch.equal(dense[:, 0], oracle)


@pytest.mark.parametrize("name", sorted(CASES))
def test_block_mask_to_dense_matches_oracle(name):
    mask, oracle = CASES[name](200, 130)
    bm = fm.block_mask(mask, 200, 130, block_size=64, device="cpu", compile=False)
    dense = fm.block_mask_to_dense(bm)
    assert torch.equal(dense[:, 0], oracle)
    assert torch.equal(fm.evaluation.block_kinds(bm)[:, 0], ref.block_kinds(oracle, 64))


def test_unbound_left_padding_says_how_to_fix():
    with pytest.raises(ValueError, match="needs the sequence length"):
        create_mask(fm.padding([2], side="left"), 1, 1, 4, 4, "cpu")


# -- the pictures in the docstrings: drawn by to_ascii, which is checked against the oracle --

PICTURES = {  # name: (mask, q_len, kv_len, oracle)
    "full": (fm.full(), 4, 4, ref.full(4, 4)),
    "causal": (fm.causal(), 4, 4, ref.causal(4, 4)),
    "sliding_window": (fm.sliding_window(3), 5, 5, ref.sliding_window(5, 5, 3)),
    "local_window": (fm.local_window(1, 2), 5, 5, ref.local_window(5, 5, 1, 2)),
    "sink_tokens": (fm.sink_tokens(2), 4, 4, ref.sink_tokens(4, 4, 2)),
    "dilated_window": (fm.dilated_window(2, 2), 5, 5, ref.dilated_window(5, 5, 2, 2)),
    "global_tokens": (fm.global_tokens([1]), 4, 4, ref.global_tokens(4, 4, [1])),
    "neighborhood_2d": (fm.neighborhood_2d(1, 4, 3), 4, 4, ref.neighborhood_2d(1, 4, 3)),
    "from_cu_seqlens": (
        fm.from_cu_seqlens([0, 1, 3], [0, 2, 4], causal=True),
        3,
        4,
        ref.cu_seqlens([0, 1, 3], [0, 2, 4], causal=True),
    ),
    "key_padding": (fm.key_padding([3]), 4, 4, ref.key_padding_lengths(4, 4, [3])),
    "from_position_ids": (
        fm.from_position_ids([0, 1, 0, 1]),
        4,
        4,
        ref.document(4, 4, [0, 0, 1, 1]),
    ),
    "prefix_lm": (fm.prefix_lm(2), 4, 4, ref.prefix_lm(4, 4, 2)),
    "padding": (fm.padding([3]), 4, 4, ref.padding(4, 4, [3])),
    "document": (fm.document([0, 0, 1, 1]), 4, 4, ref.document(4, 4, [0, 0, 1, 1])),
    "packed": (fm.packed([1, 3]), 4, 4, ref.packed(4, 4, [1, 3])),
    "chunked": (fm.chunked(2), 5, 5, ref.chunked(5, 5, 2)),
    "tree": (fm.tree([-1, 0, 0, 1], context_len=1), 5, 5, ref.tree(5, 5, [-1, 0, 0, 1], 1)),
    "shifted": (fm.shifted(fm.causal(), 2), 2, 4, ref.causal(4, 4)[:, 2:]),
    "from_hf_attention_mask": [
        (
            fm.from_hf_attention_mask(torch.tensor([[1, 0, 1, 1]])),
            4,
            4,
            ref.padding(4, 4, [4])
            & torch.tensor([1, 0, 1, 1]).bool()[:, None]
            & torch.tensor([1, 0, 1, 1]).bool()[None, :],
        ),
        (
            fm.from_hf_attention_mask(torch.tensor([[1, 0, 1, 1]]), keys_only=True),
            2,
            4,
            ref.key_padding(2, 4, [[1, 0, 1, 1]]),
        ),
    ],
}


@pytest.mark.parametrize("name", sorted(PICTURES))
def test_docstring_picture(name):
    cases = PICTURES[name] if isinstance(PICTURES[name], list) else [PICTURES[name]]
    drawn = []
    for mask, q, kv, oracle in cases:
        drawn.append(fm.to_ascii(mask, q, kv))
        assert drawn[-1] == ref.render(oracle[0])
    doc = getattr(fm, name).__doc__
    pictures, rows = [], []
    for line in [*doc.splitlines(), ""]:  # pictures are runs of ■/⬚ lines
        if re.fullmatch(r"\s*[■⬚][■⬚ ]*", line):
            rows.append(line.strip())
        elif rows:
            pictures.append("\n".join(rows))
            rows = []
    assert pictures == drawn


# -- algebra --------------------------------------------------------------------------------

Q, KV = 23, 29  # odd sizes, q_len != kv_len


def leaves(q, kv):
    """(mask, oracle) pairs for every factory that builds at any size."""
    n = max(q, kv)
    return st.one_of(
        st.just((fm.full(), ref.full(q, kv))),
        st.just((fm.causal(), ref.causal(q, kv))),
        st.integers(1, n + 1).map(lambda w: (fm.sliding_window(w), ref.sliding_window(q, kv, w))),
        st.tuples(st.integers(0, n + 1), st.integers(0, n + 1)).map(
            lambda w: (fm.local_window(*w), ref.local_window(q, kv, *w))
        ),
        st.integers(0, n + 1).map(lambda k: (fm.sink_tokens(k), ref.sink_tokens(q, kv, k))),
        st.tuples(st.integers(0, n + 1), st.integers(1, 5)).map(
            lambda w: (fm.dilated_window(*w), ref.dilated_window(q, kv, *w))
        ),
        st.sets(st.integers(0, n + 2), max_size=4).map(
            lambda g: (fm.global_tokens(sorted(g)), ref.global_tokens(q, kv, sorted(g)))
        ),
        st.tuples(st.lists(st.integers(0, kv), min_size=2, max_size=2), st.booleans()).map(
            lambda p: (
                fm.key_padding(p[0], "left" if p[1] else "right"),
                ref.key_padding_lengths(q, kv, p[0], "left" if p[1] else "right"),
            )
        ),
        st.integers(0, n).map(lambda p: (fm.prefix_lm(p), ref.prefix_lm(q, kv, p))),
        st.integers(1, n + 1).map(lambda c: (fm.chunked(c), ref.chunked(q, kv, c))),
        st.lists(st.integers(0, n), min_size=2, max_size=2).map(
            lambda lens: (fm.padding(lens), ref.padding(q, kv, lens))
        ),
        st.lists(st.integers(0, 4), min_size=n, max_size=n).map(
            lambda ids: (fm.document(ids), ref.document(q, kv, ids))
        ),
        st.lists(st.integers(0, kv), min_size=2, max_size=2).map(
            lambda lens: (fm.padding(lens, side="left"), ref.padding(q, kv, lens, side="left"))
        ),
        trees(n).map(lambda t: (fm.tree(t[0], t[1]), ref.tree(q, kv, t[0], t[1]))),
        st.tuples(st.integers(0, 9), st.integers(1, n)).map(
            lambda p: (
                fm.shifted(fm.sliding_window(p[1]) | fm.chunked(p[1]), p[0]),
                (ref.sliding_window(q + p[0], kv, p[1]) | ref.chunked(q + p[0], kv, p[1]))[
                    :, p[0] :
                ],
            )
        ),
    )


@st.composite
def trees(draw, n):
    """(parents, context_len) of a random tree after a context, n positions in all."""
    context_len = draw(st.integers(0, n - 1))
    parents = [draw(st.integers(-1, i - 1)) for i in range(n - context_len)]
    return parents, context_len


def expressions(q=Q, kv=KV, max_leaves=5):
    """(mask, oracle) pairs; the oracle is built with tensor &, |, ~ from the leaves' oracles."""

    def extend(children):
        return st.one_of(
            st.tuples(children, children).map(lambda p: (p[0][0] & p[1][0], p[0][1] & p[1][1])),
            st.tuples(children, children).map(lambda p: (p[0][0] | p[1][0], p[0][1] | p[1][1])),
            children.map(lambda p: (~p[0], ~p[1])),
        )

    return st.recursive(leaves(q, kv), extend, max_leaves=max_leaves)


def dense(mask):
    return fm.to_dense(mask, Q, KV, device="cpu")[:, 0]


@given(expressions())
def test_composition_matches_oracle(pair):
    mask, oracle = pair
    got = dense(mask)
    assert torch.equal(got, oracle.expand_as(got))


@given(expressions(), expressions())
def test_algebra_laws(p1, p2):
    a, b = p1[0], p2[0]
    assert torch.equal(dense(~(a & b)), dense(~a | ~b))  # De Morgan
    assert torch.equal(dense(~(a | b)), dense(~a & ~b))
    assert torch.equal(dense(a & fm.full()), dense(a))
    assert torch.equal(dense(a | ~fm.full()), dense(a))
    assert torch.equal(dense(~~a), dense(a))
    assert torch.equal(dense(a & b), dense(b & a))
    assert torch.equal(dense(a | b), dense(b | a))


SCALAR_LEAVES = st.one_of(
    st.just(fm.full()),
    st.just(fm.causal()),
    st.integers(1, 300).map(fm.sliding_window),
    st.integers(0, 300).map(fm.prefix_lm),
    st.integers(1, 300).map(fm.chunked),
)


def scalar_expressions():
    return st.recursive(
        SCALAR_LEAVES,
        lambda c: st.one_of(
            st.tuples(c, c).map(lambda p: p[0] & p[1]),
            st.tuples(c, c).map(lambda p: p[0] | p[1]),
            c.map(lambda m: ~m),
        ),
        max_leaves=6,
    )


@given(scalar_expressions())
def test_repr_round_trips_for_scalar_masks(mask):
    rebuilt = eval(repr(mask), vars(fm))  # the repr is a flexmask expression
    assert rebuilt == mask
    assert hash(rebuilt) == hash(mask)
    assert rebuilt.cache_key() == (rebuilt,) == mask.cache_key()  # keyed by value
    assert re.fullmatch(r"[A-Za-z0-9._]+", mask.slug)


def test_repr_parenthesises_only_where_needed():
    sw, p, c = fm.sliding_window(256), fm.prefix_lm(64), fm.causal()
    assert repr((sw | p) & fm.padding([900, 4096])) == (
        "(sliding_window(256) | prefix_lm(64)) & padding(lengths=tensor([900, 4096]))"
    )
    assert repr(sw | p & c) == "sliding_window(256) | prefix_lm(64) & causal()"
    assert repr(~(sw & c)) == "~(sliding_window(256) & causal())"
    assert repr(~sw & c) == "~sliding_window(256) & causal()"
    assert repr((c & sw) & p) == "causal() & sliding_window(256) & prefix_lm(64)"
    assert repr(c | (sw | p)) == "causal() | sliding_window(256) | prefix_lm(64)"
    assert ~~c is c and repr(~(~sw & c)) == "~(~sliding_window(256) & causal())"


def test_repr_of_tensor_masks():
    assert repr(fm.tree([-1, 0], context_len=3)) == "tree(parents=tensor([-1, 0]), context_len=3)"
    assert repr(fm.document([[0, 1], [1, 1]])) == "document(doc_ids=tensor([[0, 1], [1, 1]]))"
    long = repr(fm.document(list(range(100))))
    assert long == "document(doc_ids=tensor([0, 1, 2, ..., 97, 98, 99], shape=(100,)))"
    assert fm.padding([3, 5]).slug == "padding_lengths_3_5"
    assert len(fm.document(list(range(100))).slug) <= 96


def test_equality_and_hashing():
    assert fm.sliding_window(4) == fm.sliding_window(4)
    assert fm.sliding_window(4) != fm.sliding_window(5)
    assert fm.causal() & fm.chunked(3) == fm.causal() & fm.chunked(3)
    assert fm.causal() & fm.chunked(3) != fm.chunked(3) & fm.causal()  # expressions, not sets
    assert len({fm.causal(), fm.causal(), fm.full()}) == 2
    pad = fm.padding([3])
    assert pad != fm.padding([3])  # tensors: identity
    assert pad == pad and hash(pad) == hash(pad)
    assert fm.causal() & pad == fm.causal() & pad  # same parts, same expression
    key = (fm.causal() & pad).cache_key()
    assert key == (fm.causal() & pad).cache_key()  # the same tensors, unchanged
    pad.lengths[0] = 2  # refilled in place: another key
    assert (fm.causal() & pad).cache_key() != key
    assert (fm.causal() & (lambda b, h, q, kv: q >= kv)).cache_key() is None  # opaque


def test_plain_functions_and_attention_gym_style_operands():
    def gym_causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    mask = fm.chunked(4) & gym_causal
    assert isinstance(mask, fm.MaskMod)
    assert repr(mask) == "chunked(4) & gym_causal"
    assert repr(gym_causal | fm.chunked(4)) == "gym_causal | chunked(4)"
    assert fm.as_mask(gym_causal) == fm.as_mask(gym_causal)
    oracle = ref.causal(9, 9) & ref.chunked(9, 9, 4)
    assert torch.equal(fm.to_dense(mask, 9, device="cpu")[:, 0], oracle)
    assert torch.equal(
        fm.to_dense(fm.not_mask(gym_causal), 9, device="cpu")[0, 0], ~ref.causal(9, 9)[0]
    )


def test_function_forms_equal_operators():
    a, b, c = fm.causal(), fm.chunked(3), fm.sliding_window(2)
    assert fm.and_masks(a, b, c) == a & b & c
    assert fm.or_masks(a, b, c) == a | b | c
    assert fm.not_mask(a) == ~a
    assert fm.and_masks(a) is a


def test_masks_copy_their_tensors():
    lengths = torch.tensor([3, 4])
    mask = fm.padding(lengths)
    lengths[0] = 0  # the caller's tensor changes; the mask does not
    assert torch.equal(fm.to_dense(mask, 4, device="cpu")[0, 0], ref.padding(4, 4, [3])[0])


def test_to_moves_every_tensor():
    mask = fm.causal() & fm.padding([2]) & fm.tree([-1, 0], context_len=1)
    moved = mask.to("meta")
    assert {t.device.type for t in moved.tensors()} == {"meta"}
    assert [t.shape for t in moved.tensors()] == [t.shape for t in mask.tensors()]
    assert repr(moved).startswith("causal() & padding(lengths=tensor(..., shape=(1,)")
    with pytest.raises(ValueError, match=r"holds tensors on several devices \(\['cpu', 'meta'\]\)"):
        _ = (mask & fm.padding([1]).to("meta")).device
    assert mask.device == torch.device("cpu")


def test_batch_size_and_head_use():
    assert fm.causal().batch_size is None
    assert (fm.causal() & fm.padding([1, 2, 3])).batch_size == 3
    assert fm.prefix_lm(torch.tensor(5)).batch_size is None  # 0-d: shared by all rows
    assert not (fm.causal() & fm.padding([1])).uses_heads
    assert fm.as_mask(lambda b, h, q, kv: q >= kv).uses_heads
    with pytest.raises(ValueError, match="disagree on the batch size"):
        _ = (fm.padding([1, 2]) & fm.prefix_lm([1, 2, 3])).batch_size


@pytest.mark.slow
def test_mask_mods_work_in_torchs_compiled_apis():
    """Straight into torch: compiled create_block_mask, then compiled flex_attention."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from tests.reference import attention

    mask = fm.causal() & fm.padding([200, 70]) & fm.document([j // 50 for j in range(200)])
    oracle = ref.causal(200, 200) & ref.padding(200, 200, [200, 70])
    oracle = oracle & ref.document(200, 200, [j // 50 for j in range(200)])
    bm = torch.compile(create_block_mask)(mask, 2, None, 200, 200, "cpu")
    assert torch.equal(fm.block_mask_to_dense(bm)[:, 0], oracle)
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 200, 16) for _ in range(3))
    out = torch.compile(flex_attention)(q, k, v, block_mask=bm)
    want = attention(q.double(), k.double(), v.double(), oracle[:, None])
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("w", [1, 2, 5, 130])
def test_local_window_without_keys_after_is_the_sliding_window(w):
    for q, kv in ((200, 200), (130, 260)):
        want = fm.to_dense(fm.sliding_window(w), q, kv)
        assert torch.equal(fm.to_dense(fm.local_window(w - 1, 0), q, kv), want)


@pytest.mark.parametrize(
    ("args", "error"), [((-1, 0), ValueError), ((0, -2), ValueError), ((1.5, 0), TypeError)]
)
def test_local_window_refuses_bad_sizes(args, error):
    with pytest.raises(error, match=r"local_window\((left|right)=...\)"):
        fm.local_window(*args)


def test_dilated_window_of_dilation_one_is_the_local_window():
    for q, kv in ((200, 200), (130, 260)):
        want = fm.to_dense(fm.local_window(9, 9), q, kv)
        assert torch.equal(fm.to_dense(fm.dilated_window(9, 1), q, kv), want)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (
            lambda: fm.dilated_window(-1, 1),
            ValueError,
            r"dilated_window\(window=...\) needs a value >= 0",
        ),
        (
            lambda: fm.dilated_window(3, 0),
            ValueError,
            r"dilated_window\(dilation=...\) needs a value >= 1",
        ),
        (
            lambda: fm.dilated_window(3, 1.0),
            TypeError,
            r"dilated_window\(dilation=...\) needs an int",
        ),
        (
            lambda: fm.global_tokens([0, -2]),
            ValueError,
            r"positions >= 0 \(or -1 for none\), got -2",
        ),
        (lambda: fm.global_tokens([[0, 3, 3]]), ValueError, r"repeats a position within a row"),
        (
            lambda: fm.global_tokens([0.5]),
            TypeError,
            r"global_tokens\(indices=...\) needs an integer",
        ),
        (
            lambda: fm.global_tokens(torch.zeros(1, 1, 1, dtype=torch.long)),
            ValueError,
            r"1-D or 2-D",
        ),
        (lambda: fm.packed([[2, 1], [1, 1]]), ValueError, r"rows of \[3, 2\] tokens"),
        (lambda: fm.packed([[2, -1]]), ValueError, r"lengths >= 0"),
        (lambda: fm.from_cu_seqlens([1, 3]), ValueError, r"start at 0 and end at the total"),
        (lambda: fm.from_cu_seqlens([0]), ValueError, r"start at 0 and end at the total"),
        (lambda: fm.from_cu_seqlens([0, 3, 2]), ValueError, r"never decrease"),
        (lambda: fm.from_cu_seqlens([0, 3], [0, 1, 2]), ValueError, r"as many key sequences"),
        (lambda: fm.from_cu_seqlens([0, 3], causal=1), TypeError, r"causal=...\) must be True or"),
        (
            lambda: fm.to_dense(fm.from_cu_seqlens([0, 3]), 4),
            ValueError,
            r"lays out 3 query and 3 key",
        ),
        (lambda: fm.to_dense(fm.packed([[2, 1]]), 4), ValueError, r"lengths sum 3 positions"),
        (
            lambda: fm.neighborhood_2d(8, 8, 4),
            ValueError,
            r"neighborhood_2d\(kernel=...\) must be odd",
        ),
        (
            lambda: fm.neighborhood_2d(9, 6, 3, 3),
            ValueError,
            r"kernel \* dilation = 3 \* 3 = 9 is larger than the image's width \(6\)",
        ),
        (lambda: fm.neighborhood_2d(8, 0, 3), ValueError, r"neighborhood_2d\(width=...\)"),
        (lambda: fm.neighborhood_2d(8, 8, 3.0), TypeError, r"neighborhood_2d\(kernel=...\)"),
        (
            lambda: fm.to_dense(fm.neighborhood_2d(4, 4, 3), 15),
            ValueError,
            r"4 x 4 = 16 tokens, but the mask is built for q_len=15",
        ),
    ],
)
def test_new_factories_refuse_bad_arguments(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_from_cu_seqlens_aligns_causality_bottom_right_like_flash_attn():
    """flash-attn's docstring example: 2 queries after 5 keys keep the last two rows of the
    5 x 5 causal mask; 5 queries before 2 keys see nothing in their first three rows."""
    m = fm.from_cu_seqlens([0, 2], [0, 5], causal=True)
    assert fm.to_dense(m, 2, 5)[0, 0].int().tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    m = fm.from_cu_seqlens([0, 5], [0, 2], causal=True)
    rows = fm.to_dense(m, 5, 2)[0, 0].int().tolist()
    assert rows == [[0, 0], [0, 0], [0, 0], [1, 0], [1, 1]]


@pytest.mark.parametrize("q_len", [1, 5, 40])
def test_shifted_with_one_offset_per_row_decodes_a_batch_of_lengths(q_len):
    """Each row's queries at its own position: row b is rows ``off[b]:off[b] + q_len`` of the
    square mask; the tiles equal torch's builder's."""
    kv = 300
    offsets = [kv - q_len, kv - q_len - 37, 0]
    inner_oracle = ref.sliding_window(kv, kv, 50)[0]
    want = torch.stack([inner_oracle[o : o + q_len] for o in offsets])
    mask = fm.shifted(fm.sliding_window(50), torch.tensor(offsets))
    assert mask.batch_size == 3
    dense = fm.to_dense(mask, q_len, kv)[:, 0]
    assert torch.equal(dense, want)
    ours = fm.block_mask(mask, q_len, kv, block_size=16, device="cpu", method="tiles")
    theirs = create_block_mask(mask.bind(q_len, kv), 3, None, q_len, kv, "cpu", BLOCK_SIZE=16)
    ref.assert_same_block_tables(ours, theirs)
    with pytest.raises(ValueError, match=r"gives 3 offsets, one per batch row, but the mask"):
        fm.shifted(fm.padding([3, 4]), torch.tensor(offsets))
    with pytest.raises(ValueError, match=r"needs values >= 0, got \[1, -1\]"):
        fm.shifted(fm.causal(), torch.tensor([1, -1]))


NEIGHBORHOODS = [
    (16, 16, 3, 1),
    (12, 20, 5, 1),
    (16, 16, 3, 2),
    (9, 7, 3, 2),
    (1, 40, 5, 1),
    (8, 8, 1, 1),
]


@pytest.mark.parametrize(("height", "width", "kernel", "dilation"), NEIGHBORHOODS)
def test_neighborhood_2d_equals_the_pixel_loop_and_torch_block_by_block(
    height, width, kernel, dilation
):
    n = height * width
    mask = fm.neighborhood_2d(height, width, kernel, dilation)
    oracle = ref.neighborhood_2d(height, width, kernel, dilation)
    assert torch.equal(fm.to_dense(mask, n)[:, 0], oracle)
    for block in (16, 32):
        ours = fm.block_mask(mask, n, block_size=block, device="cpu", method="tiles", cache=False)
        theirs = create_block_mask(mask, None, None, n, n, "cpu", BLOCK_SIZE=block)
        ref.assert_same_block_tables(ours, theirs)


def test_neighborhood_2d_tile_bounds_are_sound_and_decide_most_tiles():
    """On a 64 x 64 image with blocks of 64 (one image row each), the bounds alone classify every
    tile (no pair evaluated) and never contradict the counts."""
    mask = fm.neighborhood_2d(64, 64, 7)
    tiles = Tiles(0, 64, 4096, 4096)
    every, some = mask.tile_bounds(tiles)
    counts = ref_counts(mask, 4096, 64)
    assert bool((counts[every] == 64 * 64).all()) and bool((counts[~some] == 0).all())
    undecided = some & ~every
    assert int(undecided.sum()) == int(((counts > 0) & (counts < 64 * 64)).sum())


def ref_counts(mask, n, size):
    dense = ref.neighborhood_2d(64, 64, 7)[0].view(n // size, size, n // size, size)
    return dense.sum((1, 3))


def test_positions_past_a_per_position_tensor_belong_to_nothing():
    """A longer KV cache evaluates masks past their per-position tensors: those positions read
    the last entry clamped, and must still be outside (no document, no token, not global)."""
    t = torch.tensor
    zero = t(0)
    cases = [
        (fm.document([0, 0, 1]), 2, 3),  # the last id is 1 at 2; 3 is past it
        (fm.from_cu_seqlens([0, 1, 3]), 2, 3),
        (fm.from_hf_attention_mask(t([[1, 1, 1]])), 2, 3),
        (fm.global_tokens([2]).bind(3, 3), 3, 0),  # 2 is global; 3, past it, is not
    ]
    for mask, q, kv in cases:
        assert not bool(mask(zero, zero, t(q), t(kv))), mask
        inside = (q, 2) if kv == 3 else (2, kv)
        assert bool(mask(zero, zero, t(inside[0]), t(inside[1]))), mask  # the last entry itself
