import numpy as np
import pytest
import torch

from poisonflow import checkpoint, trainer
from poisonflow.augment import random_crop, random_flip
from poisonflow.models import build_model
from poisonflow.trainer import train_model

TRAINING = {"epochs": 4, "batch_size": 32, "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
            "schedule": {"name": "cosine"}, "augment": ["crop", "flip"], "crop_padding": 2}


def data(n=96, size=8):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, n)
    images = (rng.random((n, size, size, 3)) * 60 + labels[:, None, None, None] * 80).astype(np.uint8)
    return images, labels


def fresh():
    torch.manual_seed(0)
    return build_model({"arch": "convnet", "width": 4}, 3, 8)


def test_training_is_deterministic_and_learns():
    images, labels = data()
    a = train_model(fresh(), images, labels, TRAINING, seed=3, record_dynamics=True)
    b = train_model(fresh(), images, labels, TRAINING, seed=3, record_dynamics=True)
    for name, tensor in a.model.state_dict().items():
        assert torch.equal(tensor, b.model.state_dict()[name]), name
    assert a.correct.shape == (4, 96) and a.loss.shape == (4, 96)
    assert a.correct[-1].mean() > 0.9  # three well separated brightness classes


def kill_after_epoch(monkeypatch, epoch: int, saves: list | None = None) -> None:
    """Make every checkpoint write raise KeyboardInterrupt right after saving ``epoch`` (a killed job)."""
    real_save = checkpoint.save

    def save_then_die(path, digest, state):
        real_save(path, digest, state)
        if saves is not None:
            saves.append(state["epoch"])
        if state["epoch"] == epoch:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save", save_then_die)


def test_killed_training_resumes_to_the_same_weights(tmp_path, monkeypatch):
    images, labels = data()
    uninterrupted = train_model(fresh(), images, labels, TRAINING, seed=1, record_dynamics=True).model

    saves = []
    with monkeypatch.context() as patch:
        kill_after_epoch(patch, 2, saves)  # as if the job were killed after epoch 2
        with pytest.raises(KeyboardInterrupt):
            train_model(fresh(), images, labels, TRAINING, seed=1, checkpoint=tmp_path / "ck.pt",
                        record_dynamics=True)
    resumed = train_model(fresh(), images, labels, TRAINING, seed=1, checkpoint=tmp_path / "ck.pt",
                          record_dynamics=True)
    assert saves == [1, 2]
    for name, tensor in uninterrupted.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name
    assert resumed.correct.shape == (4, 96) and resumed.correct[:2].any()


def test_checkpoint_of_other_data_is_not_resumed(tmp_path):
    images, labels = data()
    train_model(fresh(), images, labels, {**TRAINING, "epochs": 2}, seed=1, checkpoint=tmp_path / "ck.pt")
    changed = labels.copy()
    changed[0] = (changed[0] + 1) % 3
    state = torch.load(tmp_path / "ck.pt", weights_only=True)
    result = train_model(fresh(), images, changed, {**TRAINING, "epochs": 2}, seed=1, checkpoint=tmp_path / "ck.pt")
    assert torch.load(tmp_path / "ck.pt", weights_only=True)["digest"] != state["digest"]
    assert result.model is not None
    fresh_run = train_model(fresh(), images, changed, {**TRAINING, "epochs": 2}, seed=1).model
    for name, tensor in fresh_run.state_dict().items():  # trained from scratch, not resumed
        assert torch.equal(tensor, result.model.state_dict()[name]), name


def test_random_crop_shifts_whole_image_by_at_most_padding():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).view(2, 3, 6, 6) + 1
    out = random_crop(x, 1, torch.Generator().manual_seed(0))
    for i in range(2):
        found = False
        for dy in range(3):
            for dx in range(3):
                padded = torch.nn.functional.pad(x[i], (1, 1, 1, 1))
                if torch.equal(padded[:, dy:dy + 6, dx:dx + 6], out[i]):
                    found = True
        assert found


def test_random_flip_flips_about_half():
    x = torch.arange(1000 * 4, dtype=torch.float32).view(1000, 1, 1, 4)
    out = random_flip(x, torch.Generator().manual_seed(0))
    flipped = (out[:, 0, 0, 0] == x[:, 0, 0, 3]).float().mean()
    assert 0.45 < float(flipped) < 0.55
    assert torch.equal(torch.sort(out, dim=3).values, x)


def test_pgd_adversarial_training_runs_and_respects_budget():
    from poisonflow.adversarial import pgd

    images, labels = data(32)
    model = train_model(fresh(), images, labels, {**TRAINING, "epochs": 1,
                        "adversarial": {"eps": 4 / 255, "step": 2 / 255, "steps": 2}}, seed=0).model
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    x_adv = pgd(model, x, torch.as_tensor(labels), 4 / 255, 1 / 255, 5, generator=torch.Generator().manual_seed(0))
    assert float((x_adv - x).abs().max()) <= 4 / 255 + 1e-6
    assert float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1


# -- paper-scale trainer: switches, data placement, schedules, mixed labels ---------------------

from poisonflow import augment  # noqa: E402
from poisonflow.errors import ConfigError  # noqa: E402

torch.set_num_threads(1)


def same_weights(a, b) -> bool:
    return all(torch.equal(tensor, b.state_dict()[name]) for name, tensor in a.state_dict().items())


def largest_difference(a, b) -> float:
    return max(float((tensor.float() - b.state_dict()[name].float()).abs().max())
               for name, tensor in a.state_dict().items())


def test_defaults_equal_the_schema_defaults():
    from poisonflow import config

    raw = {"datasets": {"digits": {"source": "digits"}}, "models": {"m": {"arch": "convnet", "width": 4}},
           "trainings": {"t": {"model": "m"}}, "attacks": {"a": {"kind": "badnets"}},
           "defenses": {"n": {"kind": "none"}},
           "experiments": [{"dataset": ["digits"], "attack": ["a"], "training": ["t"], "defense": ["n"], "seed": [0]}]}
    training = config.load(raw).training("t")
    training.pop("model")
    assert training == trainer.DEFAULTS


def test_auto_switches_are_off_on_cpu_and_explicit_ones_are_kept():
    settings = trainer.with_defaults({})
    assert trainer.RuntimeSettings.resolve(settings, torch.device("cpu"), 10**6) == trainer.RuntimeSettings(
        amp=False, channels_last=False, compile=False, data_on_device=True)
    explicit = {**settings, "amp": True, "channels_last": True, "compile": False, "data_on_device": False}
    assert trainer.RuntimeSettings.resolve(explicit, torch.device("cpu"), 10**6) == trainer.RuntimeSettings(
        amp=True, channels_last=True, compile=False, data_on_device=False)
    with pytest.raises(ConfigError, match=r"^training\.amp: expected auto, true or false, got 'yes'"):
        trainer.RuntimeSettings.resolve({**settings, "amp": "yes"}, torch.device("cpu"), 1)


def test_streamed_data_train_exactly_like_resident_data(monkeypatch):
    images, labels = data()
    resident = train_model(fresh(), images, labels, TRAINING, seed=2, record_dynamics=True)
    monkeypatch.setattr(trainer, "STREAM_CHUNK_IMAGES", 64)  # 96 images: chunks of 64 and 32
    streamed = train_model(fresh(), images, labels, {**TRAINING, "data_on_device": False}, seed=2,
                           record_dynamics=True)
    assert streamed.runtime.data_on_device is False and resident.runtime.data_on_device is True
    assert same_weights(resident.model, streamed.model)
    assert np.array_equal(resident.correct, streamed.correct) and np.array_equal(resident.loss, streamed.loss)


def test_channels_last_changes_only_the_memory_layout():
    images, labels = data()
    plain = train_model(fresh(), images, labels, TRAINING, seed=2, record_dynamics=True)
    channels_last = train_model(fresh(), images, labels, {**TRAINING, "channels_last": True}, seed=2,
                                record_dynamics=True)
    assert channels_last.runtime.channels_last
    assert largest_difference(plain.model, channels_last.model) < 1e-4
    assert np.abs(plain.loss - channels_last.loss).max() < 1e-4
    assert all(p.is_contiguous() for p in channels_last.model.parameters())  # handed back in the usual layout


def test_bf16_autocast_stays_within_bf16_noise_and_still_learns():
    images, labels = data()
    fp32 = train_model(fresh(), images, labels, TRAINING, seed=2, record_dynamics=True)
    bf16 = train_model(fresh(), images, labels, {**TRAINING, "amp": True}, seed=2, record_dynamics=True)
    assert bf16.runtime.amp and not fp32.runtime.amp
    first_epoch = np.abs(fp32.loss[0] - bf16.loss[0])
    assert 0 < first_epoch.max() < 0.1  # bf16 keeps 8 mantissa bits: different, but close
    assert bf16.correct[-1].mean() > 0.9
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())  # autocast keeps fp32 weights


def test_compiled_model_trains_like_the_plain_one(monkeypatch):
    # The eager backend traces the model through torch.compile without generating kernels (fast on CPU).
    monkeypatch.setattr(trainer, "compile_options", {"backend": "eager"})
    images, labels = data()
    plain = train_model(fresh(), images, labels, {**TRAINING, "epochs": 2}, seed=2)
    compiled = train_model(fresh(), images, labels, {**TRAINING, "epochs": 2, "compile": True}, seed=2)
    assert compiled.runtime.compile
    assert same_weights(plain.model, compiled.model)
    assert not any(name.startswith("_orig_mod") for name in compiled.model.state_dict())


def test_one_cycle_schedule_warms_up_then_anneals():
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=0.4)
    spec = {"name": "onecycle", "pct_start": 0.25, "div_factor": 10.0, "final_div_factor": 100.0, "anneal": "linear"}
    schedule = trainer.make_schedule(optimizer, spec, epochs=4, steps_per_epoch=5)
    rates = [optimizer.param_groups[0]["lr"]]
    for _ in range(20):  # every step of the run, as the trainer steps it
        optimizer.step()
        schedule.step()
        rates.append(optimizer.param_groups[0]["lr"])
    assert rates[0] == pytest.approx(0.04)  # lr / div_factor
    assert max(rates) == pytest.approx(0.4) and int(np.argmax(rates)) == 4  # peak after 25% of the 20 steps
    assert rates[2] == pytest.approx(0.04 + (0.4 - 0.04) * 2 / 4)  # linear warm-up
    assert rates[-2] == pytest.approx(0.4 / 10 / 100, rel=1e-3)  # the last step reaches lr / (div · final)


def test_adamw_and_unknown_names_name_the_key():
    parameter = torch.nn.Parameter(torch.zeros(1))
    assert isinstance(trainer.make_optimizer([parameter], {"name": "adamw", "lr": 1e-3}), torch.optim.AdamW)
    assert trainer.make_optimizer([parameter], {"name": "adam", "lr": 1e-3}).param_groups[0]["betas"] == (0.9, 0.999)
    adam = trainer.make_optimizer([parameter], {"name": "adam", "lr": 1e-3, "betas": [0.5, 0.9]})
    assert adam.param_groups[0]["betas"] == (0.5, 0.9)
    with pytest.raises(ConfigError, match=r"^schedule\.name: unknown schedule 'step'"):
        trainer.make_schedule(torch.optim.SGD([parameter], lr=0.1), {"name": "step"}, 1, 1)


class FixedLogits(torch.nn.Module):
    """Returns preset logits (plus a zero that depends on a parameter, so there is a gradient)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits
        self.weight = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return self.logits + self.weight * x.sum()


@pytest.mark.parametrize("mixed, smoothing", [(True, 0.0), (False, 0.3), (True, 0.2)])
def test_dynamics_are_measured_against_the_own_label(mixed, smoothing):
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [1.0, 0.0, 4.0], [0.0, 5.0, 0.0]])
    labels, partners = torch.tensor([0, 2, 2, 0]), torch.tensor([1, 0, 0, 2])
    batch = augment.MixedBatch(torch.zeros(4, 3, 2, 2), labels, partners if mixed else None, 0.4 if mixed else 1.0)
    net = FixedLogits(logits)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.0)
    stats = trainer.EpochStats.zeros(6, "cpu", record_dynamics=True)
    index = torch.tensor([5, 0, 3, 1])
    settings = trainer.with_defaults({"label_smoothing": smoothing})
    runtime = trainer.RuntimeSettings(amp=False, channels_last=False, compile=False, data_on_device=True)
    ctx = trainer.StepContext(settings, runtime, torch.Generator(), torch.device("cpu"))
    trainer.train_step(net, batch, index, optimizer, trainer.make_schedule(optimizer, None, 1, 1), stats,
                       trainer.CROSS_ENTROPY, ctx)
    own_ce = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    assert stats.correct.tolist() == [False, False, False, True, False, True]  # rows 0 and 2 → samples 5 and 3
    torch.testing.assert_close(stats.loss[index], own_ce)
    # the epoch's loss sums the objective itself: the mixed, smoothed cross entropy
    objective = augment.mixed_cross_entropy(logits, batch, smoothing)
    assert int(stats.hits) == 2 and float(stats.loss_sum) == pytest.approx(float(objective.sum()))


def test_pgd_adversarial_training_attacks_whole_batches(monkeypatch):
    images, labels = data(80)
    sizes = []
    real_pgd = trainer.pgd

    def counting_pgd(model, x, y, *args, **kwargs):
        sizes.append(len(x))
        assert not model.training  # BatchNorm frozen while attacking
        return real_pgd(model, x, y, *args, **kwargs)

    monkeypatch.setattr(trainer, "pgd", counting_pgd)
    train_model(fresh(), images, labels, {**TRAINING, "epochs": 1,
                "adversarial": {"eps": 4 / 255, "step": 2 / 255, "steps": 2}}, seed=0)
    assert sizes == [32, 32, 16]


PAPER_AUGMENT = {**TRAINING, "augment": ["rrc", "flip", "randaugment", "cutout", "cutmix", "mixup"],
                 "cutout_size": 3, "label_smoothing": 0.1, "schedule": {"name": "onecycle"}}


def test_every_augmentation_is_seeded_and_resumes_to_the_same_weights(tmp_path, monkeypatch):
    images, labels = data()
    a = train_model(fresh(), images, labels, PAPER_AUGMENT, seed=5, record_dynamics=True)
    b = train_model(fresh(), images, labels, PAPER_AUGMENT, seed=5, record_dynamics=True)
    assert same_weights(a.model, b.model) and np.array_equal(a.correct, b.correct)
    assert len(a.epoch_seconds) == 4 and all(s > 0 for s in a.epoch_seconds)

    with monkeypatch.context() as patch:
        kill_after_epoch(patch, 3)
        with pytest.raises(KeyboardInterrupt):
            train_model(fresh(), images, labels, PAPER_AUGMENT, seed=5, checkpoint=tmp_path / "ck.pt",
                        record_dynamics=True)
    resumed = train_model(fresh(), images, labels, PAPER_AUGMENT, seed=5, checkpoint=tmp_path / "ck.pt",
                          record_dynamics=True)
    assert len(resumed.epoch_seconds) == 1  # only epoch 4 ran again
    assert same_weights(a.model, resumed.model)
    assert np.array_equal(a.correct, resumed.correct) and np.array_equal(a.loss, resumed.loss)


# -- hooks and history ----------------------------------------------------------------------

import csv  # noqa: E402


def test_history_csv_has_one_row_per_epoch_with_the_loss_the_loop_computed(tmp_path):
    images, labels = data()
    batch_sums: dict[int, list] = {}
    rows_seen = []

    def on_batch(end):
        batch_sums.setdefault(end.epoch, []).append(end.output.loss.detach().sum())

    result = train_model(fresh(), images, labels, TRAINING, seed=3, history=tmp_path / "history.csv",
                         on_batch=on_batch, on_epoch=lambda end: rows_seen.append(end.row))
    with open(tmp_path / "history.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["epoch", "loss", "accuracy", "lr", "seconds"]
    assert [int(row["epoch"]) for row in rows] == [1, 2, 3, 4]
    assert [len(sums) for sums in batch_sums.values()] == [3, 3, 3, 3]  # 96 samples in batches of 32
    written = [float(row["loss"]) for row in rows]
    assert written == [row["loss"] for row in result.history] == [row["loss"] for row in rows_seen]  # exact
    for epoch, row in enumerate(rows):  # the mean of the per-sample losses the steps descended on
        assert float(row["loss"]) == pytest.approx(float(sum(batch_sums[epoch])) / 96, rel=1e-6)
        assert 0 <= float(row["accuracy"]) <= 1 and float(row["seconds"]) > 0
    assert float(rows[0]["lr"]) == 0.05 and float(rows[-1]["lr"]) < 0.05  # the rate each epoch began with (cosine)
    assert float(rows[-1]["accuracy"]) > 0.9


def test_a_subset_trains_exactly_like_the_sliced_arrays():
    images, labels = data()
    keep = np.arange(96) % 4 != 1
    sliced = train_model(fresh(), images[keep], labels[keep], TRAINING, seed=2)
    subset = train_model(fresh(), images, labels, TRAINING, seed=2, subset=keep)
    assert same_weights(sliced.model, subset.model)
    assert [row["loss"] for row in sliced.history] == [row["loss"] for row in subset.history]


def test_unit_weights_change_nothing_and_zero_weights_mute_samples():
    images, labels = data()
    plain = train_model(fresh(), images, labels, TRAINING, seed=2)
    ones = train_model(fresh(), images, labels, TRAINING, seed=2, weights=np.ones(96))
    assert same_weights(plain.model, ones.model)
    zeros = train_model(fresh(), images, labels, {**TRAINING, "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.0}},
                        seed=2, weights=np.zeros(96))
    untouched = dict(fresh().named_parameters())  # no gradient at all: the parameters never move
    assert all(torch.equal(p, untouched[name]) for name, p in zeros.model.named_parameters())
    assert all(row["loss"] == 0.0 for row in zeros.history)


def test_an_objective_without_logits_has_no_accuracy(tmp_path):
    images, labels = data()

    def output_energy(net, batch, ctx):
        with ctx.autocast():
            return trainer.StepOutput(net(batch.images).float().pow(2).mean(1))

    energy = trainer.Objective(output_energy, "energy")
    result = train_model(fresh(), images, labels, {**TRAINING, "epochs": 2}, seed=0, objective=energy,
                         history=tmp_path / "h.csv")
    assert [row["accuracy"] for row in result.history] == [None, None]
    assert (tmp_path / "h.csv").read_text().splitlines()[1].split(",")[2] == ""
    with pytest.raises(ValueError, match="record_dynamics"):
        train_model(fresh(), images, labels, {**TRAINING, "epochs": 1}, seed=0, objective=energy, record_dynamics=True)


# -- paper-scale speed: one batch shape under compile, PGD starts, evaluation, data digest ---------

from poisonflow import adversarial, evaluate, fingerprint  # noqa: E402


def recording_backend(traced: list):
    """A torch.compile backend that records the shape of the model input of every graph it is given."""
    def backend(graph_module, example_inputs):
        names = [node.target for node in graph_module.graph.nodes if node.op == "placeholder"]
        inputs = dict(zip(names, example_inputs))
        traced.append({"x": tuple(inputs["L_x_"].shape),
                       "symbolic": [name for name, value in inputs.items() if not isinstance(value, torch.Tensor)]})
        return graph_module.forward
    return backend


def test_compiled_training_pads_the_last_batch_so_the_model_sees_one_shape(monkeypatch):
    torch._dynamo.reset()
    traced, pgd_sizes, seen = [], [], {}
    monkeypatch.setattr(trainer, "compile_options", {"backend": recording_backend(traced)})
    real_pgd = trainer.pgd
    monkeypatch.setattr(trainer, "pgd", lambda model, x, *args, **kwargs: pgd_sizes.append(len(x)) or
                        real_pgd(model, x, *args, **kwargs))
    images, labels = data(80)  # batches of 32, 32 and 16 (+ 16 padding rows)

    def on_batch(end):
        seen.setdefault(end.epoch, []).append((end.index.clone(), end.output.loss.detach().sum(), len(end.batch.images)))

    training = {**TRAINING, "epochs": 2, "compile": True, "adversarial": {"eps": 4 / 255, "step": 2 / 255, "steps": 2}}
    result = train_model(fresh(), images, labels, training, seed=0, record_dynamics=True, on_batch=on_batch)
    assert result.runtime.compile
    # one graph for training and one for PGD's eval mode, both for whole batches: no recompile for 16 rows
    assert [graph["x"] for graph in traced] == [(32, 3, 8, 8), (32, 3, 8, 8)]
    assert all(graph["symbolic"] == [] for graph in traced)  # and no dynamic-shape graph
    assert pgd_sizes == [32, 32, 32] * 2
    for epoch, batches in seen.items():
        # on_batch sees the real rows only; together they are every sample, once
        assert [len(index) for index, _, _ in batches] == [32, 32, 16] == [rows for _, _, rows in batches]
        assert sorted(torch.cat([index for index, _, _ in batches]).tolist()) == list(range(80))
        # the epoch's loss is the mean over the 80 real samples: the padding weighs nothing
        assert result.history[epoch]["loss"] == pytest.approx(float(sum(s for _, s, _ in batches)) / 80, rel=1e-6)
    assert result.correct.shape == (2, 80) and result.correct[-1].mean() > 0.5


def test_padded_order_repeats_the_first_samples_of_the_epoch():
    order = torch.tensor([4, 0, 3, 1, 2])
    assert trainer.padded_order(order, 5) == (order, 0)
    padded, short = trainer.padded_order(order, 4)
    assert short == 3 and padded.tolist() == [4, 0, 3, 1, 2, 4, 0, 3]
    padded, short = trainer.padded_order(order[:2], 7)  # fewer samples than padding rows: cycle
    assert short == 5 and padded.tolist() == [4, 0, 4, 0, 4, 0, 4]


def test_uncompiled_training_does_not_pad():
    images, labels = data(80)
    sizes = []
    train_model(fresh(), images, labels, {**TRAINING, "epochs": 1}, seed=0,
                on_batch=lambda end: sizes.append(len(end.batch.images)))
    assert sizes == [32, 32, 16]


def test_pgd_random_start_on_the_cpu_is_the_former_stream():
    x = torch.rand(4, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    x[0] = 1.0  # starts clipped at the top of the pixel range
    start = adversarial.pgd(torch.nn.Identity(), x, None, 8 / 255, 2 / 255, 0,
                            generator=torch.Generator().manual_seed(7))
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(7))  # the draw before the change
    assert torch.equal(start, x + ((x + (noise * 2 - 1) * (8 / 255)).clamp(0, 1) - x))
    generator = torch.Generator().manual_seed(7)
    assert torch.equal(adversarial.random_start(x, 8 / 255, generator), (noise * 2 - 1) * (8 / 255))


def test_device_generator_takes_one_draw_of_the_cpu_generator():
    a, b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    first = adversarial.device_generator(torch.device("cpu"), a)
    second = adversarial.device_generator(torch.device("cpu"), b)
    assert torch.equal(torch.rand(5, generator=first), torch.rand(5, generator=second))
    one_draw = torch.Generator().manual_seed(3)
    torch.randint(0, 2**63 - 1, (1,), generator=one_draw)
    assert torch.equal(a.get_state(), one_draw.get_state())  # advanced by exactly one draw, not one per pixel


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_pgd_random_start_on_a_gpu_is_drawn_there_and_seeded():
    x = torch.rand(8, 3, 16, 16, device="cuda")
    a = adversarial.random_start(x, 8 / 255, torch.Generator().manual_seed(5))
    b = adversarial.random_start(x, 8 / 255, torch.Generator().manual_seed(5))
    c = adversarial.random_start(x, 8 / 255, torch.Generator().manual_seed(6))
    assert a.device.type == "cuda" and torch.equal(a, b) and not torch.equal(a, c)
    assert float(a.abs().max()) <= 8 / 255 and float(a.std()) > 0.5 * (8 / 255) / 3 ** 0.5


def former_predict(model, images, batch_size):
    """The evaluation loop before it kept results on the device: one host read per batch."""
    model.eval()
    with torch.no_grad():
        return torch.cat([model(trainer.to_float(trainer.images_to_tensor(images[start:start + batch_size]))).argmax(1)
                          for start in range(0, len(images), batch_size)]).numpy()


def former_pgd_accuracy(model, images, labels, eps, step, steps, batch_size, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hits = 0
    for start in range(0, len(images), batch_size):
        x = trainer.to_float(trainer.images_to_tensor(images[start:start + batch_size]))
        y = torch.as_tensor(labels[start:start + batch_size], dtype=torch.long)
        x_adv = adversarial.pgd(model, x, y, eps, step, steps, generator=generator)
        with torch.no_grad():
            hits += int((model(x_adv).argmax(1) == y).sum())
    return hits / len(images)


def test_evaluation_on_the_cpu_gives_the_former_results_across_chunks(monkeypatch):
    images, labels = data(90)
    model = train_model(fresh(), images, labels, {**TRAINING, "epochs": 2}, seed=0).model
    monkeypatch.setattr(evaluate, "CHUNK_IMAGES", 40)  # chunks of 32 images (whole batches of 16), the last short
    assert np.array_equal(evaluate.predict(model, images, batch_size=16), former_predict(model, images, 16))
    assert evaluate.pgd_accuracy(model, images, labels, 8 / 255, 2 / 255, 3, batch_size=16) == \
        former_pgd_accuracy(model, images, labels, 8 / 255, 2 / 255, 3, 16)
    bf16 = evaluate.predict(model, images, batch_size=16, amp=True)  # bf16 autocast on request, even on CPU
    assert np.mean(bf16 == former_predict(model, images, 16)) > 0.9
    assert evaluate.use_amp("auto", torch.device("cpu")) is False
    with pytest.raises(ConfigError, match="amp"):
        evaluate.predict(model, images, amp="yes")


def test_data_digest_changes_with_any_pixel_and_any_move():
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (300, 7, 7, 3), dtype=np.uint8), np.arange(300) % 10  # 147-byte rows
    base = fingerprint.data_digest(images, labels)
    assert fingerprint.data_digest(images.copy(), labels.astype(np.int32)) == base
    assert fingerprint.data_digest(np.asfortranarray(images), labels) == base  # the values count, not the layout
    for position in [(0, 0, 0, 0), (150, 3, 4, 1), (299, 6, 6, 2), (298, 6, 6, 2)]:  # first, middle, tail bytes
        flipped = images.copy()
        flipped[position] ^= 1  # one pixel, one bit
        assert fingerprint.data_digest(flipped, labels) != base, position
    swapped = images.copy()
    swapped[[10, 200]] = swapped[[200, 10]]  # two images trade places
    assert fingerprint.data_digest(swapped, labels) != base
    moved = images.copy()
    moved[5, 0, 0], moved[5, 0, 1] = images[5, 0, 1], images[5, 0, 0]  # two pixels trade places in one image
    assert (moved != images).any() and fingerprint.data_digest(moved, labels) != base
    assert fingerprint.data_digest(images.reshape(300, 49, 3), labels) != base  # shape
    assert fingerprint.data_digest(images.astype(np.int16), labels) != base  # dtype
    changed = labels.copy()
    changed[0] = 1
    assert fingerprint.data_digest(images, changed) != base


def test_batch_step_is_one_clipped_cross_entropy_step():
    """The single step bilevel generators take equals a hand-written SGD step on the mean cross
    entropy with the gradient norm clipped."""
    import copy
    torch.manual_seed(0)
    model = build_model({"arch": "convnet", "width": 4}, 10, 8, seed=0)
    twin = copy.deepcopy(model)
    x, y = torch.rand(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 4, 5])
    ours = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    theirs = torch.optim.SGD(twin.parameters(), lr=0.5, momentum=0.9)
    loss = trainer.batch_step(model, ours, x, y, grad_clip=0.01)
    twin.train()
    expected = torch.nn.functional.cross_entropy(twin(x), y)
    expected.backward()
    norm = torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.01)
    assert float(norm) > 0.01  # the clip was active
    theirs.step()
    assert loss == pytest.approx(float(expected), rel=1e-6)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b)


def test_no_module_but_the_trainer_takes_optimizer_steps():
    """One training loop: gradients are applied in trainer.py only (the Input-Aware pattern
    generator's own Adam steps on the gradients of the trainer's backward pass, from its hook)."""
    from pathlib import Path
    root = Path(trainer.__file__).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        if path.name == "trainer.py":
            continue
        for line in path.read_text().splitlines():
            if ".backward(" in line or ".step()" in line and "optimizer" in line:
                found.append(f"{path.relative_to(root)}: {line.strip()}")
    assert found == ["attacks/input_aware.py: self.pattern_optimizer.step()"]
