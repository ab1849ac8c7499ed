"""Stands in for transformers' `tests/exporters/test_export.py`, which the sdist does not ship.

`ModelTesterMixin` inherits `ExportTesterMixin` for its export tests; `torch.export` and
`torch.compile(fullgraph=True)` of the TOT-CAKT models are tested in `tests/test_conformance.py` instead.
"""


class ExportTesterMixin:
    pass
