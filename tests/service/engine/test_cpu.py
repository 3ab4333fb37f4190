"""Which int8 form suits a CPU, from its /proc/cpuinfo flags."""

from __future__ import annotations

from service.engine.cpu import cpu_flags, describe_int8, int8_dot_product, recommended_int8_form

AVX2_ONLY = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"
VNNI = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 avx512f avx512_vnni\n"


def test_flags_are_read_from_cpuinfo_text() -> None:
    assert cpu_flags(VNNI) >= {"avx2", "avx512_vnni"}
    assert cpu_flags("no flags line") == set()


def test_vnni_or_amx_recommend_the_full_range_form() -> None:
    assert recommended_int8_form(cpu_flags(VNNI)) == "vnni"
    assert recommended_int8_form({"avx2", "amx_int8"}) == "vnni"
    assert int8_dot_product({"avx_vnni", "amx_int8"}) == "amx_int8"  # the best one is named


def test_avx2_alone_recommends_the_reduce_range_form_and_flags_a_vnni_entry() -> None:
    flags = cpu_flags(AVX2_ONLY)
    assert recommended_int8_form(flags) == "avx2"
    line, suits = describe_int8("vnni", flags)
    assert not suits and "no int8 dot product" in line
    assert describe_int8("avx2", flags)[1]  # the reduce-range form suits every CPU
