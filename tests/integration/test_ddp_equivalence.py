"""DDP equivalence: 2 trainers with batch b give the same update as 1 trainer with batch 2b."""
from __future__ import annotations

import textwrap

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from octopusd import codec
from octopusd.config import load_config
from octopusd.plugins import load_plugins
from octopusd.testing import Federation
from octopusd.trainer.worker import make_optimizer

pytestmark = pytest.mark.integration

SAME_DATA_PLUGIN = textwrap.dedent('''
    """Test dataset: every silo gets the same 64 samples, so silo updates are comparable."""
    import torch
    from torch.utils.data import TensorDataset
    from octopusd.hookspecs import hookimpl

    class Same64:
        output_dim, input_shape, source = 10, (1, 28, 28), "64 synthetic samples, same for every silo"

        def __init__(self, config):
            g = torch.Generator().manual_seed(7)
            self.x = torch.randn(64, 1, 28, 28, generator=g)
            self.y = torch.randint(0, 10, (64,), generator=g)

        def train_partition(self, silo_rank):
            return TensorDataset(self.x, self.y)

        def test_set(self):
            return TensorDataset(self.x[:16], self.y[:16])

    @hookimpl
    def octopus_register_datasets(register):
        register.add("same64", Same64)
''')

TOLERANCE = 1e-6  # float32 sums in a different order: gloo all-reduce vs one batch


@pytest.mark.timeout(300)
def test_two_trainers_batch_b_equal_one_trainer_batch_2b(tmp_path, mosquitto, moto_s3):
    """Silo 1 (2 DDP trainers, batch 4) and silo 2 (1 trainer, batch 8) train on the same data; the
    FedAvg of their updates equals one trainer's batch-8 update computed in-process."""
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "same64.py").write_text(SAME_DATA_PLUGIN)
    fed = Federation(tmp_path / "run", mosquitto.port, moto_s3.endpoint_url, rounds=1, silo_procs=(2, 1),
                     plugin_dirs=(str(plugins),),
                     overrides={"data_args": {"dataset": "same64"},
                                "train_args": {"learning_rate": 0.05, "weight_decay": 0.0}},
                     silo_sections={1: {"train_args": {"batch_size": 4}}, 2: {"train_args": {"batch_size": 8}}})
    try:
        fed.start_all()
        codes = fed.wait_all(timeout_s=240)
        assert codes == {"server": 0, "silo1": 0, "silo2": 0}, {n: fed.log_text(n)[-3000:] for n in codes}
        final = codec.decode_state((fed.run_dir / "final_model.octt").read_bytes())
    finally:
        fed.stop()

    cfg = load_config(fed.config, 2)
    pm = load_plugins(cfg.plugin_dirs)
    data = pm.dataset("same64")(cfg)
    torch.manual_seed(cfg.common.random_seed)
    model = pm.model(cfg.model.model)(cfg, data.output_dim)
    sampler = DistributedSampler(data.train_partition(2), num_replicas=1, rank=0, shuffle=True,
                                 seed=cfg.common.random_seed)
    sampler.set_epoch(0)
    opt = make_optimizer(cfg, model.parameters())
    for x, y in DataLoader(data.train_partition(2), batch_size=8, sampler=sampler):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    diff = max(float((final[k] - v).abs().max()) for k, v in model.state_dict().items())
    assert diff <= TOLERANCE, diff
