"""Ray Jobs: submit a command to a Ray cluster's job server and follow it (`hap submit`).

The job server is the head node's dashboard (``http://HEAD:8265``). A job is an entrypoint
command run on the head with the head's Python environment, in a copy of a local working
directory that Ray zips, uploads and puts first on the job's ``PYTHONPATH`` (so the uploaded
``hierarchical_ap`` is the one imported, by the driver and by every Ray worker of the job).

Token authentication (Ray ≥ 2.52, ``RAY_AUTH_MODE=token`` on every node): each request carries
``Authorization: Bearer <token>``. The token comes from ``token_file`` if given, else — only when
``RAY_AUTH_MODE=token`` here, as Ray's own clients do — from ``RAY_AUTH_TOKEN``,
``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``, in that order.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import logging
import os
import re
import shlex
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hierarchical_ap.errors import JobSubmissionError

if TYPE_CHECKING:
    from ray.job_submission import JobStatus, JobSubmissionClient

logger = logging.getLogger(__name__)

DEFAULT_JOB_SERVER = "http://127.0.0.1:8265"
# Where Ray's job clients look for the job server, highest precedence first.
ADDRESS_VARIABLES = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
DEFAULT_TOKEN_PATH = Path(".ray") / "auth_token"  # relative to the home directory
# Never worth uploading (recent Ray versions leave out the first four by themselves).
DEFAULT_EXCLUDES = (
    ".git",
    ".venv",
    "venv",
    "__pycache__",
    "*.egg-info",
    ".pytest_cache",
    ".ruff_cache",
    ".mypy_cache",
    ".ipynb_checkpoints",
)
# Files above this size are left out of the upload (the job server takes at most 100 MiB).
DEFAULT_MAX_FILE_BYTES = 25 * 2**20
CONNECT_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 30.0
_GITIGNORE_SPECIAL = re.compile(r"([\[\]*?!#\\])")
_TOKEN_SOURCES = "RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token"
_REACH_FIX = (
    "check that the Ray head is running (`ray status` on it), that this is its dashboard "
    "address (http://HEAD:8265; `ray start --head --dashboard-host 0.0.0.0` listens on every "
    "interface) and that the port is open to this machine (or tunnel it with "
    "`ssh -L 8265:localhost:8265 HEAD`)"
)


@dataclass(frozen=True)
class AuthToken:
    """A Ray authentication token and where it was read from (named in error messages)."""

    value: str
    source: str

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.value}"}


def resolve_address(address: str | None, environ: Mapping[str, str]) -> str:
    """The job server to use: ``address`` if given, else ``RAY_API_SERVER_ADDRESS``, else
    ``RAY_ADDRESS``, else ``http://127.0.0.1:8265``. An address without ``http(s)://`` (a
    GCS address ``HEAD:6379``, ``auto``, ``ray://HEAD:10001``) is left for Ray to resolve."""
    if address:
        return address.rstrip("/")
    for variable in ADDRESS_VARIABLES:
        if environ.get(variable):
            return environ[variable].rstrip("/")
    return DEFAULT_JOB_SERVER


def resolve_token(
    token_file: str | os.PathLike[str] | None, environ: Mapping[str, str], home: Path
) -> AuthToken | None:
    """The token to send, or None when token authentication is not asked for here (no
    ``token_file`` and ``RAY_AUTH_MODE`` is not ``token``)."""
    if token_file is not None:
        return _read_token(Path(token_file), f"--token-file {token_file}")
    if environ.get("RAY_AUTH_MODE", "").lower() != "token":
        return None
    if environ.get("RAY_AUTH_TOKEN", "").strip():
        return AuthToken(environ["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN")
    if environ.get("RAY_AUTH_TOKEN_PATH"):
        path = environ["RAY_AUTH_TOKEN_PATH"]
        return _read_token(Path(path), f"RAY_AUTH_TOKEN_PATH={path}")
    default = home / DEFAULT_TOKEN_PATH
    if default.is_file():
        return _read_token(default, str(default))
    raise JobSubmissionError(
        f"RAY_AUTH_MODE=token but no token was found in {_TOKEN_SOURCES}; copy the cluster's "
        "token (`ray get-auth-token` on the head prints it) into a file and set "
        "RAY_AUTH_TOKEN_PATH to it, or pass --token-file FILE"
    )


def _read_token(path: Path, source: str) -> AuthToken:
    try:
        value = path.read_text().strip()
    except OSError as exc:
        raise JobSubmissionError(
            f"cannot read the token file {path} ({exc.strerror}); write the cluster's token "
            "(`ray get-auth-token` on the head prints it) into it"
        ) from None
    if not value:
        raise JobSubmissionError(
            f"the token file {path} is empty; write the cluster's token "
            "(`ray get-auth-token` on the head prints it) into it"
        )
    return AuthToken(value, source)


def entrypoint_command(argv: Sequence[str]) -> str:
    """The shell command the job runs, quoted so that each argument arrives as given."""
    words = list(argv)
    if words[:1] == ["--"]:
        words = words[1:]
    if not words:
        raise JobSubmissionError(
            "no command to run; put it after `--`, e.g. "
            "`hap submit -- python examples/train_gpt.py --cluster auto`"
        )
    return shlex.join(words)


def large_files(root: Path, excludes: Sequence[str], max_bytes: int) -> list[str]:
    """Files under ``root`` larger than ``max_bytes``, as ``/relative/posix/path`` (gitignore
    patterns anchored at ``root``, wildcard characters escaped), not descending into directories whose name an exclude
    pattern matches."""
    found: list[str] = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if not _matches(d, excludes)]
        for name in files:
            path = Path(directory) / name
            if _matches(name, excludes) or path.is_symlink():
                continue
            try:
                size = path.stat().st_size
            except OSError:
                continue
            if size > max_bytes:
                found.append(
                    "/" + _GITIGNORE_SPECIAL.sub(r"\\\1", path.relative_to(root).as_posix())
                )
    return sorted(found)


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in patterns)


def job_runtime_env(
    working_dir: str | os.PathLike[str],
    *,
    excludes: Sequence[str] = (),
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
) -> dict[str, Any]:
    """Ray's ``runtime_env`` for the job: the working directory (uploaded without
    ``DEFAULT_EXCLUDES``, ``excludes``, what its ``.gitignore`` lists, and files over
    ``max_file_bytes``)."""
    root = Path(working_dir).expanduser().resolve()
    if not root.is_dir():
        raise JobSubmissionError(
            f"the working directory {working_dir} is not a directory; pass --working-dir DIR "
            "with the code the job runs (default: the current directory)"
        )
    patterns = [*DEFAULT_EXCLUDES, *excludes]
    big = large_files(root, patterns, max_file_bytes)
    if big:
        logger.warning(
            "leaving out %d file(s) over %.0f MiB: %s",
            len(big),
            max_file_bytes / 2**20,
            ", ".join(big),
        )
    return {"working_dir": str(root), "excludes": [*patterns, *big]}


@contextlib.contextmanager
def _address_variables_unset() -> Iterator[None]:
    """Ray's client lets RAY_API_SERVER_ADDRESS / RAY_ADDRESS override its address argument;
    hide them while it is built so that the address resolved here is the one used."""
    saved = {name: os.environ.pop(name) for name in ADDRESS_VARIABLES if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def check_job_server(
    url: str, token: AuthToken | None, *, timeout_s: float = CONNECT_TIMEOUT_S
) -> str:
    """The Ray version of the job server at ``url`` (``http(s)://HOST:PORT``), after checking
    that it answers within ``timeout_s`` and accepts ``token``."""
    import requests

    headers = token.headers() if token else {}
    try:
        response = requests.get(f"{url}/api/version", headers=headers, timeout=timeout_s)
    except requests.exceptions.Timeout:
        raise JobSubmissionError(
            f"the Ray job server at {url} did not answer within {timeout_s:g} s; {_REACH_FIX}"
        ) from None
    except requests.exceptions.RequestException as exc:
        raise JobSubmissionError(
            f"cannot reach the Ray job server at {url} ({type(exc).__name__}); {_REACH_FIX}"
        ) from None
    if response.status_code in (401, 403):
        raise _auth_error(url, token, response.status_code)
    if response.status_code != 200:
        raise JobSubmissionError(
            f"{url} answered HTTP {response.status_code} to /api/version, so it is not a Ray "
            f"job server; {_REACH_FIX}"
        )
    try:
        return str(response.json()["ray_version"])
    except (ValueError, KeyError, TypeError):
        raise JobSubmissionError(
            f"{url} answered /api/version without a Ray version, so it is not a Ray job "
            f"server; {_REACH_FIX}"
        ) from None


def _auth_error(url: str, token: AuthToken | None, status: int) -> JobSubmissionError:
    if token is None:
        unused = Path.home() / DEFAULT_TOKEN_PATH
        note = (
            f" ({unused} exists, but it is read only with RAY_AUTH_MODE=token)"
            if unused.is_file()
            else ""
        )
        return JobSubmissionError(
            f"the Ray cluster at {url} requires an authentication token and none was sent "
            f"(HTTP {status}){note}; copy the cluster's token (`ray get-auth-token` on the head "
            "prints it) into a file and pass --token-file FILE, or export RAY_AUTH_MODE=token "
            "and RAY_AUTH_TOKEN_PATH=FILE"
        )
    return JobSubmissionError(
        f"the Ray cluster at {url} rejected the token from {token.source} (HTTP {status}); use "
        "the token the cluster was started with (`ray get-auth-token` on the head prints it)"
    )


def connect(
    address: str, token: AuthToken | None, *, timeout_s: float = CONNECT_TIMEOUT_S
) -> JobSubmissionClient:
    """A Ray ``JobSubmissionClient`` for the job server at ``address``, sending ``token``."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    if address.startswith(("http://", "https://")):
        version = check_job_server(address, token, timeout_s=timeout_s)
        logger.info("Ray %s job server at %s", version, address)
    try:
        with _address_variables_unset():
            return JobSubmissionClient(address, headers=token.headers() if token else None)
    except AuthenticationError:
        raise _auth_error(address, token, 401) from None
    except ConnectionError as exc:
        raise JobSubmissionError(
            f"cannot reach the Ray job server at {address} ({exc}); {_REACH_FIX}"
        ) from None


def submit(client: JobSubmissionClient, entrypoint: str, runtime_env: dict[str, Any]) -> str:
    """Upload the working directory and start the job; its submission id."""
    from ray.exceptions import AuthenticationError

    logger.info("submitting %r with runtime_env %s", entrypoint, runtime_env)
    try:
        return client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
    except AuthenticationError:
        raise JobSubmissionError(
            f"the Ray cluster at {client.get_address()} rejected the job's authentication; "
            "check the token (`ray get-auth-token` on the head prints it)"
        ) from None
    except (RuntimeError, ValueError) as exc:
        raise JobSubmissionError(
            f"the Ray job server at {client.get_address()} did not take the job: {exc}; the "
            "working directory is uploaded whole (at most 100 MiB zipped): leave data out "
            "with --exclude PATTERN or .gitignore"
        ) from None


def follow(client: JobSubmissionClient, job_id: str, write: Callable[[str], Any]) -> JobStatus:
    """Pass the job's log output to ``write`` as it comes, until the job ends; its final
    status. Ctrl-C (KeyboardInterrupt) propagates and leaves the job running (see ``stop``)."""

    async def stream() -> None:
        import aiohttp

        try:
            async for chunk in client.tail_job_logs(job_id):
                write(chunk)
        except (RuntimeError, aiohttp.ClientError) as exc:
            raise JobSubmissionError(
                f"lost the log stream of job {job_id} ({exc}); the job goes on: follow it "
                f"with `ray job logs --follow {job_id} --address {client.get_address()}`"
            ) from None

    asyncio.run(stream())
    return wait_until_done(client, job_id)


def wait_until_done(
    client: JobSubmissionClient, job_id: str, *, timeout_s: float | None = None, poll_s: float = 0.5
) -> JobStatus:
    """The job's status once it is terminal (or when ``timeout_s`` has passed)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        status = client.get_job_status(job_id)
        if status.is_terminal() or (deadline is not None and time.monotonic() > deadline):
            return status
        time.sleep(poll_s)


def stop(
    client: JobSubmissionClient, job_id: str, *, timeout_s: float = STOP_TIMEOUT_S
) -> JobStatus:
    """Ask Ray to stop the job (SIGTERM to its process group, then SIGKILL) and wait up to
    ``timeout_s`` for it to end; its status."""
    client.stop_job(job_id)
    return wait_until_done(client, job_id, timeout_s=timeout_s)


def end_reason(client: JobSubmissionClient, job_id: str) -> str:
    """Why the job ended as it did: its entrypoint's exit code, else Ray's message (first
    line; e.g. a runtime environment that could not be set up)."""
    info = client.get_job_info(job_id)
    code = getattr(info, "driver_exit_code", None)
    if code is not None:
        return f"exit code {code}"
    return (info.message or "").split("\n", 1)[0]
