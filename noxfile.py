"""Developer and CI sessions: `nox` runs tests, lint and typecheck; see `nox --list`."""

from __future__ import annotations

import nox

# Environments are made and filled by uv, not pip. pip may be configured (find-links) to prefer
# a local CPU-only torch wheel, and PyPI's torchvision then fails to import against it
# ("operator torchvision::nms does not exist"). uv ignores pip's configuration and, because
# torch, torchvision and the package go into ONE `install` call below, resolves a matching pair
# from PyPI (CUDA builds, which run fine on CPU). Never install torchvision in a separate call.
nox.needs_version = ">=2025.2.9"
nox.options.default_venv_backend = "uv"
nox.options.reuse_venv = "yes"
nox.options.error_on_external_run = True

PYPROJECT = nox.project.load_toml("pyproject.toml")
LINT_PATHS = ("streamcheck", "suites", "tests", "noxfile.py")


def install(session: nox.Session, *groups: str, package: bool = True) -> None:
    """Install the package (editable) and dependency groups in a single resolver call."""
    deps = dict.fromkeys(nox.project.dependency_groups(PYPROJECT, *groups))  # ordered, no repeats
    session.install(*(("-e", ".") if package else ()), *deps)


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite and doctests (hypothesis profile `ci`); extra args go to pytest."""
    install(session, "test")
    session.run(
        "pytest",
        "--hypothesis-show-statistics",
        *session.posargs,
        env={"HYPOTHESIS_PROFILE": "ci"},
    )


@nox.session(default=False)
def proofs(session: nox.Session) -> None:
    """Run only the property tests, with many examples (hypothesis profile `thorough`)."""
    install(session, "test")
    session.run(
        "pytest",
        "-m",
        "property",
        "--hypothesis-profile=thorough",
        "--hypothesis-show-statistics",
        *session.posargs,
    )


@nox.session
def lint(session: nox.Session) -> None:
    """Check lint and formatting with ruff; extra args go to `ruff check` (e.g. --fix)."""
    install(session, "lint", package=False)
    session.run("ruff", "check", *LINT_PATHS, *session.posargs)
    session.run("ruff", "format", "--check", "--diff", *LINT_PATHS)


@nox.session
def typecheck(session: nox.Session) -> None:
    """Type-check the streamcheck package with mypy; extra args go to mypy."""
    install(session, "typecheck", package=False)
    session.run("mypy", "streamcheck", *session.posargs)


@nox.session(default=False)
def benchmark(session: nox.Session) -> None:
    """Run the benchmark suite: python -m suites.benchmark {posargs}."""
    # The peer row needs lightstream (extra `peer`): same single resolver call as `install`.
    bench = dict.fromkeys(nox.project.dependency_groups(PYPROJECT, "bench"))
    session.install("-e", ".[peer]", *bench)
    session.run("python", "-m", "suites.benchmark", *session.posargs)


@nox.session(default=False)
def gate(session: nox.Session) -> None:
    """CI regression gate: streaming memory and time at 2048² within suites/benchmark/ceilings.toml."""
    install(session, "bench")
    session.run("python", "-m", "suites.benchmark", "--gate", *session.posargs)


@nox.session(default=False)
def gpu(session: nox.Session) -> None:
    """The GPU run's dry run on CPU, tiny sizes (CI): python -m suites.gpu --dry-run {posargs}."""
    # What the lent GPU machines have preinstalled (PyTorch, torchvision, pytest, hypothesis, the
    # bench libraries), in one resolver call as `install`: the dry run proves it needs no more.
    bench = dict.fromkeys(nox.project.dependency_groups(PYPROJECT, "bench"))
    session.install("-e", ".", "pytest>=8", "hypothesis>=6.100", *bench)
    session.run("python", "-m", "suites.gpu", "--dry-run", *session.posargs)


@nox.session(default=False)
def reproduce(session: nox.Session) -> None:
    """Run the Imagenette training reproduction: python -m suites.imagenette {posargs}."""
    install(session, "bench")
    session.run("python", "-m", "suites.imagenette", *session.posargs)


@nox.session(default=False)
def resolution(session: nox.Session) -> None:
    """Run the resolution / saliency / LSUV experiment: python -m suites.resolution {posargs}."""
    install(session, "resolution")
    session.run("python", "-m", "suites.resolution", *session.posargs)


@nox.session(default=False)
def report(session: nox.Session) -> None:
    """Build the reports from result files: python -m suites.report {posargs}."""
    # The package too: the report may read streamcheck's version or plans.
    install(session, "report")
    session.run("python", "-m", "suites.report", *session.posargs)


@nox.session(default=False)
def slides(session: nox.Session) -> None:
    """Whole-slide evidence (a >= 4 GB generated slide): nice -n 10 python -m suites.slides {posargs}."""
    bench = dict.fromkeys(nox.project.dependency_groups(PYPROJECT, "bench"))
    session.install("-e", ".[slides]", *bench)  # one resolver call, as `install`
    # The cores are shared: the run is niced, and every row records its niceness.
    session.run(
        "nice", "-n", "10", "python", "-m", "suites.slides", *session.posargs, external=True
    )


@nox.session(default=False)
def unet(session: nox.Session) -> None:
    """U-Net benchmark, streamed vs conventional at growing sizes: nice -n 10 python -m suites.unet {posargs}."""
    install(session, "bench")
    # The cores are shared: the run is niced (each row records the load).
    session.run("nice", "-n", "10", "python", "-m", "suites.unet", *session.posargs, external=True)


def interpreter(version: str) -> str:
    """``python3.X`` from PATH, else pyenv's install of it (3.12 and 3.13 live under pyenv here)."""
    import shutil
    import subprocess

    if shutil.which(f"python{version}") and not shutil.which("pyenv"):
        return version
    found = subprocess.run(["pyenv", "prefix", version], capture_output=True, text=True)
    prefix = found.stdout.strip().splitlines()[-1:] if found.returncode == 0 else []
    return f"{prefix[0]}/bin/python{version}" if prefix else version


def oldest_pins(*extras: str) -> list[str]:
    """``name==lowest`` for each ``name>=lowest`` of the extras: the oldest versions allowed."""
    found = PYPROJECT["project"]["optional-dependencies"]
    return [r.replace(">=", "==") for e in extras for r in found[e] if ">=" in r]


SOURCES_TESTS = (
    "tests/test_sources.py",
    "tests/test_sources_files.py",
    "tests/test_masks_annotations.py",
    "tests/test_export.py",
    "streamcheck/sources.py",
    "streamcheck/slidefiles.py",
    "streamcheck/dicomfiles.py",
    "streamcheck/annotations.py",
    "streamcheck/export.py",
)


# What each extra's code imports: a session with the extra must import all of them, so that no
# test of it is skipped for a missing package (a missing codec hid that way for a round).
EXTRA_MODULES = {
    "slides": ("tifffile", "zarr", "imagecodecs", "skimage", "matplotlib"),
    "openslide": ("openslide",),
    "dicom": ("wsidicom", "imagecodecs"),
    "vips": ("pyvips", "numpy"),
}


@nox.session(default=False)
@nox.parametrize(
    ("python", "versions", "extras"),
    [
        (interpreter("3.11"), "oldest", "slides,openslide,dicom"),
        (interpreter("3.13"), "newest", "slides,openslide,dicom,vips"),
        (interpreter("3.11"), "newest", "slides"),
    ],
    ids=["3.11-oldest", "3.13-newest", "3.11-slides-only"],
)
def sources(session: nox.Session, versions: str, extras: str) -> None:
    """Image sources, masks and export in a fresh env of the named extras and nothing else, with
    the oldest (Python 3.11) or newest (3.13) tifffile/zarr/imagecodecs/wsidicom allowed; the
    slides extra also alone, as the README installs it."""
    names = extras.split(",")
    pins = oldest_pins(*names) if versions == "oldest" else []
    # one resolver call (as `install`); the test tools only, no dependency group
    session.install("-e", f".[{extras}]", "pytest>=8", "hypothesis>=6.100", *pins)
    modules = sorted({m for name in names for m in EXTRA_MODULES[name]})
    session.run(
        "python",
        "-c",
        "import importlib, sys\n"
        "for name in sys.argv[1:]:\n"
        "    module = importlib.import_module(name)\n"
        "    print(name, getattr(module, '__version__', ''))",
        *modules,
    )
    session.run("pytest", "-p", "no:cacheprovider", "-rs", *(session.posargs or SOURCES_TESTS))
