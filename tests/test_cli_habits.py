"""The command line as users of vLLM and SGLang type it: the positional model, --model and --lora-modules,
no argument abbreviation, every choice in --help, built-in plugins listed, and --log-level obeyed with
timestamped lines by a real ``loraserve`` process."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys

import httpx
import pytest
from http_fixtures import assets

from loraserve.cli import build_parser, main, parse_settings
from loraserve.errors import ConfigError
from loraserve.plugin_manager import PluginManager
from loraserve.settings import LoRAPathSpec, make_settings


@pytest.fixture(scope="module")
def pm() -> PluginManager:
    return PluginManager().load()


def test_positional_model_and_model_alias_both_set_model_path(pm):
    assert parse_settings(["/models/x"], pm).model_path == "/models/x"
    assert parse_settings(["--model", "/models/y"], pm).model_path == "/models/y"
    assert parse_settings(["--model-path", "/models/z", "--port", "1234"], pm).model_path == "/models/z"
    assert parse_settings(["/models/x", "--model-path", "/models/x"], pm).model_path == "/models/x"  # same twice: fine


def test_positional_model_after_serve_subcommand(monkeypatch):
    seen = {}
    monkeypatch.setattr("loraserve.http.server.serve", lambda settings, plugins: seen.setdefault("s", settings) and 0)
    assert main(["serve", "/models/x", "--port", "1234", "--log-level", "warning"]) == 0
    assert seen["s"].model_path == "/models/x" and seen["s"].port == 1234


def test_two_different_models_are_refused(pm, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_settings(["/models/x", "--model-path", "/models/y"], pm)
    assert exc.value.code == 2 and "the model is given twice" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--mod", "/x"], ["--max-loras", "4"], ["--lora-path", "a=b"]])
def test_abbreviated_flags_are_refused(pm, argv, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_settings(argv, pm)
    assert exc.value.code == 2 and f"unrecognized arguments: {argv[0]}" in capsys.readouterr().err


def test_lora_modules_takes_vllm_and_sglang_spellings(pm):
    settings = parse_settings(
        [
            "--lora-modules",
            "a=/ad/a",
            '{"name": "b", "path": "/ad/b", "base_model_name": "meta-llama/Llama-3.1-8B"}',
            '{"lora_name": "c", "lora_path": "/ad/c", "pinned": true}',
        ],
        pm,
    )
    got = [(s.lora_name, s.lora_path, s.pinned) for s in settings.lora_paths]
    assert got == [("a", "/ad/a", False), ("b", "/ad/b", False), ("c", "/ad/c", True)]
    assert parse_settings(["--lora-paths", "a=/ad/a"], pm).lora_paths == settings.lora_paths[:1]


@pytest.mark.parametrize(
    "entry, message",
    [
        ('{"name": "b", "lora_name": "c", "path": "/p"}', "gives both 'lora_name' and 'name'"),
        ('{"name": "b"}', "needs keys lora_name and lora_path"),
        ('{"name": "b", "path": "/p", "rank": 8}', "unknown keys: rank"),
        ('{"name": "b", "path": "/p"', "is not valid JSON"),
    ],
)
def test_bad_lora_modules_entries_name_the_problem(entry, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        LoRAPathSpec.parse(entry)
    with pytest.raises(ConfigError, match=re.escape(message)):
        make_settings(lora_paths=[entry])


def test_help_lists_the_choices_of_every_flag_that_has_them(pm):
    text = build_parser(pm).format_help()
    for flag, choices in (
        ("--attention-backend", "{torch_native,triton}"),
        ("--device", "{auto,cpu,cuda}"),
        ("--log-level", "{debug,info,warning,error,critical}"),
        ("--max-lora-chunk-size", "{16,32,64,128}"),
        ("--lora-backend", "{"),
        ("--load-format", "{auto,safetensors,pt,gguf,dummy}"),
    ):
        assert re.search(rf"{re.escape(flag)} {re.escape(choices)}", text), flag
    assert "--lora-modules" in text and "--model MODEL_PATH" in text


def test_plugins_lists_builtins_by_default_marked_builtin(capsys):
    assert main(["plugins"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["backend_csgmv"]["builtin"] is True and rows["backend_csgmv"]["status"] == "loaded"
    assert rows["frontend_openai"]["registered"] == {"frontends": ["openai"]}
    assert main(["plugins", "--external"]) == 0
    assert all(not row["builtin"] for row in json.loads(capsys.readouterr().out))


# -- --log-level, in a real server process ------------------------------------------------------

TIMESTAMPED = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+: ")
LEVEL_WORD = re.compile(r"\b(DEBUG|INFO|WARNING|ERROR|CRITICAL)\b")


def serve_once(level: str) -> list[str]:
    """Start ``loraserve`` at ``--log-level level``, send one request, stop it; its output lines."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "LORASERVE_LOG_LEVEL"}
    cmd = [
        sys.executable,
        "-m",
        "loraserve.cli",
        "serve",
        assets().base,
        "--device",
        "cpu",
        "--port",
        str(port),
        "--max-total-tokens",
        "1024",
        "--log-level",
        level,
        "--lora-paths",
        f"alpha={assets().adapters['alpha']}",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    try:
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith("loraserve: serving") or len(lines) > 2000:
                break
        assert lines and lines[-1].startswith("loraserve: serving"), "\n".join(lines)
        body = {"text": "hi", "sampling_params": {"max_new_tokens": 3, "temperature": 0}, "lora_path": "alpha"}
        assert httpx.post(f"http://127.0.0.1:{port}/generate", json=body, timeout=60).status_code == 200
        proc.send_signal(signal.SIGTERM)
        lines += proc.communicate(timeout=60)[0].splitlines()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return lines


def log_lines(lines: list[str]) -> list[str]:
    """Lines that carry a level word where a log line has it (not the URL banner or progress bars)."""
    return [line for line in lines if LEVEL_WORD.search(line[:40])]


@pytest.mark.slow
def test_log_level_warning_shows_no_info_and_debug_shows_debug_with_timestamps():
    quiet = serve_once("warning")
    assert not [line for line in log_lines(quiet) if " INFO " in line or " DEBUG " in line], "\n".join(quiet)
    assert any(line.startswith("loraserve: serving") for line in quiet)

    loud = serve_once("debug")
    logged = log_lines(loud)
    assert [line for line in logged if " DEBUG loraserve." in line], "\n".join(loud)  # our own debug lines
    assert any(" INFO uvicorn" in line for line in logged)  # uvicorn's loggers follow the level too
    untimed = [line for line in logged if not TIMESTAMPED.match(line)]
    assert not untimed, "\n".join(untimed)
