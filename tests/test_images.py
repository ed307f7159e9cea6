"""sd/images.py: the grid every stage writes, and the prompt labels above training samples."""
import numpy as np
import pytest

from sd.images import LABEL_MIN_CELL, grid, to_uint8, wrap_label

pytestmark = pytest.mark.unit


def test_wrap_label_keeps_words_and_width():
    assert wrap_label("a green triangle at the bottom right", 16) == ["a green triangle", "at the bottom", "right"]
    assert wrap_label("", 10) == [""]
    assert wrap_label("supercalifragilistic", 5) == ["super"]  # a word longer than a line is cut, never lost lines
    for line in wrap_label("a red circle at the top left " * 3, 12):
        assert len(line) <= 12


def test_grid_tiles_row_major_and_refuses_mixed_sizes():
    ims = [np.full((4, 6, 3), v, np.uint8) for v in (10, 20, 30)]
    g = np.asarray(grid(ims, cols=2, pad=1))
    assert g.shape == (2 * 5 + 1, 2 * 7 + 1, 3)
    assert g[1, 1, 0] == 10 and g[1, 8, 0] == 20 and g[6, 1, 0] == 30 and g[6, 8, 0] == 255
    with pytest.raises(ValueError, match="image 1 is 5x4"):
        grid([ims[0], np.zeros((4, 5, 3), np.uint8)])


def test_labelled_grid_upscales_pixels_and_writes_text_above_each_image():
    ims = [np.full((32, 32, 3), 128, np.uint8), np.full((32, 32, 3), 60, np.uint8)]
    plain = grid(ims, cols=2, pad=2)
    labelled = np.asarray(grid(ims, cols=2, pad=2, labels=["a red circle at the top left", "a blue square"]))
    scale = LABEL_MIN_CELL // 32
    assert labelled.shape[1] == 2 * (32 * scale + 2) + 2 and labelled.shape[0] > plain.size[1] * scale
    strip = labelled[2: labelled.shape[0] - 32 * scale - 2]  # the label rows above the images
    assert strip.shape[0] > 0 and (strip < 100).any()  # dark text on the white strip
    assert (labelled[-2 - 32 * scale: -2, 2: 2 + 32 * scale] == 128).all()  # nearest upscale: pixels stay pixels
    with pytest.raises(ValueError, match="2 labels for 1 images"):
        grid(ims[:1], labels=["a", "b"])


def test_to_uint8_inverts_the_loader_normalisation():
    px = np.array([[[-1.0, 0.0], [1.0, 2.0]]] * 3, np.float32)
    out = to_uint8(px)
    assert out.shape == (2, 2, 3) and out[0, 0, 0] == 0 and out[0, 1, 0] == 128 and out[1, 1, 0] == 255
