"""Learning-rate study for the Mean Teacher and the supervised baseline, each with its own search.

A semi-supervised method compared with a supervised baseline tuned less carefully looks
better than it is; here both get the same trial budget over ``optim.lr`` (1e-4 … 1e-2,
log), and the best of each is re-run with two seeds.

    python studies/lr_sweep.py --smoke
"""

from semiseg.tune import Study, run_study
from semiseg.tune.presets import SMOKE

STUDY = Study(
    name="lr_sweep",
    description="Learning rate of Mean Teacher and of the supervised baseline, same budget each",
    base={"train.max_epochs": 30},
    methods={"mean_teacher": ["optim.lr"], "supervised": ["optim.lr"]},
    final_seeds=2,
    num_samples=8,
    grace_period=8,
    smoke=SMOKE,
)


def main() -> None:
    """Run the study with the shared command line."""
    run_study(STUDY)


if __name__ == "__main__":
    main()
