"""Organ schema: values, codes and colours as the architecture fixes them."""

from __future__ import annotations

import pytest

from SegVizLogic.organs import ORGAN_NAMES, ORGANS, organ_by_label, organ_by_name, parse_organ_list

# [label, name, SNOMED code, colour]
TEST_CASES = [
    [1, "liver", "10200004", (221, 130, 101)],
    [2, "spleen", "78961009", (157, 108, 162)],
    [3, "pancreas", "15776009", (249, 180, 111)],
    [4, "kidney", "64033007", (212, 126, 151)],
]


@pytest.mark.parametrize("label, name, code, colour", TEST_CASES)
def test_schema_entries(label, name, code, colour):
    organ = organ_by_name(name)
    assert (organ.label, organ.snomed_code, organ.colour) == (label, code, colour)
    assert organ_by_label(label) is organ


def test_schema_order_and_lookup_errors():
    assert ORGAN_NAMES == ("liver", "spleen", "pancreas", "kidney")
    assert [o.label for o in ORGANS] == [1, 2, 3, 4]
    assert organ_by_name(" Liver ").name == "liver"
    with pytest.raises(ValueError, match="unknown organ 'lung'"):
        organ_by_name("lung")
    with pytest.raises(ValueError, match="no organ has label value 7"):
        organ_by_label(7)
    assert parse_organ_list("kidney,liver") == ("liver", "kidney")
    with pytest.raises(ValueError):
        parse_organ_list(" , ")


def test_cli_organs_lists_schema(capsys):
    from SegVizLogic.cli import main

    assert main(["organs"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split() == ["1", "liver", "10200004", "221,130,101"]
    assert out[4].split() == ["4", "kidney", "64033007", "212,126,151"]
