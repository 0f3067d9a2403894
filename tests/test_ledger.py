"""The usage ledger's sinks: JSON lines on stdout from a real `python -m gateway serve` process, and a file
rotated by size without losing or splitting a record."""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import DEMO_KEY, Gateway, engine_config, sdk
from tests.fakes.openai_engine import FakeOpenAIEngine
from tests.metering_support import LEDGER_FIELDS, http_get, metered_config, read_ledger
from tests.support import free_port

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_stdout_ledger_from_a_gateway_process(engine: FakeOpenAIEngine, tmp_path: Path,
                                              stop: signal.Signals) -> None:
    (tmp_path / "spool").mkdir()
    config = tmp_path / "gateway.yaml"
    text = metered_config(engine.url, tmp_path / "spool", ledger="ledger: {sink: stdout}\n")
    config.write_text(text.replace("\nserver:\n", "\nserver:\n  drain_delay_s: 0\n", 1))  # exit at once
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.endswith("_PROXY") and not k.endswith("_proxy")}
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(config), "--port", str(port)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                if http_get(f"http://127.0.0.1:{port}/healthz", timeout=1)[0] == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
            assert time.monotonic() < deadline, "the gateway did not start"
            time.sleep(0.05)
        with sdk(f"http://127.0.0.1:{port}/v1") as client:
            client.audio.speech.create(model="tts-1", voice="nova", input="On stdout.", response_format="pcm",
                                       extra_headers={"X-Request-ID": "stdout-ledger-1"})
            client.models.list()  # not an audio request: no ledger record
        proc.send_signal(stop)
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err.decode()[-2000:]
    lines = out.decode().splitlines()
    assert len(lines) == 1, out
    record = json.loads(lines[0])
    assert set(record) == LEDGER_FIELDS
    assert (record["request_id"], record["tenant"], record["key"], record["model"], record["characters"],
            record["billable"], record["completed"], record["status"]) == (
        "stdout-ledger-1", "acme", "demo", "tts-1", len("On stdout."), True, True, 200)
    assert DEMO_KEY not in out.decode() and DEMO_KEY not in err.decode()
    assert "stdout-ledger-1" in err.decode()  # the access log goes to stderr, the ledger alone to stdout


def test_ledger_file_rotates_by_size(make_gateway: Callable[[str], Gateway], engine: FakeOpenAIEngine,
                                     tmp_path: Path) -> None:
    path = tmp_path / "usage.jsonl"
    gateway = make_gateway(engine_config(engine.url, tmp_path / "spool",
                                         extra=f"ledger: {{sink: file, path: {path}, max_bytes: 1500, backups: 20}}\n"
                                               "metrics: {enabled: false}\n"))
    ids = [f"rotate-{i:03d}" for i in range(30)]
    with sdk(gateway.base_url) as client:
        for rid in ids:
            client.audio.speech.create(model="tts-1", voice="nova", input="Rotate me.", response_format="pcm",
                                       extra_headers={"X-Request-ID": rid})

    def files() -> list[Path]:
        """Oldest first: usage.jsonl.N ... usage.jsonl.1, usage.jsonl."""
        return [*sorted(tmp_path.glob("usage.jsonl.*"), key=lambda p: -int(p.suffix[1:])), path]

    deadline = time.monotonic() + 5
    while len(read_ledger(files())) < len(ids):
        assert time.monotonic() < deadline, read_ledger(files())
        time.sleep(0.02)
    time.sleep(0.2)  # a moment's grace for a stray extra record
    rotated = files()[:-1]
    assert (tmp_path / "usage.jsonl.1").exists() and len(rotated) >= 3, rotated
    for file in files():
        assert file.stat().st_size <= 1500, file
        for line in file.read_text().splitlines():
            assert set(json.loads(line)) == LEDGER_FIELDS  # every line a whole record
    records = read_ledger(files())  # oldest file first
    assert collections.Counter(r["request_id"] for r in records) == dict.fromkeys(ids, 1)
    assert [r["request_id"] for r in records] == ids  # in order, across the rotated files
    assert all(r["billable"] for r in records)


def test_ledger_appends_to_an_existing_file_and_counts_its_size(make_gateway: Callable[[str], Gateway],
                                                                engine: FakeOpenAIEngine, tmp_path: Path) -> None:
    """A restart appends; the file already on disk counts toward max_bytes."""
    path = tmp_path / "usage.jsonl"
    old = [json.dumps({"request_id": f"before-restart-{i}", "pad": "x" * 200}) for i in range(6)]
    path.write_text("".join(line + "\n" for line in old))
    assert 1300 < path.stat().st_size < 1500
    gateway = make_gateway(engine_config(engine.url, tmp_path / "spool",
                                         extra=f"ledger: {{sink: file, path: {path}, max_bytes: 1500, backups: 2}}\n"))
    with sdk(gateway.base_url) as client:
        client.audio.speech.create(model="tts-1", voice="nova", input="After a restart.", response_format="pcm",
                                   extra_headers={"X-Request-ID": "after-restart"})
    deadline = time.monotonic() + 5
    while not (path.exists() and "after-restart" in path.read_text()):
        assert time.monotonic() < deadline, "the new record is not in usage.jsonl"
        time.sleep(0.02)
    assert (tmp_path / "usage.jsonl.1").read_text().splitlines() == old  # rotated whole, before the new record
    assert [r["request_id"] for r in read_ledger(path)] == ["after-restart"]
