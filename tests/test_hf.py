"""flexmask inside Transformers: trees in one pass, padded batches, the flexmask backend, on tiny
random-initialised Llama, Qwen2 and GPT2 models (float32, nothing downloaded)."""

import pytest
import torch

import flexmask as fm

transformers = pytest.importorskip("transformers", reason="needs transformers")
hf = pytest.importorskip("flexmask.hf")

VOCAB = 97
IMPLS = ["eager", "sdpa", "flexmask"]
ATOL = 1e-5


def tiny(kind, impl):
    torch.manual_seed(0)  # the same weights for every implementation
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, bos_token_id=None, eos_token_id=None)  # fmt: skip
    if kind == "llama":
        model = transformers.LlamaForCausalLM._from_config(
            transformers.LlamaConfig(**common), attn_implementation=impl
        )
    elif kind == "qwen2":
        model = transformers.Qwen2ForCausalLM._from_config(
            transformers.Qwen2Config(**common), attn_implementation=impl
        )
    else:
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                      bos_token_id=None, eos_token_id=None)  # fmt: skip
        model = transformers.GPT2LMHeadModel._from_config(cfg, attn_implementation=impl)
    return model.eval()


@pytest.fixture(scope="module")
def models():
    hf.register("flexmask")
    yield {(kind, impl): tiny(kind, impl) for kind in ("llama", "qwen2", "gpt2") for impl in IMPLS}
    hf.unregister("flexmask")


def logits(model, ids=None, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits if ids is not None else model(**kw).logits


def run_tree(model, impl, ctx, tree):
    x = hf.tree_inputs(ctx, tree)
    kw = (
        {"flexmask_mask": x["flexmask_mask"]}
        if impl == "flexmask"
        else {"attention_mask": x["attention_mask"]}
    )
    return logits(model, x["input_ids"], position_ids=x["position_ids"], **kw)[0, ctx.numel() :]


YOU, ARE, A, NOT = 11, 12, 13, 14
TREES = {
    "from_paths": fm.Tree.from_paths([[5, 6, 7], [5, 6, 8], [5, 9], [40, 41]]),
    "duplicates": fm.Tree.from_parents(
        [-1, 0, 1, -1, 3, 4, -1, 6, 7], [YOU, ARE, A, YOU, ARE, NOT, YOU, ARE, A]
    ),
}


@pytest.mark.parametrize("tree", sorted(TREES))
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_tree_in_one_pass_equals_each_path_alone(models, kind, impl, tree):
    t, model = TREES[tree], models[kind, impl]
    ctx = torch.arange(20, 26)
    nodes = run_tree(model, impl, ctx, t)
    for row in t.paths:
        path = row[row >= 0]
        alone = logits(model, torch.cat([ctx, t.tokens[path]])[None])[0, ctx.numel() :]
        torch.testing.assert_close(nodes[path], alone, atol=ATOL, rtol=0)
    if tree == "duplicates":  # identical branches, identical logits
        torch.testing.assert_close(nodes[[0, 1, 2]], nodes[[6, 7, 8]], atol=ATOL, rtol=0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_verify_tree_equals_checking_every_path(models, kind, impl):
    model = models[kind, impl]
    ctx = torch.arange(30, 36)
    with torch.no_grad():  # the model's own greedy continuation, so some path gets accepted
        greedy = model.generate(ctx[None], max_new_tokens=4, do_sample=False, pad_token_id=0)[
            0, 6:
        ].tolist()
    g1, g2, g3, _ = greedy
    paths = [[g1, g2, (g3 + 1) % VOCAB], [g1, g2, g3], [g1, (g2 + 1) % VOCAB], [(g1 + 1) % VOCAB]]
    t = fm.Tree.from_paths(paths)
    got = hf.verify_tree(model, ctx, t)
    best, best_next = [], None  # brute force: each path alone, greedy prefix matching
    for path in paths:
        out = logits(model, torch.tensor([ctx.tolist() + path]))[0].argmax(-1)
        preds = out[ctx.numel() - 1 :].tolist()
        n = next((i for i, tok in enumerate(path) if preds[i] != tok), len(path))
        if n > len(best):
            best, best_next = path[:n], preds[n]
    assert got.tokens == best == [g1, g2, g3]
    assert got.next_token == best_next
    assert [int(t.tokens[i]) for i in got.path] == got.tokens


PROMPTS = [[5, 6, 7, 8, 9, 10], [21, 22, 23], [31, 32, 33, 34]]


def left_padded():
    n = max(map(len, PROMPTS))
    ids = torch.zeros(len(PROMPTS), n, dtype=torch.long)
    am = torch.zeros_like(ids)
    for i, p in enumerate(PROMPTS):
        ids[i, n - len(p) :] = torch.tensor(p)
        am[i, n - len(p) :] = 1
    return ids, am


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_left_padded_batch_equals_each_prompt_alone(models, kind, impl):
    model = models[kind, impl]
    ids, am = left_padded()
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    batch = logits(model, ids, attention_mask=am, position_ids=pos)
    with torch.no_grad():
        gen = model.generate(
            ids, attention_mask=am, max_new_tokens=5, do_sample=False, pad_token_id=0
        )
    for i, p in enumerate(PROMPTS):
        alone = logits(model, torch.tensor([p]))[0]
        torch.testing.assert_close(batch[i, -len(p) :], alone, atol=ATOL, rtol=0)
        with torch.no_grad():
            own = model.generate(
                torch.tensor([p]), max_new_tokens=5, do_sample=False, pad_token_id=0
            )
        assert gen[i, ids.shape[1] :].tolist() == own[0, len(p) :].tolist()


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
def test_flexmask_backend_equals_sdpa(models, kind):
    ids, am = left_padded()
    ref_model, model = models[kind, "sdpa"], models[kind, "flexmask"]
    torch.testing.assert_close(logits(model, ids), logits(ref_model, ids), atol=ATOL, rtol=0)
    real = am.bool()
    got, want = logits(model, ids, attention_mask=am), logits(ref_model, ids, attention_mask=am)
    torch.testing.assert_close(got[real], want[real], atol=ATOL, rtol=0)
    with torch.no_grad():  # prefill, then cached decode steps
        kw = dict(attention_mask=am, max_new_tokens=6, do_sample=False, pad_token_id=0,
                  output_scores=True, return_dict_in_generate=True)  # fmt: skip
        a, b = model.generate(ids, **kw), ref_model.generate(ids, **kw)
    assert torch.equal(a.sequences, b.sequences)
    for sa, sb in zip(a.scores, b.scores, strict=True):
        torch.testing.assert_close(sa, sb, atol=ATOL, rtol=0)


def test_flexmask_mask_replaces_the_models_mask(models):
    model, ids = models["llama", "flexmask"], torch.arange(10, 18)[None]
    causal = logits(model, ids)
    windowed = logits(model, ids, flexmask_mask=fm.sliding_window(2))
    torch.testing.assert_close(
        logits(model, ids, flexmask_mask=fm.causal()), causal, atol=0, rtol=0
    )
    assert not torch.allclose(windowed, causal)
    assert torch.allclose(windowed[:, :2], causal[:, :2])  # the first two rows are the same


def test_register_both_functions_and_refuse_collisions():
    name = hf.register("flexmask-test")
    assert name in transformers.AttentionInterface._global_mapping
    assert name in transformers.masking_utils.AttentionMaskInterface._global_mapping
    hf.unregister(name)
    assert name not in transformers.AttentionInterface._global_mapping
    with pytest.raises(ValueError, match=r"would replace Transformers' own 'sdpa' attention"):
        hf.register("sdpa")
    with pytest.raises(ValueError, match=r"unregister\('sdpa'\): flexmask registered no such name"):
        hf.unregister("sdpa")
    with pytest.raises(ValueError, match=r"register\(backend=...\) must be one of"):
        hf.register("x", backend="fast")


def test_bad_tree_inputs(models):
    model = models["gpt2", "sdpa"]
    deep = fm.Tree.from_paths([list(range(60))])
    with pytest.raises(
        ValueError, match=r"the deepest node sits at position 129 but the model has 128 positions"
    ):
        hf.verify_tree(model, torch.arange(70), deep)
    with pytest.raises(
        ValueError, match=r"needs a non-empty \[C\] or \[1, C\] tensor, got shape \(0,\)"
    ):
        hf.tree_inputs(torch.zeros(0, dtype=torch.long), deep)
    with pytest.raises(TypeError, match=r"needs a flexmask.Tree, got list"):
        hf.tree_inputs(torch.arange(3), [[1, 2]])


def prefill_against_sdpa(backend):
    """A tiny Llama on flexmask's ``backend`` and on sdpa (the same weights), and their logits
    on a left-padded batch compared at the real tokens."""
    name = hf.register(f"flexmask-{backend}", backend=backend)
    model, ref_model = tiny("llama", name), tiny("llama", "sdpa")
    ids, am = left_padded()
    real = am.bool()
    got, want = logits(model, ids, attention_mask=am), logits(ref_model, ids, attention_mask=am)
    torch.testing.assert_close(got[real], want[real], atol=ATOL, rtol=0)
    return model, ref_model, ids, am


@pytest.mark.slow
def test_flex_backend_equals_sdpa_in_prefill():
    try:
        prefill_against_sdpa("flex")
    finally:
        hf.unregister("flexmask-flex")


def test_sparse_backend_equals_sdpa_and_trains():
    try:
        model, ref_model, ids, am = prefill_against_sdpa("sparse")
        for m in (model, ref_model):  # the same weights, so the same gradients
            m(ids, attention_mask=am, labels=ids).loss.backward()
        for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4)
    finally:
        hf.unregister("flexmask-sparse")


def test_mask_function_accepts_both_transformers_signatures():
    # transformers >= 5.4 passes q_length/q_offset; before, cache_position (the query positions).
    am = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]).bool()
    new = hf.mask_interface(2, q_length=2, kv_length=5, q_offset=3, attention_mask=am)
    old = hf.mask_interface(2, cache_position=torch.tensor([3, 4]), kv_length=5, attention_mask=am)
    want = fm.to_dense(fm.causal() & fm.from_hf_attention_mask(am), 2, 5, q_offset=3)
    for got in (new, old):
        assert got.shape == (2, 1, 2, 5)
        assert torch.equal(fm.to_dense(got.mask, 2, 5), want)


@pytest.mark.parametrize("q_len", [1, 3])
@pytest.mark.parametrize("offset", [0, 4, torch.tensor(4)], ids=["none", "int", "tensor"])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("fn", ["causal", "bidirectional"])
def test_the_quick_dense_mask_is_the_expressions(q_len, offset, padded, fn):
    """The causal-and-padding case builds its dense mask from tensors directly (a decode step
    spent as long on the expression as on attention); it equals the expression's ``to_dense``,
    with a static cache's frame longer than the tokens too."""
    import transformers.masking_utils as mu

    from flexmask.runners import MaskForms

    am = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]]).bool()
    function = mu.causal_mask_function if fn == "causal" else mu.bidirectional_mask_function
    kv_len = 9  # a static cache: two slots past the tokens
    got = hf.mask_interface(2, q_length=q_len, kv_length=kv_len, q_offset=offset,
                            mask_function=function, attention_mask=am if padded else None)  # fmt: skip
    assert got._causal_padding is not None
    q = torch.zeros(2, 4, q_len, 8)
    forms = got.forms(q, kv_len)
    answers = [(forms.none, forms.causal(q, s_kv)) for s_kv in (kv_len, q_len)]
    quick = forms.dense(q, kv_len)
    assert got._mask is None  # what dispatch asks and the dense mask: without the expression
    generic = MaskForms(got.mask)
    assert answers == [(generic.none, generic.causal(q, s_kv)) for s_kv in (kv_len, q_len)]
    if generic.none:  # every key visible: no mask for SDPA at all
        assert quick is None and generic.dense(q, kv_len) is None
        return
    want = fm.to_dense(got.mask, q_len, kv_len, batch=2)
    assert torch.equal(quick.allowed.expand_as(want), want)


# -- trust: every feature Transformers' own attention honours, or a clear refusal ---------------


def family(kind, impl):
    """Tiny random models of the families whose features flexmask once dropped, weights scaled
    up so that a wrong mask or a dropped feature changes the logits (checked below)."""
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  max_position_embeddings=128, initializer_range=0.5)  # fmt: skip
    if kind == "gemma2":  # soft-capping at 1, sliding layers of 4
        cfg = transformers.Gemma2Config(**common, attn_logit_softcapping=1.0, sliding_window=4)
        model = transformers.Gemma2ForCausalLM._from_config(cfg, attn_implementation=impl)
    elif kind == "gpt_oss":  # attention sinks, sliding layers
        cfg = transformers.GptOssConfig(**{**common, "intermediate_size": 64}, sliding_window=4,
                                        num_local_experts=4, num_experts_per_tok=2)  # fmt: skip
        model = transformers.GptOssForCausalLM._from_config(cfg, attn_implementation=impl)
        with torch.no_grad():
            for layer in model.model.layers:  # sinks that matter: a share of every row
                layer.self_attn.sinks.copy_(torch.linspace(-1.0, 2.0, 4))
    elif kind == "t5":  # relative position bias handed to the attention function
        cfg = transformers.T5Config(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2,
                                    num_heads=4, initializer_factor=2.0, decoder_start_token_id=0)  # fmt: skip
        model = transformers.T5ForConditionalGeneration._from_config(cfg, attn_implementation=impl)
    else:  # bart: cross-attention over a padded encoder
        cfg = transformers.BartConfig(vocab_size=VOCAB, d_model=64, encoder_layers=2,
                                      decoder_layers=2, encoder_attention_heads=4,
                                      decoder_attention_heads=4, encoder_ffn_dim=128,
                                      decoder_ffn_dim=128, max_position_embeddings=64,
                                      init_std=0.5)  # fmt: skip
        model = transformers.BartForConditionalGeneration._from_config(
            cfg, attn_implementation=impl
        )
    return model.eval()


def family_inputs(kind):
    torch.manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, 9))
    am = torch.ones_like(ids)
    if kind in ("t5", "bart"):
        am[1, 5:] = 0  # a padded source sequence
        return dict(input_ids=ids, attention_mask=am,
                    decoder_input_ids=torch.randint(3, VOCAB, (2, 6)))  # fmt: skip
    am[1, :3] = 0  # left padding
    return dict(input_ids=ids, attention_mask=am)


def without_feature(kind, model):
    """The model with the feature flexmask once dropped turned off (to show that it matters)."""
    if kind == "gemma2":
        model.config.attn_logit_softcapping = None
        for layer in model.model.layers:
            layer.self_attn.attn_logit_softcapping = None
    elif kind == "gpt_oss":
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.sinks.fill_(-1e4)
    elif kind == "t5":
        with torch.no_grad():
            for stack in (model.encoder, model.decoder):
                stack.block[0].layer[0].SelfAttention.relative_attention_bias.weight.zero_()
    return model


FAMILIES = ["gemma2", "gpt_oss", "t5", "bart"]


@pytest.mark.parametrize("kind", FAMILIES)
def test_flexmask_equals_eager_where_features_were_dropped(models, kind):
    inputs = family_inputs(kind)
    want = logits(family(kind, "eager"), **inputs)
    got = logits(family(kind, "flexmask"), **inputs)
    rows = inputs["attention_mask"].bool() if kind not in ("t5", "bart") else slice(None)
    scale = want.abs().max().item()  # logits of scaled-up weights are large
    torch.testing.assert_close(got[rows], want[rows], atol=ATOL * scale, rtol=0)
    if kind == "bart":  # the padding is what matters: without it, other logits
        unpadded = {**inputs, "attention_mask": torch.ones_like(inputs["attention_mask"])}
        assert (logits(family(kind, "eager"), **unpadded) - want).abs().max() > 0.1
    else:
        off = logits(without_feature(kind, family(kind, "eager")), **inputs)
        assert (off[rows] - want[rows]).abs().max() > 0.1
    with torch.no_grad():  # cached greedy decoding, prefill then steps
        kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, output_scores=True,
                  return_dict_in_generate=True)  # fmt: skip
        gen_kw = {k: v for k, v in inputs.items() if k != "decoder_input_ids"}
        a = family(kind, "flexmask").generate(**gen_kw, **kw)
        b = family(kind, "eager").generate(**gen_kw, **kw)
    assert torch.equal(a.sequences, b.sequences)
    for sa, sb in zip(a.scores, b.scores, strict=True):
        torch.testing.assert_close(sa, sb, atol=ATOL * scale, rtol=0)


def test_cross_attention_mask_pads_keys_only(models):
    """Transformers' own mask builder, asked for an encoder-decoder cross-attention mask with a
    padded encoder: flexmask's answer equals SDPA's, key by key."""
    from transformers.masking_utils import create_bidirectional_mask

    cfg = family("bart", "sdpa").config
    decoder, encoder = torch.zeros(2, 6, 64), torch.zeros(2, 9, 64)
    am = torch.ones(2, 9, dtype=torch.long)
    am[1, 5:] = 0
    masks = {}
    for impl in ("sdpa", "flexmask"):
        cfg._attn_implementation = impl
        masks[impl] = create_bidirectional_mask(
            config=cfg, inputs_embeds=decoder, attention_mask=am, encoder_hidden_states=encoder
        )
    got = fm.to_dense(masks["flexmask"].mask, 6, 9)
    assert masks["flexmask"].shape == (2, 1, 6, 9)
    assert torch.equal(got, masks["sdpa"].expand_as(got))
    assert torch.equal(got[:, 0], ref_key_padding(am, 6))


def ref_key_padding(am, q_len):
    return am.bool()[:, None, :].expand(am.shape[0], q_len, am.shape[1])


def test_register_refuses_every_name_transformers_defines(models):
    from transformers.masking_utils import AttentionMaskInterface

    own = {"eager"} | set(AttentionMaskInterface._global_mapping)
    own |= set(transformers.AttentionInterface._global_mapping)
    own -= set(hf._REGISTERED)  # what flexmask itself registered in this process
    eager = models["llama", "eager"]
    ids = torch.arange(10, 18)[None]
    before = logits(eager, ids)
    for name in sorted(own):
        with pytest.raises(ValueError, match=r"would replace Transformers' own"):
            hf.register(name)
        with pytest.raises(ValueError, match=r"flexmask registered no such name"):
            hf.unregister(name)
    assert "eager" in AttentionMaskInterface._global_mapping  # eager models keep their mask
    torch.testing.assert_close(logits(eager, ids), before, atol=0, rtol=0)
    torch.testing.assert_close(before, logits(models["llama", "sdpa"], ids), atol=ATOL, rtol=0)
    for bad in ("paged|flexmask", "org/kernel:fn"):
        with pytest.raises(ValueError, match=r"reads '\|', ':' and '/'"):
            hf.register(bad)


def _attend(**kwargs):
    attention = hf._attention_function("auto")
    module = torch.nn.Module()
    q = torch.randn(1, 2, 4, 8)
    return attention(module, q, q, q, None, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"alibi_slopes": torch.ones(2)}, r"passed 'alibi_slopes', which it does not know how"),
        ({"output_attentions": True}, r"returns no attention weights"),
        ({"s_aux": torch.ones(2), "sinks": torch.ones(1, 2, 4, 1)}, r"both s_aux and sinks"),
    ],
)
def test_keywords_that_cannot_be_honoured_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _attend(**kwargs)
    _attend(position_ids=torch.arange(4)[None], output_attentions=False)  # no effect: accepted


def test_a_4d_integer_mask_is_refused_and_a_float_mask_is_additive(models):
    ids = torch.arange(10, 18)[None]
    model, eager = models["llama", "flexmask"], models["llama", "eager"]
    ones = torch.ones(1, 1, 8, 8, dtype=torch.long).tril()
    with pytest.raises(TypeError, match=r"integer 0/1 mask is ambiguous.*to_hf_4d"):
        logits(model, ids, attention_mask=ones)
    bias = fm.to_hf_4d(fm.causal(), 8) - 0.3 * torch.arange(8.0)  # a bias on top of the mask
    got, want = logits(model, ids, attention_mask=bias), logits(eager, ids, attention_mask=bias)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    plain = logits(eager, ids, attention_mask=fm.to_hf_4d(fm.causal(), 8))
    assert (plain - want).abs().max() > 0.01  # the bias matters
