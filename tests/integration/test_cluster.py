"""A replicated target on a real two-replica ClickHouse cluster with Keeper (needs a Docker engine).

Both replicas run clickhouse-server; the first also runs the embedded Keeper. The service
creates the target ON CLUSTER as ReplicatedMergeTree and loads it through replica 1; a chunk
retried through replica 2 (same token) must be dropped by the shard's Keeper-held block ids.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import clickhouse_connect
import pytest

from etl_service.run.pipeline import OK, run_job
from etl_service.settings.reading import load

from .conftest import _docker_reason

pytestmark = pytest.mark.docker

IMAGE = "clickhouse/clickhouse-server:25.8"
CONFIG = """<clickhouse>
  <macros><shard>1</shard><replica>{replica}</replica><cluster>etl</cluster></macros>
  <remote_servers><etl><shard><internal_replication>true</internal_replication>
    <replica><host>ch1</host><port>9000</port></replica>
    <replica><host>ch2</host><port>9000</port></replica>
  </shard></etl></remote_servers>
  <zookeeper><node><host>ch1</host><port>9181</port></node></zookeeper>
  <distributed_ddl><path>/clickhouse/task_queue/ddl</path></distributed_ddl>
  {keeper}
</clickhouse>"""
KEEPER = """<keeper_server><tcp_port>9181</tcp_port><server_id>1</server_id>
  <log_storage_path>/var/lib/clickhouse/coordination/log</log_storage_path>
  <snapshot_storage_path>/var/lib/clickhouse/coordination/snapshots</snapshot_storage_path>
  <raft_configuration><server><id>1</id><hostname>ch1</hostname><port>9234</port></server></raft_configuration>
</keeper_server>"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[dict[str, Any]]]:
    reason = _docker_reason()
    if reason:
        pytest.skip(reason)
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.network import Network

    folder = tmp_path_factory.mktemp("cluster")
    with Network() as network:
        nodes = []
        for n in (1, 2):
            config = folder / f"ch{n}.xml"
            config.write_text(CONFIG.format(replica=f"r{n}", keeper=KEEPER if n == 1 else ""))
            node = (DockerContainer(IMAGE).with_network(network).with_network_aliases(f"ch{n}")
                    .with_exposed_ports(8123).with_env("CLICKHOUSE_SKIP_USER_SETUP", "1")
                    .with_volume_mapping(str(config), "/etc/clickhouse-server/config.d/cluster.xml"))
            nodes.append(node.start())
        try:
            clients = [{"host": node.get_container_host_ip(), "port": int(node.get_exposed_port(8123))}
                       for node in nodes]
            _wait_for_keeper(clients[1])
            yield clients
        finally:
            for node in nodes:
                node.stop()


def _wait_for_keeper(kwargs: dict[str, Any]) -> None:
    deadline = time.monotonic() + 90
    while True:
        try:
            client = clickhouse_connect.get_client(**kwargs)
            client.query("SELECT count() FROM system.zookeeper WHERE path = '/'")
            client.close()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def test_a_replicated_target_on_cluster_drops_a_chunk_retried_through_the_other_replica(
        cluster: list[dict[str, Any]], backend: Any, world: Any) -> None:
    if backend.name != "docker":
        pytest.skip("runs with the docker backend's PostgreSQL")
    world.make_source(1000)
    env = {**world.env(), "CLICK_HOST": cluster[0]["host"], "CLICK_PORT": str(cluster[0]["port"]),
           "CLICK_USER": "default", "CLICK_PASSWORD": "", "CLICK_CLUSTER": "etl"}
    env.pop("CLICK_DSN", None)
    settings = load(environ=env)
    result = run_job(settings, settings.jobs[0])
    assert (result.status, result.rows_marked) == (OK, 1000)
    replica2 = clickhouse_connect.get_client(**cluster[1])
    table = f"`{world.ch_database}`.`dst`"
    engine = replica2.query(f"SELECT engine FROM system.tables WHERE database = '{world.ch_database}'"
                            " AND name = 'dst'").result_rows
    assert engine == [("ReplicatedMergeTree",)]  # created ON CLUSTER: the table exists on replica 2 too
    replica2.command(f"SYSTEM SYNC REPLICA {table}")
    token = settings.jobs[0].name
    first = world.sql("SELECT batch_id, claimed_at FROM etl.batches ORDER BY batch_id LIMIT 1")[0]
    retried = f"etl-service/{token}/{first[0]}/{first[1].timestamp():.6f}/1-400"
    data = replica2.query_arrow(f"SELECT * FROM {table} WHERE _etl_batch = {first[0]} ORDER BY id LIMIT 400")
    replica2.insert_arrow(table, data, settings={"insert_deduplication_token": retried, "insert_deduplicate": 1})
    assert replica2.query(f"SELECT count(), uniqExact(id) FROM {table}").result_rows == [(1000, 1000)]
    replica2.close()
