"""Silo 1 spans two "nodes" (network namespaces) launched by real pdsh; the result is unchanged."""
from __future__ import annotations

import json

import pytest

from octopusd import codec
from octopusd.testing import Federation, free_port

from ..integration.test_federation import reference_fedavg
from .netns import TwoNodes, can_make_namespaces

pytestmark = [pytest.mark.multinode, pytest.mark.skipif(can_make_namespaces() is not None,
                                                        reason=can_make_namespaces() or "")]


@pytest.mark.timeout(300)
def test_two_node_silo_matches_single_node(tmp_path, mosquitto, moto_s3):
    """One trainer per namespace, rendezvous over the veth pair, pdsh -R exec + ip netns exec: the
    run completes, the trainers ran in different namespaces with their own addresses, nothing is
    left running in either namespace, and the final model equals the single-node run (≤ 1e-5)."""
    nodes = TwoNodes().create()
    silo1 = {"n_node_in_silo": 2, "n_proc_per_node": 1, "node_addresses": list(nodes.addresses),
             "pdsh_hosts": list(nodes.names), "master_address": nodes.addresses[0],
             "launcher_rdzv_port": free_port(), "network_interface": TwoNodes.IFNAME,
             "launcher": "pdsh", "pdsh_rcmd": "exec", "node_command_prefix": "ip netns exec %h"}
    fed = Federation(tmp_path, mosquitto.port, moto_s3.endpoint_url, rounds=2, silo_procs=(2, 1),
                     silo_overrides={1: silo1})
    try:
        fed.start_all()
        codes = fed.wait_all(timeout_s=240)
        assert codes == {"server": 0, "silo1": 0, "silo2": 0}, {n: fed.log_text(n)[-3000:] for n in codes}
        # pdsh prefixes each remote line with "<host>: ".
        started = [json.loads(line[line.index("{"):]) for line in fed.log_text("silo1").splitlines()
                   if '"trainer_started"' in line]
        assert sorted(s["trainer_rank"] for s in started) == [0, 1]
        by_rank = {s["trainer_rank"]: s for s in started}
        assert by_rank[0]["local_ip"] == nodes.addresses[0]
        assert by_rank[1]["local_ip"] == nodes.addresses[1]
        assert by_rank[0]["netns"] != by_rank[1]["netns"]
        assert nodes.pids() == [] and fed.stray_pids() == []
        final = codec.decode_state((fed.run_dir / "final_model.octt").read_bytes())
        expected = reference_fedavg(fed.config, {1: 2, 2: 1}, rounds=2)
        diff = max(float((final[k] - expected[k]).abs().max()) for k in final)
        assert diff <= 1e-5, diff
    finally:
        fed.stop()
        nodes.destroy()
