"""The expression parser (fuzzed: a mask equal to the Python one, or a ValueError, never code run)
and the ``flexmask`` command's subcommands and exit codes."""

import ast
import re
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from unittest import mock

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import flexmask as fm
from flexmask.cli import main
from flexmask.expr import FACTORIES, parse_mask
from tests.test_masks import PICTURES

N = 12  # every generated mask builds at N tokens, batch 2
CANARY = Path(tempfile.gettempdir()) / f"flexmask-canary-{uuid.uuid4().hex}"


def call(name, *args, **kwargs):
    return ast.Call(ast.Name(name), list(args), [ast.keyword(k, v) for k, v in kwargs.items()])


def ints(values, as_tensor):
    node = ast.List([ast.Constant(v) if v >= 0 else ast.UnaryOp(ast.USub(), ast.Constant(-v))
                     for v in values])  # fmt: skip
    return call("tensor", node) if as_tensor else node


@st.composite
def leaf(draw):
    """(ast node, the same mask built in Python)."""
    kind = draw(st.sampled_from(sorted(FACTORIES)))
    t = draw(st.booleans())  # lists written as tensor([...]) or as plain lists
    if kind in ("full", "causal"):
        return call(kind), FACTORIES[kind]()
    if kind == "chunked" and draw(st.booleans()):  # chunks counted from each row's start
        c, starts = (
            draw(st.integers(1, N)),
            draw(st.lists(st.integers(0, N), min_size=2, max_size=2)),
        )
        return call(kind, ast.Constant(c), start=ints(starts, t)), fm.chunked(c, start=starts)
    if kind in ("sliding_window", "chunked"):
        n = draw(st.integers(1, N + 1))
        return call(kind, ast.Constant(n)), FACTORIES[kind](n)
    if kind == "sink_tokens":
        n = draw(st.integers(0, N + 1))
        return call(kind, ast.Constant(n)), fm.sink_tokens(n)
    if kind == "key_padding":
        lens = draw(st.lists(st.integers(0, N), min_size=2, max_size=2))
        side = draw(st.sampled_from(["right", "left"]))
        node = call(kind, lengths=ints(lens, t), side=ast.Constant(side))
        return node, fm.key_padding(lens, side)
    if kind == "from_position_ids":
        pos = draw(st.lists(st.integers(0, 3), min_size=N, max_size=N))
        return call(kind, ints(pos, t)), fm.from_position_ids(pos)
    if kind == "local_window":
        left, right = draw(st.integers(0, N + 1)), draw(st.integers(0, N + 1))
        return call(kind, ast.Constant(left), ast.Constant(right)), fm.local_window(left, right)
    if kind == "prefix_lm":
        p = draw(st.integers(0, N) | st.lists(st.integers(0, N), min_size=2, max_size=2))
        node = ast.Constant(p) if isinstance(p, int) else ints(p, t)
        return call(kind, node), fm.prefix_lm(p)
    if kind == "padding":
        lens, side = (
            draw(st.lists(st.integers(0, N), min_size=2, max_size=2)),
            draw(st.sampled_from(["right", "left"])),
        )
        return call(kind, lengths=ints(lens, t), side=ast.Constant(side)), fm.padding(lens, side)
    if kind == "document":
        ids = draw(st.lists(st.integers(0, 3), min_size=N, max_size=N))
        return call(kind, ints(ids, t)), fm.document(ids)
    if kind == "packed":
        cut = draw(st.integers(0, N))
        if draw(st.booleans()):  # each batch row its own documents
            rows = [[cut, N - cut], [N, 0]]
            node = ast.List([ast.List([ast.Constant(v) for v in r]) for r in rows])
            return call(kind, lengths=node), fm.packed(rows)
        return call(kind, lengths=ints([cut, N - cut], t)), fm.packed([cut, N - cut])
    if kind == "dilated_window":
        w, d = draw(st.integers(0, N + 1)), draw(st.integers(1, 4))
        return call(kind, ast.Constant(w), ast.Constant(d)), fm.dilated_window(w, d)
    if kind == "global_tokens":
        g = sorted(
            draw(st.sets(st.integers(0, N - 1), min_size=1, max_size=3))
        )  # tensor([]) is float
        return call(kind, ints(g, t)), fm.global_tokens(g)
    if kind == "neighborhood_2d":  # an image of N tokens: one row, two rows, or one column
        h = draw(st.sampled_from([1, 2, N]))
        w = N // h
        k = draw(st.sampled_from([1, 3])) if min(s for s in (h, w) if s > 1) >= 3 else 1
        node = call(kind, ast.Constant(h), ast.Constant(w), ast.Constant(k))
        return node, fm.neighborhood_2d(h, w, k)
    if kind == "from_cu_seqlens":
        cut = draw(st.integers(0, N))
        causal = draw(st.booleans())
        node = call(kind, ints([0, cut, N], t), causal=ast.Constant(causal))
        return node, fm.from_cu_seqlens([0, cut, N], causal=causal)
    if kind == "shifted":  # of a scalar mask: the frame grows with the offset
        offset = draw(st.integers(0, 5))
        w = draw(st.integers(1, N))
        inner = ast.BinOp(
            call("sliding_window", ast.Constant(w)), ast.BitOr(), call("chunked", ast.Constant(w))
        )
        return call(kind, inner, q_offset=ast.Constant(offset)), fm.shifted(
            fm.sliding_window(w) | fm.chunked(w), offset
        )
    if kind == "from_hf_attention_mask":
        rows = draw(
            st.lists(st.lists(st.integers(0, 1), min_size=N, max_size=N), min_size=2, max_size=2)
        )
        node = call("tensor", ast.List([ast.List([ast.Constant(v) for v in r]) for r in rows]))
        return call(kind, node), fm.from_hf_attention_mask(torch.tensor(rows))
    ctx = draw(st.integers(0, N - 1))
    parents = [draw(st.integers(-1, i - 1)) for i in range(N - ctx)]
    return call(kind, ints(parents, t), context_len=ast.Constant(ctx)), fm.tree(parents, ctx)


def combine(children):
    return st.one_of(
        st.tuples(children, children).map(
            lambda p: (ast.BinOp(p[0][0], ast.BitAnd(), p[1][0]), p[0][1] & p[1][1])
        ),
        st.tuples(children, children).map(
            lambda p: (ast.BinOp(p[0][0], ast.BitOr(), p[1][0]), p[0][1] | p[1][1])
        ),
        children.map(lambda p: (ast.UnaryOp(ast.Invert(), p[0]), ~p[1])),
    )


EXPRESSIONS = st.recursive(leaf(), combine, max_leaves=5)

BAD_NODES = [  # each must be refused wherever it appears
    ast.Attribute(call("causal"), "__class__"),
    ast.Name("os"),
    ast.Name("__import__"),
    call("__import__", ast.Constant("os")),
    call("eval", ast.Constant("causal()")),
    call("open", ast.Constant(str(CANARY)), ast.Constant("w")),
    ast.Call(ast.Attribute(ast.Name("os"), "system"), [ast.Constant(f"touch {CANARY}")], []),
    ast.Lambda(ast.arguments([], [], None, [], [], None, []), call("causal")),
    ast.ListComp(call("causal"), [ast.comprehension(ast.Name("x"), ast.List([]), [], 0)]),
    ast.Constant("causal()"),
    ast.Constant(True),
    ast.Constant(None),
    ast.Subscript(ast.List([call("causal")]), ast.Constant(0)),
    ast.Dict([ast.Constant(1)], [ast.Constant(2)]),
    ast.Compare(ast.Constant(1), [ast.Lt()], [ast.Constant(2)]),
    ast.BoolOp(ast.And(), [call("causal"), call("full")]),
    ast.BinOp(ast.Constant(2), ast.Pow(), ast.Constant(10)),
    ast.BinOp(call("causal"), ast.Add(), call("full")),
    ast.JoinedStr([ast.Constant("x")]),
]


@st.composite
def bad_expressions(draw):
    """A valid expression with a refused node put in as an operand, an argument or a callee."""
    good, _ = draw(EXPRESSIONS)
    bad = draw(st.sampled_from(BAD_NODES))
    where = draw(st.sampled_from(["and", "or", "not", "arg", "kwarg"]))
    if where == "and":
        return ast.BinOp(good, ast.BitAnd(), bad)
    if where == "or":
        return ast.BinOp(bad, ast.BitOr(), good)
    if where == "not":
        return ast.UnaryOp(ast.Invert(), bad)
    if where == "arg":
        return ast.BinOp(good, ast.BitAnd(), call("sliding_window", bad))
    return ast.BinOp(good, ast.BitAnd(), call("padding", lengths=bad))


def trapped(real):
    """``real`` (eval or exec), failing when called from the parser itself (torch's own lazy
    imports may use them)."""

    def call(*args, **kwargs):
        caller = sys._getframe(1).f_code.co_filename
        if Path(caller).name == "expr.py":
            raise AssertionError("the parser ran code")
        return real(*args, **kwargs)

    return call


def parse_guarded(text):
    """parse_mask with eval/exec booby-trapped."""
    with mock.patch("builtins.eval", trapped(eval)), mock.patch("builtins.exec", trapped(exec)):
        return parse_mask(text)


@given(EXPRESSIONS)
def test_parsed_expressions_equal_the_python_masks(pair):
    node, mask = pair
    text = ast.unparse(node)
    parsed = parse_guarded(text)
    assert repr(parsed) == repr(mask)
    if "..." not in repr(mask):  # repr shortens long tensors
        assert parse_guarded(repr(mask)).slug == mask.slug  # repr is the language
    assert torch.equal(fm.to_dense(parsed, N, batch=2), fm.to_dense(mask, N, batch=2))
    if mask.cache_key() == (mask,):  # keyed by value: equal expressions are equal masks
        assert parsed == mask


@given(bad_expressions())
def test_refused_nodes_raise_value_errors_and_run_nothing(node):
    with pytest.raises(ValueError, match=r"\n  .*\n  *\^+"):  # with a pointer under the culprit
        parse_guarded(ast.unparse(node))
    assert not CANARY.exists()


TOKENS = ["causal()", "full()", "sliding_window(", "padding(", "lengths=", "side=", "'left'",
          "tensor(", "[", "]", "(", ")", ",", "&", "|", "~", "-", "1", "3", "0", "2.5", ".",
          "__class__", "__import__", "os", "lambda", ":", "x", " for ", " in ", "**", "*", "{",
          "}", "'", '"', "\n", "#", ";", "=", "\\x00"]  # fmt: skip


@given(st.text(max_size=60) | st.lists(st.sampled_from(TOKENS), max_size=14).map("".join))
def test_any_text_gives_a_mask_or_a_value_error(text):
    try:
        result = parse_guarded(text)
    except ValueError:
        return
    assert isinstance(result, fm.MaskMod)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("causal().__class__", r"attribute access is not allowed"),
        ("causal() & __import__('os')", r"dunder names such as '__import__'"),
        ("causal() & evil()", r"unknown name 'evil'.*factories: full, causal"),
        ("causal() and full()", r"'and'/'or' \(use & and \|\)"),
        ("padding([3], side='middle')", r"padding\(side=...\) must be 'right' or 'left'"),
        ("sliding_window('3')", r"a string is not allowed here"),
        ("sliding_window(0)", r"sliding_window\(...\) refused its arguments: .*needs a value >= 1"),
        ("causal() & tensor([1])", r"unknown name 'tensor'"),  # a tensor is not a mask
        ("padding(tensor([1, ..., 3], shape=(40,)))", r"tensor\(...\) takes one list of numbers"),
        ("causal() + full()", r"operator Add is not allowed: masks combine with &, \| and ~"),
        ("causal(", r"not a mask expression \('\(' was never closed\)"),
        ("~" * 200_000, r"at most 100000"),
        ("(" * 300 + "causal()" + ")" * 300, r"not a mask expression|nested too deeply"),
    ],
)
def test_refusals_say_what_and_where(text, match):
    with pytest.raises(ValueError, match=match):
        parse_mask(text)


def test_the_pointer_sits_under_the_offending_part():
    with pytest.raises(ValueError) as err:
        parse_mask("causal() & padding(lengths=[3, x])")
    line, caret = str(err.value).splitlines()[-2:]
    assert line[caret.index("^")] == "x" and caret.count("^") == 1


def test_every_factory_is_parsed_and_drawn_in_its_docstring():
    assert set(FACTORIES) == set(PICTURES)


# -- the command ------------------------------------------------------------------------------


def test_render_writes_the_same_png_as_python(tmp_path, capsys):
    expr = "(sliding_window(4) | prefix_lm(2)) & padding(lengths=[20, 9])"
    out = tmp_path / "cli" / "m.png"
    code = main(
        ["render", expr, "--q-len", "20", "--block-size", "16", "--batch", "1", "-o", str(out)]
    )
    assert code == 0 and capsys.readouterr().out.strip() == str(out)
    mask = (fm.sliding_window(4) | fm.prefix_lm(2)) & fm.padding([20, 9])
    want = fm.save_mask_png(mask, tmp_path / "py.png", 20, block_size=16, batch=1)
    assert out.read_bytes() == want.read_bytes()


def test_describe_prints_describe_and_check(capsys):
    assert main(["describe", "causal() & padding([300, 100])", "--q-len", "300"]) == 0
    out = capsys.readouterr().out
    mask = fm.causal() & fm.padding([300, 100])
    assert str(fm.describe(mask, 300, device="cpu", compile=False)) in out
    assert "check: 200 of 600 query rows see no key (they get zeros): b=1 rows 100..299" in out
    assert main(["describe", "causal()", "--q-len", "64", "--kv-len", "64"]) == 0
    assert "check: no problems found" in capsys.readouterr().out


def test_list_prints_every_factory(capsys):
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("(")[0] for line in lines] == list(FACTORIES)
    assert re.search(r"padding\(lengths, side='right'\) +Hide padding", "\n".join(lines))


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["render", "causal().x", "--q-len", "8", "-o", "x.png"], r"attribute access"),
        (["render", "causal()", "--q-len", "0", "-o", "x.png"], r"q_len=... must be a positive"),
        (["render", "causal()", "--q-len", "8", "-o", "x.jpg"], r"writes PNG files"),
        (
            ["render", "padding([3])", "--q-len", "8", "--batch", "2", "-o", "x.png"],
            r"batch=...\) is 2, out of range: there are 1 batch rows",
        ),
        (["describe", "padding([30])", "--q-len", "8"], r"longer than the sequence"),
    ],
)
def test_bad_input_exits_2_with_a_message(argv, match, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"flexmask {argv[0]}: error: ")
    assert re.search(match, err)
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments_exit_2():
    with pytest.raises(SystemExit) as exc:
        main(["render", "causal()"])  # no --q-len, no -o
    assert exc.value.code == 2


@pytest.mark.parametrize("command", [["flexmask"], [sys.executable, "-m", "flexmask"]])
def test_the_installed_command(command):
    bin_dir = Path(sys.executable).parent
    exe = [str(bin_dir / "flexmask")] if command == ["flexmask"] else command
    ok = subprocess.run([*exe, "list"], capture_output=True, text=True, check=False)
    assert ok.returncode == 0 and ok.stdout.startswith("full()")
    bad = subprocess.run([*exe, "describe", "os.system('ls')", "--q-len", "8"],
                         capture_output=True, text=True, check=False)  # fmt: skip
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "attribute access is not allowed" in bad.stderr


# -- every bad input: exit 2, one line, no traceback --------------------------------------------

BAD_COMMANDS = {
    "a huge --q-len": (["describe", "causal()", "--q-len", "9" * 30], r"at most 2\*\*62"),
    "work that cannot fit": (
        ["describe", "causal()", "--q-len", "100000000000"],
        r"would take about .* more than the .* free",
    ),
    "a picture that cannot fit": (
        ["render", "causal()", "--q-len", "100000000000", "-o", "x.png"],
        r"would take about .* more than the .* free",
    ),
    "a huge integer in the expression": (
        ["describe", "sliding_window(" + "9" * 30 + ")", "--q-len", "8"],
        r"needs a value <= 2\*\*62",
    ),
    "huge lengths": (
        ["describe", "padding([" + "9" * 30 + "])", "--q-len", "8"],
        r"integers below 2\*\*63",
    ),
    "deep nesting": (["describe", "(" * 300 + "causal()" + ")" * 300, "--q-len", "8"], r"nest"),
    "a deep expression": (
        ["describe", "~(causal() & " * 60 + "causal()" + ")" * 60, "--q-len", "8"],
        r"nested 10\d levels deep",
    ),
    "-o naming a directory": (
        ["render", "causal()", "--q-len", "8", "-o", "folder.png"],
        r"names a directory",
    ),
    "-o under a regular file": (
        ["render", "causal()", "--q-len", "8", "-o", "file/x.png"],
        r"'file' is a file, not a folder",
    ),
    "-o where nothing can be written": (
        ["render", "causal()", "--q-len", "8", "-o", "/proc/flexmask/x.png"],
        r"cannot write /proc/flexmask",
    ),
    "a bad expression": (["describe", "causal() & evil()", "--q-len", "8"], r"column 12: 'evil'"),
}


@pytest.mark.parametrize("name", sorted(BAD_COMMANDS))
def test_every_bad_input_exits_2_with_one_line(name, tmp_path, monkeypatch, capsys):
    argv, match = BAD_COMMANDS[name]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "file").write_text("not a folder")
    assert main(argv) == 2  # returned: no exception escaped, so no traceback
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"flexmask {argv[0]}: error: "), lines
    assert re.search(match, lines[0]) and out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "folder.png"]


def test_version_and_the_subcommands_own_usage(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"flexmask {fm.__version__}"
    with pytest.raises(SystemExit) as exc:
        main(["describe", "causal()", "--q-len", "8", "--batch", "3"])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert err.startswith("usage: flexmask describe ")
    assert err.strip().endswith("flexmask describe: error: unrecognized arguments: --batch 3")
