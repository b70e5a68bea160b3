"""`hap submit`: run a command as a Ray job on a Ray cluster and stream its logs.

    hap submit --address http://HEAD:8265 --token-file token -- \\
        python examples/train_gpt.py --cluster auto --steps 20

The working directory is zipped and uploaded (see `hierarchical_ap.ray_jobs`); the logs are
streamed to stdout, hap's own lines go to stderr. Exit status: 0 when the job succeeds (or is
submitted, with --no-wait), 1 when it fails or is stopped, 130 after Ctrl-C (which stops the
job), 2 on a usage or connection error.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from hierarchical_ap import ray_jobs

EXIT_JOB_FAILED = 1
EXIT_INTERRUPTED = 130
# Ray's client logs every upload step at INFO, and warns that it leaves out .git and .venv,
# which hap leaves out anyway; shown with `hap -v submit`.
_RAY_LOGGERS = {
    "ray": logging.WARNING,
    "ray.dashboard.modules.dashboard_sdk": logging.WARNING,
    "ray.dashboard.modules.job.sdk": logging.WARNING,
    "ray._private.runtime_env.packaging": logging.WARNING,
    "ray._private.runtime_env.working_dir": logging.ERROR,
}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add `submit` to the `hap` parser."""
    parser = subparsers.add_parser(
        "submit",
        help="run a command as a job on a Ray cluster (uploads the working directory)",
        description=(
            "Submit COMMAND as a Ray job: the working directory is uploaded to the cluster and "
            "COMMAND runs on the head node in it, with the head's Python environment. The "
            "job's logs are streamed until it ends; Ctrl-C stops it."
        ),
        epilog=(
            "example: hap submit --address http://HEAD:8265 --token-file ray-token -- "
            "python examples/train_gpt.py --cluster auto --steps 20"
        ),
    )
    parser.add_argument(
        "--address",
        help="the job server (the head's dashboard), e.g. http://HEAD:8265 "
        f"(default: $RAY_API_SERVER_ADDRESS, $RAY_ADDRESS, {ray_jobs.DEFAULT_JOB_SERVER})",
    )
    parser.add_argument(
        "--working-dir",
        default=".",
        help="directory to upload and run COMMAND in (default: the current directory)",
    )
    parser.add_argument(
        "--token-file",
        help="file holding the cluster's authentication token (`ray get-auth-token` on the "
        "head prints it); default: with RAY_AUTH_MODE=token, $RAY_AUTH_TOKEN, "
        "$RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token; else none",
    )
    parser.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="PATTERN",
        help="gitignore-style pattern of files not to upload (repeatable); "
        f"{', '.join(ray_jobs.DEFAULT_EXCLUDES)} and .gitignore'd files are never uploaded",
    )
    parser.add_argument(
        "--max-file-mib",
        type=_positive_mib,
        default=ray_jobs.DEFAULT_MAX_FILE_BYTES / 2**20,
        help="leave out files larger than this (default: %(default)g MiB)",
    )
    parser.add_argument(
        "--no-wait", action="store_true", help="print the job id and return once submitted"
    )
    parser.add_argument(
        "command",
        nargs=argparse.REMAINDER,
        metavar="-- COMMAND",
        help="the command the job runs, after `--`",
    )
    parser.set_defaults(run=run)


def _positive_mib(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive size in MiB, e.g. 25")
    return value


def run(args: argparse.Namespace) -> int:
    """Submit, then follow the job to its end; the exit status."""
    entrypoint = ray_jobs.entrypoint_command(args.command)
    address = ray_jobs.resolve_address(args.address, os.environ)
    token = ray_jobs.resolve_token(args.token_file, os.environ, Path.home())
    runtime_env = ray_jobs.job_runtime_env(
        args.working_dir, excludes=args.exclude, max_file_bytes=int(args.max_file_mib * 2**20)
    )
    if not args.verbose:
        _quiet_ray_logging()
    client = ray_jobs.connect(address, token)
    job_id = ray_jobs.submit(client, entrypoint, runtime_env)
    _note(f"submitted job {job_id} to {client.get_address()}")
    if args.no_wait:
        _note(_ray_cli_hint(job_id, client.get_address(), args.token_file))
        print(job_id)
        return 0
    try:
        status = ray_jobs.follow(client, job_id, _write_log)
    except KeyboardInterrupt:
        _note(f"stopping job {job_id}")
        status = ray_jobs.stop(client, job_id)
        _note(f"job {job_id} {status}")
        return EXIT_INTERRUPTED
    if status != "SUCCEEDED":
        _note(f"job {job_id} {status} ({ray_jobs.end_reason(client, job_id)})")
        return EXIT_JOB_FAILED
    _note(f"job {job_id} {status}")
    return 0


def _ray_cli_hint(job_id: str, address: str, token_file: str | None) -> str:
    """How to follow or stop the job with Ray's own CLI."""
    auth = f" RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={token_file}" if token_file else ""
    prefix = f"RAY_API_SERVER_ADDRESS={address}{auth}"
    return (
        f"follow it with `{prefix} ray job logs --follow {job_id}`, "
        f"stop it with `{prefix} ray job stop {job_id}`"
    )


def _quiet_ray_logging() -> None:
    import ray.job_submission  # noqa: F401  (its loggers set their levels on import)

    for name, level in _RAY_LOGGERS.items():
        logging.getLogger(name).setLevel(level)


def _write_log(chunk: str) -> None:
    sys.stdout.write(chunk)
    sys.stdout.flush()


def _note(line: str) -> None:
    print(f"hap submit: {line}", file=sys.stderr, flush=True)
