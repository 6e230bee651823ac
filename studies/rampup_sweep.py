"""Ramp-up study: how long the sigmoid ramp-up of the consistency weight should be.

Searches ``schedule.rampup_epochs`` (0 … 30) together with the consistency weight for the
Mean Teacher (the two interact: a short ramp-up with a large weight lets an untrained
teacher's predictions dominate early), then re-runs the best with two seeds next to the
supervised baseline.

    python studies/rampup_sweep.py --smoke
"""

from semiseg.tune import Study, run_study
from semiseg.tune.presets import SMOKE

STUDY = Study(
    name="rampup_sweep",
    description="Mean Teacher: sensitivity of Dice to the ramp-up length of the consistency weight",
    base={"method.name": "mean_teacher", "train.max_epochs": 30},
    methods={"mean_teacher": ["schedule.rampup_epochs", "consistency"]},
    baselines=({"method.name": "supervised"},),
    final_seeds=2,
    num_samples=10,
    grace_period=8,
    smoke=SMOKE,
)


def main() -> None:
    """Run the study with the shared command line."""
    run_study(STUDY)


if __name__ == "__main__":
    main()
