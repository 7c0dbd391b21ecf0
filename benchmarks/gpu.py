"""The GPU benchmark: every paper-scale speed goal, measured in one prepared run of at most 8 minutes.

On synthetic CIFAR-size data (random uint8 32×32 images, 10 classes) it times, section by section:

- ``trainer_defaults``: :func:`poisonflow.trainer.train_model` with its defaults (``amp``,
  ``channels_last``, ``compile`` auto: all on for CUDA), ResNet-18 full width, batch 512, in images/s;
- ``reference``: the common loop of ``train_throughput.py`` (PIL images through torchvision
  transforms in a DataLoader with workers, fp32), same model, optimizer and augmentation; the ratio
  trainer / reference (goal ≥ 4×);
- ``trainer_plain``: the trainer with ``amp``, ``channels_last`` and ``compile`` all false, and its
  ratio to the reference: what the data path alone gives; defaults / plain is what bf16,
  channels_last and compilation add;
- ``epoch``: one full-width ResNet-18 epoch of 50k images with and without ``compile`` (goal ≤ 5 s
  with it);
- ``gradnorm``: batched per-sample gradient norms vs one backward per sample (``gradnorm.py``;
  goal ≥ 10×);
- ``pgd10``: PGD-10 evaluation throughput (:func:`poisonflow.evaluate.pgd_accuracy`) under bf16
  autocast and in fp32, and clean prediction throughput;
- ``random_start``: PGD's random start for a 128×3×224×224 batch, the former CPU draw + copy
  against the draw on the device (:func:`poisonflow.adversarial.random_start`);
- ``triggerue``: TriggerUE generation (trained-surrogate mode, a randomly initialised ResNet-18 as
  the surrogate), timed on as many images as its time cap allows and extrapolated to 50k.

Each section has a time cap and the whole run a budget (``--budget``); a section that cannot start
within the budget, or that fails (e.g. ``torch.compile`` without a working compiler), is listed
under ``skipped`` with the reason, and the run goes on. ``gpu-benchmark.json`` (device, versions,
every figure, goals, details, what was skipped) and ``gpu-benchmark.md`` (the same as a table) are
rewritten after every section in ``--out`` (default ``$OUT``, else ``./bench-out``), so a run cut
short still leaves what it measured.

    bash benchmarks/gpu.sh                             # on the GPU machine (installs carried wheels first)
    python benchmarks/gpu.py --out bench-out           # paper sizes (hours on a CPU)
    python benchmarks/gpu.py --size cpu-tiny --device cpu   # every section at tiny sizes, seconds on CPU

``cpu-tiny`` checks that the script runs (the test suite runs it); its figures say nothing about
speed, and it compiles with torch.compile's ``eager`` backend (traced, no kernels generated).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("TQDM_DISABLE", "1")  # no progress bars from the trainer in the log

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmarks, reused below

import gradnorm  # noqa: E402
import train_throughput as throughput  # noqa: E402

from poisonflow import adversarial, evaluate, trainer  # noqa: E402
from poisonflow.models import build_model  # noqa: E402
from poisonflow.scores import per_sample_grad_norms_loop  # noqa: E402

PAPER_IMAGES = 50000  # a CIFAR-10 training set: the unit of the per-epoch and TriggerUE figures

SECTIONS = ("trainer_defaults", "reference", "trainer_plain", "epoch", "gradnorm", "pgd10", "random_start",
            "triggerue")

SIZES = {
    "paper": {
        "n": 50000, "image_size": 32, "width": 64, "num_classes": 10, "batch_size": 512,
        "trainer_epochs": 3, "reference_epochs": 3, "workers": min(8, os.cpu_count() or 1),
        "gradnorm_n": 256, "gradnorm_batch": 128,
        "pgd_n": 10000, "pgd_batch": 256, "predict_batch": 512,
        "random_start_shape": [128, 3, 224, 224],
        "triggerue_batch": 64, "triggerue_steps": 20,
        "budget_s": 420, "threads": None, "compile_backend": None,
        "caps_s": {"trainer_defaults": 150, "reference": 60, "trainer_plain": 60, "epoch": 45, "gradnorm": 30,
                   "pgd10": 50, "random_start": 15, "triggerue": 45},
    },
    "cpu-tiny": {
        "n": 96, "image_size": 32, "width": 4, "num_classes": 10, "batch_size": 32,
        "trainer_epochs": 2, "reference_epochs": 2, "workers": 1,
        "gradnorm_n": 8, "gradnorm_batch": 8,
        "pgd_n": 32, "pgd_batch": 16, "predict_batch": 32,
        "random_start_shape": [8, 3, 32, 32],
        "triggerue_batch": 16, "triggerue_steps": 20,
        "budget_s": 240, "threads": 1, "compile_backend": "eager",
        "caps_s": {"trainer_defaults": 30, "reference": 30, "trainer_plain": 30, "epoch": 30, "gradnorm": 20,
                   "pgd10": 20, "random_start": 10, "triggerue": 3},
    },
}
# A section starts only with at least this share of its cap left in the budget.
MIN_CAP_SHARE = 0.5

# figure → (section, what it is, unit); every figure is a positive number.
FIGURES = {
    "trainer_defaults.images_per_s": ("trainer_defaults", "trainer, defaults (amp, channels_last, compile auto)", "images/s"),
    "trainer_defaults.first_epoch_s": ("trainer_defaults", "trainer, defaults: first epoch (compilation, autotuning)", "s"),
    "reference.images_per_s": ("reference", "reference: PIL + transforms.v2 in DataLoader workers, fp32", "images/s"),
    "ratio.defaults": ("reference", "trainer (defaults) / reference", "×"),
    "trainer_plain.images_per_s": ("trainer_plain", "trainer, amp/channels_last/compile false", "images/s"),
    "ratio.plain": ("trainer_plain", "trainer (all false) / reference: the data path alone", "×"),
    "ratio.amp_compile": ("trainer_plain", "trainer defaults / all false: bf16 + channels_last + compile", "×"),
    "epoch.compiled_s": ("epoch", "ResNet-18 epoch of 50k images, compile on (amp, channels_last auto)", "s"),
    "epoch.eager_s": ("epoch", "ResNet-18 epoch of 50k images, compile off (amp, channels_last auto)", "s"),
    "epoch.compile_gain": ("epoch", "epoch time without / with compile", "×"),
    "gradnorm.loop_ms_per_sample": ("gradnorm", "per-sample gradient norms: one backward per sample", "ms/sample"),
    "gradnorm.batched_ms_per_sample": ("gradnorm", "per-sample gradient norms: batched hooks", "ms/sample"),
    "gradnorm.speedup": ("gradnorm", "loop / batched", "×"),
    "pgd10.bf16_images_per_s": ("pgd10", "PGD-10 evaluation, bf16 autocast", "images/s"),
    "pgd10.fp32_images_per_s": ("pgd10", "PGD-10 evaluation, fp32", "images/s"),
    "predict.images_per_s": ("pgd10", "clean predictions (evaluation default amp)", "images/s"),
    "random_start.before_ms": ("random_start", "PGD random start: CPU draw + copy (before)", "ms/batch"),
    "random_start.after_ms": ("random_start", "PGD random start: drawn on the device (after)", "ms/batch"),
    "random_start.speedup": ("random_start", "before / after", "×"),
    "triggerue.images_per_s": ("triggerue", "TriggerUE generation, trained-surrogate mode", "images/s"),
    "triggerue.s_per_50k": ("triggerue", "TriggerUE generation of 50k images", "s"),
}
# figure → (comparison, target) of the paper-scale goals
GOALS = {"ratio.defaults": (">=", 4.0), "epoch.compiled_s": ("<=", 5.0), "gradnorm.speedup": (">=", 10.0)}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="paper")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "bench-out"),
                        help="where gpu-benchmark.json and .md go (default: $OUT, else ./bench-out)")
    parser.add_argument("--budget", type=float, default=None, help="seconds for all sections (default: the size's)")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help="comma-separated sections to run, in this order: " + ", ".join(SECTIONS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    unknown = [name for name in args.sections.split(",") if name and name not in SECTIONS]
    if unknown:
        parser.error(f"--sections: unknown {', '.join(unknown)} (known: {', '.join(SECTIONS)})")
    return args


class SectionTimeUp(Exception):
    """Raised from a training callback when the section's time cap has passed."""


class Run:
    """The state of one benchmark run: sizes, data, results, and the files written after each section."""

    def __init__(self, args):
        self.args = args
        self.sizes = SIZES[args.size]
        self.device = throughput.pick_device(args.device)
        self.budget = float(args.budget if args.budget is not None else self.sizes["budget_s"])
        self.started = time.monotonic()
        self.deadline = self.started + self.budget
        self.figures: dict[str, float] = {}
        self.details: dict[str, dict] = {}
        self.skipped: list[dict] = []
        self.notes: list[str] = []
        self.cache: dict = {}
        self.images, self.labels = throughput.random_images(self.sizes["n"], self.sizes["image_size"],
                                                            self.sizes["num_classes"], args.seed)

    # -- bookkeeping --------------------------------------------------------------------------

    def figure(self, key: str, value: float) -> None:
        if key not in FIGURES:
            raise KeyError(f"unregistered figure {key}")
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"{key}: expected a positive number, got {value!r}")
        self.figures[key] = float(value)

    def skip(self, section: str, reason: str) -> None:
        self.skipped.append({"section": section, "reason": reason})
        print(f"[gpu-benchmark] skipped {section}: {reason}", file=sys.stderr, flush=True)

    def result(self) -> dict:
        device = self.device
        cuda = device.type == "cuda"
        return {
            "device": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
            "device_type": device.type,
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "tf32": tf32_settings(),
            "size": self.args.size, "sizes": self.sizes, "budget_s": self.budget,
            "wall_s": round(time.monotonic() - self.started, 2),
            "figures": self.figures,
            "goals": {key: {"goal": f"{op} {target:g}", "value": self.figures.get(key),
                            "met": None if key not in self.figures else
                            (self.figures[key] >= target if op == ">=" else self.figures[key] <= target)}
                      for key, (op, target) in GOALS.items()},
            "details": self.details, "skipped": self.skipped, "notes": self.notes,
        }

    def write(self) -> dict:
        result = self.result()
        out = Path(self.args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu-benchmark.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
        (out / "gpu-benchmark.md").write_text(markdown(result))
        return result

    # -- shared pieces ------------------------------------------------------------------------

    def throughput_args(self, epochs: int, amp="auto", channels_last="auto", compile="auto"):
        """``train_throughput.py``'s arguments for these sizes and switches."""
        s = self.sizes
        return throughput.parse_args([
            "--n", str(s["n"]), "--image-size", str(s["image_size"]), "--width", str(s["width"]),
            "--num-classes", str(s["num_classes"]), "--batch-size", str(s["batch_size"]),
            "--epochs", str(epochs), "--reference-epochs", str(s["reference_epochs"]),
            "--workers", str(s["workers"]), "--device", str(self.device), "--seed", str(self.args.seed),
            "--amp", amp, "--channels-last", channels_last, "--compile", compile])

    def timed_training(self, section: str, cap: float, **switches) -> dict:
        """Train with ``train_throughput``'s trainer spec, stopping after the epoch that passes ``cap``."""
        args = self.throughput_args(self.sizes["trainer_epochs"], **switches)
        spec = throughput.trainer_spec(args)
        runtime = trainer.RuntimeSettings.resolve(trainer.with_defaults(spec), self.device, self.images.nbytes)
        seconds: list[float] = []
        deadline = time.monotonic() + cap

        def on_epoch(end):
            seconds.append(float(end.row["seconds"]))
            if time.monotonic() > deadline and end.epoch < args.epochs:
                raise SectionTimeUp

        truncated = False
        try:
            trainer.train_model(throughput.fresh_model(args), self.images, self.labels, spec, seed=self.args.seed,
                                device=self.device, desc=section, on_epoch=on_epoch)
        except SectionTimeUp:
            truncated = True
        rate = throughput.steady_rate(len(self.labels), seconds)
        details = {"settings": vars(runtime), "epoch_seconds": seconds, "images_per_s": rate,
                   "steady_epochs": max(1, len(seconds) - 1), "truncated": truncated,
                   "compile_backend": trainer.compile_options.get("backend", "inductor")}
        if len(seconds) == 1:
            details["note"] = "one epoch only: the rate includes warm-up"
        return details


def tf32_settings() -> dict:
    try:
        return {"cudnn": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32}
    except Exception as error:  # the flags' API changes between torch versions
        return {"error": str(error)}


def deadline_passed(deadline: float) -> bool:
    return time.monotonic() > deadline


# -- sections ---------------------------------------------------------------------------------

def section_trainer_defaults(run: Run, cap: float) -> None:
    details = run.timed_training("trainer_defaults", cap)
    run.details["trainer_defaults"] = details
    run.cache["trainer_defaults"] = details
    run.figure("trainer_defaults.images_per_s", details["images_per_s"])
    run.figure("trainer_defaults.first_epoch_s", details["epoch_seconds"][0])


def section_reference(run: Run, cap: float) -> None:
    args = run.throughput_args(1)
    deadline = time.monotonic() + cap
    loader = throughput.reference_loader(run.images, run.labels, args, run.device)
    model = throughput.fresh_model(args)
    seconds: list[float] = []
    for _ in range(run.sizes["reference_epochs"]):  # one epoch per call, to stop at the cap
        seconds += throughput.reference_training(model, loader, 1, args.lr, run.device)
        if deadline_passed(deadline):
            break
    del loader  # its persistent workers exit
    rate = throughput.steady_rate(len(run.labels), seconds)
    run.details["reference"] = {"epoch_seconds": seconds, "images_per_s": rate, "workers": args.workers,
                                "cudnn_benchmark": torch.backends.cudnn.benchmark,
                                "truncated": len(seconds) < run.sizes["reference_epochs"]}
    run.cache["reference"] = rate
    run.figure("reference.images_per_s", rate)
    if "trainer_defaults" in run.cache:
        run.figure("ratio.defaults", run.cache["trainer_defaults"]["images_per_s"] / rate)


def section_trainer_plain(run: Run, cap: float) -> None:
    details = run.timed_training("trainer_plain", cap, amp="false", channels_last="false", compile="false")
    run.details["trainer_plain"] = details
    run.figure("trainer_plain.images_per_s", details["images_per_s"])
    if "reference" in run.cache:
        run.figure("ratio.plain", details["images_per_s"] / run.cache["reference"])
    if "trainer_defaults" in run.cache:
        run.figure("ratio.amp_compile", run.cache["trainer_defaults"]["images_per_s"] / details["images_per_s"])


def section_epoch(run: Run, cap: float) -> None:
    """A 50k-image epoch (scaled from the steady rate when the set is smaller) with and without compile;
    amp and channels_last auto in both. The compiled run of ``trainer_defaults`` is reused when it compiled."""
    deadline = time.monotonic() + cap
    defaults = run.cache.get("trainer_defaults")
    if defaults is not None and defaults["settings"]["compile"]:
        compiled, source = defaults, "trainer_defaults"
    else:
        compiled, source = run.timed_training("epoch_compiled", cap / 2, compile="true"), "own run"
    eager = run.timed_training("epoch_eager", max(1.0, deadline - time.monotonic()), compile="false")
    compiled_s = PAPER_IMAGES / compiled["images_per_s"]
    eager_s = PAPER_IMAGES / eager["images_per_s"]
    run.details["epoch"] = {"compiled": {**compiled, "source": source}, "eager": eager,
                            "measured_images": len(run.labels), "scaled_to": PAPER_IMAGES}
    run.figure("epoch.compiled_s", compiled_s)
    run.figure("epoch.eager_s", eager_s)
    run.figure("epoch.compile_gain", eager_s / compiled_s)


def section_gradnorm(run: Run, cap: float) -> None:
    s = run.sizes
    args = gradnorm.parse_args(["--arch", "resnet18", "--width", str(s["width"]), "--image-size", str(s["image_size"]),
                                "--num-classes", str(s["num_classes"]), "--n", str(s["gradnorm_n"]),
                                "--batch-size", str(s["gradnorm_batch"]), "--device", str(run.device),
                                "--seed", str(run.args.seed)])
    device = run.device
    deadline = time.monotonic() + cap
    model = gradnorm.benchmark_model(args)
    generator = torch.Generator().manual_seed(args.seed + 1)
    x = torch.rand(args.n, 3, args.image_size, args.image_size, generator=generator).to(device)
    y = torch.randint(0, args.num_classes, (args.n,), generator=generator).to(device)
    gradnorm.per_sample_grad_norms_loop(model, x[:2], y[:2])  # warm-up, as gradnorm.py does
    gradnorm.batched_norms(model, x[:args.batch_size], y[:args.batch_size], args.batch_size)

    batched, batched_s = gradnorm.timed(lambda: gradnorm.batched_norms(model, x, y, args.batch_size), device)
    loop_parts, loop_s, done = [], 0.0, 0
    loop_deadline = deadline - 1.0
    while done < args.n and (done == 0 or not deadline_passed(loop_deadline)):  # the loop is timed in pieces
        part = slice(done, min(args.n, done + 16))
        norms, seconds = gradnorm.timed(lambda: per_sample_grad_norms_loop(model, x[part], y[part]), device)
        loop_parts.append(norms)
        loop_s += seconds
        done = part.stop
    loop = torch.cat(loop_parts)
    loop_ms, batched_ms = 1000 * loop_s / done, 1000 * batched_s / args.n
    run.details["gradnorm"] = {"arch": args.arch, "width": args.width, "image_size": args.image_size,
                               "batched_samples": args.n, "batch_size": args.batch_size, "loop_samples": done,
                               "max_rel_diff": gradnorm.max_relative_error(batched[:done], loop),
                               "truncated": done < args.n}
    run.figure("gradnorm.loop_ms_per_sample", loop_ms)
    run.figure("gradnorm.batched_ms_per_sample", batched_ms)
    run.figure("gradnorm.speedup", loop_ms / batched_ms)


def _eval_model(run: Run) -> torch.nn.Module:
    s = run.sizes
    model = build_model({"arch": "resnet18", "width": s["width"]}, s["num_classes"], s["image_size"], seed=run.args.seed)
    return model.to(run.device).eval()


PREDICT_RESERVE_S = 3.0  # of the pgd10 section's cap, left for the clean predictions


def section_pgd10(run: Run, cap: float) -> None:
    """PGD-10 (ε 8/255, step 2/255) as the evaluation runs it, bf16 and fp32; each setting is warmed up
    on one batch, then one timed batch sizes its timed set to its share of the cap."""
    s, device = run.sizes, run.device
    deadline = time.monotonic() + cap
    model = _eval_model(run)
    n_max, batch = min(s["pgd_n"], len(run.labels)), s["pgd_batch"]
    images, labels = run.images[:n_max], run.labels[:n_max]
    details = {"steps": 10, "eps": 8 / 255, "step": 2 / 255, "batch_size": batch}

    def attack(n, amp):
        return evaluate.pgd_accuracy(model, images[:n], labels[:n], 8 / 255, 2 / 255, 10, device=device,
                                     batch_size=batch, amp=amp)

    settings = (("bf16", True), ("fp32", False))
    for left, (name, amp) in zip((2, 1), settings):
        share = max(1.0, (deadline - time.monotonic() - PREDICT_RESERVE_S) / left)  # this setting's time
        first = min(batch, n_max)
        attack(first, amp)  # warm-up: cuDNN autotuning for this dtype
        _, batch_s = gradnorm.timed(lambda: attack(first, amp), device)
        n = min(n_max, max(first, int(0.8 * share / max(batch_s, 1e-6) * first) // first * first))
        _, seconds = gradnorm.timed(lambda: attack(n, amp), device)
        details[name] = {"images": n, "seconds": seconds, "one_batch_s": batch_s}
        run.figure(f"pgd10.{name}_images_per_s", n / seconds)

    evaluate.predict(model, images[:s["predict_batch"]], device, batch_size=s["predict_batch"])  # warm-up
    _, seconds = gradnorm.timed(lambda: evaluate.predict(model, images, device, batch_size=s["predict_batch"]), device)
    details["predict"] = {"images": n_max, "seconds": seconds, "amp": evaluate.use_amp("auto", device)}
    run.details["pgd10"] = details
    run.figure("predict.images_per_s", n_max / seconds)


def old_random_start(x: torch.Tensor, eps: float, generator: torch.Generator) -> torch.Tensor:
    """PGD's random start before it was drawn on the device: drawn on the CPU, then copied."""
    noise = torch.rand(x.shape, generator=generator, device="cpu").to(x.device)
    delta = (noise * 2 - 1) * eps
    return (x + delta).clamp(0, 1) - x


def new_random_start(x: torch.Tensor, eps: float, generator: torch.Generator) -> torch.Tensor:
    """What :func:`poisonflow.adversarial.pgd` does now."""
    return adversarial.random_start(x, eps, generator).add_(x).clamp_(0, 1).sub_(x)


def section_random_start(run: Run, cap: float) -> None:
    device = run.device
    shape = tuple(run.sizes["random_start_shape"])
    x = torch.rand(shape, generator=torch.Generator().manual_seed(run.args.seed)).to(device)
    deadline = time.monotonic() + cap
    details = {"shape": list(shape)}
    for name, fn in (("before", old_random_start), ("after", new_random_start)):
        generator = torch.Generator().manual_seed(run.args.seed)
        fn(x, 8 / 255, generator)  # warm-up
        walls, cpus = [], []
        for _ in range(5):
            cpu_start = time.process_time()
            _, seconds = gradnorm.timed(lambda: fn(x, 8 / 255, generator), device)
            walls.append(seconds)
            cpus.append(time.process_time() - cpu_start)
            if deadline_passed(deadline - cap / 4):
                break
        details[name] = {"wall_ms": [1000 * w for w in walls], "process_cpu_ms_median": 1000 * statistics.median(cpus)}
        run.figure(f"random_start.{name}_ms", 1000 * statistics.median(walls))
    run.details["random_start"] = details
    run.figure("random_start.speedup", run.figures["random_start.before_ms"] / run.figures["random_start.after_ms"])


def section_triggerue(run: Run, cap: float) -> None:
    from poisonflow.unlearnable import triggerue

    s, device = run.sizes, run.device
    deadline = time.monotonic() + cap
    surrogate = _eval_model(run)
    context = SimpleNamespace(surrogate=surrogate, device=str(device), classes=None, workdir=None,
                              extra={"key": "benchmark"})
    spec = {"kind": "triggerue", "surrogate": "random-resnet18", "batch_size": s["triggerue_batch"],
            "steps": s["triggerue_steps"]}
    protector = triggerue.prepare(spec, context, seed=run.args.seed)
    batch = protector.batch_size
    protector.protect_chunk(run.images[:batch], run.labels[:batch])  # warm-up: autotuning, class grids
    done, started = 0, time.perf_counter()
    while done < PAPER_IMAGES and (done == 0 or not deadline_passed(deadline - 1.0)):
        rows = np.arange(done, done + batch) % len(run.labels)  # cycles over the synthetic set
        protector.protect_chunk(run.images[rows], run.labels[rows])  # returns host uint8: one sync per chunk
        done += batch
    seconds = time.perf_counter() - started
    rate = done / seconds
    extrapolated = done < PAPER_IMAGES
    run.details["triggerue"] = {"surrogate": f"resnet18 width {s['width']}, random init, eval mode",
                                "steps": s["triggerue_steps"], "batch_size": batch, "timed_images": done,
                                "seconds": seconds, "extrapolated": extrapolated}
    if extrapolated:
        run.notes.append(f"triggerue.s_per_50k is extrapolated from {done} images timed ({seconds:.1f} s)")
    run.figure("triggerue.images_per_s", rate)
    run.figure("triggerue.s_per_50k", PAPER_IMAGES / rate)


SECTION_FUNCTIONS = {
    "trainer_defaults": section_trainer_defaults, "reference": section_reference,
    "trainer_plain": section_trainer_plain, "epoch": section_epoch, "gradnorm": section_gradnorm,
    "pgd10": section_pgd10, "random_start": section_random_start, "triggerue": section_triggerue,
}


# -- output -----------------------------------------------------------------------------------

def format_value(value: float) -> str:
    return f"{value:,.0f}" if value >= 1000 else f"{value:.3g}" if value < 10 else f"{value:.1f}"


def markdown(result: dict) -> str:
    sizes = result["sizes"]
    lines = [
        "# GPU benchmark", "",
        f"{result['device']} ({result['device_type']}), torch {result['torch']}, CUDA {result['cuda']}, "
        f"cuDNN {result['cudnn']}, size `{result['size']}`, budget {result['budget_s']:g} s, "
        f"wall {result['wall_s']:g} s", "",
        f"Synthetic data: {sizes['n']} random {sizes['image_size']}×{sizes['image_size']} images, "
        f"{sizes['num_classes']} classes; ResNet-18 width {sizes['width']} (64 = full), batch {sizes['batch_size']}; "
        f"reference DataLoader workers {sizes['workers']}. Per-epoch figures are scaled to 50k images "
        f"from the steady rate (epochs after the first).", "",
        "| section | figure | value | unit | goal |", "|---|---|---|---|---|",
    ]
    for key, (section, what, unit) in FIGURES.items():
        value = result["figures"].get(key)
        goal = result["goals"].get(key)
        goal_text = "" if goal is None else goal["goal"] + (
            "" if goal["met"] is None else (" ✓" if goal["met"] else " ✗"))
        if key == "triggerue.s_per_50k" and result["details"].get("triggerue", {}).get("extrapolated"):
            what += f" (extrapolated from {result['details']['triggerue']['timed_images']} images)"
        lines.append(f"| {section} | {what} | {'skipped' if value is None else format_value(value)} | {unit} | "
                     f"{goal_text} |")
    if result["skipped"]:
        lines += ["", "Skipped:"] + [f"- `{item['section']}`: {item['reason']}" for item in result["skipped"]]
    if result["notes"]:
        lines += ["", "Notes:"] + [f"- {note}" for note in result["notes"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    args = parse_args(argv)
    run = Run(args)
    if run.sizes["threads"]:
        torch.set_num_threads(run.sizes["threads"])
    if run.sizes["compile_backend"]:
        trainer.compile_options = {"backend": run.sizes["compile_backend"]}
        run.notes.append(f"torch.compile backend '{run.sizes['compile_backend']}' (size {args.size})")
    selected = [name for name in args.sections.split(",") if name]
    print(f"[gpu-benchmark] {run.result()['device']}, size {args.size}, budget {run.budget:g} s, "
          f"sections {', '.join(selected)}", file=sys.stderr, flush=True)
    for name in SECTIONS:
        if name not in selected:
            run.skip(name, "not selected (--sections)")
            continue
        cap = float(run.sizes["caps_s"][name])
        left = run.deadline - time.monotonic()
        if left < MIN_CAP_SHARE * cap:
            run.skip(name, f"{max(0.0, left):.0f} s of the {run.budget:g} s budget left; the section's cap is {cap:g} s")
            continue
        started = time.monotonic()
        try:
            SECTION_FUNCTIONS[name](run, min(cap, left))
        except Exception as error:  # one failing section (no compiler, out of memory) must not lose the others
            traceback.print_exc()
            run.skip(name, f"failed: {type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}")
        if name in run.details:
            run.details[name]["section_s"] = round(time.monotonic() - started, 2)
        print(f"[gpu-benchmark] {name}: {time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)
        run.write()
    result = run.write()
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
