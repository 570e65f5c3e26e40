"""One photo, one answer: a run's choices read once (``choices``), its model (``trained``), the one
grading path (``grading``) that Predict and Screen share, the quality gate (``quality``, ``ood``), maps
(``explain``, ``pointing``) and the deployable export (``export``)."""
