"""Backbones the user brings (``--backbone package.module:function``): the factory contract and its one-line errors,
the N copies batched by vmap or run in a loop over one storage (same numbers, batch norm's statistics per copy),
every LocalCNNs method, the spec, ``--local-width``, and the CLI end to end on mnist5k and AdrenalMNIST3D.

The factories are in tests/user_models.py, importable as ``user_models`` (this folder is on pytest's path, and on
the PYTHONPATH of the subprocesses started here)."""

from __future__ import annotations

import copy
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import user_models
import yaml
from PIL import Image
from torch import nn

import ddcnn
from ddcnn.cli import main
from ddcnn.config import DataConfig, ModelConfig, RunConfig, TrainConfig, config_to_dict, inapplicable_options
from ddcnn.decomposition import Decomposition
from ddcnn.errors import CheckpointError, ConfigError, UnknownNameError
from ddcnn.models import LocalCNNs, ModelSpec, model_from_checkpoint, stacked
from ddcnn.models.factory import build_factory_module, check_backbone
from ddcnn.tables import COMPARE_METHODS
from ddcnn.train import load_checkpoint
from ddcnn.train.optim import build_optimizer

CNN = "user_models:make_cnn"
GRID = Decomposition((2, 2), (12, 12))
TESTS = str(Path(__file__).parent)
ADRENAL = Path(__file__).parents[2] / "shared/data/adrenalmnist3d/adrenalmnist3d_28.npz"


def images(shape: tuple[int, ...], batch: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 1, *shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# -- the contract --------------------------------------------------------------------------------------------------


def test_a_factory_is_called_with_the_keywords_it_accepts():
    calls = []

    def two(in_channels, num_classes, unrelated=5):
        calls.append(("two", in_channels, num_classes))
        return user_models.make_cnn(in_channels, num_classes, 2, (6, 6))

    def every(**kwargs):
        calls.append(("every", kwargs))
        return user_models.make_cnn(**kwargs)

    build_factory_module("t:two", two, in_channels=2, num_classes=3, image_shape=(6, 6))
    build_factory_module("t:every", every, in_channels=2, num_classes=3, image_shape=(6, 6), width=0.5)
    every_kwargs = {"in_channels": 2, "num_classes": 3, "spatial_dims": 2, "image_shape": (6, 6), "width": 0.5}
    assert calls == [("two", 2, 3), ("every", every_kwargs)]


def test_a_kwargs_factory_that_refuses_in_channels_keeps_its_own_first_layer():
    """As torchvision.models.resnet18(**kwargs): in_channels is dropped; 3-channel data fits, 1-channel data is a
    one-line error saying what to do."""
    model = build_factory_module(
        "user_models:torchvision_like", user_models.torchvision_like, in_channels=3, num_classes=4, image_shape=(8, 8)
    )
    assert isinstance(model, user_models.ThreeChannelNet) and model.fc.out_features == 4
    with pytest.raises(
        ConfigError,
        match=r"fails on inputs of shape \(2, 1, 8, 8\) .*3 channels.*takes no "
        r"in_channels keyword.*wrap it in a factory",
    ):
        build_factory_module(
            "user_models:torchvision_like",
            user_models.torchvision_like,
            in_channels=1,
            num_classes=4,
            image_shape=(8, 8),
        )


@pytest.mark.parametrize(
    "name, width, message",
    [
        (
            "user_models_gone:make",
            1.0,
            r"cannot import user_models_gone \(ModuleNotFoundError.*put it on the Python path",
        ),
        ("user_models:nothing", 1.0, r"user_models has no attribute 'nothing'"),
        ("user_models:NOT_CALLABLE", 1.0, r"NOT_CALLABLE is a int, not callable"),
        ("user_models:no_module", 1.0, r"returned a str, not an nn.Module"),
        (
            "user_models:fixed_classes",
            1.0,
            r"maps inputs of shape \(2, 1, 6, 6\) to shape \(2, 7\), not logits of shape \(2, 3\)",
        ),
        (
            "user_models:failing",
            1.0,
            r"user_models:failing\(in_channels=1, num_classes=3\) failed: RuntimeError: the factory's own bug",
        ),
        ("user_models:monai_densenet121", 0.5, r"takes no width keyword, so width 0.5"),
        ("user_models:make_cnn:x", 1.0, r"is not a factory name package.module:function"),
    ],
)
def test_a_factory_that_cannot_build_is_a_one_line_error(name, width, message):
    with pytest.raises(ConfigError, match=message) as error:
        LocalCNNs(name, GRID, 1, 3, width=width)
    assert "\n" not in str(error.value)


def test_names_are_checked_before_anything_trains(tmp_path, capsys):
    check_backbone(CNN, (0.5, 0.25))
    check_backbone("vgg3", (0.5,))
    with pytest.raises(ConfigError, match="takes no width keyword, so width 0.25"):
        check_backbone("user_models:monai_densenet121", (1.0, 0.25))
    with pytest.raises(UnknownNameError, match=r"unknown backbone 'vgg99'; choose one of: .*package.module:function"):
        check_backbone("vgg99")
    argv = ["train", "--backbone", "user_models:monai_densenet121", "--local-width", "0.5", "--grid", "2x2"]
    assert main([*argv, "--out", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "takes no width keyword, so width 0.5" in error
    assert not any(tmp_path.iterdir())  # refused before the run folder was written


# -- the copies: one storage, vmap or loop --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, grid, shape",
    [
        (CNN, (2, 2), (12, 12)),
        (CNN, (2, 2, 2), (8, 8, 8)),
        ("user_models:monai_densenet121", (2, 2), (16, 16)),
        ("user_models:monai_densenet121", (2, 2, 2), (16, 16, 16)),
    ],
)
def test_vmap_gives_the_outputs_gradients_and_statistics_of_the_loop(name, grid, shape):
    batched = LocalCNNs(name, Decomposition(grid, shape), 1, 3).double()
    assert batched.batching == "vmap"
    looped = copy.deepcopy(batched)
    looped.net.batching = "loop"
    x = images(shape, batch=4)
    outputs = []
    for model in (batched, looped):
        out = model(x)  # train mode: batch statistics, running statistics updated
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        outputs.append(out)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-10, atol=1e-12)
    for (key, p), q in zip(batched.named_parameters(), looped.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12, msg=key)
    torch.testing.assert_close(batched.state_dict(), looped.state_dict(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("batching", ["vmap", "loop"])
def test_a_train_step_updates_each_copy_as_its_own_module_on_its_subimages(batching):
    """Each local CNN's weights, running mean and variance and num_batches_tracked after an SGD step are those of
    the user's module trained alone on its subimages."""
    model = LocalCNNs(CNN, GRID, 1, 3, batching=batching).double()
    alone = [model.local_cnn(i) for i in range(4)]
    x, y = images((12, 12), batch=8), torch.arange(8) % 3
    for net, inputs in [(model, x), *((m, GRID.split(x)[:, i]) for i, m in enumerate(alone))]:
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
        logits = net(inputs)
        loss = nn.functional.cross_entropy(
            logits.flatten(0, 1) if logits.dim() == 3 else logits,
            y.repeat_interleave(4) if logits.dim() == 3 else y,
            reduction="sum",
        )
        loss.backward()
        optimizer.step()
    for i, single in enumerate(alone):
        after = model.local_cnn(i).state_dict()
        assert after.keys() == single.state_dict().keys()
        torch.testing.assert_close(after, single.state_dict(), rtol=1e-10, atol=1e-12)
        assert int(after["1.num_batches_tracked"]) == 1 and after["1.running_mean"].abs().sum() > 0


def test_the_copies_are_real_parameters_stacked_along_dim_0():
    model = LocalCNNs(CNN, GRID, 1, 3)
    single = user_models.make_cnn(1, 3, 2, GRID.subimage_shape).state_dict()
    for key, value in model.state_dict().items():
        own = single[key.removeprefix("net.")]
        assert value.shape == ((4 * own.shape[0], *own.shape[1:]) if own.dim() else (4,)), key
    assert all(isinstance(p, nn.Parameter) for p in model.parameters())
    assert {k for k, _ in model.named_parameters()} == {
        f"net.{k}" for k, p in single.items() if "running" not in k and "num_batches" not in k
    }
    # the optimizer decays what it decays in one module: the weights of convolutions and dense layers, not of norms
    optimizer = build_optimizer(model.named_parameters(), TrainConfig())
    names = {id(p): k for k, p in model.named_parameters()}
    decayed = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] for p in g["params"]}
    assert decayed == {"net.0.weight", "net.4.weight", "net.9.weight", "net.11.weight"}
    again = LocalCNNs(CNN, GRID, 1, 3)
    again.load_state_dict(model.state_dict())
    x = images((12, 12)).float()
    torch.testing.assert_close(again.eval()(x), model.eval()(x))


def test_local_cnn_subset_and_stacking_give_the_users_modules_back():
    model = LocalCNNs(CNN, GRID, 1, 3).eval()
    x = images((12, 12)).float()
    expected = model(x)
    single = model.local_cnn(2).eval()
    assert isinstance(single, nn.Sequential) and single[0].in_channels == 1
    torch.testing.assert_close(single(GRID.split(x)[:, 2]), expected[:, 2])
    part = model.subset([1, 3]).eval()
    assert part.batching == "vmap" and part.is_share
    torch.testing.assert_close(part(x), expected[:, [1, 3]])
    other = LocalCNNs.from_factory(user_models.make_cnn, (2, 2), 1, 3, image_shape=(12, 12)).eval()
    assert other.backbone_name == CNN
    other.load_local_cnn(0, model.local_cnn(0))
    torch.testing.assert_close(other(x)[:, 0], expected[:, 0])
    stacked_back = LocalCNNs.from_local_cnns(
        [model.local_cnn(i) for i in range(4)], GRID, CNN, in_channels=1, num_classes=3
    ).eval()
    torch.testing.assert_close(stacked_back(x), expected)


def test_a_module_vmap_cannot_batch_runs_in_a_loop_and_says_so(monkeypatch, caplog):
    monkeypatch.setattr(stacked, "_PROBED", {})
    with caplog.at_level("INFO", logger="ddcnn.models.stacked"):
        model = LocalCNNs("user_models:InPlaceScale", GRID, 1, 3)
        LocalCNNs(CNN, GRID, 1, 3)
    assert model.batching == "loop"
    lines = [r.getMessage() for r in caplog.records]
    assert any("InPlaceScale: the local CNNs run in a loop" in m and "vmap failed on a probe" in m for m in lines)
    assert any(f"{CNN}: the local CNNs run batched" in m for m in lines) and len(lines) == 2
    assert model(images((12, 12)).float()).shape == (6, 4, 3)


def test_a_checkpoint_names_its_factory_and_is_rebuilt_by_importing_it():
    model = LocalCNNs(CNN, GRID, 1, 3).eval()
    state = {"spec": ModelSpec.of(model).to_dict(), "model": model.state_dict()}
    rebuilt = model_from_checkpoint(state, "x.pt")
    x = images((12, 12)).float()
    torch.testing.assert_close(rebuilt(x), model(x))
    state["spec"]["backbone"] = "user_models_gone:make_cnn"
    with pytest.raises(
        CheckpointError,
        match=r"x.pt was trained with the backbone factory user_models_gone:make_cnn, "
        r"which does not build here \(backbone .*cannot import",
    ):
        model_from_checkpoint(state, "x.pt")


# -- --local-width ----------------------------------------------------------------------------------------------------


def test_local_width_narrows_the_local_cnns_only(capsys):
    m = ModelConfig(width=0.5, local_width=0.25)
    assert (m.width_of(1), m.width_of(4), ModelConfig(width=0.5).width_of(4)) == (0.5, 0.25, 0.5)
    with pytest.raises(ConfigError, match="local_width must be a positive multiplier"):
        ModelConfig(local_width=0.0)
    (warning,) = inapplicable_options(RunConfig(method="global", model=ModelConfig(local_width=0.5)))
    assert warning.startswith("--local-width has no effect on the global CNN")
    assert (
        main(
            [
                "models",
                "--backbone",
                f"vgg3,{CNN}",
                "--image-size",
                "16x16",
                "--in-channels",
                "1",
                "--local-width",
                "0.5",
            ]
        )
        == 0
    )
    table = capsys.readouterr().out
    assert "width 1, local CNNs at width 0.5" in table
    wide = LocalCNNs(CNN, GRID, 1, 10, width=1.0)
    narrow = LocalCNNs(CNN, GRID, 1, 10, width=0.5)
    one = sum(p.numel() for p in narrow.parameters()) // 4
    assert one < sum(p.numel() for p in wide.parameters()) // 4
    assert f"| {CNN} | " in table and f"| {one:,} | {4 * one:,} |" in table.split(CNN)[1].splitlines()[0]
    assert main(["models", "--backbone", "user_models:monai_densenet121", "--local-width", "0.5"]) == 2
    assert "takes no width keyword" in capsys.readouterr().err


# -- end to end: compare, evaluate, predict, export, torchrun --------------------------------------------------------


def _compare(out: Path, *flags: str) -> list[dict]:
    argv = [
        "compare",
        "--epochs",
        "1",
        "--local-epochs",
        "1",
        "--aggregator-epochs",
        "1",
        "--coherent-epochs",
        "1",
        "--backbone",
        CNN,
        "--width",
        "0.5",
        "--local-width",
        "0.25",
        "--dnn-hidden",
        "16",
        "--no-progress",
        "--device",
        "cpu",
        "--out",
        str(out),
        "--cache-dir",
        str(out / "cache"),
        "-q",
        *flags,
    ]
    assert main(argv) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert {r["method"] for r in rows} == set(COMPARE_METHODS)
    return rows


@pytest.fixture(scope="module")
def mnist_compare(tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("compare_mnist")
    return out, _compare(out, "--dataset", "mnist5k", "--limit-train", "64", "--batch-size", "32", "--grids", "2x2")


@pytest.mark.slow
def test_compare_runs_every_method_with_a_user_model_and_local_width(mnist_compare):
    out, rows = mnist_compare
    local, global_ = (load_checkpoint(out / f) for f in ("2x2/seed0/local.pt", "1x1/seed0/global.pt"))
    assert (local["spec"]["backbone"], local["spec"]["width"], global_["spec"]["width"]) == (CNN, 0.25, 0.5)
    one_local = user_models.make_cnn(1, 10, 2, (14, 14), width=0.25)
    assert {r["parameters"] for r in rows if r["method"] == "local"} == {sum(p.numel() for p in one_local.parameters())}
    assert "backbone user_models:make_cnn (width 0.5, local CNNs 0.25)" in (out / "results.md").read_text()


@pytest.mark.slow
def test_evaluate_predict_and_export_a_user_model_from_its_checkpoint(mnist_compare, tmp_path, capsys):
    out, rows = mnist_compare
    folder = out / "2x2" / "seed0"
    for checkpoint, method in ((folder / "dnn.pt", "dnn"), (out / "1x1" / "seed0" / "global.pt", "global")):
        capsys.readouterr()
        assert main(["evaluate", "--checkpoint", str(checkpoint), "--device", "cpu", "-q"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["accuracy"] == next(r["test_accuracy"] for r in rows if r["method"] == method)
    model = ddcnn.load(folder / "dnn.pt")
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 1, 28, 28), dtype=np.uint8))
    with torch.no_grad():
        expected = model(x)
    paths = []
    for i, image in enumerate(x):
        paths.append(tmp_path / f"digit{i}.png")
        Image.fromarray(image[0].numpy()).save(paths[-1])
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(folder / "dnn.pt"), "--json", "--device", "cpu", *map(str, paths)]) == 0
    predicted = [json.loads(line)["class_index"] for line in capsys.readouterr().out.splitlines()]
    assert predicted == expected.argmax(-1).tolist()
    for format in ("torchscript", "onnx", "safetensors"):
        assert (
            main(
                [
                    "export",
                    "--checkpoint",
                    str(folder / "dnn.pt"),
                    "--format",
                    format,
                    "--out",
                    str(tmp_path / f"model.{format}"),
                    "-q",
                ]
            )
            == 0
        )
    torch.testing.assert_close(
        torch.jit.load(str(tmp_path / "model.torchscript"))(x.float()), expected, atol=1e-5, rtol=0
    )
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"images": x.float().numpy()})[0], expected.numpy(), atol=1e-5)


@pytest.mark.slow
def test_each_local_cnn_exports_as_the_users_own_module(mnist_compare, tmp_path):
    from safetensors.torch import load_file

    out, _ = mnist_compare
    assert (
        main(
            [
                "export",
                "--checkpoint",
                str(out / "2x2/seed0/local.pt"),
                "--format",
                "safetensors",
                "--per-local-cnn",
                "--out",
                str(tmp_path),
                "-q",
            ]
        )
        == 0
    )
    local_cnns = ddcnn.load(out / "2x2/seed0/local.pt").model
    single = user_models.make_cnn(1, 10, 2, (14, 14), width=0.25)
    single.load_state_dict(load_file(str(tmp_path / "local_cnn_1.safetensors")))  # strict: the user's own keys
    subimages = local_cnns.decomposition.split(torch.randn(5, 1, 28, 28))
    with torch.no_grad():
        torch.testing.assert_close(single.eval()(subimages[:, 1]), local_cnns.forward_subimages(subimages)[:, 1])


@pytest.mark.slow
def test_compare_on_adrenalmnist3d_volumes_with_a_user_model(tmp_path, make_npz):
    """On the shared AdrenalMNIST3D (28^3) where a checkout has ../shared next to it, else on 28^3 volumes of the
    same shape written here: the 3D path runs either way."""
    volumes = ADRENAL if ADRENAL.is_file() else make_npz(tmp_path / "volumes.npz", n=64, shape=(28, 28, 28), classes=2)
    rows = _compare(
        tmp_path,
        "--dataset",
        f"npz:{volumes}",
        "--limit-train",
        "32",
        "--batch-size",
        "16",
        "--grids",
        "2x2x2",
        "--width",
        "0.25",
    )
    assert sorted(r["subdomain"] for r in rows if r["method"] == "local") == list(range(8))
    assert load_checkpoint(tmp_path / "2x2x2/seed0/transfer.pt")["spec"]["image_shape"] == [28, 28, 28]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(cfg: RunConfig, processes: int = 1) -> dict:
    """``ddcnn train`` of ``cfg`` in ``processes`` gloo processes under torchrun (1: plain python), one thread each,
    with this folder on PYTHONPATH so that every process imports the factory; the run's results.json."""
    config = Path(cfg.out) / "run.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(yaml.safe_dump(config_to_dict(cfg)))
    launcher = ["-m", "torch.distributed.run", f"--nproc-per-node={processes}", f"--master-port={_free_port()}"]
    command = [sys.executable, *(launcher if processes > 1 else []), "-m", "ddcnn", "train", "--config", str(config)]
    path = os.pathsep.join([str(Path(ddcnn.__file__).parents[1]), TESTS, os.environ.get("PYTHONPATH", "")])
    done = subprocess.run(
        command,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return json.loads((Path(cfg.out) / "results.json").read_text())


def _local_run(out: Path, data: DataConfig, epochs: int, **changes) -> RunConfig:
    return RunConfig(
        method="local",
        out=str(out),
        data=data,
        model=ModelConfig(backbone=CNN, width=0.5, grid=(2, 2)),
        train=TrainConfig(
            epochs=epochs, schedule="constant", lr=0.02, progress=False, device="cpu", threads=1, dtype="float64"
        ),
        **changes,
    )


@pytest.mark.slow
def test_model_parallel_torchrun_on_3_then_2_processes_is_the_one_process_run(tmp_path, tiny_data_config):
    """The local phase of a user model over 3 processes (1, 1 and 2 subdomains) for one epoch, resumed on 2 for a
    second: the checkpoint of one process training 2 epochs, within float64 rounding."""
    reference = _train(_local_run(tmp_path / "one", tiny_data_config, epochs=2))
    _train(_local_run(tmp_path / "many", tiny_data_config, epochs=1), processes=3)
    resumed = _train(_local_run(tmp_path / "many", tiny_data_config, epochs=2, resume=True), processes=2)
    assert resumed["rows"][-1]["test_accuracy"] == reference["rows"][-1]["test_accuracy"]
    state, expected = (load_checkpoint(tmp_path / name / "local.pt") for name in ("many", "one"))
    assert state["spec"]["backbone"] == CNN and state["model"].keys() == expected["model"].keys()
    torch.testing.assert_close(state["model"], expected["model"], rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(state["optimizer"]["state"], expected["optimizer"]["state"], rtol=1e-8, atol=1e-10)


@pytest.mark.slow
@pytest.mark.parametrize("data", ["mnist5k", "volumes"])
def test_compare_runs_every_method_with_the_built_in_densenet121(tmp_path, make_npz, data):
    """Issue #15's "done when": ``ddcnn compare --backbone densenet121`` on mnist5k and on 3D volumes (the shared
    AdrenalMNIST3D where it is next to the checkout, else volumes of its shape), at a tiny width."""
    if data == "mnist5k":
        flags = ["--dataset", "mnist5k", "--grids", "2x2"]
    else:
        volumes = ADRENAL if ADRENAL.is_file() else make_npz(tmp_path / "v.npz", n=64, shape=(28, 28, 28), classes=2)
        flags = ["--dataset", f"npz:{volumes}", "--grids", "2x2x2"]
    # 2 pixels of overlap make the 14-pixel subimages 16, the least DenseNet takes
    flags += ["--backbone", "densenet121", "--width", "0.125", "--local-width", "0.125", "--overlap", "2"]
    flags += ["--limit-train", "32"]
    rows = _compare(tmp_path, *flags, "--batch-size", "16")
    spec = load_checkpoint(tmp_path / f"{flags[3]}/seed0/transfer.pt")["spec"]
    assert spec["backbone"] == "densenet121" and len(spec["image_shape"]) == (2 if data == "mnist5k" else 3)
    assert all(math.isfinite(r["test_accuracy"]) for r in rows)
