"""The organ schema: the single source of truth for label values, names, codes and colours."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ANATOMICAL_STRUCTURE",
    "KIDNEY_SIDE_MODIFIERS",
    "ORGANS",
    "ORGAN_NAMES",
    "Organ",
    "organ_by_label",
    "organ_by_name",
    "parse_organ_list",
]

# SNOMED CT category of every SegViz segment ("Anatomical Structure").
ANATOMICAL_STRUCTURE = ("SCT", "123037004", "Anatomical Structure")
# SNOMED CT laterality modifiers used when the kidney is split by side.
KIDNEY_SIDE_MODIFIERS = {"left": ("SCT", "7771000", "Left"), "right": ("SCT", "24028007", "Right")}


@dataclass(frozen=True)
class Organ:
    """One organ of the schema.

    Args:
        label: value of the organ in SegViz label maps (1..4; 0 is background).
        name: lower-case name used on the command line, in site.json and as segment name.
        snomed_code: SNOMED CT code of the organ (category 123037004 Anatomical Structure).
        snomed_meaning: SNOMED CT code meaning, as Slicer terminology shows it.
        colour: RGB 0..255, as in Slicer's generic anatomy colour table.
    """

    label: int
    name: str
    snomed_code: str
    snomed_meaning: str
    colour: tuple[int, int, int]

    @property
    def colour_float(self) -> tuple[float, float, float]:
        """Colour as RGB floats in [0, 1] (what VTK and matplotlib take)."""
        return tuple(c / 255.0 for c in self.colour)  # type: ignore[return-value]


ORGANS: tuple[Organ, ...] = (
    Organ(1, "liver", "10200004", "Liver", (221, 130, 101)),
    Organ(2, "spleen", "78961009", "Spleen", (157, 108, 162)),
    Organ(3, "pancreas", "15776009", "Pancreas", (249, 180, 111)),
    Organ(4, "kidney", "64033007", "Kidney", (212, 126, 151)),
)

ORGAN_NAMES: tuple[str, ...] = tuple(o.name for o in ORGANS)

_BY_NAME = {o.name: o for o in ORGANS}
_BY_LABEL = {o.label: o for o in ORGANS}


def organ_by_name(name: str) -> Organ:
    """Return the organ called ``name`` (case-insensitive).

    Raises:
        ValueError: ``name`` is not one of liver, spleen, pancreas, kidney.
    """
    try:
        return _BY_NAME[name.strip().lower()]
    except KeyError:
        raise ValueError(f"unknown organ {name!r}: expected one of {', '.join(ORGAN_NAMES)}") from None


def organ_by_label(label: int) -> Organ:
    """Return the organ with label value ``label``.

    Raises:
        ValueError: no organ has that label value.
    """
    try:
        return _BY_LABEL[int(label)]
    except KeyError:
        raise ValueError(f"no organ has label value {label!r}: expected 1..{len(ORGANS)}") from None


def parse_organ_list(text: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Parse ``"liver,spleen"`` (or a list of names) into schema-ordered organ names.

    Raises:
        ValueError: an unknown organ name or an empty list.
    """
    names = text.split(",") if isinstance(text, str) else list(text)
    wanted = {organ_by_name(n).name for n in names if n.strip()}
    if not wanted:
        raise ValueError("no organ given: expected one or more of " + ", ".join(ORGAN_NAMES))
    return tuple(n for n in ORGAN_NAMES if n in wanted)
