"""Composition of any causal LM with modality paths: the names of the composed model in one place.

The language model is untouched transformers code; images and audio enter it as input
embeddings (the LLaVA / Phi-4 / InternVL design,
docs/reference/multimodal.md#composition-through-input-embeddings):

1. the tokenizer gains one special token per modality (``<|image|>``, ``<|audio|>``; embeddings
   resized); each ``<image>`` / ``<audio>`` tag of a prompt becomes a run of exactly as many of
   them as the image or clip has feature tokens, known before the encoders run;
2. each modality path turns its items into LM-width features: images are tiled and go through
   the vision tower and projector, clips become log-Mel features and go through the audio
   encoder and the projector the router picked (speech, or vision-speech for image+audio);
3. the LM's input embeddings at placeholder positions are replaced by those features, in order,
   and the LM runs on ``inputs_embeds`` with the router's adapter active.

Where each idea lives:

============================  =================================================================
:mod:`.composed`              :class:`ComposedModel` (paths in an ``nn.ModuleDict``), forward,
                              :func:`parameter_counts` (generation: :mod:`mmtune.inference`)
:mod:`.modalities`            the :class:`ModalityPath` abstraction and the MODALITIES registry;
                              :mod:`.modalities.image`, :mod:`.modalities.audio`: one per modality
:mod:`.embedding`             features scattered over placeholder embeddings
:mod:`.router`, :mod:`.groups`  routing groups and the adapter per group
:mod:`.adapters`              the LM's modality LoRAs, encoder LoRA, placeholder tokens
:mod:`.build`                 :func:`compose`, :func:`build_composed_model`, :func:`tiny_composed`
:mod:`.checkpoint`            the saved layout (:meth:`ComposedModel.save`)
:mod:`.loading`               :func:`load_composed`, :func:`find_composed`, :func:`merge_composed`
============================  =================================================================

Every name is importable from here as before the split.
"""

from __future__ import annotations

from .adapters import add_adapters, add_placeholder_tokens, inject_encoder_lora  # noqa: F401
from .build import build_composed_model, compose, tiny_composed  # noqa: F401
from .checkpoint import CONFIG_FILE, FORMAT, FORMAT_VERSION, PROCESSOR_FILE  # noqa: F401
from .composed import ComposedModel, ComposedOutput, parameter_counts  # noqa: F401
from .groups import AUDIO_TAG, IMAGE_TAG  # noqa: F401
from .loading import find_composed, load_composed, merge_composed  # noqa: F401
from .modalities import MODALITIES, ModalityPath  # noqa: F401
from .modalities.audio import BUILTIN_AUDIO, AudioInput, AudioPath, AudioProcessor, build_audio_encoder  # noqa: F401
from .modalities.image import BUILTIN_VISION, ImageInput, ImagePath, ImageProcessor, build_vision_tower  # noqa: F401

#: Component names of the built-in modalities; ``llm`` is :attr:`ComposedModel.language_model`.
ENCODER_COMPONENTS = (*ImagePath.COMPONENTS, *AudioPath.COMPONENTS)
