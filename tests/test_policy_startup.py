"""The startup guard (gateway/policy/shared.py scope_warnings): limits counted where not every process
counting shares them are said loudly, by `check-config` (a warning line, exit 0 still) and by `serve` at
start. Real processes: the command line is what operators run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import engine_config
from tests.fakes.openai_engine import FakeOpenAIEngine
from tests.process import GatewayProcess

LIMITED = "limits: {key: [{requests: 60, per: minute}]}\n"
PER_PROCESS = "limits and budgets are counted by each"
PER_POD = "limits and budgets are counted per pod"


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def check_config(*paths: Path, kubernetes: bool = False) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "KUBERNETES_SERVICE_HOST"}
    if kubernetes:
        env["KUBERNETES_SERVICE_HOST"] = "10.0.0.1"
    return subprocess.run([sys.executable, "-m", "gateway", "check-config", *map(str, paths)], capture_output=True,
                          text=True, timeout=60, env=env, cwd=Path(__file__).parent.parent)


def warnings(result: subprocess.CompletedProcess[str], path: Path) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith(f"{path}: warning: state.backend")]


def test_check_config_warns_on_per_process_state_and_still_passes(engine: FakeOpenAIEngine, tmp_path: Path) -> None:
    base = engine_config(engine.url, tmp_path / "spool")
    memory = write(tmp_path, "memory.yaml", base + "state: {backend: memory}\n" + LIMITED)
    redis = write(tmp_path, "redis.yaml", base + "state: {backend: redis, url: 'redis://127.0.0.1:9/0'}\n" + LIMITED)
    sqlite = write(tmp_path, "sqlite.yaml", base + f"state: {{backend: sqlite, path: {tmp_path / 's.db'}}}\n"
                   + LIMITED)
    unlimited = write(tmp_path, "unlimited.yaml", base + "state: {backend: memory}\n")
    result = check_config(memory, redis, sqlite, unlimited)
    assert result.returncode == 0, result.stderr
    assert [w.startswith(f"{memory}: warning: state.backend: memory: {PER_PROCESS} process on its own")
            for w in warnings(result, memory)] == [True]  # one line, and still exit 0
    assert warnings(result, redis) == [] and warnings(result, sqlite) == []  # sqlite: exact on one host
    assert warnings(result, unlimited) == []  # nothing to count, nothing to warn about
    assert result.stdout.count(": ok (") == 4

    in_kubernetes = check_config(memory, sqlite, redis, kubernetes=True)
    assert in_kubernetes.returncode == 0, in_kubernetes.stderr
    assert [PER_POD in w for w in warnings(in_kubernetes, sqlite)] == [True]  # one line, per pod
    assert [PER_POD in w for w in warnings(in_kubernetes, memory)] == [False, True]
    assert warnings(in_kubernetes, redis) == []
    assert not (tmp_path / "s.db").exists()  # check-config opens no store


def test_serve_with_two_workers_on_memory_state_warns_loudly_at_start(
        engine: FakeOpenAIEngine, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    config = engine_config(engine.url, spool).replace("server:\n", "server:\n  probe_interval_s: 0\n", 1)
    path = write(tmp_path, "gateway.yaml", config + "state: {backend: memory}\n" + LIMITED)
    gw = GatewayProcess(path, tmp_path / "gateway.log", workers=2)
    try:
        log = gw.log()
    finally:
        gw.stop()
    loud = [line for line in log.splitlines() if "WARNING: state.backend: memory" in line]
    assert len(loud) == 1, log  # said once, by the parent, not by each worker
    assert "each worker process" in loud[0] and "use sqlite (one host) or redis" in loud[0]
