"""ftdist: one YAML file -> a distributed fine-tune (Ray Train + DeepSpeed, data streamed from object storage).

The map of the modules (which file holds what, in the order the data flows) is the README's
"How it works" table; tests/test_readme_layout.py fails when a module is missing from it, so it
stays true where a list here went stale.
"""

__version__ = "0.1.0"
