"""Tests of ddcnn.data.subimages and the loaders of a process's own subimages: the same pixels, bit for bit, as the
whole images' batches cut by the decomposition, from a fraction of the data."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from ddcnn.config import DataConfig
from ddcnn.data import ImageSet, crop_and_flip, make_loader
from ddcnn.data.subimages import OwnSubimages
from ddcnn.decomposition import Decomposition
from ddcnn.errors import ConfigError
from ddcnn.models import LocalCNNs

# grid, image shape, overlap, crop padding: even and uneven cores, overlaps, 3D, paddings up to a core
CASES = [
    ((2, 2), (16, 16), 0, 1),
    ((2, 2), (17, 13), 1, 2),
    ((4, 4), (32, 32), 2, 3),
    ((1, 3), (12, 19), 2, 4),
    ((3, 2), (15, 14), 3, 5),
    ((2, 2, 2), (9, 10, 11), 1, 2),
]


def _shares(n: int) -> list[tuple[int, ...]]:
    """Some subsets of ``range(n)``: every single subdomain, every pair, contiguous blocks, all of them."""
    pairs = list(itertools.combinations(range(n), 2))[:8]
    blocks = [tuple(range(i, min(n, i + 3))) for i in range(0, n, 3)]
    return [(i,) for i in range(n)] + pairs + blocks + [tuple(range(n))]


@pytest.mark.parametrize("grid, shape, overlap, padding", CASES)
def test_subimages_are_the_whole_images_cut_after_their_augmentation(grid, shape, overlap, padding):
    decomposition = Decomposition(grid, shape, overlap)
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (6, 2, *shape), dtype=torch.uint8, generator=generator)
    shifts = torch.randint(0, 2 * padding + 1, (6, len(shape)), generator=generator)
    flips = torch.tensor([True, False, True, True, False, False])
    rows = torch.tensor([3, 0, 5, 1])
    for flip, share in itertools.product((False, True), _shares(decomposition.num_subdomains)):
        own = OwnSubimages(decomposition, share, padding, flip)
        flipped = flips if flip else torch.zeros_like(flips)
        expected = decomposition.split(crop_and_flip(x, shifts, flipped, padding))[rows][:, list(share)]
        from_regions = own.extract(own.regions(torch.from_numpy(own.cut(x))), rows, shifts[rows], flipped[rows])
        from_whole = own.extract(own.whole(x), rows, shifts[rows], flipped[rows])
        assert torch.equal(from_regions, expected), (share, flip)
        assert torch.equal(from_whole, expected), (share, flip)
    unaugmented = OwnSubimages(decomposition, (0,))
    assert torch.equal(unaugmented.extract(unaugmented.whole(x), rows), decomposition.split(x)[rows][:, [0]])


def test_a_process_stores_the_fraction_of_the_images_its_subdomains_read():
    """4x4 over 32x32 on 4 processes: the process of grid row 1 (subdomains 4-7) stores exactly a quarter of every
    image unaugmented; through a crop padding of 2 with flips, its four 8x8 windows widened to 12x12 regions (the
    mirrors of a grid row are its own), 4 * 144 / 1024 of every image."""
    decomposition = Decomposition((4, 4), (32, 32))
    split = ImageSet(torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8), torch.zeros(10, dtype=torch.long))
    whole = split.images.nbytes
    for padding, flip, shape, fraction in [(0, False, (8, 8), 1 / 4), (2, True, (12, 12), 4 * 144 / 1024)]:
        own = OwnSubimages(decomposition, (4, 5, 6, 7), padding, flip)
        stored, labels = split.subimages_on_device(torch.device("cpu"), own)
        assert stored.shape == (10, 4, 3, *shape) and torch.equal(labels, split.labels)
        assert stored.nbytes == whole * fraction and own.fraction == fraction and own.holds_less
    assert split.subimages_on_device(torch.device("cpu"), own)[0] is stored  # cut once
    assert not split._device_copies  # the whole images were never copied
    one = OwnSubimages(decomposition, (5,), 2, flip=True)  # one subdomain holds its mirror's region (6) too
    assert one.num_regions == 2 and one.fraction == 2 * 144 / 1024


def test_wide_overlaps_are_read_from_the_whole_images():
    own = OwnSubimages(Decomposition((1, 2), (16, 16), overlap=4), (0,), padding=2, flip=True)
    assert own.region_shape == (16, 16) and not own.holds_less  # widened and mirrored: more than the image


def _loaders(split: ImageSet, subimages, train: bool, flip: bool):
    """A loader of whole images and one of ``subimages``, each over its own ImageSet of ``split``'s images (so that
    what each holds on the device is its own)."""
    cfg = DataConfig(batch_size=4, crop_padding=2, flip=flip)
    args = {"batch_size": 4, "train": train, "cfg": cfg, "mean": (0.4,) * 2, "std": (0.2,) * 2, "device": "cpu"}
    other = ImageSet(split.images, split.labels)
    return make_loader(other, **args), make_loader(split, subimages=subimages, **args)


@pytest.mark.parametrize("form", ["uint8", "uint16", "streamed"])
@pytest.mark.parametrize("grid, share, overlap", [((2, 2), (0,), 1), ((4, 4), (4, 5, 6, 7), 0), ((1, 2), (1,), 6)])
def test_a_loader_of_own_subimages_yields_the_whole_images_batches_cut(form, grid, share, overlap):
    """Training (shuffled, cropped, flipped) and evaluation batches, two epochs: uint8 images gathered from the
    host images themselves, uint16 ones from their regions cut once, a streamed split's regions read batch by
    batch; the 1x2 grid's wide overlap reads the whole images."""
    generator = torch.Generator().manual_seed(1)
    levels = torch.randint(0, 65536 if form == "uint16" else 256, (13, 2, 24, 24), generator=generator)
    images = levels.to(torch.uint16 if form == "uint16" else torch.uint8)
    decomposition = Decomposition(grid, (24, 24), overlap)
    for train, flip in [(True, True), (True, False), (False, False)]:
        split = ImageSet(images.numpy() if form == "streamed" else images, torch.arange(13) % 3)
        whole, own = _loaders(split, (decomposition, share), train, flip)
        for epoch in (0, 1):
            whole.set_epoch(epoch)
            own.set_epoch(epoch)
            batches = list(zip(whole, own, strict=True))
            assert batches
            for (x, y), (subimages, labels) in batches:
                assert torch.equal(subimages, decomposition.split(x)[:, list(share)]) and torch.equal(labels, y)
        if form == "uint16":  # the regions alone, in the int16 device form, where they hold less than the images
            cut = own.own.holds_less
            assert bool(split._subimage_copies) == cut and bool(split._device_copies) == (not cut)
        if form == "uint8":
            assert not split._subimage_copies  # on the CPU, uint8 images are their own device copy: nothing is cut


def test_a_decomposition_of_other_images_is_refused():
    split = ImageSet(torch.zeros(4, 2, 8, 8, dtype=torch.uint8), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ConfigError, match="decomposition is of images 16x16 but the split's are 8x8"):
        _loaders(split, (Decomposition((2, 2), (16, 16)), (0,)), train=False, flip=False)


def test_local_cnns_take_whole_images_or_their_subimages():
    decomposition = Decomposition((2, 2), (16, 16), 1)
    torch.manual_seed(0)
    share = LocalCNNs("vgg3", decomposition, 2, 3, width=0.25).subset([1, 2]).double().eval()
    x = torch.rand(5, 2, 16, 16, dtype=torch.float64)
    torch.testing.assert_close(share(decomposition.split(x)[:, [1, 2]]), share(x), rtol=0, atol=0)


def test_regions_read_from_a_memmap_are_those_cut_in_memory(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (7, 1, 20, 20), dtype=np.uint8)
    np.save(tmp_path / "images.npy", images)
    mapped = np.load(tmp_path / "images.npy", mmap_mode="r")
    own = OwnSubimages(Decomposition((2, 2), (20, 20)), (2, 3), padding=3, flip=True)
    rows = np.array([6, 2, 3])
    assert np.array_equal(own.cut(mapped, rows), own.cut(torch.from_numpy(images))[rows])


def test_the_local_phase_of_a_process_reads_only_its_subimages(tiny_run, tmp_path):
    """An Experiment's loaders for a share of the local CNNs (model parallel) yield its subimages; for all of them
    (one process) and for other models, whole images."""
    from ddcnn.phases import Experiment

    exp = Experiment.from_config(tiny_run(tmp_path))
    decomposition = exp.decomposition()
    local_cnns = LocalCNNs("vgg3", decomposition, 1, 3, width=0.25)
    share = local_cnns.subset([2, 3])
    x, _ = next(iter(exp.loader("val", local_cnns=local_cnns)))
    subimages, _ = next(iter(exp.loader("val", local_cnns=share)))
    assert x.shape[1:] == (1, 16, 16) and exp.loader("train", train=True).own is None
    assert torch.equal(subimages, decomposition.split(x)[:, [2, 3]])


@pytest.mark.slow
def test_a_local_phase_with_flips_on_three_processes_is_the_one_process_run(tmp_path, tiny_data_config):
    """2x2 with overlap on 3 processes (subdomains 0, 1 and 2-3), flips on: ranks 0 and 1 read their mirror
    subdomain's region for flipped images; the same run as on one process, in float64."""
    import dataclasses

    from test_distributed import _tiny_local, assert_same_run, train

    data = dataclasses.replace(tiny_data_config, flip=True)

    def config(out):
        cfg = _tiny_local(out, data, epochs=1)
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, overlap=1))

    reference = train(config(tmp_path / "one"))
    assert_same_run(train(config(tmp_path / "three"), processes=3), reference, "local.pt")
