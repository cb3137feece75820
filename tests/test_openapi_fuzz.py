"""The served OpenAPI document declares every body and error, and schemathesis finds nothing against it.

schemathesis reads ``/openapi.json`` of a live server (a tiny model with two adapters, adapter loads
confined to a temporary directory with ``--lora-allowed-dirs``) and runs every check with a bounded
number of examples and seconds (``FUZZ_EXAMPLES``, ``FUZZ_SECONDS``: 10 and 90 by default): no 5xx,
every status and body as documented, schema-invalid bodies refused with
a 4xx, schema-valid ones accepted (see tests/fuzz/schemathesis.toml for the one allowance). The
document itself is checked directly too.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from http_fixtures import RunningServer, assets, make_engine

CONFIG = Path(__file__).parent / "fuzz" / "schemathesis.toml"
POSTS = (
    "/generate",
    "/v1/completions",
    "/v1/chat/completions",
    "/load_lora_adapter",
    "/unload_lora_adapter",
    "/v1/load_lora_adapter",
    "/v1/unload_lora_adapter",
    "/load_lora_adapter_from_tensors",
)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    allowed = tmp_path_factory.mktemp("allowed")
    for name in ("alpha", "beta"):
        shutil.copytree(assets().adapters[name], allowed / name)
    engine = make_engine(
        adapters=(),
        lora_paths=[f"{n}={allowed / n}" for n in ("alpha", "beta")],
        context_length=128,
        lora_allowed_dirs=[str(allowed)],
        max_queued_requests=64,
        max_sequences_per_request=4,
    )
    server = RunningServer(engine)
    yield server, engine
    server.stop()
    engine.shutdown()


def test_document_declares_every_body_and_error(served):
    server, _ = served
    doc = httpx.get(f"{server.url}/openapi.json").json()
    for path in POSTS:
        op = doc["paths"][path]["post"]
        ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert ref.rsplit("/", 1)[1] in doc["components"]["schemas"], path
        assert {"200", "400", "413"} <= set(op["responses"]) and "422" not in op["responses"], path
        assert op["responses"]["400"]["content"]["application/json"]["schema"], path
    for path in ("/health", "/metrics", "/v1/models", "/get_server_info", "/flush_cache"):
        assert "405" in doc["paths"][path]["get"]["responses"], path
    flush = doc["paths"]["/flush_cache"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert flush["required"] == ["message", "flushed_blocks"]
    sampling = doc["components"]["schemas"]["SamplingParamsBody"]["properties"]
    assert sampling["top_p"]["anyOf"][0] == {"type": "number", "exclusiveMinimum": 0.0, "maximum": 1.0}


def test_sampling_schema_names_every_sampling_parameter():
    from dataclasses import fields

    from loraserve.plugins.frontend_native.schema import SamplingParamsBody
    from loraserve.sched.sampling_params import SamplingParams

    assert set(SamplingParamsBody.model_fields) == {f.name for f in fields(SamplingParams)}


@pytest.mark.slow
def test_schemathesis_finds_no_failure(served, tmp_path):
    server, engine = served
    cmd = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "--config-file",
        str(CONFIG),
        "run",
        f"{server.url}/openapi.json",
        "--checks",
        "all",
        "--max-examples",
        os.environ.get("FUZZ_EXAMPLES", "10"),
        "--seed",
        "20261207",
        "--max-time",
        os.environ.get("FUZZ_SECONDS", "90"),  # (the default suite's share; FUZZ_SECONDS=600 for a long run)
        "--workers",
        "1",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=420, cwd=tmp_path)
    report = out.stdout[-8000:] + out.stderr[-2000:]
    assert out.returncode == 0, report
    assert "No issues found" in out.stdout or " passed" in out.stdout, report
    assert httpx.get(f"{server.url}/health").status_code == 200  # still serving
    assert set(engine.lora.registry.names()) >= {"alpha", "beta"}
