"""Numbers from a model's outputs: metrics, bootstrap intervals, calibration, the test report, comparisons.

Nothing here decodes a photo or trains; ``evaluate`` (the CLI verbs) alone runs a checkpoint, through
:mod:`retino.training`'s loaders, to make the outputs the rest reads.
"""
