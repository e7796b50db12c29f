"""The prefill deployment under Ray Serve: gang-scheduled stages across nodes, a request end
to end through deployment handles, and a prompt rejected before it enters any queue."""

from __future__ import annotations

import os

import pytest

from cluster.messages import Accepted, PrefillRequest
from deployments.prefill import PrefillConfig, build_prefill_app
from deployments.prefill_controller import PromptRejected
from engine import EngineConfig
from tests.prefill.test_ray_prefill import decode_shape
from tests.transport.peer import DecodePeer
from transport import KVPoll

os.environ.setdefault("GLOG_minloglevel", "1")


def test_serve_replica_places_stages_across_nodes_and_prefills(ray_cluster, llama_dir) -> None:
    from ray import serve

    config = PrefillConfig(
        engine=EngineConfig(
            model=str(llama_dir), dtype="float32", device="cpu", page_size=16, num_pages=128
        ),
        pp_size=2,
        placement_strategy="STRICT_SPREAD",  # head + two GPU nodes: one bundle each
        num_cpus_per_stage=0.5,
        max_prompt_len=64,
    )
    handle = serve.run(build_prefill_app(config), name="prefill-test", route_prefix=None)
    decode = DecodePeer(decode_shape(llama_dir))
    try:
        stats = handle.stats.remote().result(timeout_s=60)
        nodes = {p["node_id"] for p in stats["placement"]}
        assert len(nodes) == 2, stats["placement"]  # one stage per GPU node
        assert all(p["gpus"] for p in stats["placement"])  # each holds a (simulated) GPU
        # ... and sees every GPU of its node, so it can map a decode replica's KV there.
        assert all(p["all_gpus_visible"] for p in stats["placement"])

        info = decode.receive("s1", 11, [0, 1], num_stages=2)
        stream = handle.prefill.options(stream=True).remote(
            PrefillRequest("s1", 11, list(range(5, 25)), receiver_info=info)
        )
        assert isinstance(next(stream), Accepted)  # the replica took it
        (result,) = list(stream)
        assert result.first_token.num_prompt_tokens == 20
        for stage in range(2):
            decode.result("s1", stage, True)
        assert KVPoll(decode.poll("s1")[0]) is KVPoll.Success

        with pytest.raises(PromptRejected, match="65 tokens"):
            list(handle.prefill.options(stream=True).remote(PrefillRequest("long", 12, [1] * 65)))
        stats = handle.stats.remote().result(timeout_s=30)
        assert set(stats["queues"].values()) == {0} and stats["pages_in_use"] == 0
        assert all(s["num_requests"] == 0 for s in stats["stages"])
    finally:
        decode.stop()
        serve.delete("prefill-test")
        # serve.run started Serve with its default HTTP options: later Serve users (the e2e
        # fixture starts it on a port of its own) must find it stopped.
        serve.shutdown()
