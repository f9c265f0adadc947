"""The device farm over TVM RPC, on loopback: a tracker and an x86 RPC server started here, and an
aarch64 RPC server running under qemu-aarch64 as a stand-in board (its timings are emulated:
these tests check the plumbing, not the numbers). Every process is started by the test on free
ports and stopped by its id afterwards."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from legoc.cli import main
from legoc.errors import UserError

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def started(cmd: list[str], log: Path, env: dict | None = None):
    """A subprocess in its own process group, stopped (the group, by its id) on exit."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, stdin=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue


def wait_for_key(port: int, key: str, proc, log: Path, timeout: float = 120) -> None:
    from legoc.targets.rpc import RpcConfig, check_device

    deadline = time.monotonic() + timeout
    while True:
        try:
            queue = check_device(RpcConfig(HOST, port, key, timeout=5))
            if queue.get("free", 0) > 0:
                return
        except UserError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"RPC server '{key}' did not register: {log.read_text()[-2000:]}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def tracker(tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("rpc") / "tracker.log"
    cmd = [sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", HOST, "--port", str(port),
           "--port-end", str(port + 1), "--silent"]
    with started(cmd, log) as proc:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError):
                socket.create_connection((HOST, port), timeout=1).close()
                break
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        yield port


@pytest.fixture(scope="module")
def x86_server(tracker, tmp_path_factory):
    key = "x86-loopback"
    port = free_port()
    log = tmp_path_factory.mktemp("rpc") / "server-x86.log"
    cmd = [sys.executable, "-m", "tvm.exec.rpc_server", "--tracker", f"{HOST}:{tracker}",
           "--key", key, "--host", HOST, "--port", str(port), "--port-end", str(port + 1)]
    with started(cmd, log) as proc:
        wait_for_key(tracker, key, proc, log)
        yield key


@pytest.fixture(scope="module")
def aarch64_server(tracker, tmp_path_factory):
    """TVM's RPC server in the emulated aarch64 Python: legoc's stand-in board."""
    from legoc.targets import emulation

    if os.environ.get("LEGOC_SKIP_EMULATION") == "1" and not os.environ.get("CI"):
        pytest.skip("LEGOC_SKIP_EMULATION=1 (never honoured in CI)")
    emu = emulation.setup(log=print)
    key = "aarch64-qemu"
    port = free_port()
    log = tmp_path_factory.mktemp("rpc") / "server-aarch64.log"
    cmd = emu.command("-m", "tvm.exec.rpc_server", "--tracker", f"{HOST}:{tracker}", "--key", key,
                      "--host", HOST, "--port", str(port), "--port-end", str(port + 1))
    with started(cmd, log, env=emu.env()) as proc:
        wait_for_key(tracker, key, proc, log, timeout=300)
        yield key


def copy_of(report, tmp_path: Path) -> Path:
    dst = tmp_path / report.artifact.name
    shutil.copytree(report.artifact, dst)
    return dst


def manifest_of(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def latencies(manifest: dict) -> list[dict]:
    return [v["profile"]["latency_ms"] for s in manifest["segments"] for v in s["variants"]]


def digest(path: Path) -> str:
    return hashlib.sha256((path / "manifest.json").read_bytes()).hexdigest()


def test_profile_x86_over_rpc(artifact, tracker, x86_server, tmp_path, capsys):
    from legoc.runtime import load

    art = copy_of(artifact("vgg_chain"), tmp_path)
    before = manifest_of(art)
    assert {lat["source"] for lat in latencies(before)} == {"measured-local"}
    assert main(["profile", str(art), "--rpc", f"{HOST}:{tracker}", "--device-key", x86_server,
                 "--rpc-number", "3", "--rpc-repeat", "2"]) == 0
    out = capsys.readouterr().out
    after = manifest_of(art)
    lats = latencies(after)
    assert f"measured {len(lats)} modules" in out and "measured-rpc" in out
    assert all(lat["source"] == "measured-rpc" and lat["value"] > 0 for lat in lats)
    assert all(f"key '{x86_server}'" in lat["how"] and "median of 2 x 3" in lat["how"] for lat in lats)
    # only the latency figures changed
    for s0, s1 in zip(before["segments"], after["segments"]):
        for v0, v1 in zip(s0["variants"], s1["variants"]):
            assert v0["module"] == v1["module"] and v0["weights"] == v1["weights"]
            assert v0["profile"]["peak_activation_bytes"] == v1["profile"]["peak_activation_bytes"]
    assert not [p for p in art.iterdir() if p.name.startswith(".")]  # no temp left
    # the artifact still loads and runs (checksums intact)
    m = load(art).configure([1] * len(load(art).blocks))
    assert m(__import__("numpy").zeros((1, 3, 32, 32), "float32")).shape == (1, 10)

    # the session was released: a second profile gets the board at once
    t0 = time.monotonic()
    assert main(["profile", str(art), "--rpc", f"{HOST}:{tracker}", "--device-key", x86_server,
                 "--rpc-timeout", "20", "--rpc-number", "1", "--rpc-repeat", "1"]) == 0
    assert time.monotonic() - t0 < 60


def test_held_session_blocks_then_times_out(artifact, tracker, x86_server, tmp_path):
    from tvm import rpc

    from legoc.targets.rpc import RpcConfig, profile_artifact

    art = copy_of(artifact("vgg_chain"), tmp_path)
    before = digest(art)
    held = rpc.connect_tracker(HOST, tracker).request(x86_server)  # someone else's session
    try:
        with pytest.raises(UserError) as info:
            profile_artifact(art, RpcConfig(HOST, tracker, x86_server, timeout=3))
        assert str(info.value) == (
            f"no free device with key '{x86_server}' at the RPC tracker {HOST}:{tracker} within 3 s "
            "(another session may hold it, or its RPC server stopped; --rpc-timeout waits longer)")
        assert digest(art) == before  # nothing written
    finally:
        del held  # releases the session
        __import__("gc").collect()
    manifest = profile_artifact(art, RpcConfig(HOST, tracker, x86_server, timeout=30, number=1, repeat=1))
    assert {lat["source"] for lat in latencies(manifest)} == {"measured-rpc"}


def test_wrong_board_is_a_clear_error(artifact, tracker, x86_server, tmp_path, capsys):
    art = copy_of(artifact("vgg_chain", target="raspberry-pi-4"), tmp_path)
    before = digest(art)
    assert main(["profile", str(art), "--rpc", f"{HOST}:{tracker}", "--device-key", x86_server]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"legoc: error: the device behind key '{x86_server}' cannot load block0/r0.00 "
                          "(built for raspberry-pi-4: aarch64-linux-gnu, cpu): "), err
    assert "Failed to load dynamic shared library" in err
    assert digest(art) == before


def test_unreachable_tracker_and_unknown_key(artifact, tracker, x86_server, tmp_path, capsys):
    art = copy_of(artifact("vgg_chain"), tmp_path)
    before = digest(art)
    dead = free_port()
    capsys.readouterr()
    assert main(["profile", str(art), "--rpc", f"{HOST}:{dead}", "--device-key", "x"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"legoc: error: cannot reach the RPC tracker at {HOST}:{dead}: connection refused; start one "
        f"with `python -m tvm.exec.rpc_tracker --host {HOST} --port {dead}`")
    assert main(["profile", str(art), "--rpc", f"{HOST}:{tracker}", "--device-key", "jetson-7"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"legoc: error: no device with key 'jetson-7' is registered with the RPC "
                          f"tracker at {HOST}:{tracker} (keys: ") and x86_server in err
    assert main(["profile", str(art), "--rpc", "nohost", "--device-key", "x"]) == 2
    assert "--rpc takes HOST:PORT" in capsys.readouterr().err
    assert main(["compile", "examples/vgg_chain.py", "--device-key", "x", "-o", str(tmp_path / "n.lego")]) == 2
    assert "--device-key needs --rpc" in capsys.readouterr().err
    assert digest(art) == before and not (tmp_path / "n.lego").exists()


def test_compile_with_rpc(tracker, x86_server, tmp_path, capsys):
    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "vgg-rpc.lego"
    assert main(["compile", str(root / "examples" / "vgg_chain.py"), "--target", "host", "-o", str(out),
                 "--blocks", "2", "--ratios", "0,0.5", "--no-progress", "--rpc", f"{HOST}:{tracker}",
                 "--device-key", x86_server, "--rpc-number", "2", "--rpc-repeat", "1"]) == 0
    lats = latencies(manifest_of(out))
    assert len(lats) >= 4 and all(lat["source"] == "measured-rpc" and lat["value"] > 0 for lat in lats)

    # an unreachable farm fails before compiling, and writes nothing
    dead = free_port()
    out2 = tmp_path / "never.lego"
    t0 = time.monotonic()
    assert main(["compile", str(root / "examples" / "vgg_chain.py"), "-o", str(out2), "--no-progress",
                 "--rpc", f"{HOST}:{dead}", "--device-key", x86_server]) == 2
    assert time.monotonic() - t0 < 15
    assert "cannot reach the RPC tracker" in capsys.readouterr().err
    assert not out2.exists() and not list(tmp_path.glob(".never.lego*"))


def test_aarch64_board_under_qemu(artifact, tracker, aarch64_server, tmp_path):
    """The stand-in board: a raspberry-pi-4 artifact measured by an aarch64 TVM RPC server
    under qemu (emulated timings: this checks that the path works end to end)."""
    from legoc.targets.rpc import RpcConfig, profile_artifact

    art = copy_of(artifact("vgg_chain", target="raspberry-pi-4"), tmp_path)
    # before: the compile estimated the pi's latencies from MACs and its calibration row
    assert {lat["source"] for lat in latencies(manifest_of(art))} == {"estimated"}
    manifest = profile_artifact(art, RpcConfig(HOST, tracker, aarch64_server, timeout=120, number=1, repeat=1),
                                log=print)
    lats = latencies(manifest)
    assert all(lat["source"] == "measured-rpc" and lat["value"] > 0 for lat in lats)
    assert manifest_of(art) == manifest


@pytest.mark.parametrize("when", ["measuring", "before the session"])
def test_rpc_server_killed_mid_profile_is_one_line_and_changes_nothing(artifact, tracker, tmp_path, when):
    """The board's RPC server dies (SIGKILL) while `legoc profile` measures (after the first
    module was timed), or between registering and serving the session: one line, exit 2, the
    artifact byte for byte as it was, no temporary file left."""
    art = copy_of(artifact("vgg_chain"), tmp_path)
    before = {p.name: p.read_bytes() for p in art.iterdir() if p.is_file()}
    key = "x86-doomed"
    port = free_port()
    log = tmp_path / "server.log"
    cmd = [sys.executable, "-m", "tvm.exec.rpc_server", "--tracker", f"{HOST}:{tracker}",
           "--key", key, "--host", HOST, "--port", str(port), "--port-end", str(port + 1)]
    with started(cmd, log) as server:
        wait_for_key(tracker, key, server, log)
        if when == "before the session":
            os.killpg(server.pid, signal.SIGKILL)   # the tracker still lists the key for a moment
            server.wait(10)
        # slow timings (200 x 5 runs per module) so that the kill lands in the middle
        profile = subprocess.Popen(
            [sys.executable, "-m", "legoc", "profile", str(art), "--rpc", f"{HOST}:{tracker}", "--device-key", key,
             "--rpc-number", "200", "--rpc-repeat", "5", "--rpc-timeout", "20" if when == "measuring" else "5"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            lines = []
            if when == "measuring":
                for line in profile.stderr:      # "  block0/r0.00: 0.123 ms" once a module is timed
                    lines.append(line)
                    if " ms" in line:
                        os.killpg(server.pid, signal.SIGKILL)
                        break
                assert server.wait(10) is not None, "".join(lines)
            out, err = profile.communicate(timeout=120)
        finally:
            if profile.poll() is None:
                os.killpg(profile.pid, signal.SIGKILL)
                profile.wait()
    err = "".join(lines) + err
    errors = [ln for ln in err.splitlines() if ln.startswith("legoc: ")]
    assert profile.returncode == 2, err
    assert len(errors) == 1 and "Traceback" not in err, err
    assert f"'{key}'" in errors[0], errors[0]
    print(f"{when}: {errors[0]}")
    if when == "measuring":   # what happened, what it means for the artifact, what to do
        assert errors[0].startswith(f"legoc: error: lost the RPC session to the device behind key '{key}' "
                                    f"(tracker {HOST}:{tracker}) while measuring "), errors[0]
        assert errors[0].endswith("the manifest was not changed; run `legoc profile` again once the board's "
                                  "RPC server is back"), errors[0]
    assert {p.name: p.read_bytes() for p in art.iterdir() if p.is_file()} == before
    assert not [p for p in art.rglob("*") if p.name.startswith(".")]
