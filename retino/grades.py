"""The ICDR grades 0-4: numbers, names, descriptions, and which are referable (ANCHORS.md)."""
GRADE_NAMES = ("No DR", "Mild", "Moderate", "Severe", "Proliferative")
REFERABLE_GRADE = 2
DEFAULT_THRESHOLDS = (0.5, 1.5, 2.5, 3.5)
