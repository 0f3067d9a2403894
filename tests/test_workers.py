"""`gateway serve --workers 2` as a real process tree: both workers serve on one port; /metrics on either
answers the sum over both and the ledger gets every record once (a killed worker restarted, nothing counted
twice); SIGTERM drains both; a config edit (the parent's one watcher) and SIGHUP reload both.

Which worker serves a request is the kernel's choice. A keep-alive connection stays with the worker that
accepted it, and the access log names the pid that served each request id, so `pinned` finds one
connection per worker to aim requests at a given worker.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from pathlib import Path

import httpx2 as httpx
import pytest

from gateway.__main__ import main, worker_count
from tests.conftest import DEMO_KEY, LOOPBACK_TLS, ServerThread, engine_config, sdk
from tests.fakes.openai_engine import FakeOpenAIEngine, speech_seconds
from tests.metering_support import per_label, read_ledger, scrape, total, wait_ledger
from tests.process import GatewayProcess
from tests.support import WAV, wait_for

DRAIN_DELAY, GRACE = 0.5, 15.0
AUTH = {"Authorization": f"Bearer {DEMO_KEY}"}
SLOW_TEXT = "A long sentence to stream slowly. " * 3


def start(engine: FakeOpenAIEngine, tmp_path: Path, server: str = "", extra: str = "") -> GatewayProcess:
    spool = tmp_path / "spool"
    spool.mkdir(exist_ok=True)
    config = engine_config(engine.url, spool, extra)
    config = config.replace("server:\n", f"server:\n  probe_interval_s: 0\n{server}", 1)
    path = tmp_path / "gateway.yaml"
    path.write_text(config.replace("timeout_s: 2\n", "timeout_s: 20\n"))
    return GatewayProcess(path, tmp_path / "gateway.log", workers=2)


def served_by(gw: GatewayProcess, request_id: str, timeout: float = 5.0) -> int:
    """The pid whose access log line has `request_id`."""
    needle = f'"request_id": "{request_id}"'
    deadline = time.monotonic() + timeout
    while True:
        for line in gw.log().splitlines():
            if needle in line:
                return int(json.loads(line)["pid"])
        assert time.monotonic() < deadline, f"no access log line for {request_id}"
        time.sleep(0.02)


def pinned(gw: GatewayProcess, pids: set[int], tries: int = 60) -> dict[int, httpx.Client]:
    """pid -> a keep-alive client whose connection that worker accepted, for each of `pids`."""
    clients: dict[int, httpx.Client] = {}
    for _ in range(tries):
        client = httpx.Client(base_url=gw.url, headers=AUTH, verify=LOOPBACK_TLS, timeout=20)
        rid = f"pin-{uuid.uuid4().hex}"
        assert client.get("/healthz", headers={"X-Request-ID": rid}).status_code == 200
        pid = served_by(gw, rid)
        if pid in pids and pid not in clients:
            clients[pid] = client
        else:
            client.close()
        if len(clients) == len(pids):
            return clients
    raise AssertionError(f"no connection reached every worker of {pids} in {tries} tries")


def speak(client: httpx.Client, rid: str, model: str = "tts-1", key: str = DEMO_KEY) -> int:
    return client.post("/v1/audio/speech", headers={"X-Request-ID": rid, "Authorization": f"Bearer {key}"},
                       json={"model": model, "voice": "nova", "input": "Two workers.", "response_format": "pcm"}
                       ).status_code


def transcribe(client: httpx.Client, rid: str) -> int:
    return client.post("/v1/audio/transcriptions", headers={"X-Request-ID": rid}, data={"model": "whisper-1"},
                       files={"file": ("a.wav", WAV, "audio/wav")}).status_code


def fresh(gw: GatewayProcess) -> httpx.Client:
    """A client on a new connection (accepted by whichever worker the kernel wakes)."""
    return httpx.Client(base_url=gw.url, headers=AUTH, verify=LOOPBACK_TLS, timeout=20)


def send_mix(gw: GatewayProcess, clients: list[httpx.Client], tag: str, fresh_connections: int = 6) -> dict[str, int]:
    """Speech, transcription, a 404 (unknown model) and a 401 (wrong key) on each client, and the same on
    `fresh_connections` new connections; request id -> status."""
    sent: dict[str, int] = {}
    for i, client in enumerate([*clients, *(fresh(gw) for _ in range(fresh_connections))]):
        sent[f"{tag}-speech-{i}"] = speak(client, f"{tag}-speech-{i}")
        sent[f"{tag}-asr-{i}"] = transcribe(client, f"{tag}-asr-{i}")
        sent[f"{tag}-404-{i}"] = speak(client, f"{tag}-404-{i}", model="tts-unknown")
        sent[f"{tag}-401-{i}"] = speak(client, f"{tag}-401-{i}", key="sk-wrong-key-000000")
        client.close()
    assert {(rid.split("-")[1], status) for rid, status in sent.items()} == \
        {("speech", 200), ("asr", 200), ("404", 404), ("401", 401)}
    return sent


def audio_totals(gw: GatewayProcess, scrapes: int = 6) -> dict[str, float]:
    """`sum by (endpoint, code) (gateway_requests_total)` over the audio endpoints, the same from every
    scrape (each on a new connection, answered by whichever worker)."""
    seen = []
    for _ in range(scrapes):
        _, samples = scrape(f"{gw.url}/metrics")
        seen.append({f"{labels['endpoint']} {labels['code']}": value for labels, value in
                     ((dict(lb), v) for (n, lb), v in samples.items() if n == "gateway_requests_total")
                     if labels["endpoint"].startswith("/v1/audio/")})
    assert all(s == seen[0] for s in seen), seen
    return seen[0]


def expected_totals(sent: dict[str, int]) -> dict[str, float]:
    out: dict[str, float] = {}
    for rid, status in sent.items():
        endpoint = "/v1/audio/transcriptions" if "-asr-" in rid else "/v1/audio/speech"
        out[f"{endpoint} {status}"] = out.get(f"{endpoint} {status}", 0) + 1
    return out


def test_both_workers_serve_and_every_request_counts_once(engine: FakeOpenAIEngine, tmp_path: Path,
                                                         servers: ServerThread,
                                                         stopping: list[GatewayProcess]) -> None:
    ledger = tmp_path / "usage.jsonl"
    gw = start(engine, tmp_path, server="  drain_delay_s: 0\n", extra=f"ledger: {{sink: file, path: {ledger}}}\n")
    stopping.append(gw)
    workers = gw.serving()
    clients = pinned(gw, set(workers.values()))
    sent = send_mix(gw, list(clients.values()), "a")
    served = {served_by(gw, rid) for rid in sent}
    assert served == set(workers.values())  # both workers served
    billed = sorted(rid for rid, status in sent.items() if status != 401)  # no key, no ledger record
    records = wait_ledger(ledger, len(billed))
    assert sorted(r["request_id"] for r in records) == billed  # each exactly once
    assert audio_totals(gw) == expected_totals(sent)

    # SIGKILL a worker while a slow stream is in flight on it: restarted and logged; nothing counted twice,
    # and its in-flight request does not stay counted in the live gauge.
    engine.chunk_size, engine.chunk_delay = 4096, 0.06
    victim_slot, victim = next(iter(workers.items()))
    streaming = pinned(gw, {victim})[victim]

    def stream() -> None:
        try:
            with streaming.stream("POST", "/v1/audio/speech", json={
                    "model": "tts-1", "voice": "nova", "input": SLOW_TEXT, "response_format": "pcm"}) as r:
                for _ in r.iter_bytes():
                    pass
        except httpx.HTTPError:
            pass  # cut by the kill

    thread = threading.Thread(target=stream)
    thread.start()
    wait_for(lambda: total(scrape(f"{gw.url}/metrics")[1], "gateway_in_flight_requests",
                           endpoint="/v1/audio/speech") == 1, timeout=5, what="the stream in flight")
    os.kill(victim, signal.SIGKILL)
    thread.join(10)
    workers_after = gw.wait_serving(3)
    assert workers_after[victim_slot] != victim
    assert f"worker {victim_slot} (pid {victim}) exited untold (signal 9); restarting it" in gw.log()
    engine.chunk_delay = 0.0
    more = send_mix(gw, list(pinned(gw, set(workers_after.values())).values()), "b", fresh_connections=2)
    everything = {**sent, **more}
    assert audio_totals(gw) == expected_totals(everything)  # the killed stream was never recorded
    _, samples = scrape(f"{gw.url}/metrics")
    assert per_label(samples, "gateway_in_flight_requests", "endpoint").get("/v1/audio/speech", 0) == 0
    speech = sum(1 for rid in everything if "-asr-" not in rid)
    assert total(samples, "gateway_request_duration_seconds_count", endpoint="/v1/audio/speech") == speech
    assert total(samples, "gateway_request_duration_seconds_bucket", endpoint="/v1/audio/speech", le="+Inf") == speech
    assert [n for (n, _) in samples].count("gateway_build_info") == 1  # not one per worker
    assert total(samples, "gateway_build_info") == 1 and total(samples, "gateway_config_info") == 1
    billed_all = sorted(rid for rid, status in everything.items() if status != 401)
    records = wait_ledger(ledger, len(billed_all))
    assert sorted(r["request_id"] for r in records if r["request_id"] in everything) == billed_all
    lines = ledger.read_text().splitlines()
    assert all(json.loads(line) for line in lines)  # whole lines only, never interleaved
    # the last records, still in the workers' queues at SIGTERM, reach the file before the parent exits
    last = pinned(gw, set(workers_after.values()))
    final = [f"last-{pid}" for pid in last]
    assert [speak(last[pid], f"last-{pid}") for pid in last] == [200, 200]
    gw.signal(signal.SIGTERM)
    assert gw.proc.wait(20) == 0
    records = read_ledger(ledger)
    assert sorted(r["request_id"] for r in records) == sorted([*billed_all, *final])


def test_sigterm_drains_both_workers(engine: FakeOpenAIEngine, tmp_path: Path, servers: ServerThread,
                                     stopping: list[GatewayProcess]) -> None:
    gw = start(engine, tmp_path, server=f"  drain_delay_s: {DRAIN_DELAY}\n  grace_s: {GRACE}\n")
    stopping.append(gw)
    pids = set(gw.serving().values())
    streams, probes = pinned(gw, pids), pinned(gw, pids)
    engine.chunk_size, engine.chunk_delay = 4096, 0.04  # ~6 s of pcm takes ~3 s to stream
    expected = int(speech_seconds(SLOW_TEXT) * 24_000) * 2
    received: dict[int, int] = {}

    def stream(pid: int) -> None:
        with streams[pid].stream("POST", "/v1/audio/speech", json={"model": "tts-1", "voice": "nova",
                                                                   "input": SLOW_TEXT, "response_format": "pcm"}) as r:
            received[pid] = len(b"".join(r.iter_bytes()))

    threads = [threading.Thread(target=stream, args=(pid,)) for pid in pids]
    for t in threads:
        t.start()
    wait_for(lambda: engine.active == 2, timeout=5, what="a stream in flight on each worker")
    gw.signal(signal.SIGTERM)
    sent = time.monotonic()
    wait_for(lambda: {pid: probes[pid].get("/readyz").status_code for pid in pids} == dict.fromkeys(pids, 503),
             timeout=2, what="/readyz 503 on both workers")
    assert engine.active == 2  # long before the streams end

    def refused() -> bool:
        try:
            httpx.get(f"{gw.url}/healthz", timeout=2, verify=LOOPBACK_TLS)
        except httpx.ConnectError:
            return True
        return False

    assert not refused()  # still accepting during the drain delay
    wait_for(refused, timeout=DRAIN_DELAY + 5, what="the port closed (the parent's copy of the socket too)")
    assert engine.active == 2  # the streams outlive the listen socket
    for t in threads:
        t.join(GRACE)
    assert received == dict.fromkeys(pids, expected)  # both streams finished intact
    assert gw.proc.wait(GRACE) == 0
    assert time.monotonic() - sent < DRAIN_DELAY + GRACE
    log = gw.log()
    assert log.count("no longer accepting connections") == 2
    assert all(f"(pid {pid}) stopped (exit 0)" in log for pid in pids)
    assert "exited untold" not in log


def test_file_watcher_and_sighup_reload_every_worker(engine: FakeOpenAIEngine, tmp_path: Path, servers: ServerThread,
                                                     stopping: list[GatewayProcess]) -> None:
    gw = start(engine, tmp_path, server="  reload_interval_s: 0.05\n")
    stopping.append(gw)
    path = tmp_path / "gateway.yaml"
    pids = set(gw.serving().values())
    clients = pinned(gw, pids)

    def reloads() -> float:
        return total(scrape(f"{gw.url}/metrics")[1], "gateway_config_reload_total", result="success")

    def works_everywhere(model: str) -> None:
        assert {pid: speak(c, f"{model}-{pid}", model=model) for pid, c in clients.items()} == dict.fromkeys(pids, 200)
        for i in range(6):
            with sdk(f"{gw.url}/v1") as client:
                client.audio.speech.create(model=model, voice="nova", input=f"New {i}.", response_format="pcm")

    # an edit: the parent's one watcher sees it and tells both workers (theirs are off)
    text = path.read_text()
    path.write_text(text.replace("models:\n", "models:\n  tts-2: {task: speech, routes: [{backend: speaches, "
                                              "model: kokoro-v2}]}\n", 1))
    wait_for(lambda: reloads() == 2, timeout=5, what="both workers reloaded")
    works_everywhere("tts-2")
    time.sleep(0.25)  # five of the watcher's intervals
    assert reloads() == 2  # one watcher: not one per worker
    log = gw.log()
    assert log.count("config reload (file changed): telling 2 workers") == 1
    assert log.count("config reloaded (SIGHUP)") == 2 and "config reloaded (file changed)" not in log

    # SIGHUP: an edit the watcher cannot see (same inode, size and mtime), so only the signal reloads
    stat = path.stat()
    with open(path, "r+", encoding="utf-8") as f:
        edited = f.read().replace("tts-2:", "tts-3:")
        f.seek(0)
        f.write(edited)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    time.sleep(0.25)  # five of the watcher's intervals
    assert reloads() == 2
    gw.signal(signal.SIGHUP)
    wait_for(lambda: reloads() == 4, timeout=5, what="both workers reloaded on SIGHUP")
    works_everywhere("tts-3")
    assert {pid: speak(c, f"gone-{pid}", model="tts-2") for pid, c in clients.items()} == dict.fromkeys(pids, 404)


def running(pid: int) -> bool:
    """The process exists and is not a zombie (an orphan's reaping is up to whatever adopted it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.parametrize("value", ["0", "-1", "two", ""])
def test_workers_must_be_a_positive_number_or_auto(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--config", "config/gateway.yaml", "--workers", value])
    assert exit_.value.code == 2
    assert f"expected a positive number or 'auto', got '{value}'" in capsys.readouterr().err


def test_workers_auto_is_the_usable_cpus() -> None:
    assert worker_count("auto") == len(os.sched_getaffinity(0)) and worker_count("3") == 3


def test_a_dead_worker_restarts_with_a_growing_backoff_and_orphans_exit(
        engine: FakeOpenAIEngine, tmp_path: Path, servers: ServerThread, stopping: list[GatewayProcess]) -> None:
    gw = start(engine, tmp_path, server="  reload_interval_s: 0\n  drain_delay_s: 0\n")
    stopping.append(gw)
    workers = gw.serving()
    (tmp_path / "gateway.yaml").write_text("keys: [")  # from now on a worker cannot start
    (victim_slot, victim), (_, survivor) = sorted(workers.items())
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: "restarting it in 2.0 s" in gw.log(), timeout=15, what="two failed restarts")
    log = gw.log()
    assert f"worker {victim_slot} (pid {victim}) exited untold (signal 9); restarting it in 0.5 s" in log
    assert log.count("exited untold (exit 1)") == 2 and "restarting it in 1.0 s" in log  # no spinning
    assert speak(pinned(gw, {survivor})[survivor], "still-serving") == 200  # the other worker serves on

    # the parent dies (no drain of its own): the survivor sees its channel close, drains and exits
    gw.proc.kill()
    gw.proc.wait(5)
    wait_for(lambda: not running(survivor), timeout=10, what="the orphaned worker to exit")
    assert f"worker {3 - victim_slot}: the parent process is gone; draining" in gw.log()
