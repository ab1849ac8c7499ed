"""Character error rate as a local `evaluate` module, loadable offline by path:
`evaluate.load("<package>/metrics/cer")`. Same inputs and output as the Hub's `cer` metric."""

import datasets
import evaluate
import jiwer

_CITATION = """\
@inproceedings{morris2004,
  author = {Morris, Andrew and Maier, Viktoria and Green, Phil},
  year = {2004},
  title = {From WER and RIL to MER and WIL: improved evaluation measures for connected speech recognition.}
}
"""

_DESCRIPTION = """\
Character error rate (CER): the character-level edit distance between predictions and references,
divided by the number of reference characters, (S + D + I) / N. Computed over the whole corpus
(edits and reference lengths are summed over all pairs) with jiwer. Lower is better; it can exceed 1
when the predictions contain many insertions.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): transcriptions to score.
    references (`list[str]`): reference transcriptions, one per prediction, none of them empty.
Returns:
    `float`: the corpus-level character error rate.
Examples:
    >>> cer = evaluate.load("modeling_tot_cakt/metrics/cer")
    >>> cer.compute(predictions=["今天天汽好"], references=["今天天气很好"])
    0.3333333333333333
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CER(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("string", id="sequence"),
                    "references": datasets.Value("string", id="sequence"),
                }
            ),
            codebase_urls=["https://github.com/jitsi/jiwer/"],
            reference_urls=["https://en.wikipedia.org/wiki/Word_error_rate"],
        )

    def _compute(self, predictions, references):
        empty = [index for index, reference in enumerate(references) if not reference]
        if empty:
            raise ValueError(
                f"CER is undefined for empty references; references {empty[:10]} are empty. "
                "Drop utterances without transcript before scoring."
            )
        return jiwer.cer(list(references), list(predictions))
