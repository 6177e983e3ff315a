"""The runtime: compiled networks answer as eager ones, clicks never compile, compiled code
persists between processes, LoRA folds into the base network's structure.

Small networks stand in for LiteMedSAM where compiling (minutes on 2 cores) is the point;
benchmarks/speed.py times and checks the real encoder and decoder.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

from brainsam.core.runtime import Choice, Runtime, choose
from brainsam.modeling.backbones import load_backbone
from brainsam.modeling.lora import LoraSettings, add_lora, merge_lora


def small_encoder() -> nn.Module:
    """A conv + linear network shaped like an image encoder: (B, 1, 16, 16) -> (B, 8)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.GELU(), nn.Flatten(), nn.Linear(4 * 16 * 16, 8)).eval()


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every test starts without compiled code in memory or counted."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def test_settings_force_a_choice_and_a_bad_one_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    assert choose(cpu, "compiled+bf16") == Choice(compiled=True, bf16=True)
    assert choose(cpu, "eager") == Choice(compiled=False, bf16=False)
    monkeypatch.setenv("BRAINSAM_RUNTIME", "eager+bf16")
    assert choose(cpu, "auto") == Choice(compiled=False, bf16=True)  # the environment stands in for auto only
    assert choose(cpu, "compiled") == Choice(compiled=True, bf16=False)
    with pytest.raises(ValueError, match="runtime must be one of"):
        choose(cpu, "fast")


def test_compiled_encoder_answers_as_eager_with_one_graph_for_every_batch_of_two_or_more() -> None:
    network = small_encoder()
    encode = Runtime(torch.device("cpu"), Choice(compiled=True, bf16=False)).encoder(network)
    with torch.inference_mode():
        for batch in (1, 2, 3, 5):
            x = torch.rand(batch, 1, 16, 16)
            torch.testing.assert_close(encode(x), network(x), rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 2  # batch 1, and batches 2, 3, 5 together


def test_interactive_runtime_runs_unseen_shapes_eagerly_and_compiles_only_when_warming() -> None:
    network = small_encoder()
    runtime = Runtime(torch.device("cpu"), Choice(compiled=True, bf16=False), interactive=True)
    encode = runtime.encoder(network)
    x = torch.rand(1, 1, 16, 16)
    with torch.inference_mode():
        torch.testing.assert_close(encode(x), network(x))
        assert counters["stats"]["unique_graphs"] == 0  # a click compiles nothing
        with runtime.warming():
            encode(x)
        assert counters["stats"]["unique_graphs"] == 1
        encode(x)  # the compiled code serves from now on
        encode(torch.rand(3, 1, 16, 16))  # a batch the warm-up did not see: eager again
    assert counters["stats"]["unique_graphs"] == 1


def test_train_step_gradients_match_eager() -> None:
    network = small_encoder().train()
    step = Runtime(torch.device("cpu"), Choice(compiled=True, bf16=False)).train_step(network)
    x = torch.rand(2, 1, 16, 16)
    step(x).square().sum().backward()
    compiled = [p.grad.clone() for p in network.parameters()]
    network.zero_grad()
    network(x).square().sum().backward()
    for got, expected in zip(compiled, (p.grad for p in network.parameters())):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_bf16_runs_under_autocast_and_answers_float32() -> None:
    network = small_encoder()
    encode = Runtime(torch.device("cpu"), Choice(compiled=False, bf16=True)).encoder(network)
    x = torch.rand(2, 1, 16, 16)
    with torch.inference_mode():
        out, expected = encode(x), network(x)
    assert out.dtype == torch.float32
    assert not torch.equal(out, expected)  # computed in bfloat16
    torch.testing.assert_close(out, expected, rtol=0.05, atol=0.05)


PROBE = """
import sys, torch
from torch._dynamo.utils import counters
from brainsam.core.runtime import Runtime
torch.manual_seed(0)
network = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4)).eval()
encode = Runtime.for_device("cpu", "compiled", sys.argv[1]).encoder(network)
with torch.inference_mode():
    encode(torch.rand(3, 8))
print(counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"])
"""


def test_compiled_code_persists_for_the_next_process(tmp_path: Path) -> None:
    """A second process naming the same cache folder loads the compiled graph instead of
    compiling it (inductor's FX graph cache)."""

    def run() -> tuple[int, int]:
        done = subprocess.run(
            [sys.executable, "-c", PROBE, str(tmp_path / "compiled")],
            capture_output=True,
            text=True,
            check=True,
            timeout=600,
        )
        hits, misses = done.stdout.split()
        return int(hits), int(misses)

    assert run() == (0, 1)
    assert run() == (1, 0)
    assert any((tmp_path / "compiled").iterdir())


def test_merged_lora_answers_as_the_adapter_with_the_base_structure() -> None:
    backbone = load_backbone("litemedsam")
    base_names = {name for name, _ in backbone.named_parameters()}
    add_lora(backbone, LoraSettings(blocks=(6, 7, 8, 9)))
    torch.manual_seed(0)
    for name, parameter in backbone.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(parameter, std=0.05)  # a trained adapter: LoRA no longer the identity
    layer = backbone.image_encoder.layers[3]
    tokens = torch.rand(1, 64 * 64, 320)
    with torch.inference_mode():
        adapted = layer(tokens)
        assert merge_lora(backbone) == 4
        merged = layer(tokens)
    assert {name for name, _ in backbone.named_parameters()} == base_names
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-4)
