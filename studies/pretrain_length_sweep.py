"""Pretraining length before the semi-supervised stage (Bortsova et al. 2019, and its reproduction).

The reproduction compared three protocols: no pretraining (SemiC), long supervised
pretraining (SemiCT, which collapsed to a constant prediction for two of three transforms)
and early-stopped pretraining (SemiCTE). Here ``method.pretrain_epochs`` is searched for
transformation consistency (supervised pretraining) and for contrastive pretraining, and
the three protocols — none, short, long — are re-run with two seeds next to the supervised
baseline; the final table is grouped by pretraining length.

    python studies/pretrain_length_sweep.py --smoke
"""

from semiseg.tune import Study, run_study
from semiseg.tune.presets import SMOKE

PROTOCOLS = {"none": 0, "short": 5, "long": 20}

STUDY = Study(
    name="pretrain_length_sweep",
    description="Supervised or contrastive pretraining epochs before the semi-supervised stage",
    base={"train.max_epochs": 30},
    methods={"transform_consistency": ["pretrain_epochs"], "contrastive_pretrain": ["pretrain_epochs"]},
    baselines=tuple({"method.name": "transform_consistency", "method.pretrain_epochs": epochs}
                    for epochs in PROTOCOLS.values()) + ({"method.name": "supervised"},),
    group_by=("method.pretrain_epochs",),
    final_seeds=2,
    num_samples=6,
    grace_period=10,
    smoke={**SMOKE, "train.max_epochs": 3},
    smoke_num_samples=1,
    smoke_baselines=({"method.name": "transform_consistency", "method.pretrain_epochs": 0},
                     {"method.name": "transform_consistency", "method.pretrain_epochs": 2},
                     {"method.name": "supervised"}),
)


def main() -> None:
    """Run the study with the shared command line."""
    run_study(STUDY)


if __name__ == "__main__":
    main()
