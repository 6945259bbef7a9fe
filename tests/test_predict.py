import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import train_global_and_aggregation
from PIL import Image

from ddcnn.checkpoint import require_keys
from ddcnn.cli import main
from ddcnn.errors import CheckpointError, CorruptImageError, DatasetError
from ddcnn.models import model_from_checkpoint
from ddcnn.phases import Experiment
from ddcnn.predict import format_predictions, predict, resolve_checkpoint
from ddcnn.train import load_checkpoint


@pytest.fixture(scope="module")
def trained(tiny_data_config, tmp_path_factory):
    return train_global_and_aggregation(tiny_data_config, tmp_path_factory)


@pytest.fixture(scope="module")
def test_images(trained, tiny_data_config, tmp_path_factory):
    """The first test images as PNG files, and the same images as the data loader feeds them."""
    folder = tmp_path_factory.mktemp("images")
    cfg = load_checkpoint(trained["aggregation"] / "dnn.pt")["config"]
    from ddcnn.config import RunConfig, config_from_dict

    exp = Experiment.from_config(config_from_dict(RunConfig, cfg))
    pixels = exp.data.test.images[:5]
    paths = []
    for i, image in enumerate(pixels):
        paths.append(folder / f"test{i}.png")
        Image.fromarray(image[0].numpy()).save(paths[-1])
    x, _ = next(iter(exp.loader("test")))
    return paths, x[:5]


def test_predict_matches_the_model_on_its_own_data(trained, test_images):
    paths, x = test_images
    state = load_checkpoint(trained["aggregation"] / "dnn.pt")
    model = model_from_checkpoint(state)
    with torch.no_grad():
        scores, local = model.forward_with_local(x)
    predictions = predict(trained["aggregation"], paths, device="cpu")
    assert [p.path for p in predictions] == [str(p) for p in paths]
    for i, p in enumerate(predictions):
        probabilities = scores[i].softmax(-1)
        assert p.prediction.class_index == int(probabilities.argmax())
        assert p.prediction.class_name == state["spec"]["class_names"][p.prediction.class_index]
        assert p.prediction.probability == pytest.approx(float(probabilities.max()), abs=1e-5)
        assert [v.class_index for v in p.subdomain_votes] == local[i].argmax(-1).tolist()
        assert p.subdomain_positions == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_predict_command_prints_class_and_subdomain_votes(trained, test_images, capsys):
    paths, _ = test_images
    assert main(["predict", "--checkpoint", str(trained["aggregation"]), *map(str, paths[:2]), "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 * 5  # per image: the prediction and 4 subdomain votes
    assert lines[0].startswith(f"{paths[0]}: ") and "(probability " in lines[0]
    assert lines[4].startswith("  subdomain 3 at (1, 1): ")

    assert main(["predict", "--checkpoint", str(trained["global"] / "global.pt"), str(paths[0])]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and "subdomain" not in lines[0]


def test_predict_json_prints_one_object_per_image_with_top_k_and_votes(trained, test_images, capsys):
    paths, _ = test_images
    argv = ["predict", "--checkpoint", str(trained["aggregation"]), *map(str, paths[:3]), "--json", "--top-k", "2"]
    assert main(argv) == 0
    objects = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    expected = predict(trained["aggregation"], paths[:3], device="cpu")
    assert [o["file"] for o in objects] == [str(p) for p in paths[:3]]
    for o, p in zip(objects, expected):
        assert (o["class"], o["class_index"]) == (p.prediction.class_name, p.prediction.class_index)
        assert o["probability"] == pytest.approx(p.prediction.probability, abs=1e-6)
        assert len(o["top_k"]) == 2 and o["top_k"][0]["class"] == o["class"]
        assert o["top_k"][0]["probability"] >= o["top_k"][1]["probability"]
        assert [(s["subdomain"], s["position"]) for s in o["subdomains"]] == [
            (0, [0, 0]), (1, [0, 1]), (2, [1, 0]), (3, [1, 1])]
        assert [s["class_index"] for s in o["subdomains"]] == [v.class_index for v in p.subdomain_votes]
    assert main([*argv[:-2], "--top-k", "10"]) == 0  # more than the classes: all of them
    assert all(len(json.loads(line)["top_k"]) == 3 for line in capsys.readouterr().out.splitlines())


def test_predict_takes_folders_and_globs_sorted_and_streams_batches(trained, test_images, capsys):
    paths, _ = test_images
    folder = paths[0].parent
    whole = predict(trained["aggregation"], paths, device="cpu")
    by_folder = predict(trained["aggregation"], [folder], device="cpu", batch_size=2)  # 3 batches of 2, 2, 1
    by_glob = predict(trained["aggregation"], [str(folder / "test[13]*.png")], device="cpu")
    assert [p.path for p in by_folder] == [str(p) for p in sorted(paths)]
    assert [p.path for p in by_glob] == [str(paths[1]), str(paths[3])]
    for a, b in zip(whole, by_folder):
        assert a.prediction.class_index == b.prediction.class_index
        assert a.prediction.probability == pytest.approx(b.prediction.probability, abs=1e-6)
    argv = ["predict", "--checkpoint", str(trained["global"]), str(folder), "--batch-size", "2"]
    assert main(argv) == 0
    one_by_one = [format_predictions(predict(trained["global"], [p], device="cpu")) for p in paths]
    assert capsys.readouterr().out.splitlines() == one_by_one  # the text of a global CNN: one line per image


def test_predict_converts_mode_and_size_like_the_training_data(trained, tmp_path):
    rgba = Image.new("RGBA", (40, 24), (200, 10, 10, 255))
    rgba.save(tmp_path / "color.png")
    np.save(tmp_path / "array.npy", np.random.default_rng(0).random((16, 16)))  # floats in [0, 1]
    predictions = predict(trained["aggregation"] / "dnn.pt", [tmp_path / "color.png", tmp_path / "array.npy"])
    assert len(predictions) == 2 and all(len(p.subdomain_votes) == 4 for p in predictions)


def test_unreadable_files_are_one_line_errors(trained, tmp_path, capsys):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(CorruptImageError, match="broken.png cannot be decoded"):
        predict(trained["global"], [tmp_path / "broken.png"])
    assert main(["predict", "--checkpoint", str(trained["global"]), str(tmp_path / "missing.png")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "missing.png does not exist" in error
    np.save(tmp_path / "wrong.npy", np.zeros((3, 16, 16)))
    with pytest.raises(DatasetError, match=r"has shape \(3, 16, 16\); the model takes 16x16 inputs with 1 channel"):
        predict(trained["global"], [tmp_path / "wrong.npy"])


def test_a_run_folder_with_several_checkpoints_needs_one_named(trained):
    assert resolve_checkpoint(trained["aggregation"]).name == "dnn.pt"  # results.json names the method
    (trained["aggregation"] / "results.json").unlink()
    with pytest.raises(CheckpointError, match=r"holds several checkpoints \(dnn.pt, local.pt\); pass one"):
        resolve_checkpoint(trained["aggregation"])


def cli_error(capsys, argv: list[str]) -> str:
    """The one line ``ddcnn ARGV`` prints on stderr, having exited with status 2 (and no traceback)."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("ddcnn: error: "), err
    return err


def test_a_folder_without_images_is_a_one_line_error(trained, tmp_path, capsys):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "notes.txt").write_text("not an image")
    with pytest.raises(DatasetError, match=r"photos is a folder with no image files in it"):
        predict(trained["global"], [tmp_path / "photos"])
    argv = ["predict", "--checkpoint", str(trained["global"]), str(tmp_path / "photos")]
    assert "photos is a folder with no image files" in cli_error(capsys, argv)
    assert "matches no files" in cli_error(capsys, [*argv[:3], str(tmp_path / "*.png")])
    with pytest.raises(DatasetError, match=r"no images given"):
        predict(trained["global"], [])


def write_bad_checkpoints(folder: Path) -> dict[str, Path]:
    """Files named .pt that are not ddcnn checkpoints, by what is wrong with them."""
    files = {name: folder / f"{name}.pt" for name in ("empty", "text", "npy", "tensor", "no model", "truncated")}
    files["empty"].write_bytes(b"")
    files["text"].write_text("model: vgg9\n")
    np.save(folder / "array.npy", np.zeros(3))
    (folder / "array.npy").rename(files["npy"])
    torch.save(torch.zeros(3), files["tensor"])
    torch.save({"weights": torch.zeros(3)}, files["no model"])
    torch.save({"model": {}, "spec": {}}, folder / "whole.pt")
    files["truncated"].write_bytes((folder / "whole.pt").read_bytes()[:200])
    return files


BAD_CHECKPOINTS = {
    "empty": r"empty\.pt is empty \(0 bytes\)",
    "text": r"text\.pt is not a torch checkpoint",
    "npy": r"npy\.pt is not a torch checkpoint",
    "tensor": r"tensor\.pt holds a Tensor, not a ddcnn checkpoint",
    "no model": r"no model\.pt lacks 'model', so it is not a ddcnn checkpoint \(it holds 'weights'\)",
    "truncated": r"truncated\.pt cannot be read \(.+\); it is corrupt or truncated",
}


@pytest.mark.parametrize("name", BAD_CHECKPOINTS)
def test_load_checkpoint_refuses_what_is_not_a_ddcnn_checkpoint(tmp_path, name):
    path = write_bad_checkpoints(tmp_path)[name]
    with pytest.raises(CheckpointError, match=BAD_CHECKPOINTS[name]) as error:
        load_checkpoint(path)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_predict_and_evaluate_give_one_line_for_a_bad_checkpoint(tmp_path, capsys, command):
    Image.new("L", (16, 16)).save(tmp_path / "image.png")
    for name, path in write_bad_checkpoints(tmp_path).items():
        argv = [command, "--checkpoint", str(path), *([str(tmp_path / "image.png")] if command == "predict" else [])]
        assert path.name in cli_error(capsys, argv), name


def test_a_checkpoint_without_spec_or_config_says_what_it_lacks(tmp_path, capsys):
    torch.save({"model": {}, "epoch": 3}, tmp_path / "bare.pt")
    Image.new("L", (16, 16)).save(tmp_path / "image.png")
    with pytest.raises(CheckpointError, match=r"bare\.pt lacks 'spec', 'config', so it is not a ddcnn checkpoint"):
        load_checkpoint(tmp_path / "bare.pt", require=("spec", "config"))
    argv = ["predict", "--checkpoint", str(tmp_path / "bare.pt"), str(tmp_path / "image.png")]
    assert "lacks 'spec'" in cli_error(capsys, argv)
    torch.save({"model": {}, "spec": {"class_names": ["a", "b"]}}, tmp_path / "thin.pt")
    with pytest.raises(CheckpointError, match=r"thin\.pt \(its spec\) lacks 'kind', 'backbone', 'grid', 'image_shape'"):
        predict(tmp_path / "thin.pt", [tmp_path / "image.png"])
    torch.save({"model": {}, "meta": {"class_names": ["a", "b"]}}, tmp_path / "old.pt")  # ddcnn 0.1's key
    with pytest.raises(CheckpointError, match=r"old\.pt \(its meta\) lacks 'kind', 'backbone'"):
        predict(tmp_path / "old.pt", [tmp_path / "image.png"])
    state = {"model": {}, "spec": {"kind": "local_cnns"}}
    require_keys(state, "x.pt", ("model", "spec"))  # all there: no error


def test_evaluate_a_checkpoint_without_config_is_a_one_line_error(tmp_path, capsys):
    torch.save({"model": {}, "spec": {}}, tmp_path / "bare.pt")
    assert "lacks 'config'" in cli_error(capsys, ["evaluate", "--checkpoint", str(tmp_path / "bare.pt")])


def test_an_unreadable_results_json_does_not_hide_the_run_folder_s_checkpoint(trained, tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "global.pt").write_bytes((trained["global"] / "global.pt").read_bytes())
    (folder / "results.json").write_text("{ not json")
    assert resolve_checkpoint(folder) == folder / "global.pt"
