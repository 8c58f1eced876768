"""The GPU suite: flexmask on CUDA against independent references (``pytest -m gpu``; ``make
gpu-check`` runs it, then ``benchmarks/gpu.py``). Without CUDA every test is skipped.

``FLEXMASK_GPU_DRY_RUN=1 pytest -m gpu`` runs these tests on the CPU, to check the tests
themselves where no GPU is at hand; what needs Triton (FlexAttention's backward, its decoding
kernel) is skipped there.

References: torch's own ``create_block_mask`` on the same device, the dense oracles of
``tests/reference.py``, the module redone in float64 from its weights (``golden``), compiled
``flex_attention`` itself, and Transformers' ``sdpa`` attention.

Tolerances, relative to the largest value of the float64 golden: float32 outputs 2e-5 and
gradients 1e-4; bfloat16 outputs 2^-5 and gradients 2^-4 (bf16 keeps 8 bits of mantissa, and flex
and SDPA round differently in bf16: both are compared with the golden, never with each other).
"""

import copy

import pytest
import torch
from torch._dynamo.utils import counters
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import flexmask as fm
from flexmask.runners import kernel_tiles
from tests import reference as ref
from tests.test_attention import _dense4, assert_close, golden, masks_and_oracles
from tests.test_masks import CASES, _parents

pytestmark = pytest.mark.gpu

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
S = 200  # not a multiple of 128: partial tail blocks everywhere
E, H = 256, 4  # head dim 64
TOL = {torch.float32: (2e-5, 1e-4), torch.bfloat16: (2**-5, 2**-4)}  # (output, gradient)


def cases(s: int) -> dict:
    """name -> (mask, dense oracle [B or 1, S, S]): the CPU suite's masks, and a tree."""
    ours = masks_and_oracles(s)
    tree_parents, context = _parents(s - 60), 60
    return {
        **{name: ours[name] for name in ("causal_padding", "window_or_chunk", "documents")},
        "tree": (fm.tree(tree_parents, context_len=context), ref.tree(s, s, tree_parents, context)),
    }


def can_backward(module: fm.MultiheadFlexAttention) -> bool:
    """Flex trains on CUDA only; the other backends train anywhere (a dry run checks them)."""
    return ON_GPU or module.backend != "flex"


def check_module(module, x, mask, oracle, *, x_golden=None, scores_fn=None, weights=True,
                 train=True):  # fmt: skip
    """The module's forward and (where it can and ``train``) backward against its float64
    golden; the weights' gradients too where ``weights``."""
    rel, grad_rel = TOL[x.dtype]
    ghost = copy.deepcopy(module).double()  # the same weights in float64
    x64 = (x if x_golden is None else x_golden).detach().double().requires_grad_()
    dense = None if oracle is None else _dense4(oracle).to(DEVICE)
    want = golden(ghost, x64, dense, scores_fn=scores_fn)
    train = train and can_backward(module)
    xg = x.detach().clone().requires_grad_(train)
    with torch.set_grad_enabled(train):
        got = module(xg, mask=mask)
    assert got.isfinite().all()
    assert_close(got, want.detach(), rel=rel)
    if not train:
        return
    cotangent = torch.randn_like(want)
    (got.double() * cotangent).sum().backward()
    (want * cotangent).sum().backward()
    assert xg.grad.isfinite().all()
    assert_close(xg.grad.nan_to_num(0.0), x64.grad.nan_to_num(0.0), rel=grad_rel)
    if not weights:
        return
    floor = max(p.grad.abs().max().item() for p in ghost.parameters())
    for p, g in zip(module.parameters(), ghost.parameters(), strict=True):
        assert p.grad.isfinite().all()
        assert_close(p.grad, g.grad, rel=grad_rel, floor=floor)


def module(backend="flex", *, num_kv_heads=2, dtype=torch.float32, embed_dim=E, **kw):
    torch.manual_seed(0)
    return fm.MultiheadFlexAttention(embed_dim, H, num_kv_heads=num_kv_heads, backend=backend,
                                     device=DEVICE, dtype=dtype, **kw)  # fmt: skip


def inputs(batch=2, s=S, embed_dim=E, dtype=torch.float32):
    torch.manual_seed(1)
    return torch.randn(batch, s, embed_dim, device=DEVICE, dtype=dtype)


# -- BlockMasks on the device -------------------------------------------------------------------


@pytest.mark.parametrize("size", [(256, 256), (300, 200)], ids=["multiple", "tail"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_block_mask_equals_torch_create_block_mask(name, size):
    """Every factory, on and off block multiples: the same blocks as torch's builder on the same
    device, every table on that device, and the dense oracle element by element."""
    q, kv = size
    mask, oracle = CASES[name](q, kv)
    ours = fm.block_mask(mask, q, kv, device=DEVICE, cache=False)
    for table in (ours.kv_num_blocks, ours.kv_indices, ours.full_kv_num_blocks, ours.q_indices):
        assert table.device.type == DEVICE.type
    b, h = ours.kv_num_blocks.shape[:2]
    bound = mask.bind(q, kv).to(DEVICE)  # left padding counts from the end: bound to a length
    theirs = create_block_mask(bound, b, h, q, kv, device=DEVICE, BLOCK_SIZE=128)
    ref.assert_same_block_tables(ours, theirs)
    dense = fm.block_mask_to_dense(ours)[:, 0].cpu()
    assert torch.equal(dense, oracle.expand_as(dense))
    # The masks hold CPU tensors (made from lists): copied to the device, never refused.
    direct = fm.to_dense(mask, q, kv, device=DEVICE)
    assert direct.device.type == DEVICE.type
    assert torch.equal(direct[:, 0].cpu(), oracle.expand_as(dense))


@pytest.mark.parametrize("name", ["padding_right", "document_1d", "packed", "tree_context"])
def test_compiled_builder_reads_no_captured_tensor_out_of_bounds(name):
    """Torch's compiled builder evaluates the mask on the padded tail block, past the tensors
    the mask captured: the result must still be the oracle's (and no illegal memory access)."""
    mask, oracle = CASES[name](300, 200)
    kw = dict(device=DEVICE, cache=False)
    compiled = fm.block_mask(mask, 300, 200, method="create_block_mask", compile=True, **kw)
    if ON_GPU:
        torch.cuda.synchronize()
    ref.assert_same_block_tables(compiled, fm.block_mask(mask, 300, 200, method="tiles", **kw))
    dense = fm.block_mask_to_dense(compiled)[:, 0].cpu()
    assert torch.equal(dense, oracle.expand_as(dense))


# -- the module against its float64 golden ------------------------------------------------------


@pytest.mark.parametrize("backend", ["flex", "auto"])
@pytest.mark.parametrize("case", sorted(cases(S)))
def test_module_matches_float64_golden(case, backend):
    mask, oracle = cases(S)[case]
    check_module(module(backend), inputs(), mask, oracle)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_flex_dtypes_and_head_dims(dtype, head_dim):
    """bf16 within its stated tolerance; head dim 128 needs kernel options of its own on some
    GPUs."""
    mask, oracle = cases(S)["window_or_chunk"]
    attn = module(dtype=dtype, embed_dim=H * head_dim)
    check_module(attn, inputs(embed_dim=H * head_dim, dtype=dtype), mask, oracle)


@pytest.mark.parametrize("num_kv_heads", [4, 1])
def test_gqa_and_multi_query(num_kv_heads):
    mask, oracle = cases(S)["documents"]
    check_module(module(num_kv_heads=num_kv_heads), inputs(), mask, oracle)


@pytest.mark.parametrize(
    ("block_size", "dtype"),
    [(48, torch.float32), (64, torch.float32), (64, torch.bfloat16), (128, torch.float32),
     (256, torch.float32)],
    ids=["48-fp32", "64-fp32", "64-bf16", "128-fp32", "256-fp32"],
)  # fmt: skip
def test_block_sizes_the_kernel_accepts(block_size, dtype):
    """Blocks smaller than torch's default tiles (128 query rows on Hopper) need forward tiles of
    their own (``runners.kernel_tiles``; torch refused to compile them). Where torch's own
    backward kernel has no tile for them (bfloat16 at 64 on an H200), backend='flex' refuses to
    train, saying why, and 'auto' trains with SDPA."""
    mask, oracle = cases(S)["window_or_chunk"]
    attn = module(block_size=block_size, dtype=dtype)
    if torch_flex_trains(block_size, dtype):
        check_module(attn, inputs(dtype=dtype), mask, oracle)
        return
    with pytest.raises(ValueError, match=r"backend='flex' cannot train here: .* none of which"):
        attn(inputs(dtype=dtype).requires_grad_(), mask=mask)
    check_module(attn, inputs(dtype=dtype), mask, oracle, train=False)  # forward tiles only
    attn.backend = "auto"
    check_module(attn, inputs(dtype=dtype), mask, oracle)


def torch_flex_trains(block_size: int, dtype: torch.dtype) -> bool:
    """Whether torch's compiled flex_attention (forward tiles chosen as flexmask does) runs a
    backward on this device at this block size: the independent reference for the refusal."""
    if not ON_GPU:
        return True
    bm = create_block_mask(lambda b, h, q, kv: q >= kv, 1, 1, S, S, device=DEVICE,
                           BLOCK_SIZE=block_size)  # fmt: skip
    q, k, v = (torch.randn(1, H, S, E // H, device=DEVICE, dtype=dtype, requires_grad=True)
               for _ in range(3))  # fmt: skip
    options = kernel_tiles(q, bm.BLOCK_SIZE)
    try:
        out = torch.compile(flex_attention)(q, k, v, block_mask=bm, kernel_options=options)
        out.sum().backward()
    except Exception as error:  # torch's compile errors have no common class
        assert "NoValidChoicesError" in repr(error) or "No choices" in str(error), error
        return False
    return True


def test_padding_rows_are_zero_and_nan_in_pads_stays_out():
    """Right padding with NaN in the pads: real rows equal the golden of zeroed pads, pad rows
    give only the output bias, and the input's gradient holds no NaN. The weights' gradients
    are not compared: a projection's ``x^T dq`` takes the NaN of the inputs (``0 * NaN``), as
    in any torch module; the attention step keeps it out of everything else."""
    mask = fm.causal() & fm.padding([S, 77])
    oracle = ref.causal(S, S) & ref.padding(S, S, [S, 77])
    x = inputs()
    x[1, 77:] = float("nan")
    attn = module()
    check_module(attn, x, mask, oracle, x_golden=x.nan_to_num(0.0), weights=False)
    with torch.no_grad():
        out = attn(x, mask=mask)
    assert torch.equal(out[1, 77:], attn.out_proj.bias.expand(S - 77, E))


def softcap(score, b, h, q_idx, kv_idx):
    return 20.0 * torch.tanh(score / 20.0)


def test_score_mod_off_block_multiples_has_finite_gradients():
    """A score_mod with S not a multiple of 128 (the tail block's backward once gave NaN)."""
    mask, oracle = cases(S)["causal_padding"]
    attn = module(score_mod=softcap)
    check_module(attn, inputs(), mask, oracle, scores_fn=lambda s: 20.0 * torch.tanh(s / 20.0))


# -- decoding, recompiles -----------------------------------------------------------------------


def test_kv_cache_decode_equals_full_recompute():
    attn, x = module(), inputs(s=40)
    cache = fm.KVCache(2, 64, 2, E // H, device=DEVICE)
    mask = fm.sliding_window(8) & fm.causal()
    with torch.no_grad():
        steps = [attn(x[:, :30], mask=mask, cache=cache)]
        steps += [attn(x[:, i : i + 1], mask=mask, cache=cache) for i in range(30, 40)]
        full = attn(x, mask=mask)
    assert_close(torch.cat(steps, 1), full, rel=2e-5)


def test_decode_step_runs_flex_decoding():
    """One query after a cache: torch's FlexDecoding kernel (split over the keys), not the main
    kernel, which would waste 127 of its 128 query rows."""
    if not ON_GPU:
        pytest.skip("dry run: Triton kernels exist on CUDA only")
    from torch._inductor.utils import run_and_get_code

    attn, x = module(), inputs(s=40)
    cache = fm.KVCache(2, 64, 2, E // H, device=DEVICE)
    with torch.no_grad():
        attn(x[:, :39], mask=fm.causal(), cache=cache)
        with torch._inductor.config.patch(force_disable_caches=True):
            _, code = run_and_get_code(attn, x[:, 39:], mask=fm.causal(), cache=cache)
    assert any("SPLIT_KV" in c for c in code), "the step did not compile to FlexDecoding"


def test_no_recompiles_over_ten_lengths_at_fixed_shapes():
    attn, x = module(), inputs()
    with torch.no_grad():
        attn(x, mask=fm.causal() & fm.padding([S, 100]))  # the one compile
        counters.clear()
        for n in range(101, 111):
            mask = fm.causal() & fm.padding([S, n])
            got = attn(x, mask=mask)
            oracle = _dense4(ref.causal(S, S) & ref.padding(S, S, [S, n])).to(DEVICE)
            want = golden(copy.deepcopy(attn).double(), x.double(), oracle)
            assert_close(got, want, rel=2e-5)
    assert counters["stats"]["unique_graphs"] == 0


# -- sparse_attention and Transformers on the device --------------------------------------------


@pytest.mark.parametrize("case", ["window_or_chunk", "causal_padding"])
def test_sparse_attention_equals_flex(case):
    s = 300
    mask, oracle = cases(s)[case]
    torch.manual_seed(2)
    train = ON_GPU
    q = torch.randn(2, H, s, 64, device=DEVICE, requires_grad=train)
    k, v = (torch.randn(2, 2, s, 64, device=DEVICE, requires_grad=train) for _ in range(2))
    bm = fm.block_mask(mask, s, device=DEVICE)
    with torch.set_grad_enabled(train):
        got = fm.sparse_attention(q, k, v, bm)
        want = torch.compile(flex_attention, dynamic=False)(q, k, v, block_mask=bm, enable_gqa=True)
    gold = ref.attention(q.double(), k.double(), v.double(), _dense4(oracle).to(DEVICE))
    assert_close(want, gold.detach(), rel=2e-5)  # flex itself is right here
    assert_close(got, want.detach().double(), rel=2e-5)
    if train:
        cotangent = torch.randn_like(got)
        grads = torch.autograd.grad(got, (q, k, v), cotangent)
        flex_grads = torch.autograd.grad(want, (q, k, v), cotangent)
        for a, b in zip(grads, flex_grads, strict=True):
            assert_close(a, b.double(), rel=1e-4)


@pytest.mark.parametrize("backend", ["auto", "flex"])
def test_transformers_llama_equals_sdpa(backend):
    pytest.importorskip("transformers")
    hf = pytest.importorskip("flexmask.hf")
    from tests.test_hf import left_padded, logits, tiny

    name = hf.register(f"flexmask-gpu-{backend}", backend=backend)
    try:
        ours, theirs = tiny("llama", name).to(DEVICE), tiny("llama", "sdpa").to(DEVICE)
        ids, am = (t.to(DEVICE) for t in left_padded())
        real = am.bool()
        got, want = logits(ours, ids, attention_mask=am), logits(theirs, ids, attention_mask=am)
        torch.testing.assert_close(got[real], want[real], atol=2e-5, rtol=0)
        kw = dict(attention_mask=am, max_new_tokens=4, do_sample=False, pad_token_id=0)
        with torch.no_grad():
            assert torch.equal(ours.generate(ids, **kw), theirs.generate(ids, **kw))
    finally:
        hf.unregister(name)
