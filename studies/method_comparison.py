"""Every method on the same labelled cases with the same trial budget, then 3 seeds each.

Each semi-supervised method gets its own Optuna search over its main hyperparameters
(the same number of trials for each); the best configuration of each, the supervised
baseline and the methods without a search are re-run with three seeds, and the study
prints mean (std) of Dice, Jaccard, HD95, ASD, precision and recall per method — the form
of Table 1 in Perone & Cohen-Adad (2018) — and logs it to the study's MLflow parent run.

Two labelled cases (of the phantom's 40), as in ema_sweep: with three, the supervised
baseline's seed-to-seed spread (±0.05 test Dice) was as large as the methods' gains.

    python studies/method_comparison.py --smoke
    python studies/method_comparison.py --num-samples 6
"""

from semiseg.tune import Study, run_study
from semiseg.tune.presets import SMOKE

STUDY = Study(
    name="method_comparison",
    description="All methods, same labelled budget and trial budget, best of each over 3 seeds",
    base={"train.max_epochs": 30, "data.num_labelled": 2},
    methods={
        "mean_teacher": ["ema_decay", "consistency"],
        "ua_mean_teacher": ["ema_decay", "consistency"],
        "transform_consistency": ["consistency", "transform"],
        "cross_pseudo_supervision": ["consistency"],
        "feature_embedding": ["embedding_weight"],
        "adversarial": ["adversarial_weight"],
        "contrastive_pretrain": ["pretrain_epochs", "temperature", "strategy"],
        "pi_model": ["consistency"],
        "temporal_ensembling": ["consistency", "ensemble_momentum"],
        "co_training": ["consistency"],
        "entropy_minimisation": ["entropy_weight"],
        "confidence_self_training": ["adversarial_weight", "semi_weight"],
        "pretext_pretrain": ["pretrain_epochs", "task"],
        "supervised": [],
    },
    final_seeds=3,
    num_samples=4,
    grace_period=8,
    startup_trials=3,
    smoke={**SMOKE, "train.max_epochs": 2},
    smoke_num_samples=1,
    smoke_final_seeds=1,
)


def main() -> None:
    """Run the study with the shared command line."""
    run_study(STUDY)


if __name__ == "__main__":
    main()
