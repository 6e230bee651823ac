"""Label efficiency: test Dice against the number of labelled cases, per method.

No search: each method runs at its papers' defaults for each labelled budget, with the
same seeds; validation and test cases do not depend on the budget (the split carves them
first), so the curves compare like with like. The final table is grouped by
``data.num_labelled``.

    python studies/label_efficiency.py --smoke
"""

from semiseg.tune import Study, run_study
from semiseg.tune.presets import SMOKE

BUDGETS = (2, 4, 8, 16)
METHODS = ("supervised", "mean_teacher", "cross_pseudo_supervision", "transform_consistency")

STUDY = Study(
    name="label_efficiency",
    description="Dice against the number of labelled cases, per method",
    base={"train.max_epochs": 30},
    baselines=tuple({"method.name": method, "data.num_labelled": budget}
                    for budget in BUDGETS for method in METHODS),
    group_by=("data.num_labelled",),
    final_seeds=2,
    smoke={**SMOKE, "train.max_epochs": 2},
    smoke_final_seeds=1,
    smoke_baselines=tuple({"method.name": method, "data.num_labelled": budget}
                          for budget in (1, 2) for method in METHODS[:2]),
)


def main() -> None:
    """Run the study with the shared command line."""
    run_study(STUDY)


if __name__ == "__main__":
    main()
