"""Mixed precision and compilation: resolve ``train.precision`` for this machine, autocast, torch.compile.

``auto`` is bf16 where the hardware computes it natively (CUDA with bf16; a CPU with AVX512-BF16 or AMX),
fp32 elsewhere. ``accelerate launch --mixed_precision X`` (X other than ``no``) wins over the config.
Anything the machine cannot run is a :class:`PrecisionError` that names what to choose instead.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..errors import PrecisionError
from ..utils import cpu_has_native_bf16

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """A resolved precision: its name, accelerate's ``mixed_precision`` value and why it was chosen."""

    name: str  # fp32 | bf16 | fp16
    reason: str

    @property
    def accelerate(self) -> str:
        return "no" if self.name == "fp32" else self.name

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.name]


def native_bf16(device_type: str) -> bool:
    """Whether ``device_type`` computes bf16 natively here."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return device_type == "cpu" and cpu_has_native_bf16()


def resolve_precision(requested: str, device_type: str) -> Precision:
    """Resolve ``train.precision`` (or a launcher's ``--mixed_precision``) for ``device_type``."""
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if launcher not in ("no", ""):
        requested, source = {"no": "fp32"}.get(launcher, launcher), "accelerate launch --mixed_precision"
    else:
        source = "train.precision"
    if requested not in PRECISIONS:
        raise PrecisionError(f"{source}: '{requested}' is not one of {', '.join(PRECISIONS)}")
    if requested == "auto":
        if native_bf16(device_type):
            return Precision("bf16", f"auto: {device_type} computes bf16 natively")
        return Precision("fp32", f"auto: {device_type} has no native bf16")
    if requested == "fp16" and device_type != "cuda":
        raise PrecisionError(f"{source}: fp16 autocast needs a CUDA GPU; on the CPU use bf16 (native here: "
                             f"{native_bf16('cpu')}) or fp32, or 'auto' to pick")
    if requested == "bf16" and not native_bf16(device_type):
        raise PrecisionError(f"{source}: bf16 is not native on this {device_type} (it would run emulated, slower than "
                             f"fp32); use fp32, or 'auto' to pick bf16 only where it is native")
    return Precision(requested, f"{source}: {requested}")


def sampling_precision(cfg: dict, device_type: str) -> str:
    """Return the precision to sample a run with: its training precision where this machine runs it, else fp32."""
    try:
        return resolve_precision(cfg["train"]["precision"], device_type).name
    except PrecisionError:
        return "fp32"


def autocast(device: torch.device | str, precision: str | Precision):
    """Return the autocast context of a resolved precision (a no-op for fp32)."""
    name = precision.name if isinstance(precision, Precision) else precision
    if name == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=DTYPES[name])


def compile_model(denoiser: nn.Module, log: Callable[[str], None] = print, **options) -> None:
    """Compile the denoiser's inner model in place (``nn.Module.compile``: state-dict keys stay the same).

    Dynamo's in-process caches are cleared first: a model of the same class compiled earlier in this process (an
    experiment's previous arm) shares its code objects, and dynamo does not guard on forward hooks
    (``skip_nnmodule_hook_guards``), so the graph traced for a model without the bottleneck head's hook would run
    for one with it and the head would never see features. On-disk compile caches are kept, so the recompile is
    quick."""
    torch.compiler.reset()
    denoiser.inner_model.compile(**options)
    log("gmmcond: torch.compile on the inner model; the first step compiles it (about a minute on a CPU)")


@contextlib.contextmanager
def first_compiled_call(log: Callable[[str], None] = print):
    """Time the call that triggers compilation; turn a compiler failure into a PrecisionError."""
    tic = time.time()
    try:
        yield
    except Exception as exc:  # the compiler's own exception types vary by backend and version
        if "torch._dynamo" in type(exc).__module__ or "torch._inductor" in type(exc).__module__ or "Backend" in type(exc).__name__:
            raise PrecisionError(f"train.compile: torch.compile failed on this platform ({type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else ''}); set train.compile=false") from exc
        raise
    log(f"gmmcond: compiled in {time.time() - tic:.1f} s (first step, forward and backward)")
