"""One writer per output folder: a second one is refused naming the first; a killed one leaves
nothing that blocks the next."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest
from conftest import write_image

from pipeline.data.lock import LOCK, FolderLock, LockedError


def test_a_second_writer_is_refused_naming_the_first(tmp_path):
    with FolderLock(tmp_path / "out"):
        with pytest.raises(LockedError, match=rf"out is being written by pid {os.getpid()} on {socket.gethostname()}"):
            with FolderLock(tmp_path / "out"):
                pass
    assert not (tmp_path / "out" / LOCK).exists()
    with FolderLock(tmp_path / "out"):  # free again
        pass


def test_a_killed_writer_leaves_no_stale_lock(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pipeline.data.lock import FolderLock\n"
                               f"with FolderLock({str(tmp_path)!r}):\n    print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(LockedError, match=f"pid {holder.pid} "):
        FolderLock(tmp_path).__enter__()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (tmp_path / LOCK).exists()  # the file stays, the lock does not
    with FolderLock(tmp_path):
        pass


def test_a_second_extraction_into_the_same_folder_is_refused(run_extract, tmp_path):
    write_image(tmp_path / "src" / "a" / "x.png")
    with FolderLock(tmp_path / "set"):  # a first extraction, still running
        with pytest.raises(LockedError, match=rf"set is being written by pid {os.getpid()}"):
            run_extract(tmp_path / "src", out=tmp_path / "set")
        assert not (tmp_path / "set" / "shards").exists()
    result, _ = run_extract(tmp_path / "src", out=tmp_path / "set")
    assert result.rows == 1 and not (tmp_path / "set" / LOCK).exists()


def test_a_forked_child_does_not_keep_the_lock_after_its_parent_is_killed(tmp_path):
    """Decoding workers are forked from the writer: the lock must go with the writer."""
    holder = subprocess.Popen([sys.executable, "-c", "import os, sys, time; from pipeline.data.lock import FolderLock\n"
                               f"with FolderLock({str(tmp_path)!r}):\n"
                               "    if os.fork() == 0:\n        time.sleep(60); os._exit(0)\n"
                               "    print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with FolderLock(tmp_path):  # the forked child still runs, the lock is free
        pass
