"""Decoding with a KVCache: token by token equals one full forward, for every mask family, rows
of different lengths, GQA and both backends; greedy generation; trees verified on the cache."""

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import flexmask as fm

VOCAB, DIM, HEADS, KV_HEADS, MAX_LEN = 50, 32, 4, 2, 64


class TinyDecoder(nn.Module):
    """Two pre-norm blocks of MultiheadFlexAttention + MLP, learned positions."""

    def __init__(self, backend="sdpa"):
        super().__init__()
        torch.manual_seed(0)
        self.tok, self.pos = nn.Embedding(VOCAB, DIM), nn.Embedding(128, DIM)
        self.attn = nn.ModuleList(
            fm.MultiheadFlexAttention(DIM, HEADS, num_kv_heads=KV_HEADS, backend=backend)
            for _ in range(2)
        )
        self.norm = nn.ModuleList(nn.LayerNorm(DIM) for _ in range(4))
        self.mlp = nn.ModuleList(
            nn.Sequential(nn.Linear(DIM, 2 * DIM), nn.GELU(), nn.Linear(2 * DIM, DIM))
            for _ in range(2)
        )
        self.head = nn.Linear(DIM, VOCAB)
        self.eval()

    def forward(self, ids, positions, mask, caches=None, lengths=None):
        x = self.tok(ids) + self.pos(positions)
        for i in range(2):
            cache = None if caches is None else caches[i]
            x = x + self.attn[i](self.norm[2 * i](x), mask=mask, cache=cache, lengths=lengths)
            x = x + self.mlp[i](self.norm[2 * i + 1](x))
        return self.head(x)

    def caches(self, batch, max_len=MAX_LEN):
        return [fm.KVCache(batch, max_len, KV_HEADS, DIM // HEADS) for _ in range(2)]


S, PREFILL = 20, 8
LENS = torch.tensor([20, 13])  # rows of different lengths (right padded)
DOCS = [0] * 7 + [1] * 6 + [2] * (MAX_LEN - 13)
FAMILIES = {
    "causal": fm.causal(),
    "sliding_window": fm.sliding_window(5),
    "prefix_lm": fm.prefix_lm(6),
    "documents": fm.document(DOCS) & fm.causal(),
}


def full_mask(mask):
    """The same mask for one forward over the first S positions (document ids cut to S)."""
    return fm.document(DOCS[:S]) & fm.causal() if mask is FAMILIES["documents"] else mask


def decode_vs_full(model, mask):
    torch.manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, S))
    pos = torch.arange(S).expand(2, S)
    with torch.no_grad():
        full = model(ids, pos, full_mask(mask) & fm.padding(LENS))
        caches = model.caches(2)
        outs = [model(ids[:, :PREFILL], pos[:, :PREFILL], mask, caches, LENS.clamp(max=PREFILL))]
        for i in range(PREFILL, S):
            outs.append(
                model(ids[:, i : i + 1], pos[:, i : i + 1], mask, caches, (i < LENS).long())
            )
    real = torch.arange(S)[None] < LENS[:, None]
    assert caches[0].lengths.tolist() == LENS.tolist()
    return torch.cat(outs, 1)[real], full[real]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_decode_equals_full_forward(family):
    got, want = decode_vs_full(TinyDecoder("sdpa"), FAMILIES[family])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_decode_equals_full_forward_on_flex(family):
    got, want = decode_vs_full(TinyDecoder("flex"), FAMILIES[family])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def greedy_with_cache(model, prompts, steps):
    lens = torch.tensor([len(p) for p in prompts])
    ids = torch.zeros(len(prompts), int(lens.max()), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p)
    caches = model.caches(len(prompts))
    with torch.no_grad():
        logits = model(ids, torch.arange(ids.shape[1]).expand_as(ids), fm.causal(), caches, lens)
        nxt = logits[torch.arange(len(prompts)), lens - 1].argmax(-1)
        out = [nxt]
        for _ in range(steps - 1):
            pos = caches[0].lengths[:, None]  # each row's own next position
            nxt = model(nxt[:, None], pos, fm.causal(), caches)[:, 0].argmax(-1)
            out.append(nxt)
    return torch.stack(out, 1).tolist()


def greedy_by_recomputation(model, prompt, steps):
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.tensor([seq])
            seq.append(int(model(ids, torch.arange(len(seq))[None], fm.causal())[0, -1].argmax()))
    return seq[len(prompt) :]


def test_greedy_generation_with_cache_equals_recomputation():
    model, prompts = TinyDecoder("sdpa"), [[3, 4, 5, 6, 7], [8, 9], [10, 11, 12]]
    got = greedy_with_cache(model, prompts, 12)
    assert got == [greedy_by_recomputation(model, p, 12) for p in prompts]


def test_tree_verification_then_select_equals_decoding_the_path():
    model, ctx = TinyDecoder("sdpa"), torch.tensor([[1, 2, 3, 4, 5, 6]])
    c = ctx.shape[1]
    tree = fm.Tree.from_paths([[7, 8, 9], [7, 10], [11, 12, 13]])
    accepted = tree.paths[2][tree.paths[2] >= 0]  # nodes of the path 11, 12, 13
    with torch.no_grad():
        caches = model.caches(1)
        model(ctx, torch.arange(c)[None], fm.causal(), caches)
        model(tree.tokens[None], tree.position_ids(c)[None], tree.mask(c), caches)
        keep = torch.cat([torch.arange(c), c + accepted])
        for cache in caches:
            cache.select(keep)
        plain = model.caches(1)
        model(ctx, torch.arange(c)[None], fm.causal(), plain)
        for i, tok in enumerate(tree.tokens[accepted].tolist()):
            model(torch.tensor([[tok]]), torch.tensor([[c + i]]), fm.causal(), plain)
        n = c + accepted.numel()
        for a, b in zip(caches, plain, strict=True):
            assert a.lengths.tolist() == b.lengths.tolist() == [n]
            torch.testing.assert_close(a.k[:, :, :n], b.k[:, :, :n], atol=1e-5, rtol=0)
            torch.testing.assert_close(a.v[:, :, :n], b.v[:, :, :n], atol=1e-5, rtol=0)
        nxt = torch.tensor([[20]])
        torch.testing.assert_close(model(nxt, torch.tensor([[n]]), fm.causal(), caches),
                                   model(nxt, torch.tensor([[n]]), fm.causal(), plain), atol=1e-5, rtol=0)  # fmt: skip


@pytest.mark.parametrize("backend", ["sdpa", "auto"])
def test_left_padded_prompts_equal_right_padded_ones(backend):
    attn = fm.MultiheadFlexAttention(DIM, HEADS, num_kv_heads=KV_HEADS, backend=backend).eval()
    lens = torch.tensor([5, 2, 4])
    x = torch.randn(3, 5, DIM)
    left = torch.zeros_like(x)
    for i, n in enumerate(lens.tolist()):
        left[i, 5 - n :] = x[i, :n]
    caches = [fm.KVCache(3, 16, KV_HEADS, DIM // HEADS) for _ in range(2)]
    with torch.no_grad():
        right_out = attn(x, mask=fm.causal(), cache=caches[0], lengths=lens)
        left_out = attn(left, mask=fm.causal(), cache=caches[1], lengths=lens, padding_side="left")
        step = torch.randn(3, 1, DIM)
        steps = [attn(step, mask=fm.causal(), cache=c) for c in caches]
    for i, n in enumerate(lens.tolist()):
        torch.testing.assert_close(left_out[i, 5 - n :], right_out[i, :n], atol=1e-6, rtol=0)
        assert bool((left_out[i, : 5 - n] == attn.out_proj.bias).all())  # pad queries: zeros
    assert caches[0].lengths.tolist() == caches[1].lengths.tolist() == [6, 3, 5]
    torch.testing.assert_close(steps[0], steps[1], atol=1e-6, rtol=0)


def test_select_reorders_rows_for_beams():
    cache = fm.KVCache(3, 8, 1, 2)
    k = torch.arange(3.0)[:, None, None, None].expand(3, 1, 2, 2)
    cache.append(k, k, torch.tensor([2, 2, 2]))
    cache.select(rows=torch.tensor([2, 2, 0]))
    assert cache.k[:, 0, 0, 0].tolist() == [2.0, 2.0, 0.0] and cache.lengths.tolist() == [2, 2, 2]


ATTN = fm.MultiheadFlexAttention(DIM, HEADS, num_kv_heads=KV_HEADS, backend="sdpa")
X = torch.randn(2, 3, DIM)


def full_cache():
    cache = fm.KVCache(2, 4, KV_HEADS, DIM // HEADS)
    with torch.no_grad():
        ATTN(X, mask=fm.causal(), cache=cache)
    return cache


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (
            lambda: ATTN(X, cache=full_cache()),
            ValueError,
            r"KVCache is full: writing 3 positions after lengths \[3, 3\] would pass max_len=4",
        ),
        (
            lambda: ATTN(X, cache=fm.KVCache(3, 8, KV_HEADS, 8)),
            ValueError,
            r"forward\(cache=...\) holds batch=3, num_kv_heads=2, head_dim=8.*but this call needs batch=2",
        ),
        (
            lambda: ATTN(X, cache=fm.KVCache(2, 8, 4, 8)),
            ValueError,
            r"holds batch=2, num_kv_heads=4",
        ),
        (
            lambda: ATTN(X, cache=fm.KVCache(2, 8, KV_HEADS, 8, dtype=torch.float64)),
            ValueError,
            r"dtype=torch.float64.*needs.*dtype=torch.float32",
        ),
        (
            lambda: ATTN(X, cache=[1]),
            TypeError,
            r"forward\(cache=...\) must be a flexmask.KVCache, got list",
        ),
        (lambda: ATTN(X, X, cache=fm.KVCache(2, 8, KV_HEADS, 8)), ValueError, r"takes no context"),
        (
            lambda: ATTN(
                X,
                mask=fm.block_mask(fm.causal(), 3, device="cpu", compile=False),
                cache=fm.KVCache(2, 8, KV_HEADS, 8),
            ),
            ValueError,
            r"forward\(mask=BlockMask\) has shape \(1, 1, 3, 3\) but the input needs .*3, 8\)",
        ),
        (
            lambda: ATTN(X, cache=fm.KVCache(2, 8, KV_HEADS, 8), lengths=torch.tensor([4, 1])),
            ValueError,
            r"forward\(lengths=...\) must lie in 0..3",
        ),
        (
            lambda: ATTN(X, cache=fm.KVCache(2, 8, KV_HEADS, 8), lengths=torch.tensor([1.0, 2.0])),
            TypeError,
            r"must be an integer tensor of shape \[2\]",
        ),
        (
            lambda: ATTN(X, lengths=torch.tensor([1, 2])),
            ValueError,
            r"counts tokens written to a cache; pass cache=",
        ),
        (
            lambda: fm.KVCache(0, 8, 2, 8),
            ValueError,
            r"KVCache\(batch=...\) must be a positive int, got 0",
        ),
        (
            lambda: full_cache().select(torch.tensor([3])),
            ValueError,
            r"names positions that were never written",
        ),
        (
            lambda: full_cache().select(torch.tensor([0.5])),
            TypeError,
            r"KVCache.select\(positions=...\) needs a 1-D or 2-D integer tensor",
        ),
        (
            lambda: full_cache().select(rows=torch.tensor([2])),
            ValueError,
            r"KVCache.select\(rows=...\) must lie in 0..1, got \[2\]",
        ),
    ],
)
def test_bad_cache_input(call, error, match):
    with pytest.raises(error, match=match), torch.no_grad():
        call()


def test_a_full_cache_is_left_untouched():
    cache = full_cache()
    before = cache.k.clone()
    with pytest.raises(ValueError), torch.no_grad():
        ATTN(X, cache=cache)
    assert cache.lengths.tolist() == [3, 3] and torch.equal(cache.k, before)


def test_check_reports_a_decode_query_that_sees_nothing():
    # padding([3]) in a decode step at position 5: the query is a pad, its output would be zeros
    problems = fm.check(
        fm.causal() & fm.padding([3]), 1, 6, q_offset=5, device="cpu", compile=False
    )
    assert problems == ["1 of 1 query rows see no key (they get zeros): b=0 rows 0"]
    assert fm.check(fm.causal(), 1, 6, q_offset=5, device="cpu", compile=False) == []


@pytest.mark.slow
def test_decoding_64_tokens_compiles_a_bounded_number_of_times():
    model = TinyDecoder("flex")
    caches = model.caches(1, max_len=96)
    ids = torch.randint(0, VOCAB, (1, 16))
    with torch.no_grad():
        model(ids, torch.arange(16)[None], fm.sliding_window(8), caches)  # prefill: compiles
        tok = torch.tensor([[1]])
        model(tok, torch.tensor([[16]]), fm.sliding_window(8), caches)  # first decode: compiles
        counters.clear()
        for i in range(17, 80):
            model(tok, torch.tensor([[i]]), fm.sliding_window(8), caches)
    assert counters["stats"]["unique_graphs"] == 0  # 63 more steps, no recompile
    assert caches[0].lengths.tolist() == [80]


def test_a_cache_is_a_module_that_moves_and_saves_with_its_model():
    cache = fm.KVCache(2, 8, KV_HEADS, DIM // HEADS)
    with torch.no_grad():
        ATTN(X, mask=fm.causal(), cache=cache, lengths=torch.tensor([3, 2]))
    holder = nn.Module()
    holder.cache = cache  # a model holding its caches
    state = {k: v.clone() for k, v in holder.state_dict().items()}
    assert set(state) == {"cache.k", "cache.v", "cache.lengths"}
    holder.half()
    assert cache.k.dtype == cache.v.dtype == torch.float16 and cache.lengths.dtype == torch.long
    fresh = fm.KVCache(2, 8, KV_HEADS, DIM // HEADS)
    fresh.load_state_dict({k.removeprefix("cache."): v for k, v in state.items()})
    assert torch.equal(fresh.k, state["cache.k"]) and fresh.lengths.tolist() == [3, 2]
    assert repr(fresh).startswith("KVCache(batch=2, max_len=8, num_kv_heads=2, head_dim=8")
