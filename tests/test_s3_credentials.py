"""Wrong credentials and missing permissions against an S3 server that enforces them.

moto's server accepts any credentials until its ``/moto-api/reset-auth`` endpoint turns IAM
authentication on; from then on every request is checked against the IAM users and policies
created before. This server runs in its own process (the switch is process-wide), so the shared
in-process server of the other tests keeps accepting anything.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import base_config, free_port, run_cli, synthetic_rows

BUCKET = "corp"


@pytest.fixture(scope="module")
def auth_s3(tiny_bert, cls_data):
    """An S3 server holding a data set and a raw file, with auth enforced, and two identities:
    ``lister`` may list the bucket but not read objects; ``wrong`` does not exist."""
    import boto3
    import s3fs

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.1)
        kw = dict(endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="setup",
                  aws_secret_access_key="setup")
        boto3.client("s3", **kw).create_bucket(Bucket=BUCKET)
        fs = s3fs.S3FileSystem(key="setup", secret="setup", client_kwargs={"endpoint_url": endpoint},
                               skip_instance_cache=True)
        fs.put(cls_data, f"{BUCKET}/ds", recursive=True)
        fs.pipe(f"{BUCKET}/raw/tickets.jsonl",
                "".join(json.dumps(r) + "\n" for r in synthetic_rows(50)).encode())
        iam = boto3.client("iam", **kw)
        iam.create_user(UserName="lister")
        iam.put_user_policy(UserName="lister", PolicyName="list-only", PolicyDocument=json.dumps({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": ["s3:ListBucket"], "Resource": [f"arn:aws:s3:::{BUCKET}"]}]}))
        key = iam.create_access_key(UserName="lister")["AccessKey"]
        req = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=b"0", method="POST",
                                     headers={"Content-Type": "text/plain"})
        assert json.loads(urllib.request.urlopen(req).read())["status"] == "ok"
        yield {"endpoint": endpoint,
               "lister": (key["AccessKeyId"], key["SecretAccessKey"]),
               "wrong": ("AKIAFTDISTWRONG00001", "ftdist-wrong-secret-key-000000000001")}
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _env(identity: tuple[str, str]) -> dict[str, str]:
    return {"AWS_ACCESS_KEY_ID": identity[0], "AWS_SECRET_ACCESS_KEY": identity[1], "HF_HUB_OFFLINE": "1"}


def _assert_denied(proc: subprocess.CompletedProcess, uri: str, identity: tuple[str, str]) -> None:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-2000:]
    lines = [l for l in proc.stderr.splitlines() if l.startswith("ftdist: error:")]
    assert len(lines) == 1 and "access denied to" in lines[0] and uri in lines[0], out[-2000:]
    assert "Traceback" not in out
    assert identity[1] not in out  # the secret never shows


@pytest.mark.parametrize("who", ["wrong", "lister"])
def test_train_with_bad_credentials_fails_in_one_line_naming_the_object(who, auth_s3, tiny_bert, cls_data,
                                                                        tmp_path: Path):
    cfg = base_config(tiny_bert, f"s3://{BUCKET}/ds", str(tmp_path / "runs"),
                      storage={"endpoint_url": auth_s3["endpoint"], "retries": 1})
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = run_cli("train", str(path), env=_env(auth_s3[who]), timeout=180)
    _assert_denied(proc, f"s3://{BUCKET}/ds/train/manifest.json", auth_s3[who])
    assert not list((tmp_path / "runs").rglob("epoch*"))  # failed before any training


def test_prepare_with_bad_credentials_writes_nothing(auth_s3, tiny_bert, tmp_path: Path):
    """Reading the raw file is denied: one line naming it, and no output folder appears."""
    proc = run_cli("data", "prepare", "--input", f"s3://{BUCKET}/raw/tickets.jsonl", "--output",
                   str(tmp_path / "out"), "--model", tiny_bert, "--endpoint-url", auth_s3["endpoint"],
                   env=_env(auth_s3["lister"]), timeout=180)
    _assert_denied(proc, f"s3://{BUCKET}/raw/tickets.jsonl", auth_s3["lister"])
    assert not (tmp_path / "out").exists()
    # And the identities are real: the right one still reads what `lister` may (the listing).
    import s3fs

    key, secret = auth_s3["lister"]
    fs = s3fs.S3FileSystem(key=key, secret=secret, client_kwargs={"endpoint_url": auth_s3["endpoint"]},
                           skip_instance_cache=True)
    assert f"{BUCKET}/raw/tickets.jsonl" in fs.ls(f"{BUCKET}/raw")
