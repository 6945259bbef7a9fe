import math
import signal

import pytest
import torch
import torch.nn.functional as F

from ddcnn.config import DataConfig, TrainConfig
from ddcnn.data import ImageSet, make_loader
from ddcnn.decomposition import Decomposition
from ddcnn.distributed import DistContext, Parallel
from ddcnn.errors import CheckpointError, TrainingDivergedError
from ddcnn.models import LocalCNNs
from ddcnn.train import Trainer, TrainingInterrupted, classification_loss, evaluate, load_checkpoint
from ddcnn.train.optim import build_scheduler

CPU = torch.device("cpu")


def _images(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    images = torch.randint(0, 60, (n, 1, 12, 12), generator=g, dtype=torch.uint8)
    for k in range(3):  # a learnable signal: a bright square whose position depends on the class
        images[labels == k, :, 4 * k : 4 * k + 4, 4:8] = 255
    return ImageSet(images, labels)


def _loader(split, train, seed=0):
    cfg = DataConfig(batch_size=16, eval_batch_size=32, crop_padding=1)
    return make_loader(split, batch_size=16 if train else 32, train=train, cfg=cfg, mean=(0.3,), std=(0.3,),
                       device=CPU, seed=seed)


def _trainer(tmp_path, epochs=3, grid=(2, 2), **train_kw):
    torch.manual_seed(0)
    model = LocalCNNs("vgg3", Decomposition(grid, (12, 12)), 1, 3, width=0.25)
    cfg = TrainConfig(epochs=epochs, lr=0.05, progress=False, **train_kw)
    return Trainer(model, cfg, CPU, epochs, checkpoint=tmp_path / "ckpt.pt", log_csv=tmp_path / "log.csv",
                   spec={"kind": "local_cnns"})


def test_local_loss_is_sum_of_independent_losses():
    logits = torch.randn(5, 4, 3)
    y = torch.randint(0, 3, (5,))
    expected = sum(F.cross_entropy(logits[:, i], y) for i in range(4))
    torch.testing.assert_close(classification_loss(logits, y), expected)


def test_training_learns_and_logs(tmp_path):
    data = _images()
    trainer = _trainer(tmp_path, epochs=4)
    result = trainer.fit(_loader(data, True), _loader(data, False))
    assert len(result.history) == 4
    assert result.history[-1]["val_accuracy"] > 0.6
    assert len(result.history[-1]["train_subdomain_accuracy"]) == 4
    assert (tmp_path / "log.csv").read_text().count("\n") == 5  # header + one row per epoch
    state = load_checkpoint(tmp_path / "ckpt.pt")
    assert state["finished"] and state["epoch"] == 4


def test_resume_after_signal_equals_uninterrupted_run(tmp_path):
    data = _images()
    straight = _trainer(tmp_path / "a")
    straight.fit(_loader(data, True))

    class Interrupting:
        """Raises SIGTERM in the middle of epoch 2, as a cluster scheduler would."""

        def __init__(self, loader):
            self.loader, self.epoch = loader, 0

        def set_epoch(self, epoch):
            self.epoch = epoch
            self.loader.set_epoch(epoch)

        def __len__(self):
            return len(self.loader)

        def __iter__(self):
            for step, batch in enumerate(self.loader):
                if self.epoch == 1 and step == 2:
                    signal.raise_signal(signal.SIGTERM)
                yield batch

    interrupted = _trainer(tmp_path / "b")
    with pytest.raises(TrainingInterrupted, match="epoch 2, step 3"):
        interrupted.fit(Interrupting(_loader(data, True)))
    resumed = _trainer(tmp_path / "b")
    resumed.fit(_loader(data, True), resume=True)
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert [r["train_loss"] for r in resumed.history] == pytest.approx([r["train_loss"] for r in straight.history])


def test_epoch_end_sees_every_epoch_and_can_end_training(tmp_path):
    data = _images()
    calls = []

    def epoch_end(trainer, row):
        calls.append((trainer.epoch, row))
        return row["epoch"] == 2  # end after the second of four epochs

    trainer = _trainer(tmp_path, epochs=4)
    trainer.epoch_end = epoch_end
    result = trainer.fit(_loader(data, True), _loader(data, False))
    assert [epoch for epoch, _ in calls] == [1, 2]
    assert [row for _, row in calls] == result.history and "val_accuracy" in result.history[-1]
    state = load_checkpoint(tmp_path / "ckpt.pt")  # the checkpoint of the last epoch trained, unfinished
    assert state["epoch"] == 2 and not state["finished"]

    everything = _trainer(tmp_path / "all", epochs=3)
    everything.epoch_end = lambda trainer, row: None  # returning nothing trains every epoch
    assert len(everything.fit(_loader(data, True)).history) == 3


def test_one_process_trains_on_the_single_process_parallel(tmp_path):
    """Without a ``parallel``, the Trainer gets a 1-process one; the phases pass theirs (N subdomains, one
    process): both train the same numbers, and communicate nothing."""
    data = _images()
    default = _trainer(tmp_path / "default", epochs=2, grad_clip=0.5)
    assert default.parallel.ctx == DistContext() and not default.parallel.sharded
    placed = _trainer(tmp_path / "placed", epochs=2, grad_clip=0.5)
    placed.parallel = Parallel(DistContext(), 4)
    runs = [trainer.fit(_loader(data, True), _loader(data, False)).history for trainer in (default, placed)]
    timing = {"seconds", "images_per_second"}
    numbers = [[{k: v for k, v in row.items() if k not in timing} for row in run] for run in runs]
    assert numbers[0] == numbers[1]
    assert all(row["comm_bytes_per_step"] == row["comm_bytes_per_epoch"] == 0 for row in runs[0])
    for name, value in default.model.state_dict().items():
        assert torch.equal(value, placed.model.state_dict()[name]), name


def test_divergence_stops_with_epoch_and_step_and_keeps_checkpoint(tmp_path):
    data = _images()
    trainer = _trainer(tmp_path, epochs=3)
    trainer.fit(_loader(data, True))  # a good checkpoint
    good = (tmp_path / "ckpt.pt").read_bytes()
    diverging = _trainer(tmp_path, epochs=3)
    diverging.model.net.head[-1].weight.data.fill_(math.nan)
    with pytest.raises(TrainingDivergedError, match="epoch 1, step 1"):
        diverging.fit(_loader(data, True))
    assert (tmp_path / "ckpt.pt").read_bytes() == good


def test_evaluate_reports_subdomains_and_probabilities():
    data = _images(40)
    model = LocalCNNs("vgg3", Decomposition((2, 2), (12, 12)), 1, 3, width=0.25)
    result = evaluate(model, _loader(data, False), TrainConfig(), CPU, collect=True)
    assert result.probabilities.shape == (40, 4, 3)
    torch.testing.assert_close(result.probabilities.sum(-1), torch.ones(40, 4))
    assert len(result.subdomain_accuracy) == 4
    assert torch.equal(result.labels, data.labels)


@pytest.mark.parametrize("schedule", ["onecycle", "cosine", "constant"])
def test_schedules_start_low_peak_and_end(schedule):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, TrainConfig(schedule=schedule, warmup_fraction=0.2), 100)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert max(lrs) == pytest.approx(1.0)
    if schedule != "constant":
        assert lrs[0] < 0.2 and lrs[-1] < 0.05


def test_crafted_checkpoint_is_refused(tmp_path):
    import pickle

    class Exploit:
        def __reduce__(self):
            return (exec, ("open('%s', 'w').write('pwned')" % (tmp_path / "pwned"),))

    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": Exploit()}, path, pickle_module=pickle)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"model": {"w": torch.zeros(1000)}}, path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(path)


@pytest.mark.parametrize("channels_last, expected", [(None, True), (True, True), (False, False)])
def test_channels_last_setting_reaches_the_backbone(tmp_path, channels_last, expected):
    trainer = _trainer(tmp_path, epochs=1, channels_last=channels_last)
    assert trainer.model.net.channels_last is expected


def test_compile_wraps_the_training_and_validation_forward_once(tmp_path, monkeypatch):
    """--compile: torch.compile is called once per Trainer, its module runs every training step and validation
    batch, and the checkpoint holds the plain model's state dict (no ``_orig_mod.`` prefix)."""
    compiled_calls = []

    class Compiled(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.inner = model  # as torch.compile's wrapper does: its state dict keys would be prefixed

        def forward(self, x):
            compiled_calls.append(len(x))
            return self.inner(x)

    compiles = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compiles.append(model) or Compiled(model))
    data = _images(48)
    _trainer(tmp_path / "eager", epochs=1).fit(_loader(data, True), _loader(data, False))
    assert compiles == [] and compiled_calls == []  # without --compile: the model itself

    trainer = _trainer(tmp_path, epochs=2, compile=True)
    assert compiles == [trainer.model]
    trainer.fit(_loader(data, True), _loader(data, False))
    assert len(compiles) == 1
    assert compiled_calls == 2 * ([16] * 3 + [32, 16])  # per epoch: 3 training steps, then 2 validation batches
    state = load_checkpoint(tmp_path / "ckpt.pt")
    assert list(state["model"]) == list(trainer.model.state_dict())


@pytest.mark.slow
def test_compiled_training_matches_eager_in_float64(tmp_path, monkeypatch):
    """torch.compile (inductor, C++ on the CPU) changes only the order of floating-point operations: in float64
    (eps 2.2e-16) one epoch of a tiny model then agrees with eager to ~1e-13, so 1e-9 leaves four orders of
    magnitude for the growth of rounding differences over the 3 steps, and any real difference (a wrong graph, a
    missed update) is far larger."""
    # a cache of its own: inductor's shared one keeps precompiled headers of the CPU capability it was built under,
    # and a run under another (ATEN_CPU_CAPABILITY=avx2 or default) then fails to compile ("at::vec has not been
    # declared")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    torch._dynamo.reset()
    data = _images(48)
    trainers = {}
    for compile in (False, True):
        torch.manual_seed(0)
        model = LocalCNNs("vgg3", Decomposition((2, 2), (12, 12)), 1, 3, width=0.25).double()
        cfg = TrainConfig(epochs=1, lr=0.05, progress=False, dtype="float64", compile=compile)
        trainers[compile] = Trainer(model, cfg, CPU, 1, checkpoint=tmp_path / f"{compile}.pt")
        trainers[compile].fit(_loader(data, True), _loader(data, False))
    eager, compiled = trainers[False], trainers[True]
    assert type(compiled._forward).__name__ == "OptimizedModule"  # really compiled
    for key in ("train_loss", "val_loss", "val_accuracy"):
        assert compiled.history[0][key] == pytest.approx(eager.history[0][key], rel=1e-9, abs=1e-12), key
    for (name, a), b in zip(eager.model.state_dict().items(), compiled.model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12, msg=name)
    assert list(load_checkpoint(tmp_path / "True.pt")["model"]) == list(eager.model.state_dict())
    torch._dynamo.reset()


def test_gradient_accumulation_equals_the_large_batch_step(tmp_path):
    """--accumulate 2 with batches of 16 takes the optimizer steps of batches of 32: the loss of each micro-batch
    is divided by 2, so the summed gradients are those of the mean loss over the 32 images, and the schedule counts
    optimizer steps. In float64 (eps 2.2e-16) the two differ only in the order of the sums, ~1e-15 per step, so
    1e-12 over the 2 epochs' 6 steps leaves orders of magnitude. The model has no batch norm: its statistics (and
    so the forward) of one batch of 32 differ from those of two of 16, so a backbone with batch norm would not
    match (--accumulate says so)."""
    data = _images(96)
    cfg = DataConfig(batch_size=16, augment=False)
    trained = {}
    for batch, accumulate in ((32, 1), (16, 2)):
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 10 * 10, 3)
        ).double()
        initial = model[0].weight.detach().clone()
        train = TrainConfig(epochs=2, lr=0.05, progress=False, dtype="float64", accumulate=accumulate)
        trainer = Trainer(model, train, CPU, 2)
        loader = make_loader(data, batch_size=batch, train=True, cfg=cfg, mean=(0.3,), std=(0.3,), device=CPU)
        trainer.fit(loader)
        trained[accumulate] = trainer
    large, accumulated = trained[1], trained[2]
    assert accumulated.scheduler.last_epoch == large.scheduler.last_epoch == 6  # optimizer steps, not batches
    for (name, a), b in zip(large.model.state_dict().items(), accumulated.model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-12, msg=name)
    assert accumulated.history[-1]["train_loss"] == pytest.approx(large.history[-1]["train_loss"], abs=1e-12)
    assert (large.model[0].weight - initial).abs().max() > 1e-3  # the steps moved the weights: a real comparison


def test_accumulation_of_an_uneven_last_step_and_the_check(tmp_path):
    """5 batches with --accumulate 2: optimizer steps of 2, 2 and 1 batches; --accumulate 0 is refused."""
    from ddcnn.errors import ConfigError

    data = _images(80)
    trainer = _trainer(tmp_path, epochs=1, accumulate=2)
    trainer.fit(_loader(data, True))
    assert trainer.scheduler.last_epoch == 3 and trainer.history[0]["images"] == 80
    with pytest.raises(ConfigError, match="accumulate"):
        TrainConfig(accumulate=0)


def test_the_float16_loss_scaler_is_made_for_cuda_float16_autocast_only():
    from ddcnn.runtime import grad_scaler

    assert grad_scaler(TrainConfig(amp=True, amp_dtype="float16"), torch.device("cuda")) is not None
    for cfg, device in [(TrainConfig(amp=True, amp_dtype="float16"), CPU), (TrainConfig(amp=True), torch.device(
            "cuda")), (TrainConfig(amp=False, amp_dtype="float16"), torch.device("cuda"))]:
        assert grad_scaler(cfg, device) is None


def test_a_loss_scaled_step_is_the_unscaled_step(tmp_path):
    """The Trainer's GradScaler path (float16 autocast on CUDA; no GPU here, so a CPU scaler): scaling the loss by
    a power of two and unscaling the gradients before clipping and the step is exact in binary floating point, so
    the weights equal those of the plain path bit for bit."""
    data = _images()
    plain = _trainer(tmp_path / "plain", epochs=1, grad_clip=0.5)
    plain.fit(_loader(data, True))
    scaled = _trainer(tmp_path / "scaled", epochs=1, grad_clip=0.5)
    scaled._scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scaled.fit(_loader(data, True))
    for name, value in plain.model.state_dict().items():
        torch.testing.assert_close(scaled.model.state_dict()[name], value, rtol=0, atol=0, msg=name)
    assert load_checkpoint(tmp_path / "scaled" / "ckpt.pt")["scaler"]["scale"] == 2.0**10  # resumable
