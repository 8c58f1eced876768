"""The parity matrix: every Transformers family of ``tests/hf_families.py`` under flexmask against
its own eager attention (and sdpa where the family has it), float32, max |Δ| <= 1e-5 on real
tokens and identical greedy tokens:

- decoders: a left-padded prefill (every layer's hidden states, so each layer's mask is checked:
  sliding, full, soft-capped, with sinks), cached greedy ``generate`` of the batch, a packed row
  (documents marked by restarting ``position_ids``), a tree of candidates through
  ``verify_tree``;
- encoders: a right-padded batch, every layer;
- encoder-decoders: a padded encoder, logits and ``generate``.

Each model's weights are wide enough that dropping the padding mask moves its outputs by more
than 0.1, which every prefill test checks, so that none can pass by accident.
"""

import functools

import pytest
import torch

import flexmask as fm

transformers = pytest.importorskip("transformers", reason="needs transformers")
hf = pytest.importorskip("flexmask.hf")

from tests.hf_families import (  # noqa: E402
    FAMILIES,
    PROMPTS,
    layer_outputs,
    packed_row,
    padded,
    prefill_inputs,
)

ATOL = 1e-5
DECODERS = [n for n, f in FAMILIES.items() if f.kind == "decoder"]
GENERATORS = [n for n, f in FAMILIES.items() if f.kind != "encoder"]


@pytest.fixture(scope="module", autouse=True)
def registered():
    hf.register("flexmask")
    yield
    hf.unregister("flexmask")
    model.cache_clear()


@functools.cache
def model(name: str, impl: str) -> torch.nn.Module:
    return FAMILIES[name].build(impl)


def references(name: str) -> list[str]:
    return ["eager", "sdpa"] if FAMILIES[name].sdpa else ["eager"]


def run(name: str, impl: str, **inputs) -> list[torch.Tensor]:
    return layer_outputs(model(name, impl), FAMILIES[name].kind, **inputs)


def assert_close_on(rows, got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    for layer, (a, b) in enumerate(zip(got, want, strict=True)):
        err = (a[rows] - b[rows]).abs().max().item()
        assert err <= ATOL, f"layer {layer}: max |Δ| {err:.2e} > {ATOL}"


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_padded_prefill_equals_eager_layer_by_layer(name):
    inputs, rows = prefill_inputs(FAMILIES[name].kind)
    got = run(name, "flexmask", **inputs)
    for ref in references(name):
        assert_close_on(rows, got, run(name, ref, **inputs))
    unmasked = run(name, "flexmask", **{k: v for k, v in inputs.items() if k != "attention_mask"})
    assert (unmasked[-1][rows] - got[-1][rows]).abs().max() > 0.1  # the mask matters here


@pytest.mark.parametrize(
    ("name", "cache"),
    [(n, "dynamic") for n in GENERATORS] + [(n, "static") for n in DECODERS],
)
def test_cached_greedy_generate_equals_eager(name, cache):
    """Greedy decoding with Transformers' growing cache, and with a static one (the masks are
    then built before each forward pass, with the offset as a tensor)."""
    kind = FAMILIES[name].kind
    ids, am = padded("left" if kind == "decoder" else "right")
    kw = dict(attention_mask=am, max_new_tokens=6, min_new_tokens=6, do_sample=False,
              pad_token_id=0, output_scores=True, return_dict_in_generate=True)  # fmt: skip
    if cache == "static":
        kw["cache_implementation"] = "static"
    with torch.no_grad():
        got = model(name, "flexmask").generate(ids, **kw)
        for ref in references(name):
            want = model(name, ref).generate(ids, **kw)
            assert torch.equal(got.sequences, want.sequences), ref
            for step, (a, b) in enumerate(zip(got.scores, want.scores, strict=True)):
                err = (a - b).abs().max().item()
                assert err <= ATOL, f"{ref}, step {step}: max |Δ| {err:.2e}"


@pytest.mark.parametrize("name", DECODERS)
def test_packed_row_equals_eager_and_each_document_alone(name):
    """Documents in one row, marked by position ids that restart: flexmask reads them as
    Transformers does; where the family packs, each document equals itself run alone."""
    ids, pos = packed_row()
    inputs = {"input_ids": ids, "position_ids": pos, "use_cache": False}
    got = run(name, "flexmask", **inputs)
    for ref in references(name):
        assert_close_on(..., got, run(name, ref, **inputs))
    if FAMILIES[name].packing:
        with torch.no_grad():
            alone = torch.cat([model(name, "eager")(torch.tensor([p])).logits[0] for p in PROMPTS])
        assert (got[-1][0] - alone).abs().max() <= ATOL


@pytest.mark.parametrize("name", DECODERS)
def test_tree_of_candidates_equals_each_path_alone(name):
    """``verify_tree`` in one pass against every path run alone under eager attention. The tree
    and its context fit in the sliding windows: ``flexmask_mask`` replaces a sliding layer's
    mask, as a 4-D mask does in Transformers."""
    context = torch.tensor([40, 41])
    tree = fm.Tree.from_paths([[5, 6], [5, 7], [8]])
    result = hf.verify_tree(model(name, "flexmask"), context, tree)
    with torch.no_grad():
        for row in tree.paths:
            path = row[row >= 0]
            ids = torch.cat([context, tree.tokens[path]])[None]
            alone = model(name, "eager")(ids).logits[0, len(context) :]
            assert (result.logits[path] - alone).abs().max() <= ATOL


# -- Transformers' mask functions read as flexmask masks -----------------------------------------


def transformers_mask_functions():
    mu = pytest.importorskip("transformers.masking_utils")
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 0, 1, 2, 3, 4]])  # 3 documents
    docs = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2]])
    keys = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 1]]).bool()
    window = mu.sliding_window_causal_mask_function(3)
    return mu, {
        "causal": (mu.causal_mask_function, fm.causal()),
        "sliding window": (window, fm.sliding_window(3)),
        "bidirectional window": (
            mu.sliding_window_bidirectional_mask_function(2),
            fm.local_window(2, 2),
        ),
        "packed, windowed": (
            mu.and_masks(
                mu.remap_positions_for_packed_sequence(window, pos),
                mu.packed_sequence_mask_function(docs),
            ),
            fm.sliding_window(3) & fm.document(docs),
        ),
        "padding": (
            mu.and_masks(mu.causal_mask_function, mu.padding_mask_function(keys)),
            fm.causal() & fm.from_hf_attention_mask(keys, keys_only=True),
        ),
        "or": (
            mu.or_masks(mu.causal_mask_function, mu.sliding_window_bidirectional_overlay(1)),
            fm.causal() | fm.local_window(1, 1),
        ),
        "chunked after left padding": (
            mu.chunked_causal_mask_function(3, torch.tensor([2])),
            fm.chunked(3, start=[2]) & fm.causal(),
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "causal",
        "sliding window",
        "bidirectional window",
        "packed, windowed",
        "padding",
        "or",
        "chunked after left padding",
    ],
)
def test_transformers_mask_functions_become_the_same_flexmask_mask(case):
    from torch.nn.attention.flex_attention import create_mask

    from flexmask.hf_mask_functions import translate

    _, cases = transformers_mask_functions()
    function, structured = cases[case]
    got = translate(function)
    assert got == structured or repr(got) == repr(structured)  # structure, cached by value
    want = create_mask(function, 1, 1, 12, 12, "cpu")  # Transformers' own function, evaluated
    assert torch.equal(fm.to_dense(got, 12, batch=1), want)


def test_what_flexmask_cannot_read_stays_a_callable():
    from flexmask.hf_mask_functions import translate

    mu, _ = transformers_mask_functions()
    pos = torch.tensor([[0, 1, 2, 0, 1]])
    assert translate(mu.blockwise_overlay(torch.tensor([[0, 0, -1, 1, 1]]))) is None
    assert translate(lambda b, h, q, kv: q >= kv) is None
    # remapped positions are only the same mask next to the packed-sequence mask
    assert translate(mu.remap_positions_for_packed_sequence(mu.causal_mask_function, pos)) is None


# -- packing with flexmask_mask, and trees that are not packed rows ------------------------------


@pytest.mark.parametrize("name", ["llama", "qwen3", "gpt2"])
def test_packed_row_under_flexmask_mask_equals_each_document_alone(name):
    """Documents (position ids back to 0) and ``flexmask_mask`` together: each document as if
    run alone under that mask."""
    ids, pos = packed_row()
    window = fm.sliding_window(3)
    with torch.no_grad():
        flex = model(name, "flexmask")
        got = flex(ids, position_ids=pos, flexmask_mask=window, use_cache=False).logits[0]
        alone = [flex(torch.tensor([p]), flexmask_mask=window).logits[0] for p in PROMPTS]
        unpacked = flex(ids, flexmask_mask=window, use_cache=False).logits[0]
    assert (got - torch.cat(alone)).abs().max() <= ATOL
    assert (got - unpacked).abs().max() > 0.1  # the documents matter in this row


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_tree_positions_are_never_read_as_documents(name, use_cache):
    """A tree's position ids repeat and fall back (what Transformers takes for packing when no
    cache is used): under flexmask_mask they are positions, never document starts."""
    context, tree = torch.tensor([40, 41, 42]), fm.Tree.from_paths([[5, 6, 7], [5, 8], [9]])
    x = hf.tree_inputs(context, tree)
    with torch.no_grad():
        nodes = model(name, "flexmask")(x["input_ids"], position_ids=x["position_ids"],
                                        flexmask_mask=x["flexmask_mask"],
                                        use_cache=use_cache).logits[0, 3:]  # fmt: skip
        for row in tree.paths:
            path = row[row >= 0]
            ids = torch.cat([context, tree.tokens[path]])[None]
            alone = model(name, "eager")(ids).logits[0, 3:]
            assert (nodes[path] - alone).abs().max() <= ATOL


@pytest.mark.slow
def test_flex_generate_with_a_static_cache_compiles_once_per_shape():
    """backend="flex" under generate: a static cache keeps every step's shapes, and the step's
    offset is a tensor, so ten tokens compile two graphs (the prefill's and the step's), not
    one per length."""
    from torch._dynamo.utils import counters

    name = hf.register("flexmask-flex", backend="flex")
    try:
        flex, ref = FAMILIES["llama"].build(name), model("llama", "sdpa")
        ids, am = padded("left")
        kw = dict(attention_mask=am, do_sample=False, pad_token_id=0, max_new_tokens=10,
                  min_new_tokens=10, cache_implementation="static")  # fmt: skip
        torch._dynamo.reset()
        counters.clear()
        with torch.no_grad():
            got, want = flex.generate(ids, **kw), ref.generate(ids, **kw)
        assert counters["stats"]["unique_graphs"] == 2
        assert torch.equal(got, want)
    finally:
        hf.unregister(name)


def test_a_bidirectional_sliding_window_without_a_mask_is_local():
    """No mask from Transformers, a bidirectional layer and ``sliding_window=3``: keys within
    two positions on either side (``|q - kv| < 3``), against a float64 golden."""
    from tests import reference as ref

    class Layer(torch.nn.Module):
        is_causal = False

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 9, 8) for _ in range(3))
    out, _ = hf._attention_function("auto")(Layer(), q, k, v, None, sliding_window=3)
    near = (torch.arange(9)[:, None] - torch.arange(9)[None, :]).abs() < 3
    want = ref.attention(q.double(), k.double(), v.double(), near)
    torch.testing.assert_close(out.double(), want.transpose(1, 2), rtol=1e-5, atol=1e-6)
