"""Pretraining the tiny encoders alone on the built-in data (mmtune.multimodal.encoder_pretrain)."""

import torch

from mmtune.multimodal.encoder_pretrain import (
    ctc_greedy,
    pretrain_conformer,
    pretrain_vision_tower,
    shapes_cell_labels,
)


def test_cell_labels_follow_the_drawn_scene():
    shapes = [{"kind": "square", "color": "red", "cell": (0, 2)}, {"kind": "circle", "color": "blue", "cell": (2, 0)}]
    kind, colour = shapes_cell_labels(shapes)
    # KINDS = (circle, square, triangle) -> 1, 2, 3; sorted colours: blue green purple red yellow
    assert kind.tolist() == [0, 0, 2, 0, 0, 0, 1, 0, 0]
    assert colour.tolist() == [-100, -100, 3, -100, -100, -100, 0, -100, -100]


def test_ctc_greedy_collapses_repeats_and_drops_blanks():
    path = torch.tensor([[0, 3, 3, 0, 3, 5, 5, 0, 9], [2, 2, 2, 0, 0, 0, 7, 7, 7]])
    log_probs = torch.nn.functional.one_hot(path, 11).float().log_softmax(-1)
    assert ctc_greedy(log_probs, torch.tensor([9, 5])) == [[3, 3, 5, 9], [2]]


def test_vision_pretraining_learns_colours_and_saves_a_loadable_tower(tmp_path):
    """40 steps on the 64 px tower: held-out cell colour far above chance (1/5), and the saved
    directory is an ordinary tower the composed model loads (all layers kept)."""
    from mmtune.multimodal.vision import VisionTower, build_tiny_vision_tower

    src = tmp_path / "tower"
    build_tiny_vision_tower(src, kind="siglip", image_size=64, patch_size=8, hidden=64, layers=3, heads=4, seed=0)
    scores = pretrain_vision_tower(src, tmp_path / "out", n_images=256, steps=40, batch_size=32, log=lambda *_: None)
    assert scores["cell_colour_acc"] > 0.6, scores
    tower = VisionTower.from_pretrained(tmp_path / "out")  # pruned at load to the feature layer, as composed
    assert tower.model.config.num_hidden_layers == 2
    before = VisionTower.from_pretrained(src)
    assert any((a - b).abs().max() > 0 for a, b in zip(tower.parameters(), before.parameters()))


def test_conformer_pretraining_reduces_the_ctc_loss(tmp_path):
    from mmtune.multimodal.config import AudioConfig

    scores = pretrain_conformer(tmp_path / "enc", AudioConfig(path="builtin:tiny-conformer"), tmp_path / "data",
                                n_clips=48, steps=30, batch_size=16, log=lambda *_: None)
    assert scores["final_loss"] < 0.7 * scores["first_loss"], scores
    from mmtune.multimodal.conformer import load_conformer

    assert load_conformer(tmp_path / "enc").d_model == 64
