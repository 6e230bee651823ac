"""What the methods with a fully convolutional discriminator share: its size, its own learning rate,
its optimiser group.

Not a method (the registry skips this module): :mod:`semiseg.methods.entropy_minimisation`
(ADVENT's adversarial form, Vu et al. 2019) and :mod:`semiseg.methods.confidence_self_training`
(Hung et al. 2018) extend :class:`PixelDiscriminatorMethod`; their papers and losses are in their
own docstrings. Both papers use the same discriminator (4×4 stride-2 convolutions, widths
64·2^level, LeakyReLU 0.2, :class:`semiseg.components.discriminator.PixelDiscriminator`) trained
by its own optimiser at 1e-4.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from semiseg.components.discriminator import PixelDiscriminator
from semiseg.config import AT_LEAST_ONE, POSITIVE, Bounds
from semiseg.methods.base import BuildContext, Method, MethodParams, hparam


@dataclass(frozen=True)
class PixelDiscriminatorParams(MethodParams):
    """The discriminator's hyperparameters, declared once for every method that has one."""

    disc_lr: float = hparam(1e-4, low=1e-5, high=1e-3, log=True, bounds=POSITIVE,
                            help="learning rate of the discriminator's own optimiser (ADVENT, Hung et al.: 1e-4)")
    disc_width: int = hparam(16, bounds=AT_LEAST_ONE,
                             help="channels of the discriminator's first convolution (papers: 64; smaller "
                                  "default for CPU-sized runs)")
    disc_depth: int = hparam(4, bounds=Bounds(1.0, 8.0),
                             help="stride-2 LeakyReLU convolutions before the discriminator's output "
                                  "convolution (papers: 4)")


class PixelDiscriminatorMethod(Method):
    """A segmenter (``student``) and, when :meth:`build_discriminator` was called, a discriminator on
    ``num_classes``-channel maps, trained by its own ``discriminator`` optimiser group at ``disc_lr``."""

    params: PixelDiscriminatorParams

    def __init__(self, context: BuildContext, params: PixelDiscriminatorParams) -> None:
        super().__init__(context, params)
        self.trained["student"] = context.build_network()

    def build_discriminator(self) -> None:
        """Build the discriminator (seeded apart from the segmenter) into ``trained["discriminator"]``."""
        context, params = self.context, self.params
        self.trained["discriminator"] = context.build_module(
            lambda: PixelDiscriminator(dims=context.dims, in_channels=context.num_classes, width=params.disc_width,
                                       depth=params.disc_depth), seed_offset=1)

    def optimizer_groups(self) -> dict[str, list[torch.nn.Parameter]]:
        """``main``: the segmenter's parameters; ``discriminator``: the discriminator's, when there is one."""
        groups = {"main": list(self.trained["student"].parameters())}
        if "discriminator" in self.trained:
            groups["discriminator"] = list(self.trained["discriminator"].parameters())
        return groups

    def group_learning_rates(self) -> dict[str, float]:
        """The discriminator trains at ``disc_lr``."""
        return {"discriminator": self.params.disc_lr} if "discriminator" in self.trained else {}
