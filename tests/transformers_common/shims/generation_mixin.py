"""Stands in for transformers' `tests/generation/test_utils.py`, which the sdist does not ship.

`ModelTesterMixin` only checks whether a test class inherits `GenerationTesterMixin` (it must exactly
when the model can `generate`); CTC models do not generate, so the marker class is all that is needed.
"""


class GenerationTesterMixin:
    pass
