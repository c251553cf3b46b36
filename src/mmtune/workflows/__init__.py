"""Workflows: how a recipe becomes training runs, and the one runner they share.

A workflow (:class:`~mmtune.workflows.base.Workflow`, registered by name in
:data:`mmtune.registry.WORKFLOWS`) turns a recipe into its runs: ``causal`` (a causal LM: SFT,
continued pretraining, DPO), ``multimodal`` (encoders composed with an LLM, trained in stages),
``encoder`` (BERT-family objectives and heads) and ``continual`` (a task sequence with a strategy).
A new workflow is one file: a :class:`Workflow` subclass decorated with
``@WORKFLOWS.register(name)``, its name added to the lazy entries in :mod:`mmtune.registry` and to
``workflow:`` in the schema.

:func:`~mmtune.workflows.run.run_recipe` owns what every run shares: the output directory
(``--resume``, ``--overwrite``), the stop flag, the log, the distributed set-up (refused clearly
for a workflow that does not declare ``supports_distributed``), the summary line and the result's
``final_dir``. ``mmtune train``, ``mmtune continual``, the web UI's Train tab and ``mmtune eval``
(:func:`~mmtune.workflows.run.eval_recipe`) all go through it. Import the submodules directly.
"""
