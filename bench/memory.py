"""Per-worker peak memory and step time of the memory levers, side by side in one run.

Two worker processes (a gloo process group, world size 2, no Ray) train a model built from a config
(random weights, saved once with ``save_pretrained``: no download) through ftdist's own model and
engine builders (``ftdist.modeling.load_model``, ``ftdist.engine.build_engine``) for a few steps on
synthetic batches, one variant after another, each in fresh processes so that each peak is its own:

- ``zero0`` .. ``zero3``: full fine-tuning at each ZeRO stage (ZeRO-3 built into partitions from load);
- ``zero3-full-load``: ZeRO-3 with the whole model loaded first and partitioned by
  ``deepspeed.initialize`` (how ftdist loaded every model before issue 13);
- ``zero3-ds-defaults``: ZeRO-3 with DeepSpeed's default gathering limits and a 5e7-element gradient
  bucket instead of ftdist's size-derived ones (``ftdist.engine.zero3_sizes``; how ftdist ran before);
- ``zero3-offload``: ZeRO-3 with parameter and optimizer offload (DeepSpeed's CPU Adam);
- ``zero3-gc``: ZeRO-3 with gradient checkpointing;
- ``lora-zero0``, ``lora-zero3``: LoRA (r 8, the architecture's default targets) at ZeRO-0 and -3.

Per worker it records peak RSS (``ru_maxrss``; on CUDA also ``max_memory_allocated``) after loading,
after building the engine and after training, the optimizer-state bytes it holds, and the median step
time. Figures: bench/RESULTS.md. Examples::

    python -m bench.memory                       # BERT-large shape (335M), batch 4 x 128, 3 steps
    python -m bench.memory --model tiny --variants zero0 zero3 --steps 2
    python -m bench.memory --model gpt2-medium --device cuda --precision bf16
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for _k, _v in {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
               "TORCH_EXTENSIONS_DIR": str(REPO / ".cache" / "torch_extensions")}.items():
    os.environ.setdefault(_k, _v)

MODELS: dict[str, tuple[str, str, dict[str, Any]]] = {
    # name: (family, task, AutoConfig.for_model kwargs)
    "bert-large": ("bert", "sequence-classification", dict(hidden_size=1024, num_hidden_layers=24,
                                                            num_attention_heads=16, intermediate_size=4096)),
    "gpt2-medium": ("gpt2", "causal-lm", dict(n_embd=1024, n_layer=24, n_head=16)),
    # the demo model's shape (all-MiniLM-L6-v2, 22.7M)
    "minilm": ("bert", "sequence-classification", dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                                        intermediate_size=1536)),
    "tiny": ("bert", "sequence-classification", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                      intermediate_size=64)),
}
VARIANTS: dict[str, list[str]] = {
    "zero0": ["deepspeed.zero_stage=0"],
    "zero1": ["deepspeed.zero_stage=1"],
    "zero2": ["deepspeed.zero_stage=2"],
    "zero3": ["deepspeed.zero_stage=3"],
    "zero3-full-load": ["deepspeed.zero_stage=3"],
    # DeepSpeed's own ZeRO-3 gathering limits (what ftdist ran with before engine.zero3_sizes)
    "zero3-ds-defaults": ["deepspeed.zero_stage=3", "deepspeed.reduce_bucket_size=50000000",
                          "deepspeed.config={zero_optimization: {stage3_max_live_parameters: "
                          "1000000000, stage3_max_reuse_distance: 1000000000, stage3_prefetch_bucket_size: 50000000, "
                          "stage3_param_persistence_threshold: 100000}}"],
    "zero3-offload": ["deepspeed.zero_stage=3", "deepspeed.offload_optimizer=true", "deepspeed.offload_params=true"],
    "zero3-gc": ["deepspeed.zero_stage=3", "model.gradient_checkpointing=true"],
    "lora-zero0": ["deepspeed.zero_stage=0", "model.lora={r: 8}"],
    "lora-zero3": ["deepspeed.zero_stage=3", "model.lora={r: 8}"],
}


def build_model_dir(name: str, root: Path) -> Path:
    """The model saved once under ``root`` (random weights from the config, fixed seed)."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    family, task, kw = MODELS[name]
    out = root / name
    if (out / "config.json").exists():
        return out
    cfg = AutoConfig.for_model(family, vocab_size=30522 if family == "bert" else 50257, **kw)
    torch.manual_seed(0)
    model = (AutoModel if task == "sequence-classification" else AutoModelForCausalLM).from_config(cfg)
    tmp = out.with_suffix(".partial")
    model.save_pretrained(tmp)
    os.replace(tmp, out)
    return out


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def worker(args: argparse.Namespace) -> None:
    """One rank of one variant: load, build the engine, train ``--steps`` steps, write its figures."""
    import torch
    import torch.distributed as dist

    from ftdist.config import load_config
    from ftdist.engine import build_engine, deepspeed_config, init_distributed, optimizer_state_bytes, \
        resolve_precision
    from ftdist.lora import parameter_counts
    from ftdist.loop import configure_host_allocator
    from ftdist.modeling import load_model

    torch.set_num_threads(args.threads)
    from ftdist.ray_worker import quiet_library_noise

    quiet_library_noise()  # as in a real worker: no deprecation warning per collective
    family, task, _ = MODELS[args.model]
    cfg = load_config(data={"model": {"path": args.model_dir, "task": task},
                            "data": {"path": "unused"},
                            "train": {"batch_size": args.batch, "precision": args.precision}},
                      overrides=VARIANTS[args.variant])
    configure_host_allocator(cfg)  # as ftdist.loop.start_worker
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    dist.init_process_group("gloo" if args.device == "cpu" else "nccl")
    init_distributed(device.type)
    precision = resolve_precision(cfg, device.type)
    partitioned = cfg.deepspeed.zero_stage == 3 and args.variant != "zero3-full-load"
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = load_model(cfg.model, 2 if task == "sequence-classification" else None, None, 0,
                       zero3_config=deepspeed_config(cfg, precision) if partitioned else None)
    n_params, n_trainable = parameter_counts(model)
    if not partitioned:
        model.to(device)
    rss_load, load_s = _rss_mb(), time.perf_counter() - t0
    engine, _ = build_engine(cfg, model, args.steps, precision)
    engine.train()
    rss_engine = _rss_mb()
    g = torch.Generator().manual_seed(dist.get_rank())
    times = []
    for _ in range(args.steps):
        ids = torch.randint(1000, 2000, (args.batch, args.seq), generator=g).to(device)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                 "labels": torch.randint(0, 2, (args.batch,), generator=g).to(device) if task != "causal-lm" else ids}
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision.name == "bf16"):
            loss = engine(**batch).loss  # as ftdist.loop.train_step: forward, backward, DeepSpeed's step
        engine.backward(loss)
        engine.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    ckpt_bytes = _checkpoint_bytes(engine, dist.get_rank())
    out = {"variant": args.variant, "rank": dist.get_rank(), "params": n_params, "trainable": n_trainable,
           "checkpoint_bytes": ckpt_bytes,
           "load_s": load_s, "rss_after_load_mb": rss_load, "rss_after_engine_mb": rss_engine,
           "rss_peak_mb": _rss_mb(), "optimizer_state_bytes": optimizer_state_bytes(engine),
           "step_s": times, "loss": float(loss),
           "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None}
    Path(args.json).write_text(json.dumps(out))
    engine.destroy()
    dist.destroy_process_group()


def _checkpoint_bytes(engine: Any, rank: int) -> int:
    """Bytes of the checkpoint ftdist writes for this engine (``ftdist.checkpoint.save``), all ranks' files
    (a collective: every rank calls)."""
    import torch.distributed as dist

    from ftdist import checkpoint as ckpt

    with tempfile.TemporaryDirectory(prefix="ftdist-bench-ckpt-") as tmp:
        shared = [tmp]
        dist.broadcast_object_list(shared, src=0)  # one folder, as a run's checkpoint (one node here)
        ckpt.save(engine, ckpt.TrainState(), rank, shared[0], record_samples=False)
        dist.barrier()
        size = sum(f.stat().st_size for f in Path(shared[0]).rglob("*") if f.is_file()) if rank == 0 else 0
        dist.barrier()
    return size


def run_variant(args: argparse.Namespace, variant: str, model_dir: Path, tmp: Path) -> dict[str, Any]:
    """Both ranks of one variant in fresh processes; their figures, or the failure."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs, outs = [], []
    for rank in range(args.workers):
        out = tmp / f"{variant}-{rank}.json"
        outs.append(out)
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(args.workers), "LOCAL_RANK": "0",
               "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "DS_ACCELERATOR": args.device if args.device == "cpu" else "cuda",
               "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0") if args.device == "cuda" else ""}
        cmd = [sys.executable, "-m", "bench.memory", "--worker", "--variant", variant, "--model", args.model,
               "--model-dir", str(model_dir), "--json", str(out), "--steps", str(args.steps), "--batch",
               str(args.batch), "--seq", str(args.seq), "--device", args.device, "--precision", args.precision,
               "--threads", str(args.threads)]
        # stderr to a file, not a pipe: a rank blocked writing to a full pipe that is read only after
        # the other rank's exit stalls both in their next collective (it did with ZeRO-3's small buckets).
        with open(tmp / f"{variant}-{rank}.err", "w") as err:
            procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err, text=True))
    for p in procs:
        p.wait(timeout=args.timeout)
    errors = [(tmp / f"{variant}-{rank}.err").read_text() for rank in range(args.workers)]
    if any(p.returncode for p in procs):
        tail = next(e for p, e in zip(procs, errors) if p.returncode)
        return {"variant": variant, "status": "failed", "error": tail.strip().splitlines()[-1][:300]}
    ranks = [json.loads(o.read_text()) for o in outs]
    steps = [t for r in ranks for t in r["step_s"][1:] or r["step_s"]]  # the first step warms up
    return {"variant": variant, "status": "ok", "params": ranks[0]["params"], "trainable": ranks[0]["trainable"],
            "rss_peak_mb": max(r["rss_peak_mb"] for r in ranks),
            "rss_after_load_mb": max(r["rss_after_load_mb"] for r in ranks),
            "rss_after_engine_mb": max(r["rss_after_engine_mb"] for r in ranks),
            "optimizer_state_mb": max(r["optimizer_state_bytes"] for r in ranks) / 2**20,
            "checkpoint_mb": ranks[0]["checkpoint_bytes"] / 2**20,
            "cuda_peak_mb": ranks[0]["cuda_peak_mb"], "step_s": statistics.median(steps),
            "load_s": max(r["load_s"] for r in ranks), "ranks": ranks}


def table(rep: dict[str, Any]) -> str:
    base = next((r for r in rep["results"] if r["variant"] == "zero0" and r["status"] == "ok"), None)
    lines = ["| variant | trainable params | peak RSS / worker (MB) | × zero0 | RSS after load (MB) | "
             "optimizer state / worker (MB) | checkpoint (MB, all ranks) | step (s) | × zero0 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rep["results"]:
        if r["status"] != "ok":
            lines.append(f"| {r['variant']} | failed: {r['error']} ||||||||")
            continue
        rel = f"{r['rss_peak_mb'] / base['rss_peak_mb']:.2f}" if base else "-"
        rel_t = f"{r['step_s'] / base['step_s']:.2f}" if base else "-"
        lines.append(f"| {r['variant']} | {r['trainable']:,} | {r['rss_peak_mb']:,.0f} | {rel} | "
                     f"{r['rss_after_load_mb']:,.0f} | {r['optimizer_state_mb']:,.0f} | "
                     f"{r.get('checkpoint_mb', float('nan')):,.1f} | {r['step_s']:.2f} | {rel_t} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=list(MODELS), default="bert-large")
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--models-dir", default=str(REPO / "bench" / "out" / "models"))
    ap.add_argument("--out", default=None)
    # one worker (internal)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    model_dir = build_model_dir(args.model, Path(args.models_dir))
    rep: dict[str, Any] = {"when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                           "model": args.model, "workers": args.workers, "batch": args.batch, "seq": args.seq,
                           "steps": args.steps, "device": args.device, "precision": args.precision,
                           "argv": sys.argv[1:], "results": []}
    with tempfile.TemporaryDirectory(prefix="ftdist-bench-mem-") as tmp:
        for v in args.variants:
            t = time.time()
            rep["results"].append(run_variant(args, v, model_dir, Path(tmp)))
            r = rep["results"][-1]
            print(f"{v}: {r['status']} in {time.time() - t:.0f}s"
                  + (f", peak RSS {r['rss_peak_mb']:.0f} MB, step {r['step_s']:.2f}s" if r["status"] == "ok"
                     else f": {r['error']}"), flush=True)
    out = Path(args.out or REPO / "bench" / "out" / f"memory-{args.model}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rep, indent=1))
    print(table(rep))
    print(f"written: {out}")
    return 0 if all(r["status"] == "ok" for r in rep["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())
