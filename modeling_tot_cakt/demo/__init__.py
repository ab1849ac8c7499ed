"""The offline toolkit behind ``make demo``: ``python -m modeling_tot_cakt.demo``.

Chinese text from installed packages (:mod:`.text_sources`), Mandarin speech synthesis with
espeak-ng (:mod:`.synthesis`), pretraining of a small character BERT teacher
(:mod:`.teacher_pretraining`), the demo's orchestration (:mod:`.run_demo`) and its presets
(``recipes/``). Nothing here is needed to load or run a trained model.
"""
