"""Telling a lost peer from other failures: what gloo, nccl and the c10d store raise in a process whose
group lost another process (it crashed, was killed, or its node went away)."""
from __future__ import annotations

import re

import torch.distributed as dist

__all__ = ["PEER_LOST", "lost_a_peer", "lost_peer_reason"]

#: Phrases of the errors gloo and nccl raise when another process of the group is gone.
PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "NCCL communicator was aborted")


def lost_a_peer(error: BaseException) -> bool:
    """Whether ``error`` is a collective or the process group's store losing another process: the network
    and store errors of torch.distributed, and the errors whose text says a peer closed its connection
    (gloo raises those as plain RuntimeErrors). Not other backend errors (mismatched collectives, CUDA
    errors): those are bugs to see whole. A peer that hangs, or whose machine loses power, closes no
    connection: the collective waits for the process group's timeout instead.

    Example:
        >>> lost_a_peer(RuntimeError("[pair.cc:561] Connection closed by peer [127.0.0.1]:16821. This is ..."))
        True
        >>> lost_a_peer(RuntimeError("DataLoader worker (pid 12) is killed by signal: Broken pipe."))
        False
    """
    if isinstance(error, (dist.DistNetworkError, dist.DistStoreError)):
        return True
    return isinstance(error, RuntimeError) and any(phrase in str(error) for phrase in PEER_LOST)


def lost_peer_reason(error: BaseException) -> str:
    """The error's first sentence, without the source location gloo puts in front.

    Example:
        >>> lost_peer_reason(RuntimeError("[/src/gloo/pair.cc:561] Connection closed by peer [127.0.0.1]:16821. This is "
        ...                               "typically caused by a remote worker crashing."))
        'Connection closed by peer [127.0.0.1]:16821'
    """
    text = " ".join(str(error).split())
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)
    first = re.split(r"\.(\s|$)", text, maxsplit=1)[0]
    return (first or type(error).__name__)[:200]
