"""The ICDR severity scale (Wilkinson et al. 2003, as in ANCHORS.md): grade numbers, names, descriptions.

One definition of each fact every other module and page quotes: the short names the charts and
tables use, the long names and descriptions the Predict page shows, the referable grade and the
regression head's starting cut points.
"""
from __future__ import annotations

GRADES = (0, 1, 2, 3, 4)
GRADE_NAMES = ("No DR", "Mild", "Moderate", "Severe", "Proliferative")  # short, for axes and tables
GRADE_INFO: dict[int, dict[str, str]] = {
    0: {"name": "No apparent retinopathy", "description": "No abnormalities."},
    1: {"name": "Mild NPDR", "description": "Microaneurysms only."},
    2: {"name": "Moderate NPDR", "description": "More than microaneurysms (haemorrhages, hard exudates, "
                                                "cotton-wool spots) but less than severe NPDR."},
    3: {"name": "Severe NPDR", "description": "More than 20 haemorrhages in each of 4 quadrants, venous beading "
                                              "in 2 or more quadrants, or IRMA in 1 or more (the 4-2-1 rule); "
                                              "no signs of proliferation."},
    4: {"name": "Proliferative DR", "description": "Neovascularisation, or vitreous or preretinal haemorrhage."},
}
REFERABLE_GRADE = 2  # a patient is referred from moderate NPDR up (referable DR)
# A regress head's score is cut into grades halfway between them until thresholds are fitted to it.
DEFAULT_THRESHOLDS = (0.5, 1.5, 2.5, 3.5)


def grade_label(grade: int) -> str:
    """``"2 Moderate"``: the number and the short name."""
    return f"{int(grade)} {GRADE_NAMES[int(grade)]}"
