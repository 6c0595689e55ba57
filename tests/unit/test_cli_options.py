"""The CLI's options generated from the engine's pydantic configs, ``--config FILE``, the lazily
loaded commands, and the README's command lines checked against the real CLI. No model needed."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Literal

import pytest
import typer
from pydantic import BaseModel, Field
from typer.testing import CliRunner

from kestrel.cli import LAZY_COMMANDS, app, load_command
from kestrel.cli.common import friendly_errors, print_json
from kestrel.cli.config_options import ConfigGroup, config_options

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()


def options_of(command: Any) -> dict[str, Any]:
    """A command's parameters by name (the generated ones are ``<dest>__<field>``)."""
    return {param.name: param for param in command.params}


def kebab(name: str) -> str:
    return "--" + name.replace("_", "-")


@pytest.mark.parametrize(
    ("command", "dest", "model_path", "left_out"),
    [
        ("train", "train", "kestrel.core.sae.config:TrainConfig", set()),
        (
            "train",
            "sae",
            "kestrel.core.sae.config:SAEConfig",
            # from the run or training; a transcoder's target is `train --target-layer`
            {
                "d_in",
                "input_scale",
                "model",
                "layer",
                "run_id",
                "data",
                "target_layer",
                "d_out",
                "output_scale",
            },
        ),
        ("capture", "options", "kestrel.core.activations:CaptureOptions", set()),
        ("discover", "config", "kestrel.core.concepts.discovery:DiscoveryConfig", {"filters"}),
    ],
)
def test_every_config_field_is_an_option_with_its_description_and_default(
    command: str, dest: str, model_path: str, left_out: set[str]
) -> None:
    import importlib

    module, name = model_path.split(":")
    model = getattr(importlib.import_module(module), name)
    params = options_of(load_command(command))
    assert set(model.model_fields) - left_out, model
    for field, info in model.model_fields.items():
        param = params.get(f"{dest}__{field}")
        if field in left_out:
            assert param is None, field
            continue
        assert param is not None, f"{command}: no option for {name}.{field}"
        assert kebab(field) in param.opts, (field, param.opts)
        assert param.help, f"{command} {kebab(field)} has no help"
        if info.description:
            assert info.description in param.help
        if not info.is_required():
            default = info.get_default(call_default_factory=True)
            assert param.default == default, (field, param.default, default)
    assert "config_file" in params and params["config_file"].opts == ["--config"]


def test_the_existing_option_names_stay() -> None:
    """What the README and scripts use: generated options kept the hand-written names."""
    train = {opt for param in load_command("train").params for opt in param.opts}
    assert {"--architecture", "--n-latents", "--k", "--l1-coefficient", "--epochs", "--token-budget"} <= train
    assert {"--batch-size", "--lr", "--seed", "--checkpoint-every", "--sae-id", "--resume", "-l"} <= train
    capture = {opt for param in load_command("capture").params for opt in param.opts}
    assert {"--max-length", "--token-budget", "--dtype", "--drop-special", "--model-dtype", "-t"} <= capture
    discover = {opt for param in load_command("discover").params for opt in param.opts}
    assert {"--top-n", "--window", "--keep-sinks", "--limit", "--run"} <= discover
    n_latents = options_of(load_command("train"))["sae__n_latents"]
    assert n_latents.default == 4608  # the model requires one; the CLI's default stays


# ---------------------------------------------------------------------------------------------
# The generator on a model of its own: every kind of field, the file, the overrides


class Toy(BaseModel):
    size: int = Field(4, gt=0, description="how big")
    mode: Literal["a", "b"] = Field("a", description="which way")
    flag: bool = Field(False, description="a switch")
    tags: list[str] = Field(default_factory=list, description="labels")
    pair: tuple[float, float] = Field((0.1, 0.2), description="two numbers")
    derived: int | None = Field(None, description="default derived elsewhere")
    nested: dict[str, int] = Field(default_factory=dict, description="file only")


toy_app = typer.Typer()


@toy_app.command()
@friendly_errors
@config_options(toy=ConfigGroup(Toy, names={"size": ["--size", "-s"]}))
def toy(name: str, toy: dict[str, Any]) -> None:
    print_json({"name": name, "toy": toy})


def run_toy(*args: str, config: Any = None, tmp_path: Path | None = None) -> Any:
    argv = ["n", *args]
    if config is not None:
        assert tmp_path is not None
        path = tmp_path / "toy.json"
        path.write_text(config if isinstance(config, str) else json.dumps(config))
        argv += ["--config", str(path)]
    return runner.invoke(toy_app, argv)


def toy_values(result: Any) -> dict[str, Any]:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["toy"]


def test_unset_fields_stay_unset_and_flags_parse_by_type() -> None:
    assert toy_values(run_toy()) == {}
    values = toy_values(
        run_toy("--size", "7", "--mode", "b", "--flag", "--tags", "x", "--tags", "y", "--pair", "1", "2")
    )
    assert values == {"size": 7, "mode": "b", "flag": True, "tags": ["x", "y"], "pair": [1.0, 2.0]}
    assert toy_values(run_toy("--derived", "3", "-s", "2")) == {"derived": 3, "size": 2}
    assert "--nested" not in run_toy("--help").output  # no flag form: --config only


def test_flags_override_the_config_file(tmp_path) -> None:
    config = {"toy": {"size": 9, "mode": "b", "flag": True, "nested": {"x": 1}}}
    values = toy_values(run_toy("--size", "5", "--no-flag", config=config, tmp_path=tmp_path))
    assert values == {"size": 5, "mode": "b", "flag": False, "nested": {"x": 1}}


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("{not json", "malformed JSON at line 1"),
        ("[1, 2]", "expected a JSON object with keys 'toy'"),
        ({"toys": {}}, "unknown key(s) ['toys']; expected 'toy'"),
        ({"toy": []}, "'toy' must be a JSON object"),
        ({"toy": {"sise": 3}}, "unknown field(s) ['sise']"),
        ({"toy": {"size": "big"}}, "size: Input should be a valid integer"),
        ({"toy": {"size": 0}}, "size: Input should be greater than 0"),
    ],
)
def test_a_bad_config_file_is_one_line_and_exit_2(tmp_path, config: Any, message: str) -> None:
    result = run_toy(config=config, tmp_path=tmp_path)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()) and "Traceback" not in result.output
    assert str(tmp_path / "toy.json") in " ".join(result.output.split())


def test_a_bad_flag_value_is_checked_by_the_model_too() -> None:
    result = run_toy("--size", "0")
    assert result.exit_code == 2 and "size: Input should be greater than 0" in " ".join(result.output.split())
    assert run_toy("--mode", "c").exit_code == 2  # a Literal's choices


def test_a_missing_config_file(tmp_path) -> None:
    result = runner.invoke(toy_app, ["n", "--config", str(tmp_path / "nope.json")])
    assert result.exit_code == 2 and "cannot read it (No such file" in " ".join(result.output.split())


def test_train_rejects_a_bad_config_before_reading_anything(tmp_path) -> None:
    store = tmp_path / "store"
    bad = tmp_path / "bad.json"
    for content, message in [
        ('{"train": {"epochs": 0}}', "epochs"),
        ('{"train": {"batch_size": 64,}}', "malformed JSON"),
        ('{"optimizer": {}}', "expected 'sae', 'train'"),
        ('{"sae": {"d_in": 8}}', "unknown field(s) ['d_in']"),  # the run's width, not the user's
    ]:
        bad.write_text(content)
        result = runner.invoke(
            app, ["train", "no-such-run", "-l", "x", "--config", str(bad), "--store", str(store)]
        )
        assert result.exit_code == 2, result.output
        assert message in " ".join(result.output.split()) and "Traceback" not in result.output
    assert not (store / "saes").exists()


# ---------------------------------------------------------------------------------------------
# Lazily loaded commands


def test_lazy_commands_short_help_matches_the_commands_own() -> None:
    for name, (_module, short_help) in LAZY_COMMANDS.items():
        assert load_command(name).get_short_help_str(limit=500) == short_help, name


def test_every_command_of_a_lazy_module_is_listed() -> None:
    import importlib

    for module in {module for module, _help in LAZY_COMMANDS.values()}:
        built = typer.main.get_command(importlib.import_module(module).cli)
        assert set(built.commands) <= set(LAZY_COMMANDS), module  # type: ignore[attr-defined]


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO, check=False
    )


def test_help_lists_every_command_without_importing_torch() -> None:
    code = (
        "import sys\nfrom typer.testing import CliRunner\nfrom kestrel.cli import app\n"
        "result = CliRunner().invoke(app, ['--help'], env={'COLUMNS': '200'})\n"
        "assert result.exit_code == 0, result.output\n"
        "print(result.output)\nprint('torch loaded:', 'torch' in sys.modules)"
    )
    done = run_python(code)
    assert done.returncode == 0, done.stderr
    assert "torch loaded: False" in done.stdout
    for name in [*LAZY_COMMANDS, "steer", "steering", "analyze", "up", "serve", "worker", "gc", "demo"]:
        assert re.search(rf"│ {name}\s", done.stdout), name


def test_a_mistyped_command_suggests_lazy_ones_too() -> None:
    result = runner.invoke(app, ["trian"])
    assert result.exit_code == 2 and "Did you mean 'train'" in result.output


def test_python_m_kestrel_cli_runs_the_app() -> None:
    from importlib.metadata import version

    done = subprocess.run(
        [sys.executable, "-m", "kestrel.cli", "--version"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert done.returncode == 0 and done.stdout == f"kestrel {version('kestrel')}\n", done.stderr


# ---------------------------------------------------------------------------------------------
# The README's command lines


def readme_commands() -> list[list[str]]:
    """``kestrel ...`` lines of the README's code blocks; a shell variable becomes 1 (an id, a latent)."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            for match in re.finditer(r"(?:^|\$\(|^\$ )(kestrel [^|)#\n]*)", line.strip()):
                words = shlex.split(re.sub(r"\$[A-Z_0-9]+", "1", match.group(1)))
                commands.append(words)
    return commands


def parse_kestrel(argv: list[str]) -> None:
    """Resolve ``kestrel <group>... <command>`` and parse its options without running it."""
    command: Any = typer.main.get_command(app)
    ctx = typer.Context(command, info_name="kestrel")
    args = argv[1:]
    while hasattr(command, "commands"):  # a group: its own flags (--version), then a subcommand
        while args and args[0].startswith("-"):  # a group's own options (``steer -p ...`` runs it)
            param = next((p for p in command.params if args[0] in p.opts + p.secondary_opts), None)
            assert param is not None, f"no option {args[0]} in {argv}"
            args = args[1:] if getattr(param, "is_flag", False) else args[2:]
        if not args:
            return
        sub = command.get_command(ctx, args[0])
        assert sub is not None, f"no command {args[0]!r} in {argv}"
        if hasattr(sub, "commands"):
            ctx = typer.Context(sub, info_name=args[0], parent=ctx)
        command, args = sub, args[1:]
    command.make_context(command.name, list(args), parent=ctx)


def test_readme_command_lines_parse() -> None:
    commands = readme_commands()
    assert len(commands) > 20 and ["kestrel", "runs", "list"] in commands
    for argv in commands:
        parse_kestrel(argv)


def test_the_readme_checker_catches_mistakes() -> None:
    parse_kestrel(["kestrel", "train", "x", "--layer", "l", "--n-latents", "8"])
    for wrong in (["kestrel", "trian", "x"], ["kestrel", "runs", "lst"]):
        with pytest.raises(AssertionError):
            parse_kestrel(wrong)
    with pytest.raises(typer.BadParameter):
        parse_kestrel(["kestrel", "train", "x", "--layer", "l", "--n-latents", "many"])
    with pytest.raises(Exception, match="No such option"):
        parse_kestrel(["kestrel", "runs", "list", "--nope"])
