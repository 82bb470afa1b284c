"""Every flag is described once, on its config field, and README_MOE.md's tables name every flag.

The parser, --help and the banner's config line are built from the fields of ModelConfig
(moe_layers.py) and TrainConfig (launch.py); these tests fail when a field has no description,
sits in no --help group (or two), or is missing from the guide's flag tables."""

from __future__ import annotations

import dataclasses
import os
import re

import launch
from moe_layers import ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = [f for cls in (ModelConfig, launch.TrainConfig) for f in dataclasses.fields(cls)]


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def test_every_config_field_carries_its_own_help_and_sits_in_one_help_group():
    for f in FIELDS:
        assert len(f.metadata.get("help", "").strip()) >= 8, f"{f.name} has no description in its field metadata"
    grouped = [name for _, names in launch.FLAG_GROUPS for name in names]
    assert sorted(grouped) == sorted(f.name for f in FIELDS), "every field in exactly one FLAG_GROUPS entry"


def test_help_shows_each_fields_description_and_choices():
    parser = launch.build_arg_parser()
    actions = {a.dest: a for a in parser._actions}
    for f in FIELDS:
        action = actions[f.name]
        assert action.help == f.metadata["help"].replace("%", "%%"), f.name
        assert action.choices == f.metadata.get("choices"), f.name
        assert action.default == f.default, f.name
    text = parser.format_help()
    assert "--router-score-function {softmax,sigmoid}" in text


def test_readme_flag_tables_name_every_flag_and_no_other():
    with open(os.path.join(ROOT, "README_MOE.md")) as fh:
        readme = fh.read()
    tables = readme[readme.index("## Every flag"):readme.index("## Output")]
    named = {f for row in re.findall(r"^\| (`--[^|]*)\|", tables, re.M) for f in re.findall(r"`(--[a-z0-9-]+)`", row)}
    want = {flag(f.name) for f in FIELDS}
    want |= {"--no-" + flag(f.name)[2:] for f in FIELDS if f.type in ("bool", bool)}  # --no-progress, ...
    named |= {f for f in want if f.startswith("--no-") and "--" + f[5:] in named}  # a table may name one form
    assert want - named == set(), "flags the guide's tables miss"
    assert named - want == set(), "flags in the guide's tables that the trainer does not have"


def test_abbreviated_flags_are_refused_not_guessed(capsys):
    """allow_abbrev=False: `--hidden 32` is not `--hidden-size 32`."""
    import pytest
    with pytest.raises(SystemExit) as e:
        launch.parse_config(["--hidden", "32"])
    assert e.value.code == 2 and "unrecognized arguments: --hidden" in capsys.readouterr().err


def test_config_file_sets_flags_the_command_line_overrides_and_counts_them_as_given(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('hidden-size = 64\nnum_layers = 2\nlr = 3e-3\nrouter-score-function = "sigmoid"\n'
                    'sequence-parallel = true\n')
    mc, tc, given = launch.parse_config(["--config", str(path), "--lr", "1e-3"])
    assert (mc.hidden_size, mc.num_layers, mc.router_score_function, tc.sequence_parallel) == (64, 2, "sigmoid", True)
    assert tc.lr == 1e-3  # the command line wins
    assert {"hidden_size", "num_layers", "lr", "router_score_function", "sequence_parallel"} <= given
    assert "seed" not in given and tc.seed == launch.TrainConfig().seed


def test_config_file_with_an_unknown_key_or_a_wrong_type_is_one_error_line(tmp_path, capsys):
    import pytest
    for text, words in (("hiden-size = 64\n", "hiden-size is not a flag"), ('lr = "fast"\n', "lr = 'fast' is not a float"),
                        ('router-type = "best"\n', "among"), ("num-layers = 2.5\n", "is not an int"),
                        ("[model]\nhidden-size = 64\n", "model is not a flag"), ("x = \n", "--config")):
        path = tmp_path / "bad.toml"
        path.write_text(text)
        with pytest.raises(SystemExit) as e:
            launch.parse_config(["--config", str(path)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and words in err and err.count("error:") == 1, (text, err)
