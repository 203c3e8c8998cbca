"""Whether llama.cpp may repack the model's weights for this CPU.

llama.cpp's CPU backend can move weights into "extra buffer types" at load:
its AMX buffer on Intel CPUs with Advanced Matrix Extensions, and its CPU
repack buffer (interleaved layouts for some quantizations on AVX2, AVX-512 and
NEON). The AMX matrix multiplication crashes (SIGSEGV on the first decode) on
some of these CPUs, a machine-dependent upstream bug
(https://github.com/ggml-org/llama.cpp/issues/20824, closed without a fix), so
``auto`` turns the extra buffer types off where the CPU or llama.cpp reports
AMX, and leaves them on elsewhere, where the repacked layouts are faster.

Plain text in, a decision out: nothing here loads llama.cpp, so the rule is
tested on any machine with any CPU's ``/proc/cpuinfo``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

RepackMode = Literal["auto", "on", "off"]

CPUINFO = Path("/proc/cpuinfo")
UPSTREAM_ISSUE = "https://github.com/ggml-org/llama.cpp/issues/20824"


def read_cpuinfo(path: Path = CPUINFO) -> str:
    """The kernel's CPU report; empty where there is none (macOS, Windows)."""
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def cpu_flags(cpuinfo: str) -> set[str]:
    """The feature flags of ``/proc/cpuinfo`` (x86 ``flags``, Arm ``Features``)."""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):
            flags.update(value.split())
    return flags


def llama_features(system_info: str) -> set[str]:
    """The features llama.cpp reports as on (``llama_print_system_info``:
    ``CPU : SSE3 = 1 | AVX512 = 1 | AMX_INT8 = 0 | ...``)."""
    return {name for name, on in re.findall(r"(\w+) = (\d+)", system_info) if on != "0"}


def has_amx(cpuinfo: str, system_info: str = "") -> bool:
    """Whether the CPU (``amx_tile``, ``amx_int8``, ``amx_bf16``, ...) or
    llama.cpp's build (``AMX_INT8 = 1``) reports AMX."""
    return any(flag.startswith("amx") for flag in cpu_flags(cpuinfo)) or any(
        feature.startswith("AMX") for feature in llama_features(system_info)
    )


def extra_buffer_types(mode: RepackMode, cpuinfo: str, system_info: str = "") -> tuple[bool, str]:
    """Whether to load with llama.cpp's extra buffer types, and why (for the log)."""
    if mode == "on":
        return True, "CPU_REPACK=on"
    if mode == "off":
        return False, "CPU_REPACK=off"
    if has_amx(cpuinfo, system_info):
        return False, f"CPU_REPACK=auto and the CPU reports AMX ({UPSTREAM_ISSUE})"
    return True, "CPU_REPACK=auto and the CPU reports no AMX"
