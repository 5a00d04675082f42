"""Render Resources/UI/SegVizSlicer.ui to docs/slicer_panel_drawing.png without Slicer (a documentation tool).

Slicer's ctk/qMRML widgets are swapped for the nearest plain Qt widgets (ctkCollapsibleButton ->
QGroupBox, qMRMLNodeComboBox -> QComboBox with a sample node, ctkPathLineEdit -> QLineEdit) and the
panel is filled with the state it shows mid-way through a federated round, so a reader sees the
layout. Needs PySide6 (``pip install PySide6-Essentials``; not a SegViz dependency)::

    QT_QPA_PLATFORM=offscreen python docs/render_panel.py [--out docs/slicer_panel_drawing.png]
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
UI = REPO / "Resources" / "UI" / "SegVizSlicer.ui"

SUBSTITUTES = {
    "ctkCollapsibleButton": "QGroupBox",
    "qMRMLNodeComboBox": "QComboBox",
    "ctkPathLineEdit": "QLineEdit",
    "qMRMLWidget": "QWidget",
}
# Properties the substitutes do not have (QUiLoader would warn about each).
DROPPED = {
    "nodeTypes",
    "hideChildNodeTypes",
    "showChildNodeTypes",
    "noneEnabled",
    "addEnabled",
    "removeEnabled",
    "renameEnabled",
    "noneDisplay",
    "filters",
    "nameFilters",
    "collapsed",
}

SAMPLE_TEXT = {
    "modelPathLineEdit": "~/SegViz/models/segviz-fedbn-round10.segviz",
    "siteFolderPathLineEdit": "~/SegViz/sites/site-a",
    "rootCertPathLineEdit": "~/SegViz/federation/ca.crt",
    "trustFilePathLineEdit": "~/SegViz/federation/federation-trust.yaml",
    "nodeKeyPathLineEdit": "~/SegViz/federation/node.key",
    "siteNameLineEdit": "site-a",
    "superlinkLineEdit": "fl.hospital-network.example:9093",
}
SAMPLE_COMBO = {
    "inputVolumeSelector": "Abdomen CT 0042",
    "outputSegmentationSelector": "Abdomen CT 0042 organs",
    "caseVolumeSelector": "Abdomen CT 0042",
    "caseSegmentationSelector": "Abdomen CT 0042 organs",
}


def plain_qt_ui(path: Path) -> bytes:
    """The .ui with Slicer widget classes replaced by plain Qt ones."""
    tree = ET.parse(path)
    root = tree.getroot()
    for widget in root.iter("widget"):
        cls = widget.get("class")
        if cls in SUBSTITUTES:
            widget.set("class", SUBSTITUTES[cls])
            if cls == "ctkCollapsibleButton":
                for prop in widget.findall("property"):
                    if prop.get("name") == "text":
                        prop.set("name", "title")
        for prop in list(widget.findall("property")):
            if prop.get("name") in DROPPED or prop.get("stdset") == "0":
                widget.remove(prop)
    for tag in ("customwidgets", "connections"):
        for element in root.findall(tag):
            root.remove(element)
    out = io.BytesIO()
    tree.write(out, encoding="utf-8", xml_declaration=True)
    return out.getvalue()


def fill_sample_state(panel, QtWidgets) -> None:
    """Put the panel in the state it shows during round 3 of a 10-round federation."""
    find = lambda name, cls=QtWidgets.QWidget: panel.findChild(cls, name)
    for name, text in SAMPLE_TEXT.items():
        find(name).setText(text)
    for name, text in SAMPLE_COMBO.items():
        combo = find(name)
        combo.addItem(text)
    find("modelInfoLabel").setText(
        "Organs: liver, spleen, pancreas, kidney\n"
        "Trained by: site-a, site-b, site-c, site-d (fedbn, 10 federated rounds)\nCreated: 2026-11-20\n"
        "Validation Dice: liver 0.91, spleen 0.87, pancreas 0.58, kidney 0.89"
    )
    find("modelSignatureLabel").setText("signed by the federation's coordinator")
    find("unsupportedLabel").hide()
    find("splitKidneyCheckBox").setChecked(True)
    find("applyButton").setEnabled(True)
    find("reviewButton").setEnabled(True)
    find("applyProgressBar").setValue(100)
    find("applyStatusLabel").setText("5 organ segments loaded")
    volumes = find("organVolumesTable")
    rows = [
        ("liver", "1625.4"),
        ("spleen", "212.9"),
        ("pancreas", "78.3"),
        ("left kidney", "168.0"),
        ("right kidney", "159.6"),
    ]
    volumes.setRowCount(len(rows))
    for r, (organ, ml) in enumerate(rows):
        volumes.setItem(r, 0, QtWidgets.QTableWidgetItem(organ))
        volumes.setItem(r, 1, QtWidgets.QTableWidgetItem(ml))
    volumes.resizeColumnsToContents()
    volumes.horizontalHeader().setStretchLastSection(True)
    cases = find("casesTable")
    case_rows = [
        ("Abdomen_CT_0003", "liver, kidney"),
        ("Abdomen_CT_0005", "liver, kidney"),
        ("Abdomen_CT_0007", "liver (kidney absent)"),
    ]
    cases.setRowCount(len(case_rows))
    for r, row in enumerate(case_rows):
        for c, text in enumerate(row):
            cases.setItem(r, c, QtWidgets.QTableWidgetItem(text))
    cases.resizeColumnsToContents()
    cases.horizontalHeader().setStretchLastSection(True)
    for organ in ("liver", "kidney"):
        find(f"{organ}CheckBox").setChecked(True)
    join = find("joinButton")
    join.setEnabled(True)
    join.setText("Leave")
    find("federationStateLabel").setText("Connected, training")
    find("roundLabel").setText("Round 3 of 10")
    find("epochLabel").setText("Local epoch 1 of 2, loss 0.4172")
    find("roundTimeLabel").setText("2 min 10 s so far")
    find("globalDiceLabel").setText("liver 0.912, spleen 0.874, pancreas 0.583, kidney 0.887")
    bar = find("federationProgressBar")
    bar.setRange(0, 10)
    bar.setValue(3)
    bar.setFormat("%v / %m rounds")
    find("federationLogTextEdit").setPlainText(
        "Joining the federation at fl.hospital-network.example:9093…\nconnected superlink=fl.hospital-network.example:9093\nround_started round=3 rounds=10\nepoch epoch=1 epochs=2 loss=0.4172"
    )
    find("dependenciesStatusLabel").setText("All Python packages SegViz needs are installed.")
    find("dependenciesCollapsibleButton").setVisible(True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "slicer_panel_drawing.png")
    parser.add_argument("--width", type=int, default=470)
    args = parser.parse_args(argv)

    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6 import QtCore, QtWidgets
    from PySide6.QtUiTools import QUiLoader

    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication(sys.argv[:1])
    app.setStyle("Fusion")
    buffer = QtCore.QBuffer()
    buffer.setData(QtCore.QByteArray(plain_qt_ui(UI)))
    buffer.open(QtCore.QIODevice.ReadOnly)
    panel = QUiLoader().load(buffer)
    if panel is None:
        raise SystemExit(f"could not load {UI}")
    fill_sample_state(panel, QtWidgets)
    panel.setWindowTitle("SegViz")
    panel.resize(args.width, 400)
    panel.adjustSize()
    panel.resize(args.width, panel.sizeHint().height())
    panel.show()
    panel.setFocus()
    app.processEvents()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if not panel.grab().save(str(args.out)):
        raise SystemExit(f"could not write {args.out}")
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
