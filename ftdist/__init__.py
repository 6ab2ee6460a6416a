"""ftdist: one YAML file -> a distributed fine-tune (Ray Train + DeepSpeed, data streamed from object storage).

Where things live (the path of the data is the layout of the code):

- ``config``      the validated YAML schema, ``--set`` overrides, redaction
- ``storage``     every URI access (local, s3://, any fsspec URL, pkg://), retries
- ``data``        ``prepare`` (raw -> tokenized shards), ``reader`` (streaming, resumable), ``collate``
- ``modeling``    loading model and tokenizer for a task
- ``engine``      config -> DeepSpeed config (pure) and engine construction
- ``loop``        the worker loop; runs with or without Ray
- ``checkpoint``  what a checkpoint holds and how it is restored; ``export`` the HF model
- ``launcher``    the Ray Train wiring (driver side)
- ``sweep/``      the Ray Tune package (spec, space, trial, driver, report); ``submit`` the Ray Job SDK
"""

__version__ = "0.1.0"
