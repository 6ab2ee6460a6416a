"""ftdist/ray_noise.py: Ray's every-run lines that are not about the run are dropped from the
driver's output; every other forwarded line passes unchanged."""

from __future__ import annotations

import pytest

from ftdist.ray_noise import filtered, is_benign

PREEMPTION = ("[2026-12-07 17:48:54,126 E 29659 29695] core_worker.cc:2465: Actor with class name: "
              "'PreemptionWatcher' and ID: '13c209837b37f5423c4f01e101000000' has constructor arguments in the "
              "object store and max_restarts > 0. If the arguments in the object store go out of scope or are "
              "lost, the actor restart will fail. See https://github.com/ray-project/ray/issues/53727 for more "
              "details.")
CLEANER = ("Failed to query Ray Train Controller actor state. State API may be temporarily unavailable. "
           "Continuing to monitor.")
STARTUP = ("WARNING: 8 PYTHON worker processes have been started on node: 65429efe1ae0a7ef3ee54f386ec784557bd7f556b08"
           "1a3717f853c3e with address: 192.0.2.2, which is 4x the maximum expected startup concurrency (2). This could "
           "be a result of using a large number of actors, tasks blocked in ray.get() calls, or tasks with fractional "
           "CPU requests (e.g., num_cpus=0.1) allowing high concurrency. See https://github.com/ray-project/ray/issues/"
           "3644 for some discussion of workarounds.")


def test_only_the_listed_lines_are_dropped():
    got: list[dict] = []
    handle = filtered(got.append)
    handle({"pid": 1, "lines": [PREEMPTION, "[ftdist] epoch 1/2", CLEANER]})
    handle({"pid": 2, "lines": [CLEANER, CLEANER]})  # nothing left: nothing printed, not an empty batch
    handle({"pid": "raylet", "lines": [STARTUP]})
    handle({"pid": 3, "lines": ["Actor with class name: 'MyActor' and ID: 'x' has constructor arguments in the "
                                "object store and max_restarts > 0."]})  # another actor's: the user's own
    assert got == [{"pid": 1, "lines": ["[ftdist] epoch 1/2"]},
                   {"pid": 3, "lines": ["Actor with class name: 'MyActor' and ID: 'x' has constructor arguments "
                                        "in the object store and max_restarts > 0."]}]
    assert is_benign(PREEMPTION) and is_benign(CLEANER) and not is_benign("Training failed due to worker errors")


@pytest.mark.slow
def test_the_filter_wraps_the_handler_ray_installs(ray_module):
    """After ray.init (the tests' Ray), ftdist's init wrapper finds Ray's print handler and wraps it once."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    from ftdist.ray_noise import quiet_ray_noise

    assert quiet_ray_noise() and quiet_ray_noise()  # idempotent
    wrapped = [h for name, h in dispatcher.handlers if name == "ray_print_logs"]
    assert len(wrapped) == 1 and getattr(wrapped[0], "ftdist_filtered", False)
    # the raylet's messages come by another path (listen_error_messages -> print_to_stdstream)
    from ray._private import worker as ray_worker

    assert getattr(ray_worker.print_to_stdstream, "ftdist_filtered", False)
