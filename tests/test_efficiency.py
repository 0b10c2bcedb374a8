"""Tests of eval/efficiency.py: hand-checkable FLOP counts, the memory tracker, tiny models, and the full script."""

import json
import runpy
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dinalrm.evaluation import efficiency
from dinalrm.testing import tiny_flux_transformer_config, tiny_zimage_transformer_config


REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "eval" / "efficiency.py"


TINY_TRANSFORMER = {
    "sample_size": 8,
    "patch_size": 2,
    "in_channels": 4,
    "out_channels": 4,
    "num_layers": 4,
    "attention_head_dim": 8,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "caption_projection_dim": 16,
    "pooled_projection_dim": 24,
    "pos_embed_max_size": 16,
    "dual_attention_layers": [0],
    "qk_norm": "rms_norm",
}
TINY_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "block_out_channels": [32, 32],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "scaling_factor": 1.5,
    "shift_factor": 0.1,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
TINY_QWEN2_VL = {
    "text_config": {
        "vocab_size": 100,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
    },
    "vision_config": {
        "depth": 2,
        "embed_dim": 32,
        "hidden_size": 64,
        "mlp_ratio": 2,
        "num_heads": 2,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    },
}
TINY_CLIP = {
    "projection_dim": 16,
    "text_config": {
        "vocab_size": 100,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "max_position_embeddings": 16,
    },
    "vision_config": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 28,
        "patch_size": 14,
    },
}


def meta_input(*shape: int) -> Callable[[], torch.Tensor]:
    """A factory of zero bf16 meta tensors of `shape`."""
    return lambda: torch.zeros(shape, device="meta", dtype=efficiency.DTYPE)


def test_linear_flops_are_2mnk_and_refl_adds_only_the_input_gradient():
    m, k, n = 64, 48, 40
    linear = efficiency.on_meta(lambda: nn.Linear(k, n))
    cost = efficiency.measure(linear, meta_input(m, k))
    assert cost.flops_forward == 2 * m * n * k
    # Frozen weights: the backward computes only d input = d output @ W (no weight gradient).
    assert cost.flops_refl == 2 * (2 * m * n * k)


def test_attention_flops_are_two_matmuls_of_2mnk():
    batch, heads, queries, keys, dim = 2, 3, 10, 14, 8
    k = torch.zeros(batch, heads, keys, dim, device="meta")
    v = torch.zeros(batch, heads, keys, dim, device="meta")
    cost = efficiency.measure(
        lambda q: F.scaled_dot_product_attention(q, k, v), meta_input(batch, heads, queries, dim)
    )
    by_hand = 2 * (2 * batch * heads * queries * keys * dim)  # q @ k^T and softmax(.) @ v
    assert cost.flops_forward == by_hand
    with FlopCounterMode(display=False) as unfused:  # PyTorch's own (math) path counts the same two matmuls
        F.scaled_dot_product_attention(torch.zeros(batch, heads, queries, dim, device="meta"), k, v)
    assert unfused.get_total_flops() == by_hand


def test_grouped_query_attention_costs_as_many_flops_as_full_heads():
    q = torch.zeros(1, 8, 12, 16, device="meta")
    kv = torch.zeros(1, 2, 12, 16, device="meta")
    with FlopCounterMode(display=False) as grouped:
        out = efficiency.fused_sdpa(q, kv, kv, enable_gqa=True)
    assert out.shape == q.shape
    assert grouped.get_total_flops() == 2 * (2 * 8 * 12 * 12 * 16)


def test_memory_tracker_counts_new_storages_while_they_live():
    x = torch.zeros(1000, device="meta")  # an input: never counted
    with efficiency.PeakMemoryMode() as memory:
        y = x + 1
        view = y.view(10, 100)  # shares y's storage
        z = view + 1
        assert memory.current == 2 * 4000
        del y, view
        w = z * 2
        assert memory.current == 2 * 4000
        del z, w
        assert memory.current == 0
    assert memory.peak == 2 * 4000


def test_remembered_ops_give_the_outputs_and_memory_of_running_them():
    """Ops the FLOP counter ignores are answered from the shapes they gave before (the cost model's speed-up): the
    outputs must be those of the op itself (shape, stride, dtype), fresh storages that count, whether it ran or
    was remembered."""
    x = torch.zeros(4, 6, 8, device="meta", dtype=torch.bfloat16).transpose(1, 2)  # not contiguous
    y = torch.zeros(6, device="meta")
    ops = {
        "broadcast mul with promotion": lambda: x * y,
        "sum keeping a dim": lambda: x.sum(1, keepdim=True),
        "float cast": lambda: x.float(),
        "softmax": lambda: torch.softmax(x, -1),
        "layer norm": lambda: F.layer_norm(x, (6,)),
        "permuted copy": lambda: x.permute(2, 0, 1).contiguous(),
        "gelu": lambda: F.gelu(x, approximate="tanh"),
    }
    for name, op in ops.items():
        expected = op()  # plain meta execution, no mode
        for attempt in ("first", "again"):
            with efficiency.PeakMemoryMode() as memory:
                out = op()
                assert memory.current == out.untyped_storage().nbytes() > 0, (name, attempt)
            assert (out.shape, out.stride(), out.dtype) == (expected.shape, expected.stride(), expected.dtype), name
            assert out.untyped_storage()._cdata not in {x.untyped_storage()._cdata, y.untyped_storage()._cdata}


def test_live_memory_after_forward_equals_saved_tensors():
    model = efficiency.build_dinalrm(TINY_TRANSFORMER, num_blocks=2, layers=(1, 2))
    reward = efficiency.dinalrm_reward(model, text_tokens=6)
    weights = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}
    saved = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in weights:
            saved[storage._cdata] = storage.nbytes()
        return tensor

    x = meta_input(1, 4, 8, 8)().requires_grad_()
    with efficiency.fused_attention(), efficiency.PeakMemoryMode() as memory:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            score = reward(x).sum()
        live_after_forward = memory.current
    assert sum(saved.values()) > 0
    assert live_after_forward - score.untyped_storage().nbytes() == sum(saved.values())


def test_dinalrm_flops_grow_by_one_block_per_block():
    costs = []
    for blocks in (1, 2, 3):  # the head always reads the last block, so gradients run through all of them
        model = efficiency.build_dinalrm(TINY_TRANSFORMER, num_blocks=blocks, layers=(blocks,))
        costs.append(efficiency.measure(efficiency.dinalrm_reward(model, 6), meta_input(1, 4, 8, 8)))
    # Blocks 2 and 3 are single-attention joint blocks (only block 1 is dual) of width c over n image and
    # m text tokens: adaLN of both streams (2 x c -> 6c on one embedding), q/k/v/out projections and a
    # 4x feed-forward for both streams, joint attention over n + m tokens.
    c, n, m = 16, 16, 6
    projections = 2 * (4 * c * c + 8 * c * c) * (n + m)
    attention = 2 * (2 * (n + m) ** 2 * c)
    block_forward = 2 * (2 * 6 * c * c) + projections + attention
    # ReFL backward of a frozen block: input gradients of the token projections (temb needs none) and the fused
    # attention backward (2.5x its forward).
    block_backward = projections + 5 * attention // 2
    forward = [cost.flops_forward for cost in costs]
    refl = [cost.flops_refl for cost in costs]
    assert forward[1] - forward[0] == forward[2] - forward[1] == block_forward
    assert refl[1] - refl[0] == refl[2] - refl[1] == block_forward + block_backward
    assert costs[0].peak_refl < costs[1].peak_refl < costs[2].peak_refl


def joint_block_flops(c: int, n: int, m: int) -> tuple[int, int, int]:
    """Forward FLOPs of one SD3 / FLUX joint block of width c over n image and m text tokens, split into the adaLN
    of both streams (2 x c -> 6c on one embedding), the token projections (q/k/v/out and a 4x feed-forward for both
    streams) and the joint attention over n + m tokens."""
    adaln = 2 * (2 * 6 * c * c)
    projections = 2 * (4 * c * c + 8 * c * c) * (n + m)
    attention = 2 * (2 * (n + m) ** 2 * c)
    return adaln, projections, attention


def test_flux_dinalrm_flops_grow_by_one_hand_counted_double_stream_block():
    config = tiny_flux_transformer_config()
    forward, refl = [], []
    for blocks in (1, 2, 3):
        model = efficiency.build_dinalrm(config, num_blocks=blocks, layers=(blocks,), backbone="flux")
        cost = efficiency.measure(efficiency.dinalrm_reward(model, 6), meta_input(1, 16, 8, 8))
        forward.append(cost.flops_forward)
        refl.append(cost.flops_refl)
    # 8x8 latents packed 2x2: 16 image tokens; FLUX's double-stream block has the same matmuls as SD3's joint block.
    adaln, projections, attention = joint_block_flops(32, 16, 6)
    assert forward[1] - forward[0] == forward[2] - forward[1] == adaln + projections + attention
    assert refl[1] - refl[0] == adaln + 2 * projections + attention + 5 * attention // 2


def test_zimage_dinalrm_runs_on_meta_and_grows_linearly_in_layers():
    config = tiny_zimage_transformer_config()
    costs = []
    for layers in (1, 2, 3):
        model = efficiency.build_dinalrm(config, num_blocks=layers, layers=(layers,), backbone="zimage")
        costs.append(efficiency.measure(efficiency.dinalrm_reward(model, 8), meta_input(1, 16, 8, 8)))
    flops = [cost.flops_refl for cost in costs]
    assert 0 < flops[1] - flops[0] == flops[2] - flops[1]
    assert all(0 < cost.flops_forward < cost.flops_refl for cost in costs)


def tiny_generator_step(num_layers: int, trainable: bool) -> tuple[int, efficiency.StepCost]:
    """Parameter bytes (bf16) of a tiny SD3 generator and its whole ReFL step with a FLOP-free reward (a mean)."""
    generator = efficiency.build_generator({**TINY_TRANSFORMER, "num_layers": num_layers})
    generator.requires_grad_(trainable)
    param_bytes = 2 * sum(p.numel() for p in generator.parameters())
    step = efficiency.measure_step(generator, lambda x0: x0.float().mean(), (1, 4, 8, 8), text_tokens=6)
    return param_bytes, step


def test_generator_step_flops_per_block_match_a_hand_count():
    # Going from 2 to 3 generator layers adds one plain joint block (block 0 is dual, the last is context-pre-only).
    adaln, projections, attention = joint_block_flops(16, 16, 6)
    full = [tiny_generator_step(layers, trainable=True)[1].flops for layers in (2, 3)]
    # Full fine-tuning: forward, input gradient and weight gradient of every linear layer (the timestep embedding
    # carries gradients into adaLN too), fused attention forward + backward (1 + 2.5).
    assert full[1] - full[0] == 3 * adaln + 3 * projections + 7 * attention // 2
    frozen = [tiny_generator_step(layers, trainable=False)[1].flops for layers in (2, 3)]
    # Frozen (LoRA-like): no weight gradients, and the constant timestep embedding needs no gradient.
    assert frozen[1] - frozen[0] == adaln + 2 * projections + 7 * attention // 2


def test_generator_step_memory_holds_the_weight_gradients():
    param_bytes, full = tiny_generator_step(2, trainable=True)
    _, frozen = tiny_generator_step(2, trainable=False)
    assert full.activation_peak >= param_bytes  # every weight's bf16 gradient is live at the end of backward
    assert frozen.activation_peak < full.activation_peak


def test_whole_step_adds_the_same_generator_share_to_each_reward():
    generator = efficiency.build_generator({**TINY_TRANSFORMER, "num_layers": 2})
    model = efficiency.build_dinalrm(TINY_TRANSFORMER, num_blocks=2, layers=(1, 2))
    rewards = {"mean": lambda x0: x0.float().mean(), "dinalrm": efficiency.dinalrm_reward(model, 6)}
    steps = {name: efficiency.measure_step(generator, reward, (1, 4, 8, 8), 6) for name, reward in rewards.items()}
    reward_alone = efficiency.measure(rewards["dinalrm"], meta_input(1, 4, 8, 8))
    assert steps["dinalrm"].flops == steps["mean"].flops + reward_alone.flops_refl
    assert all(p.grad is None for p in generator.parameters())  # gradients dropped after the step


def test_qwen2_vl_attention_hand_count_matches_the_meta_model():
    budget, around = (56 * 56, 56 * 56), (3, 5)
    model = efficiency.build_hpsv3(TINY_QWEN2_VL)
    pixels = meta_input(1, 3, 56, 56)().requires_grad_()
    with efficiency.fused_attention(), FlopCounterMode(display=False) as fused:
        efficiency.hpsv3_reward(model, budget, around)(pixels).sum().backward()
    model.qwen.set_attn_implementation("eager")
    with FlopCounterMode(display=False) as eager:
        efficiency.hpsv3_reward(model, budget, around)(pixels).sum().backward()
    # The fused attention backward recomputes the scores: half an attention forward more than eager attention.
    half_attention = efficiency.qwen2_vl_attention_flops(TINY_QWEN2_VL, 56, sum(around)) // 2
    assert fused.get_total_flops() - eager.get_total_flops() == half_attention


def test_models_are_never_materialised_and_pixel_rewards_run():
    dinalrm = efficiency.build_dinalrm(TINY_TRANSFORMER, num_blocks=2, layers=(2,))
    vae = efficiency.build_vae(TINY_VAE)
    hpsv3 = efficiency.build_hpsv3(TINY_QWEN2_VL)
    pickscore = efficiency.build_pickscore(TINY_CLIP)
    for module in (dinalrm, vae, hpsv3, pickscore):
        tensors = [*module.parameters(), *module.buffers()]
        assert tensors and all(t.is_meta for t in tensors)
        assert not any(p.requires_grad for p in module.parameters())
    decode = efficiency.vae_decode(vae)
    hps = efficiency.hpsv3_reward(hpsv3, pixel_budget=(56 * 56, 56 * 56), tokens_around=(3, 5))
    pick = efficiency.pickscore_reward(pickscore, text_tokens=8)
    for reward in (lambda z: hps(decode(z)), lambda z: pick(decode(z))):
        row = efficiency.profile("tiny", reward, (1, 4, 16, 16), [vae])
        assert 0 < row.flops_forward < row.flops_refl
        assert 0 < row.activation_peak_forward < row.activation_peak_refl


def test_qwen_resize_matches_hpsv3_input_size():
    assert efficiency.qwen_resize(1024, 1024, efficiency.HPSV3_PIXELS, efficiency.HPSV3_PIXELS) == (448, 448)
    assert efficiency.qwen_resize(1024, 1024, 56 * 56, 1280 * 28 * 28) == (980, 980)


@pytest.mark.slow  # every model on real configs plus four whole ReFL steps of SD3.5-M: ~1 min on a 2-core machine
def test_script_prints_the_table_and_writes_json(tmp_path, monkeypatch, capsys):
    """`python eval/efficiency.py --json PATH` as `python` runs it (`__main__`, arguments from `sys.argv`), in this
    process: a fresh interpreter would only add ~10 s of importing torch, diffusers and transformers again."""
    out = tmp_path / "efficiency.json"
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--json", str(out)])
    with pytest.raises(SystemExit) as exit_status:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    assert exit_status.value.code == 0
    done = capsys.readouterr()
    assert "GFLOPs" in done.out and "peak ReFL" in done.out and "whole-step FLOPs" in done.out
    result = json.loads(out.read_text())
    names = [row["name"] for row in result["rows"]]
    assert names[0] == "DiNa-LRM (154 text tokens)" and names[1] == "DiNa-LRM (205 text tokens)"
    assert all(name in done.out for name in names)
    assert all(row["flops_forward"] < row["flops_refl"] for row in result["rows"])
    assert result["ratios"] and result["paper"]["refl_peak_vram_change_vs_hpsv3"] == -0.514
    assert any(name.startswith("DiNa-LRM flux") for name in names) and any("zimage" in name for name in names)
    # The modelled whole step reproduces the H200 measurement: DiNa-LRM's FLOPs exactly (the same counter on the
    # same ops), the changes vs HPSv3 within a point.
    step = result["whole_step"]
    measured = step["measured"]["rewards"]["DiNa-LRM"]
    assert step["modelled"]["DiNa-LRM"]["whole_step"]["flops"] == measured["whole_step"]["flops"]
    assert step["modelled"]["DiNa-LRM"]["reward"]["flops"] == measured["reward"]["flops"]
    for key, value in step["modelled_change"].items():
        assert abs(value - step["measured"]["change_vs_hpsv3"][key]) < 0.01
    assert "Why the paper's percentages differ" in done.out and "-46.4%" in done.out
