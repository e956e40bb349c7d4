"""A model no adapter can decompose exactly is refused from config.json alone, before the
tokenizer or any weight is read: a TdbError naming the family, the supported ones and the
reason; one line at the CLI (exit 2); on stderr with a non-zero exit for an MCP client."""

import asyncio
import json
import os
import sys
import time

import pytest
from mcp import StdioServerParameters
from mcp.client.session import ClientSession
from mcp.client.stdio import stdio_client
from transformers import FalconConfig, OPTConfig

from tdb_agent.engine import Engine
from tdb_agent.engine.adapters import ADAPTERS, check_supported
from tdb_agent.errors import TdbError, UnsupportedModel


def _fake_checkpoint(folder, config: dict):
    """A config and a 'weights' file that is not a checkpoint: reading it would fail loudly."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(b"not weights" * 1000)
    return folder


def test_unknown_family_refused_before_any_weight(tmp_path):
    d = _fake_checkpoint(tmp_path / "m", {"model_type": "mamba9", "architectures": ["Mamba9ForCausalLM"]})
    t0 = time.perf_counter()
    with pytest.raises(UnsupportedModel) as e:
        Engine.load(d)
    assert time.perf_counter() - t0 < 5  # generous; the point is: nothing but the json was read
    msg = str(e.value)
    assert "'mamba9'" in msg and "gemma2" in msg and "qwen3" in msg and "\n" not in msg
    assert isinstance(e.value, TdbError)


@pytest.mark.parametrize("config, reason", [
    (FalconConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, alibi=True), "ALiBi"),
    (OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, ffn_dim=32,
               word_embed_proj_dim=16, do_layer_norm_before=False), "post-LayerNorm"),
])
def test_known_family_that_cannot_be_decomposed_says_why(config, reason, tmp_path):
    d = tmp_path / "m"
    config.save_pretrained(d)
    (d / "model.safetensors").write_bytes(b"corrupt")  # proves the weights are never opened
    with pytest.raises(UnsupportedModel, match=f"this {config.model_type} model is not supported: .*{reason}"):
        Engine.load(d)


def test_every_adapter_is_registered_once():
    assert {"gemma3_text", "gpt_neo", "opt", "falcon"} <= set(ADAPTERS)
    with pytest.raises(UnsupportedModel, match="multimodal"):
        check_supported(type("C", (), {"model_type": "gemma3"})())


def _env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def test_cli_refusal_is_one_line(tmp_path, capsys):
    """The CLI's own error path, in process (the MCP test below runs it as a subprocess)."""
    from tdb_agent.cli import main

    d = _fake_checkpoint(tmp_path / "m", {"model_type": "mamba9"})
    for cmd in (["serve", "--model", str(d)], ["build-dataset", "--model", str(d), "--out", str(tmp_path / "ds")]):
        assert main(cmd) == 2
        out, err = capsys.readouterr()
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and "'mamba9' is not supported" in lines[0], err
        assert lines[0].startswith(f"tdb-agent {cmd[0]}:") and "Traceback" not in err
        assert out == ""  # stdout carries only protocol on stdio


def test_mcp_client_gets_the_reason_on_stderr(tmp_path):
    d = _fake_checkpoint(tmp_path / "m", {"model_type": "mamba9"})
    errlog = tmp_path / "stderr.txt"
    params = StdioServerParameters(command=sys.executable, args=["-m", "tdb_agent.cli", "serve", "--model", str(d)],
                                   env=_env())

    async def go():
        with open(errlog, "w") as err:
            async with stdio_client(params, errlog=err) as (read, write):
                async with ClientSession(read, write) as session:
                    await asyncio.wait_for(session.initialize(), timeout=120)

    with pytest.raises(BaseException):  # the server exits before answering initialize
        asyncio.run(go())
    lines = [line for line in errlog.read_text().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("tdb-agent serve: model family 'mamba9' is not supported")


# ---- weights: safetensors first; a pickled .bin only through the weights-only unpickler ----
class _Payload:
    """Unpickling this runs code (creates a file): what a hostile .bin does."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def _checkpoint(tmp_path, name, *, safetensors: bool, bin_payload: bool):
    """A tiny Llama folder with model.safetensors and/or pytorch_model.bin (the same weights,
    plus, with bin_payload, an object whose unpickling would create `tmp_path/pwned`)."""
    import torch
    from safetensors.torch import load_file

    from tests.tiny_models import build_tiny

    d = build_tiny("llama", tmp_path / name)
    state = load_file(d / "model.safetensors")
    if bin_payload:
        state = state | {"payload": _Payload(tmp_path / "pwned")}
    torch.save(state, d / "pytorch_model.bin")
    if not safetensors:
        (d / "model.safetensors").unlink()
    return d


def _same_weights(engine, folder):
    from safetensors.torch import load_file

    want = load_file(folder / "model.safetensors")
    got = engine.model.state_dict()
    for k, v in want.items():
        assert got[k].equal(v), k


def test_safetensors_preferred_over_a_bin_beside_it(tmp_path):
    d = _checkpoint(tmp_path, "both", safetensors=True, bin_payload=True)
    eng = Engine.load(d)  # the hostile .bin is never opened
    assert not (tmp_path / "pwned").exists()
    _same_weights(eng, d)


def test_a_bin_only_checkpoint_loads_with_the_weights_only_unpickler(tmp_path):
    ref = _checkpoint(tmp_path, "ref", safetensors=True, bin_payload=False)
    d = _checkpoint(tmp_path, "bin", safetensors=False, bin_payload=False)
    assert not (d / "model.safetensors").exists()
    eng = Engine.load(d)
    _same_weights(eng, ref)


def test_a_bin_pickling_code_is_refused_in_our_words(tmp_path, capsys):
    from tdb_agent.cli import main
    from tdb_agent.engine.weights import UnsafeCheckpoint

    d = _checkpoint(tmp_path, "evil", safetensors=False, bin_payload=True)
    with pytest.raises(UnsafeCheckpoint) as e:
        Engine.load(d)
    msg = str(e.value)
    assert isinstance(e.value, TdbError) and "\n" not in msg
    assert "pytorch_model.bin" in msg and "weights-only unpickler" in msg and "makedirs" in msg
    assert "weights_only" not in msg and "False" not in msg
    assert not (tmp_path / "pwned").exists()
    assert main(["serve", "--model", str(d)]) == 2
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("tdb-agent serve: refused to read pytorch_model.bin"), err
    assert "Traceback" not in err and "weights_only" not in err and out == ""
    assert not (tmp_path / "pwned").exists()
