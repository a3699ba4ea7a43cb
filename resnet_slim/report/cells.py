"""How the report's sections print a number: one place, so every table and sentence agrees.

A missing or non-finite number prints as "–" (and a ratio or difference with one is None), never
as 0 or "nan": the reader sees what was not measured.
"""

from resnet_slim.io import finite_number


def ratio_of(a, b):
    """a / b, or None when either is missing or b is 0."""
    a, b = finite_number(a), finite_number(b)
    return a / b if a is not None and b else None


def difference(a, b):
    """a - b, or None when either is missing."""
    a, b = finite_number(a), finite_number(b)
    return a - b if a is not None and b is not None else None


def interval(low, high, fmt="{:.1f}") -> str:
    """ "[low, high]", or "–" when either end is missing."""
    low, high = finite_number(low), finite_number(high)
    return "–" if low is None or high is None else f"[{fmt.format(low)}, {fmt.format(high)}]"


def mark(ok) -> str:
    """✓ or ✗: a check's outcome in a table cell or list item."""
    return "✓" if ok else "✗"


def num(value, fmt="{:.4g}", unit="") -> str:
    """A number in `fmt` with its unit, or "–" when it is missing."""
    return "–" if finite_number(value) is None else fmt.format(value) + unit


def plus_minus(mean, std) -> str:
    """ "mean ± std" (2 decimals), the mean alone without a std, "–" without a mean."""
    mean, std = finite_number(mean), finite_number(std)
    return "–" if mean is None else f"{mean:.2f}" + (f" ± {std:.2f}" if std is not None else "")


def speedup_text(ratio: dict) -> str:
    """ "24.1× (95% CI 23.5-24.8×)", or the bare ratio where there is no interval."""
    text = num(ratio["ratio"], "{:.1f}", "×")
    if ratio["ci"]:
        text += f" (95% CI {ratio['ci'][0]:.1f}-{ratio['ci'][1]:.1f}×)"
    return text
