"""Download the wheels an offline GPU machine that already has torch needs to run this project,
trimmed to fit a small transfer.

A GPU machine without network access (a lent benchmark box, an air-gapped node) usually has
torch, numpy, numba, networkx and the like, but not Ray, PuLP and HiGHS. This fetches, for the
target's Python and platform, the versions this environment runs (so that both sides agree),
without their dependencies (``--no-deps``: list the missing ones in ``--packages``), and drops
from them what the project never loads:

* Ray: ``ray/jars`` (the Java workers, 32 MB of its 79 MB) and the dashboard's web client
  (the runtime starts Ray without the dashboard);
* PuLP: ``pulp/solverdir`` (the bundled CBC binaries, 16 MB; the ILP solves with HiGHS and
  only falls back to CBC when HiGHS fails).

Each trimmed wheel's ``RECORD`` loses the dropped files' lines, so pip installs it as any
other. On the target:

    python3 -m pip install --no-index --no-deps --target /tmp/site WHEELHOUSE/*.whl
    export PYTHONPATH=/tmp/site:$PYTHONPATH

``benchmarks/gpu_check.sh`` does that and runs the GPU checks.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import zipfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

#: What a CUDA PyTorch image (torch, numpy, numba, networkx, pyyaml, requests, ...) lacks.
DEFAULT_PACKAGES = (
    "ray",
    "pulp",
    "highspy",
    "jsonschema",
    "jsonschema-specifications",
    "referencing",
    "rpds-py",
)
#: Folders dropped from each package's wheel (module docstring).
TRIMMED = {
    "ray": ("ray/jars/", "ray/dashboard/client/build/"),
    "pulp": ("pulp/solverdir/",),
}
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)


def download(package: str, python: str, out: Path) -> Path:
    """The wheel of ``package`` at this environment's version for CPython ``python``."""
    try:
        pinned = f"{package}=={version(package)}"
    except PackageNotFoundError:
        raise SystemExit(
            f"{package} is not installed here, so its version is unknown; install the project "
            "(make install) or leave it out of --packages"
        ) from None
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    command += ["--python-version", python, "--implementation", "cp", "-d", str(out), "-q"]
    for platform in PLATFORMS:
        command += ["--platform", platform]
    subprocess.run([*command, pinned], check=True)
    stem = package.replace("-", "_").lower()
    matches = [p for p in out.glob("*.whl") if p.name.lower().startswith(f"{stem}-")]
    if len(matches) != 1:
        raise SystemExit(f"expected one wheel of {package} in {out}, found {matches}")
    return matches[0]


def trim(wheel: Path, prefixes: tuple[str, ...]) -> int:
    """Rewrite ``wheel`` without the members under ``prefixes`` (and their RECORD lines);
    returns the bytes saved."""
    if not prefixes:
        return 0
    before = wheel.stat().st_size
    trimmed = wheel.with_suffix(".trimmed")
    with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(trimmed, "w") as target:
        for info in source.infolist():
            if info.filename.startswith(prefixes):
                continue
            data = source.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(line for line in lines if not line.startswith(prefixes)).encode()
            target.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
    trimmed.replace(wheel)
    return before - wheel.stat().st_size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default="3.12", help="the target's CPython version")
    parser.add_argument("--out", type=Path, default=Path(".whl"), help="the wheelhouse folder")
    parser.add_argument("--packages", nargs="+", default=list(DEFAULT_PACKAGES))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    total = 0
    for package in args.packages:
        wheel = download(package, args.python, args.out)
        saved = trim(wheel, TRIMMED.get(package, ()))
        size = wheel.stat().st_size
        total += size
        note = f" (trimmed {saved / 1e6:.1f} MB)" if saved else ""
        print(f"{wheel.name}: {size / 1e6:.1f} MB{note}")
    print(f"{len(args.packages)} wheels, {total / 1e6:.1f} MB in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
