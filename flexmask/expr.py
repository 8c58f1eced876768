"""Mask expressions from text, the language ``repr`` prints: ``causal() & padding(lengths=[9, 5])``.

The text is parsed with ``ast`` and walked against a whitelist: factory calls, numbers, lists,
``tensor([...])``, keyword arguments, ``&``, ``|``, ``~`` and parentheses, plus the strings a
factory takes as a choice (``side='left'``). Nothing is ever evaluated: any other node is refused
with a ``ValueError`` that points at it.
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from typing import Any

import torch

from .masks import (
    MaskMod,
    causal,
    chunked,
    dilated_window,
    document,
    from_cu_seqlens,
    from_hf_attention_mask,
    from_position_ids,
    full,
    global_tokens,
    key_padding,
    local_window,
    neighborhood_2d,
    packed,
    padding,
    prefix_lm,
    shifted,
    sink_tokens,
    sliding_window,
    tree,
)

__all__ = ["FACTORIES", "ExpressionError", "parse_mask"]

FACTORIES: dict[str, Callable[..., MaskMod]] = {
    f.__name__: f
    for f in (
        full, causal, sliding_window, local_window, dilated_window, sink_tokens, global_tokens,
        prefix_lm, padding, key_padding, document, from_position_ids, packed, from_cu_seqlens,
        chunked, neighborhood_2d, tree, shifted, from_hf_attention_mask,
    )
}  # fmt: skip
CHOICES = {
    ("padding", "side"): ("right", "left"),
    ("key_padding", "side"): ("right", "left"),
}  # the only places a string may appear
# the only places True/False may appear
FLAGS = {("from_hf_attention_mask", "keys_only"), ("from_cu_seqlens", "causal")}
MAX_CHARS = 100_000

_REFUSED = {  # what to call a node we refuse, for the error message
    ast.Attribute: "attribute access",
    ast.Subscript: "indexing",
    ast.Lambda: "a lambda",
    ast.ListComp: "a comprehension",
    ast.SetComp: "a comprehension",
    ast.DictComp: "a comprehension",
    ast.GeneratorExp: "a generator",
    ast.Dict: "a dict",
    ast.Set: "a set",
    ast.JoinedStr: "an f-string",
    ast.Compare: "a comparison",
    ast.BoolOp: "'and'/'or' (use & and |)",
    ast.IfExp: "a conditional expression",
    ast.NamedExpr: "an assignment",
    ast.Starred: "argument unpacking",
    ast.Await: "await",
    ast.Yield: "yield",
}


class ExpressionError(ValueError):
    """A refused mask expression. ``str()`` shows the text with ``^^^`` under the offending part;
    ``summary`` says the same on one line (for the command line)."""

    def __init__(self, message: str, line: str = "", start: int = 0, end: int | None = None):
        """``start``/``end``: 1-based character columns of the offending part (0: none)."""
        self.summary = message
        if not start:
            super().__init__(message)
            return
        width = max(1, (end or start + 1) - start)
        part = line[start - 1 : start - 1 + width]
        part = part if len(part) <= 40 else part[:37] + "..."
        self.summary = f"{message} (at column {start}: {part!r})"
        super().__init__(f"{message}:\n  {line}\n  {' ' * (start - 1)}{'^' * width}")


def parse_mask(text: str) -> MaskMod:
    """Build the mask an expression describes, without evaluating anything.

    Example:
        >>> from flexmask.expr import parse_mask
        >>> parse_mask("(sliding_window(256) | prefix_lm(64)) & padding(lengths=[900, 4096])")
        (sliding_window(256) | prefix_lm(64)) & padding(lengths=tensor([900, 4096]))

    Raises:
        TypeError: if ``text`` is not a string.
        ExpressionError: (a ValueError) for anything but a mask expression, pointing at the
            offending part.
    """
    if not isinstance(text, str):
        raise TypeError(f"parse_mask(text=...) needs a str, got {type(text).__name__}.")
    if len(text) > MAX_CHARS:
        raise ExpressionError(
            f"mask expression is {len(text)} characters long, at most {MAX_CHARS}"
        )
    try:
        body = ast.parse(text.strip(), mode="eval").body
    except SyntaxError as err:
        line = (err.text or text).rstrip("\n")
        raise ExpressionError(
            f"not a mask expression ({err.msg})", line, err.offset or 1, err.end_offset
        ) from None
    except (ValueError, RecursionError, MemoryError) as err:  # null bytes, absurd nesting
        raise ExpressionError(f"not a mask expression ({type(err).__name__}: {err})") from None
    try:
        return _Walker(text.strip()).mask(body)
    except RecursionError:
        raise ExpressionError("mask expression is nested too deeply") from None


class _Walker:
    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()

    def error(self, node: ast.AST, message: str) -> ExpressionError:
        line = self.lines[node.lineno - 1]  # type: ignore[attr-defined]
        end = node.end_col_offset if node.end_lineno == node.lineno else None  # type: ignore[attr-defined]
        start, stop = _columns(line, node.col_offset + 1, end and end + 1)  # type: ignore[attr-defined]
        return ExpressionError(message, line, start, stop)

    def refuse(self, node: ast.AST, expected: str) -> ExpressionError:
        if isinstance(node, ast.Name):
            if node.id.startswith("__"):
                return self.error(node, f"dunder names such as {node.id!r} are not allowed")
            return self.error(
                node, f"unknown name {node.id!r}: {expected} (factories: {', '.join(FACTORIES)})"
            )
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return self.error(node, f"a string is not allowed here: {expected}")
        what = next((v for k, v in _REFUSED.items() if isinstance(node, k)), None)
        what = what or f"{type(node).__name__} nodes"
        return self.error(node, f"{what} is not allowed in a mask expression: {expected}")

    # -- masks --------------------------------------------------------------------------------
    def mask(self, node: ast.expr) -> MaskMod:
        try:
            if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.BitAnd, ast.BitOr)):
                left, right = self.mask(node.left), self.mask(node.right)
                return left & right if isinstance(node.op, ast.BitAnd) else left | right
            if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Invert):
                return ~self.mask(node.operand)
        except ExpressionError:
            raise
        except ValueError as err:  # the algebra refused (an expression nested too deeply)
            raise self.error(node, str(err).rstrip(".")) from None
        if isinstance(node, ast.Call):
            return self.call(node)
        if isinstance(node, (ast.BinOp, ast.UnaryOp)):
            op = type(node.op).__name__
            raise self.error(node, f"operator {op} is not allowed: masks combine with &, | and ~")
        raise self.refuse(node, "expected a mask, e.g. causal() or masks joined by &, |, ~")

    def call(self, node: ast.Call) -> MaskMod:
        func = node.func
        if not isinstance(func, ast.Name) or func.id not in FACTORIES:
            raise self.refuse(func, "only flexmask factories may be called")
        name = func.id
        # shifted(mask, q_offset=...) takes a mask first; every other argument is a value.
        args = [
            self.mask(a) if name == "shifted" and i == 0 else self.value(a, name, None)
            for i, a in enumerate(node.args)
        ]
        kwargs = {}
        for kw in node.keywords:
            if kw.arg is None:
                raise self.error(kw.value, "keyword unpacking (**) is not allowed")
            is_mask = name == "shifted" and kw.arg == "mask"
            kwargs[kw.arg] = self.mask(kw.value) if is_mask else self.value(kw.value, name, kw.arg)
        try:
            return FACTORIES[name](*args, **kwargs)
        except (TypeError, ValueError, OverflowError, RuntimeError) as err:
            raise self.error(
                node, f"{name}(...) refused its arguments: {str(err).rstrip('.')}"
            ) from None

    # -- values -------------------------------------------------------------------------------
    def value(self, node: ast.expr, factory: str, keyword: str | None) -> Any:
        if isinstance(node, ast.Constant):
            v = node.value
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                return v
            if isinstance(v, bool) and (factory, keyword) in FLAGS:
                return v
            choices = CHOICES.get((factory, keyword or ""))
            if isinstance(v, str) and choices:
                if v in choices:
                    return v
                raise self.error(node, f"{factory}({keyword}=...) must be " + " or ".join(
                    map(repr, choices)))  # fmt: skip
        if (
            isinstance(node, ast.UnaryOp)
            and isinstance(node.op, (ast.USub, ast.UAdd))
            and isinstance(node.operand, ast.Constant)
            and type(node.operand.value) in (int, float)
        ):
            number: float = node.operand.value  # type: ignore[assignment]
            return -number if isinstance(node.op, ast.USub) else number
        if isinstance(node, (ast.List, ast.Tuple)):
            return [self.value(e, factory, keyword) for e in node.elts]
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "tensor"
            and len(node.args) == 1
            and not node.keywords
        ):
            data = self.value(node.args[0], factory, keyword)
            try:
                return torch.tensor(data)
            except (TypeError, ValueError, OverflowError, RuntimeError) as err:
                reason = str(err).rstrip(".")
                raise self.error(node, f"tensor(...) refused its data: {reason}") from None
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "tensor"
        ):
            raise self.error(
                node,
                "tensor(...) takes one list of numbers (a repr showing '...' is shortened: "
                "write the values out)",
            )
        raise self.refuse(node, "arguments are numbers, lists of numbers or tensor([...])")


def _columns(line: str, start: int, end: int | None) -> tuple[int, int | None]:
    """1-based UTF-8 byte columns (what ast gives) as character columns."""
    raw = line.encode()
    start = len(raw[: start - 1].decode(errors="ignore")) + 1
    end = None if end is None else len(raw[: end - 1].decode(errors="ignore")) + 1
    return start, end
