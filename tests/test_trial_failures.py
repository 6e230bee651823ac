"""Which trial errors are retried, what a trial asks of the cluster, and refusals before Ray starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from semiseg.config import ConfigError
from semiseg.data.errors import DatasetError
from semiseg.tune.failures import describe_error, is_deterministic
from semiseg.tune.resources import (ResourceError, TrialRequest, check_local_resources, cluster_growth, local_cpus,
                                    placement_problem)

TOO_SMALL = "Given input size: (128x1x1). Calculated output size: (128x0x0). Output size is too small"


def _raised(error: BaseException, cause: BaseException | None = None) -> BaseException:
    try:
        raise error from cause
    except BaseException as caught:  # noqa: BLE001
        return caught


@pytest.mark.parametrize("error", [ValueError("x"), TypeError("x"), KeyError("x"), IndexError("x"),
                                   AttributeError("x"), AssertionError("x"), NotImplementedError("x"),
                                   ZeroDivisionError("x"), ConfigError("x"), DatasetError([("f", "bad")]),
                                   RuntimeError(TOO_SMALL),
                                   RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x8 and 16x2)"),
                                   RuntimeError("The size of tensor a (32) must match the size of tensor b (16)")])
def test_configuration_and_code_errors_are_deterministic(error):
    assert is_deterministic(error)


@pytest.mark.parametrize("error", [OSError("disk"), MemoryError(), RuntimeError("CUDA out of memory. Tried to"),
                                   RuntimeError("[gloo] Connection closed by peer"), RuntimeError("something"),
                                   TimeoutError("x")])
def test_environment_errors_keep_their_retries(error):
    assert not is_deterministic(error)


def test_ray_wrappers_are_opened_and_lost_workers_are_retried():
    import ray.exceptions as rx
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback, WorkerHealthCheckFailedError
    from ray.train.v2.api.exceptions import WorkerGroupError

    task = rx.RayTaskError("tune_trial", "Traceback ...\nRuntimeError: ...", _raised(RuntimeError(TOO_SMALL)))
    assert is_deterministic(task) and is_deterministic(task.as_instanceof_cause())
    assert describe_error(task.as_instanceof_cause()) == f"RuntimeError: {TOO_SMALL}"
    for lost in (rx.ActorDiedError(), rx.NodeDiedError("n"), rx.WorkerCrashedError(),
                 rx.OwnerDiedError("0" * 56, "", ""), rx.OutOfMemoryError("oom")):
        assert not is_deterministic(lost), type(lost)
    assert not is_deterministic(_raised(ValueError("wrapped"), rx.NodeDiedError("n")))

    user = UserExceptionWithTraceback(RuntimeError(TOO_SMALL), f"Traceback ...\nRuntimeError: {TOO_SMALL}")
    assert is_deterministic(WorkerGroupError("[Rank 0]", {0: user}))
    assert describe_error(WorkerGroupError("[Rank 0]", {0: user})) == f"RuntimeError: {TOO_SMALL}"
    died = WorkerHealthCheckFailedError("worker died", rx.ActorDiedError())
    assert not is_deterministic(WorkerGroupError("[Rank 1]", {1: died}))
    assert not is_deterministic(WorkerGroupError("[Rank 0, 1]", {0: user, 1: died})), "a lost worker wins"


def test_describe_error_is_one_line():
    assert describe_error(ValueError("first\nsecond")) == "ValueError: first"
    assert describe_error(None) == ""


def test_trial_request_per_node_and_gpus():
    assert TrialRequest(2, 2, 0).workers_on(5, 0) == 2
    assert TrialRequest(1, 1, 0.25).workers_on(16, 1) == 4
    assert TrialRequest(1, 1, 0.6).workers_on(16, 1) == 1, "fractions of two GPUs do not join"
    assert TrialRequest(3, 1, 0.6).gpus_needed() == 3 and TrialRequest(8, 1, 0.25).gpus_needed() == 2
    assert TrialRequest(2, 1, 2).gpus_needed() == 4 and TrialRequest(1, 1, 2).workers_on(8, 3) == 1
    assert placement_problem(TrialRequest(2, 2, 0), [(3, 0), (3, 0)]) is None
    assert "at most 3 of the trial's 4 workers" in placement_problem(TrialRequest(4, 2, 0), [(3, 0)] * 3)
    assert "no alive node of the cluster can hold one worker (4 CPU(s))" in placement_problem(
        TrialRequest(1, 4, 0), [(2, 0), (1, 0)])


def test_cluster_growth_without_a_connection_follows_node_labels():
    request = TrialRequest(1, 4, 0)
    hand_started = [{"Alive": True, "Resources": {"CPU": 1.0}, "Labels": {"ray.io/node-id": "ab"}}]
    autoscaled = [{"Alive": True, "Resources": {"CPU": 0.0}, "Labels": {"ray.io/node-group": "head"}}]
    assert cluster_growth(request, hand_started) is False
    assert cluster_growth(request, autoscaled) is None, "an autoscaler may add a node: unknown, not refused"


def test_local_resources_refusals_name_the_flag_and_the_machine():
    with pytest.raises(ResourceError, match=r"^--cpus-per-worker 64: a worker needs 64 CPUs on one node; "
                                            r"this machine has 2 CPU\(s\)"):
        check_local_resources(TrialRequest(1, 64, 0), cpus=2, gpus=0)
    with pytest.raises(ResourceError, match=r"^--workers-per-trial 64 x --cpus-per-worker 1: a trial needs 64 CPUs"):
        check_local_resources(TrialRequest(64, 1, 0), cpus=2, gpus=0)
    with pytest.raises(ResourceError, match=r"^--gpus-per-worker 1: a trial needs 1 GPU\(s\); this machine has no GPU"):
        check_local_resources(TrialRequest(1, 1, 1), cpus=2, gpus=0)
    with pytest.raises(ResourceError, match=r"--gpus-per-worker 0.5 x --workers-per-trial 4: a trial needs 2 GPU"):
        check_local_resources(TrialRequest(4, 1, 0.5), cpus=8, gpus=1)
    with pytest.raises(ResourceError, match="whole number"):
        check_local_resources(TrialRequest(1, 1, 1.5), cpus=8, gpus=2)
    check_local_resources(TrialRequest(2, 1, 0.5), cpus=2, gpus=1)


# ------------------------------------------------------------------ the study scripts, with Ray made unstartable

def _refused_before_ray(result) -> str:
    """The one ``error:`` line of a study that exited 2 without starting Ray."""
    from tests.study_runs import RAY_STARTED_EXIT

    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert result.returncode != RAY_STARTED_EXIT and "ray.init was called" not in result.stderr
    assert "Traceback" not in result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.stderr.strip().splitlines()[-1] == line
    return line


@pytest.mark.parametrize("flags, expected", [
    (("--workers-per-trial", "64"), "error: --workers-per-trial 64 x --cpus-per-worker 1: a trial needs 64 CPUs at "
                                    "once; this machine has {cpus} CPU(s)"),
    (("--cpus-per-worker", "64"), "error: --cpus-per-worker 64: a worker needs 64 CPUs on one node; this machine "
                                  "has {cpus} CPU(s)"),
    (("--gpus-per-worker", "1"), "error: --gpus-per-worker 1: a trial needs 1 GPU(s); this machine has no GPU"),
])
def test_impossible_resources_exit_2_before_ray_starts(tmp_path, flags, expected):
    from tests.study_runs import run_study_without_ray

    if flags[0] == "--gpus-per-worker":
        import torch

        if torch.cuda.device_count():
            pytest.skip("this machine has a GPU")
    line = _refused_before_ray(run_study_without_ray("ema_sweep.py", "--smoke", *flags, tmp_path=tmp_path))
    assert line.startswith(expected.format(cpus=local_cpus())), line


@pytest.mark.parametrize("flag", ["--storage-path", "--state-dir"])
def test_a_file_as_storage_or_state_folder_exits_2_before_ray_starts(tmp_path, flag):
    from tests.study_runs import run_study_without_ray

    file = tmp_path / "a_file"
    file.write_text("not a folder")
    line = _refused_before_ray(run_study_without_ray("ema_sweep.py", "--smoke", flag, str(file), tmp_path=tmp_path))
    assert line == f"error: {flag} {file}: is a file, not a folder; give a folder (it is created if missing)"
    below = file / "runs"
    line = _refused_before_ray(run_study_without_ray("ema_sweep.py", "--smoke", flag, str(below), tmp_path=tmp_path))
    assert line.startswith(f"error: {flag} {below}: is under {file}, which is a file"), line
    assert not any(Path(tmp_path / "runs").glob("**/study_state.json"))
