"""Studies: Ray Tune + Optuna (TPE) + ASHA over the trial configuration, logged to MLflow."""

from semiseg.tune.study import Study

__all__ = ["Study", "run_study"]


def run_study(study, argv=None):
    """Run ``study`` with the shared CLI (see :func:`semiseg.tune.runner.run_study`)."""
    from semiseg.tune.runner import run_study as run

    return run(study, argv)
