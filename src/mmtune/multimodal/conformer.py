"""Conformer audio encoder (Phi-4-multimodal geometry), built in code.

Architecture, following the Phi-4-multimodal speech encoder (technical report arXiv:2503.01743
section 2.1; transformers ``models/phi4_multimodal/modeling_phi4_multimodal.py``), itself a
Conformer (Gulati et al. 2020, arXiv:2005.08100):

- input normalisation by global mean / inverse std buffers (identity until set);
- x8 convolutional subsampling (NeMo "dw_striding"): Conv2d(1->C, 3, stride 2) + ReLU, then twice
  [depthwise Conv2d(3, stride 2) + pointwise Conv2d + ReLU], flatten (C x 10 Mel bins) -> Linear(d).
  Each stage maps T -> ceil(T/2), so ``tokens = ceil(frames / 8)`` exactly;
- one learned relative position bias shared by all blocks: one scalar per head per clipped
  relative distance ``j - i`` in [-1000, 999] (Phi-4 ``bias_max_distance``);
- N blocks: ``x + 1/2 FFN`` (macaron half-step), ``x + MHSA(LN(x))`` with the bias added to the
  logits, ``x + ConvModule(x)``, ``x + 1/2 FFN``, LayerNorm. FFNs are pre-norm gated
  (``up * swish(gate)``, SwiGLU-style); the conv module is LN -> pointwise Conv(d->2d) + GLU
  (swish gate) -> depthwise Conv(kernel k, causal in Phi-4) -> pointwise Conv -> swish -> pointwise
  Conv. There is no BatchNorm (Phi-4 has none; it would also make a clip's output depend on
  the rest of its batch).

Padding: padded frames are zeroed after every subsampling stage and before every depthwise
convolution, and masked out as attention keys, so a clip's outputs do not depend on how much
padding its batch adds (tested to 1e-5 in fp32). Outputs at padded positions are zeros.

Phi-4 geometry (:func:`phi4_conformer_config`) measured on the meta device: 441,204,992
parameters, against the published ~441M (docs/reference/multimodal.md#conformer-audio-encoder). transformers' ``Phi4MultimodalAudioModel`` with the
default config has 441,254,144: the 49,152 difference is the GLU's separate ``b1``/``b2`` bias
vectors (2 x 1024 per block x 24), which duplicate the pointwise convolution's own bias; this
module folds them into that bias (:func:`load_phi4_audio_weights`), so the functions are equal.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, MMTuneError
from ..registry import AUDIO_ENCODERS  # noqa: F401 - kept importable from here
from .audio import N_MELS, SUBSAMPLING, time_mask
from .whisper import WhisperAudioTower, load_whisper_encoder  # noqa: F401 - kept importable from here

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
MODEL_TYPE = "mmtune_conformer"


@dataclass
class ConformerConfig:
    """Constructor arguments of :class:`ConformerEncoder` (saved as config.json)."""

    d_model: int = 256  # width of every block (Phi-4: 1024)
    n_layers: int = 4  # number of Conformer blocks (Phi-4: 24)
    n_heads: int = 4  # attention heads; d_model must be divisible by it (Phi-4: 16)
    ffn_dim: int = 512  # inner size of each gated FFN; the up projection is 2*ffn_dim wide (Phi-4: 1536)
    conv_kernel: int = 3  # depthwise convolution kernel (Phi-4: 3)
    n_mels: int = N_MELS  # input feature bins (80)
    dropout: float = 0.0  # dropout in FFN, attention probabilities and conv module (Phi-4: 0.0)
    subsampling_channels: int | None = None  # channels of the conv subsampling; None -> d_model (Phi-4: 1024)
    bias_max_distance: int = 1000  # relative distances are clipped to [-max, max-1] (Phi-4: 1000)
    causal_conv: bool = True  # depthwise conv sees frames t-k+1..t (Phi-4) instead of a centred window


def phi4_conformer_config() -> ConformerConfig:
    """Phi-4-multimodal audio encoder geometry (docs/reference/multimodal.md#conformer-audio-encoder, transformers
    ``Phi4MultimodalAudioConfig`` defaults): 24 blocks, d=1024, 16 heads, FFN 1536 gated,
    depthwise kernel 3 (causal), 1024 subsampling channels, bias distance 1000."""
    return ConformerConfig(d_model=1024, n_layers=24, n_heads=16, ffn_dim=1536, conv_kernel=3, n_mels=80,
                           dropout=0.0, subsampling_channels=1024, bias_max_distance=1000, causal_conv=True)


class ConvSubsampling(nn.Module):
    """x8 time reduction with three stride-2 convolution stages (NeMo "dw_striding", as Phi-4).

    Kernel 3, stride 2, padding 1 maps a length L to ``floor((L - 1)/2) + 1 = ceil(L/2)``; three
    stages give ``ceil(L/8)`` (``ceil(ceil(L/2)/2) = ceil(L/4)``). The Mel axis shrinks the same
    way, 80 -> 40 -> 20 -> 10, and is flattened with the channels into the output projection.
    """

    def __init__(self, n_mels: int, d_model: int, channels: int):
        super().__init__()
        self.conv_in = nn.Conv2d(1, channels, kernel_size=3, stride=2, padding=1)
        self.stages = nn.ModuleList([
            nn.ModuleDict({
                "depthwise": nn.Conv2d(channels, channels, 3, stride=2, padding=1, groups=channels),
                "pointwise": nn.Conv2d(channels, channels, 1),
            }) for _ in range(int(math.log2(SUBSAMPLING)) - 1)
        ])
        freq = n_mels
        for _ in range(int(math.log2(SUBSAMPLING))):
            freq = (freq - 1) // 2 + 1
        self.out = nn.Linear(channels * freq, d_model)

    @staticmethod
    def _mask(x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lengths = torch.div(lengths + 1, 2, rounding_mode="floor")  # ceil(L/2)
        return x * time_mask(lengths, x.shape[2])[:, None, :, None].to(x.dtype), lengths

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.unsqueeze(1)  # (B, 1, T, M)
        x, lengths = self._mask(F.relu(self.conv_in(x)), lengths)  # (B, C, T/2, M/2)
        for stage in self.stages:
            x = F.relu(stage["pointwise"](stage["depthwise"](x)))
            x, lengths = self._mask(x, lengths)  # (B, C, T/4, M/4) then (B, C, T/8, M/8)
        b, c, t, f = x.shape
        x = x.transpose(1, 2).reshape(b, t, c * f)  # (B, T', C*F')
        return self.out(x), lengths


class RelativePositionBias(nn.Module):
    """Learned per-head bias on attention logits as a function of the clipped distance ``j - i``.

    Clipped (not T5's log-bucketed) distances as in Phi-4's ``T5RelativeAttentionLogitBias`` with
    ``symmetric=False``: 2 * max_distance buckets, distance d -> bucket d + max_distance. Since
    the bias depends only on j - i it is translation invariant.
    """

    def __init__(self, n_heads: int, max_distance: int = 1000):
        super().__init__()
        self.max_distance = max_distance
        self.bias = nn.Embedding(2 * max_distance, n_heads)

    def forward(self, t: int) -> torch.Tensor:
        pos = torch.arange(t, device=self.bias.weight.device)
        rel = (pos[None, :] - pos[:, None]).clamp(-self.max_distance, self.max_distance - 1)  # (T, T) j - i
        return self.bias(rel + self.max_distance).permute(2, 0, 1).unsqueeze(0)  # (1, H, T, T)


class GatedFeedForward(nn.Module):
    """Pre-norm gated FFN: ``down(dropout(up * swish(gate)))``; ``[up | gate] = gate_up(LN(x))``."""

    def __init__(self, d_model: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.gate_up = nn.Linear(d_model, 2 * ffn_dim)
        self.down = nn.Linear(ffn_dim, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up, gate = self.gate_up(self.norm(x)).chunk(2, dim=-1)  # (B, T, ffn) each
        return self.dropout(self.down(self.dropout(up * F.silu(gate))))


class RelPosSelfAttention(nn.Module):
    """Multi-head self-attention; the caller passes logit bias + key padding as one float mask."""

    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        if d_model % n_heads:
            raise ConfigError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        self.n_heads, self.dropout = n_heads, dropout
        self.q, self.k, self.v, self.o = (nn.Linear(d_model, d_model) for _ in range(4))

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape

        def heads(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2)  # (B, nh, T, hs)

        y = F.scaled_dot_product_attention(heads(self.q(x)), heads(self.k(x)), heads(self.v(x)),
                                           attn_mask=attn_bias, dropout_p=self.dropout if self.training else 0.0)
        return self.o(y.transpose(1, 2).reshape(b, t, d))  # (B, T, d)


class ConvModule(nn.Module):
    """LN -> pointwise Conv(d->2d) + GLU(swish) -> depthwise Conv(k) -> pointwise Conv -> swish -> pointwise Conv.

    Causal (Phi-4): pad k-1 frames on the left so frame t sees t-k+1..t; otherwise a centred
    window (odd k). Padded frames are zeroed before the depthwise convolution.
    """

    def __init__(self, d_model: int, kernel: int, dropout: float, causal: bool):
        super().__init__()
        if not causal and kernel % 2 == 0:
            raise ConfigError(f"conv_kernel={kernel}: a centred (causal_conv: false) kernel must be odd")
        self.left = kernel - 1 if causal else (kernel - 1) // 2
        self.right = kernel - 1 - self.left
        self.norm = nn.LayerNorm(d_model)
        self.glu = nn.Conv1d(d_model, 2 * d_model, 1)
        self.depthwise = nn.Conv1d(d_model, d_model, kernel, groups=d_model)
        self.pointwise = nn.Conv1d(d_model, d_model, 1)
        self.out = nn.Conv1d(d_model, d_model, 1)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        y = self.glu(self.norm(x).transpose(1, 2))  # (B, 2d, T)
        value, gate = y.chunk(2, dim=1)  # (B, d, T) each
        y = (value * F.silu(gate)) * mask[:, None, :].to(y.dtype)
        y = self.depthwise(F.pad(y, (self.left, self.right)))  # (B, d, T)
        y = self.out(F.silu(self.pointwise(y)))
        return self.dropout(y.transpose(1, 2))  # (B, T, d)


class ConformerBlock(nn.Module):
    def __init__(self, d_model: int, n_heads: int, ffn_dim: int, conv_kernel: int, dropout: float,
                 causal_conv: bool):
        super().__init__()
        self.ffn_in = GatedFeedForward(d_model, ffn_dim, dropout)
        self.attn_norm = nn.LayerNorm(d_model)
        self.attn = RelPosSelfAttention(d_model, n_heads, dropout)
        self.conv = ConvModule(d_model, conv_kernel, dropout, causal_conv)
        self.ffn_out = GatedFeedForward(d_model, ffn_dim, dropout)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + 0.5 * self.ffn_in(x)  # macaron half step (Conformer eq. 1)
        x = x + self.attn(self.attn_norm(x), attn_bias)
        x = x + self.conv(x, mask)
        x = x + 0.5 * self.ffn_out(x)
        return self.norm(x)


class ConformerEncoder(nn.Module):
    """Log-Mel ``(B, T, n_mels)`` -> hidden ``(B, ceil(T/8), d_model)``; see the module docstring."""

    subsampling = SUBSAMPLING

    def __init__(self, d_model: int = 256, n_layers: int = 4, n_heads: int = 4, ffn_dim: int = 512,
                 conv_kernel: int = 3, n_mels: int = N_MELS, dropout: float = 0.0,
                 subsampling_channels: int | None = None, bias_max_distance: int = 1000,
                 causal_conv: bool = True):
        super().__init__()
        self.config = ConformerConfig(d_model, n_layers, n_heads, ffn_dim, conv_kernel, n_mels, dropout,
                                      subsampling_channels, bias_max_distance, causal_conv)
        self.d_model, self.n_mels = d_model, n_mels
        self.hidden_size = d_model  # the projector's input width (same name as VisionTower)
        self.gradient_checkpointing = False
        self.register_buffer("feature_mean", torch.zeros(n_mels))
        self.register_buffer("feature_invstd", torch.ones(n_mels))
        self.subsample = ConvSubsampling(n_mels, d_model, subsampling_channels or d_model)
        self.rel_bias = RelativePositionBias(n_heads, bias_max_distance)
        self.blocks = nn.ModuleList([ConformerBlock(d_model, n_heads, ffn_dim, conv_kernel, dropout, causal_conv)
                                     for _ in range(n_layers)])
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        """N(0, 0.02) weights and zero biases for linear/conv/embedding, as transformers'
        ``Phi4MultimodalAudioPreTrainedModel`` (``initializer_range=0.02``); LayerNorm 1/0."""
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None and not isinstance(m, nn.Embedding):
                nn.init.zeros_(m.bias)

    @torch.no_grad()
    def set_feature_normalization(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Store per-bin global feature statistics (e.g. over the training set): x -> (x - mean)/std."""
        self.feature_mean.copy_(torch.as_tensor(mean, dtype=self.feature_mean.dtype))
        self.feature_invstd.copy_(1.0 / torch.as_tensor(std, dtype=self.feature_invstd.dtype).clamp_min(1e-5))

    @staticmethod
    def output_lengths(lengths: torch.Tensor) -> torch.Tensor:
        """Tokens per clip: ``ceil(frames / 8)``."""
        return torch.div(lengths + SUBSAMPLING - 1, SUBSAMPLING, rounding_mode="floor")

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """feats (B, T, n_mels), lengths (B,) real frames (None: all T) -> (hidden (B, T', d), out_lengths (B,))."""
        if feats.dim() != 3 or feats.shape[-1] != self.n_mels:
            raise MMTuneError(f"audio features must be (batch, frames, {self.n_mels}); got {tuple(feats.shape)}")
        b, t, _ = feats.shape
        if lengths is None:
            lengths = torch.full((b,), t, dtype=torch.long, device=feats.device)
        lengths = lengths.to(device=feats.device, dtype=torch.long)
        if t == 0 or int(lengths.min()) < 1 or int(lengths.max()) > t:
            raise MMTuneError(f"audio lengths must be in [1, {t}] frames; got {lengths.tolist()}")
        x = (feats - self.feature_mean) * self.feature_invstd
        x = x * time_mask(lengths, t)[..., None].to(x.dtype)  # padded frames are exact zeros
        x, out_lengths = self.subsample(x, lengths)  # (B, T', d)
        mask = time_mask(out_lengths, x.shape[1])  # (B, T')
        bias = self.rel_bias(x.shape[1]).to(x.dtype)  # (1, H, T', T')
        attn_bias = bias.masked_fill(~mask[:, None, None, :], torch.finfo(x.dtype).min)  # (B, H, T', T')
        for block in self.blocks:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(block, x, attn_bias, mask, use_reentrant=False)
            else:
                x = block(x, attn_bias, mask)
        return x * mask[..., None].to(x.dtype), out_lengths


@AUDIO_ENCODERS.register("conformer")
def build_conformer(config: ConformerConfig | None = None, device: str | torch.device | None = None,
                    **overrides) -> ConformerEncoder:
    """Builder: a :class:`ConformerConfig` (default: small) with field overrides -> encoder.

    ``device="meta"`` builds without memory, e.g. to count the Phi-4 geometry's parameters.
    """
    cfg = asdict(config or ConformerConfig())
    unknown = set(overrides) - set(cfg)
    if unknown:
        raise ConfigError(f"unknown conformer field(s) {sorted(unknown)}; valid: {', '.join(cfg)}")
    cfg.update(overrides)
    with torch.device(device or "cpu"):
        return ConformerEncoder(**cfg)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- save / load

def save_conformer(model: ConformerEncoder, directory: str | os.PathLike) -> Path:
    """Write ``config.json`` (constructor arguments) and ``model.safetensors`` to ``directory``."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_NAME).write_text(json.dumps({"model_type": MODEL_TYPE, **asdict(model.config)}, indent=2))
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt", "model_type": MODEL_TYPE})
    return directory


def load_conformer(directory: str | os.PathLike, device: str | torch.device = "cpu",
                   dtype: torch.dtype | None = None) -> ConformerEncoder:
    """Inverse of :func:`save_conformer`; errors name the file and the field at fault."""
    from safetensors.torch import load_file

    directory = Path(directory)
    cfg_path, w_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise ConfigError(f"{p}: not found; a conformer directory holds {CONFIG_NAME} and {WEIGHTS_NAME} "
                              "written by save_conformer()")
    try:
        raw = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{cfg_path}:{e.lineno}: invalid JSON ({e.msg})") from e
    if raw.pop("model_type", MODEL_TYPE) != MODEL_TYPE:
        raise ConfigError(f"{cfg_path}: model_type is not '{MODEL_TYPE}'")
    valid = {f.name for f in fields(ConformerConfig)}
    unknown = set(raw) - valid
    if unknown:
        raise ConfigError(f"{cfg_path}: unknown field(s) {sorted(unknown)}; valid: {', '.join(sorted(valid))}")
    model = build_conformer(ConformerConfig(**raw))
    try:
        model.load_state_dict(load_file(str(w_path)), strict=True)
    except RuntimeError as e:
        raise ConfigError(f"{w_path}: weights do not match {cfg_path.name}: {str(e).splitlines()[0]}") from e
    return model.to(device=device, dtype=dtype)


# ----------------------------------------------------------------------------- Phi-4 weights

# transformers Phi4MultimodalAudioModel name -> ours (regex on the suffix after any prefix).
_PHI4_RENAMES = [
    (r"^encoder_embedding\.global_mean$", "feature_mean"),
    (r"^encoder_embedding\.global_invstd$", "feature_invstd"),
    (r"^embed\.conv\.0\.", "subsample.conv_in."),
    (r"^embed\.conv\.2\.", "subsample.stages.0.depthwise."),
    (r"^embed\.conv\.3\.", "subsample.stages.0.pointwise."),
    (r"^embed\.conv\.5\.", "subsample.stages.1.depthwise."),
    (r"^embed\.conv\.6\.", "subsample.stages.1.pointwise."),
    (r"^embed\.out\.", "subsample.out."),
    (r"^relative_attention_bias_layer\.bias_values\.", "rel_bias.bias."),
    (r"^encoders\.", "blocks."),
    (r"\.feed_forward_in\.layer_norm\.", ".ffn_in.norm."),
    (r"\.feed_forward_out\.layer_norm\.", ".ffn_out.norm."),
    (r"\.feed_forward_(in|out)\.gate_up_proj\.", r".ffn_\1.gate_up."),
    (r"\.feed_forward_(in|out)\.down_proj\.", r".ffn_\1.down."),
    (r"\.self_attn\.([qkvo])_proj\.", r".attn.\1."),
    (r"\.layer_norm_att\.", ".attn_norm."),
    (r"\.layer_norm\.", ".norm."),
    (r"\.conv\.glu\.ext_pw_conv_1d\.", ".conv.glu."),
    (r"\.conv\.dw_sep_conv_1d\.dw_conv\.", ".conv.depthwise."),
    (r"\.conv\.dw_sep_conv_1d\.pw_conv\.", ".conv.pointwise."),
    (r"\.conv\.ext_pw_conv_1d\.", ".conv.out."),
]


def load_phi4_audio_weights(model: ConformerEncoder, state_dict: dict[str, torch.Tensor],
                            prefix: str = "") -> None:
    """Load transformers-format Phi-4-multimodal audio encoder weights into ``model``.

    ``state_dict`` uses ``Phi4MultimodalAudioModel`` names (under ``prefix``, e.g.
    ``"model.embed_tokens_extend.audio_embed.encoder."`` in a full checkpoint). The GLU's extra
    ``b1``/``b2`` vectors are added to our GLU convolution's bias (value and gate halves), which
    is the same function. Every parameter of ``model`` must be covered.
    """
    out: dict[str, torch.Tensor] = {}
    extra: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if re.search(r"\.conv\.glu\.b[12]$", name):
            extra[name] = value
            continue
        for pattern, repl in _PHI4_RENAMES:
            name = re.sub(pattern, repl, name)
        out[name] = value
    for name, value in extra.items():
        block = re.sub(r"^encoders\.", "blocks.", name).rsplit(".conv.glu.", 1)[0]
        half = 0 if name.endswith("b1") else 1
        bias = out[f"{block}.conv.glu.bias"].clone()  # (2d,) = [value | gate]
        d = bias.numel() // 2
        bias[half * d:(half + 1) * d] += value.reshape(-1)
        out[f"{block}.conv.glu.bias"] = bias
    hint = "check the prefix and that the encoder was built with phi4_conformer_config()"
    try:
        missing, unexpected = model.load_state_dict(out, strict=False)
    except RuntimeError as e:  # shape mismatch
        raise ConfigError(f"Phi-4 audio weights do not fit this encoder: {str(e).splitlines()[1].strip()}; "
                          f"{hint}") from e
    if missing or unexpected:
        raise ConfigError(f"Phi-4 audio weights do not fit this encoder: missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}; {hint}")
