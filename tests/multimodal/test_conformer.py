"""Conformer encoder: x8 token counts, padding invariance, translation-invariant position bias,
save/load, Phi-4 parameter count and output parity with transformers' Phi-4 audio encoder,
and the Whisper tower adapter."""

import json
import math

import pytest
import torch

from mmtune.errors import ConfigError, MMTuneError
from mmtune.multimodal.audio import num_audio_tokens, num_frames
from mmtune.multimodal.conformer import (
    AUDIO_ENCODERS,
    ConformerEncoder,
    build_conformer,
    count_parameters,
    load_conformer,
    load_phi4_audio_weights,
    load_whisper_encoder,
    phi4_conformer_config,
    save_conformer,
)

TINY = dict(d_model=32, n_layers=2, n_heads=4, ffn_dim=48, subsampling_channels=8, bias_max_distance=64)


def _tiny(seed=0, **kw) -> ConformerEncoder:
    torch.manual_seed(seed)
    model = build_conformer(**{**TINY, **kw}).eval()
    with torch.no_grad():  # larger than the 0.02 init so that every path visibly matters
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
        model.set_feature_normalization(torch.randn(80), 1 + torch.rand(80))
    return model


def test_subsampled_lengths_are_ceil_frames_over_8():
    model = _tiny()
    with torch.no_grad():
        for t in range(1, 201):  # the subsampling stack is the only part that changes the length
            hidden, out_len = model.subsample(torch.randn(1, t, 80), torch.tensor([t]))
            assert hidden.shape == (1, math.ceil(t / 8), 32), t
            assert out_len.tolist() == [math.ceil(t / 8)]
        for t in (1, 7, 8, 9, 63, 64, 65, 200):
            hidden, out_len = model(torch.randn(1, t, 80), torch.tensor([t]))
            assert hidden.shape == (1, math.ceil(t / 8), 32) and out_len.tolist() == [math.ceil(t / 8)]
        lengths = torch.arange(1, 201)
        hidden, out_len = model(torch.randn(200, 200, 80), lengths)
    assert hidden.shape == (200, 25, 32)
    assert out_len.tolist() == [math.ceil(t / 8) for t in range(1, 201)]
    # Through the sample -> frame formula: 30 s of audio gives 375 tokens.
    for n in (16000, 480000, 123457):
        assert ConformerEncoder.output_lengths(torch.tensor([num_frames(n)])).item() == num_audio_tokens(n)


@pytest.mark.parametrize("causal_conv, kernel", [(True, 3), (False, 5)])
def test_padding_does_not_change_real_outputs(causal_conv, kernel):
    model = _tiny(causal_conv=causal_conv, conv_kernel=kernel)
    lengths = [37, 120, 83, 1]
    clips = [torch.randn(t, 80) for t in lengths]
    batch = torch.full((4, 133, 80), 7.0)  # padding with junk, not zeros: the mask must do the work
    for i, c in enumerate(clips):
        batch[i, : len(c)] = c
    with torch.no_grad():
        hidden, out_len = model(batch, torch.tensor(lengths))
        for i, c in enumerate(clips):
            alone, n = model(c[None], torch.tensor([len(c)]))
            assert n.item() == out_len[i].item() == math.ceil(len(c) / 8)
            torch.testing.assert_close(hidden[i, :n], alone[0], atol=1e-5, rtol=0)
            assert (hidden[i, n:] == 0).all()


def test_relative_position_bias_is_translation_invariant():
    model = _tiny(bias_max_distance=6)
    with torch.no_grad():
        model.rel_bias.bias.weight.normal_()
        bias = model.rel_bias(20)[0]  # (H, T, T)
    table = model.rel_bias.bias.weight  # (12, H)
    assert bias.shape == (4, 20, 20)
    torch.testing.assert_close(bias[:, 1:, 1:], bias[:, :-1, :-1], atol=0, rtol=0)
    for i in range(20):
        for j in range(20):
            d = max(-6, min(5, j - i))  # clipped to [-max, max-1]
            assert torch.equal(bias[:, i, j], table[d + 6])
    assert not torch.equal(bias[:, 0, 1], bias[:, 1, 0])  # asymmetric: j - i and i - j differ


def test_save_load_round_trip(tmp_path):
    model = _tiny(seed=3)
    save_conformer(model, tmp_path / "enc")
    cfg = json.loads((tmp_path / "enc" / "config.json").read_text())
    assert cfg["model_type"] == "mmtune_conformer" and cfg["d_model"] == 32 and cfg["subsampling_channels"] == 8
    loaded = load_conformer(tmp_path / "enc").eval()
    x, lengths = torch.randn(2, 90, 80), torch.tensor([90, 51])
    with torch.no_grad():
        a, la = model(x, lengths)
        b, lb = loaded(x, lengths)
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert torch.equal(loaded.feature_invstd, model.feature_invstd)

    cfg["n_layer"] = 3
    (tmp_path / "enc" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"config\.json: unknown field\(s\) \['n_layer'\]"):
        load_conformer(tmp_path / "enc")
    (tmp_path / "enc" / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match="model.safetensors: not found"):
        load_conformer(tmp_path / "enc")


def test_bad_inputs_raise():
    model = _tiny()
    with pytest.raises(MMTuneError, match=r"\(batch, frames, 80\)"):
        model(torch.randn(2, 10, 64))
    with pytest.raises(MMTuneError, match="lengths must be in"):
        model(torch.randn(2, 10, 80), torch.tensor([10, 11]))
    with pytest.raises(ConfigError, match="unknown conformer field"):
        build_conformer(n_layer=2)
    with pytest.raises(ConfigError, match="not divisible"):
        build_conformer(d_model=30, n_heads=4)


def test_gradient_checkpointing_gives_same_gradients():
    model = _tiny(seed=5).train()
    x, lengths = torch.randn(2, 64, 80), torch.tensor([64, 40])
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = ckpt
        hidden, _ = model(x, lengths)
        hidden.square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])
    assert grads[0].abs().sum() > 0


def test_phi4_geometry_parameter_count():
    """Published: audio encoder ~441M (docs/reference/multimodal.md#conformer-audio-encoder). transformers' Phi4MultimodalAudioModel has 2 x 1024 extra
    GLU bias vectors per block (b1, b2) that we fold into the GLU convolution's bias."""
    from transformers import Phi4MultimodalAudioConfig
    from transformers.models.phi4_multimodal.modeling_phi4_multimodal import Phi4MultimodalAudioModel

    ours = count_parameters(build_conformer(phi4_conformer_config(), device="meta"))
    with torch.device("meta"):
        hf = count_parameters(Phi4MultimodalAudioModel(Phi4MultimodalAudioConfig()))
    assert ours == hf - 24 * 2 * 1024
    assert abs(ours - 441e6) / 441e6 < 0.001


def test_outputs_match_transformers_phi4_audio_encoder():
    from transformers import Phi4MultimodalAudioConfig
    from transformers.models.phi4_multimodal.modeling_phi4_multimodal import Phi4MultimodalAudioModel

    torch.manual_seed(0)
    cfg = Phi4MultimodalAudioConfig(hidden_size=32, intermediate_size=48, num_blocks=2, num_attention_heads=4,
                                    nemo_conv_channels=16, ext_pw_out_channel=32,
                                    depthwise_separable_out_channel=32, bias_max_distance=20)
    hf = Phi4MultimodalAudioModel(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.2)
        for b in hf.buffers():
            b.normal_(0.5, 0.1)
    ours = build_conformer(d_model=32, n_layers=2, n_heads=4, ffn_dim=48, subsampling_channels=16,
                           bias_max_distance=20).eval()
    load_phi4_audio_weights(ours, {f"audio.{k}": v for k, v in hf.state_dict().items()}, prefix="audio.")
    x = torch.randn(2, 203, 80)
    with torch.no_grad():
        ref = hf(x, None)  # no padding mask: all frames real
        out, out_len = ours(x)
    assert out.shape == ref.shape == (2, 26, 32) and out_len.tolist() == [26, 26]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="do not fit"):
        load_phi4_audio_weights(build_conformer(**TINY), hf.state_dict())


# ----------------------------------------------------------------------------- Whisper tower

def _tiny_whisper(tmp_path, cls_name):
    import transformers

    cfg = transformers.WhisperConfig(vocab_size=64, num_mel_bins=80, d_model=32, encoder_layers=2,
                                     encoder_attention_heads=4, encoder_ffn_dim=64, decoder_layers=1,
                                     decoder_attention_heads=4, decoder_ffn_dim=64, max_source_positions=32,
                                     max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                     decoder_start_token_id=1)
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(cfg).eval()
    model.save_pretrained(tmp_path / cls_name)
    return model.get_encoder(), tmp_path / cls_name


@pytest.mark.parametrize("cls_name", ["WhisperForConditionalGeneration", "WhisperModel"])
def test_whisper_tower_matches_transformers_encoder(tmp_path, cls_name):
    encoder, path = _tiny_whisper(tmp_path, cls_name)
    tower = load_whisper_encoder(path)
    assert tower.d_model == 32 and tower.max_frames == 64 and tower.subsampling == 2
    assert "whisper" in AUDIO_ENCODERS and "conformer" in AUDIO_ENCODERS
    feats = torch.randn(2, 50, 80)
    with torch.no_grad():
        hidden, out_len = tower(feats, torch.tensor([50, 31]))
        ref = encoder(input_features=torch.nn.functional.pad(feats.transpose(1, 2), (0, 14))).last_hidden_state
    assert hidden.shape == (2, 25, 32) and out_len.tolist() == [25, 16]  # x2: ceil(T/2)
    torch.testing.assert_close(hidden[0], ref[0, :25])
    torch.testing.assert_close(hidden[1, :16], ref[1, :16])
    assert (hidden[1, 16:] == 0).all()
    with pytest.raises(MMTuneError, match="at most 64 frames"):
        tower(torch.randn(1, 65, 80))
    wave_feats, n = tower.features(torch.zeros(4000))
    assert wave_feats.shape == (64, 80) and n == 25


def test_whisper_loader_errors_name_the_directory(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        load_whisper_encoder(tmp_path)
