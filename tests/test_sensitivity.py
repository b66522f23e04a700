"""Sensitivity and suggestions on recorded inputs: the file format, the ranking, the greedy bound."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import same_bits
from torch import nn

from omni_fp8 import Fp8Linear, load_inputs, load_transformer, record_inputs, save_inputs, sensitivity, suggest
from omni_fp8.converter.cli import main
from omni_fp8.converter.errors import CorruptCheckpointError
from omni_fp8.runtime.sensitivity import group_of


def recorded_calls(model, n: int = 3) -> list[dict]:
    """Run the transformer as the Qwen-Image pipeline does, a few steps, recording its inputs."""
    g = torch.Generator().manual_seed(0)
    cfg = model.config
    x = torch.randn(2, 64, cfg.in_channels, generator=g).bfloat16()
    text = torch.randn(2, 7, cfg.joint_attention_dim, generator=g).bfloat16()
    with record_inputs(model) as calls, torch.no_grad():
        for i in range(n):
            model(hidden_states=x, encoder_hidden_states=text, encoder_hidden_states_mask=torch.ones(2, 7, dtype=torch.bool),
                  timestep=torch.full((2,), 1 - i / n).bfloat16(), img_shapes=[[(1, 8, 8)]] * 2, return_dict=False)
    return calls


@pytest.fixture
def model_and_calls(qwen_src):
    model = load_transformer(qwen_src, progress=False)
    return model, recorded_calls(model)


def test_inputs_round_trip(model_and_calls, tmp_path):
    _, calls = model_and_calls
    save_inputs(tmp_path / "in.safetensors", calls)
    loaded = load_inputs(tmp_path / "in.safetensors")
    assert len(loaded) == len(calls) == 3
    for a, b in zip(loaded, calls):
        assert a.keys() == b.keys()
        for k in a:
            assert same_bits(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k]


def test_not_an_inputs_file(qwen_src):
    shard = next(qwen_src.glob("*.safetensors"))
    with pytest.raises(CorruptCheckpointError, match="not a recorded-inputs file"):
        load_inputs(shard)


@pytest.mark.parametrize("name,group", [
    ("transformer_blocks.3.img_mlp.net.0.proj", "transformer_blocks.3.img_mlp"),
    ("transformer_blocks.3.attn.to_q", "transformer_blocks.3.attn"),
    ("transformer_blocks.3.img_mod.1", "transformer_blocks.3.img_mod"),
    ("time_text_embed.timestep_embedder.linear_1", "time_text_embed"),
    ("layers.2.feed_forward.w1", "layers.2.feed_forward"),
    ("cap_embedder.1", "cap_embedder"),
    ("proj_out", "proj_out"),
])
def test_groups(name, group):
    assert group_of(name) == group


def test_sensitivity_ranks_every_group_and_leaves_the_model_alone(model_and_calls):
    model, calls = model_and_calls
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = sensitivity(model, calls, progress=False)
    groups = {g.group for g in report.groups}
    assert {"transformer_blocks.0.attn", "transformer_blocks.1.img_mlp", "img_in", "proj_out"} <= groups
    errors = {g.group: g.error for g in report.groups}
    assert list(errors.values()) == sorted(errors.values(), reverse=True)
    # The last block's text stream never reaches the output: quantizing it changes nothing.
    assert errors.pop("transformer_blocks.1.txt_mlp") == 0 and all(e > 0 for e in errors.values())
    errors = list(errors.values())
    assert report.all_fp8_error >= max(errors) * 0.5
    assert not any(isinstance(m, Fp8Linear) for m in model.modules())
    assert all(same_bits(v, before[k]) for k, v in model.state_dict().items())


def test_suggest_keeps_the_worst_groups_until_the_bound_holds(model_and_calls, qwen_src):
    model, calls = model_and_calls
    loose = suggest(model, calls, max_error=1.0, progress=False)
    assert loose.ignored_layers == [] and loose.suggested_error == loose.all_fp8_error
    bound = loose.all_fp8_error * 0.6
    tight = suggest(model, calls, max_error=bound, progress=False)
    assert tight.suggested_error <= bound and tight.ignored_layers
    assert tight.ignored_layers == [g.group for g in tight.groups[: len(tight.ignored_layers)]]  # worst first
    # The suggestion is a valid ignored_layers list, and gives the error it promised.
    fp8 = load_transformer(qwen_src, quantization="fp8", progress=False,
                           quantization_config={"preset": "none", "ignored_layers": tight.ignored_layers})
    kept = [n for n, m in fp8.named_modules() if type(m) is nn.Linear]
    assert kept and all(any(n.startswith(g + ".") or n == g for g in tight.ignored_layers) for n in kept)


def test_cli_suggest(qwen_src, copy_of):
    src = copy_of(qwen_src)
    model = load_transformer(src, progress=False)
    save_inputs(src / "sample_inputs.safetensors", recorded_calls(model, n=2))
    result = CliRunner().invoke(main, ["suggest", str(src), "--json", "--quiet", "--max-error", "0.03"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["suggested_error"] <= 0.03 and data["patterns"] == data["ignored_layers"]
    text = CliRunner().invoke(main, ["suggest", str(src), "--quiet"]).stdout
    assert "Suggested ignored_layers:" in text and f"omni-convert convert {src} OUT --preset none" in text
    # and the suggestion converts
    convert_args = ["convert", str(src), str(src.parent / "out"), "--quiet", "--preset", "none"]
    if data["patterns"]:
        convert_args += ["--ignored-layers", ",".join(data["patterns"])]
    assert CliRunner().invoke(main, convert_args).exit_code == 0


def test_cli_suggest_errors(qwen_src, tmp_path):
    result = CliRunner().invoke(main, ["suggest", str(qwen_src)])
    assert result.exit_code == 1 and "no recorded inputs" in result.stderr and "--inputs FILE" in result.stderr
    CliRunner().invoke(main, ["convert", str(qwen_src), str(tmp_path / "fp8"), "--quiet"])
    result = CliRunner().invoke(main, ["suggest", str(tmp_path / "fp8")])
    assert result.exit_code == 1 and "already quantized; suggest measures the high-precision checkpoint" in result.stderr


def test_inputs_from_a_newer_format_are_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"00000.x": torch.ones(1)}, tmp_path / "in.safetensors",
              metadata={"omni-fp8-inputs": json.dumps({"format_version": 99, "other": [{}]})})
    with pytest.raises(CorruptCheckpointError, match="recorded-inputs format_version 99 is not 1 or 2; upgrade omni-fp8"):
        load_inputs(tmp_path / "in.safetensors")


def test_lists_of_tensors_round_trip_and_damaged_lists_are_named(tmp_path):
    """ZImagePipeline passes lists of tensors (latents, prompt embeddings): saved item by item."""
    from safetensors.torch import save_file

    calls = [{"x": [torch.ones(2, 3), torch.zeros(4)], "t": torch.tensor([0.5]), "cap": (torch.ones(1),)}]
    save_inputs(tmp_path / "in.safetensors", calls)
    (back,) = load_inputs(tmp_path / "in.safetensors")
    assert isinstance(back["x"], list) and isinstance(back["cap"], tuple)
    assert torch.equal(back["x"][0], calls[0]["x"][0]) and torch.equal(back["x"][1], calls[0]["x"][1])
    meta = {"omni-fp8-inputs": json.dumps({"format_version": 2, "other": [{"x": {"__tensors__": 2, "tuple": False}}]})}
    save_file({"00000.x[0]": torch.ones(1)}, tmp_path / "short.safetensors", metadata=meta)
    with pytest.raises(CorruptCheckpointError, match="call 0's x lacks some of its 2 tensors"):
        load_inputs(tmp_path / "short.safetensors")
    save_file({"00000.x[5]": torch.ones(1)}, tmp_path / "stray.safetensors", metadata=meta)
    with pytest.raises(CorruptCheckpointError, match=r"'00000.x\[5\]' is not an item of a recorded list"):
        load_inputs(tmp_path / "stray.safetensors")
