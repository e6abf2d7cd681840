"""LaTeX-to-expression normalisation and a safe AST evaluator (never ``eval``), for the math verifier.

Notation: an *expression* is the Python-syntax string produced by :func:`latex_to_expr`; it may use
numbers, single-letter variables, ``pi``, ``e``, ``+ - * / **``, and the functions in ``FUNCTIONS``.

Safety: inputs over ``MAX_CHARS`` characters or ``MAX_NODES`` AST nodes are refused; exponents are
evaluated in floating point (overflow is an error, not a hang). Before the optional sympy backend
builds anything, :func:`check_sympy_size` bounds what sympy could be asked to expand: every exponent
at most ``MAX_EXPONENT`` in magnitude, the degree (exponents multiply through nested powers, so
``((x^9)^9)^9`` has degree 729) at most ``MAX_SYMPY_DEGREE``, the number of monomials a full
expansion could have (``C(degree + variables, variables)``) at most ``MAX_SYMPY_TERMS``, and the size
of every exact number (``9^99``, nested powers of it) at most ``MAX_SYMPY_BITS`` bits.
"""

from __future__ import annotations

import ast
import math
import re
from collections.abc import Callable
from typing import Any

__all__ = [
    "CONSTANTS",
    "FUNCTIONS",
    "ExprError",
    "check_sympy_size",
    "eval_float",
    "free_names",
    "latex_to_expr",
    "parse_expr",
    "to_sympy",
]

MAX_CHARS = 300
MAX_NODES = 200
MAX_EXPONENT = 100.0
MAX_SYMPY_DEGREE = 16
MAX_SYMPY_BITS = 512
MAX_SYMPY_TERMS = 2000
FUNCTIONS: dict[str, Callable[[float], float]] = {
    "sqrt": math.sqrt,
    "sin": math.sin,
    "cos": math.cos,
    "tan": math.tan,
    "log": math.log,
    "exp": math.exp,
    "abs": abs,
}
CONSTANTS = {"pi": math.pi, "e": math.e}
_TOKEN = re.compile(r"\s*(?:(\d+\.?\d*(?:[eE][-+]?\d+)?|\.\d+)|([A-Za-z]+)|(\*\*|[-+*/(),]))")


class ExprError(ValueError):
    """The text is not a simple expression this module can evaluate safely."""


def _replace_command(text: str, name: str, nargs: int, build: Callable[[list[str]], str]) -> str:
    """Replaces ``\\name{a}{b}`` (or ``\\name12`` with one-character arguments) by ``build([a, b])``."""
    pattern = "\\" + name
    while True:
        start = text.find(pattern)
        if start < 0:
            return text
        i = start + len(pattern)
        args: list[str] = []
        for _ in range(nargs):
            while i < len(text) and text[i] == " ":
                i += 1
            if i >= len(text):
                raise ExprError(f"\\{name} is missing an argument")
            if text[i] == "{":
                depth, j = 0, i
                while j < len(text):
                    depth += {"{": 1, "}": -1}.get(text[j], 0)
                    if depth == 0:
                        break
                    j += 1
                if depth != 0:
                    raise ExprError(f"unbalanced braces after \\{name}")
                args.append(text[i + 1 : j])
                i = j + 1
            else:
                args.append(text[i])
                i += 1
        text = text[:start] + build(args) + text[i:]


def latex_to_expr(text: str) -> str:
    """Turns a short LaTeX or plain-text math answer into a Python-syntax expression string.

    Args:
        text: e.g. ``"\\frac{1}{2}"``, ``"2\\sqrt{3}"``, ``"3x^2"``, ``"1,000"``.

    Returns:
        The expression, e.g. ``"((1)/(2))"``; percent signs are kept for the caller to handle.

    Raises:
        ExprError: Too long or malformed.
    """
    s = text.strip()
    if len(s) > MAX_CHARS:
        raise ExprError(f"expression has {len(s)} characters, more than {MAX_CHARS}")
    s = s.strip("$").replace("\\(", "").replace("\\)", "").replace("\\[", "").replace("\\]", "")
    for junk in ("\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "\\quad", "~", "\\displaystyle"):
        s = s.replace(junk, " ")
    s = re.sub(r"(\d)\s*\\(?:text|mathrm)\{\s*[A-Za-z ]+\}\s*$", r"\1", s)  # trailing units
    s = re.sub(r"\\(?:text|mathrm|mathbf|textbf)\{([^{}]*)\}", r"\1", s)
    s = (
        re.sub(r"\^\s*\{?\\circ\}?|°", "", s)
        .replace("\\%", "%")
        .replace("\\dfrac", "\\frac")
        .replace("\\tfrac", "\\frac")
    )
    s = _replace_command(s, "frac", 2, lambda a: f"(({a[0]})/({a[1]}))")
    s = re.sub(r"\\sqrt\s*\[([^\]]+)\]\s*\{([^{}]*)\}", r"((\2)**(1/(\1)))", s)
    s = _replace_command(s, "sqrt", 1, lambda a: f"sqrt({a[0]})")
    s = s.replace("\\cdot", "*").replace("\\times", "*").replace("\\div", "/").replace("\\ln", "log")
    s = re.sub(r"\\(sin|cos|tan|log|exp|pi)\b", r" \1 ", s)
    if "\\" in s:
        raise ExprError(f"unsupported LaTeX command in {text!r}")
    s = s.replace("{", "(").replace("}", ")").replace("[", "(").replace("]", ")").replace("^", "**")
    if re.fullmatch(r"\s*[-+]?\d{1,3}(,\d{3})+(\.\d+)?%?\s*", s):
        s = s.replace(",", "")
    return s.strip()


def _tokens_with_implicit_mul(expr: str) -> str:
    """Re-emits ``expr`` with explicit ``*`` for implicit products (``2x``, ``2(x+1)``, ``(a)(b)``, ``xy``)."""
    out: list[tuple[str, str]] = []
    pos = 0
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if m is None or m.end() == pos:
            if expr[pos:].strip() == "":
                break
            raise ExprError(f"unexpected character {expr[pos]!r} in {expr!r}")
        pos = m.end()
        num, name, op = m.groups()
        if num is not None:
            if out and out[-1][0] == "num":
                raise ExprError(f"two numbers side by side in {expr!r}")
            out.append(("num", num))
        elif name is not None:
            if name in FUNCTIONS or name in CONSTANTS:
                out.append(("func" if name in FUNCTIONS else "name", name))
            elif len(name) <= 2:  # "xy" is x*y; longer unknown words are prose, not math
                out.extend(("name", ch) for ch in name)
            else:
                raise ExprError(f"unknown word {name!r} in {expr!r}")
        else:
            out.append(("op", op))
    pieces: list[str] = []
    for i, (kind, value) in enumerate(out):
        if i > 0:
            prev_kind, prev_value = out[i - 1]
            left = prev_kind in ("num", "name") or prev_value == ")"
            right = kind in ("num", "name", "func") or value == "("
            if left and right:
                pieces.append("*")
        pieces.append(value)
    return "".join(pieces)


def parse_expr(expr: str) -> ast.expr:
    """Parses an expression string (implicit products allowed) into a checked Python AST.

    Raises:
        ExprError: Unsupported syntax, too many nodes, or a syntax error.
    """
    try:
        tree = ast.parse(_tokens_with_implicit_mul(expr), mode="eval")
    except SyntaxError as exc:
        raise ExprError(f"cannot parse {expr!r}: {exc.msg}") from None
    nodes = list(ast.walk(tree))
    if len(nodes) > MAX_NODES:
        raise ExprError(f"expression has {len(nodes)} nodes, more than {MAX_NODES}")
    allowed = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Constant, ast.Name, ast.Call, ast.Tuple, ast.Load)
    allowed_ops = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.Pow, ast.USub, ast.UAdd)
    for node in nodes:
        if not isinstance(node, allowed + allowed_ops):
            raise ExprError(f"unsupported syntax {type(node).__name__} in {expr!r}")
        if isinstance(node, ast.Call) and not (
            isinstance(node.func, ast.Name) and node.func.id in FUNCTIONS and len(node.args) == 1 and not node.keywords
        ):
            raise ExprError(f"unsupported call in {expr!r}")
    return tree.body


def free_names(node: ast.AST) -> set[str]:
    """Variable names in a parsed expression (constants and function names excluded)."""
    called = {id(n.func) for n in ast.walk(node) if isinstance(n, ast.Call)}
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and n.id not in CONSTANTS and id(n) not in called}


def eval_float(node: ast.AST, env: dict[str, float]) -> float:
    """Evaluates a parsed expression in floating point.

    Raises:
        ExprError: Unknown name, tuple, complex or non-finite result, domain or overflow error.
    """
    try:
        value = _eval(node, env)
    except (ArithmeticError, ValueError) as exc:  # ZeroDivision, Overflow, math domain errors
        raise ExprError(str(exc)) from None
    if isinstance(value, complex) or not math.isfinite(value):
        raise ExprError(f"non-real or non-finite value {value!r}")
    return float(value)


def _eval(node: ast.AST, env: dict[str, float]) -> Any:
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float) and not isinstance(node.value, bool):
        return float(node.value)
    if isinstance(node, ast.Name):
        if node.id in env:
            return env[node.id]
        if node.id in CONSTANTS:
            return CONSTANTS[node.id]
        raise ExprError(f"unknown name {node.id!r}")
    if isinstance(node, ast.UnaryOp):
        value = _eval(node.operand, env)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp):
        a, b = _eval(node.left, env), _eval(node.right, env)
        if isinstance(node.op, ast.Add):
            return a + b
        if isinstance(node.op, ast.Sub):
            return a - b
        if isinstance(node.op, ast.Mult):
            return a * b
        if isinstance(node.op, ast.Div):
            return a / b
        return a**b
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        return FUNCTIONS[node.func.id](_eval(node.args[0], env))
    raise ExprError(f"cannot evaluate {type(node).__name__}")


def _degree_and_bits(node: ast.AST) -> tuple[float, float]:
    """Upper bounds of the polynomial degree and of the bits of the exact numbers a subtree builds."""
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
        return 0.0, math.log2(abs(float(node.value)) + 2.0)
    if isinstance(node, ast.Name):
        return (0.0, 2.0) if node.id in CONSTANTS else (1.0, 1.0)
    if isinstance(node, ast.UnaryOp):
        return _degree_and_bits(node.operand)
    if isinstance(node, ast.Call):
        return _degree_and_bits(node.args[0])
    if isinstance(node, ast.BinOp):
        (d_a, b_a), (d_b, b_b) = _degree_and_bits(node.left), _degree_and_bits(node.right)
        if isinstance(node.op, ast.Add | ast.Sub):
            return max(d_a, d_b), max(b_a, b_b) + 1.0
        if isinstance(node.op, ast.Mult | ast.Div):
            return d_a + d_b, b_a + b_b
        if free_names(node.right):
            raise ExprError("symbolic exponent refused")
        exponent = abs(eval_float(node.right, {}))
        if exponent > MAX_EXPONENT:
            raise ExprError(f"exponent {exponent:g} above {MAX_EXPONENT:g} refused")
        times = max(1.0, math.ceil(exponent))
        return d_a * times, b_a * times
    raise ExprError(f"cannot size {type(node).__name__}")


def check_sympy_size(node: ast.AST) -> None:
    """Refuses expressions that sympy could take unbounded time to build or simplify (see the module doc).

    Raises:
        ExprError: An exponent, degree, expansion or exact number above the bounds, or a symbolic exponent.
    """
    degree, bits = _degree_and_bits(node)
    if degree > MAX_SYMPY_DEGREE:
        raise ExprError(f"degree up to {degree:g}, above {MAX_SYMPY_DEGREE}: too large for sympy")
    variables = len(free_names(node))
    if math.comb(int(degree) + variables, variables) > MAX_SYMPY_TERMS:
        raise ExprError(f"degree {degree:g} in {variables} variables could expand past {MAX_SYMPY_TERMS} terms")
    if bits > MAX_SYMPY_BITS:
        raise ExprError(f"exact numbers up to {bits:.0f} bits, above {MAX_SYMPY_BITS}: too large for sympy")


def to_sympy(node: ast.AST, sympy: Any) -> Any:
    """Builds a sympy expression from a parsed AST (no string parsing, so no ``eval`` inside sympy).

    Call :func:`check_sympy_size` first: this function bounds only each single exponent.

    Raises:
        ExprError: Unsupported node or an exponent above ``MAX_EXPONENT``.
    """
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float) and not isinstance(node.value, bool):
        return sympy.Integer(node.value) if isinstance(node.value, int) else sympy.Rational(str(node.value))
    if isinstance(node, ast.Name):
        return {"pi": sympy.pi, "e": sympy.E}.get(node.id) or sympy.Symbol(node.id, positive=True)
    if isinstance(node, ast.UnaryOp):
        value = to_sympy(node.operand, sympy)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp):
        a, b = to_sympy(node.left, sympy), to_sympy(node.right, sympy)
        if isinstance(node.op, ast.Pow):
            if not b.is_number or abs(float(b)) > MAX_EXPONENT:
                raise ExprError(f"exponent {b} refused (symbolic or above {MAX_EXPONENT})")
            return a**b
        ops = {ast.Add: lambda: a + b, ast.Sub: lambda: a - b, ast.Mult: lambda: a * b, ast.Div: lambda: a / b}
        return ops[type(node.op)]()
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
        func = {"abs": sympy.Abs}.get(node.func.id) or getattr(sympy, node.func.id)
        return func(to_sympy(node.args[0], sympy))
    raise ExprError(f"cannot convert {type(node).__name__}")
