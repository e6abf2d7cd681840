"""Math answer verifier: numeric with tolerance and simple symbolic equivalence (REFERENCE.md section 5).

GLM-4.5V and Qwen3-VL score math with "symbolic/numeric with tolerance" verifiers. Here:

1. Both answers are normalised from LaTeX (``\\frac``, ``\\sqrt``, ``^``, ``\\cdot``, ``1,000``,
   ``50%``, units in ``\\text{}``) to a Python-syntax expression and parsed by a checked AST walker
   (never ``eval``).
2. Without variables: numbers are compared with ``|p - r| <= max(abs_tol, rel_tol * |r|)``; a
   percentage also matches its fraction (``50%`` == ``0.5`` == ``50``).
3. With variables: both are evaluated at seeded random points in [0.5, 2.5] (a polynomial-identity
   style test): equal at ``_NUM_POINTS`` points is equal, a difference beyond the tolerance at one
   point is not. Only when too few points can be evaluated (domain errors, overflow) may sympy (if
   importable; built from our AST, not from a string) prove ``simplify(p - r) == 0``, and only for
   expressions within the size bounds of ``_expr.check_sympy_size`` (degree, exponents, exact
   number sizes), so a verifier call never hands sympy an unbounded expansion. Variables are
   positive in both backends, so ``sqrt(x^2) == x``.
4. Tuples and intervals ``(1, 2]`` compare element-wise and must use the same brackets;
   ``x = 3`` drops the ``x =``.

Anything else falls back to exact comparison of the normalised strings. Hedged answers ("1 or 2",
"a number between 1 and 10", "1 2") do not parse as one expression and earn nothing.
"""

from __future__ import annotations

import ast
import importlib
import random
import re
from collections.abc import Mapping
from typing import Any

from vl_rl.rewards._expr import (
    ExprError,
    check_sympy_size,
    eval_float,
    free_names,
    latex_to_expr,
    parse_expr,
    to_sympy,
)
from vl_rl.rewards.extract import extract_answer, normalize_answer

__all__ = ["math_equal", "math_reward", "parse_number"]

_NUM_POINTS = 6


def _sympy() -> Any:
    try:
        return importlib.import_module("sympy")
    except ImportError:
        return None


def _split_top_level(expr: str) -> list[str]:
    """Splits ``(a, b)`` into ``["a", "b"]`` at commas outside nested parentheses; else ``[expr]``."""
    s = expr.strip()
    if not (s.startswith("(") and s.endswith(")")) or "," not in s:
        return [s]
    parts, depth, current = [], 0, ""
    for ch in s[1:-1]:
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    return [p.strip() for p in parts]


def _bracket_kind(text: str) -> str:
    """Outer brackets of a tuple/interval (``"[)"``) or ``""``: intervals must agree on open/closed ends."""
    s = re.sub(r"\\left|\\right|\\[\[\]()]|\$", "", text).strip()
    if len(s) >= 2 and s[0] in "([" and s[-1] in ")]" and "," in s:
        return s[0] + s[-1]
    return ""


def _strip_assignment(expr: str) -> str:
    m = re.fullmatch(r"\s*[A-Za-z]\s*=\s*(.+)", expr)
    return m.group(1) if m else expr


def _parse_with_percent(expr: str) -> list[ast.expr]:
    """Parsed alternatives: ``50%`` gives ``[50, 50/100]``; anything else one tree."""
    expr = expr.strip()
    if expr.endswith("%"):
        tree = parse_expr(expr[:-1])
        return [tree, ast.BinOp(left=tree, op=ast.Div(), right=ast.Constant(100))]
    if "%" in expr:
        raise ExprError(f"'%' inside {expr!r}")
    return [parse_expr(expr)]


def parse_number(text: str) -> float | None:
    """The value of a constant answer (``"3/4"``, ``"\\frac{1}{2}"``, ``"1.5e3"``, ``"2\\sqrt{2}"``).

    A percentage gives its fraction (``"50%"`` -> 0.5). Returns ``None`` for anything that is not a
    single constant expression (variables, prose, hedges).
    """
    try:
        trees = _parse_with_percent(_strip_assignment(latex_to_expr(text)))
        tree = trees[-1]
        if free_names(tree):
            return None
        return eval_float(tree, {})
    except ExprError:
        return None


def _close(a: float, b: float, rel_tol: float, abs_tol: float) -> bool:
    return abs(a - b) <= max(abs_tol, rel_tol * abs(b))


def _numeric_identity(pred: ast.expr, ref: ast.expr, names: list[str], rel_tol: float, abs_tol: float) -> bool | None:
    """Equal at ``_NUM_POINTS`` random points (True), different at one (False), or too few evaluable (None)."""
    rng = random.Random(0)
    agreed = 0
    for _ in range(3 * _NUM_POINTS):
        env = {name: rng.uniform(0.5, 2.5) for name in names}
        try:
            p, r = eval_float(pred, env), eval_float(ref, env)
        except ExprError:
            continue
        if not _close(p, r, max(rel_tol, 1e-9), abs_tol):
            return False
        agreed += 1
        if agreed == _NUM_POINTS:
            return True
    return None


def _sympy_equal(pred: ast.expr, ref: ast.expr) -> bool:
    sympy = _sympy()
    if sympy is None:
        return False
    try:
        check_sympy_size(ast.BinOp(left=pred, op=ast.Sub(), right=ref))
        return bool(sympy.simplify(to_sympy(pred, sympy) - to_sympy(ref, sympy)) == 0)
    except (ExprError, TypeError, ValueError, ArithmeticError, AttributeError, RecursionError):
        return False


def _trees_equal(pred: ast.expr, ref: ast.expr, rel_tol: float, abs_tol: float, use_sympy: bool) -> bool:
    names = sorted(free_names(pred) | free_names(ref))
    if not names:
        try:
            return _close(eval_float(pred, {}), eval_float(ref, {}), rel_tol, abs_tol)
        except ExprError:
            return False
    numeric = _numeric_identity(pred, ref, names, rel_tol, abs_tol)
    if numeric is not None:
        return numeric
    return use_sympy and _sympy_equal(pred, ref)


def math_equal(
    pred: str, ref: str, *, rel_tol: float = 1e-4, abs_tol: float = 1e-8, use_sympy: bool | None = None
) -> bool:
    """Whether a predicted math answer equals the reference.

    Args:
        pred: The extracted predicted answer.
        ref: The reference answer.
        rel_tol: Relative tolerance for numbers.
        abs_tol: Absolute tolerance for numbers (matters near zero).
        use_sympy: ``None`` uses sympy when importable; ``False`` forces the numeric identity test.

    Returns:
        ``True`` when equal numerically, symbolically, or as normalised strings.
    """
    if rel_tol < 0 or abs_tol < 0:
        raise ValueError(f"tolerances must be >= 0, got rel_tol={rel_tol}, abs_tol={abs_tol}")
    if not pred or not pred.strip():
        return False
    if normalize_answer(pred) == normalize_answer(ref):
        return True
    if _bracket_kind(pred) != _bracket_kind(ref):
        return False  # "[1, 2]" is not "(1, 2)"
    try:
        pred_parts = _split_top_level(_strip_assignment(latex_to_expr(pred)))
        ref_parts = _split_top_level(_strip_assignment(latex_to_expr(ref)))
        if len(pred_parts) != len(ref_parts):
            return False
        sym = True if use_sympy is None else use_sympy
        for p_text, r_text in zip(pred_parts, ref_parts):
            p_alts, r_alts = _parse_with_percent(p_text), _parse_with_percent(r_text)
            if not any(_trees_equal(p, r, rel_tol, abs_tol, sym) for p in p_alts for r in r_alts):
                return False
        return True
    except ExprError:
        return False


def math_reward(
    prompt: str,
    response: str,
    sample: Mapping[str, Any],
    *,
    rel_tol: float = 1e-4,
    abs_tol: float = 1e-8,
    fallback_last_number: bool = False,
) -> float:
    """1.0 when the response's extracted answer equals ``sample["answer"]``, else 0.0.

    Args:
        prompt: Unused (part of the reward protocol).
        response: The model response.
        sample: Must hold ``"answer"`` (str or number).
        rel_tol: Relative tolerance.
        abs_tol: Absolute tolerance.
        fallback_last_number: Accept the last number when the response has no answer marker.
    """
    del prompt
    if "answer" not in sample:
        raise ValueError(f"math_reward needs sample['answer']; sample keys are {sorted(sample)}")
    pred = extract_answer(response, fallback_last_number=fallback_last_number)
    if pred is None:
        return 0.0
    return float(math_equal(pred, str(sample["answer"]), rel_tol=rel_tol, abs_tol=abs_tol))
