"""BERT-family encoders: pretraining objectives and downstream heads on transformers' models.

- Pretraining (``objective:`` in a recipe): ``mlm`` (masked LM; static or dynamic masks, optional
  whole-word masking), ``mlm_nsp`` (MLM + next-sentence prediction, BERT), ``mlm_sop`` (MLM +
  sentence-order prediction, ALBERT), ``electra`` (generator MLM + replaced-token detection).
- Downstream: ``classify`` (sequence classification from [CLS] or mean pooling), ``qa``
  (extractive QA, EM/F1), ``similarity_cross`` (cross-encoder regression) and ``similarity_bi``
  (bi-encoder with a contrastive cosine loss), all scored with Spearman where it fits.

Entry points: :func:`mmtune.encoders.run.run_encoder_recipe` (``mmtune train``) and
:func:`mmtune.encoders.run.eval_encoder` (``mmtune eval``). This package's ``__init__`` stays free
of imports: ``mmtune.config`` imports :mod:`mmtune.encoders.config` while it is being built, and
the objectives are registered by ``mmtune.train.objectives.register_all``.
"""

ENCODER_OBJECTIVES = ("mlm", "mlm_nsp", "mlm_sop", "electra", "classify", "qa", "similarity_cross",
                      "similarity_bi")
