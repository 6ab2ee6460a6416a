"""``ftdist submit`` without a cluster: which environment variables may travel in job metadata."""

from __future__ import annotations

import pytest

from ftdist.errors import UserError
from ftdist.submit import job_env


@pytest.mark.parametrize("name", ["DB_PASS", "MY_APIKEY", "X_CONNECTION_STRING", "AWS_SECRET_ACCESS_KEY", "HF_TOKEN",
                                  "GITHUB_TOKEN", "MY_PRIVATE_KEY", "AZURE_CREDENTIALS", "PGPASSWORD", "DB_PASSWORD",
                                  "AWS_SESSION_TOKEN", "API_KEY", "SAS_TOKEN", "AWS_ACCESS_KEY_ID", "BASIC_AUTH"])
def test_secret_looking_env_names_are_refused(name):
    with pytest.raises(UserError) as e:
        job_env([f"{name}=value-must-not-show"])
    msg = str(e.value)
    assert name in msg and "looks like a secret" in msg and "value-must-not-show" not in msg and "\n" not in msg


@pytest.mark.parametrize("name", ["TOKENIZERS_PARALLELISM", "FTDIST_TEST_MARK", "MAX_TOKENS", "PASSTHROUGH_MODE",
                                  "AWS_ENDPOINT_URL", "HF_HUB_OFFLINE", "NCCL_SOCKET_IFNAME", "KEYBOARD_LAYOUT"])
def test_ordinary_env_names_travel(name):
    assert job_env([f"{name}=1"])[name] == "1"
