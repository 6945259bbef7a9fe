"""The coarse level (a two-level CNN-DNN): one more subdomain whose subimage is the whole image averaged down to the
subimage shape. Its shapes, its independence from the grid's local CNNs in the local phase, the loaders of a
process's own subimages, the aggregators' N+1 inputs, coherent and transfer training, checkpoints and its cost."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ddcnn.config import DataConfig, RunConfig, TrainConfig, inapplicable_options
from ddcnn.data import ImageSet, crop_and_flip, make_loader
from ddcnn.data.subimages import OwnSubimages
from ddcnn.decomposition import Decomposition
from ddcnn.errors import CheckpointMismatchError, DecompositionError
from ddcnn.models import CNNDNN, LocalCNNs, ModelSpec, create_aggregator, list_aggregators, model_from_checkpoint
from ddcnn.models.summary import count_backbone_parameters, forward_flops, local_cnns_cost
from ddcnn.train import Trainer

CPU = torch.device("cpu")

# grid, image shape, overlap: even and uneven cores, an overlap, 3D
CASES = [((2, 2), (16, 16), 0), ((2, 3), (17, 13), 1), ((4, 4), (32, 32), 2), ((2, 1, 2), (9, 10, 11), 1)]


@pytest.mark.parametrize("grid, shape, overlap", CASES)
def test_split_appends_the_whole_image_averaged_down_to_the_subimage_shape(grid, shape, overlap):
    coarse, plain = Decomposition(grid, shape, overlap, coarse=True), Decomposition(grid, shape, overlap)
    n = math.prod(grid)
    assert (coarse.num_subdomains, coarse.num_grid_subdomains, coarse.coarse_index) == (n + 1, n, n)
    assert (plain.num_subdomains, plain.coarse_index) == (n, None) and coarse.subimage_shape == plain.subimage_shape
    x = torch.randn(3, 2, *shape, dtype=torch.float64)
    sub = coarse.split(x)
    assert sub.shape == (3, n + 1, 2, *coarse.subimage_shape) and sub.dtype == x.dtype
    pool = F.adaptive_avg_pool3d if len(shape) == 3 else F.adaptive_avg_pool2d
    assert torch.equal(sub[:, n], pool(x, coarse.subimage_shape))
    assert torch.equal(sub[:, :n], plain.split(x))  # the grid's subimages are those without the coarse level
    assert torch.equal(coarse.merge(sub), x)  # the coarse subimage is not read
    assert len(coarse.windows()) == len(coarse.cores()) == len(coarse.subdomain_coordinates()) == n
    assert "coarse level" in str(coarse) and "coarse" not in str(plain)
    assert [coarse.subdomain_name(i) for i in (0, n)] == ["0", "coarse"]


def test_an_area_average_of_every_pixel_passes_the_gradient_back():
    d = Decomposition((2, 2), (6, 7), 1, coarse=True)
    x = torch.rand(1, 1, 6, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: d.split(t)[:, -1], (x,))
    exact = Decomposition((2, 2), (8, 8), coarse=True)  # 4x4 subimages: each coarse pixel the mean of 2x2
    y = torch.rand(1, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    exact.split(y)[:, 4].sum().backward()
    assert torch.equal(y.grad, torch.full_like(y, 0.25))


def test_a_coarse_level_is_refused_on_a_1x1_grid_and_for_integer_images():
    with pytest.raises(DecompositionError, match="coarse level on a 1x1 grid"):
        Decomposition((1, 1), (16, 16), coarse=True)
    with pytest.raises(DecompositionError, match="averages pixels"):
        Decomposition((2, 2), (16, 16), coarse=True).split(torch.zeros(1, 1, 16, 16, dtype=torch.uint8))


def test_coarse_applies_to_the_decomposed_methods_only(tmp_path, tiny_data_config):
    def warnings(method: str, grid: tuple[int, int]) -> list[str]:
        cfg = RunConfig(method=method, out=str(tmp_path), data=tiny_data_config)
        cfg.model = dataclasses.replace(cfg.model, grid=grid, coarse=True)
        return [m for m in inapplicable_options(cfg) if "--coarse" in m]

    assert warnings("global", (1, 1)) and warnings("local", (1, 1)) and warnings("global", (2, 2))
    assert not any(warnings(method, (2, 2)) for method in ("local", "aggregation", "coherent", "transfer"))


# -- a process's own subimages --------------------------------------------------------------------------------


def _shares(n: int) -> list[tuple[int, ...]]:
    """Shares that hold the coarse level (index ``n``): alone, with one or more grid subdomains, all of them."""
    return [(n,), (0, n), (n - 1, n), tuple(range(n + 1)), (n, 1)]


@pytest.mark.parametrize("grid, shape, overlap", CASES[:2] + CASES[3:])
def test_the_coarse_subimage_is_averaged_from_the_augmented_whole_images(grid, shape, overlap):
    d = Decomposition(grid, shape, overlap, coarse=True)
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (6, 2, *shape), dtype=torch.uint8, generator=generator)
    shifts = torch.randint(0, 5, (6, len(shape)), generator=generator)
    flips = torch.tensor([True, False, True, True, False, False])
    rows = torch.tensor([3, 0, 5, 1])
    augmented = crop_and_flip(x, shifts, flips, 2)
    for share in _shares(d.num_grid_subdomains):
        own = OwnSubimages(d, share, padding=2, flip=True)
        assert own.holds_coarse and not own.holds_less and own.fraction == 1  # it reads the whole images
        source = own.whole(x)
        assert torch.equal(own.augmented(source, rows, shifts[rows], flips[rows]), augmented[rows])
        grid_share = [i for i in share if i != d.coarse_index]
        expected = Decomposition(grid, shape, overlap).split(augmented)[rows][:, grid_share]
        assert torch.equal(own.extract(source, rows, shifts[rows], flips[rows]), expected)
        whole = augmented[rows].double()
        combined = own.combine(own.extract(source, rows, shifts[rows], flips[rows]).double(), d.coarse_subimage(whole))
        assert torch.equal(combined, d.split(whole)[:, list(share)])
    assert not OwnSubimages(d, (0, 1)).holds_coarse  # grid subdomains alone: their regions, as before


@pytest.mark.parametrize("form", ["uint8", "uint16", "streamed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_loader_of_own_subimages_with_the_coarse_level_yields_the_whole_images_batches_cut(form, dtype):
    """Training (shuffled, cropped, flipped) and evaluation batches: the subimages of shares with the coarse level,
    averaged in the model's dtype, are bit for bit those the model cuts from the whole images' batches in it."""
    generator = torch.Generator().manual_seed(1)
    levels = torch.randint(0, 65536 if form == "uint16" else 256, (13, 2, 24, 24), generator=generator)
    images = levels.to(torch.uint16 if form == "uint16" else torch.uint8)
    d = Decomposition((2, 2), (24, 24), 1, coarse=True)
    for (train, flip), share in itertools.product([(True, True), (False, False)], [(4,), (2, 3, 4), (0, 1)]):
        split = ImageSet(images.numpy() if form == "streamed" else images, torch.arange(13) % 3)
        cfg = DataConfig(batch_size=4, crop_padding=2, flip=flip)
        args = {"batch_size": 4, "train": train, "cfg": cfg, "mean": (0.4,) * 2, "std": (0.2,) * 2, "device": "cpu"}
        whole = make_loader(ImageSet(split.images, split.labels), **args)
        own = make_loader(split, subimages=(d, share), dtype=dtype, **args)
        for epoch in (0, 1):
            whole.set_epoch(epoch)
            own.set_epoch(epoch)
            for (x, y), (subimages, labels) in zip(whole, own, strict=True):
                expected = d.split(x.to(dtype))[:, list(share)]  # as the model sees them: cast, then split
                assert subimages.dtype == (dtype if 4 in share else torch.float32)
                assert torch.equal(subimages.to(dtype), expected) and torch.equal(labels, y), (share, train)


# -- the local phase ----------------------------------------------------------------------------------------


class _Averaged:
    """A loader's batches with the whole images replaced by the coarse level's subimage, in float64: what a CNN
    trained alone on the downsampled images reads."""

    def __init__(self, loader, decomposition: Decomposition):
        self.loader, self.decomposition = loader, decomposition

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def __iter__(self):
        for x, y in self.loader:
            yield self.decomposition.coarse_subimage(x.double()), y


def _states(model: LocalCNNs) -> list[dict[str, torch.Tensor]]:
    state = model.net.state_dict()
    return [model.net.split_state(state, i) for i in range(model.num_local_cnns)]


def test_the_coarse_level_leaves_the_local_cnns_as_they_train_without_it(tiny_data_config):
    """2 epochs, float64, cropped and flipped: with the coarse level, the four local CNNs end as the four trained
    without it (the same start and batches), and the coarse CNN as one CNN trained alone on the averaged images."""
    from ddcnn.data import load_dataset

    data = load_dataset(dataclasses.replace(tiny_data_config, flip=True))
    shape = data.image_shape
    coarse = Decomposition((2, 2), shape, coarse=True)
    torch.manual_seed(0)
    with_coarse = LocalCNNs("vgg3", coarse, 1, 3, width=0.25)
    without = LocalCNNs("vgg3", Decomposition((2, 2), shape), 1, 3, width=0.25)
    alone = LocalCNNs("vgg3", Decomposition((1, 1), coarse.subimage_shape), 1, 3, width=0.25)
    for i in range(4):
        without.load_local_cnn(i, with_coarse.local_cnn(i))
    alone.load_local_cnn(0, with_coarse.local_cnn(4))
    cfg = TrainConfig(progress=False, dtype="float64", schedule="constant", lr=0.05)
    loader_args = {"batch_size": 16, "train": True, "cfg": dataclasses.replace(tiny_data_config, flip=True),
                   "mean": data.mean, "std": data.std, "device": "cpu"}
    for model, wrap in [(with_coarse, None), (without, None), (alone, coarse)]:
        loader = make_loader(data.train, **loader_args)
        Trainer(model.double(), cfg, CPU, epochs=2).fit(loader if wrap is None else _Averaged(loader, wrap))
    trained, grid, single = _states(with_coarse), _states(without), _states(alone)
    for got, expected in zip(trained, grid + single, strict=True):  # float64: the groups' sums in another order
        torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10)
    assert not torch.equal(trained[4]["features.0.weight"], trained[0]["features.0.weight"])


@pytest.mark.parametrize("name", list_aggregators())
def test_every_aggregator_reads_the_coarse_level_as_one_more_local_cnn(name):
    d = Decomposition((2, 2), (16, 16), coarse=True)
    torch.manual_seed(0)
    local_cnns = LocalCNNs("vgg3", d, 1, 3, width=0.25)
    model = CNNDNN(local_cnns, create_aggregator(name, d.num_subdomains, 3)).eval()
    x = torch.randn(4, 1, 16, 16)
    assert local_cnns(x).shape == (4, 5, 3) and model(x).shape == (4, 3)
    spec = ModelSpec.of(model)
    assert spec.coarse and spec.to_dict()["coarse"] is True and ModelSpec.from_dict(spec.to_dict()) == spec
    rebuilt = spec.build().eval()
    rebuilt.load_state_dict(model.state_dict())
    torch.testing.assert_close(rebuilt(x), model(x), rtol=0, atol=0)


def test_the_cost_of_the_coarse_level_is_one_local_cnn():
    d = Decomposition((2, 2), (16, 16), coarse=True)
    local_cnns = LocalCNNs("vgg3", d, 1, 3, width=0.5)
    one = forward_flops(local_cnns.local_cnn(0), (1, 8, 8))
    assert forward_flops(local_cnns, (1, 16, 16)) == 5 * one > 0  # the grouped stack counts as its 5 copies
    cost = local_cnns_cost(local_cnns)
    parameters = sum(p.numel() for p in local_cnns.parameters())
    assert cost == {"flops_per_image": 5 * one, "local_cnn_flops": one, "coarse_parameters": parameters // 5,
                    "coarse_flops": one, "flops_per_image_without_coarse": 4 * one}
    counts = count_backbone_parameters("vgg3", (16, 16), 1, 3, (2, 2), width=0.5, coarse=True, flops=True)
    assert (counts.local_cnn, counts.local_total, counts.local_cnn_flops) == (parameters // 5, parameters, one)


def test_ddcnn_models_reports_the_coarse_level(capsys):
    from ddcnn.cli import main

    assert main(["models", "--backbone", "vgg3", "--image-size", "16x16", "--in-channels", "1", "--num-classes", "3",
                 "--grid", "2x2", "--width", "0.5", "--coarse"]) == 0
    out = capsys.readouterr().out
    counts = count_backbone_parameters("vgg3", (16, 16), 1, 3, (2, 2), width=0.5, coarse=True, flops=True)
    assert "grid 2x2 with a coarse level" in out and "coarse CNN parameters" in out
    row = next(line for line in out.splitlines() if line.startswith("| vgg3 |") and "MFLOP" not in line
               and line.count("|") == 7)
    flops = counts.local_cnn_flops / 1e6
    assert row == (f"| vgg3 | {counts.local_cnn:,} | {flops:,.1f} | {4 * flops:,.1f} | {5 * flops:,.1f} | "
                   f"{counts.global_cnn_flops / 1e6:,.1f} |")
    assert main(["models", "--backbone", "vgg3", "--grid", "2x2"]) == 0
    assert "coarse" not in capsys.readouterr().out


# -- methods, checkpoints, compare ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def coarse_local(tmp_path_factory, tiny_data_config):
    """A local phase with the coarse level (1 epoch) and one without it."""
    from ddcnn.config import ModelConfig
    from ddcnn.methods import run

    folders = {}
    for coarse in (True, False):
        out = tmp_path_factory.mktemp(f"local_{coarse}")
        model = ModelConfig(backbone="vgg3", width=0.25, grid=(2, 2), dnn_hidden=(16,), coarse=coarse)
        folders[coarse] = out, run(RunConfig(method="local", out=str(out), data=tiny_data_config, model=model,
                                             train=TrainConfig(epochs=1, progress=False)))
    return folders


def test_the_local_phase_reports_the_coarse_level(coarse_local):
    from ddcnn.train import load_checkpoint

    out, result = coarse_local[True]
    assert len(result.extra["test_subdomain_accuracy"]) == 5
    assert result.extra["coarse_parameters"] * 5 == result.parameters
    assert result.extra["flops_per_image"] == 5 * result.extra["coarse_flops"] > 0
    (row,) = json.loads((out / "results.json").read_text())["rows"]
    assert row["coarse_flops"] == result.extra["coarse_flops"] and row["parameters"] == result.parameters
    assert ModelSpec.from_dict(load_checkpoint(out / "local.pt")["spec"]).coarse
    _, plain = coarse_local[False]
    assert "coarse_parameters" not in plain.extra and plain.extra["flops_per_image"] == 4 * result.extra["coarse_flops"]
    assert "coarse" not in load_checkpoint(coarse_local[False][0] / "local.pt")["spec"]  # as before the option


def test_transfer_starts_from_the_local_phase_with_its_coarse_cnn(tmp_path, tiny_run, coarse_local):
    from ddcnn.phases import Experiment
    from ddcnn.phases.end_to_end import run_transfer
    from ddcnn.train import load_checkpoint

    local_dir = coarse_local[True][0]
    cfg = tiny_run(tmp_path, pretrained=str(local_dir), model__coarse=True, train__lr=0.0)  # lr 0: stays at start
    run_transfer(Experiment.from_config(cfg))
    checkpoint = load_checkpoint(tmp_path / "transfer.pt")
    state, local = checkpoint["model"], load_checkpoint(local_dir / "local.pt")["model"]
    local_cnns = model_from_checkpoint(checkpoint).local_cnns
    names = [n for n, _ in local_cnns.named_parameters()]  # not batch norm's statistics, which an epoch moves
    assert local_cnns.num_local_cnns == 5 and names
    for name in names:  # every local CNN's block, the coarse CNN's (the fifth) among them
        assert torch.equal(state[f"local_cnns.{name}"], local[name]), name
    assert ModelSpec.from_dict(checkpoint["spec"]).coarse


@pytest.mark.parametrize("coarse", [True, False])
def test_local_cnns_with_and_without_the_coarse_level_do_not_mix(tmp_path, tiny_run, coarse_local, coarse):
    from ddcnn.phases import Experiment
    from ddcnn.phases.end_to_end import run_transfer

    cfg = tiny_run(tmp_path, pretrained=str(coarse_local[not coarse][0]), model__coarse=coarse)
    expected = "has no coarse level but this run's model is with one" if coarse else "has a coarse level but"
    with pytest.raises(CheckpointMismatchError, match=expected) as error:
        run_transfer(Experiment.from_config(cfg))
    assert "\n" not in str(error.value)


def test_predict_and_export_name_the_coarse_level(tmp_path, coarse_local):
    from ddcnn.export import export
    from ddcnn.predict import format_prediction, predict

    out = coarse_local[True][0]
    image = tmp_path / "image.npy"
    np.save(image, np.random.default_rng(0).integers(0, 256, (16, 16), dtype=np.uint8))
    (p,) = predict(out / "local.pt", [image], device="cpu")
    assert len(p.subdomain_votes) == 5 and p.subdomain_positions[-1] is None
    assert [s["subdomain"] for s in p.to_dict()["subdomains"]] == [0, 1, 2, 3, "coarse"]
    assert "coarse level (the whole image)" in format_prediction(p).splitlines()[-1]
    pytest.importorskip("safetensors")
    from safetensors import safe_open

    files = export(out / "local.pt", tmp_path / "per", "safetensors", per_local_cnn=True)
    with safe_open(str(files[-1]), framework="pt") as f:
        metadata = f.metadata()
    assert metadata["subdomain"] == "4" and metadata["position"] == "null" and "coarse" in metadata["input"]


def test_compare_runs_every_method_with_the_coarse_level(tmp_path, tiny_data_config):
    from test_compare import tiny_compare

    from ddcnn.compare import compare

    cfg = tiny_compare(tmp_path, tiny_data_config, grids=("1x1", "2x2"),
                       methods=("global", "local", "dnn", "mean", "coherent", "transfer"))
    cfg.model = dataclasses.replace(cfg.model, coarse=True)
    result = compare(cfg)
    rows = {(r["method"], r.get("subdomain")): r for r in result.rows}
    assert sorted(s for m, s in rows if m == "local") == [0, 1, 2, 3, 4]  # the coarse CNN's row is subdomain 4
    one = rows["local", 0]["parameters"]
    assert rows["local", 4]["parameters"] == one and rows["global", None]["grid"] == "1x1"
    assert rows["local", 4]["coarse"] and not any(rows["local", i].get("coarse") for i in range(4))
    assert rows["local", 0]["coarse_flops"] == rows["local", 0]["flops_per_image"] / 5
    grid_mean = sum(rows["local", i]["test_accuracy"] for i in range(4)) / 4  # "local": the grid's local CNNs
    assert f"| local |  | {grid_mean:.4f} |" in result.markdown
    assert f"| 4 x {one:,} + coarse {one:,} |" in result.markdown
    for method in ("dnn", "mean", "coherent", "transfer"):
        assert rows[method, None]["parameters"] >= 5 * one and 0 <= rows[method, None]["test_accuracy"] <= 1
    assert (result.out / "subdomains.png").stat().st_size > 0


@pytest.mark.slow
def test_a_local_phase_with_the_coarse_level_on_two_processes_is_the_one_process_run(tmp_path, tiny_data_config):
    """2x2 + coarse on 2 processes (subdomains 0-1 and 2-4, the second holding the whole images for the coarse
    level), flips on: the same run as on one process, in float64."""
    from test_distributed import _tiny_local, assert_same_run, train

    def config(out):
        cfg = _tiny_local(out, dataclasses.replace(tiny_data_config, flip=True), epochs=1)
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, coarse=True))

    reference = train(config(tmp_path / "one"))
    assert_same_run(train(config(tmp_path / "two"), processes=2), reference, "local.pt")


@pytest.mark.slow
def test_coherent_training_with_the_coarse_level_on_two_processes_is_the_one_process_run(tmp_path, tiny_run):
    """The CNN-DNN model parallel: the rank of subdomains 2-4 sends its and the coarse CNN's probabilities."""
    from test_distributed import assert_same_run, train

    options = {"method": "coherent", "model__coarse": True, "train__device": "cpu", "train__threads": 1,
               "train__dtype": "float64"}
    reference = train(tiny_run(tmp_path / "one", **options))
    run = train(tiny_run(tmp_path / "two", **options), processes=2)
    assert_same_run(run, reference, "coherent.pt")
    batch, classes = run["config"]["data"]["batch_size"], 3
    # the all-gather of B x K float64 probabilities of 2 + 3 subdomains, the first rank's padded to 3
    assert run["history"][0]["comm_bytes_per_step"] == batch * 2 * 3 * classes * 8
