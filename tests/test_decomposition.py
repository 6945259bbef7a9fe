import math

import pytest
import torch

from ddcnn.decomposition import Decomposition, compute_windows
from ddcnn.errors import DecompositionError


@pytest.mark.parametrize(
    "grid, shape, overlap",
    [((2, 2), (32, 32), 0), ((4, 4), (32, 32), 2), ((3, 2), (28, 27), 1), ((2, 2, 2), (16, 16, 16), 0),
     ((3, 2, 4), (17, 12, 20), 2), ((1, 1), (9, 9), 0), ((7, 7), (28, 28), 0)],
)
def test_split_merge_round_trip(grid, shape, overlap):
    d = Decomposition(grid, shape, overlap)
    x = torch.randn(3, 2, *shape)
    sub = d.split(x)
    assert sub.shape == (3, math.prod(grid), 2, *d.subimage_shape)
    assert torch.equal(d.merge(sub), x)


def test_split_matches_windows_in_order():
    d = Decomposition((2, 3), (10, 12), 1)
    x = torch.arange(2 * 10 * 12, dtype=torch.float32).reshape(1, 2, 10, 12)
    sub = d.split(x)
    for i, window in enumerate(d.windows()):
        assert torch.equal(sub[:, i], x[(slice(None), slice(None), *window)])
    # row-major subdomain order: the last grid axis varies fastest
    assert d.subdomain_coordinates()[:3] == [(0, 0), (0, 1), (0, 2)]


def test_overlap_geometry_1d():
    cores, windows = compute_windows(32, 4, 2)
    assert cores == [(0, 8), (8, 16), (16, 24), (24, 32)]
    # every window has length ceil(32/4) + 2*2 = 12, is centred on its core and shifted inward at the border
    assert windows == [(0, 12), (6, 18), (14, 26), (20, 32)]
    for (c0, c1), (w0, w1) in zip(cores, windows):
        assert w0 <= c0 and c1 <= w1 and 0 <= w0 and w1 <= 32


def test_uneven_sizes_cover_everything():
    cores, windows = compute_windows(28, 3, 0)
    assert [b - a for a, b in cores] == [9, 9, 10]  # differ by at most one, tile the axis
    assert all(b - a == 10 for a, b in windows)  # equal windows: ceil(28/3)
    assert cores[0][0] == 0 and cores[-1][1] == 28
    assert all(cores[i][1] == cores[i + 1][0] for i in range(2))


def test_overlap_reaches_neighbour_pixels():
    d = Decomposition((2, 2), (8, 8), 1)
    x = torch.arange(64.0).reshape(1, 1, 8, 8)
    top_left = d.split(x)[0, 0, 0]
    assert top_left.shape == (6, 6)  # 4 + 2*1, shifted inward at the border
    assert torch.equal(top_left, x[0, 0, :6, :6])


def test_split_is_differentiable():
    d = Decomposition((2, 2), (8, 8), 1)
    x = torch.randn(2, 1, 8, 8, requires_grad=True)
    d.split(x).sum().backward()
    # pixels seen by two or four windows get gradient 2 or 4
    assert x.grad.min() >= 1 and x.grad.max() == 4


@pytest.mark.parametrize(
    "grid, shape, overlap, message",
    [
        ((40, 1), (32, 32), 0, "do not fit"),
        ((4, 4), (32, 32), 9, "wider than a subdomain"),
        ((2, 2), (32, 32), -1, "wider than a subdomain"),
        ((2, 2, 2), (32, 32), 0, "spatial axes"),
    ],
)
def test_bad_decompositions_have_clear_errors(grid, shape, overlap, message):
    with pytest.raises(DecompositionError, match=message):
        Decomposition(grid, shape, overlap)


def test_wrong_batch_shape():
    d = Decomposition((2, 2), (32, 32))
    with pytest.raises(DecompositionError, match="expected a batch"):
        d.split(torch.zeros(2, 3, 28, 28))
