"""Checkpoints and fingerprints: safe loading, digests that decide resumption, atomic writes, and
training through the shared loop with hooks that is killed and resumed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from poisonflow import checkpoint, fingerprint, trainer
from poisonflow.models import build_model
from poisonflow.trainer import train_model

torch.set_num_threads(1)

TRAINING = {"epochs": 4, "batch_size": 32, "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
            "schedule": {"name": "cosine"}, "augment": ["crop", "flip"], "crop_padding": 2}


def data(n=96, size=8):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, n)
    images = (rng.random((n, size, size, 3)) * 60 + labels[:, None, None, None] * 80).astype(np.uint8)
    return images, labels


def fresh(seed=0):
    return build_model({"arch": "convnet", "width": 4}, 3, 8, seed=seed)


def same_weights(a, b) -> bool:
    return all(torch.equal(tensor, b.state_dict()[name]) for name, tensor in a.state_dict().items())


def kill_after_save(monkeypatch, saves: int) -> None:
    """Raise KeyboardInterrupt right after the ``saves``-th checkpoint write, as a killed job would."""
    real_save = checkpoint.save
    count = {"n": 0}

    def save_then_die(path, digest, state):
        real_save(path, digest, state)
        count["n"] += 1
        if count["n"] == saves:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save", save_then_die)


# --- the checkpoint module ------------------------------------------------------------------


class RunsCode:
    """Unpickling this object runs code: it writes ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def test_a_planted_pickle_is_refused_without_running_code_and_training_restarts(tmp_path):
    images, labels = data()
    training = {**TRAINING, "epochs": 2}
    marker, path = tmp_path / "pwned", tmp_path / "ck.pt"
    # the planted file carries the job's own digest: only the safe loader stands between it and the job
    digest = trainer.training_digest(fresh(), images, labels, training, seed=1)
    torch.save({"digest": digest, "epoch": 1, "model": RunsCode(marker)}, path)

    result = train_model(fresh(), images, labels, training, seed=1, checkpoint=path)

    assert not marker.exists()  # nothing in the file ran
    assert same_weights(result.model, train_model(fresh(), images, labels, training, seed=1).model)  # from scratch
    assert torch.load(path, weights_only=True)["epoch"] == 2  # replaced by a safe checkpoint
    # the plant was real: the unsafe unpickler would have run it
    torch.save({"digest": digest, "model": RunsCode(marker)}, tmp_path / "plant.pt")
    torch.load(tmp_path / "plant.pt", weights_only=False)
    assert marker.read_text() == "ran"


def test_load_finds_nothing_for_another_digest_or_a_foreign_file(tmp_path):
    path = tmp_path / "state.pt"
    checkpoint.save(path, "abc", {"epoch": 3, "values": torch.arange(4), "rows": [{"loss": 0.5}]})
    assert checkpoint.load(path, "abc")["epoch"] == 3
    assert checkpoint.load(path, "abd") is None
    assert checkpoint.load(tmp_path / "missing.pt", "abc") is None
    path.write_bytes(b"not a checkpoint")
    assert checkpoint.load(path, "abc") is None
    assert checkpoint.Checkpoint(None, "abc").load() is None
    checkpoint.Checkpoint(None, "abc").save({"epoch": 1})  # no path: nothing written, no error


def test_writes_are_atomic(tmp_path):
    path = tmp_path / "sub" / "state.pt"
    checkpoint.save(path, "abc", {"epoch": 1})

    def die_mid_write(tmp):
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        checkpoint.atomic_write(path, die_mid_write)
    assert checkpoint.load(path, "abc")["epoch"] == 1  # the previous checkpoint is intact


def test_cached_computes_once_per_digest(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"kept": torch.tensor([True, False])}

    path = tmp_path / "split.pt"
    assert checkpoint.cached(path, "a", compute)["kept"].tolist() == [True, False]
    assert checkpoint.cached(path, "a", compute)["kept"].tolist() == [True, False]
    assert len(calls) == 1
    checkpoint.cached(path, "b", compute)
    assert len(calls) == 2


# --- fingerprints ---------------------------------------------------------------------------


def test_digest_tells_apart_values_types_order_and_framing():
    a = np.arange(6, dtype=np.int64)
    assert fingerprint.digest(a) == fingerprint.digest(a.copy())
    assert fingerprint.digest(a) != fingerprint.digest(a.astype(np.int32))
    assert fingerprint.digest(a) != fingerprint.digest(a.reshape(2, 3))
    assert fingerprint.digest("ab", "c") != fingerprint.digest("a", "bc")
    assert fingerprint.digest({"x": 1, "y": 2}) == fingerprint.digest({"y": 2, "x": 1})
    assert fingerprint.digest(1, 2) != fingerprint.digest(2, 1)
    assert fingerprint.digest(torch.ones(3, dtype=torch.bfloat16)) != fingerprint.digest(torch.ones(3))
    assert fingerprint.data_digest(np.zeros((2, 4, 4, 3), np.uint8), np.array([0, 1], np.int32)) == \
        fingerprint.data_digest(np.zeros((2, 4, 4, 3), np.uint8), np.array([0, 1], np.int64))


def test_model_digest_follows_the_weights():
    model = fresh()
    before = fingerprint.model_digest(model)
    assert fingerprint.model_digest(fresh()) == before
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1e-3
    assert fingerprint.model_digest(model) != before


# --- resumption decided by the digest ---------------------------------------------------------


def checkpoint_epoch(path) -> int:
    return int(torch.load(path, weights_only=True)["epoch"])


@pytest.mark.parametrize("change", ["seed", "starting weights", "subset", "objective"])
def test_a_checkpoint_of_another_job_is_not_resumed(tmp_path, change):
    images, labels = data()
    training = {**TRAINING, "epochs": 2}
    path = tmp_path / "ck.pt"
    base = {"seed": 1, "model": fresh, "subset": None, "objective": trainer.CROSS_ENTROPY}
    other = {
        "seed": {"seed": 2},
        "starting weights": {"model": lambda: fresh(seed=7)},  # e.g. a retrained victim under fine-tuning
        "subset": {"subset": np.arange(96) % 2 == 0},
        "objective": {"objective": trainer.cross_entropy_objective(lambda ce: -ce, "ascent")},
    }[change]

    def run(job, **extra):
        return train_model(job["model"](), images, labels, training, seed=job["seed"], subset=job["subset"],
                           objective=job["objective"], **extra)

    first = run(base, checkpoint=path)
    changed = {**base, **other}
    result = run(changed, checkpoint=path)
    assert result.digest != first.digest
    assert torch.load(path, weights_only=True)["digest"] == result.digest
    assert same_weights(result.model, run(changed).model)  # trained from scratch, not resumed


def test_the_same_job_resumes_its_finished_checkpoint_without_training(tmp_path):
    images, labels = data()
    first = train_model(fresh(), images, labels, TRAINING, seed=1, checkpoint=tmp_path / "ck.pt")
    again = train_model(fresh(), images, labels, TRAINING, seed=1, checkpoint=tmp_path / "ck.pt")
    assert again.epoch_seconds == [] and same_weights(first.model, again.model)
    assert again.history == first.history


# --- killed and resumed through the hooks -------------------------------------------------------


def hooked_job(**extra):
    """A training using every hook: a custom objective, a subset, per-sample weights."""
    images, labels = data()
    subset = np.arange(96) % 3 != 0
    weights = np.linspace(0.5, 1.5, 96)
    objective = trainer.cross_entropy_objective(lambda ce: torch.sign(ce.mean() - 0.5) * ce, "lga")
    return train_model(fresh(), images, labels, TRAINING, seed=4, objective=objective, subset=subset,
                       weights=weights, **extra)


def test_killed_training_with_hooks_resumes_to_the_same_weights_and_history(tmp_path, monkeypatch):
    uninterrupted = hooked_job(checkpoint=tmp_path / "straight.pt", history=tmp_path / "straight.csv")
    with monkeypatch.context() as patch:
        kill_after_save(patch, 2)
        with pytest.raises(KeyboardInterrupt):
            hooked_job(checkpoint=tmp_path / "ck.pt", history=tmp_path / "history.csv")
    assert checkpoint_epoch(tmp_path / "ck.pt") == 2
    resumed = hooked_job(checkpoint=tmp_path / "ck.pt", history=tmp_path / "history.csv")
    assert len(resumed.epoch_seconds) == 2  # epochs 3 and 4 only
    assert same_weights(uninterrupted.model, resumed.model)
    drop_seconds = [{k: v for k, v in row.items() if k != "seconds"} for row in resumed.history]
    assert drop_seconds == [{k: v for k, v in row.items() if k != "seconds"} for row in uninterrupted.history]
    assert len((tmp_path / "history.csv").read_text().splitlines()) == 1 + 4  # the resumed rows are kept
