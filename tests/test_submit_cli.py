"""`hap submit`'s arguments, address, token and upload rules, without a Ray cluster.

The submission itself (a real head with token authentication) is tests/test_ray_jobs.py.
"""

from __future__ import annotations

import shlex
import socket
import time
import zipfile
from pathlib import Path

import pytest

from hierarchical_ap import ray_jobs
from hierarchical_ap.cli import build_parser, main
from hierarchical_ap.errors import JobSubmissionError


def test_options_before_the_double_dash_are_hap_s_and_the_rest_is_the_command():
    args = build_parser().parse_args(
        ["submit", "--address", "http://head:8265", "--no-wait", "--",
         "python", "train.py", "--address", "x", "--steps", "3"]
    )  # fmt: skip
    assert args.address == "http://head:8265" and args.no_wait
    assert ray_jobs.entrypoint_command(args.command) == "python train.py --address x --steps 3"


def test_the_command_keeps_each_argument_whole():
    argv = ["python", "-c", "print('a b'); print(\"c\")", "--name", "two words", ""]
    assert shlex.split(ray_jobs.entrypoint_command(["--", *argv])) == argv


def test_a_size_limit_must_be_positive(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["submit", "--max-file-mib", "0", "--", "true"])
    assert "not a positive size in MiB" in capsys.readouterr().err


def test_no_command_is_a_clear_error(capsys):
    assert main(["submit", "--address", "http://127.0.0.1:9"]) == 2
    assert "no command to run; put it after `--`" in capsys.readouterr().err


def test_address_precedence_follows_ray():
    env = {"RAY_ADDRESS": "http://gcs-var:8265", "RAY_API_SERVER_ADDRESS": "http://api-var:8265/"}
    assert ray_jobs.resolve_address("http://flag:8265/", env) == "http://flag:8265"
    assert ray_jobs.resolve_address(None, env) == "http://api-var:8265"
    assert ray_jobs.resolve_address(None, {"RAY_ADDRESS": "http://gcs-var:8265"}) == (
        "http://gcs-var:8265"
    )
    assert ray_jobs.resolve_address(None, {}) == ray_jobs.DEFAULT_JOB_SERVER


def test_a_token_file_is_read_and_stripped(tmp_path):
    path = tmp_path / "token"
    path.write_text("  abc123\n")
    token = ray_jobs.resolve_token(path, {}, tmp_path)
    assert token is not None and token.value == "abc123"
    assert token.headers() == {"Authorization": "Bearer abc123"}
    assert str(path) in token.source


@pytest.mark.parametrize("content", [None, " \n"])
def test_a_missing_or_empty_token_file_names_the_file(tmp_path, content):
    path = tmp_path / "token"
    if content is not None:
        path.write_text(content)
    with pytest.raises(JobSubmissionError, match=str(path)) as caught:
        ray_jobs.resolve_token(path, {}, tmp_path)
    assert "ray get-auth-token" in str(caught.value)


def test_without_token_mode_no_token_is_sent_even_if_one_is_lying_around(tmp_path):
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("default")
    assert ray_jobs.resolve_token(None, {"RAY_AUTH_TOKEN": "env"}, tmp_path) is None


def test_token_mode_reads_ray_s_sources_in_ray_s_order(tmp_path):
    file = tmp_path / "file-token"
    file.write_text("from-file\n")
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-default")
    mode = {"RAY_AUTH_MODE": "token"}

    def value(env: dict[str, str]) -> str:
        token = ray_jobs.resolve_token(None, {**mode, **env}, tmp_path)
        assert token is not None
        return token.value

    assert value({"RAY_AUTH_TOKEN": "from-env", "RAY_AUTH_TOKEN_PATH": str(file)}) == "from-env"
    assert value({"RAY_AUTH_TOKEN_PATH": str(file)}) == "from-file"
    assert value({}) == "from-default"
    # an explicit file wins over all of them
    explicit = tmp_path / "explicit"
    explicit.write_text("explicit")
    token = ray_jobs.resolve_token(explicit, {**mode, "RAY_AUTH_TOKEN": "env"}, tmp_path)
    assert token is not None and token.value == "explicit"


def test_token_mode_without_any_token_says_where_it_looked(tmp_path):
    with pytest.raises(JobSubmissionError, match="RAY_AUTH_TOKEN_PATH") as caught:
        ray_jobs.resolve_token(None, {"RAY_AUTH_MODE": "token"}, tmp_path)
    assert "--token-file" in str(caught.value)


def test_the_upload_leaves_out_tool_directories_and_large_files(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "code.py").write_text("x = 1\n")
    (tmp_path / "data").mkdir()
    with open(tmp_path / "data" / "big.bin", "wb") as f:
        f.truncate(3 * 2**20)  # sparse: no disk used
    (tmp_path / "data" / "small.bin").write_bytes(b"0" * 1024)
    (tmp_path / ".venv" / "lib").mkdir(parents=True)
    with open(tmp_path / ".venv" / "lib" / "huge.so", "wb") as f:
        f.truncate(10 * 2**20)
    env = ray_jobs.job_runtime_env(tmp_path, excludes=["*.ckpt"], max_file_bytes=2**20)
    assert env["working_dir"] == str(tmp_path.resolve())
    excludes = env["excludes"]
    assert {".git", ".venv", "__pycache__", "*.ckpt"} <= set(excludes)
    assert "/data/big.bin" in excludes  # anchored at the working directory
    assert not any("small.bin" in e or "huge.so" in e for e in excludes)


def test_ray_s_packager_uploads_the_code_and_leaves_out_what_the_excludes_name(tmp_path):
    """The zip Ray's job client would upload, built by Ray's own packager."""
    from ray._private.runtime_env.packaging import create_package

    work = tmp_path / "work"
    (work / "pkg").mkdir(parents=True)
    (work / "pkg" / "code.py").write_text("x = 1\n")
    (work / ".git").mkdir()
    (work / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (work / "data").mkdir()
    for name in ("big.bin", "odd [1]*.bin"):  # the second needs its wildcards escaped
        with open(work / "data" / name, "wb") as f:
            f.truncate(2 * 2**20)
    (work / "data" / "small.bin").write_bytes(b"0" * 1024)
    env = ray_jobs.job_runtime_env(work, max_file_bytes=2**20)
    target = tmp_path / "package.zip"
    create_package(str(work), target, include_gitignore=True, excludes=env["excludes"])
    with zipfile.ZipFile(target) as package:
        files = {n for n in package.namelist() if not n.endswith("/")}
    assert files == {"pkg/code.py", "data/small.bin"}


def test_a_working_dir_that_is_not_a_directory_is_a_clear_error(tmp_path):
    with pytest.raises(JobSubmissionError, match="--working-dir"):
        ray_jobs.job_runtime_env(tmp_path / "missing")


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_an_unreachable_job_server_is_a_clear_error_at_once(capsys):
    url = f"http://127.0.0.1:{_closed_port()}"
    start = time.monotonic()
    assert main(["submit", "--address", url, "--working-dir", str(Path(__file__).parent), "--",
                 "true"]) == 2  # fmt: skip
    assert time.monotonic() - start < 10
    err = capsys.readouterr().err
    assert f"cannot reach the Ray job server at {url}" in err
    assert "http://HEAD:8265" in err


def test_a_server_that_never_answers_times_out():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)  # accepts connections, never replies
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        with pytest.raises(JobSubmissionError, match="did not answer within 0.5 s"):
            ray_jobs.check_job_server(url, None, timeout_s=0.5)
