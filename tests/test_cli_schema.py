"""`ftdist data prepare` repeats `data.prepare` of the run config as flags (issue 12): a run that
prepares its own data and a user who runs the command must get the same data set. These tests hold
the two together, so a field added, renamed or re-defaulted in the schema fails here until the flag
follows (and a flag cannot drift from the field it stands for)."""

from __future__ import annotations

import argparse
import typing

from ftdist.cli import build_parser
from ftdist.config import DATA_TASKS, DataSection, PrepareSection

# Flags with no data.prepare field: where the data set goes and what the run config says elsewhere
# (model.path, model.task, model.label_names, data.max_length, run.seed), plus command-line switches.
CLI_ONLY = {"output", "model", "task", "label_names", "max_length", "seed", "overwrite", "endpoint_url"}
INVERTED = {"tokenize": "raw_text"}  # tokenize: false  <->  --raw-text


def prepare_actions() -> dict[str, argparse.Action]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    data = sub.choices["data"]
    data_sub = next(a for a in data._actions if isinstance(a, argparse._SubParsersAction))
    return {a.dest: a for a in data_sub.choices["prepare"]._actions if a.option_strings and a.dest != "help"}


def flag_default(action: argparse.Action) -> typing.Any:
    if action.dest == "split":
        return [float(x) for x in action.default.split(",")]
    return action.default


def test_every_prepare_field_has_a_flag_with_the_same_default():
    actions = prepare_actions()
    for name, field in PrepareSection.model_fields.items():
        dest = INVERTED.get(name, name)
        assert dest in actions, f"data.prepare.{name} has no `ftdist data prepare --{dest.replace('_', '-')}`"
        if name == "input":
            assert actions[dest].required
            continue
        default = field.get_default(call_default_factory=True)
        if name in INVERTED:
            assert actions[dest].default is (not default), name
        else:
            assert flag_default(actions[dest]) == default, (name, flag_default(actions[dest]), default)


def test_every_prepare_flag_stands_for_a_field_or_is_listed_as_cli_only():
    fields = {INVERTED.get(n, n) for n in PrepareSection.model_fields}
    extra = set(prepare_actions()) - fields - CLI_ONLY
    assert not extra, f"flags with no data.prepare field and not in CLI_ONLY: {sorted(extra)}"


def test_choices_and_shared_defaults_follow_the_schema():
    actions = prepare_actions()
    assert list(actions["format"].choices) == list(typing.get_args(PrepareSection.model_fields["format"].annotation))
    assert set(actions["task"].choices) == set(DATA_TASKS)  # model tasks + regression (multi-task)
    assert actions["max_length"].default == DataSection.model_fields["max_length"].default
