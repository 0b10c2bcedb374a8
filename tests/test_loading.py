"""Loading allocates the backbone once: built on the meta device, filled with one copy of the checkpoint's tensors."""

import pytest
import torch
from diffusers import SD3Transformer2DModel
from torch.utils._python_dispatch import TorchDispatchMode

from dinalrm.testing import get_tiny_dinalrm_reward_model, tiny_transformer_config
from modeling_dinalrm import DiNaLRMModel


LAYERS = {"num_layers": 2, "visual_layers": [1, 2], "text_layers": [1, 2], "head_num_heads": 2}


class AllocatedBytes(TorchDispatchMode):
    """Total bytes of the CPU tensors that ops create while the mode is active (meta tensors cost nothing)."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage()._cdata for t in torch.utils._pytree.tree_leaves((args, kwargs)) if torch.is_tensor(t)
        }
        for tensor in torch.utils._pytree.tree_leaves(out):
            if torch.is_tensor(tensor) and not tensor.is_meta and tensor.untyped_storage()._cdata not in inputs:
                self.total += tensor.untyped_storage().nbytes()
        return out


def nbytes(module: torch.nn.Module) -> int:
    return sum(t.nbytes for t in module.state_dict().values())


def construction_bytes(model: DiNaLRMModel) -> int:
    """What building the model on the meta device allocates anyway (the scheduler's noise-level tables)."""
    with AllocatedBytes() as allocated, torch.device("meta"):
        DiNaLRMModel(model.config)
    return allocated.total


@pytest.fixture(scope="module")
def backbone_dir(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("backbone")
    SD3Transformer2DModel(**tiny_transformer_config(num_layers=4)).save_pretrained(folder)
    return folder


def test_from_backbone_allocates_one_backbone_copy(backbone_dir):
    """Same dtype as the file: one copy of the backbone and the fresh head (no buffer filled twice)."""
    with AllocatedBytes() as allocated:
        model = DiNaLRMModel.from_backbone(backbone_dir, **LAYERS)
    head = nbytes(model.reward_head)
    assert nbytes(model.backbone) > head
    assert allocated.total == construction_bytes(model) + head + nbytes(model.backbone)


def test_from_backbone_casts_into_one_copy(backbone_dir):
    """A float32 file loaded in bfloat16: one bfloat16 copy of the backbone, never a float32 one on top."""
    with AllocatedBytes() as allocated:
        model = DiNaLRMModel.from_backbone(backbone_dir, torch_dtype=torch.bfloat16, **LAYERS)
    head_fp32 = 2 * nbytes(model.reward_head)  # initialised in float32, then cast
    expected = construction_bytes(model) + head_fp32 + nbytes(model.reward_head) + nbytes(model.backbone)
    assert allocated.total == expected
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_from_backbone_weights_equal_the_checkpoint(backbone_dir):
    full = SD3Transformer2DModel.from_pretrained(backbone_dir).state_dict()
    model = DiNaLRMModel.from_backbone(backbone_dir, **LAYERS)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    for name, value in model.backbone.state_dict().items():
        assert torch.equal(value, full[name]), name


def test_from_pretrained_allocates_no_model_copy(tmp_path):
    """transformers' loading, as we call it, assigns the file's memory-mapped tensors (LoRA included, never re-drawn)."""
    source = get_tiny_dinalrm_reward_model(lora_rank=4)
    source.save_pretrained(tmp_path, merge_lora=False)
    with AllocatedBytes() as allocated:
        model = DiNaLRMModel.from_pretrained(tmp_path)
    assert allocated.total == construction_bytes(model)
    for (name, a), b in zip(source.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    assert {n for n, p in model.named_parameters() if p.requires_grad and n.startswith("backbone.")} == {
        n for n, _ in model.named_parameters() if ".lora_" in n
    }
