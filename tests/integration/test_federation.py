"""A whole federation over real Mosquitto and moto_server: server + 2 silos (2 + 1 trainers)."""
from __future__ import annotations

import json

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from octopusd import codec
from octopusd.aggregate import weighted_average
from octopusd.config import load_config
from octopusd.plugins import load_plugins
from octopusd.testing import Federation
from octopusd.trainer.worker import make_optimizer

pytestmark = pytest.mark.integration


def reference_fedavg(cfg_path, silo_world_sizes: dict[int, int], rounds: int) -> dict[str, torch.Tensor]:
    """In-process FedAvg of DDP training: per step, the mean of each rank's gradient."""
    server_cfg = load_config(cfg_path, 0)
    pm = load_plugins()
    data = pm.dataset(server_cfg.data.dataset)(server_cfg)
    torch.manual_seed(server_cfg.common.random_seed)
    global_model = pm.model(server_cfg.model.model)(server_cfg, data.output_dim)
    state = {k: v.clone() for k, v in global_model.state_dict().items()}
    if rounds == 0:
        return state
    loss_fn = torch.nn.CrossEntropyLoss()
    for r in range(rounds):
        updates = []
        for silo, world in silo_world_sizes.items():
            cfg = load_config(cfg_path, silo)
            part = data.train_partition(silo)
            torch.manual_seed(cfg.common.random_seed)
            model = pm.model(cfg.model.model)(cfg, data.output_dim)
            model.load_state_dict(state)
            opt = make_optimizer(cfg, model.parameters())
            samplers = [DistributedSampler(part, num_replicas=world, rank=k, shuffle=True,
                                           seed=cfg.common.random_seed) for k in range(world)]
            for epoch in range(cfg.train.epochs):
                for s in samplers:
                    s.set_epoch(r * cfg.train.epochs + epoch)
                loaders = [DataLoader(part, batch_size=cfg.train.batch_size, sampler=s) for s in samplers]
                for batches in zip(*loaders):
                    opt.zero_grad()
                    grads = None
                    for x, y in batches:
                        model.zero_grad()
                        loss_fn(model(x), y).backward()
                        g = [p.grad.clone() for p in model.parameters()]
                        grads = g if grads is None else [a + b for a, b in zip(grads, g)]
                    for p, g in zip(model.parameters(), grads):
                        p.grad = g / world
                    opt.step()
            updates.append(({k: v.detach().clone() for k, v in model.state_dict().items()}, len(part)))
        state = weighted_average(updates)
    return state


@pytest.mark.parametrize("transport", ["inline", "s3-and-shared-memory"])
def test_three_rounds_complete_and_match_reference(tmp_path, mosquitto, moto_s3, transport):
    """Three rounds finish, every process exits 0 and leaves nothing behind, metrics are written,
    and the final global model equals an in-process FedAvg of the same DDP training (≤ 1e-5).
    Both ways a model travels: inline in MQTT and over the socket to rank 0 (small models), and
    through S3 and, between silo master and rank 0, by shared memory (large ones: forced here)."""
    shared = transport != "inline"
    fed = Federation(tmp_path, mosquitto.port, moto_s3.endpoint_url, rounds=3, silo_procs=(2, 1),
                     overrides={"comm_args": {"inline_payload_max_bytes": 0}} if shared else {})
    try:
        fed.start_all(env={"OCTOPUSD_SHM_MIN_BYTES": "1"} if shared else None)
        codes = fed.wait_all(timeout_s=240)
        assert codes == {"server": 0, "silo1": 0, "silo2": 0}, {n: fed.log_text(n)[-3000:] for n in codes}
        assert fed.stray_pids() == []
        lines = [json.loads(x) for x in (fed.run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [m["round"] for m in lines] == [0, 1, 2]
        for m in lines:
            assert {"round", "test_acc", "test_loss", "silos", "round_seconds"} <= set(m)
            assert m["silos"] == [1, 2]
            assert 0.0 <= m["test_acc"] <= 1.0
        final = codec.decode_state((fed.run_dir / "final_model.octt").read_bytes())
        expected = reference_fedavg(fed.config, {1: 2, 2: 1}, rounds=3)
        assert final.keys() == expected.keys()
        diff = max(float((final[k] - expected[k]).abs().max()) for k in final)
        assert diff <= 1e-5, diff
        # ...and training really moved the model away from its seeded start.
        expected_start = reference_fedavg(fed.config, {1: 2, 2: 1}, rounds=0)
        moved = max(float((final[k] - expected_start[k]).abs().max()) for k in final)
        assert moved > 1e-3, moved
        # The two-trainer silo really ran DDP with two ranks.
        assert '"trainer_rank": 1' in fed.log_text("silo1")
        assert '"trainer_rank": 1' not in fed.log_text("silo2")
        for silo in ("silo1", "silo2"):
            # Trainers end cleanly: no abort at teardown that torchrun would report as a failure.
            assert "SIGABRT" not in fed.log_text(silo) and "terminate called" not in fed.log_text(silo)
            done = [json.loads(x) for x in fed.log_text(silo).splitlines() if '"trainer_round_done"' in x]
            assert [d["model_via"] for d in done] == ["shared memory" if shared else "socket"] * 3
    finally:
        fed.stop()
