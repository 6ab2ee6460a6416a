"""``ftdist submit``: run ``ftdist train`` (or ``ftdist pipeline`` for a pipeline file) as a Ray job on a
cluster through Ray's Job SDK.

What travels: the validated config (with ``--set`` applied; a pipeline with every stage's config
inline) in a small working directory, and a
runtime_env with non-secret environment variables (S3 endpoint, region, offline flags, and any
``--env`` the user names). What never travels: secret values. A config with a literal secret
is refused (use ``${env:NAME}``); credentials reach the job from the cluster's own environment
(instance roles, IRSA, a Kubernetes Secret, the nodes' environment).
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
import tempfile
import time
from typing import Any

import yaml

from ftdist.config import load_raw, validate
from ftdist.overrides import read_yaml
from ftdist.redaction import literal_secrets
from ftdist.redaction import is_secret_name
from ftdist.errors import UserError

JOB_CONFIG = "ftdist-job.yaml"
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION", "HF_HUB_OFFLINE",
                 "HF_ENDPOINT", "TRANSFORMERS_OFFLINE", "DS_ACCELERATOR")
TERMINAL = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 1}
AGENT_WAIT_S = 60.0  # a just-started head needs a few seconds


def job_env(extra: list[str]) -> dict[str, str]:
    """Non-secret environment for the job; refuses secret-looking names (``DB_PASS``, ``MY_APIKEY``,
    ``X_CONNECTION_STRING``, ``*_TOKEN``, ...) because job metadata is readable by anyone who can
    reach the cluster's dashboard."""
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    for item in extra:
        key, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise UserError(f"--env '{item}' must look like NAME=value")
        if is_secret_name(key):
            raise UserError(f"--env {key} looks like a secret; secrets never go into job metadata: give the "
                            f"cluster the credential (instance role, IRSA, Kubernetes Secret) instead")
        env[key] = value
    return env


def job_payload(config_path: str, overrides: list[str]) -> tuple[dict[str, Any], str, str]:
    """What travels for ``config_path``: the file's content (``--set`` applied), the ftdist command that
    runs it and the run's (or pipeline's) name. A pipeline file (``stages:``) travels with every stage's
    config inline and is checked whole first; no config may hold a literal secret."""
    if "stages" in read_yaml(config_path):
        from ftdist.pipeline.spec import load_pipeline, self_contained

        raw = self_contained(config_path, overrides)
        configs = [(f"stage '{st.name}' ", st.config) for st in load_pipeline(config_path, data=raw).stages]
        command, name = "pipeline", str(raw["name"])
    else:
        raw = load_raw(config_path, overrides)
        cfg = validate(raw, config_path)
        configs, command, name = [("", cfg)], "train", cfg.run.name
    for where, cfg in configs:
        secrets = literal_secrets(cfg)
        if secrets:
            raise UserError(f"{where}config key {secrets[0]} holds a literal secret; write it as ${{env:NAME}} and "
                            f"provide NAME in the cluster's environment, so it never travels in job metadata")
    return raw, command, name


def submit(config_path: str, overrides: list[str], address: str, follow: bool, env: list[str]) -> int:
    from ray.job_submission import JobSubmissionClient

    raw, command, name = job_payload(config_path, overrides)
    environment = job_env(env)
    try:
        client = JobSubmissionClient(address)
    except Exception as e:  # noqa: BLE001 - connection problems are the user's to fix
        raise UserError(f"cannot reach the Ray job server at {address} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:160] if str(e) else ''}); check --address (http://HEAD:8265)") from None
    with tempfile.TemporaryDirectory(prefix="ftdist-job-") as wd:
        with open(os.path.join(wd, JOB_CONFIG), "w") as f:
            yaml.safe_dump(raw, f, sort_keys=False)
        job_id = submit_when_ready(client, entrypoint=f"python -m ftdist {command} {JOB_CONFIG}",
                                   runtime_env={"working_dir": wd, "env_vars": environment},
                                   metadata={"ftdist_run": name, "ftdist_command": command})
    print(f"submitted job {job_id} ({'pipeline' if command == 'pipeline' else 'run'} '{name}') to {address}",
          flush=True)
    if not follow:
        return 0
    return follow_job(client, job_id)


def submit_when_ready(client: Any, wait_s: float = AGENT_WAIT_S, **job: Any) -> str:
    """Submit, waiting for the job agent of a just-started head.

    Why: for some seconds after `ray start --head` the dashboard answers but its job agent does not
    ("No available agent to submit job"); a user who starts a cluster and submits at once would
    otherwise get a traceback for a cluster that is merely starting.
    """
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return client.submit_job(**job)
        except RuntimeError as e:
            if "No available agent" not in str(e):
                raise
            if time.monotonic() > deadline:
                raise UserError(f"the Ray cluster's job agent did not become available within {wait_s:.0f}s; "
                                f"check the head node (ray status) and submit again") from None
            time.sleep(1.0)


def follow_job(client: Any, job_id: str) -> int:
    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            sys.stdout.write(lines)
            sys.stdout.flush()

    try:
        asyncio.run(tail())
    except Exception:  # noqa: BLE001 - log streaming is best effort; the status below is what counts
        pass
    while True:
        status = str(client.get_job_status(job_id)).split(".")[-1]
        if status in TERMINAL:
            print(f"job {job_id} finished: {status}", flush=True)
            return TERMINAL[status]
        time.sleep(1.0)
