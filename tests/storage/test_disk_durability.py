"""Resharding's renames are durable: both folders are synced after the moves, before the marker.

A rename is on disk only once the folders on both sides are fsynced. Without that, a power loss
after resharding can leave a moved block in neither shard, or the shard marker (which says "the
moves are done") ahead of the moves. The store runs for real in a child process under strace,
which records the order of its renames and fsyncs.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest

from lmcached.storage.disk import SHARD_MARKER

pytestmark = pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")

RESHARD = textwrap.dedent(
    """
    import sys
    from lmcached.storage.base import Block
    from lmcached.storage.disk import DiskBackend

    root, phase = sys.argv[1], sys.argv[2]
    owner = lambda n: (lambda key: int.from_bytes(key[-1:], "little") % n)
    n = 2 if phase == "fill" else 3
    stores = [DiskBackend(root, w, 10 << 20, owner=owner(n), num_workers=n) for w in range(n)]
    if phase == "fill":
        for i in range(12):
            key = f"key-{i}".encode()
            stores[owner(2)(key)].put(key, Block.from_bytes(bytes([i]) * 4096, {"i": i}))
    for s in stores:
        s.close()
    """
)

CALL = re.compile(r"^(?:\[pid\s+\d+\]\s+|\d+\s+)?(\w+)\((.*)\)\s+=\s+(-?\d+)")


def _run(root: str, phase: str, trace: str | None = None) -> None:
    cmd = [sys.executable, "-c", RESHARD, root, phase]
    if trace is not None:
        cmd = [
            "strace",
            "-f",
            "-y",
            "-qq",
            "-o",
            trace,
            "-e",
            "trace=rename,renameat,renameat2,fsync,fdatasync",
            *cmd,
        ]
    subprocess.run(cmd, check=True, timeout=120, env={**os.environ, "PYTHONHASHSEED": "0"})


def test_resharding_fsyncs_both_folders_after_its_renames_and_before_the_marker(tmp_path) -> None:
    root = str(tmp_path / "disk")
    _run(root, "fill")
    trace = str(tmp_path / "strace.txt")
    _run(root, "reshard", trace)

    calls = []
    with open(trace) as f:
        for line in f:
            m = CALL.match(line.strip())
            if m and m.group(3) == "0":
                calls.append((m.group(1), m.group(2)))
    # Each block rename moves a file from one shard folder into another: (position, src, dst).
    moves = []
    for i, (name, args) in enumerate(calls):
        paths = re.findall(r'"([^"]+)"', args)
        if name.startswith("rename") and len(paths) == 2 and paths[1].endswith(".blk"):
            src, dst = (os.path.dirname(p) for p in paths)
            if src != dst:
                moves.append((i, src, dst))
    assert moves, f"resharding moved nothing: {calls}"
    synced = [
        (i, m.group(1))
        for i, (name, args) in enumerate(calls)
        if name in ("fsync", "fdatasync") and (m := re.search(r"<([^>]+)>", args))
    ]
    for pos, src, dst in moves:
        for folder in (src, dst):
            after = [i for i, path in synced if i > pos and path == folder]
            assert after, f"no fsync of {folder} after moving a block out of/into it"
    # Each destination's marker (written through a temp file and a rename) follows those fsyncs.
    for pos, src, dst in moves:
        marker = [
            i
            for i, (name, args) in enumerate(calls)
            if name.startswith("rename")
            and i > pos
            and re.findall(r'"([^"]+)"', args)[-1] == os.path.join(dst, SHARD_MARKER)
        ]
        assert marker, f"no shard marker written in {dst} after the moves"
        for folder in (src, dst):
            assert any(pos < i < marker[0] for i, path in synced if path == folder), (
                f"{folder} not fsynced between a move and its marker"
            )
