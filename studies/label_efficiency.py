"""Label efficiency: test Dice against the number of labelled cases, per method.

No search: each method runs at its papers' defaults for each labelled budget, with the
same seeds; validation and test cases do not depend on the budget (the split carves them
first), so the curves compare like with like. The final table is grouped by
``data.num_labelled``. ``--methods`` replaces the four methods by any registered ones.

    python studies/label_efficiency.py --smoke
    python studies/label_efficiency.py --methods supervised,pi_model,temporal_ensembling
"""

from semiseg.tune import Study, run_study
from semiseg.tune.presets import SMOKE

BUDGETS = (2, 4, 8, 16)
METHODS = ("supervised", "mean_teacher", "cross_pseudo_supervision", "transform_consistency")

STUDY = Study(
    name="label_efficiency",
    description="Dice against the number of labelled cases, per method",
    base={"train.max_epochs": 30},
    baseline_methods=METHODS,
    baseline_variants=tuple({"data.num_labelled": budget} for budget in BUDGETS),
    group_by=("data.num_labelled",),
    final_seeds=2,
    smoke={**SMOKE, "train.max_epochs": 2},
    smoke_final_seeds=1,
    smoke_baseline_methods=METHODS[:2],
    smoke_baseline_variants=({"data.num_labelled": 1}, {"data.num_labelled": 2}),
)


def main() -> None:
    """Run the study with the shared command line."""
    run_study(STUDY)


if __name__ == "__main__":
    main()
