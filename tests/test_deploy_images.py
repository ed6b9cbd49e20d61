"""deploy/docker: static checks of the Dockerfiles, then each image's contents built, installed and started.

No container runtime runs here (no base image can be pulled), so the contents tests emulate the build:

1. the build context is the checkout filtered by ``<Dockerfile>.dockerignore`` with Docker's matching
   rules (`ignore_rules`, `ignored`), and the first stage's COPY instructions lay it out under a scratch
   root (`emulate_build`), so ``<root>/src`` is exactly what the image's ``pip install .`` sees;
2. the RUN line's stub generation runs there, with the dev venv's grpc_tools (the pinned version);
3. ONE fresh venv per session (the dev venv's base Python, no system site-packages) gets every image's
   third-party packages the way the Dockerfiles install theirs: torch first, then constraints.txt with
   requirements-cluster.txt, the context's ``[project].dependencies`` and what the install line adds.
   Each image then installs its own context into it with ``pip install --no-deps --force-reinstall``
   (a wheel, not editable; the reinstall removes the previous image's files). Installing everything
   from scratch is most of the section's time (~85 s of ~2.2 min here); a venv layered over the dev
   venv with --system-site-packages would be faster but would let the editable checkout leak in;
4. the image's entry points start from that venv in an empty directory, without PYTHONPATH, so
   `evals`, `tests`, `benchmarks` and the checkout cannot be imported (asserted, with every module of
   the installed packages imported).
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "deploy" / "docker"
DOCKERFILES = ["Dockerfile.services", "Dockerfile.trainer", "Dockerfile.triton"]


# --- Static checks -------------------------------------------------------------------------------------
def base_images(text: str) -> list[str]:
    """The FROM images with ARG defaults substituted; stage names (FROM build) are left out."""
    args = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", text, flags=re.MULTILINE))
    stages = set(re.findall(r"^FROM\s+\S+\s+AS\s+(\w+)", text, flags=re.MULTILINE | re.IGNORECASE))
    images = []
    for image in re.findall(r"^FROM\s+(\S+)", text, flags=re.MULTILINE):
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
        if image not in stages:
            images.append(image)
    return images


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfiles_are_pinned_multi_stage_and_non_root(name):
    text = (DOCKER / name).read_text()
    images = base_images(text)
    assert len(images) >= 2, f"{name}: expected a build stage and a runtime stage, got {images}"
    for image in images:
        assert re.search(r":[\w.-]*\d[\w.-]*$|@sha256:[0-9a-f]{64}$", image) and "latest" not in image, image
    assert re.findall(r"^USER\s+(\S+)", text, flags=re.MULTILINE)[-1] == "1000:1000"
    assert "--mount" not in text and not re.search(r"curl|wget|huggingface-cli|snapshot_download", text)
    installs = re.findall(r"pip install [^\n]*", text)
    assert installs and all("-c /tmp/constraints.txt" in line for line in installs), installs


def test_constraints_pin_every_package_exactly():
    lines = [l for l in (DOCKER / "constraints.txt").read_text().splitlines() if l and not l.startswith("#")]
    assert all(re.fullmatch(r"[A-Za-z0-9_.-]+==[\w.]+", line) for line in lines), lines
    assert "torch==2.13.0" in lines and "nvidia-pytriton==0.7.0" in lines


def test_build_contexts_leave_local_state_out():
    ignores = [(DOCKER / f"{name}.dockerignore").read_text() for name in DOCKERFILES]
    assert ignores[0] == ignores[1] == ignores[2]
    assert {".git", ".venv", ".tools", "proto/gen", "customdiff-data"} <= set(ignores[0].splitlines())


# --- The build, emulated ---------------------------------------------------------------------------------
def ignore_rules(text: str) -> list[tuple[bool, re.Pattern]]:
    """A .dockerignore as (is_exception, regex) rules, compiled the way moby/patternmatcher compiles them.

    Supported: comments, blank lines, ``!`` exceptions, a leading ``/``, ``*`` and ``?`` (never across
    ``/``) and ``**`` (any number of directories, or everything at the end). Patterns match from the
    context's root, not anywhere (``*.egg-info`` is ``./*.egg-info`` only).

    Raises:
        ValueError: a character class, an escape or a ``..``, which this matcher does not emulate.
    """
    rules = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        pattern = posixpath.normpath(line[1:].strip() if exception else line).lstrip("/")
        if re.search(r"[\[\]\\]", pattern) or ".." in pattern.split("/"):
            raise ValueError(f".dockerignore {line!r}: character classes, escapes and '..' are not emulated")
        regex, i = "^", 0
        while i < len(pattern):
            if pattern.startswith("**", i):
                i += 3 if pattern[i + 2:i + 3] == "/" else 2
                regex += ".*" if i >= len(pattern) else "(.*/)?"
            else:
                regex += {"*": "[^/]*", "?": "[^/]"}.get(pattern[i], re.escape(pattern[i]))
                i += 1
        rules.append((exception, re.compile(regex + "$")))
    return rules


def ignored(path: str, rules: list[tuple[bool, re.Pattern]]) -> bool:
    """Docker's MatchesOrParentMatches: the last rule matching `path` or a parent directory of it decides."""
    parents = path.split("/")[:-1]
    excluded = False
    for exception, regex in rules:
        if exception != excluded:
            continue
        if regex.match(path) or any(regex.match("/".join(parents[:i + 1])) for i in range(len(parents))):
            excluded = not exception
    return excluded


def build_context(rules: list[tuple[bool, re.Pattern]]) -> dict[str, Path]:
    """The files `docker build .` sends from the checkout: context path -> file (links stay links)."""
    files = {}
    prune = not any(exception for exception, _ in rules)  # an exception could re-include below a directory
    for directory, dirs, names in os.walk(ROOT):
        prefix = "" if directory == str(ROOT) else Path(directory).relative_to(ROOT).as_posix() + "/"
        for name in list(dirs):
            if os.path.islink(os.path.join(directory, name)):
                dirs.remove(name)
                names.append(name)
            elif prune and ignored(prefix + name, rules):
                dirs.remove(name)
        files |= {prefix + n: Path(directory, n) for n in names if not ignored(prefix + n, rules)}
    return files


def build_stage(text: str) -> list[tuple[str, str]]:
    """The first stage's instructions as (INSTRUCTION, arguments); comments dropped, continuations joined."""
    lines = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    stages: list[list[tuple[str, str]]] = []
    for line in re.sub(r"\\\n", " ", lines).splitlines():
        instruction, _, arguments = line.strip().partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        elif instruction and stages:
            stages[-1].append((instruction.upper(), " ".join(arguments.split())))
    return stages[0]


@dataclass
class Build:
    root: Path  # the build stage's filesystem: only what COPY put there
    workdir: str
    runs: list[str] = field(default_factory=list)
    copies: dict[str, str] = field(default_factory=dict)  # source -> destination in the image

    def path(self, image_path: str) -> Path:
        return self.root / posixpath.join(self.workdir, image_path).lstrip("/")


def copy(context: dict[str, Path], arguments: str, build: Build) -> None:
    """``COPY <src>... <dst>`` as Docker runs it: a file to (or into) dst, a directory's contents into dst."""
    *sources, dst = arguments.split()
    if arguments.startswith("--") or re.search(r"[*?\[$]", arguments) or not sources:
        raise ValueError(f"COPY {arguments}: flags, wildcards and variables are not emulated")
    into = dst.endswith("/") or len(sources) > 1
    for source in map(posixpath.normpath, sources):
        target = build.path(dst)
        if source in context:
            files = {target / posixpath.basename(source) if into else target: context[source]}
        else:
            prefix = "" if source == "." else source + "/"
            files = {target / rel[len(prefix):]: f for rel, f in context.items() if rel.startswith(prefix)}
        assert files, f"COPY {arguments}: {source} is not in the build context (missing or .dockerignored)"
        for destination, path in files.items():
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, destination, follow_symlinks=False)
        build.copies[source] = posixpath.normpath(posixpath.join(build.workdir, dst))


def emulate_build(dockerfile: str, root: Path) -> Build:
    """The build stage's COPY and WORKDIR instructions applied under `root`; its RUN lines are collected."""
    context = build_context(ignore_rules((DOCKER / f"{dockerfile}.dockerignore").read_text()))
    build = Build(root, "/")
    for instruction, arguments in build_stage((DOCKER / dockerfile).read_text()):
        if instruction == "WORKDIR":
            build.workdir = posixpath.join(build.workdir, arguments)
            build.path(".").mkdir(parents=True, exist_ok=True)
        elif instruction == "COPY":
            copy(context, arguments, build)
        elif instruction == "RUN":
            build.runs.append(arguments)
        elif instruction == "ADD":
            raise ValueError(f"{dockerfile}: ADD is not emulated")
    return build


def install_line(runs: list[str]) -> tuple[list[str], list[str]]:
    """The RUN that installs the project, split at ``&&``: (its stub generation, its pip steps)."""
    [run] = [run for run in runs if "grpc_tools.protoc" in run]
    steps = [step.strip() for step in run.split("&&")]
    codegen = [step for step in steps if step.split()[0] in ("mkdir", "touch") or "grpc_tools.protoc" in step]
    return codegen, [step for step in steps if step not in codegen]


def install_extras(dockerfile: str) -> list[str]:
    """What the image's ``pip install ... .`` adds to the project; asserts the rest of the line."""
    stage = build_stage((DOCKER / dockerfile).read_text())
    _, pip_steps = install_line([arguments for instruction, arguments in stage if instruction == "RUN"])
    [tokens] = [step.split()[2:] for step in pip_steps if " . " in f"{step} "]
    assert tokens[:2] == ["-c", "/tmp/constraints.txt"] and "." in tokens, tokens
    assert tokens[-2:] == ["-r", "/tmp/requirements-cluster.txt"], tokens
    return [token for token in tokens[2:-2] if token != "."]


@pytest.mark.parametrize("pattern, path, excluded", [
    ("**/__pycache__", "__pycache__/a.pyc", True), ("**/__pycache__", "a/b/__pycache__/c.pyc", True),
    ("*.egg-info", "customdiff.egg-info/PKG-INFO", True), ("*.egg-info", "clients/a.egg-info/b", False),
    ("proto/gen", "proto/gen/customdiffusion/v1/a_pb2.py", True), ("proto/gen", "proto/general", False),
    ("/build", "build/lib/x.py", True), ("build", "clients/python/build/x.py", False),
    ("docs/*.md", "docs/a.md", True), ("docs/*.md", "docs/sub/a.md", False), ("a?c", "abc/d", True),
    ("docs/**", "docs/a/b.md", True), ("evals\n!evals/keep.py", "evals/keep.py", False),
    ("evals\n!evals/keep.py", "evals/drop.py", True),
])
def test_the_dockerignore_matcher_follows_docker(pattern, path, excluded):
    assert ignored(path, ignore_rules(pattern)) is excluded


@pytest.mark.parametrize("pattern", ["[ab]", "a\\*", "../x"])
def test_the_dockerignore_matcher_refuses_what_it_does_not_emulate(pattern):
    with pytest.raises(ValueError, match="not emulated"):
        ignore_rules(pattern)


# --- The images' venv ----------------------------------------------------------------------------------
NEVER_SHIPPED = ("evals", "tests", "benchmarks")
# What each image's `pip install .` installs: the copied libraries, the client and the generated stubs.
IMAGE_PACKAGES = ["concepts", "customdiff", "customdiff_client", "customdiffusion", "engine", "merger",
                  "services", "trainer"]


def run(argv: list, venv: Path | None = None, cwd: Path | None = None, check: int | None = 0, **env):
    """A command with the image's environment: the venv's bin first; no PYTHONPATH, no user site."""
    environ = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    if venv is not None:
        environ |= {"PATH": f"{venv}/bin:{environ['PATH']}", "PYTHONNOUSERSITE": "1", "HF_HUB_OFFLINE": "1"}
    argv = [str(a) for a in argv]
    result = subprocess.run(argv, cwd=cwd, env=environ | env, capture_output=True, text=True, timeout=600)
    assert check is None or result.returncode == check, \
        f"{argv}: exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def pip(venv: Path, *args) -> subprocess.CompletedProcess:
    """`pip install` into `venv`, without compiling bytecode (what is installed is the same; torch alone has
    thousands of modules to compile)."""
    return run([venv / "bin/python", "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-compile",
                *args])


@pytest.fixture(scope="session")
def image_venv(tmp_path_factory):
    """ONE fresh venv with every image's third-party packages; removed afterwards (about 2 GB)."""
    venv = tmp_path_factory.mktemp("image-venv")
    run([sys.executable, "-m", "venv", "--clear", venv])  # from the base interpreter, not the dev venv
    constraints = DOCKER / "constraints.txt"  # what the Dockerfiles COPY to /tmp/constraints.txt
    pip(venv, "-c", constraints, "torch")  # first, as in the images (here the CPU wheel the index serves)
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    extras = sorted({extra for name in DOCKERFILES for extra in install_extras(name)})
    pip(venv, "-c", constraints, "-r", DOCKER / "requirements-cluster.txt", *dependencies, *extras)
    yield venv
    shutil.rmtree(venv, ignore_errors=True)


def test_the_constraints_pin_every_package_the_images_install(image_venv):
    listed = json.loads(run([image_venv / "bin/python", "-m", "pip", "list", "--format=json"]).stdout)
    canonical = lambda name: re.sub(r"[-_.]+", "-", name).lower()  # noqa: E731
    pinned = {canonical(line.split("==")[0]) for line in (DOCKER / "constraints.txt").read_text().splitlines()
              if line and not line.startswith("#")}
    unpinned = {canonical(p["name"]) for p in listed} - pinned - {"pip", "setuptools", "customdiff"}
    assert not unpinned, f"installed in the images but not pinned in constraints.txt: {sorted(unpinned)}"


# --- Each image: contents, then entry points -----------------------------------------------------------
# Imports every module of the installed distribution's packages; reports what else could be imported.
CONTENTS = """
import importlib, importlib.metadata, importlib.util, json, pkgutil, sys
shipped = sorted({f.parts[0] for f in importlib.metadata.distribution("customdiff").files
                  if f.suffix == ".py" and len(f.parts) > 1 and f.parts[0] != ".."})
for package in shipped:
    for info in pkgutil.walk_packages(importlib.import_module(package).__path__, package + "."):
        if ".migrations" not in info.name:  # alembic's scripts run inside alembic only
            importlib.import_module(info.name)
print(json.dumps({"shipped": shipped,
                  "importable": [n for n in sys.argv[1].split(",") if importlib.util.find_spec(n)],
                  "from_checkout": sorted(n for n, m in list(sys.modules.items())
                                          if (getattr(m, "__file__", None) or "").startswith(sys.argv[2]))}))
"""
ENTRY_POINTS = {  # argv, exit status, text in the output
    "Dockerfile.services": [(["customdiff", "serve", "--help"], 0, "--only"),
                            (["customdiff", "remote", "--help"], 0, "usage:")],
    "Dockerfile.trainer": [(["python", "-m", "trainer", "--help"], 0, "--spec"),  # the Jobs' command
                           (["python", "-m", "services.trainer.launchers.check_spec", "spec.json"], 2,
                            "invalid job spec spec.json")],  # their init container
    "Dockerfile.triton": [],  # Triton starts the model: start_triton_model
}


def build_and_install(dockerfile: str, venv: Path, tmp_path: Path) -> Build:
    """The image's build stage emulated under tmp_path/root, its context installed into `venv`."""
    # 1. The context, laid out by the COPY instructions; nothing of what the image leaves out.
    build = emulate_build(dockerfile, tmp_path / "root")
    shipped = [name for name in NEVER_SHIPPED if build.path(name).exists()]
    assert not shipped, f"{dockerfile} copies {shipped} into {build.workdir}: the images never ship them"
    # 2. The RUN's stub generation, with the dev venv's python (the image uses its own, same grpcio-tools).
    codegen, _ = install_line(build.runs)
    assert len(codegen) == 3, codegen
    script = " && ".join(re.sub(r"^python (?=-m grpc_tools)", f"{sys.executable} ", step) for step in codegen)
    run(["bash", "-c", script], cwd=build.path("."))
    # 3. Its `pip install .`, without dependencies: the session's venv has them.
    pip(venv, "--no-deps", "--force-reinstall", "-c", build.path("/tmp/constraints.txt"), build.path("."))
    run([venv / "bin/python", "-m", "pip", "check"])
    return build


# A stand-in for Triton's triton_python_backend_utils: what `initialize` and `finalize` touch, no more.
FAKE_PB_UTILS = '''
class TritonModelException(Exception):
    pass
def using_decoupled_model_transaction_policy(config):
    return config.get("model_transaction_policy", {}).get("decoupled", False)
class _Metric:
    increment = set = observe = lambda self, value: None
class MetricFamily:
    COUNTER, GAUGE, HISTOGRAM = 0, 1, 2
    def __init__(self, name, description, kind):
        self.name, self.kind = name, kind
    def Metric(self, labels, buckets=None):  # Triton: buckets for histograms, and only for them
        assert all(isinstance(v, str) for v in labels.values()), labels
        assert (buckets is None) == (self.kind != self.HISTOGRAM), self.name
        return _Metric()
'''
# Triton's Python backend stub, in short: the model's JSON config (from config.pbtxt), model.py by path.
TRITON_MODEL = """
import importlib.util, sys
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2
sys.path.insert(0, sys.argv[2])  # the fake triton_python_backend_utils
model = sys.argv[1] + "/stable_diffusion"
config = text_format.Parse(open(model + "/config.pbtxt").read(), model_config_pb2.ModelConfig())
args = {"model_config": json_format.MessageToJson(config, preserving_proto_field_name=True),
        "model_instance_kind": "CPU", "model_instance_name": "stable_diffusion_0_0",
        "model_instance_device_id": "0", "model_repository": model, "model_version": "1",
        "model_name": "stable_diffusion"}
spec = importlib.util.spec_from_file_location("model", model + "/1/model.py")
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
instance = module.TritonPythonModel()
instance.initialize(args)
print("initialized", instance.decoupled, instance.engine.base.fingerprint)
instance.finalize()
"""


def start_triton_model(build: Build, venv: Path, tmp_path: Path, cwd: Path) -> None:
    """The Triton model's initialize() and finalize() from the image's layout, against a tiny base."""
    # 1. The RUN that derives configs/gpu.pbtxt and links pytriton's 3.11 backend stub, on this layout.
    repository = build.path(build.copies["deploy/triton/model_repository"])
    [derive] = [r for r in build.runs if build.copies["deploy/triton/model_repository"] in r]
    image_paths = {"/opt/venv": str(venv), "/opt/customdiff": str(build.path("/opt/customdiff"))}
    run(["bash", "-c", re.sub(r"/opt/(venv|customdiff)\b", lambda m: image_paths[m.group(0)], derive)])
    assert (repository / "stable_diffusion/triton_python_backend_stub").resolve().is_file()
    assert "KIND_GPU" in (repository / "stable_diffusion/configs/gpu.pbtxt").read_text()
    # 2. A tiny base made with the image's packages, an empty store, the fake backend utils.
    backend, store = tmp_path / "backend", tmp_path / "store"
    backend.mkdir()
    store.mkdir()
    (backend / "triton_python_backend_utils.py").write_text(FAKE_PB_UTILS)
    python, base = venv / "bin/python", tmp_path / "base"
    run([python, "-c", "import sys; from concepts.tiny import create_tiny_base as c; c(sys.argv[1])", base],
        venv, cwd)
    # 3. initialize() and finalize(), with the Helm chart's overrides of the image's base and store.
    result = run([python, "-c", TRITON_MODEL, repository, backend], venv, cwd,
                 CUSTOMDIFF_BASE_MODEL=str(base), CUSTOMDIFF_STORE_URL=str(store))
    assert result.stdout.splitlines()[-1].startswith("initialized True "), result.stdout[-2000:]


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_the_image_installs_what_it_copies_and_its_entry_points_start(dockerfile, image_venv, tmp_path):
    build = build_and_install(dockerfile, image_venv, tmp_path)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    contents = run([image_venv / "bin/python", "-c", CONTENTS, ",".join(NEVER_SHIPPED), ROOT],
                   image_venv, cwd)
    report = json.loads(contents.stdout.splitlines()[-1])
    assert report == {"shipped": IMAGE_PACKAGES, "importable": [], "from_checkout": []}, report
    for argv, status, text in ENTRY_POINTS[dockerfile]:
        result = run(argv, image_venv, cwd, check=status)
        assert text in result.stdout + result.stderr, (argv, result.stdout[-2000:], result.stderr[-2000:])
    if dockerfile == "Dockerfile.triton":
        start_triton_model(build, image_venv, tmp_path, cwd)
