"""What the CPU can do for int8: whether it has dot-product instructions that accumulate u8 x s8 in int32.

With them (AVX-512 VNNI, AVX-VNNI, AMX) ONNX Runtime's int8 GEMMs take full-range 8-bit weights exactly.
Without them (AVX2 alone) x86 multiplies u8 x s8 pairs into int16 with saturation, and full-range weights
overflow it: that CPU needs the reduce-range form (7-bit weights). export/quantize.py writes either form
(`int8_form` in the manifest); the engine reports which one it runs and warns when it does not suit the CPU.
Linux only (reads /proc/cpuinfo); elsewhere nothing is detected and the safe form is recommended.
"""

from __future__ import annotations

from pathlib import Path

INT8_FORMS = ("avx2", "vnni")  # reduce-range 7-bit weights (safe anywhere) / full-range 8-bit (VNNI or AMX)
INT8_DOT_FLAGS = ("amx_int8", "avx512_vnni", "avx_vnni")  # /proc/cpuinfo flags, best first


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The flags of the first CPU in /proc/cpuinfo (or of `cpuinfo`, its text); empty when unreadable."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def int8_dot_product(flags: set[str] | None = None) -> str | None:
    """The CPU's best int8 dot-product extension ("amx_int8", "avx512_vnni", "avx_vnni"), or None."""
    flags = cpu_flags() if flags is None else flags
    return next((f for f in INT8_DOT_FLAGS if f in flags), None)


def recommended_int8_form(flags: set[str] | None = None) -> str:
    """"vnni" where the CPU has an int8 dot product, else "avx2"."""
    return "vnni" if int8_dot_product(flags) else "avx2"


def describe_int8(form: str, flags: set[str] | None = None) -> tuple[str, bool]:
    """(a line saying which int8 form runs on this CPU, whether the form suits it)."""
    dot = int8_dot_product(flags)
    cpu = f"this CPU has {dot}" if dot else "this CPU has no int8 dot product (VNNI/AMX)"
    if form == "vnni":
        return f"int8 form vnni (full-range 8-bit weights); {cpu}", dot is not None
    return f"int8 form avx2 (reduce-range 7-bit weights, safe on any x86); {cpu}", True
