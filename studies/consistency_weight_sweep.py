"""Mean Teacher consistency-weight study (Perone & Cohen-Adad 2018: 2.9; their follow-up code: 20).

Searches ``method.consistency`` on a log scale (0.1 … 30) with TPE + ASHA, seeded with the
paper's default, then re-runs the best weight and the supervised baseline with two seeds.

    python studies/consistency_weight_sweep.py --smoke
"""

from semiseg.tune import Study, run_study
from semiseg.tune.presets import SMOKE

STUDY = Study(
    name="consistency_weight_sweep",
    description="Mean Teacher: sensitivity of Dice to the consistency weight",
    base={"method.name": "mean_teacher", "train.max_epochs": 30},
    methods={"mean_teacher": ["consistency", "consistency_loss"]},
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
