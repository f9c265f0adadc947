"""legoc.runtime.cluster: a tiled block run on 2 loopback TVM RPC servers (each pinned to its own
core with taskset when installed, started and stopped by these tests) equals the whole block,
reached directly or as devices of a TVM RPC tracker (started here too); a worker killed mid-run
or hanging gives one clear error and never a partial output."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
import torch.nn as nn

from legoc.errors import UserError
from legoc.passes.tiling import compile_tiles, tile_plan
from legoc.runtime.cluster import Cluster, LocalTracker, LocalWorkers, parse_workers
from legoc.targets.table import TARGETS


@pytest.fixture(scope="module")
def block(tmp_path_factory):
    """A small block (conv-BN-ReLU, max pool, conv-ReLU) at 3x24x20, tiled 1:2 for two workers,
    its tiles compiled for the host: (torch block, input, tile modules)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
                          nn.Conv2d(8, 8, 3, padding=2, dilation=2), nn.ReLU()).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.2, 0.2)
        model[1].running_var.uniform_(0.5, 1.5)
    gm = torch.fx.symbolic_trace(model)
    x = torch.randn(1, 3, 24, 20)
    plan = tile_plan(gm, x, (1, 2))
    tiles = compile_tiles(plan, x, TARGETS["host"], tmp_path_factory.mktemp("tiles"))
    with torch.no_grad():
        ref = gm(x).numpy()
    return ref, x.numpy(), tiles


@pytest.fixture
def workers(tmp_path):
    with LocalWorkers(2, log_dir=tmp_path) as w:
        yield w


def test_cluster_equals_the_whole_block(block, workers):
    ref, x, tiles = block
    # the master's thread for each worker on that worker's core (workers on this machine)
    with Cluster(workers.addresses, tiles, timeout=60, cores=workers.worker_cores) as cluster:
        for _ in range(2):  # modules and weights were uploaded once, at connect
            out = cluster(x)
            assert out.shape == ref.shape and np.abs(out - ref).max() <= 1e-4
        # each worker got its rows (halo included) and sent back its band
        assert cluster.stats.sent == [x[:, :, slice(*t.rows_in)].nbytes for t in tiles]
        assert sum(cluster.stats.received) == ref.nbytes
        assert tiles[0].rows_in[1] > tiles[1].rows_in[0]  # the bands overlap: a real halo


def test_worker_killed_mid_run_is_one_clear_error_and_no_partial_output(block, workers):
    ref, x, tiles = block
    cluster = Cluster(workers.addresses, tiles, timeout=60)
    try:
        killer = threading.Timer(0.5, workers.kill, args=(1,))
        killer.start()
        outputs, deadline = [], time.monotonic() + 60
        with pytest.raises(UserError) as err:
            while time.monotonic() < deadline:
                outputs.append(cluster(x))
        killer.join()
        msg = str(err.value)
        assert "\n" not in msg
        assert msg.startswith(f"cluster worker {workers.addresses[1]} (rows {tiles[1].rows_out[0]}-{tiles[1].rows_out[1]}) ")
        assert "no output was produced" in msg
        assert outputs and all(np.abs(o - ref).max() <= 1e-4 for o in outputs)  # every answer whole
        # later calls: the same worker is named at once; a fallback, when given, answers instead
        with pytest.raises(UserError, match=f"cluster worker {workers.addresses[1]} was lost"):
            cluster(x)
        out = cluster(x, fallback=lambda a: ref.copy())
        assert cluster.stats.fallback and np.array_equal(out, ref)
    finally:
        cluster.close()


def test_hanging_worker_times_out(block, workers):
    ref, x, tiles = block
    cluster = Cluster(workers.addresses, tiles, timeout=2)
    try:
        workers.pause(0)
        t0 = time.monotonic()
        with pytest.raises(UserError, match=rf"^cluster worker {workers.addresses[0]} \(rows 0-\d+\) while running "
                                            r"its tile: did not answer within 2 s; no output was produced"):
            cluster(x)
        assert time.monotonic() - t0 < 10
    finally:
        workers.resume(0)
        cluster.close()


def test_bad_addresses_and_unreachable_worker(block):
    _, _, tiles = block
    with pytest.raises(UserError, match="HOST:PORT of a TVM RPC server"):
        parse_workers("127.0.0.1")
    with pytest.raises(UserError, match="2 cluster workers for 1 tiles"):
        Cluster("127.0.0.1:9,127.0.0.1:10", tiles[:1])
    with pytest.raises(UserError, match=r"^cannot reach cluster worker 127\.0\.0\.1:9: connection refused"):
        Cluster(["127.0.0.1:9", "127.0.0.1:10"], tiles, connect_timeout=2)


def test_workers_from_a_tracker_by_device_key(block, tmp_path):
    """Two servers registered with a tracker under one key: the cluster requests two sessions by
    that key, and the tiled block equals the whole; asking for more devices than are free, or
    for a key nobody registered, is one clear error; so is a tracker that is not there."""
    ref, x, tiles = block
    key = "legoc-test-cpu"
    with LocalTracker(log_dir=tmp_path) as tracker, LocalWorkers(2, log_dir=tmp_path, tracker=tracker, key=key):
        with Cluster(2, tiles, tracker=tracker.address, device_key=key, timeout=60) as cluster:
            assert np.abs(cluster(x) - ref).max() <= 1e-4
            assert [w.address for w in cluster.workers] == [
                f"'{key}' device {i} of tracker {tracker.address}" for i in (1, 2)]
            # both devices are held by this cluster: a third request waits, then says why
            with pytest.raises(UserError, match=rf"^no free device with key '{key}' at the RPC tracker "
                                                rf"{tracker.address} within 2 s \(another session may hold it"):
                Cluster(1, tiles[:1], tracker=tracker.address, device_key=key, connect_timeout=2)
        # the sessions were released on close: the devices are free again
        deadline = time.monotonic() + 20
        while tracker.free(key) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert tracker.free(key) == 2
        with pytest.raises(UserError, match=r"^no free device with key 'jetson' .* within 1 s"):
            Cluster(1, tiles[:1], tracker=tracker.address, device_key="jetson", connect_timeout=1)
        dead = tracker.address.rsplit(":", 1)[0] + ":9"
        with pytest.raises(UserError, match=rf"^cannot reach the RPC tracker at {dead}: connection refused; start one"):
            Cluster(2, tiles, tracker=dead, device_key=key)
    with pytest.raises(UserError, match="needs the device key"):
        Cluster(2, tiles, tracker="127.0.0.1:9190")
    with pytest.raises(UserError, match="takes the number of workers to request"):
        Cluster("127.0.0.1:9090", tiles, tracker="127.0.0.1:9190", device_key=key)
