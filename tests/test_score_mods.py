"""The score_mod library against peers' definitions (attention-gym's ALiBi, Transformers' ALiBi
slopes) and against the float64 golden of the module, forward and backward."""

import pytest
import torch

import flexmask as fm
from tests import reference as ref
from tests.test_attention import E, H, assert_close, golden

S = 40


def on_grid(mod, shape=(2, H, S, S), seed=0):
    """A score_mod on every score of ``shape``, by broadcasting (the mods are written with
    broadcasting tensor operations, as flex and the explicit softmax call them)."""
    b, h, q, kv = (torch.arange(n) for n in shape)
    scores = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return scores, mod(
        scores, b[:, None, None, None], h[None, :, None, None], q[:, None], kv[None, :]
    )


@pytest.mark.parametrize("heads", [1, 2, 4, 8, 16])
def test_alibi_is_attention_gyms(heads):
    gym = pytest.importorskip("attn_gym.mods", reason="attn-gym is in the `gym` extra")
    _, ours = on_grid(fm.alibi(heads), shape=(1, heads, S, S))
    _, theirs = on_grid(gym.generate_alibi_bias(heads), shape=(1, heads, S, S))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)


@pytest.mark.parametrize("heads", [3, 6, 8, 12, 20])
def test_alibi_slopes_are_transformers(heads):
    """Transformers' build_alibi_tensor (BLOOM) gives ``slope[h] * kv``; ours ``slope[h] *
    (kv - q)``: equal slopes, and a per-row constant the softmax ignores."""
    bloom = pytest.importorskip("transformers.models.bloom.modeling_bloom")
    theirs = bloom.build_alibi_tensor(torch.ones(1, S), heads, torch.float64)  # [H, 1, S]
    _, ours = on_grid(fm.alibi(heads), shape=(1, heads, S, S))
    scores_zero = ours - on_grid(fm.alibi(heads), shape=(1, heads, S, S))[0]  # the bias alone
    torch.testing.assert_close(scores_zero[0, :, 0, :], theirs[:, 0, :], rtol=1e-6, atol=1e-9)


def test_softcap_and_compose():
    scores, capped = on_grid(fm.softcap(2.0))
    torch.testing.assert_close(capped, 2.0 * torch.tanh(scores / 2.0))
    assert bool((capped.abs() < 2.0).all())
    both = fm.compose(fm.alibi(H), fm.softcap(2.0))
    _, got = on_grid(both)
    _, biased = on_grid(fm.alibi(H))
    torch.testing.assert_close(got, 2.0 * torch.tanh(biased / 2.0))
    assert repr(both) == f"compose(alibi({H}), softcap(2.0))"


def _bias_fn(mod):
    """The golden's scores_fn: the mod applied to [B, H, S, S] float64 scores."""

    def scores_fn(scores):
        b, h, q, kv = (torch.arange(n) for n in scores.shape)
        return mod(scores, b[:, None, None, None], h[None, :, None, None], q[:, None], kv[None, :])

    return scores_fn


@pytest.mark.parametrize("name", ["alibi", "softcap", "alibi_then_softcap"])
def test_the_module_with_a_score_mod_matches_the_golden(name):
    mod = {"alibi": fm.alibi(H), "softcap": fm.softcap(0.5),
           "alibi_then_softcap": fm.compose(fm.alibi(H), fm.softcap(0.5))}[name]  # fmt: skip
    torch.manual_seed(0)
    attn = fm.MultiheadFlexAttention(E, H, score_mod=mod)
    x = torch.randn(2, S, E, requires_grad=True)
    mask = fm.causal() & fm.padding([S, 25])
    dense = (ref.causal(S, S) & ref.padding(S, S, [S, 25]))[:, None]
    got = attn(x, mask=mask)
    x64 = x.detach().double().requires_grad_()
    want = golden(attn, x64, dense, scores_fn=_bias_fn(mod))
    assert_close(got, want.detach(), rel=1e-5)
    got.sum().backward()
    want.sum().backward()
    assert_close(x.grad, x64.grad, rel=1e-5)


def test_relative_bias_trains_its_table():
    torch.manual_seed(1)
    table = torch.nn.Parameter(torch.randn(H, 9))  # R = 4
    attn = fm.MultiheadFlexAttention(E, H, score_mod=fm.relative_bias(table))
    x = torch.randn(2, S, E)
    attn(x, mask=fm.causal()).square().sum().backward()
    table64 = table.detach().double().requires_grad_()
    want = golden(attn, x.double(), ref.causal(S, S)[:, None],
                  scores_fn=_bias_fn(fm.relative_bias(table64)))  # fmt: skip
    want.square().sum().backward()
    assert_close(table.grad, table64.grad, rel=1e-5)
    used = table.grad.abs().sum(0) > 0  # causal: offsets kv - q <= 0 only, columns 0..R
    assert used.tolist() == [True] * 5 + [False] * 4


@pytest.mark.slow
def test_flex_applies_the_score_mods_as_the_explicit_softmax():
    """Compiled flex on CPU (inference) with compose(alibi, softcap) equals the sdpa backend's
    explicit softmax."""
    mod = fm.compose(fm.alibi(4), fm.softcap(0.5))
    torch.manual_seed(2)
    x = torch.randn(2, 200, 32)  # the compiled tests' shape
    flex = fm.MultiheadFlexAttention(32, 4, score_mod=mod, backend="flex")
    explicit = fm.MultiheadFlexAttention(32, 4, score_mod=mod, backend="sdpa")
    explicit.load_state_dict(flex.state_dict())
    mask = fm.causal() & fm.padding([200, 70])
    with torch.no_grad():
        torch.testing.assert_close(flex(x, mask=mask), explicit(x, mask=mask), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: fm.alibi(0), ValueError, r"alibi\(num_heads=...\)"),
        (lambda: fm.alibi(2.0), TypeError, r"alibi\(num_heads=...\)"),
        (lambda: fm.softcap(0.0), ValueError, r"positive finite number, got 0.0"),
        (lambda: fm.softcap(float("inf")), ValueError, r"positive finite number"),
        (lambda: fm.softcap("30"), TypeError, r"softcap\(cap=...\) needs a number"),
        (lambda: fm.relative_bias(torch.zeros(2, 4)), ValueError, r"odd number of offsets"),
        (lambda: fm.relative_bias(torch.zeros(2, 5, dtype=torch.long)), TypeError, r"floating"),
        (lambda: fm.compose(), ValueError, r"at least one score_mod"),
        (lambda: fm.compose(fm.alibi(2), 3), TypeError, r"argument 1 is int"),
    ],
)
def test_score_mods_refuse_bad_arguments(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_score_pictures_show_the_weights_after_the_mod(tmp_path):
    """save_scores_png(score_mod=...) draws softmax(scale * q k^T + bias) under the mask: the
    weights equal the float64 golden's, and the title names the mod."""
    from flexmask.viz.picture import score_weights

    torch.manual_seed(3)
    q, k = torch.randn(1, 2, 12, 8), torch.randn(1, 2, 12, 8)
    mod = fm.alibi(2)
    weights, _, expr = score_weights(q, k, fm.causal(), 0, 1, None, mod)
    scores = (q[0, 1].double() @ k[0, 1].double().T) / 8**0.5
    scores = scores + (torch.arange(12)[None] - torch.arange(12)[:, None]) * 2.0**-8  # head 1
    want = torch.softmax(scores.masked_fill(~ref.causal(12, 12)[0], float("-inf")), -1)
    torch.testing.assert_close(weights, want)
    assert expr == "causal(), alibi(2)"
    path = fm.save_scores_png(q, k, tmp_path / "alibi.png", mask=fm.causal(), head=1, score_mod=mod)
    assert path.stat().st_size > 0
    with pytest.raises(TypeError, match=r"save_scores_png\(score_mod=...\) must be a callable"):
        fm.save_scores_png(q, k, tmp_path / "x.png", score_mod=3)
