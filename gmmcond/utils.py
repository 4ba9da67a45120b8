"""Small helpers used across layers: process memory, CPU threads, hardware facts."""
from __future__ import annotations

import os
import platform
from pathlib import Path


def peak_rss_mb() -> float:
    """Return this process's peak resident memory in MiB (0 where the platform does not say)."""
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    except (ImportError, AttributeError):
        return 0.0


def usable_cores() -> int:
    """Return the number of CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_flags() -> set[str]:
    """Return the CPU feature flags of /proc/cpuinfo (empty where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_has_native_bf16() -> bool:
    """Whether the CPU computes bf16 natively (AVX512-BF16 or AMX-BF16)."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def host_description() -> str:
    """This machine as a benchmark should name it: CPU model, usable cores and the widest of the features that
    decide the recipe's speed (AMX, AVX512-BF16, AVX512, AVX2), e.g. ``"AMD EPYC, 2 cores, AVX2 (no native bf16)"``."""
    name = ""
    try:
        name = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name")), "")
    except OSError:
        pass
    flags = cpu_flags()
    widest = next((label for flag, label in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX512-BF16"), ("avx512f", "AVX512"),
                                             ("avx2", "AVX2")) if flag in flags), "")
    features = f", {widest}" if widest else ""
    return (f"{name or platform.processor() or platform.machine()}, {usable_cores()} cores{features}"
            f"{'' if cpu_has_native_bf16() else ' (no native bf16)'}")


def cache_root() -> Path:
    """Where gmmcond keeps what it makes once and reuses (evaluators trained on first use, the digits folder):
    ``$GMMCOND_CACHE``, default ``~/.cache/gmmcond``."""
    return Path(os.environ.get("GMMCOND_CACHE", Path.home() / ".cache" / "gmmcond"))
