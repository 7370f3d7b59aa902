"""Processes: one per device under torchrun (or plain RANK/WORLD_SIZE/MASTER_ADDR env vars).

    rank, world, device = setup_distributed(args)     # NCCL on CUDA, gloo on CPU
    all_reduce(t, world)                               # in place; a no-op in one process
"""
import os

import torch
import torch.distributed as dist


def setup_distributed(args):
    """(rank, world, device). torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; NCCL on CUDA, else gloo."""
    want_cuda = args.device.startswith("cuda") or (args.device == "auto"
                                                    and torch.cuda.is_available())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if want_cuda:  # cuda:N names the device of a one-process run; torchrun: the local rank
        index = int(args.device.split(":")[1]) if ":" in args.device else local
        torch.cuda.set_device(index)
        device = torch.device("cuda", index)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        rendezvous(rank, world, args.dist_timeout, "nccl" if want_cuda else "gloo")
    return rank, world, device


def rendezvous(rank, world, timeout_s, backend):
    """init_process_group through a store on which every rank checks in, so that a rank whose
    peers never start stops after --dist-timeout naming them, instead of waiting forever.
    Under torchrun the agent hosts the store (every rank is a client); else rank 0 does."""
    import datetime
    addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = int(os.environ.get("MASTER_PORT", "29500"))
    timeout = datetime.timedelta(seconds=timeout_s)
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    try:
        store = dist.TCPStore(addr, port, world, is_master=rank == 0 and not agent,
                              timeout=timeout, wait_for_workers=False)
    except Exception as e:
        raise RuntimeError(f"rank {rank}: could not reach rank 0's store at {addr}:{port} within "
                           f"{timeout_s:g} s (--dist-timeout): rank 0 never started or is "
                           f"unreachable ({type(e).__name__})") from None
    store = dist.PrefixStore(f"tkd{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    keys = [f"joined/{r}" for r in range(world)]
    store.set(keys[rank], "1")
    try:
        store.wait(keys, timeout)
    except Exception:
        missing = [r for r in range(world) if not store.check([keys[r]])]
        raise RuntimeError(f"rank {rank}: rank(s) {missing} of WORLD_SIZE={world} did not start "
                           f"within {timeout_s:g} s (--dist-timeout); start every rank with the "
                           f"same MASTER_ADDR:MASTER_PORT ({addr}:{port})") from None
    dist.init_process_group(backend, store=dist.PrefixStore("pg", store), rank=rank,
                            world_size=world, timeout=timeout)


def all_reduce(t, world):
    if world > 1:
        dist.all_reduce(t)
    return t
