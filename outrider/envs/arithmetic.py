"""Exact, bounded arithmetic on untrusted text: the calculator tool's evaluator and the number parsing its answers
use. `safe_eval` parses with ``ast`` and evaluates only numeric literals, + − × / // % **, unary ±, and parentheses,
with bounds on length, exponent and result size, in exact rational arithmetic; it never executes user text."""

from __future__ import annotations

import ast
import math
import re
import warnings
from fractions import Fraction

MAX_EXPR_CHARS = 120   # bounds literal size and nesting depth before parsing
MAX_EXPONENT = 64      # |b| in a ** b
MAX_RESULT_DIGITS = 60  # |intermediate value| < 10^60 (numerator and denominator)
MAX_ANSWER_CHARS = 64   # a longer answer text is unparseable (Fraction of huge text is slow or raises)
MAX_ANSWER_EXPONENT = 100  # |e| in "1e<e>": checked before Fraction, which would compute 10**e
MAX_FORMAT_BITS = 14_000   # integers wider than this (≈ 4200 digits) are not printed in full (int→str limit)


class CalcError(ValueError):
    """A malformed or disallowed expression: its message is shown to the policy."""


_BINOPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "//", ast.Mod: "%",
           ast.Pow: "**"}


def _bounded(v: Fraction) -> Fraction:
    limit = 10**MAX_RESULT_DIGITS
    if abs(v.numerator) >= limit or v.denominator >= limit:
        raise CalcError("result too large")
    return v


def _eval(node: ast.AST) -> Fraction:
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):  # bool/complex/str are refused
        if isinstance(node.value, float):
            if not math.isfinite(node.value):  # 1e999 parses as inf
                raise CalcError("number too large")
            return _bounded(Fraction(str(node.value)))
        return _bounded(Fraction(node.value))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _eval(node.operand)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        a, b, op = _eval(node.left), _eval(node.right), _BINOPS[type(node.op)]
        if op in ("/", "//", "%") and b == 0:
            raise CalcError("division by zero")
        if op == "+":
            return _bounded(a + b)
        if op == "-":
            return _bounded(a - b)
        if op == "*":
            return _bounded(a * b)
        if op == "/":
            return _bounded(a / b)
        if op == "//":
            return _bounded(Fraction(math.floor(a / b)))
        if op == "%":
            return _bounded(a - b * math.floor(a / b))
        # a ** b: integer exponents only, checked *before* computing (10**10**10 must not run)
        if b.denominator != 1 or abs(b) > MAX_EXPONENT:
            raise CalcError(f"exponent must be an integer with |exponent| <= {MAX_EXPONENT}")
        if a == 0 and b < 0:
            raise CalcError("division by zero")
        size = max(abs(a.numerator), a.denominator)
        if size > 1 and abs(int(b)) * math.log10(size) >= MAX_RESULT_DIGITS:
            raise CalcError("result too large")
        return _bounded(a ** int(b))
    raise CalcError(f"unsupported syntax: {type(node).__name__}")


def safe_eval(expr: str) -> Fraction:
    """Evaluate an arithmetic expression exactly, or raise `CalcError` (never anything else, never `eval`).

    Grammar: numeric literals, + − * / // % ** (integer exponent |b| ≤ 64), unary ±, parentheses; names,
    calls, attributes, subscripts, strings, comparisons etc. are refused; at most 120 characters and every value
    below 10^60. ``//`` and ``%`` follow Python's floor semantics."""
    text = expr.strip()
    if not text:
        raise CalcError("empty expression")
    if len(text) > MAX_EXPR_CHARS:
        raise CalcError(f"expression longer than {MAX_EXPR_CHARS} characters")
    try:
        with warnings.catch_warnings():  # "1if 1else 2" would print a SyntaxWarning on the user's stderr
            warnings.simplefilter("ignore")
            tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise CalcError("invalid syntax") from None
    try:
        return _eval(tree)
    except CalcError:
        raise
    except RecursionError:
        raise CalcError("expression nested too deeply") from None
    except (ValueError, OverflowError, ArithmeticError):  # a model may write anything: never leak an exception
        raise CalcError("invalid number") from None


def format_number(v: Fraction) -> str:
    """An integer as digits; anything else (or an integer too wide to print) as a decimal with up to 10
    significant digits, "inf"/"-inf" beyond the float range. Never raises."""
    if v.denominator == 1 and v.numerator.bit_length() <= MAX_FORMAT_BITS:
        return str(v.numerator)
    try:
        return format(float(v), ".10g")
    except OverflowError:
        return "inf" if v > 0 else "-inf"


_EXPONENT = re.compile(r"[eE]([-+]?[0-9_]+)")


def parse_number(text: str) -> Fraction | None:
    """A number written as an integer, decimal or fraction (commas and spaces ignored), or None: also None for
    text longer than 64 characters or an exponent beyond ±100 (out of bounds counts as unparseable)."""
    text = text.replace(",", "").replace(" ", "")
    if len(text) > MAX_ANSWER_CHARS:
        return None
    m = _EXPONENT.search(text)
    if m is not None:
        try:
            if abs(int(m.group(1).replace("_", "") or "0")) > MAX_ANSWER_EXPONENT:
                return None
        except ValueError:
            return None
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError, OverflowError, ArithmeticError, RecursionError):
        return None


def partial_results(expr: str) -> frozenset[Fraction]:
    """The values of every operation in `expr`'s parse tree (its per-step partial results, the last one the
    answer): ``12*34+56`` gives {408, 464}."""
    out = set()
    for node in ast.walk(ast.parse(expr, mode="eval")):
        if isinstance(node, ast.BinOp):
            out.add(_eval(node))
    return frozenset(out)
