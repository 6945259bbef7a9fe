import pytest
import torch

from ddcnn.config import DataConfig, TrainConfig
from ddcnn.data import ImageSet, make_loader
from ddcnn.decomposition import Decomposition
from ddcnn.errors import CheckpointMismatchError
from ddcnn.models import LocalCNNs, create_model, list_models
from ddcnn.models.aggregators import create_aggregator
from ddcnn.models.cnn_dnn import CNNDNN
from ddcnn.models.layers import split_state_dict
from ddcnn.models.spec import ModelSpec
from ddcnn.train import Trainer, save_checkpoint
from ddcnn.train.evaluation import classification_loss

CPU = torch.device("cpu")
SHAPE = (16, 16)
GRID = (2, 2)
# their ImageNet stems need subimages of at least 16x16
LARGER_SHAPE = {name: (32, 32) for name in ("resnet18", "resnet50", "densenet121", "densenet169")}


def separate_models(name: str, decomposition: Decomposition, classes: int = 3) -> list[torch.nn.Module]:
    """N independent standalone CNNs, each with its own random initialisation."""
    models = []
    for i in range(decomposition.num_subdomains):
        torch.manual_seed(i)
        models.append(
            create_model(name, in_channels=2, num_classes=classes, spatial_dims=2, width=0.25, groups=1,
                         input_shape=decomposition.subimage_shape)
        )
    return models


@pytest.mark.parametrize("train_mode", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list_models())
def test_batched_local_cnns_equal_separate_models(name, train_mode):
    shape = LARGER_SHAPE.get(name, SHAPE)
    decomposition = Decomposition(GRID, shape, overlap=2)
    models = separate_models(name, decomposition)
    batched = LocalCNNs.from_local_cnns(models, decomposition, name, width=0.25)
    # in float64: the grouped and the separate convolutions sum in different orders, which in float32 differs by
    # ~1e-7 relative and train-mode batch norm over 4 images of 1x1 maps (resnet18) amplifies to ~1e-3 on some CPUs;
    # in float64 the same amplification leaves ~1e-12, so 1e-8 holds on any CPU and still catches any real bug
    for m in [batched, *models]:
        m.double().train(train_mode)
    x = torch.randn(4, 2, *shape, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0])

    logits = batched(x)
    subimages = decomposition.split(x)
    # each standalone CNN gets its own contiguous subimages, as it would in a process of its own
    separate = torch.stack([m(subimages[:, i].contiguous()) for i, m in enumerate(models)], 1)
    torch.testing.assert_close(logits, separate, rtol=1e-8, atol=1e-10)

    # the same loss (a sum of the local CNNs' own losses, see test_engine) backpropagated through both
    classification_loss(logits, y).backward()
    classification_loss(separate, y).backward()
    grouped = {k: p.grad for k, p in batched.net.named_parameters()}
    for i, m in enumerate(models):
        expected = split_state_dict(grouped, len(models), i)
        for k, p in m.named_parameters():  # sums in another order: tolerance relative to the largest
            torch.testing.assert_close(expected[k], p.grad, rtol=1e-8, atol=1e-10 * float(p.grad.abs().max()))


def test_each_local_cnn_exports_and_loads_back_exactly():
    decomposition = Decomposition(GRID, SHAPE)
    torch.manual_seed(0)
    batched = LocalCNNs("vgg3", decomposition, 2, 3, width=0.25)
    before = {k: v.clone() for k, v in batched.state_dict().items()}
    exported = [batched.local_cnn(i) for i in range(4)]
    x = torch.randn(3, 2, *SHAPE)
    batched.eval()
    for i, m in enumerate(exported):
        torch.testing.assert_close(m.eval()(decomposition.split(x)[:, i]), batched(x)[:, i], rtol=0, atol=1e-6)

    # load local CNN 3 into position 1: only position 1 changes, and it then equals local CNN 3 exactly
    batched.load_local_cnn(1, exported[3])
    for k, v in batched.net.state_dict().items():
        if v.dim() == 0:
            continue
        chunks, old = v.chunk(4), before[f"net.{k}"].chunk(4)
        assert torch.equal(chunks[1], exported[3].state_dict()[k])
        for j in (0, 2, 3):
            assert torch.equal(chunks[j], old[j])
    batched.load_local_cnn(1, exported[1])
    for k, v in batched.state_dict().items():
        assert torch.equal(v, before[k]), k


def cnn_dnn(grid=GRID, backbone="vgg3", classes=3, aggregator="dnn", seed=0) -> CNNDNN:
    torch.manual_seed(seed)
    decomposition = Decomposition(grid, (16, 16))
    local = LocalCNNs(backbone, decomposition, 1, classes, width=0.25)
    return CNNDNN(local, create_aggregator(aggregator, decomposition.num_subdomains, classes))


def test_cnn_dnn_forward_and_local_probabilities():
    model = cnn_dnn().eval()
    x = torch.randn(5, 1, 16, 16)
    scores, local = model.forward_with_local(x)
    assert scores.shape == (5, 3) and local.shape == (5, 4, 3)
    torch.testing.assert_close(local.sum(-1), torch.ones(5, 4))
    torch.testing.assert_close(model(x), scores)
    torch.testing.assert_close(model.forward_local(x), model.local_cnns(x).softmax(-1))


def test_cnn_dnn_refuses_an_aggregator_of_another_size():
    model = cnn_dnn()
    with pytest.raises(ValueError, match="does not fit 4 local CNNs"):
        CNNDNN(model.local_cnns, create_aggregator("dnn", 9, 3))


def local_checkpoint(tmp_path, model: CNNDNN, name="local.pt"):
    """A local-phase checkpoint as the Trainer writes it."""
    state = {"model": model.local_cnns.state_dict(), "spec": ModelSpec.of(model.local_cnns).to_dict()}
    return save_checkpoint(state, tmp_path / name)


def test_from_pretrained_copies_the_local_cnns_exactly(tmp_path):
    pretrained = cnn_dnn(seed=1)
    path = local_checkpoint(tmp_path, pretrained)
    fresh = cnn_dnn(seed=2)
    aggregator_before = {k: v.clone() for k, v in fresh.aggregator.state_dict().items()}
    model = CNNDNN.from_pretrained(path, fresh.local_cnns, fresh.aggregator)
    for k, v in pretrained.local_cnns.state_dict().items():
        assert torch.equal(model.local_cnns.state_dict()[k], v), k
    for k, v in model.aggregator.state_dict().items():  # the aggregator keeps its own initialisation
        assert torch.equal(v, aggregator_before[k])


def test_from_pretrained_reads_a_local_checkpoint_of_release_0_1(tmp_path):
    pretrained = cnn_dnn(seed=1)
    local_cnns, d = pretrained.local_cnns, pretrained.local_cnns.decomposition
    meta = {"kind": "local_cnns", "backbone": "vgg3", "width": local_cnns.width, "grid": list(d.grid),
            "overlap": d.overlap, "in_channels": 1, "num_classes": 3, "image_shape": list(d.image_shape)}
    path = save_checkpoint({"model": local_cnns.state_dict(), "meta": meta}, tmp_path / "local.pt")  # no "spec"
    fresh = cnn_dnn(seed=2)
    model = CNNDNN.from_pretrained(path, fresh.local_cnns, fresh.aggregator)
    for k, v in local_cnns.state_dict().items():
        assert torch.equal(model.local_cnns.state_dict()[k], v), k


def test_from_pretrained_copies_the_aggregator_from_a_cnn_dnn_checkpoint(tmp_path):
    pretrained = cnn_dnn(seed=1)
    spec = ModelSpec.of(pretrained).to_dict()
    path = save_checkpoint({"model": pretrained.state_dict(), "spec": spec}, tmp_path / "dnn.pt")
    fresh = cnn_dnn(seed=2)
    model = CNNDNN.from_pretrained(path, fresh.local_cnns, fresh.aggregator, with_aggregator=True)
    for k, v in pretrained.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


@pytest.mark.parametrize(
    "other, message",
    [
        (dict(backbone="resnet20"), "backbone 'resnet20' but this run needs 'vgg3'"),
        (dict(grid=(4, 4)), r"grid \(4, 4\) but this run needs \(2, 2\)"),
        (dict(classes=5), "num_classes 5 but this run needs 3"),
    ],
)
def test_from_pretrained_refuses_another_backbone_grid_or_classes(tmp_path, other, message):
    path = local_checkpoint(tmp_path, cnn_dnn(**other))
    fresh = cnn_dnn()
    with pytest.raises(CheckpointMismatchError, match=message) as info:
        CNNDNN.from_pretrained(path, fresh.local_cnns, fresh.aggregator)
    assert "\n" not in str(info.value)


def test_from_pretrained_checks_shapes_even_when_the_spec_agrees(tmp_path):
    other = cnn_dnn(classes=5)
    spec = ModelSpec.of(cnn_dnn().local_cnns).to_dict()  # the spec lies: says 3 classes
    path = save_checkpoint({"model": other.local_cnns.state_dict(), "spec": spec}, tmp_path / "local.pt")
    fresh = cnn_dnn()
    with pytest.raises(CheckpointMismatchError, match="has shape"):
        CNNDNN.from_pretrained(path, fresh.local_cnns, fresh.aggregator)


def test_from_pretrained_wants_a_cnn_dnn_checkpoint_for_the_aggregator(tmp_path):
    path = local_checkpoint(tmp_path, cnn_dnn())
    fresh = cnn_dnn()
    with pytest.raises(CheckpointMismatchError, match="holds no trained aggregator"):
        CNNDNN.from_pretrained(path, fresh.local_cnns, fresh.aggregator, with_aggregator=True)


def test_coherent_training_moves_every_local_cnn():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(64) % 3
    images = torch.randint(0, 255, (64, 1, 16, 16), generator=g, dtype=torch.uint8)
    loader = make_loader(ImageSet(images, labels), batch_size=16, train=True, cfg=DataConfig(augment=False),
                         mean=(0.5,), std=(0.3,), device=CPU)
    model = cnn_dnn()
    before = [model.local_cnns.local_cnn(i).state_dict() for i in range(4)]
    Trainer(model, TrainConfig(progress=False), CPU, epochs=1).fit(loader)
    for i in range(4):
        after = model.local_cnns.local_cnn(i).state_dict()
        weights = [k for k, v in after.items() if k.endswith("weight")]
        assert all(not torch.equal(after[k], before[i][k]) for k in weights), f"local CNN {i} did not move"


def test_an_aggregator_that_reads_logits_gets_the_local_logits():
    torch.manual_seed(0)
    decomposition = Decomposition(GRID, SHAPE)
    local = LocalCNNs("vgg3", decomposition, 1, 3, width=0.25)
    linear = create_aggregator("linear", 4, 3, local_output="logits")
    model = CNNDNN(local, linear).eval()
    x = torch.randn(5, 1, 16, 16)
    with torch.no_grad():
        logits = local(x)
        assert not torch.allclose(logits, logits.softmax(-1))  # the hand-made case where the two differ
        torch.testing.assert_close(model.forward_local(x), logits)
        torch.testing.assert_close(model(x), linear(logits))
        assert not torch.allclose(model(x), linear(logits.softmax(-1)))
        scores, probabilities = model.forward_with_local(x)  # the local probabilities still, for predict
    torch.testing.assert_close(probabilities, logits.softmax(-1))
    torch.testing.assert_close(scores, model(x))


@pytest.mark.parametrize("aggregator", ["attention", "dnn"])
def test_a_spec_rebuilds_an_aggregator_that_reads_logits(tmp_path, aggregator):
    from ddcnn.config import ModelConfig
    from ddcnn.models.aggregators import aggregator_options
    from ddcnn.models.spec import model_from_checkpoint

    options = aggregator_options(aggregator, ModelConfig(local_output="logits", dnn_hidden=(8,)))
    torch.manual_seed(0)
    local = LocalCNNs("vgg3", Decomposition(GRID, SHAPE), 1, 3, width=0.25)
    model = CNNDNN(local, create_aggregator(aggregator, 4, 3, **options)).eval()
    spec = ModelSpec.of(model, aggregator_options=options)
    assert ModelSpec.from_dict(spec.to_dict()) == spec and spec.aggregator_options["local_output"] == "logits"
    path = save_checkpoint({"model": model.state_dict(), "spec": spec.to_dict()}, tmp_path / f"{aggregator}.pt")
    rebuilt = model_from_checkpoint(path)
    assert rebuilt.aggregator.local_output == "logits"
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x))


def test_an_aggregator_is_not_copied_into_one_that_reads_other_local_outputs(tmp_path):
    pretrained = cnn_dnn(seed=1)  # a dnn on probabilities
    spec = ModelSpec.of(pretrained).to_dict()
    path = save_checkpoint({"model": pretrained.state_dict(), "spec": spec}, tmp_path / "dnn.pt")
    fresh = cnn_dnn(seed=2)
    reads_logits = create_aggregator("dnn", 4, 3, local_output="logits")
    with pytest.raises(CheckpointMismatchError, match="reads the local probabilities, but this run's reads the local "
                       "logits"):
        CNNDNN.from_pretrained(path, fresh.local_cnns, reads_logits, with_aggregator=True)
