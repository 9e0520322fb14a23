"""The documentation cannot drift: every command it shows runs, every link it makes resolves.

Every line that starts with `lmcached ` (or `$ lmcached `, `.venv/bin/lmcached `, either after
`VAR=value` assignments) inside a ```bash / ```console / ```sh fenced block of README.md or
docs/*.md runs through the real CLI (`sys.executable -m lmcached`, this checkout's code)
against one real daemon, which is itself
started from the first documented `lmcached start` line. Each line runs alone, in a fresh bash,
in a sandbox folder that holds a copy of config/, with HOME pointing into the sandbox:

- `--config ANYTHING` becomes the sandbox's config/lmcached.yaml: the repository's quickstart
  config with `port: 0` and a private runtime folder, so nothing collides with a real daemon;
- `--endpoint ANYTHING` becomes the test daemon's tcp control endpoint;
- `lmcached stop` lines run last, and must stop the daemon (the next test starts it again).

A line must exit 0 unless an HTML comment on the line just before its block says otherwise:

    <!-- docs-test: exit 1 -->          every command of the block must exit 1
    <!-- docs-test: skip (systemd) -->  the block is not run (say why: root, systemd, minutes);
                                        a visible "*Not run by the test suite (why).*" line
                                        goes just above the marker, for readers
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from lmcached import config as config_mod
from lmcached import runtime

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_LANGS = {"bash", "console", "sh", "shell"}
COMMAND_TIMEOUT = 60.0
SANDBOX_CONFIG = "config/lmcached.yaml"

_FENCE = re.compile(r"^\s*```\s*([\w+-]*)")
_MARKER = re.compile(r"^\s*<!--\s*docs-test:\s*(.*?)\s*-->\s*$")
# An optional prompt, optional VAR=value assignments, then the command itself.
_COMMAND = re.compile(
    r"^(?:\$\s+)?((?:[A-Z_][A-Z0-9_]*=\S*\s+)*(?:\.venv/bin/)?lmcached(?:\s.*)?)$"
)
_ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=")


@dataclass(frozen=True)
class DocCommand:
    """One `lmcached ...` line shown in the docs, with what the docs expect of it."""

    path: str  # relative to the repository root
    line: int  # 1-based line of the command in that file
    text: str  # the command as written (continuation lines joined)
    expect_exit: int = 0
    skip: str | None = None  # why the docs say it is not run

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"

    @property
    def subcommand(self) -> str:
        words = shlex.split(self.text, comments=True)
        while words and _ASSIGNMENT.match(words[0]):
            words.pop(0)
        return words[1] if len(words) > 1 else ""


def _parse_marker(text: str, where: str) -> tuple[int, str | None]:
    """Return (expected exit status, skip reason) from a docs-test comment."""
    if text.startswith("skip"):
        return 0, text[len("skip") :].strip(" ()") or "marked skip"
    m = re.fullmatch(r"exit\s+(\d+)", text)
    if m:
        return int(m.group(1)), None
    raise ValueError(f"{where}: unknown docs-test marker {text!r} (use 'exit N' or 'skip (why)')")


def scan(path: Path) -> list[DocCommand]:
    """Return every `lmcached` command line in the shell blocks of one Markdown file."""
    rel = str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
    lines = path.read_text().splitlines()
    out: list[DocCommand] = []
    in_block = False
    lang = ""
    expect, skip = 0, None
    pending: tuple[int, str] | None = None  # a command continued with a trailing backslash
    previous = ""  # the last non-blank line before the current one
    for number, raw in enumerate(lines, start=1):
        fence = _FENCE.match(raw)
        if fence and not in_block:
            in_block, lang = True, fence.group(1).lower()
            marker = _MARKER.match(previous)
            expect, skip = (
                _parse_marker(marker.group(1), f"{rel}:{number - 1}") if marker else (0, None)
            )
        elif fence and in_block:
            in_block = False
        elif in_block and lang in SHELL_LANGS:
            text = raw.strip()
            if pending is not None:
                start, head = pending
                text = f"{head} {text}"
                number = start
            if text.endswith("\\"):
                pending = (number, text[:-1].rstrip())
                continue
            pending = None
            m = _COMMAND.match(text)
            if m:
                out.append(DocCommand(rel, number, m.group(1), expect, skip))
        if raw.strip():
            previous = raw
    return out


def documented_commands() -> list[DocCommand]:
    """Every documented command, ordered so that starts come first and stops last."""
    found = [cmd for path in DOC_FILES for cmd in scan(path)]
    rank = {"start": 0, "stop": 2}
    return sorted(found, key=lambda c: rank.get(c.subcommand, 1))  # stable: doc order within


COMMANDS = documented_commands()


class Sandbox:
    """A folder to run documented commands in, and the daemon they talk to."""

    def __init__(self, root: Path) -> None:
        self.root = root
        shutil.copytree(ROOT / "config", root / "config")
        # ipc socket paths are limited to 107 bytes, so the runtime folder gets a short name.
        self.runtime_dir = tempfile.mkdtemp(prefix="lmdocs-", dir="/tmp")
        cfg_path = root / SANDBOX_CONFIG
        values = yaml.safe_load(cfg_path.read_text()) or {}
        values.update(port=0, runtime_dir=self.runtime_dir, log_format="json")
        cfg_path.write_text(yaml.safe_dump(values, sort_keys=False))
        self.cfg = config_mod.load(cfg_path, environ={})
        (root / "home").mkdir()
        bin_dir = root / "bin"
        bin_dir.mkdir()
        shim = bin_dir / "lmcached"
        shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m lmcached "$@"\n')
        shim.chmod(0o755)
        (root / ".venv" / "bin").mkdir(parents=True)
        (root / ".venv" / "bin" / "lmcached").symlink_to(shim)
        pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("LMCACHED_")},
            "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            "HOME": str(root / "home"),
            "PYTHONPATH": pythonpath,
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_from: str | None = None
        starts = [c for c in COMMANDS if c.subcommand == "start" and c.skip is None]
        self.default_start = self.render(starts[0]) if starts else None
        self.log_path = root / "daemon.log"
        self._log_file: object | None = None

    def render(self, cmd: DocCommand) -> str:
        """Return the shell line to run for a documented command."""
        text = re.sub(r"--config(?:\s+|=)\S+", f"--config {SANDBOX_CONFIG}", cmd.text)
        if "--endpoint" in text:
            text = re.sub(r"--endpoint(?:\s+|=)\S+", f"--endpoint {self.endpoint()}", text)
        return text

    def endpoint(self) -> str:
        data = runtime.read_endpoints(self.cfg)
        assert data, "the docs daemon is not running"
        return str(data["control"]["ipc"])

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, line: str) -> None:
        """Run a documented `lmcached start` line in the background until the daemon serves."""
        self.stop()
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            ["bash", "-c", f"exec {line}"],
            cwd=self.root,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,  # type: ignore[arg-type]
            stderr=subprocess.STDOUT,
        )
        self.started_from = line
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"`{line}` exited with {self.proc.returncode} before serving:\n{self.log()}"
                )
            if runtime.ready_pid(self.cfg) == self.proc.pid:
                return
            time.sleep(0.05)
        raise AssertionError(f"`{line}` did not become ready within 30 s:\n{self.log()}")

    def ensure_running(self) -> None:
        if not self.running():
            line = self.started_from or self.default_start
            assert line, "README.md and docs/*.md show no runnable `lmcached start` line"
            self.start(line)

    def wait_exit(self, timeout: float) -> int | None:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM the daemon, SIGKILL it after 20 s. Idempotent."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._log_file is not None:
            self._log_file.close()  # type: ignore[attr-defined]
            self._log_file = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.runtime_dir, ignore_errors=True)

    def run(self, line: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", "-o", "pipefail", "-c", line],
            cwd=self.root,
            env=self.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
        )


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    box = Sandbox(tmp_path_factory.mktemp("docs"))
    try:
        yield box
    finally:
        box.close()
        box.close()  # close() is idempotent, like every close in the project


def test_scanner_reads_commands_markers_prompts_and_continuations(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "Text with `lmcached status` inline is not run.\n"
        "```bash\n"
        "lmcached status --config F   # a comment\n"
        "echo not lmcached\n"
        "```\n"
        "<!-- docs-test: exit 2 -->\n"
        "```console\n"
        "$ LMCACHED_NUM_WORKERS=zero lmcached config check \\\n"
        "    --config F\n"
        "lmcached: config error: ...\n"
        "```\n"
        "<!-- docs-test: skip (root) -->\n"
        "```sh\n"
        "lmcached keygen /etc/x\n"
        "```\n"
        "```text\n"
        "lmcached plugins   a table, not a command\n"
        "```\n"
    )
    found = scan(page)
    assert [(c.line, c.text, c.expect_exit, c.skip, c.subcommand) for c in found] == [
        (3, "lmcached status --config F   # a comment", 0, None, "status"),
        (8, "LMCACHED_NUM_WORKERS=zero lmcached config check --config F", 2, None, "config"),
        (14, "lmcached keygen /etc/x", 0, "root", "keygen"),
    ]


def test_docs_show_a_start_line_and_commands_to_run() -> None:
    runnable = [c for c in COMMANDS if c.skip is None]
    assert any(c.subcommand == "start" for c in runnable), (
        "no runnable `lmcached start --config ...` line in README.md or docs/*.md: the other "
        "commands need it to start their daemon"
    )
    assert len(runnable) >= 10, [c.where for c in runnable]


@pytest.mark.parametrize("cmd", COMMANDS, ids=[c.where for c in COMMANDS])
def test_documented_command_runs(cmd: DocCommand, sandbox: Sandbox) -> None:
    if cmd.skip is not None:
        pytest.skip(f"marked in the docs: {cmd.skip}")
    line = sandbox.render(cmd)
    if cmd.subcommand == "start":
        if sandbox.started_from != line or not sandbox.running():
            sandbox.start(line)
        return
    sandbox.ensure_running()
    try:
        result = sandbox.run(line)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{cmd.where}: `{cmd.text}` (run as `{line}`) ran past {exc.timeout} s")
    assert result.returncode == cmd.expect_exit, (
        f"{cmd.where}: `{cmd.text}`\n  run as `{line}` in {sandbox.root}\n"
        f"  exited {result.returncode}, the docs expect {cmd.expect_exit} "
        "(mark another expectation with <!-- docs-test: exit N --> before the block)\n"
        f"--- stdout ---\n{result.stdout[-4000:]}\n--- stderr ---\n{result.stderr[-4000:]}"
    )
    if cmd.subcommand == "stop" and cmd.expect_exit == 0:
        code = sandbox.wait_exit(30)
        assert code == 0, f"{cmd.where}: the daemon did not exit 0 after `{line}` ({code})"


def test_config_reference_is_generated_from_the_schema() -> None:
    import runpy

    render = runpy.run_path(str(ROOT / "scripts" / "config_reference.py"))["render"]
    page = ROOT / "docs" / "config.md"
    assert page.read_text() == render(), (
        "docs/config.md is stale: regenerate it with "
        "`python scripts/config_reference.py > docs/config.md`"
    )


_LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(page: Path) -> set[str]:
    """Return the anchors GitHub derives from a page's headings (outside code blocks)."""
    out: set[str] = set()
    in_block = False
    for line in page.read_text().splitlines():
        if _FENCE.match(line):
            in_block = not in_block
        elif not in_block and line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return out


@pytest.mark.parametrize(
    "page",
    [*DOC_FILES, ROOT / "plugin_examples" / "README.md"],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for number, line in enumerate(page.read_text().splitlines(), start=1):
        for target in _LINK.findall(line):
            if re.match(r"^[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path) if path else page
            if not dest.exists():
                broken.append(f"{page.relative_to(ROOT)}:{number}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{page.relative_to(ROOT)}:{number}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_files_that_point_into_docs_point_at_pages_that_exist() -> None:
    pointers = [ROOT / "systemd" / "lmcached.service", ROOT / "plugin_examples" / "README.md"]
    missing = [
        f"{f.relative_to(ROOT)}: {name}"
        for f in pointers
        for name in re.findall(r"\bdocs/[\w.-]+\.md\b", f.read_text())
        if not (ROOT / name).exists()
    ]
    assert not missing, missing


def test_every_skipped_block_tells_the_reader_it_is_not_run():
    # The marker is an HTML comment, invisible once rendered: the line above it says it aloud.
    missing = []
    for path in DOC_FILES:
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            marker = _MARKER.match(line)
            if marker and marker.group(1).startswith("skip"):
                above = lines[i - 1].strip() if i else ""
                if not above.startswith("*Not run by the test suite"):
                    missing.append(f"{path.relative_to(ROOT)}:{i + 1}")
    assert not missing, (
        "put a visible '*Not run by the test suite (why).*' line above these skip markers: "
        + ", ".join(missing)
    )
