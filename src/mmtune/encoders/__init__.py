"""BERT-family encoders: pretraining objectives and downstream heads on transformers' models.

- Pretraining (``objective:`` in a recipe): ``mlm`` (masked LM; static or dynamic masks, optional
  whole-word masking), ``mlm_nsp`` (MLM + next-sentence prediction, BERT), ``mlm_sop`` (MLM +
  sentence-order prediction, ALBERT), ``electra`` (generator MLM + replaced-token detection).
- Downstream: ``classify`` (sequence classification from [CLS] or mean pooling), ``qa``
  (extractive QA, EM/F1), ``similarity_cross`` (cross-encoder regression) and ``similarity_bi``
  (bi-encoder with a contrastive cosine loss), all scored with Spearman where it fits.

Entry points: :func:`mmtune.encoders.run.run_encoder_recipe` (``mmtune train``) and
:func:`mmtune.encoders.run.eval_encoder` (``mmtune eval``). This package's ``__init__`` imports only
the torch-free registry: ``mmtune.config`` imports :mod:`mmtune.encoders.config`, and the objectives
are registered when :data:`mmtune.registry.OBJECTIVES` first looks one of their names up.
"""

from ..registry import ENCODER_OBJECTIVES  # noqa: E402,F401 - the names, declared with the registry
