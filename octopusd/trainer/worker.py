"""A trainer process: one rank of a silo's DistributedDataParallel group, started by torchrun.

The group stays up across rounds. Rank 0 talks to the silo master over the local channel; every
round it receives the global model, broadcasts it to the other ranks, all ranks train their
disjoint shard of the silo's partition (DistributedSampler, ``set_epoch`` per epoch), and rank 0
returns the trained model and the silo's sample count.

Run as ``python -m octopusd.trainer.worker --cf CONFIG --rank N --run-id ID --socket PATH``
under torchrun (which sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import os
import signal
import socket
import sys
import time
from typing import Any

import structlog
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler

from octopusd import codec
from octopusd.config import Config, load_config
from octopusd.errors import CodecError, OctopusError
from octopusd.logs import configure_logging
from octopusd.plugins import load_plugins
from octopusd.trainer import channel
from octopusd.trainer.devices import trainer_device

OP_TRAIN, OP_STOP = 1, 2


def _die_with_parent() -> None:
    """Ask the kernel to kill us when our parent (torchrun's agent) dies: no orphans."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _local_ip() -> str:
    """The address this node uses towards the rendezvous master (shows which node we run on)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", "1"))))
            return str(s.getsockname()[0])
    except OSError:
        return ""


def _netns() -> str:
    try:
        return os.readlink("/proc/self/ns/net")
    except OSError:
        return ""


def make_optimizer(cfg: Config, params: Any) -> torch.optim.Optimizer:
    name = cfg.train.client_optimizer.lower()
    if name == "sgd":
        return torch.optim.SGD(params, lr=cfg.train.learning_rate, momentum=cfg.train.momentum,
                               weight_decay=cfg.train.weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=cfg.train.learning_rate, weight_decay=cfg.train.weight_decay)
    raise OctopusError(f"train_args.client_optimizer: unknown optimizer {name!r}; known: sgd, adam")


class Trainer:
    """State of one rank across rounds."""

    def __init__(self, cfg: Config, rank: int, world: int, device: torch.device, *,
                 dataset: Any = None, model: torch.nn.Module | None = None) -> None:
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        if dataset is None or model is None:
            pm = load_plugins(cfg.plugin_dirs)
            dataset = dataset if dataset is not None else pm.dataset(cfg.data.dataset)(cfg)
            if model is None:
                torch.manual_seed(cfg.common.random_seed)
                model = pm.model(cfg.model.model)(cfg, dataset.output_dim)
        # A federated dataset object gives this silo's partition; a plain Dataset *is* the partition.
        self.partition = dataset.train_partition(cfg.rank) if hasattr(dataset, "train_partition") else dataset
        self.model = model.to(device)
        self.layout = codec.layout(self.model.state_dict())
        # Gradients as views into DDP's all-reduce buckets: one model's worth less memory per rank.
        self.ddp = DDP(self.model, device_ids=[device.index] if device.type == "cuda" else None,
                       gradient_as_bucket_view=True)
        self.sampler = DistributedSampler(self.partition, num_replicas=world, rank=rank, shuffle=True,
                                          seed=cfg.common.random_seed, drop_last=False)
        self.loader = DataLoader(self.partition, batch_size=cfg.train.batch_size, sampler=self.sampler)

    def sync_from_rank0(self) -> None:
        if self.world == 1:
            return  # a group of one: nothing to send anybody
        for t in self.model.state_dict().values():
            dist.broadcast(t, src=0)

    def train_round(self, round_: int) -> tuple[float, int]:
        opt = make_optimizer(self.cfg, self.ddp.parameters())
        loss_fn = torch.nn.CrossEntropyLoss()
        self.ddp.train()
        total, count = 0.0, 0
        epochs = self.cfg.train.epochs
        for epoch in range(epochs):
            self.sampler.set_epoch(round_ * epochs + epoch)
            for x, y in self.loader:
                x, y = x.to(self.device), y.to(self.device)
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(self.ddp(x), y)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(y)
                count += len(y)
        stats = torch.tensor([total, float(count)], dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(stats)
        return float(stats[0] / max(stats[1], 1.0)), len(self.partition)


def _serve_rank0(trainer: Trainer, sock: socket.socket, log: Any) -> None:
    cmd = torch.zeros(2, dtype=torch.int64, device=trainer.device)
    shm = channel.SharedMemory()  # large models come and go by shared memory, reused each round
    while True:
        header, blob = channel.read_frame_sync(sock, shm)
        if header["op"] == "stop":
            cmd[0], cmd[1] = OP_STOP, -1
            if trainer.world > 1:
                dist.broadcast(cmd, src=0)
            return
        round_ = int(header.get("round", -1))
        via = "shared memory" if isinstance(blob, channel.SharedBlob) else "socket"
        try:
            # Views into the received buffer: load_state_dict below is the only copy.
            state = codec.decode_state(blob, expected=trainer.layout, check_finite=True, copy=False)
        except CodecError as exc:
            channel.send_frame_sync(sock, {"op": "error", "round": round_, "message": str(exc)})
            continue
        trainer.model.load_state_dict(state)
        del state, blob  # views of the received payload: free it before training, not after
        cmd[0], cmd[1] = OP_TRAIN, round_
        if trainer.world > 1:
            dist.broadcast(cmd, src=0)
        trainer.sync_from_rank0()
        t0 = time.perf_counter()
        loss, n = trainer.train_round(round_)
        seconds = time.perf_counter() - t0
        # Streamed encode: the socket reads the parameters' own memory, no payload is assembled.
        _, out = codec.encode_segments({k: v.detach().cpu() for k, v in trainer.model.state_dict().items()})
        channel.send_frame_sync(sock, {"op": "result", "round": round_, "num_samples": n,
                                       "train_loss": loss, "train_seconds": seconds}, out, shm)
        log.info("trainer_round_done", round=round_, train_loss=round(loss, 6), seconds=round(seconds, 3),
                 model_via=via)


def _serve_other(trainer: Trainer) -> None:
    cmd = torch.zeros(2, dtype=torch.int64, device=trainer.device)
    while True:
        dist.broadcast(cmd, src=0)
        if int(cmd[0]) == OP_STOP:
            return
        trainer.sync_from_rank0()
        trainer.train_round(int(cmd[1]))


SOCKET_ENV = "OCTOPUSD_TRAINER_SOCKET"


def is_trainer_process() -> bool:
    """True inside a trainer process that a silo master launched (user scripts check this)."""
    return bool(os.environ.get(SOCKET_ENV)) and "RANK" in os.environ


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="octopusd-trainer")
    p.add_argument("--cf", required=True)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--run-id", required=True)
    p.add_argument("--socket", required=True)
    a = p.parse_args(argv)
    configure_logging()
    exit_now(run_trainer(load_config(a.cf, a.rank, run_id=a.run_id), a.socket))
    return 0  # not reached


def exit_now(code: int) -> None:
    """End a trainer process at once, output flushed, without the interpreter's teardown.

    After the process group is destroyed, tearing down torch's C++ state at interpreter exit can
    abort ("terminate called without an active exception", SIGABRT) on a thread that gloo left
    behind, which torchrun then reports as a failed rank although every round went well.
    """
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def run_trainer(cfg: Config, socket_path: str, *, dataset: Any = None,
                model: torch.nn.Module | None = None) -> int:
    """Serve rounds as one rank of the silo's group until the silo master says stop."""
    _die_with_parent()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    log = structlog.get_logger("octopusd.trainer").bind(silo=cfg.rank, trainer_rank=rank)
    device = trainer_device(cfg, rank, world)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=cfg.dist.dist_timeout_s))
    log.info("trainer_started", world_size=world, backend=backend, device=str(device),
             host=socket.gethostname(), addr=os.environ.get("OCTOPUSD_NODE_ADDR", ""),
             local_ip=_local_ip(), netns=_netns(), pid=os.getpid())
    trainer = Trainer(cfg, rank, world, device, dataset=dataset, model=model)
    try:
        if rank == 0:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.connect(socket_path)
                channel.set_buffers(sock)
                channel.send_frame_sync(sock, {"op": "hello", "world_size": world,
                                               "num_samples": len(trainer.partition), "pid": os.getpid()})
                _serve_rank0(trainer, sock, log)
        else:
            _serve_other(trainer)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
