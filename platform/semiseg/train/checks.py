"""Checks of a whole trial configuration against what training can do, run on the driver.

:mod:`semiseg.config` checks each value as it is set (types, numeric bounds, a method's
own choices and bounds). What needs the registries or several keys at once is checked
here, before Ray starts, so that a mistake costs the user one line and two seconds, not a
Ray start-up and a failed trial: names chosen from registries (model, optimiser, norm,
schedules, normalisation, loader), shapes and spacings written as text, the batch
composition, a dry build of the method's networks on the CPU, and what the method itself
refuses for the data (:meth:`semiseg.methods.Method.check_setting`).
"""

from __future__ import annotations

from semiseg.augment import AugmentSettings
from semiseg.config import ConfigError, ExperimentConfig, check_value, parse_shape, parse_spacing
from semiseg.data.prepared import LOADERS
from semiseg.data.source import preprocess_settings
from semiseg.methods import BuildContext, build_method, get_method
from semiseg.models.registry import MODELS
from semiseg.models.unet import NORMS
from semiseg.schedules import LR_SCHEDULES, RAMPUP_SHAPES
from semiseg.train.optimizers import OPTIMIZERS


def check_config(cfg: ExperimentConfig) -> None:
    """Refuse a configuration that training could not run, with one line naming the key.

    Args:
        cfg: a configuration whose values have passed :meth:`ExperimentConfig.apply`'s checks.

    Raises:
        ConfigError: ``"<key> = <value> is not allowed: ..."`` for the first problem found.
    """
    check_value("model.name", cfg.model.name, choices=sorted(MODELS))
    check_value("model.norm", cfg.model.norm, choices=NORMS)
    check_value("optim.name", cfg.optim.name, choices=sorted(OPTIMIZERS))
    check_value("optim.lr_schedule", cfg.optim.lr_schedule, choices=LR_SCHEDULES)
    check_value("schedule.rampup_shape", cfg.schedule.rampup_shape, choices=RAMPUP_SHAPES)
    check_value("data.loader", cfg.data.loader, choices=LOADERS)
    _check_data_text(cfg)
    preprocess_settings(cfg.data)
    _check_batch(cfg)
    _check_build(cfg)


def _check_data_text(cfg: ExperimentConfig) -> None:
    """Shapes and spacings written as text parse, with the number of axes they need."""
    data = cfg.data
    for key, shape in (("data.phantom_shape", parse_shape(data.phantom_shape, "data.phantom_shape")),
                       ("data.phantom_spacing", parse_spacing(data.phantom_spacing, "data.phantom_spacing"))):
        if len(shape) != 3:
            raise ConfigError(f"{key} = {getattr(data, key.split('.')[1])!r} is not allowed: it needs three axes "
                              "(X, Y, Z), e.g. 96x96x12")
    if data.patch_size:
        patch = parse_shape(data.patch_size, "data.patch_size")
        if data.dims != 3 or len(patch) != 3:
            raise ConfigError(f"data.patch_size = {data.patch_size!r} is not allowed: a training patch needs "
                              f"data.dims = 3 (it is {data.dims}) and three sizes, e.g. 64x64x32")


def _check_batch(cfg: ExperimentConfig) -> None:
    """The labelled part fits the batch, and a semi-supervised method gets unlabelled samples."""
    train = cfg.train
    uses_unlabelled = get_method(cfg.method["name"]).uses_unlabelled
    needed = train.labelled_per_batch + (1 if uses_unlabelled else 0)
    if train.batch_size < needed:
        reason = (f"at least train.labelled_per_batch + 1 = {needed}, so that {cfg.method['name']} sees "
                  "unlabelled samples" if uses_unlabelled else f"at least train.labelled_per_batch = {needed}")
        raise ConfigError(f"train.batch_size = {train.batch_size} is not allowed: it must be {reason}")


def _check_build(cfg: ExperimentConfig) -> None:
    """Build the method's networks once on the CPU (a model that cannot take these dims or sizes)."""
    context = BuildContext(dims=cfg.data.dims, in_channels=1, num_classes=2,
                           model={"name": cfg.model.name, "depth": cfg.model.depth, "width": cfg.model.width,
                                  "dropout": cfg.model.dropout, "norm": cfg.model.norm},
                           augment=AugmentSettings(), rampup_epochs=cfg.schedule.rampup_epochs,
                           rampup_shape=cfg.schedule.rampup_shape, seed=cfg.train.seed)
    try:
        method = build_method(cfg.method["name"], context, cfg.method)
    except ConfigError:
        raise
    except (ValueError, TypeError) as error:
        raise ConfigError(f"model.name = {cfg.model.name!r} is not allowed with method {cfg.method['name']!r}, "
                          f"data.dims = {cfg.data.dims}: {error}") from None
    method.check_setting(method.params, cfg.data.dims, cfg.data.patch_size)
