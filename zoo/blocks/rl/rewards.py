"""Verifiable rewards, registered by name: ``fn(response, sample, **options) -> float``.

``sample`` is the datamodule's dict for the prompt (``answer``, ``numbers``, ``target`` ...).
"""
from __future__ import annotations

import ast
import re
from collections import Counter
from collections.abc import Mapping
from fractions import Fraction
from typing import Any

from zoo.registry import Registry

REWARDS = Registry("reward")
register_reward = REWARDS.register
get_reward = REWARDS.lookup


# -- answer extraction ---------------------------------------------------------------------
def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (nested braces allowed), or None."""
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    i = start + len("\\boxed")
    while i < len(text) and text[i] == " ":
        i += 1
    if i >= len(text) or text[i] != "{":
        return None
    depth, begin = 0, i + 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[begin:j]
    return None


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def parse_number(text: str) -> Fraction | None:
    text = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


def extract_final_number(response: str) -> str | None:
    """GSM8K-style final answer: after '####', else the last \\boxed{}, else 'answer is', else the last number."""
    if "####" in response:
        found = _NUMBER.findall(response.split("####")[-1])
        if found:
            return found[0]
    boxed = last_boxed(response)
    if boxed is not None:
        found = _NUMBER.findall(boxed)
        return found[-1] if found else boxed
    match = re.findall(r"answer is[:\s]*\$?(-?[\d,]*\.?\d+)", response, flags=re.IGNORECASE)
    if match:
        return match[-1]
    found = _NUMBER.findall(response)
    return found[-1] if found else None


def gsm8k_gold(answer_field: str) -> str:
    """The final answer of a GSM8K ``answer`` field (the text after '#### ')."""
    return answer_field.split("####")[-1].strip().replace(",", "")


def normalize_math(answer: str) -> str:
    """A MATH-style normal form: the differences between equal answers that graders ignore."""
    s = answer.strip()
    for old, new in (("\\left", ""), ("\\right", ""), ("\\!", ""), ("\\,", ""), ("\\;", ""), ("\\dfrac", "\\frac"),
                     ("\\tfrac", "\\frac"), ("^\\circ", ""), ("^{\\circ}", ""), ("\\$", ""), ("$", ""),
                     ("\\%", ""), ("%", "")):
        s = s.replace(old, new)
    s = re.sub(r"\\text\{\s*[a-zA-Z ]*\}", "", s)          # units
    s = s.replace(" ", "")
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)     # \frac12 -> \frac{1}{2}
    s = re.sub(r"\\frac\{([^{}]+)\}(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac(\d)\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)
    s = s.rstrip(".")
    if re.fullmatch(r"\.\d+", s):
        s = "0" + s
    if re.fullmatch(r"-?\d+\.0+", s):
        s = s.split(".")[0]
    return s


def math_equal(prediction: str, gold: str) -> bool:
    a, b = normalize_math(prediction), normalize_math(gold)
    if a == b:
        return True
    x, y = parse_number(a), parse_number(b)
    return x is not None and y is not None and x == y


# -- rewards -------------------------------------------------------------------------------
@register_reward("gsm8k")
def gsm8k(response: str, sample: Mapping[str, Any], **_: Any) -> float:
    """1 if the response's final number equals the gold answer numerically."""
    predicted = extract_final_number(response)
    if predicted is None:
        return 0.0
    a, b = parse_number(predicted), parse_number(str(sample["answer"]))
    return float(a is not None and b is not None and a == b)


@register_reward("boxed_match")
def boxed_match(response: str, sample: Mapping[str, Any], **_: Any) -> float:
    """1 if the last \\boxed{} equals the gold answer after MATH normalisation; 0 without a box."""
    boxed = last_boxed(response)
    return float(boxed is not None and math_equal(boxed, str(sample["answer"])))


_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", flags=re.DOTALL)
_EXPRESSION = re.compile(r"[\d+\-*/() .]+")


def _evaluate(node: ast.AST) -> Fraction:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return Fraction(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_evaluate(node.operand)
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div)):
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Add):
            return left + right
        if isinstance(node.op, ast.Sub):
            return left - right
        if isinstance(node.op, ast.Mult):
            return left * right
        if right == 0:
            raise ZeroDivisionError
        return left / right
    raise ValueError("not an arithmetic expression")


def countdown_equation(response: str) -> str | None:
    """The last <answer>...</answer> of a response, or None."""
    found = _ANSWER_TAG.findall(response)
    return found[-1].strip() if found else None


@register_reward("countdown")
def countdown(response: str, sample: Mapping[str, Any], **_: Any) -> float:
    """1 if the <answer> equation uses each given number exactly once and evaluates to the target."""
    equation = countdown_equation(response)
    if equation is None or not _EXPRESSION.fullmatch(equation):
        return 0.0
    used = Counter(int(n) for n in re.findall(r"\d+", equation))
    if used != Counter(int(n) for n in sample["numbers"]):
        return 0.0
    try:
        value = _evaluate(ast.parse(equation, mode="eval"))
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError):
        return 0.0
    return float(value == Fraction(int(sample["target"])))


@register_reward("format")
def format_check(response: str, sample: Mapping[str, Any], *, pattern: str = r"\\boxed\{.+\}",
                 full: bool = False, **_: Any) -> float:
    """1 if the response matches ``pattern`` (searched anywhere, or matched whole with ``full``)."""
    flags = re.DOTALL
    found = re.fullmatch(pattern, response.strip(), flags) if full else re.search(pattern, response, flags)
    return float(found is not None)


@register_reward("length")
def length(response: str, sample: Mapping[str, Any], *, num_tokens: int = 0, max_tokens: int = 1, **_: Any) -> float:
    """-|y| / L_max: a plain length penalty (weight it with a positive coefficient)."""
    return -num_tokens / max(max_tokens, 1)


@register_reward("domain")
def domain_reward(response: str, sample: Mapping[str, Any], **options: Any) -> float:
    """The sample's own correctness reward (``sample["reward"]``, set by ``MultiDomainDataModule``)."""
    spec = sample.get("reward")
    if not isinstance(spec, Mapping) or "name" not in spec:
        raise KeyError("the 'domain' reward needs samples carrying their reward spec under 'reward' "
                       "(datamodules.multidomain.MultiDomainDataModule tags them)")
    own = {k: v for k, v in spec.items() if k != "name"}
    return get_reward(spec["name"])(response, sample, **{**own, **options})
