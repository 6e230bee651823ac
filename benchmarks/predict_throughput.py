"""Prediction throughput: semiseg's sliding-window inference against MONAI's.

``semiseg.train.sliding_window.sliding_window_inference`` (the path of ``semiseg-predict``
and of the test evaluation) and ``monai.inferers.sliding_window_inference`` run the same
eval-mode semiseg 3D U-Net over the same volume, with the same windows, overlap, tile
batch and Gaussian importance weights, and both average softmax *probabilities* (MONAI
averages whatever its predictor returns, so its predictor is ``softmax(model(x))``). The
two are timed in interleaved rounds (cases/s, one case = one whole volume) and their
outputs compared voxel by voxel.

Where they agree, and why only there:

- Windows: semiseg spaces the tiles of an axis evenly (at most ``patch * (1 - overlap)``
  apart, the last flush with the border); MONAI steps by ``int(patch * (1 - overlap))`` and
  moves only the last window back to the border. They place the same windows exactly
  when ``size - patch`` is a multiple of that step (or the axis needs at most 2 windows);
  the timed volume is chosen so, and a second volume where placement differs is reported.
- Gaussian: both use ``exp(-x² / 2σ²)`` with σ = patch / 8 per axis, but MONAI's
  ``compute_importance_map`` clamps the map from below at 1e-3 (``min_non_zero``), which
  with σ = patch / 8 raises more than half of a 3D tile's voxels (the map falls to
  ``exp(-8)`` ≈ 3.4e-4 per axis at the tile border); semiseg keeps the true Gaussian
  (clamped only at float32's smallest normal number). Where a voxel lies near the border
  of every window covering it (near the volume's faces and edges), the windows' weights are
  all tiny and MONAI's clamp makes them equal, so the two blends weight those windows
  differently: the probabilities move by up to a few 1e-2, far above 1e-4. The compared setting
  therefore passes semiseg's own map to MONAI (``roi_weight_map``), and the section
  reports the difference with MONAI's default map apart (its normalisation to a maximum of
  1 cancels in the weighted average; the clamp is the whole difference, also reported).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (Check, Section, interleaved, load_average, machine_info,  # noqa: E402
                               rate_figure, torch_threads)
from benchmarks.report import render  # noqa: E402
from semiseg.models.evaluation import build_evaluation_network  # noqa: E402
from semiseg.train.sliding_window import importance_map, sliding_window_inference, tile_windows  # noqa: E402

SECTION = "predict"
MAX_DIFFERENCE = 1e-4
"""Agreement target (max |difference| of probabilities); float32 rounding alone is ~1e-7."""
MONAI_SIGMA_SCALE = 0.125
"""σ / patch of both Gaussians (nnU-Net's 1/8, MONAI's default ``sigma_scale``)."""
MONAI_MIN_WEIGHT = 1e-3
"""The floor ``monai.data.utils.compute_importance_map`` clamps its map to."""
INSTALL_HINT = "pip install -e '.[bench]' (or: pip install --no-deps monai==1.6.1, which needs only torch and numpy)"

Shape3 = tuple[int, int, int]


@dataclass(frozen=True)
class PredictSettings:
    """Sizes of the prediction-throughput section.

    Attributes:
        volume: ``(X, Y, Z)`` of the timed case; ``size - patch`` a multiple of the step on
            every axis, so that both implementations place the same windows.
        patch: ``(X, Y, Z)`` of a window.
        overlap: fraction of a window shared with its neighbour.
        mismatched_volume: a case where the two place different windows (agreement only).
        batch_size: windows per forward pass (``sw_batch_size``).
        width, depth: the U-Net's width and depth.
        head_scale: factor on the (random) segmentation head's weights, so that the
            untrained network is about as confident as a trained one (mean top-class
            probability ≈ 0.95 at 30 instead of ≈ 0.3); only the agreement figures depend on it.
        threads: torch intra-op threads (1, the platform's per-trial default: on a shared machine
            2 threads make every small tensor operation wait for a descheduled thread, which
            swamps the blending cost both implementations differ in).
        min_repeats, max_repeats, budget_s: interleaved timed rounds (with the U-Net).
        blending_repeats: interleaved rounds with a 1x1x1 convolution as the network (each
            implementation's own cost: windows, weighting, accumulation).
        seed: network initialisation and image.
    """

    volume: Shape3 = (128, 128, 48)
    patch: Shape3 = (64, 64, 24)
    overlap: float = 0.5
    mismatched_volume: Shape3 = (120, 120, 40)
    batch_size: int = 4
    width: int = 16
    depth: int = 3
    head_scale: float = 30.0
    threads: int = 1
    min_repeats: int = 3
    max_repeats: int = 7
    budget_s: float = 40.0
    blending_repeats: int = 9
    seed: int = 0

    @classmethod
    def quick(cls) -> "PredictSettings":
        """Small sizes for ``--quick`` (8 windows per case instead of 27)."""
        return cls(volume=(96, 96, 36), mismatched_volume=(110, 96, 36), min_repeats=2, max_repeats=3,
                   budget_s=10.0, blending_repeats=3)

    def spec(self) -> dict[str, Any]:
        """The ``model_spec`` of the network (as a checkpoint stores it)."""
        return {"dims": 3, "in_channels": 1, "num_classes": 4,
                "model": {"name": "unet", "depth": self.depth, "width": self.width, "dropout": 0.0, "norm": "batch"},
                "class_ids": [0, 1, 2, 3]}

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON-able data."""
        return asdict(self)


def monai_available() -> bool:
    """Whether ``monai`` can be imported (the optional ``bench`` extra)."""
    return importlib.util.find_spec("monai") is not None


def benchmark_network(settings: PredictSettings) -> nn.Module:
    """The eval-mode semiseg 3D U-Net of ``settings.spec()``, seeded, with its head scaled."""
    torch.manual_seed(settings.seed)
    model = build_evaluation_network(settings.spec()).eval()
    with torch.no_grad():
        model.head.weight.mul_(settings.head_scale)
        model.head.bias.mul_(settings.head_scale)
    return model


def benchmark_image(shape: Sequence[int], seed: int = 0) -> torch.Tensor:
    """A ``[1, X, Y, Z]`` float32 case: a smooth blob pattern plus unit noise (seeded)."""
    generator = torch.Generator().manual_seed(seed)
    axes = torch.meshgrid(*[torch.linspace(0.0, 1.0, size) for size in shape], indexing="ij")
    smooth = sum(torch.sin(6.0 * (k + 1) * axis + k) for k, axis in enumerate(axes))
    noise = torch.randn(tuple(shape), generator=generator)
    return (smooth + 0.5 * noise)[None].float()


def monai_scan_interval(shape: Sequence[int], patch: Sequence[int], overlap: float) -> tuple[int, ...]:
    """MONAI's step between windows per axis: ``int(patch * (1 - overlap))`` (at least 1), or
    the patch when it spans the axis (``monai.inferers.utils._get_scan_interval``)."""
    return tuple(p if p == s else max(1, int(p * (1.0 - overlap))) for s, p in zip(shape, patch))


def monai_windows(shape: Sequence[int], patch: Sequence[int], overlap: float) -> list[tuple[slice, ...]]:
    """The windows MONAI's ``sliding_window_inference`` visits on a volume of ``shape`` (≥ patch)."""
    from monai.data.utils import dense_patch_slices

    return [tuple(window) for window in
            dense_patch_slices(tuple(shape), tuple(patch), monai_scan_interval(shape, patch, overlap))]


def same_windows(shape: Sequence[int], patch: Sequence[int], overlap: float) -> bool:
    """Whether semiseg and MONAI visit the same windows, in the same order, on ``shape`` (≥ patch)."""
    return tile_windows(shape, patch, overlap) == monai_windows(shape, patch, overlap)


def monai_importance_map(patch: Sequence[int]) -> torch.Tensor:
    """MONAI's own Gaussian importance map (σ = patch / 8, clamped below at 1e-3)."""
    from monai.data.utils import compute_importance_map

    return compute_importance_map(tuple(patch), mode="gaussian", sigma_scale=MONAI_SIGMA_SCALE)


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work so that wall time measures it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def semiseg_prediction(model: nn.Module, image: torch.Tensor, settings: PredictSettings,
                       device: torch.device) -> torch.Tensor:
    """``[K, X, Y, Z]`` probabilities from semiseg's sliding-window inference."""
    probabilities = sliding_window_inference(model, image, settings.patch, overlap=settings.overlap,
                                             batch_size=settings.batch_size, device=device)
    synchronize(device)
    return probabilities


@torch.no_grad()
def monai_prediction(model: nn.Module, image: torch.Tensor, settings: PredictSettings, device: torch.device,
                     weights: torch.Tensor | None) -> torch.Tensor:
    """``[K, X, Y, Z]`` probabilities from MONAI's sliding-window inference.

    The predictor returns ``softmax(model(x))``, so MONAI averages probabilities as semiseg
    does. Windows travel to ``device`` batch by batch (as semiseg's), the output stays there.

    Args:
        model: eval-mode network returning logits.
        image: ``[C, X, Y, Z]`` case on the CPU.
        settings: patch, overlap and window batch.
        device: where the network runs and the output is accumulated.
        weights: ``[X, Y, Z]`` importance map given to MONAI (``roi_weight_map``); None
            lets MONAI build its own Gaussian (``mode="gaussian"``, ``sigma_scale=0.125``).
    """
    from monai.inferers import sliding_window_inference as monai_sliding_window_inference

    def predictor(windows: torch.Tensor) -> torch.Tensor:
        return F.softmax(model(windows).float(), dim=1)

    roi_weight_map = None if weights is None else weights.to(device)
    probabilities = monai_sliding_window_inference(
        image[None], settings.patch, settings.batch_size, predictor, overlap=settings.overlap, mode="gaussian",
        sigma_scale=MONAI_SIGMA_SCALE, padding_mode="constant", cval=0.0, sw_device=device, device=device,
        roi_weight_map=roi_weight_map)[0]
    synchronize(device)
    return probabilities


def difference(first: torch.Tensor, second: torch.Tensor) -> dict[str, float]:
    """Max and mean |difference| of two ``[K, X, Y, Z]`` probability maps, the share of voxels where
    some class differs by more than :data:`MAX_DIFFERENCE`, and the share whose argmax differs."""
    gap = (first.float().cpu() - second.float().cpu()).abs()
    labels = first.argmax(0).cpu() != second.argmax(0).cpu()
    return {"max_abs_difference": gap.max().item(), "mean_abs_difference": gap.mean().item(),
            "share_above_1e-4": (gap.amax(0) > MAX_DIFFERENCE).float().mean().item(),
            "label_disagreement": labels.float().mean().item()}


def map_differences(patch: Sequence[int]) -> dict[str, float]:
    """How MONAI's own Gaussian map differs from semiseg's: the share of voxels MONAI clamps, and
    the max |MONAI map - clamp(semiseg map x MONAI's maximum, 1e-3)| (≈ 0 when the clamp is the whole
    difference)."""
    semiseg_map, monai_map = importance_map(patch), monai_importance_map(patch)
    rebuilt = (semiseg_map * monai_map.max()).clamp_min(MONAI_MIN_WEIGHT)
    return {"monai map: share of voxels clamped to 1e-3": (monai_map <= MONAI_MIN_WEIGHT).float().mean().item(),
            "monai map: max |map - clamp(semiseg map x max, 1e-3)|": (monai_map - rebuilt).abs().max().item()}


def run(settings: PredictSettings, workdir: Path | None = None) -> Section:
    """Agreement and interleaved cases/s of semiseg's and MONAI's sliding-window inference.

    ``workdir`` (the harness's scratch folder) is not used: the cases are made in memory.
    Without MONAI installed the section carries a note and no figures.
    """
    section = Section("Prediction throughput: semiseg vs MONAI sliding-window inference (cases/s)",
                      settings.to_dict())
    if not monai_available():
        section.notes.append(f"skipped: MONAI is not installed ({INSTALL_HINT})")
        return section
    import monai

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with torch_threads(settings.threads):
        model = benchmark_network(settings).to(device)
        weights = importance_map(settings.patch)
        image = benchmark_image(settings.volume, settings.seed)
        semiseg_result = semiseg_prediction(model, image, settings, device)
        shared = difference(semiseg_result, monai_prediction(model, image, settings, device, weights))
        own = difference(semiseg_result, monai_prediction(model, image, settings, device, None))
        mismatched = _mismatched_agreement(model, settings, device)
        variants: dict[str, Callable[[], Any]] = {
            "semiseg": lambda: semiseg_prediction(model, image, settings, device),
            "monai": lambda: monai_prediction(model, image, settings, device, importance_map(settings.patch))}
        timings = interleaved(variants, settings.min_repeats, settings.max_repeats, settings.budget_s, warmup=0)
        blending = _blending_timings(image, settings, device)
    windows = len(tile_windows(settings.volume, settings.patch, settings.overlap))
    same = same_windows(settings.volume, settings.patch, settings.overlap)
    _figures(section, timings, blending, settings, windows)
    _agreement(section, settings, same, shared, own, mismatched)
    section.notes += _notes(settings, device, windows, monai.__version__, timings.rounds, same)
    return section


def _mismatched_agreement(model: nn.Module, settings: PredictSettings, device: torch.device) -> dict[str, Any]:
    shape = settings.mismatched_volume
    image = benchmark_image(shape, settings.seed + 1)
    result = difference(semiseg_prediction(model, image, settings, device),
                        monai_prediction(model, image, settings, device, importance_map(settings.patch)))
    result["same windows"] = same_windows(shape, settings.patch, settings.overlap)
    return result


def _blending_timings(image: torch.Tensor, settings: PredictSettings, device: torch.device) -> Any:
    """Interleaved rounds of both implementations around a 1x1x1 convolution (their own overhead)."""
    torch.manual_seed(settings.seed)
    pointwise = nn.Conv3d(1, 4, kernel_size=1).eval().to(device)
    variants: dict[str, Callable[[], Any]] = {
        "semiseg": lambda: semiseg_prediction(pointwise, image, settings, device),
        "monai": lambda: monai_prediction(pointwise, image, settings, device, importance_map(settings.patch))}
    return interleaved(variants, settings.blending_repeats, settings.blending_repeats)


def _figures(section: Section, timings: Any, blending: Any, settings: PredictSettings, windows: int) -> None:
    case = "x".join(map(str, settings.volume))
    section.figures["semiseg cases/s"] = rate_figure(
        timings, "semiseg", 1.0, "cases/s",
        f"semiseg.train.sliding_window.sliding_window_inference, one {case} case ({windows} windows)")
    section.figures["monai cases/s"] = rate_figure(
        timings, "monai", 1.0, "cases/s",
        "monai.inferers.sliding_window_inference, same windows, predictor softmax(model(x)), semiseg's Gaussian "
        "map built per case (as semiseg builds it)")
    section.add_ratio("semiseg / MONAI", "semiseg cases/s", "monai cases/s",
                      "prediction throughput of semiseg relative to MONAI (above 1: semiseg faster)")
    for name in ("semiseg", "monai"):
        section.figures[f"{name} blending-only cases/s"] = rate_figure(
            blending, name, 1.0, "cases/s", "the same case with a 1x1x1 convolution as the network: the "
            "implementation's own cost (windows, Gaussian weighting, accumulation, normalisation)")
    section.add_ratio("semiseg / MONAI, blending only", "semiseg blending-only cases/s", "monai blending-only cases/s",
                      "throughput ratio without the U-Net's cost")


def _agreement(section: Section, settings: PredictSettings, same: bool, shared: dict[str, float],
               own: dict[str, float], mismatched: dict[str, Any]) -> None:
    section.checks.append(Check("max |semiseg - MONAI| probabilities (same windows, same Gaussian map)",
                                shared["max_abs_difference"] if same else float("nan"), MAX_DIFFERENCE, "<=",
                                "" if same else "the timed volume places different windows: choose another"))
    case = "x".join(map(str, settings.volume))
    other = "x".join(map(str, settings.mismatched_volume))
    for label, record in ((f"{case}, same windows, same map", shared),
                          (f"{case}, same windows, MONAI's own map (clamped at 1e-3)", own),
                          (f"{other}, different windows, same map", mismatched)):
        for key in ("max_abs_difference", "mean_abs_difference", "share_above_1e-4", "label_disagreement"):
            section.extra[f"{label}: {key}"] = record[key]
    section.extra[f"{other}: windows identical"] = str(mismatched["same windows"])
    section.extra.update(map_differences(settings.patch))


def _notes(settings: PredictSettings, device: torch.device, windows: int, monai_version: str,
           rounds: int, same: bool) -> list[str]:
    step = monai_scan_interval(settings.volume, settings.patch, settings.overlap)
    placement = ("Both place the same windows here: size - patch is a multiple of MONAI's step "
                 f"{list(step)} on every axis" if same else
                 f"The two place DIFFERENT windows on this volume (MONAI's step {list(step)}): choose a size with "
                 "size - patch a multiple of the step")
    return [
        f"One case: a {'x'.join(map(str, settings.volume))} volume, patch {'x'.join(map(str, settings.patch))}, "
        f"overlap {settings.overlap}, {windows} windows in batches of {settings.batch_size}; eval-mode 3D U-Net "
        f"width {settings.width} depth {settings.depth} (head x {settings.head_scale:g}), 4 classes, "
        f"{settings.threads} thread(s), device {device.type}; MONAI {monai_version}; {rounds} interleaved rounds.",
        placement + " (semiseg spaces windows evenly, MONAI steps by int(patch x (1 - overlap)) and moves the "
        "last one back to the border).",
        "Both average softmax probabilities with semiseg's Gaussian map (sigma = patch / 8) given to MONAI as "
        "roi_weight_map. MONAI's own map (mode gaussian, sigma_scale 0.125) clamps its tails to 1e-3 and that "
        "alone moves the probabilities by more than 1e-4; that difference, and the one on a volume where the two "
        "place different windows, are in the last table.",
    ]


def section_markdown(record: dict[str, Any], timestamp: str, machine: dict[str, Any]) -> str:
    """The ``## predict: ...`` block of ``latest.md`` for one section record."""
    text = render({"timestamp": timestamp, "mode": "section", "machine": machine, "sections": {SECTION: record}})
    block = text[text.index(f"## {SECTION}: "):]
    return block.rstrip() + "\n"


def replace_section(markdown: str, block: str) -> str:
    """``markdown`` with its ``## predict:`` section (up to the next ``## `` heading) replaced by
    ``block``, or with ``block`` appended when it has none; every other section is kept verbatim."""
    lines = markdown.splitlines(keepends=True)
    heading = f"## {SECTION}: "
    starts = [i for i, line in enumerate(lines) if line.startswith(heading)]
    if not starts:
        prefix = markdown.rstrip() + "\n\n" if markdown.strip() else ""
        return prefix + block
    first = starts[0]
    following = [i for i in range(first + 1, len(lines)) if lines[i].startswith("## ")]
    end = following[0] if following else len(lines)
    tail = "".join(lines[end:])
    return "".join(lines[:first]) + block + ("\n" + tail if tail else "")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description="Prediction throughput of semiseg's sliding-window inference "
                                                 "against MONAI's; updates the predict section of latest.md.")
    parser.add_argument("--quick", action="store_true", help="a smaller case and fewer rounds (about 15 s)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results",
                        help="folder for <timestamp>-predict.json and latest.md")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the section on its own: print its figures, write its JSON and its block of ``latest.md``."""
    args = parse_args(argv)
    if not monai_available():
        print(f"MONAI is not installed: {INSTALL_HINT}", file=sys.stderr)
        return 2
    settings = PredictSettings.quick() if args.quick else PredictSettings()
    timestamp = datetime.now().strftime("%Y-%m-%dT%H:%M:%S")
    machine = machine_info()
    started = time.perf_counter()
    record = run(settings).to_dict()
    record["elapsed_s"] = time.perf_counter() - started
    record["load_average_after"] = load_average()
    record["notes"].insert(0, f"Run on its own ({timestamp}, {'quick' if args.quick else 'default'}) by "
                              "benchmarks/predict_throughput.py; load average at start "
                              f"{machine.get('load_average')}; torch {machine.get('torch')}.")
    _print(record)
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / f"{timestamp.replace(':', '-')}-predict.json"
    json_path.write_text(json.dumps({"timestamp": timestamp, "machine": machine, "sections": {SECTION: record}},
                                    indent=1, default=str) + "\n")
    markdown = args.out / "latest.md"
    existing = markdown.read_text() if markdown.exists() else ""
    markdown.write_text(replace_section(existing, section_markdown(record, timestamp, machine)))
    print(f"\nresults: {json_path}\ntable:   {markdown} (section '{SECTION}')", flush=True)
    return 0


def _print(record: dict[str, Any]) -> None:
    print(f"== {SECTION}: {record['title']} ({record['elapsed_s']:.0f} s)", flush=True)
    for name, figure in record["figures"].items():
        print(f"   {name}: median {figure['median']:.3g} ({figure['min']:.3g}-{figure['max']:.3g}, n {figure['n']})",
              flush=True)
    for name, ratio in record["ratios"].items():
        print(f"   {name}: {ratio['value']:.3g} (best rounds {ratio['best_value']:.3g})", flush=True)
    for check in record["checks"]:
        mark = "PASS" if check["passed"] else "MISS"
        print(f"   [{mark}] {check['name']}: {check['measured']:.3g} (target {check['op']} {check['target']:.3g})",
              flush=True)
    for key, value in record["extra"].items():
        print(f"   {key}: {value:.3g}" if isinstance(value, float) else f"   {key}: {value}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
