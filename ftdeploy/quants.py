"""The llama.cpp types ftdeploy can export, in one table: what config accepts, what the quantizer is asked for,
what the disk estimate assumes and in which order `--quant auto` tries its candidates (smallest first).

Bits per weight are llama.cpp's own figures for a 7B model (tools/quantize's list), close enough for a disk
estimate; the ladder is ordered from the smallest file to the largest.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Quant:
    name: str  # as typed in --quant and export.quant, lower case
    bits: float  # bits per weight, for the disk estimate
    ftype: str  # llama.cpp's llama_ftype enum member
    ladder: bool = True  # on the ladder of common types, smallest to largest


def _mostly(name: str) -> str:
    return f"LLAMA_FTYPE_MOSTLY_{name.upper()}"


# Ordered from the smallest (most lossy) to the largest.
TABLE: tuple[Quant, ...] = (
    Quant("tq1_0", 1.69, _mostly("tq1_0"), ladder=False),
    Quant("tq2_0", 2.06, _mostly("tq2_0"), ladder=False),
    Quant("q2_k", 3.4, _mostly("q2_k")),
    Quant("q3_k_s", 3.5, _mostly("q3_k_s")),
    Quant("q3_k_m", 3.9, _mostly("q3_k_m")),
    Quant("q3_k_l", 4.3, _mostly("q3_k_l")),
    Quant("iq4_xs", 4.25, _mostly("iq4_xs"), ladder=False),
    Quant("iq4_nl", 4.5, _mostly("iq4_nl"), ladder=False),
    Quant("q4_0", 4.5, _mostly("q4_0")),
    Quant("q4_1", 5.0, _mostly("q4_1")),
    Quant("q4_k_s", 4.6, _mostly("q4_k_s")),
    Quant("q4_k_m", 4.9, _mostly("q4_k_m")),
    Quant("q5_0", 5.5, _mostly("q5_0")),
    Quant("q5_1", 6.0, _mostly("q5_1")),
    Quant("q5_k_s", 5.5, _mostly("q5_k_s")),
    Quant("q5_k_m", 5.7, _mostly("q5_k_m")),
    Quant("q6_k", 6.6, _mostly("q6_k")),
    Quant("q8_0", 8.5, _mostly("q8_0")),
    Quant("bf16", 16.0, _mostly("bf16")),
    Quant("f16", 16.0, _mostly("f16")),
    Quant("f32", 32.0, "LLAMA_FTYPE_ALL_F32"),
)
AUTO = "auto"  # --quant auto: measure export.auto_quants with the quant gate and serve the smallest that passes
BY_NAME: dict[str, Quant] = {q.name: q for q in TABLE}
NAMES: tuple[str, ...] = tuple(BY_NAME)
LADDER: tuple[str, ...] = tuple(q.name for q in TABLE if q.ladder)


def bits_per_weight(name: str, default: float = 8.5) -> float:
    quant = BY_NAME.get(name)
    return quant.bits if quant else default


def smallest_first(names: list[str]) -> list[str]:
    """`names` by bits per weight, smallest first (the table's order between equals): how `auto` tries them."""
    order = {name: i for i, name in enumerate(NAMES)}
    return sorted(dict.fromkeys(names), key=lambda n: (bits_per_weight(n, 99.0), order.get(n, len(order))))
