"""Checks for notebooks and exercises: asserts that say what was expected and give a hint.

Defined in notebook 00 ("Check your understanding"); used by every notebook. At the end, `real_number`,
`whole_number`, `torch_tensor` and `torch_module`: the argument checks labkit's own functions share (a TypeError or
ValueError naming the argument).
"""
from __future__ import annotations

import contextlib
import inspect
import math
import numbers
import sys


def check(cond, what: str, hint: str = "") -> None:
    """Raise AssertionError(what — hint) unless cond is true."""
    if not cond:
        raise AssertionError(f"{what}" + (f" — hint: {hint}" if hint else ""))


def check_close(actual, expected, rtol: float = 0.0, atol: float = 0.0, what: str = "", hint: str = "") -> None:
    """Check |actual − expected| ≤ atol + rtol·|expected| (numbers or tensors)."""
    try:
        import torch
        if isinstance(actual, torch.Tensor) or isinstance(expected, torch.Tensor):
            a = torch.as_tensor(actual, dtype=torch.float64)
            e = torch.as_tensor(expected, dtype=torch.float64)
            if a.shape != e.shape:
                raise AssertionError(f"{what}: shape {tuple(a.shape)} != expected {tuple(e.shape)}"
                                     + (f" — hint: {hint}" if hint else ""))
            err = (a - e).abs().max().item() if a.numel() else 0.0
            tol = atol + rtol * (e.abs().max().item() if e.numel() else 0.0)
            check(err <= tol, f"{what}: max |difference| {err:.4g} > tolerance {tol:.4g}", hint)
            return
    except ImportError:  # pragma: no cover
        pass
    a, e = float(actual), float(expected)
    tol = atol + rtol * abs(e)
    ok_ = math.isclose(a, e, rel_tol=0, abs_tol=tol) or (math.isnan(a) and math.isnan(e))
    check(ok_, f"{what}: got {a:.6g}, expected {e:.6g} ± {tol:.3g}", hint)


def check_between(value, low, high, what: str = "", hint: str = "") -> None:
    """Check low ≤ value ≤ high."""
    v = float(value)
    check(low <= v <= high, f"{what}: {v:.6g} not in [{low}, {high}]", hint)


def ok(message: str) -> None:
    """Print the fixed ✓ line that ends a check cell."""
    print(f"✓ {message}")


@contextlib.contextmanager
def forbid_calls(*functions, hint: str = "this exercise asks you to write it yourself"):
    """Raise AssertionError after the block if any of `functions` ran inside it (however it was imported).

    For hidden tests: `with forbid_calls(lk.prune.magnitude_mask): mask = my_magnitude_mask(w, 0.5)` fails
    when the answer just calls labkit's reference; a property (`Q.QTensor.nbytes`) watches its getter. Watches
    Python-level calls with sys.setprofile."""
    codes = {}
    for f in functions:
        f = f.fget if isinstance(f, property) else f  # a property (QTensor.nbytes): watch its getter
        code = getattr(inspect.unwrap(f), "__code__", None)
        if code is None:
            raise TypeError(f"forbid_calls needs Python functions, got {f!r}")
        codes[code] = f"{f.__module__}.{f.__qualname__}"
    called: list[str] = []

    def profile(frame, event, arg):
        if event == "call" and frame.f_code in codes:
            called.append(codes[frame.f_code])

    previous = sys.getprofile()
    sys.setprofile(profile)
    try:
        yield
    finally:
        sys.setprofile(previous)
    check(not called, f"your answer calls {called[0] if called else ''}", hint)


# ---- argument checks for labkit's own functions (TypeError / ValueError, never AssertionError) ------------

MAX_STEPS = 100_000   # the most training steps a loop accepts: more would run for days on a laptop (a typo)


def real_number(name: str, value, hint: str = "", low: float | None = None) -> float:
    """value as a float; TypeError naming `name` (and the hint: what to pass) unless it is a real number;
    ValueError when `low` is given and value is below it or not finite."""
    say = f" ({hint})" if hint else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number{say}, got {value!r} of type {type(value).__name__}")
    if low is not None and not (math.isfinite(value) and value >= low):
        raise ValueError(f"{name} must be a finite number ≥ {low}{say}, got {value!r}")
    return float(value)


def whole_number(name: str, value, low: int = 0, hint: str = "", high: int | None = None) -> int:
    """value as an int — the one whole-number check: TypeError unless a whole number (never truncated; numpy
    integers count), ValueError when it is below `low` or above `high` (when given)."""
    say = f" ({hint})" if hint else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a whole number{say}, got {value!r} of type {type(value).__name__}")
    if value < low or (high is not None and value > high):
        span = f"in [{low}, {high}]" if high is not None else f"≥ {low}"
        raise ValueError(f"{name} must be {span}{say}, got {value}")
    return int(value)


def torch_tensor(name: str, value, hint: str = "", *, dims=None, kind: str | None = None, finite: bool = False,
                 empty: bool = False):
    """value if it is a dense torch.Tensor — with `dims` dimensions (an int or a tuple of the allowed counts), of
    `kind` "float" (floating point), "int" (integer ids) or "real" (either; bool and complex refused), with no
    NaN/inf when finite=True and at
    least one element unless empty=True; else a TypeError (not a tensor, wrong dtype) or ValueError (shape, empty,
    NaN/inf) naming `name` and the hint (what to pass)."""
    import torch
    say = f" ({hint})" if hint else ""
    if not isinstance(value, torch.Tensor) or value.layout != torch.strided:
        got = type(value).__name__ if not isinstance(value, torch.Tensor) else f"a {value.layout} tensor"
        raise TypeError(f"{name} must be a torch.Tensor{say}, got {got}; wrap data with torch.tensor(...)"
                        + ("" if not isinstance(value, torch.Tensor) else " or call .to_dense()"))
    if kind == "float" and not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor{say}, got dtype {value.dtype}; convert with .float()")
    if kind == "int" and (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool):
        raise TypeError(f"{name} must hold integer token ids{say}, got dtype {value.dtype}; convert with .long()")
    if kind == "real" and (value.is_complex() or value.dtype == torch.bool):
        raise TypeError(f"{name} must be a real-valued tensor{say}, got dtype {value.dtype}; convert with .float()")
    allowed = (dims,) if isinstance(dims, int) else dims
    if allowed is not None and value.dim() not in allowed:
        want = " or ".join(f"{d}-D" for d in allowed)
        raise ValueError(f"{name} must be {want}{say}, got shape {tuple(value.shape)}")
    if not empty and value.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(value.shape)}){say}; pass at least one value")
    if finite and (value.is_floating_point() or value.is_complex()) and not bool(torch.isfinite(value).all()):
        bad = int((~torch.isfinite(value)).sum())
        raise ValueError(f"{name} holds {bad} NaN/inf value(s){say}; every result computed from it would be NaN — "
                         "find where they came from, or mask them first")
    return value


def torch_module(name: str, value, hint: str = ""):
    """value if it is a torch.nn.Module, else a TypeError naming `name` and the hint (what to pass)."""
    import torch
    if not isinstance(value, torch.nn.Module):
        say = f" ({hint})" if hint else ""
        raise TypeError(f"{name} must be a torch.nn.Module{say}, got {type(value).__name__}")
    return value
