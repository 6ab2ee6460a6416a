"""Failure -> one line: Ray's own exception types, built as Ray Train raises them from a run."""

from __future__ import annotations

import pytest

from ftdist.errors import StorageUnavailable, UserError
from ftdist.failures import describe_failure, storage_outage_from_ray, user_error_from_ray


def _raised_in_worker(exc: BaseException) -> Exception:
    """What Ray hands the controller for a worker's exception: the remote traceback as text."""
    try:
        raise exc
    except BaseException as e:  # noqa: BLE001
        import traceback

        return RuntimeError("".join(traceback.format_exception(e)))


def _group_error(failures: dict[int, Exception]):
    from ray.train import WorkerGroupError

    return WorkerGroupError("Training failed due to worker errors", failures)


def _as_fit_raises(err: Exception) -> Exception:
    """``trainer.fit()`` raises the group error; our launcher sees it possibly chained."""
    try:
        try:
            raise err
        except Exception as inner:
            raise RuntimeError("fit failed") from inner
    except RuntimeError as outer:
        return outer


def test_a_user_error_raised_on_a_worker_is_recovered_as_its_one_line():
    err = _as_fit_raises(_group_error({0: _raised_in_worker(UserError("shard 's3://b/x' is corrupt; re-run"))}))
    ue = user_error_from_ray(err)
    assert isinstance(ue, UserError) and str(ue) == "shard 's3://b/x' is corrupt; re-run"
    assert storage_outage_from_ray(err) is None


def test_a_storage_outage_on_a_worker_is_recovered_as_its_line():
    err = _group_error({1: _raised_in_worker(StorageUnavailable("storage unavailable: 's3://b/d' failed; rerun"))})
    assert storage_outage_from_ray(err) == "storage unavailable: 's3://b/d' failed; rerun"
    assert user_error_from_ray(err) is None


def test_each_failed_rank_is_described_without_a_traceback():
    err = _group_error({1: RuntimeError("Worker health check failed"),
                        0: _raised_in_worker(ValueError("loss is nan"))})
    line = describe_failure(_as_fit_raises(err))
    assert line == "rank 0 raised ValueError: loss is nan; rank 1 stopped responding (health check failed: " \
                   "the rank is stalled, hung or was killed)"
    assert "\n" not in line


@pytest.mark.parametrize("cause, expected", [
    (ConnectionError("Could not connect to the endpoint URL"), "storage unavailable: the Ray Train controller"),
    (RuntimeError("boom\nsomething happened"), "the Ray Train controller failed: something happened"),
])
def test_controller_failures(cause, expected):
    from ray.train import ControllerError

    line = describe_failure(ControllerError(cause))
    assert line is not None and line.startswith(expected) and "\n" not in line


def test_an_unrelated_exception_is_left_alone():
    assert describe_failure(KeyError("x")) is None
    assert user_error_from_ray(KeyError("x")) is None and storage_outage_from_ray(KeyError("x")) is None
