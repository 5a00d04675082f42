"""Segment names, colours and SNOMED CT codes from SegViz's terminology file, through Slicer's
Terminologies logic (the way SlicerTotalSegmentator labels its segments).

``Resources/Terminology/SegmentationCategoryTypeModifier-SegViz.term.json`` lists the four organs
in category *Anatomical Structure* (SCT 123037004), with the codes of ``SegVizLogic.organs`` and the
display colours of Slicer's own "3D Slicer General Anatomy list" (the unsplit kidney takes the
colour Slicer gives the left and right kidney). Loading it registers the context
``Segmentation category and type - SegViz``, so every Slicer tool (Segment Editor, the terminology
selector, DICOM SEG export) reads the segments right. The serialised entry is Slicer's own
``vtkSlicerTerminologiesModuleLogic.SerializeTerminologyEntry`` string::

    context~category~type~typeModifier~regionContext~region~regionModifier
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from SegVizLogic.organs import ANATOMICAL_STRUCTURE, KIDNEY_SIDE_MODIFIERS, ORGANS, Organ

from .resources import resource_file

__all__ = [
    "CONTEXT_NAME",
    "TERMINOLOGY_FILE",
    "OrganTerminology",
    "SegVizTerminology",
    "organ_of_terminology",
    "terminologies_logic",
]

TERMINOLOGY_FILE = "Terminology/SegmentationCategoryTypeModifier-SegViz.term.json"
CONTEXT_NAME = "Segmentation category and type - SegViz"

_HEADLESS_LOGIC = None


def terminologies_logic(slicer_module=None):
    """Slicer's Terminologies logic: the application's module logic inside Slicer (shared with
    every other module), else one ``vtkSlicerTerminologiesModuleLogic`` of this process (the bare
    MRML of the slicer-core wheel, which has no module registry)."""
    global _HEADLESS_LOGIC
    if slicer_module is None:
        import slicer as slicer_module
    modules = getattr(slicer_module, "modules", None)
    terminologies = getattr(modules, "terminologies", None) if modules is not None else None
    if terminologies is not None:
        return terminologies.logic()
    if _HEADLESS_LOGIC is None:
        _HEADLESS_LOGIC = slicer_module.vtkSlicerTerminologiesModuleLogic()
    return _HEADLESS_LOGIC


@dataclass(frozen=True)
class OrganTerminology:
    """What a segment of one organ (and side) carries."""

    organ: Organ
    side: str | None
    entry: str
    """Serialised terminology entry."""
    name: str
    """Segment name: the terminology's 3D Slicer label ("liver", "left kidney")."""
    colour: tuple[float, float, float]
    """Recommended display colour, RGB in [0, 1]."""


class SegVizTerminology:
    """The SegViz terminology, loaded once into a Terminologies logic.

    Args:
        logic: a ``vtkSlicerTerminologiesModuleLogic`` (default: :func:`terminologies_logic`).
        path: the ``.term.json`` (default: the module's resource).

    Raises:
        RuntimeError: Slicer cannot load the file, or it lacks an organ of the schema.

    Example::

        terminology = SegVizTerminology()
        liver = terminology.organ("liver")
        segment.SetName(liver.name); segment.SetColor(*liver.colour)
    """

    def __init__(self, logic=None, path: str | Path | None = None) -> None:
        import slicer

        self.logic = logic if logic is not None else terminologies_logic()
        self.path = Path(path) if path is not None else resource_file(TERMINOLOGY_FILE)
        if self.logic.IsTerminologyContextLoaded(CONTEXT_NAME) and path is None:
            self.context = CONTEXT_NAME
        else:
            self.context = self.logic.LoadTerminologyFromFile(str(self.path))
        if not self.context:
            raise RuntimeError(f"{self.path}: Slicer could not load the SegViz terminology")
        self._category = self._find_category(slicer)
        self._entries: dict[tuple[str, str | None], OrganTerminology] = {}
        for organ in ORGANS:
            sides = [None, *KIDNEY_SIDE_MODIFIERS] if organ.name == "kidney" else [None]
            for side in sides:
                self._entries[(organ.name, side)] = self._build(slicer, organ, side)

    def _find_category(self, slicer):
        category = slicer.vtkSlicerTerminologyCategory()
        for index in range(self.logic.GetNumberOfCategoriesInTerminology(self.context)):
            self.logic.GetNthCategoryInTerminology(self.context, index, category)
            if category.GetCodeValue() == ANATOMICAL_STRUCTURE[1]:
                return category
        raise RuntimeError(f"{self.path}: no '{ANATOMICAL_STRUCTURE[2]}' category")

    def _build(self, slicer, organ: Organ, side: str | None) -> OrganTerminology:
        entry = slicer.vtkSlicerTerminologyEntry()
        entry.SetTerminologyContextName(self.context)
        entry.GetCategoryObject().Copy(self._category)
        found = entry.GetTypeObject()
        for index in range(self.logic.GetNumberOfTypesInTerminologyCategory(self.context, self._category)):
            self.logic.GetNthTypeInTerminologyCategory(self.context, self._category, index, found)
            if found.GetCodeValue() == organ.snomed_code:
                break
        else:
            raise RuntimeError(f"{self.path}: no {organ.name} (SCT {organ.snomed_code})")
        shown = found
        if side is not None:
            modifier = entry.GetTypeModifierObject()
            code = KIDNEY_SIDE_MODIFIERS[side][1]
            count = self.logic.GetNumberOfTypeModifiersInTerminologyType(self.context, self._category, found)
            for index in range(count):
                self.logic.GetNthTypeModifierInTerminologyType(self.context, self._category, found, index, modifier)
                if modifier.GetCodeValue() == code:
                    break
            else:
                raise RuntimeError(f"{self.path}: no {side} modifier (SCT {code}) for {organ.name}")
            shown = modifier
        rgb = shown.GetRecommendedDisplayRGBValue()
        return OrganTerminology(
            organ=organ,
            side=side,
            entry=slicer.vtkSlicerTerminologiesModuleLogic.SerializeTerminologyEntry(entry),
            name=shown.GetSlicerLabel() or (organ.name if side is None else f"{side} {organ.name}"),
            colour=(rgb[0] / 255.0, rgb[1] / 255.0, rgb[2] / 255.0),
        )

    def organ(self, name: str, side: str | None = None) -> OrganTerminology:
        """The terminology of organ ``name`` (``side`` "left"/"right" for the kidney only).

        Raises:
            ValueError: an unknown organ or a side the organ does not have.
        """
        try:
            return self._entries[(name, side)]
        except KeyError:
            raise ValueError(f"no terminology for organ {name!r} side {side!r}") from None


def organ_of_terminology(entry: str) -> tuple[Organ | None, str | None]:
    """``(organ, side)`` coded by a serialised terminology entry, or ``(None, None)``.

    Only the type code (and its laterality modifier) counts, so segments coded in any context
    (this one, Slicer's General Anatomy, TotalSegmentator's) are recognised.
    """
    parts = (entry or "").split("~")
    if len(parts) < 3:
        return None, None
    type_code = parts[2].split("^")
    if len(type_code) < 2:
        return None, None
    organ = next((o for o in ORGANS if o.snomed_code == type_code[1]), None)
    side = None
    if organ is not None and len(parts) > 3:
        modifier = parts[3].split("^")
        if len(modifier) > 1:
            side = next((s for s, code in KIDNEY_SIDE_MODIFIERS.items() if code[1] == modifier[1]), None)
    return organ, side
