"""Config reload on a real gateway process: SIGHUP and file changes (Kubernetes' symlink swap included);
an invalid config keeps the old one serving, whatever is wrong with it, and check-config names the
problem by path; a stream in flight finishes on the config it started with."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx2 as httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.adapters import unavailable_reason
from tests.conftest import LOOPBACK_TLS, engine_config, sdk
from tests.fakes.openai_engine import FakeOpenAIEngine, speech_seconds
from tests.process import GatewayProcess

TTS2 = "  tts-2: {task: speech, routes: [{backend: speaches, model: kokoro-v2}]}\n"


class ConfigMapDir:
    """A directory laid out the way the kubelet mounts a ConfigMap: gateway.yaml -> ..data/gateway.yaml,
    ..data -> ..<timestamp>; an update writes a new timestamped dir and swaps the ..data symlink."""

    def __init__(self, root: Path, text: str) -> None:
        self.root = root
        self.version = 0
        self.update(text)
        (root / "gateway.yaml").symlink_to("..data/gateway.yaml")

    def update(self, text: str | bytes) -> None:
        self.version += 1
        target = self.root / f"..2026_11_25_{self.version}"
        target.mkdir()
        (target / "gateway.yaml").write_bytes(text.encode() if isinstance(text, str) else text)
        tmp = self.root / "..data_tmp"
        tmp.symlink_to(target.name)
        os.replace(tmp, self.root / "..data")  # atomic, as the kubelet does

    @property
    def path(self) -> Path:
        return self.root / "gateway.yaml"


def with_models(config: str, extra: str) -> str:
    return config.replace("models:\n", "models:\n" + extra, 1)


@pytest.fixture
def base_config(engine: FakeOpenAIEngine, tmp_path: Path) -> str:
    spool = tmp_path / "spool"
    spool.mkdir()
    # no background probes: a probe of the reloaded table would land among the requests the engine records
    return engine_config(engine.url, spool).replace(
        "server:\n", "server:\n  reload_interval_s: 0.05\n  probe_interval_s: 0\n", 1)


@pytest.fixture
def configmap(tmp_path: Path, base_config: str) -> ConfigMapDir:
    root = tmp_path / "configmap"
    root.mkdir()
    return ConfigMapDir(root, base_config)


@pytest.fixture
def process(configmap: ConfigMapDir, tmp_path: Path) -> Iterator[GatewayProcess]:
    gw = GatewayProcess(configmap.path, tmp_path / "gateway.log")
    yield gw
    gw.stop()


def speak(gw: GatewayProcess, model: str, text: str = "Reload.") -> bytes:
    with sdk(f"{gw.url}/v1") as client:
        return client.audio.speech.create(model=model, voice="nova", input=text, response_format="pcm").content


def reloads(gw: GatewayProcess) -> dict[str, float]:
    families = text_string_to_metric_families(httpx.get(f"{gw.url}/metrics", verify=LOOPBACK_TLS).text)
    found: dict[str, float] = {}
    for family in families:
        for sample in family.samples:
            if sample.name == "gateway_config_reload_total":
                found[sample.labels["result"]] = sample.value
            if sample.name == "gateway_config_info":
                found["digest:" + sample.labels["digest"]] = sample.value
    return found


def eventually(check: Callable[[], bool], timeout: float = 15.0) -> None:
    """Poll `check` until it holds; the deadline only bounds a hang (a loaded machine parses bad edits slowly)."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def model_works(gw: GatewayProcess, model: str) -> bool:
    try:
        speak(gw, model)
    except openai.NotFoundError:
        return False
    return True


def test_symlink_swap_reloads_without_dropping_a_stream(process: GatewayProcess, configmap: ConfigMapDir,
                                                        base_config: str, engine: FakeOpenAIEngine) -> None:
    assert not model_works(process, "tts-2")
    before = reloads(process)
    engine.chunk_size, engine.chunk_delay = 4096, 0.05
    text = "A stream that outlives the reload. " * 2
    got: dict[str, int] = {}

    def stream() -> None:
        got["bytes"] = len(speak(process, "tts-1", text))

    worker = threading.Thread(target=stream)
    worker.start()
    time.sleep(0.3)
    configmap.update(with_models(base_config, TTS2))
    eventually(lambda: model_works(process, "tts-2"))
    assert engine.last.json["model"] == "kokoro-v2"
    worker.join(20)
    assert got["bytes"] == int(speech_seconds(text) * 24_000) * 2  # finished intact, on the old config
    after = reloads(process)
    assert after.get("success", 0) == before.get("success", 0) + 1
    assert sum(1 for k in after if k.startswith("digest:")) == 1
    assert [k for k in after if k.startswith("digest:")] != [k for k in before if k.startswith("digest:")]


@pytest.mark.parametrize(("broken", "expected_log"), [
    ("models: [unclosed", "not valid YAML"),
    ("UNKNOWN_BACKEND", "models.tts-1.routes[0].backend: unknown backend 'spaches'"),
])
def test_invalid_config_keeps_the_old_one(process: GatewayProcess, configmap: ConfigMapDir, base_config: str,
                                          broken: str, expected_log: str) -> None:
    text = base_config.replace("{backend: speaches, model: kokoro}", "{backend: spaches, model: kokoro}") \
        if broken == "UNKNOWN_BACKEND" else broken
    configmap.update(text)
    eventually(lambda: reloads(process).get("failure", 0) == 1)
    assert len(speak(process, "tts-1")) > 0  # still serving the old table
    assert expected_log in process.log()
    configmap.update(with_models(base_config, TTS2))  # and a later valid config still applies
    eventually(lambda: model_works(process, "tts-2"))


def test_sighup_reloads(tmp_path: Path, base_config: str) -> None:
    path = tmp_path / "plain.yaml"
    path.write_text(base_config.replace("reload_interval_s: 0.05", "reload_interval_s: 0"))
    gw = GatewayProcess(path, tmp_path / "hup.log")
    try:
        path.write_text(with_models(base_config.replace("reload_interval_s: 0.05", "reload_interval_s: 0"), TTS2))
        time.sleep(0.5)
        assert not model_works(gw, "tts-2")  # no watching: nothing happens until the signal
        gw.signal(signal.SIGHUP)
        eventually(lambda: model_works(gw, "tts-2"))
        assert "config reloaded (SIGHUP)" in gw.log()
    finally:
        gw.stop()


def bad_edits(base: str) -> list[tuple[str, str | bytes, str]]:
    """(what, file content, the problem logged and printed by check-config): each must be refused."""
    bomb = "".join(f"bomb{i}: &b{i} [{', '.join([f'*b{i - 1}'] * 10)}]\n" for i in range(1, 9))
    deep = 5000
    return [
        ("a NaN", base.replace("max_upload_bytes: 2000000", "max_upload_bytes: .nan"),
         "server.max_upload_bytes: expected a number >= 1, got nan"),
        ("an infinity", base.replace("max_upload_bytes: 2000000", "max_upload_bytes: -.inf"),
         "server.max_upload_bytes: expected a number >= 1, got -inf"),
        ("not UTF-8", base.encode() + b"# caf\xe9\n", "not UTF-8 text"),
        ("YAML thousands deep", base + "deep: " + "[" * deep + "]" * deep + "\n", "not valid YAML: nested too deep"),
        ("nested past the limit", base.replace("voices:\n", "voices:\n  deep: " + "[" * 40 + "]" * 40 + "\n"),
         "voices.deep" + "[0]" * 31 + ": nested more than 32 levels deep"),
        ("aliases expanding to 10^8 values", base + "bomb0: &b0 [x]\n" + bomb, "more than 100000 values"),
        ("an integer of 5000 digits", base.replace("max_upload_bytes: 2000000", "max_upload_bytes: " + "9" * 5000),
         "not valid YAML: Exceeds the limit"),
        ("an empty file", "", "keys: no gateway keys; every request would get a 401"),
        ("a file cut short", base[:base.index("  - {name: beta")], "models: no models; every request would get a 404"),
        *([] if unavailable_reason("pocketsphinx") else [  # a constructor raising TypeError
            ("a non-string option key",
             base.replace("backends:\n", "backends:\n  sphinx: {kind: pocketsphinx, decoder: {1: 2}}\n"),
             "backends.sphinx: cannot build a 'pocketsphinx' backend: TypeError")]),
    ]


def test_no_bad_edit_stops_the_watcher(process: GatewayProcess, configmap: ConfigMapDir, base_config: str) -> None:
    """Each bad edit is logged by path and counted, the last good table keeps serving, and the next
    good edit is applied; no edit is a bug of ours (no traceback in the log)."""
    served = "tts-1"
    for i, (what, text, expected) in enumerate(bad_edits(base_config)):
        logged = len(process.log())
        configmap.update(text)
        eventually(lambda i=i: reloads(process).get("failure", 0) == i + 1)
        assert expected in process.log()[logged:], what
        assert model_works(process, served), what  # the last good table still serves
        served = f"tts-ok-{i}"
        configmap.update(with_models(base_config, f"  {served}: {{task: speech, routes: [{{backend: speaches}}]}}\n"))
        eventually(lambda served=served: model_works(process, served))
    assert reloads(process)["success"] == len(bad_edits(base_config))
    assert "Traceback" not in process.log()


def test_a_reload_keeps_the_adapters_of_unchanged_backends(process: GatewayProcess, configmap: ConfigMapDir,
                                                           base_config: str) -> None:
    configmap.update(with_models(base_config, TTS2))
    eventually(lambda: model_works(process, "tts-2"))
    assert "backends kept: speaches" in process.log()
    configmap.update(with_models(base_config, TTS2).replace("timeout_s: 2", "timeout_s: 3"))
    eventually(lambda: reloads(process).get("success", 0) == 2)
    eventually(lambda: "backends kept: none" in process.log())  # the log writer thread may lag the metric


def test_check_config_names_each_bad_edit_by_file_and_path(tmp_path: Path, base_config: str) -> None:
    """One run checks every file it is given: each bad edit is named under its own file, without a
    traceback, and a good file among them is still reported ok."""
    edits = bad_edits(base_config)
    paths = [tmp_path / f"bad-{i}.yaml" for i in range(len(edits))]
    for path, (_, text, _) in zip(paths, edits, strict=True):
        path.write_bytes(text.encode() if isinstance(text, str) else text)
    good = tmp_path / "good.yaml"
    good.write_text(base_config)
    result = subprocess.run([sys.executable, "-m", "gateway", "check-config", *map(str, paths), str(good)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    for path, (what, _, expected) in zip(paths, edits, strict=True):
        said = [line for line in result.stderr.splitlines() if line.startswith(f"{path}: ")]
        assert any(expected in line for line in said), (what, said)
    assert f"{good}: " not in result.stderr and result.stdout.startswith(f"{good}: ok (")
