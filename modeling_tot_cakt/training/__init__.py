"""What builds a TOT-CAKT model and is not shipped with one.

Data sources and audio decoding (:mod:`.data`, :mod:`.audio`), transcript normalisation
(:mod:`.transcripts`), the CTC/teacher collator (:mod:`.collator`), the teacher-feature cache
(:mod:`.teacher_features`), the ``Trainer`` glue and CER metric (:mod:`.trainer`, ``metrics/cer``)
the Hub model card (:mod:`.model_card`) and the lock that keeps two runs out of one output directory
(:mod:`.output_lock`). ``train_hf.py`` at the repository root drives them.
"""
