"""launch/cli.py: a rank that failed only because a peer died exits quietly, on gloo and on NCCL alike."""

from __future__ import annotations

import pytest

from launch.cli import is_peer_failure


@pytest.mark.parametrize(
    "message",
    [
        "[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:4321",
        "NCCL communicator was aborted on rank 3.",
        "NCCL error in: ProcessGroupNCCL.cpp:1970, remote process exited or there was a network error, "
        "NCCL version 2.27.3\nncclRemoteError: A call failed possibly due to a network error",
        "[Rank 1] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=12, OpType=ALLREDUCE)",
    ],
)
def test_a_peers_death_is_recognised_on_gloo_and_nccl(message: str):
    assert is_peer_failure(RuntimeError(message))


def test_a_rank_s_own_error_is_not_a_peers_death():
    assert not is_peer_failure(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not is_peer_failure(ValueError("Connection closed by peer"))  # only collectives raise these
