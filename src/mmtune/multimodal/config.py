"""The ``multimodal`` section of a recipe: encoders, projectors, modality adapters, router, stages.

A recipe with this section trains a :class:`~mmtune.multimodal.model.ComposedModel`: the causal
LM of ``model.path`` plus an optional vision tower and an optional audio encoder, each joined to
the LM by a projector, and LoRA adapters that a router picks per input modality (Phi-4-multimodal's
"mixture of LoRAs", docs/reference/multimodal.md#modality-loras). Training runs ``stages`` in order, each a full
training run of its own that declares what trains (``frozen | lora | full`` per component) and
with which learning rate; the recipe's ``train`` section gives the defaults every stage starts
from, ``data`` the chat template, length and packing policy.

Validation of names (adapters, router targets, projectors, components) lives here, so a typo
fails before any model is built.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from ..registry import PROJECTORS, did_you_mean
from ..schema import Section

#: The decoder linears of Phi-4-mini that both Phi-4-multimodal LoRAs adapt (docs/reference/multimodal.md#modality-loras).
PHI4_LORA_TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]

Mode = Literal["frozen", "lora", "full"]
ProjectorMode = Literal["frozen", "full"]


class TinyVisionConfig(Section):
    """Geometry of ``vision.path: builtin:tiny-siglip``: a randomly initialised SigLIP tower built in
    code (no download). The defaults see 64 px crops as an 8x8 patch grid, 4x4 tokens per crop
    after Phi-4's 2x2 pooling: enough to tell shapes, colours, positions and large letters apart."""

    image_size: int = Field(64, gt=0, description="Crop side in pixels the tower is built for.")
    patch_size: int = Field(8, gt=0, description="Patch side in pixels.")
    hidden: int = Field(64, gt=0, description="Width of the tower (the projector's input width).")
    layers: int = Field(3, gt=0, description="Encoder layers (the feature layer -2 keeps all but the last).")
    heads: int = Field(4, gt=0, description="Attention heads; must divide hidden.")
    seed: int = Field(0, description="Seed of the random initialisation.")


class VisionConfig(Section):
    path: str = Field("builtin:tiny-siglip", description="Local directory of a SigLIP / CLIP / ViT vision model "
                      "(or a full CLIP/SigLIP checkpoint: its vision half is used), or `builtin:tiny-siglip`.")
    feature_layer: int = Field(-2, description="Hidden-state index the features come from: -2 (penultimate, "
                               "LLaVA-1.5 and Phi-4) or -1 (last, InternVL).")
    tiling: Literal["phi4", "internvl"] = Field("phi4", description="Dynamic high-resolution tiling: `phi4` "
                                                "(aspect-preserving crops padded white + a global view) or "
                                                "`internvl` (stretched tiles + a thumbnail).")
    crop_size: int | None = Field(None, gt=0, description="Crop / tile side in pixels (Phi-4 and InternVL: 448). "
                                  "Default: the tower's image size.")
    max_crops: int = Field(16, gt=0, description="Most sub-image crops per image (Phi-4: 16 pretraining, 36 SFT; "
                           "InternVL `max_num`: 12, 6 in its fine-tuning scripts).")
    min_crops: int = Field(1, gt=0, description="InternVL `min_num`: fewest tiles per image.")
    projector: str = Field("phi4_avgpool", description="Projector name in mmtune.multimodal.projectors.PROJECTORS: "
                           "phi4_avgpool | internvl_pixel_shuffle | mlp2x_gelu.")
    lora: AdapterSpec | None = Field(None, description="LoRA settings for stages that set vision_encoder: lora "
                                     "(`name` is ignored; always active, never routed).")
    tiny: TinyVisionConfig = Field(default_factory=TinyVisionConfig, description="Geometry of builtin:tiny-siglip.")

    @field_validator("projector")
    @classmethod
    def _known_projector(cls, v: str) -> str:
        PROJECTORS.check(v)
        return v

    @model_validator(mode="after")
    def _tiler_fits_projector(self) -> VisionConfig:
        if self.projector == "phi4_avgpool" and self.tiling != "phi4":
            raise ValueError("projector phi4_avgpool lays out Phi-4's sub-crops + global view and needs "
                             "tiling: phi4; use internvl_pixel_shuffle or mlp2x_gelu with tiling: internvl")
        if self.min_crops > self.max_crops:
            raise ValueError(f"min_crops {self.min_crops} > max_crops {self.max_crops}")
        return self


class AudioConfig(Section):
    encoder: Literal["conformer", "whisper"] = Field("conformer", description="Audio encoder kind (the "
                                                     "AUDIO_ENCODERS registry): conformer (Phi-4 geometry, x8 "
                                                     "subsampling, 80 ms per token) or whisper (x2, 20 ms).")
    path: str = Field("builtin:tiny-conformer", description="`builtin:tiny-conformer` (random init with the "
                      "settings below), a directory written by save_conformer, or a local Whisper checkpoint "
                      "directory (encoder: whisper).")
    features: Literal["log_mel", "phi4_log_mel"] = Field("log_mel", description="Conformer input features: "
                                                         "phi4_log_mel = Phi-4-multimodal's feature extractor "
                                                         "(use it with Phi-4 audio weights and in Phi-4 recipes); "
                                                         "log_mel = a plain HTK log-Mel (Hann window, ln floor "
                                                         "1e-10), librosa/torchaudio-style, for encoders trained "
                                                         "from scratch on it. Same frame grid, not interchangeable "
                                                         "(mean difference ~20). Whisper always uses its own "
                                                         "feature extractor.")
    d_model: int = Field(64, gt=0, description="builtin:tiny-conformer width (Phi-4: 1024).")
    n_layers: int = Field(2, gt=0, description="builtin:tiny-conformer blocks (Phi-4: 24).")
    n_heads: int = Field(4, gt=0, description="builtin:tiny-conformer attention heads (Phi-4: 16).")
    ffn_dim: int = Field(128, gt=0, description="builtin:tiny-conformer gated FFN size (Phi-4: 1536).")
    conv_kernel: int = Field(3, gt=0, description="builtin:tiny-conformer depthwise kernel (Phi-4: 3).")
    subsampling_channels: int | None = Field(32, gt=0, description="builtin:tiny-conformer subsampling channels "
                                             "(Phi-4: 1024; null: d_model).")
    seed: int = Field(0, description="Seed of the builtin encoder's random initialisation.")
    projector: str = Field("mlp2x_gelu", description="Projector for audio tokens (Phi-4: Linear(1024,3072)-GELU-"
                           "Linear(3072,3072) = mlp2x_gelu); each clip is fed as a 1 x T grid.")
    lora: AdapterSpec | None = Field(None, description="LoRA settings for stages that set audio_encoder: lora.")

    @field_validator("projector")
    @classmethod
    def _known_projector(cls, v: str) -> str:
        PROJECTORS.check(v)
        if v != "mlp2x_gelu":
            raise ValueError(f"audio projector '{v}' works on 2-D image grids; audio uses mlp2x_gelu")
        return v


class AdapterSpec(Section):
    """One LoRA adapter of the language model (PEFT). Phi-4-multimodal: vision r=256 alpha=512
    dropout 0; speech r=320 alpha=640 dropout 0.01; both on qkv_proj, o_proj, gate_up_proj,
    down_proj of all 32 layers (docs/reference/multimodal.md#modality-loras)."""

    name: str = Field(description="Adapter name, used by the router and the stages (e.g. vision, speech).")
    r: int = Field(16, gt=0, description="LoRA rank.")
    alpha: float = Field(32, gt=0, description="LoRA alpha; the update is scaled by alpha/r.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    targets: str | list[str] = Field("all-linear", description="Module names to adapt, or `all-linear` (every "
                                     "linear layer of the decoder except the output head). Phi-4: qkv_proj, "
                                     "o_proj, gate_up_proj, down_proj.")


class RouterConfig(Section):
    """Which adapter each modality group uses (one per sample). A value is an adapter name, `none`
    (the base model, adapters disabled) or `auto`. Phi-4-multimodal: text -> none, image -> vision,
    audio -> speech, image+audio -> vision (the audio then goes through the vision-speech projector)."""

    text: str = Field("none", description="Text-only samples: `none` keeps the base model exactly (text "
                      "ability cannot degrade), or a text adapter's name.")
    image: str = Field("auto", description="Image samples. `auto`: the adapter named `vision` if there is one, "
                       "else none.")
    audio: str = Field("auto", description="Audio samples. `auto`: the adapter named `speech`, else none.")
    image_audio: str = Field("auto", description="Samples with image and audio. `auto`: the image group's "
                             "adapter.")


class Trainability(Section):
    """What trains in a stage, per component (torchtune TrainableParams): frozen | lora | full."""

    vision_encoder: Mode = Field("frozen", description="The vision tower (lora needs vision.lora).")
    vision_projector: ProjectorMode = Field("frozen", description="The image projector.")
    audio_encoder: Mode = Field("frozen", description="The audio encoder (lora needs audio.lora).")
    audio_projector: ProjectorMode = Field("frozen", description="The speech projector (audio-only samples).")
    audio_projector_vs: ProjectorMode = Field("frozen", description="The vision-speech projector (audio of "
                                              "samples that also have an image).")
    llm: Mode = Field("frozen", description="The language model: lora trains the stage's `adapter`; full "
                      "trains the base weights (adapters stay as they are).")


#: The trainable components of a composed model, in the order stages list them: the fields of
#: :class:`Trainability`. A modality's components are named ``<section>_<part>`` after the
#: ``multimodal`` section that configures them (``vision_encoder`` needs ``vision``).
COMPONENTS = tuple(Trainability.model_fields)


class MMSourceConfig(Section):
    path: str = Field(description="LLaVA-style JSON/JSONL (conversations with <image>/<audio> tags, `image` / "
                      "`audio` file fields) or OpenAI-style messages with image_url / input_audio parts.")
    data_root: str | None = Field(None, description="Directory image/audio paths are relative to, and confined "
                                  "to. Default: the directory of `path`.")
    format: Literal["auto", "llava", "openai"] = Field("auto", description="Record format; auto detects "
                                                        "`conversations` (llava) or `messages` (openai).")
    max_records: int | None = Field(None, gt=0, description="Use at most this many records.")
    repeat: float = Field(1.0, gt=0, description="Times the source is used per epoch (fractions sample).")


class StageConfig(Section):
    name: str = Field(description="Stage name (output subdirectory, logs, report).")
    sources: list[MMSourceConfig] = Field(description="Training data of this stage.")
    eval_sources: list[MMSourceConfig] = Field(default_factory=list, description="Held-out data for eval loss.")
    trainable: Trainability = Field(default_factory=Trainability, description="Per-component trainability.")
    adapter: str | None = Field(None, description="The LLM adapter that trains when trainable.llm is lora.")
    lr: dict[str, float] = Field(default_factory=dict, description="Learning rate per component (keys: "
                                 "vision_encoder, vision_projector, audio_encoder, audio_projector, "
                                 "audio_projector_vs, llm); others use train.lr.")
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps of this stage (default: train.max_steps, "
                                  "else train.epochs over the stage's data).")
    epochs: float | None = Field(None, gt=0, description="Passes over the stage's data (default: train.epochs).")
    batch_size: int | None = Field(None, gt=0, description="Micro-batch size (default: train.batch_size).")
    warmup_steps: int | None = Field(None, ge=0, description="Warmup steps (default: train.warmup_*).")

    @field_validator("lr")
    @classmethod
    def _known_components(cls, v: dict[str, float]) -> dict[str, float]:
        for key, lr in v.items():
            if key not in COMPONENTS:
                raise ValueError(f"lr key '{key}' is not a component.{did_you_mean(key, COMPONENTS)} "
                                 f"Components: {', '.join(COMPONENTS)}")
            if lr <= 0:
                raise ValueError(f"lr.{key} must be > 0, got {lr}")
        return v

    @model_validator(mode="after")
    def _adapter_iff_lora(self) -> StageConfig:
        if self.trainable.llm == "lora" and not self.adapter:
            raise ValueError(f"stage '{self.name}': trainable.llm is lora, so set `adapter` to the adapter that "
                             "trains (e.g. vision or speech)")
        if self.trainable.llm != "lora" and self.adapter:
            raise ValueError(f"stage '{self.name}': `adapter: {self.adapter}` is set but trainable.llm is "
                             f"{self.trainable.llm}; set trainable.llm: lora or remove `adapter`")
        return self


class MultimodalConfig(Section):
    vision: VisionConfig | None = Field(None, description="The vision path (tower + projector + tiling); "
                                        "null: no images.")
    audio: AudioConfig | None = Field(None, description="The audio path (encoder + projector); null: no audio.")
    vision_speech: bool | None = Field(None, description="Build the second audio projector used for samples with "
                                       "image and audio (Phi-4's vision-speech projector). Default: when both "
                                       "vision and audio are configured.")
    adapters: list[AdapterSpec] = Field(default_factory=list, description="LoRA adapters of the language model "
                                        "(e.g. vision and speech), created at the start, trained by stages.")
    router: RouterConfig = Field(default_factory=RouterConfig, description="Adapter per modality group.")
    image_token: str = Field("<|image|>", description="Special token added to the tokenizer; each `<image>` tag "
                             "becomes a run of it, one per image feature token.")
    audio_token: str = Field("<|audio|>", description="Special token for audio feature positions.")
    stages: list[StageConfig] = Field(description="Training stages, run in order; the composed model is saved "
                                      "after each.")

    @property
    def builds_vision_speech(self) -> bool:
        if self.vision_speech is None:
            return self.vision is not None and self.audio is not None
        return self.vision_speech

    def adapter_names(self) -> list[str]:
        return [a.name for a in self.adapters]

    def resolved_router(self) -> dict[str, str | None]:
        """``{group: adapter name or None}`` with `auto` and `none` resolved."""
        names = self.adapter_names()

        def pick(value: str, default: str | None) -> str | None:
            if value == "none":
                return None
            if value == "auto":
                return default
            return value

        image = pick(self.router.image, "vision" if "vision" in names else None)
        return {"text": pick(self.router.text, None), "image": image,
                "audio": pick(self.router.audio, "speech" if "speech" in names else None),
                "image+audio": pick(self.router.image_audio, image)}

    @model_validator(mode="after")
    def _consistent(self) -> MultimodalConfig:
        names = self.adapter_names()
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"adapter names must be unique; repeated: {', '.join(dup)}")
        for key, value in self.router.model_dump().items():
            if value not in ("auto", "none") and value not in names:
                raise ValueError(f"router.{key} = '{value}' is not an adapter.{did_you_mean(value, names)} "
                                 f"Adapters: {', '.join(names) or 'none'} (or `none` / `auto`)")
        if self.vision is None and self.audio is None:
            raise ValueError("a multimodal recipe needs `vision`, `audio` or both")
        if self.builds_vision_speech and (self.vision is None or self.audio is None):
            raise ValueError("vision_speech: true needs both `vision` and `audio`")
        if not self.stages:
            raise ValueError("`stages` is empty: give at least one training stage")
        needs = {c: getattr(self, c.split("_")[0], None) for c in COMPONENTS if c != "llm"}  # the section
        needs["audio_projector_vs"] = self.audio if self.builds_vision_speech else None
        for stage in self.stages:
            t = stage.trainable
            for comp, present in needs.items():
                if getattr(t, comp) != "frozen" and present is None:
                    raise ValueError(f"stage '{stage.name}': trainable.{comp} is {getattr(t, comp)} but the model "
                                     f"has no {comp.replace('_', ' ')}")
            for comp, section in needs.items():
                if getattr(t, comp) == "lora" and getattr(section, "lora", None) is None:
                    raise ValueError(f"stage '{stage.name}': {comp}: lora needs {comp.split('_')[0]}.lora settings")
            if stage.adapter is not None and stage.adapter not in names:
                raise ValueError(f"stage '{stage.name}': adapter '{stage.adapter}' is not defined."
                                 f"{did_you_mean(stage.adapter, names)} Adapters: {', '.join(names) or 'none'}")
        stage_names = [s.name for s in self.stages]
        if len(set(stage_names)) != len(stage_names):
            raise ValueError(f"stage names must be unique, got {stage_names}")
        return self


VisionConfig.model_rebuild()
AudioConfig.model_rebuild()
