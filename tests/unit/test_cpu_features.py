"""When llama.cpp's weight repacking is used: CPU_REPACK and the CPU's report."""

from __future__ import annotations

import ctypes

import pytest

from inference_server.cpu_features import extra_buffer_types, has_amx, llama_features
from inference_server.llama_runtime import read_sized

# Abridged /proc/cpuinfo of a 4th-generation Xeon (AMX), and of an AMD EPYC.
XEON_WITH_AMX = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8488C
flags\t\t: fpu vme sse sse2 avx avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8
"""
EPYC = """processor\t: 0
vendor_id\t: AuthenticAMD
flags\t\t: fpu vme sse sse2 avx avx2 avx512f avx512_vnni avx512_bf16
"""
ARM = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 asimddp\n"
LLAMA_WITH_AMX = "CPU : SSE3 = 1 | AVX2 = 1 | AVX512 = 1 | AMX_INT8 = 1 | REPACK = 1 |"
LLAMA_WITHOUT_AMX = "CPU : SSE3 = 1 | AVX2 = 1 | AVX512 = 1 | AMX_INT8 = 0 | REPACK = 1 |"


def test_auto_turns_repacking_off_where_the_cpu_reports_amx():
    assert extra_buffer_types("auto", XEON_WITH_AMX)[0] is False
    assert "llama.cpp/issues/20824" in extra_buffer_types("auto", XEON_WITH_AMX)[1]


def test_auto_turns_repacking_off_where_llama_cpp_reports_amx():
    assert extra_buffer_types("auto", "", LLAMA_WITH_AMX)[0] is False


@pytest.mark.parametrize("cpuinfo", [EPYC, ARM, ""])
def test_auto_leaves_repacking_on_elsewhere(cpuinfo):
    assert extra_buffer_types("auto", cpuinfo, LLAMA_WITHOUT_AMX)[0] is True


@pytest.mark.parametrize("cpuinfo", [XEON_WITH_AMX, EPYC])
def test_on_and_off_are_obeyed_whatever_the_cpu(cpuinfo):
    assert extra_buffer_types("on", cpuinfo)[0] is True
    assert extra_buffer_types("off", cpuinfo)[0] is False


def test_llama_cpp_features_are_those_reported_as_1():
    assert llama_features(LLAMA_WITHOUT_AMX) == {"SSE3", "AVX2", "AVX512", "REPACK"}
    assert has_amx(ARM, LLAMA_WITHOUT_AMX) is False


def test_a_buffer_too_small_is_read_again_at_the_size_asked_for():
    text = b"x" * 300
    sizes = []

    def fill(buffer: ctypes.Array[ctypes.c_char], size: int) -> int:
        # As llama_token_to_piece: -needed when the buffer is too small.
        sizes.append(size)
        if size < len(text):
            return -len(text)
        ctypes.memmove(buffer, text, len(text))
        return len(text)

    assert read_sized(fill, 256) == text
    assert sizes == [256, 300]
