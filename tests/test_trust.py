"""Trust in real use: workflows that once gave silently wrong answers or crashed (caches under
inference mode and in-place buffers, the sparse path's autograd, NaN, the KV cache, compiled
models, sizes that cannot fit, exceptions), each held against an independent reference."""

import copy

import pytest
import torch
from torch._dynamo.utils import counters

import flexmask as fm
from flexmask.coverage import cached_dense
from flexmask.runners import RUNNERS, MaskForms, Options, flex, masked_sdpa
from flexmask.sparse_plan import plan
from tests import reference as ref
from tests.test_attention import E, H, assert_close, golden

S = 40  # shorter than the module's blocks below: masks of plain callables build eagerly

# -- caches: sound keys, never inference tensors ------------------------------------------------


@pytest.mark.parametrize("backend", ["auto", "sdpa", "sparse"])
@pytest.mark.parametrize("kind", ["window", "padding"])
def test_evaluation_under_inference_mode_then_a_training_step(backend, kind):
    def make():  # built anew each time: scalar masks hit the cache by value
        return fm.sliding_window(64) if kind == "window" else fm.causal() & fm.padding([300, 120])

    torch.manual_seed(0)
    module = fm.MultiheadFlexAttention(E, H, backend=backend, block_size=64)
    x = torch.randn(2, 300, E)
    with torch.inference_mode():
        module(x, mask=make())  # evaluation fills the caches
    xg = x.clone().requires_grad_()
    module(xg, mask=make()).square().sum().backward()
    fm.clear_cache()  # the same step from empty caches
    fresh = x.clone().requires_grad_()
    module(fresh, mask=make()).square().sum().backward()
    assert torch.equal(xg.grad, fresh.grad)


def test_nothing_cached_under_inference_mode_is_an_inference_tensor():
    with torch.inference_mode():
        lengths = torch.tensor([300, 120])  # an inference tensor, captured by the mask
        mask = fm.causal() & fm.padding(lengths) & fm.packed([150, 150])
        bm = fm.block_mask(mask, 300, block_size=64, device="cpu")
        runs = plan(bm)
        dense = cached_dense(mask, 300, 300, batch=2, heads=1, device=torch.device("cpu"))
        additive = [run.attn_mask(torch.float32) for run in runs.runs]
    held = [*mask.tensors(), *(t for t in bm.as_tuple() if isinstance(t, torch.Tensor))]
    held += [dense.allowed, dense.coverage.rows, dense.coverage.hidden_k]
    held += [t for run in runs.runs for t in (run.allowed, run.blind) if t is not None]
    held += [t for t in additive if t is not None]
    assert held and not any(t.is_inference() for t in held)


@pytest.mark.parametrize("backend", ["auto", "sdpa", "sparse"])
def test_a_plain_mask_mod_reading_a_refilled_buffer_is_never_stale(backend):
    doc = torch.zeros(S, dtype=torch.long)  # a static buffer, refilled in place every step

    def same_doc(b, h, q_idx, kv_idx):
        return doc[q_idx] == doc[kv_idx]

    torch.manual_seed(1)
    module = fm.MultiheadFlexAttention(E, H, backend=backend, block_size=64)
    x = torch.randn(2, S, E)
    for step in range(3):
        doc.copy_(torch.arange(S) // (4 * (step + 1)))
        oracle = ref.document(S, S, doc.tolist())
        with torch.no_grad():
            assert_close(module(x, mask=same_doc), golden(module, x, oracle[:, None]))
        bm = fm.block_mask(same_doc, S, device="cpu")  # cache=True, the default
        assert torch.equal(fm.block_mask_to_dense(bm)[0, 0], oracle[0])


def test_a_mask_tensor_edited_in_place_is_a_new_key():
    pad = fm.padding([S, 30])
    mask = fm.causal() & pad
    torch.manual_seed(2)
    module = fm.MultiheadFlexAttention(E, H, backend="sdpa")
    x = torch.randn(2, S, E)
    for n in (30, 11):
        pad.lengths[1] = n
        oracle = ref.causal(S, S) & ref.padding(S, S, [S, n])
        assert torch.equal(fm.block_mask_to_dense(fm.block_mask(mask, S, device="cpu"))[:, 0],
                           oracle)  # fmt: skip
        with torch.no_grad():
            assert_close(module(x, mask=mask), golden(module, x, oracle[:, None]))


# -- the sparse path's autograd -----------------------------------------------------------------


def qkv(shape=(2, 2, 40, 8), dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen, dtype=dtype, requires_grad=True) for _ in "qkv"]


def test_sparse_gradcheck_and_a_second_backward():
    mask = fm.causal() & fm.padding([40, 23]) | fm.chunked(8)
    q, k, v = qkv()

    def attend(q, k, v):
        return fm.sparse_attention(q, k, v, mask, block_size=16)

    assert torch.autograd.gradcheck(attend, (q, k, v))
    out = attend(q, k, v)
    g = torch.randn_like(out)
    first = torch.autograd.grad(out, (q, k, v), g, retain_graph=True)
    second = torch.autograd.grad(out, (q, k, v), g)  # recomputed from the saved inputs
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_a_second_backward_replays_the_dropout():
    q, k, v = qkv(dtype=torch.float32)
    torch.manual_seed(3)
    out = fm.sparse_attention(q, k, v, fm.sliding_window(9), block_size=16, dropout_p=0.3)
    torch.manual_seed(4)  # another random state: the replay must not depend on it
    first = torch.autograd.grad(out.sum(), (q, k, v), retain_graph=True)
    second = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_double_backward_equals_the_dense_float64_golden():
    """A gradient penalty: the gradient of |d loss / d x|^2 for every weight and for x."""
    mask = fm.sliding_window(7) | fm.chunked(16)
    oracle = (ref.sliding_window(S, S, 7) | ref.chunked(S, S, 16))[:, None]
    torch.manual_seed(5)
    module = fm.MultiheadFlexAttention(E, H, num_kv_heads=2, backend="sparse", block_size=16)
    module = module.double()
    ghost = copy.deepcopy(module)
    x = torch.randn(2, S, E, dtype=torch.float64)

    def penalty(out, inp):
        (g,) = torch.autograd.grad(out.square().sum(), inp, create_graph=True)
        return g.square().sum()

    xs, xg = x.clone().requires_grad_(), x.clone().requires_grad_()
    penalty(module(xs, mask=mask), xs).backward()
    penalty(golden(ghost, xg, oracle), xg).backward()
    assert_close(xs.grad, xg.grad, rel=1e-9)
    floor = max(q.grad.abs().max().item() for q in ghost.parameters())  # some are ~0 exactly
    for p, q in zip(module.parameters(), ghost.parameters(), strict=True):
        assert_close(p.grad, q.grad, rel=1e-9, floor=floor)


def test_double_backward_with_dropout_is_refused():
    q, k, v = qkv(dtype=torch.float32)
    out = fm.sparse_attention(q, k, v, fm.causal(), block_size=16, dropout_p=0.2)
    with pytest.raises(ValueError, match=r"cannot replay the forward pass's dropout"):
        torch.autograd.grad(out.sum(), q, create_graph=True)


# -- rows that see nothing: zeros, zero gradients, and no NaN from what nobody sees --------------


def every_third_row_masked(score, b, h, q_idx, kv_idx):
    return torch.where(q_idx % 3 == 0, float("-inf"), score)


def _third_rows(scores):
    return scores.masked_fill(torch.arange(scores.shape[-2])[:, None] % 3 == 0, float("-inf"))


@pytest.mark.parametrize("backend", ["sdpa", "auto"])
def test_a_score_mod_masking_whole_rows_gives_zeros_while_training(backend):
    torch.manual_seed(6)
    module = fm.MultiheadFlexAttention(E, H, score_mod=every_third_row_masked, backend=backend)
    x = torch.randn(2, S, E, requires_grad=True)
    out = module(x, mask=fm.causal())
    assert module.backend_for(x, mask=fm.causal()) == "sdpa"
    assert torch.equal(out[:, ::3], module.out_proj.bias.expand_as(out[:, ::3]))
    assert_close(out, golden(module, x.detach(), ref.causal(S, S)[:, None], scores_fn=_third_rows))
    out.square().sum().backward()
    for t in (x.grad, *(p.grad for p in module.parameters())):
        assert t is not None and bool(t.isfinite().all())


def _padded_inputs(nan):
    """q, k, v for causal & padding([S, 7]) with NaN (or clean values) at row 1's pads."""
    q, k, v = qkv(shape=(2, 4, S, 8), dtype=torch.float32, seed=7)
    with torch.no_grad():
        for t in (q, k, v):
            t[1, :, 7:] = float("nan") if nan else 0.5
    return q, k, v


@pytest.mark.parametrize("where", ["keys", "values", "queries", "nowhere"])
def test_nan_in_hidden_positions_stays_out_of_inference_too(where):
    """Without autograd, masked_sdpa on CPU zeroes nothing up front: it checks its output and
    recomputes with the hidden positions zeroed only when NaN got through. Both paths give the
    clean inputs' result, exactly."""
    mask = fm.causal() & fm.padding([S, 7])
    oracle = (ref.causal(S, S) & ref.padding(S, S, [S, 7]))[:, None]
    with torch.no_grad():
        clean = [t.detach() for t in _padded_inputs(False)]
        poisoned = [t.clone() for t in clean]
        index = {"queries": 0, "keys": 1, "values": 2}.get(where)
        if index is not None:
            poisoned[index][1, :, 7:] = float("nan")
        got = masked_sdpa(*poisoned, oracle)
        want = masked_sdpa(*clean, oracle)
        module = fm.MultiheadFlexAttention(32, 4, backend="sdpa")
        x = torch.randn(2, S, 32)
        x_nan = x.clone()
        x_nan[1, 7:] = float("nan")
        module_out = module(x_nan, mask=mask)
    assert bool(got.isfinite().all()) and torch.equal(got, want)
    assert bool(module_out.isfinite().all())
    assert torch.equal(module_out[0], module(x, mask=mask)[0].detach())


@pytest.mark.parametrize("run", ["sdpa", "sparse"])
def test_nan_where_the_mask_hides_everything_stays_out(run):
    mask = fm.causal() & fm.padding([S, 7])
    oracle = (ref.causal(S, S) & ref.padding(S, S, [S, 7]))[:, None]

    def attend(q, k, v):
        if run == "sparse":
            return fm.sparse_attention(q, k, v, mask, block_size=16)
        return masked_sdpa(q, k, v, oracle)

    results = []
    for nan in (True, False):
        q, k, v = _padded_inputs(nan)
        out = attend(q, k, v)
        out.square().sum().backward()
        results.append((out, q.grad, k.grad, v.grad))
    for got, clean in zip(*results, strict=True):
        assert bool(got.isfinite().all())
        assert torch.equal(got, clean)  # NaN or not, the hidden inputs change nothing
    out, gq, _, _ = results[0]
    assert bool((out[1, :, 7:] == 0).all()) and bool((gq[1, :, 7:] == 0).all())
    q, k, v = _padded_inputs(False)
    want = ref.attention(q.double(), k.double(), v.double(), oracle)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["sdpa", "sparse", "auto"])
def test_a_module_fed_nan_at_its_pads(backend):
    torch.manual_seed(8)
    module = fm.MultiheadFlexAttention(E, H, backend=backend, block_size=16)
    mask = fm.causal() & fm.padding([S, 7])
    clean = torch.randn(2, S, E)
    poisoned = clean.clone()
    poisoned[1, 7:] = float("nan")
    outs = []
    for x in (poisoned, clean):
        x = x.clone().requires_grad_()
        out = module(x, mask=mask)
        out[:, :, :].square().sum().backward()
        outs.append((out, x.grad))
    (out, grad), (want, want_grad) = outs
    assert torch.equal(out, want) and torch.equal(grad, want_grad)
    assert bool(grad.isfinite().all()) and bool((grad[1, 7:] == 0).all())


@pytest.mark.slow
def test_flex_keeps_nan_at_the_pads_out():
    """Compiled flex (CPU inference) with NaN where padding hides everything: pad rows zero, real
    rows those of clean inputs (flex itself returns NaN there)."""
    n = 200  # the shape of the other flex tests: compiled once
    mask = fm.causal() & fm.padding([n, 70])
    oracle = (ref.causal(n, n) & ref.padding(n, n, [n, 70]))[:, None]
    q, k, v = qkv(shape=(2, 4, n, 8), dtype=torch.float32, seed=11)
    with torch.no_grad():
        poisoned = [t.clone() for t in (q, k, v)]
        for t in poisoned:
            t[1, :, 70:] = float("nan")
        out = flex(*poisoned, MaskForms(mask), Options())
    assert bool(out.isfinite().all()) and bool((out[1, :, 70:] == 0).all())
    want = ref.attention(q.double(), k.double(), v.double(), oracle)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


# -- the KV cache is transactional --------------------------------------------------------------

ATTN = fm.MultiheadFlexAttention(32, 4, num_kv_heads=2, backend="sdpa")


def prefilled():
    torch.manual_seed(9)
    cache = fm.KVCache(2, 16, 2, 8)
    with torch.no_grad():
        ATTN(torch.randn(2, 5, 32), mask=fm.causal(), cache=cache, lengths=torch.tensor([5, 3]))
    return cache


def raising(b, h, q_idx, kv_idx):
    raise IndexError("a bug in the caller's mask")


def _kernel_fails(cache):
    def boom(*args):
        raise RuntimeError("the kernel failed")

    sdpa, RUNNERS["sdpa"] = RUNNERS["sdpa"], boom
    try:
        return ATTN(torch.randn(2, 1, 32), mask=fm.causal(), cache=cache)
    finally:
        RUNNERS["sdpa"] = sdpa


STEP = torch.randn(2, 1, 32)
FAILING_CALLS = {
    "select never-written positions after a row order": (
        lambda c: c.select(torch.tensor([9]), rows=torch.tensor([1, 0])),
        ValueError,
        r"never written",
    ),
    "select rows given as a bool mask": (
        lambda c: c.select(rows=torch.tensor([True, False])),
        TypeError,
        r"integer tensor of indices, got tensor\(\[ True, False\]\) \(for a bool mask of rows",
    ),
    "a left-padding mask": (
        lambda c: ATTN(STEP, mask=fm.causal() & fm.padding([4, 3], side="left"), cache=c),
        ValueError,
        r"padding\(side='left'\).*a KV cache grows",
    ),
    "a padding mask for 3 rows on a 2-row cache": (
        lambda c: ATTN(STEP, mask=fm.causal() & fm.padding([6, 4, 2]), cache=c),
        ValueError,
        r"per-batch tensors of 3 rows but the KV cache has 2",
    ),
    "a mask_mod that raises": (
        lambda c: ATTN(STEP, mask=raising, cache=c),
        ValueError,
        r"the mask_mod raising on a KV cache .* failed .*IndexError: a bug in the caller's mask",
    ),
    "a mask on another device": (
        lambda c: ATTN(STEP, mask=fm.causal() & fm.padding([6, 4]).to("meta"), cache=c),
        ValueError,
        r"holds tensors on several devices \(\['cpu', 'meta'\]\)",
    ),
    "a kernel that fails after the write": (_kernel_fails, RuntimeError, "the kernel failed"),
}


@pytest.mark.parametrize("name", sorted(FAILING_CALLS))
def test_a_call_that_raises_leaves_the_cache_as_it_was(name):
    call, error, match = FAILING_CALLS[name]
    cache = prefilled()
    before = cache.k.clone(), cache.v.clone(), cache.lengths.clone()
    with pytest.raises(error, match=match), torch.no_grad():
        call(cache)
    after = cache.k, cache.v, cache.lengths
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


# -- compiled models: no recompiles for new masks at fixed shapes -------------------------------


class Stack(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(10)
        self.layers = torch.nn.ModuleList(fm.MultiheadFlexAttention(32, 4) for _ in range(2))

    def forward(self, x, mask):
        for layer in self.layers:
            x = x + layer(x, mask=mask)
        return x


N = 256
NEW_MASKS = {
    "lengths": lambda i: fm.causal() & fm.padding([N - i, 10 + i]),
    "document ids": lambda i: fm.document([min(j // (10 + i), 9) for j in range(N)]) & fm.causal(),
    "tree parents": lambda i: fm.tree([-1] + [max(0, j - 1 - i) for j in range(1, N - 6)], 6),
}


@pytest.mark.slow
@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
def test_a_compiled_model_never_recompiles_for_new_masks(training):
    model = Stack()
    compiled = torch.compile(model)
    x = torch.randn(2, N, 32)
    for make in NEW_MASKS.values():
        with torch.set_grad_enabled(training):
            compiled(x, make(0))  # compiles the model's graphs (the first mask family only)
        counters.clear()
        for i in range(1, 21):
            with torch.set_grad_enabled(training):
                out = compiled(x, make(i))
                want = model(x, make(i))
                torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
                if training:
                    out.sum().backward()
        assert counters["stats"]["unique_graphs"] == 0, dict(counters["stats"])
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(x, NEW_MASKS["lengths"](3))
    reasons = [str(b.reason) for b in explained.break_reasons]
    assert reasons and all("MultiheadFlexAttention._attend" in r for r in reasons), reasons


# -- work that cannot fit is refused before allocating ------------------------------------------

HUGE = [
    ("to_dense", lambda tmp: fm.to_dense(fm.causal(), 10**6)),
    ("block_mask", lambda tmp: fm.block_mask(fm.causal(), 10**7, device="cpu")),
    ("describe", lambda tmp: fm.describe(fm.causal(), 10**8, device="cpu")),
    ("check", lambda tmp: fm.check(fm.causal(), 10**8, device="cpu")),
    ("packed", lambda tmp: fm.packed([2**40])),
    ("tree", lambda tmp: fm.tree(torch.arange(-1, 10**6 - 1))),
    ("KVCache", lambda tmp: fm.KVCache(8, 2**40, 8, 128)),
    ("save_mask_png", lambda tmp: fm.save_mask_png(fm.causal(), tmp / "x.png", 10**11)),
    ("block_mask_to_dense", lambda tmp: fm.block_mask_to_dense(
        fm.block_mask(fm.causal(), 2**20, block_size=2**14, device="cpu"))),
]  # fmt: skip


@pytest.mark.parametrize("name", [name for name, _ in HUGE])
def test_sizes_that_cannot_fit_are_refused(name, tmp_path):
    call = dict(HUGE)[name]
    with pytest.raises(
        ValueError, match=r"would take about [\d.]+ [KMGTP]iB, more than the .* free"
    ):
        call(tmp_path)
    assert list(tmp_path.iterdir()) == []


# -- exceptions: TypeError for a wrong type, ValueError for a wrong value, nothing else ----------

MHA32 = fm.MultiheadFlexAttention(32, 4)
NESTED = fm.causal()
for _ in range(49):  # ~(a & ~(a & ...)): 99 levels, within the limit of 100
    NESTED = ~(fm.causal() & NESTED)


def _doubly_nested():
    return ~(fm.causal() & ~(fm.causal() & NESTED))


EXCEPTIONS = [
    (lambda: fm.sliding_window(2**70), ValueError, r"needs a value <= 2\*\*62"),
    (lambda: fm.padding([2**70]), ValueError, r"integers below 2\*\*63"),
    (lambda: fm.prefix_lm(-(2**70)), ValueError, r"needs a value >= 0"),
    (lambda: _doubly_nested(), ValueError, r"nested 101 levels deep, more than the 100"),
    (lambda: fm.block_mask(fm.causal(), 64, device="cuda:0"), ValueError, r"no cuda device"),
    (lambda: fm.block_mask(fm.causal(), 64, device="bogus"), ValueError, r"must name a torch"),
    (lambda: fm.block_mask(fm.causal(), 64, device=3.5), TypeError, r"torch.device or a str"),
    (lambda: fm.to_dense(fm.causal() & fm.padding([3]), 4, device="meta"), ValueError, r"'meta'"),
    (lambda: fm.to_dense(fm.padding([3]).to("meta"), 4), ValueError, r"holds meta tensors"),
    (lambda: fm.padding(torch.tensor([3], device="meta")), ValueError, r"meta tensor"),
    (lambda: fm.causal().to("bogus"), ValueError, r"mask.to\(device=...\) must name a torch"),
    (lambda: fm.block_mask(lambda b, h, q, kv: (q >= kv).int(), 64, device="cpu", compile=False),
     TypeError, r"returned torch.int32; a mask_mod returns a bool tensor"),
    (lambda: fm.to_dense(lambda b, h, q, kv: q - kv, 4), TypeError, r"returned torch.int64"),
    (lambda: fm.to_dense(lambda b, h, q, kv: bool(q > kv), 4), ValueError, r"under vmap"),
    (lambda: fm.block_mask_to_dense(fm.causal()), TypeError, r"a torch BlockMask, got _Causal"),
    (lambda: fm.document(torch.zeros(0, 5, dtype=torch.long)), ValueError, r"got shape \(0, 5\)"),
    (lambda: fm.document([]), ValueError, r"one document id per token"),
    (lambda: fm.from_hf_attention_mask(torch.ones(0, 4, dtype=torch.long)), ValueError, r"values"),
    (lambda: MHA32(torch.randn(2, 5, 32, dtype=torch.float64)), TypeError,
     r"forward\(x=...\) is torch.float64 but the module's weights are torch.float32"),
    (lambda: MHA32(torch.randn(2, 5, 32, device="meta")), ValueError, r"on meta but the module"),
    (lambda: MHA32(torch.randn(2, 0, 32)), ValueError, r"at least one sequence of one token"),
    (lambda: fm.block_mask(fm.causal(), 2.0), TypeError, r"q_len=... must be an int"),
    (lambda: fm.block_mask(fm.causal(), 2, batch=2.0), TypeError, r"batch=... must be None or"),
    (lambda: fm.block_mask(fm.causal(), 2, heads="4"), TypeError, r"heads=... must be None or"),
    (lambda: fm.MultiheadFlexAttention(32.0, 4), TypeError, r"embed_dim=...\) must be a positive"),
    (lambda: fm.MultiheadFlexAttention(32, 4, dropout="0.1"), TypeError, r"dropout=...\) must be"),
    (lambda: fm.KVCache(2.0, 8, 2, 8), TypeError, r"KVCache\(batch=...\) must be a positive int"),
    (lambda: fm.KVCache(2, 8, 2, 8, device="cuda"), ValueError, r"no cuda device"),
    (lambda: fm.sparse_attention([1], [1], [1]), TypeError, r"must be a 4-D tensor"),
    (lambda: fm.Tree.from_paths([5]), TypeError, r"path 0 must be a non-empty list of ints"),
    (lambda: fm.Tree.from_paths([[1]]).ancestors(0.0), TypeError, r"needs a node in 0..0"),
    (lambda: fm.KVCache(1, 4, 1, 4).step_mask(fm.causal(), 1.5), TypeError, r"positive int"),
    (lambda: fm.to_ascii(fm.causal(), 4, batch=-1), ValueError, r"must be an int >= 0"),
    (lambda: fm.to_ascii(fm.causal(), 4, head="0"), TypeError, r"must be an int >= 0"),
]  # fmt: skip


@pytest.mark.parametrize(("call", "error", "match"), EXCEPTIONS)
def test_bad_input_gets_a_type_or_value_error(call, error, match):
    with pytest.raises(error, match=match) as caught:
        call()
    assert type(caught.value) is error  # not a subclass such as torch's errors


def test_deep_inputs_build_without_recursion_errors():
    deep = fm.Tree.from_paths([list(range(2000))])  # one 2000-node path
    assert deep.num_nodes == 2000 and deep.paths.shape == (1, 2000)
    assert deep.parents.tolist() == list(range(-1, 1999))
    mask = fm.causal()
    for _ in range(700):
        mask = ~mask  # ~~m is m: 700 nested ~ is causal() again
    assert mask == fm.causal()
    assert repr(NESTED).count("~") == 49 and NESTED.depth == 99  # every walk over it works
    dense = fm.to_dense(NESTED, 6)[0, 0]
    want = ref.causal(6, 6)[0]
    for _ in range(49):
        want = ~(ref.causal(6, 6)[0] & want)
    assert torch.equal(dense, want)


def test_masks_default_to_an_accelerator_only_when_one_is_present(monkeypatch):
    """A CUDA build of torch on a machine without a GPU (torch 2.11 from PyPI) names CUDA as its
    accelerator: masks holding no tensors must still be built on the CPU there."""

    def current_accelerator(check_available=False):
        return None if check_available else torch.device("cuda")

    monkeypatch.setattr(torch.accelerator, "current_accelerator", current_accelerator)
    assert fm.to_dense(fm.causal(), 3).device.type == "cpu"
    assert fm.block_mask(fm.causal(), 64, block_size=16).kv_num_blocks.device.type == "cpu"
