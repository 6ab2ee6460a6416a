"""Keeping secrets out of everything ftdist writes, and ``${env:NAME}`` references.

Secret-looking keys (matched as whole name segments) and credential parameters of URLs are
redacted from saved configs, summaries, logs and error messages; ``${env:NAME}`` references stay
references wherever a config is stored or sent, and are resolved only where a value is used.
"""

from __future__ import annotations

import os
import re
from typing import Any

from pydantic import BaseModel

from ftdist.errors import UserError

ENV_REF = re.compile(r"\$\{env:([A-Za-z_][A-Za-z0-9_]*)\}")
REDACTED = "***"

# Secret names are matched as whole segments of a name (split on ``_ - .``, spaces and camelCase),
# never as substrings: ``tokenize``, ``tokenizer`` and ``max_tokens`` are settings, and redacting
# them made saved configs unloadable (issue 11).
_SECRET_SEGMENTS = frozenset({
    "token", "secret", "secrets", "password", "passwords", "passwd", "pass", "pwd", "passphrase",
    "credential", "credentials", "auth", "authorization", "apikey", "sig", "signature", "sas", "cookie",
})
# Pairs of adjacent segments that name a secret together (``api_key``, ``connection_string``).
_SECRET_PAIRS = frozenset({("api", "key"), ("private", "key"), ("access", "key"), ("secret", "key"),
                           ("connection", "string"), ("client", "secret")})
# Words unambiguous enough to count inside a segment (``PGPASSWORD``, ``MY_APIKEY``).
_SECRET_WORDS = ("password", "passwd", "passphrase", "secret", "apikey", "credential", "privatekey",
                 "connectionstring")
# Tokenizer settings whose names end in ``token`` but whose values are vocabulary entries.
_TOKENIZER_TOKENS = frozenset({"pad", "eos", "bos", "unk", "sep", "cls", "mask"})


def name_segments(name: str) -> list[str]:
    """``aws_secret_access_key`` / ``X-Amz-Signature`` / ``apiKey`` -> lower-case word segments."""
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name)
    return [s for s in re.split(r"[_\-.\s]+", spaced.lower()) if s]


def is_secret_name(name: str) -> bool:
    """Whether a config key, URL query parameter or environment variable name holds a credential."""
    segs = name_segments(name)
    if not segs:
        return False
    if segs[-1] == "key":  # ``key`` (s3fs), ``access_key``, ``aws_secret_access_key``
        return True
    for i, seg in enumerate(segs):
        prev = segs[i - 1] if i else ""
        if seg in _SECRET_SEGMENTS and not (seg == "token" and prev in _TOKENIZER_TOKENS):
            return True
        if (prev, seg) in _SECRET_PAIRS:
            return True
    joined = "".join(segs)
    return any(w in joined for w in _SECRET_WORDS)


def _keep_value(v: Any) -> bool:
    """Empty values and whole ``${env:...}`` references are not secrets: keep them."""
    return v in (None, "", {}) or (isinstance(v, str) and ENV_REF.fullmatch(v) is not None)


def redact(obj: Any) -> Any:
    """A copy with every value under a secret-looking key replaced, and credentials stripped from URLs."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if isinstance(k, str) and is_secret_name(k) and not _keep_value(v):
                out[k] = REDACTED if not isinstance(v, dict) else redact(v)
            else:
                out[k] = redact(v)
        return out
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    if isinstance(obj, str):
        return redact_uri(obj)
    return obj


_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>]+")
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*://)[^/@\s]+:[^/@\s]+@")
_QUERY_PARAM = re.compile(r"(^|[?&;])([^=&;#?]+)=([^&;#]*)")
#: query parameters that carry credentials but whose names are not secret words on their own
_SECRET_PARAMS = frozenset({"code", "x-amz-credential", "x-goog-credential", "x-goog-signature", "awsaccesskeyid"})


def _redact_url(url: str) -> str:
    url = _USERINFO.sub(r"\1" + REDACTED + "@", url)
    head, sep, rest = url.partition("?")
    if not sep:
        return url
    query, hash_, frag = rest.partition("#")

    def param(m: re.Match[str]) -> str:
        name, value = m.group(2), m.group(3)
        secret = value and (is_secret_name(name) or name.lower() in _SECRET_PARAMS)
        return f"{m.group(1)}{name}={REDACTED if secret else value}"

    return head + sep + _QUERY_PARAM.sub(param, query) + hash_ + frag


def redact_uri(s: str) -> str:
    """Strip ``user:password@`` and the values of credential query parameters (presigned URLs' signatures,
    SAS tokens, ``?token=``) from every URL in ``s`` (a URI or a message quoting one)."""
    return _URL.sub(lambda m: _redact_url(m.group(0)), s)


def has_env_ref(obj: Any) -> bool:
    if isinstance(obj, dict):
        return any(has_env_ref(v) for v in obj.values())
    if isinstance(obj, list):
        return any(has_env_ref(v) for v in obj)
    return isinstance(obj, str) and ENV_REF.search(obj) is not None


def resolve_env_refs(obj: Any) -> Any:
    """Replace ``${env:NAME}`` with the environment's value; only called where the value is used."""
    if isinstance(obj, dict):
        return {k: resolve_env_refs(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [resolve_env_refs(v) for v in obj]
    if isinstance(obj, str):
        def sub(m: re.Match[str]) -> str:
            name = m.group(1)
            if name not in os.environ:
                raise UserError(f"config refers to ${{env:{name}}} but {name} is not set in this process's "
                                f"environment; export it (on every node) or remove the reference")
            return os.environ[name]
        return ENV_REF.sub(sub, obj)
    return obj


def literal_secrets(cfg: BaseModel) -> list[str]:
    """Dotted keys of a config holding a literal secret (not a ``${env:...}`` reference): what
    ``ftdist submit`` refuses to ship in a job's metadata."""
    full = cfg.model_dump(mode="json")
    redacted = redact(full)
    out: list[str] = []

    def walk(a: Any, b: Any, prefix: str) -> None:
        if isinstance(a, dict):
            for k in a:
                walk(a[k], b.get(k) if isinstance(b, dict) else None, f"{prefix}{k}.")
        elif a != b:
            out.append(prefix.rstrip("."))

    walk(full, redacted, "")
    return out
