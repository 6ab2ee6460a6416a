"""Multi-task fine-tuning: one shared encoder, one classification head per task, one distributed run.

- ``spec``:     a task's view of the run config (its data set and labels), the task checks before training
- ``sampling``: which task each batch comes from, epoch by epoch; every task's position in its data
- ``model``:    the shared encoder with a head per task (each head is AutoModelForSequenceClassification's)
- ``loop``:     the worker loop of a multi-task run (same checkpoints, reports and resume as ``ftdist.loop``)
- ``export``:   one standard HF folder per task, plus the multi-head checkpoint
- ``preflight``: the driver side: every task's data set built and checked before training, the
                 per-task summary (test metrics against majority baselines)
"""
