"""Typed experiment configuration with dotted keys.

One configuration object describes a trial. Its flat form uses dotted keys
(``optim.lr``, ``schedule.rampup_epochs``, ``method.ema_decay``); the same keys are
Optuna parameter names, MLflow params and CLI overrides (``--set optim.lr=3e-4``).
Precedence is: dataclass defaults < method defaults < study overrides < CLI.

The ``method`` section is open: its keys are the hyperparameters that the chosen
method declares; unknown keys are rejected with the list of keys the method accepts.
This module imports nothing of semiseg: what it knows of the methods, it is handed as a
:class:`MethodCatalogue` (the registered methods are
:data:`semiseg.methods.registry.REGISTERED_METHODS`, and
:func:`semiseg.methods.registry.experiment_config` builds a configuration with them).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Protocol, Sequence

SECTIONS = ("data", "model", "optim", "schedule", "train", "method")


class ConfigError(ValueError):
    """A configuration key or value that cannot be used."""


@dataclass(frozen=True)
class Bounds:
    """The values a numeric setting may take: an interval, open or closed at each end.

    Attributes:
        low, high: the ends (None: unbounded on that side).
        low_open, high_open: whether the end itself is excluded.
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def contains(self, value: float) -> bool:
        """Whether ``value`` is finite and inside the interval."""
        if not math.isfinite(float(value)):
            return False
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        return not (self.high is not None and (value > self.high or (self.high_open and value == self.high)))

    def describe(self) -> str:
        """The interval in words: ``> 0``, ``in (0, 1)``, ``>= 1``, ``a finite number``."""
        if self.low is not None and self.high is not None:
            return (f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}"
                    f"{')' if self.high_open else ']'}")
        if self.low is not None:
            return f"a finite number {'>' if self.low_open else '>='} {self.low:g}"
        if self.high is not None:
            return f"a finite number {'<' if self.high_open else '<='} {self.high:g}"
        return "a finite number"


FINITE = Bounds()
POSITIVE = Bounds(0.0, low_open=True)
NON_NEGATIVE = Bounds(0.0)
AT_LEAST_ONE = Bounds(1.0)
UNIT_OPEN = Bounds(0.0, 1.0, low_open=True, high_open=True)
FRACTION = Bounds(0.0, 1.0, high_open=True)
PROBABILITY = Bounds(0.0, 1.0)


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest candidate, or an empty string."""
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_value(key: str, value: Any, bounds: Bounds | None = None, choices: Iterable[Any] | None = None) -> None:
    """Refuse a value outside its bounds or choices, naming the key, the value and what is allowed.

    Every float must be finite, bounds or not; booleans are not numbers here.

    Raises:
        ConfigError: ``"<key> = <value> is not allowed: it must be <what>"``.
    """
    if choices is not None:
        allowed = list(choices)
        if value not in allowed or (isinstance(value, bool) != any(isinstance(c, bool) for c in allowed)):
            hint = did_you_mean(str(value), [str(c) for c in allowed]) if isinstance(value, str) else ""
            raise ConfigError(f"{key} = {value!r} is not allowed: choose one of "
                              f"{', '.join(str(c) for c in allowed)}{hint}")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    bounds = bounds or FINITE
    if not bounds.contains(value):
        raise ConfigError(f"{key} = {value!r} is not allowed: it must be {bounds.describe()}")


@dataclass
class DataConfig:
    """Where the cases come from and how they are split.

    ``dataset`` is ``"phantom"`` (a generated dataset written in the nnU-Net raw layout
    under ``phantom_root``) or the path of a folder in that layout. ``patch_size``
    (``"64x64x32"``) trains 3D models on random patches and validates whole cases with
    sliding-window inference; empty trains on whole volumes. Preprocessing (canonical
    orientation, ``target_spacing`` like ``"1x1x3"`` or empty to keep each case's own,
    ``normalisation`` ``zscore``/``zscore_nonzero``/``ct`` with ``ct_window`` ``"lo,hi"``,
    ``crop_to_body``, interpolation ``image_order`` 1 or 3) runs once per dataset and
    settings into a Parquet cache under ``prepared_cache`` (default: the cache folder).
    ``loader``: ``memory`` loads the split into memory; ``stream`` keeps the (few) labelled
    samples in memory and streams the unlabelled ones from the cache through a shuffle
    buffer of ``stream_buffer_rows`` samples per worker, reading evaluation cases one at a
    time; ``auto`` streams when the unlabelled samples exceed ``memory_budget_mb``.
    ``allow_absent_labels``: accept (with a warning) labels declared in ``dataset.json`` that
    occur in no label file, which the study otherwise refuses (they would train to Dice 0).
    ``split``: which split of the cases to train on: draw ``split`` of
    :func:`semiseg.data.splits.select_split` (0 is the one ``split_seed`` draws; every draw
    keeps the same test cases), or entry ``split`` of ``splits_file``, an nnU-Net
    ``splits_final.json`` (``train``/``val`` lists, optionally ``test``/``unlabelled``).
    """

    dataset: str = "phantom"
    phantom_root: str = ""
    phantom_cases: int = 40
    phantom_shape: str = "96x96x12"
    phantom_spacing: str = "1.0x1.0x3.0"
    phantom_seed: int = 0
    num_labelled: int = 3
    num_validation: int = 6
    num_test: int = 8
    split_seed: int = 0
    dims: int = 2
    patch_size: str = ""
    extra_unlabelled: str = ""
    target_spacing: str = ""
    normalisation: str = "zscore"
    ct_window: str = "-1000,1000"
    crop_to_body: bool = False
    image_order: int = 1
    prepared_cache: str = ""
    loader: str = "auto"
    memory_budget_mb: float = 2048.0
    stream_buffer_rows: int = 256
    allow_absent_labels: bool = False
    splits_file: str = ""
    split: int = 0


@dataclass
class ModelConfig:
    """The segmentation network (registry name and its architecture knobs)."""

    name: str = "unet"
    depth: int = 3
    width: int = 16
    dropout: float = 0.1
    norm: str = "batch"


@dataclass
class OptimConfig:
    """Optimiser and learning-rate schedule of the trained networks."""

    name: str = "adamw"
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.0
    lr_schedule: str = "cosine"
    grad_clip: float = 10.0


@dataclass
class ScheduleConfig:
    """Ramp-up of the unsupervised weight (shared by every semi-supervised method)."""

    rampup_epochs: float = 10.0
    rampup_shape: str = "sigmoid"


@dataclass
class TrainConfig:
    """The per-worker training loop."""

    max_epochs: int = 30
    steps_per_epoch: int = 20
    batch_size: int = 8
    labelled_per_batch: int = 4
    seed: int = 0
    threads: int = 1
    amp: bool = False
    channels_last: bool = True
    val_batch_size: int = 16
    augment_rotation_deg: float = 15.0
    augment_scale: float = 0.1
    augment_shift: float = 0.05
    augment_noise_std: float = 0.1
    augment_intensity: float = 0.1
    evaluate_test: bool = True
    foreground_fraction: float = 0.33
    val_overlap: float = 0.5
    supervised_loss: str = "dice_ce"


SETTING_BOUNDS: dict[str, Bounds] = {
    "data.phantom_cases": Bounds(2.0),
    "data.phantom_seed": NON_NEGATIVE,
    "data.num_labelled": AT_LEAST_ONE,
    "data.num_validation": AT_LEAST_ONE,
    "data.num_test": NON_NEGATIVE,
    "data.split_seed": NON_NEGATIVE,
    "data.split": NON_NEGATIVE,
    "data.memory_budget_mb": POSITIVE,
    "data.stream_buffer_rows": AT_LEAST_ONE,
    "model.depth": Bounds(1.0, 8.0),
    "model.width": AT_LEAST_ONE,
    "model.dropout": FRACTION,
    "optim.lr": POSITIVE,
    "optim.weight_decay": NON_NEGATIVE,
    "optim.warmup_epochs": NON_NEGATIVE,
    "optim.grad_clip": NON_NEGATIVE,
    "schedule.rampup_epochs": NON_NEGATIVE,
    "train.max_epochs": AT_LEAST_ONE,
    "train.steps_per_epoch": AT_LEAST_ONE,
    "train.batch_size": AT_LEAST_ONE,
    "train.labelled_per_batch": AT_LEAST_ONE,
    "train.seed": NON_NEGATIVE,
    "train.threads": AT_LEAST_ONE,
    "train.val_batch_size": AT_LEAST_ONE,
    "train.augment_rotation_deg": Bounds(0.0, 180.0),
    "train.augment_scale": FRACTION,
    "train.augment_shift": PROBABILITY,
    "train.augment_noise_std": NON_NEGATIVE,
    "train.augment_intensity": FRACTION,
    "train.foreground_fraction": PROBABILITY,
    "train.val_overlap": FRACTION,
}
"""The values each numeric setting may take (checked as it is set; every float must be finite).
Names chosen from registries (models, optimisers, normalisations, ...) are checked by
:func:`semiseg.train.checks.check_config`, which knows the registries."""

SUPERVISED_LOSSES = ("dice_ce", "dice", "ce", "lovasz", "dice_ce+lovasz")
"""``train.supervised_loss``: the loss of every method on labelled images (see :func:`semiseg.losses.supervised_loss`)."""

SETTING_CHOICES: dict[str, tuple[Any, ...]] = {
    "data.dims": (2, 3),
    "data.image_order": (1, 3),
    "train.supervised_loss": SUPERVISED_LOSSES,
}
"""Settings with a fixed set of values that no registry owns."""


class DeclaredHParam(Protocol):
    """What the configuration reads of a method's hyperparameter declaration."""

    @property
    def default(self) -> Any:
        """The value a configuration starts from."""

    @property
    def bounds(self) -> Bounds | None:
        """The values a numeric hyperparameter may take (None: any finite number)."""

    @property
    def choices(self) -> Sequence[Any] | None:
        """The values a categorical hyperparameter may take (None: not categorical)."""


class MethodCatalogue(Protocol):
    """The methods a configuration may name, and the hyperparameters each declares."""

    def names(self) -> list[str]:
        """The method names, sorted."""

    def hparams(self, name: str) -> Mapping[str, DeclaredHParam]:
        """Hyperparameter name → declaration of method ``name`` (one of :meth:`names`)."""


@dataclass
class ExperimentConfig:
    """A whole trial configuration: typed sections plus the open ``method`` section."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    method: dict[str, Any] = field(default_factory=lambda: {"name": "supervised"})

    def to_flat(self) -> dict[str, Any]:
        """Return the configuration as a flat dict with dotted keys.

        Returns:
            ``{"data.dataset": ..., "method.name": ..., "method.ema_decay": ...}``.
        """
        flat: dict[str, Any] = {}
        for section in SECTIONS[:-1]:
            for key, value in dataclasses.asdict(getattr(self, section)).items():
                flat[f"{section}.{key}"] = value
        for key, value in self.method.items():
            flat[f"method.{key}"] = value
        return flat

    def to_json(self) -> str:
        """Return the resolved configuration as indented JSON (nested by section)."""
        nested = {section: dataclasses.asdict(getattr(self, section)) for section in SECTIONS[:-1]}
        nested["method"] = dict(self.method)
        return json.dumps(nested, indent=2, sort_keys=True)

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any], methods: MethodCatalogue) -> "ExperimentConfig":
        """Build a configuration from dotted keys, filling method defaults.

        Args:
            flat: dotted keys; keys without a known section are rejected. Keys that do not
                start with a section name (e.g. Tune's own entries) must be removed first.
            methods: the methods ``method.name`` may name, with their declared hyperparameters.

        Returns:
            The configuration, with the chosen method's declared defaults filled in.

        Raises:
            ConfigError: unknown section, field or method hyperparameter, or a value that
                cannot be converted to the field's type.
        """
        config = cls()
        config.apply(flat, methods)
        return config

    def apply(self, flat: Mapping[str, Any], methods: MethodCatalogue) -> "ExperimentConfig":
        """Apply dotted-key overrides in place and return ``self``.

        ``method.name`` is applied first so that the method's defaults are filled before
        its hyperparameters are overridden. ``methods``: see :meth:`from_flat`.

        Raises:
            ConfigError: see :meth:`from_flat`.
        """
        items = dict(flat)
        if "method.name" in items:
            name = str(items.pop("method.name"))
            self.method = {"name": name, **_method_hparams(methods, name)[1]}
        elif len(self.method) == 1:
            self.method = {"name": self.method["name"], **_method_hparams(methods, self.method["name"])[1]}
        for key, value in items.items():
            section, _, name = key.partition(".")
            if section not in SECTIONS or not name:
                raise ConfigError(f"unknown configuration key {key!r}{did_you_mean(key, self._known_keys())}: "
                                  f"keys are <section>.<name> with section one of {', '.join(SECTIONS)}")
            if section == "method":
                self._set_method_param(methods, name, value)
            else:
                self._set_field(section, name, value)
        return self

    def _known_keys(self) -> list[str]:
        keys = [f"{section}.{f.name}" for section in SECTIONS[:-1] for f in dataclasses.fields(getattr(self, section))]
        return keys + [f"method.{name}" for name in self.method]

    def _set_field(self, section: str, name: str, value: Any) -> None:
        target = getattr(self, section)
        fields = {f.name: f for f in dataclasses.fields(target)}
        key = f"{section}.{name}"
        if name not in fields:
            raise ConfigError(f"unknown key '{key}'{did_you_mean(key, self._known_keys())}; {section} has: "
                              f"{', '.join(sorted(fields))}")
        current = getattr(target, name)
        converted = coerce(value, type(current), key)
        check_value(key, converted, SETTING_BOUNDS.get(key), SETTING_CHOICES.get(key))
        setattr(target, name, converted)

    def _set_method_param(self, methods: MethodCatalogue, name: str, value: Any) -> None:
        defaults = {k: v for k, v in self.method.items() if k != "name"}
        if name not in defaults:
            raise ConfigError(f"unknown key 'method.{name}'{did_you_mean(f'method.{name}', self._known_keys())} for method "
                              f"'{self.method['name']}'; it has: {', '.join(sorted(defaults)) or '(no hyperparameters)'}")
        key = f"method.{name}"
        declared = _method_hparams(methods, self.method["name"])[0][name]
        converted = coerce(value, type(defaults[name]), key)
        check_value(key, converted, declared.bounds, declared.choices)
        self.method[name] = converted


def _method_hparams(methods: MethodCatalogue, name: str) -> tuple[Mapping[str, DeclaredHParam], dict[str, Any]]:
    """(declarations, defaults) of method ``name``'s hyperparameters.

    Raises:
        ConfigError: ``methods`` has no method ``name``.
    """
    names = methods.names()
    if name not in names:
        raise ConfigError(f"method.name = {name!r} is not allowed: choose one of {', '.join(names)}"
                          f"{did_you_mean(name, names)}")
    declared = methods.hparams(name)
    return declared, {key: hparam.default for key, hparam in declared.items()}


def coerce(value: Any, target: type, key: str) -> Any:
    """Convert ``value`` (possibly a CLI string) to ``target``'s type.

    Args:
        value: the value to convert.
        target: the type of the field's default (bool, int, float or str).
        key: the dotted key, named in the error message.

    Returns:
        The converted value.

    Raises:
        ConfigError: the value cannot be converted.
    """
    try:
        if target is bool:
            if isinstance(value, str):
                lowered = value.strip().lower()
                if lowered in {"1", "true", "yes", "on"}:
                    return True
                if lowered in {"0", "false", "no", "off"}:
                    return False
                raise ValueError(value)
            if value not in (0, 1):
                raise ValueError(value)
            return bool(value)
        if target is int:
            number = float(value) if isinstance(value, str) else value
            if isinstance(number, bool) or (isinstance(number, float) and not number.is_integer()):
                raise ValueError(value)
            return int(number)
        if target is float:
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        kind = {bool: "true or false", int: "an integer", float: "a number"}.get(target, target.__name__)
        raise ConfigError(f"{key} = {value!r} is not allowed: it must be {kind}") from None


def parse_override(text: str) -> tuple[str, str]:
    """Split a CLI override ``key=value``.

    Raises:
        ConfigError: the text has no ``=`` or an empty key.
    """
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    return key.strip(), value.strip()


def parse_shape(text: str, key: str) -> tuple[int, ...]:
    """Parse ``"96x96x12"`` into ``(96, 96, 12)``.

    Raises:
        ConfigError: not a list of positive integers separated by ``x``.
    """
    try:
        shape = tuple(int(part) for part in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"{key}: {text!r} is not a shape like 96x96x12") from None
    if not shape or any(s <= 0 for s in shape):
        raise ConfigError(f"{key}: {text!r} must contain positive sizes")
    return shape


def parse_spacing(text: str, key: str) -> tuple[float, ...]:
    """Parse ``"1.0x1.0x3.0"`` into ``(1.0, 1.0, 3.0)``.

    Raises:
        ConfigError: not a list of positive numbers separated by ``x``.
    """
    try:
        spacing = tuple(float(part) for part in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"{key}: {text!r} is not a spacing like 1.0x1.0x3.0") from None
    if not spacing or any(s <= 0 for s in spacing):
        raise ConfigError(f"{key}: {text!r} must contain positive spacings")
    return spacing
