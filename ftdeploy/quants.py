"""The llama.cpp types ftdeploy can export, in one table: what config accepts, what the quantizer is asked for,
what the disk estimate assumes and which way the quant gate steps when a type is too lossy.

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
    ladder: bool = True  # on the safer-type ladder the quant gate recommends from
    recommended: bool = False  # a step the gate may recommend (the _m types, q6_k, q8_0, f16)


def _mostly(name: str) -> str:
    return f"LLAMA_FTYPE_MOSTLY_{name.upper()}"


# Ordered from the smallest (most lossy) to the largest; the gate steps up this order.
TABLE: tuple[Quant, ...] = (
    Quant("tq1_0", 1.69, _mostly("tq1_0"), ladder=False),
    Quant("tq2_0", 2.06, _mostly("tq2_0"), ladder=False),
    Quant("q2_k", 3.4, _mostly("q2_k")),
    Quant("q3_k_s", 3.5, _mostly("q3_k_s")),
    Quant("q3_k_m", 3.9, _mostly("q3_k_m"), recommended=True),
    Quant("q3_k_l", 4.3, _mostly("q3_k_l")),
    Quant("iq4_xs", 4.25, _mostly("iq4_xs"), ladder=False),
    Quant("iq4_nl", 4.5, _mostly("iq4_nl"), ladder=False),
    Quant("q4_0", 4.5, _mostly("q4_0")),
    Quant("q4_1", 5.0, _mostly("q4_1")),
    Quant("q4_k_s", 4.6, _mostly("q4_k_s")),
    Quant("q4_k_m", 4.9, _mostly("q4_k_m"), recommended=True),
    Quant("q5_0", 5.5, _mostly("q5_0")),
    Quant("q5_1", 6.0, _mostly("q5_1")),
    Quant("q5_k_s", 5.5, _mostly("q5_k_s")),
    Quant("q5_k_m", 5.7, _mostly("q5_k_m"), recommended=True),
    Quant("q6_k", 6.6, _mostly("q6_k"), recommended=True),
    Quant("q8_0", 8.5, _mostly("q8_0"), recommended=True),
    Quant("bf16", 16.0, _mostly("bf16")),
    Quant("f16", 16.0, _mostly("f16"), recommended=True),
    Quant("f32", 32.0, "LLAMA_FTYPE_ALL_F32"),
)
BY_NAME: dict[str, Quant] = {q.name: q for q in TABLE}
NAMES: tuple[str, ...] = tuple(BY_NAME)
LADDER: tuple[str, ...] = tuple(q.name for q in TABLE if q.ladder)


def bits_per_weight(name: str, default: float = 8.5) -> float:
    quant = BY_NAME.get(name)
    return quant.bits if quant else default


def next_safer(name: str) -> str | None:
    """The type the quant gate recommends after `name` fails it: the next recommended step up the ladder
    (q8_0 for a type off the ladder), None above f16."""
    if name not in LADDER:
        return "q8_0"
    above = LADDER[LADDER.index(name) + 1:]
    return next((q for q in above if BY_NAME[q].recommended), None)
