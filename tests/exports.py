"""Tiny exported models for the deployment tests, written by ftdist's own exporter (and the HTTP helpers
the serving tests share).

A model built from a config (seeded), wrapped the way ``export_model`` sees a ZeRO-0/1/2 engine (it
reads ``engine.module``), and exported with a run config, so the folder is exactly what a training
run leaves in ``<run>/model``: safetensors, config, tokenizer, and ``ftdist_export.json`` last.
"""

from __future__ import annotations

import types
from pathlib import Path

from conftest import NAMES, base_config


def export_tiny(base: str, out: Path, task: str = "sequence-classification", max_length: int = 16,
                seed: int = 0, lora_adapter: bool = False) -> str:
    """Export the tiny model at ``base`` (a save_pretrained folder) with a fresh, seeded task head;
    ``lora_adapter``: wrapped in LoRA adapters and exported as ``model.lora.export: adapter`` does."""
    import torch

    from ftdist.config import ModelSection, load_config
    from ftdist.export import export_model
    from ftdist.modeling import load_model, load_tokenizer

    lora = {"lora": {"export": "adapter"}} if lora_adapter else {}
    cfg = load_config(data=base_config(base, str(out.parent / "data"), str(out.parent / "runs"),
                                       model={"task": task, **lora}, run={"name": "tiny"}))
    tok = load_tokenizer(base)
    labels = NAMES if task == "sequence-classification" else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = load_model(ModelSection(path=base, task=task), len(labels) if labels else None, labels,
                           tok.pad_token_id)
    if lora_adapter:
        from ftdist.lora import apply_lora

        assert cfg.model.lora is not None
        model = apply_lora(model, cfg.model.lora, task, base)
    export_model(types.SimpleNamespace(module=model), cfg, tok, str(out), rank=0,
                 extra={"best_epoch": 1, "test": {}, "label_names": labels, "max_length": max_length})
    return str(out)


def wait_until_healthy(url: str, within_s: float, alive=None) -> None:
    """Poll ``GET {url}/healthz`` until it answers 200; fail after ``within_s`` seconds, or at once when
    ``alive()`` says the serving process has gone (its message is the assertion's)."""
    import time

    import requests

    deadline = time.monotonic() + within_s
    while True:
        if alive is not None:
            ok, why = alive()
            assert ok, why
        try:
            if requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                return
        except (requests.ConnectionError, requests.Timeout):  # up, but the replica still loading
            pass
        assert time.monotonic() < deadline, f"{url} did not answer /healthz within {within_s:.0f} s"
        time.sleep(0.5)


def send_chunked(port: int, total: int, piece: int = 64 * 1024) -> tuple[int | str, str, int, int]:
    """POST /predict on loopback with a chunked body of ``total`` bytes, written by a thread while this
    one waits for the answer: (status, or the error that reading it raised, e.g. a reset; body; bytes
    the client had sent when the answer came; bytes sent in all)."""
    import http.client
    import socket
    import threading

    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sent = [0]

    def pump() -> None:
        chunk = b"%x\r\n" % piece + b"x" * piece + b"\r\n"
        try:
            sock.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n")
            while sent[0] < total:
                sock.sendall(chunk)
                sent[0] += piece
            sock.sendall(b"0\r\n\r\n")
        except OSError:  # the server answered and closed the connection: expected once refused
            pass

    writer = threading.Thread(target=pump, daemon=True)
    writer.start()
    at = 0
    try:
        response = http.client.HTTPResponse(sock)
        response.begin()
        at, status = sent[0], response.status
        body = response.read().decode()
    except OSError as e:  # reset: the server cut the connection while the client was still sending
        status, body = type(e).__name__, ""
    finally:
        sock.close()
        writer.join(30)
    return status, body, at, sent[0]


def card_metadata(folder: Path) -> tuple[dict, str]:
    """The YAML metadata and the text of an export's model card (README.md)."""
    import yaml

    _, meta, text = (folder / "README.md").read_text().split("---\n", 2)
    return yaml.safe_load(meta), text


def assert_card_matches(folder: Path, test: dict, name: str) -> None:
    """The card's model-index holds exactly the run summary's test metrics, under the run's (or task's) name."""
    meta, text = card_metadata(folder)
    [entry] = meta["model-index"]
    [result] = entry["results"]
    assert entry["name"] == name and result["dataset"]["split"] == "test"
    assert {m["name"]: m["value"] for m in result["metrics"]} == test
    assert "## How to load" in text and "## The run's diagnoses" in text
