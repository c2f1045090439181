"""Frozen weights used in the dtype they are stored in: cast on use, never copied whole.

A ComfyUI graph keeps its UNet, VAE and text encoder in whatever dtype its flags chose (fp32, fp16, bf16, or
fp8 for storage only) and computes each in a dtype of its own (ComfyUI's "manual cast"). The engine trains
through views of those tensors, so it must read any stored dtype without a second copy of the model:

- Linear and Conv2d layers compute in the dtype of their input and cast their weight to it on use. For the
  backward pass they keep the stored weight (a reference, not a copy) and cast it again, where plain
  autograd would keep the cast copy of every layer alive until the backward pass: a whole second model.
- Norm layers do the same, keeping their (tiny) cast weights; embeddings give the module's compute dtype.
- The module reports that compute dtype as its `dtype`, so diffusers pipelines feed it inputs of that dtype.

Only frozen weights are handled so: a layer whose weight trains (none in ProtoBooth) computes as usual.
"""
from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError

log = logging.getLogger(__name__)


class _LinearCastOnUse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return grad @ weight.to(grad.dtype), None, None


class _Conv2dCastOnUse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(weight)
        ctx.shape, ctx.settings = x.shape, (stride, padding, dilation, groups)
        return F.conv2d(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype), stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        grad_input = torch.nn.grad.conv2d_input(ctx.shape, weight.to(grad.dtype), grad, *ctx.settings)
        return grad_input, None, None, None, None, None, None


def _frozen(*tensors) -> bool:
    return not any(t is not None and t.requires_grad for t in tensors)


def _cast(tensor, dtype):
    return None if tensor is None else tensor.to(dtype)


class CastLinear(nn.Linear):
    def forward(self, x):
        if _frozen(self.weight, self.bias):
            return _LinearCastOnUse.apply(x, self.weight, self.bias)
        return F.linear(x, self.weight.to(x.dtype), _cast(self.bias, x.dtype))


class CastConv2d(nn.Conv2d):
    def forward(self, x):
        if _frozen(self.weight, self.bias) and self.padding_mode == "zeros" and not isinstance(self.padding, str):
            return _Conv2dCastOnUse.apply(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return self._conv_forward(x, self.weight.to(x.dtype), _cast(self.bias, x.dtype))


class CastLayerNorm(nn.LayerNorm):
    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, _cast(self.weight, x.dtype), _cast(self.bias, x.dtype), self.eps)


class CastGroupNorm(nn.GroupNorm):
    def forward(self, x):
        return F.group_norm(x, self.num_groups, _cast(self.weight, x.dtype), _cast(self.bias, x.dtype), self.eps)


class CastEmbedding(nn.Embedding):
    compute_dtype = torch.float32

    def forward(self, ids):
        return F.embedding(ids, self.weight, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq,
                           self.sparse).to(self.compute_dtype)


_CAST_CLASSES = {nn.Linear: CastLinear, nn.Conv2d: CastConv2d, nn.LayerNorm: CastLayerNorm,
                 nn.GroupNorm: CastGroupNorm, nn.Embedding: CastEmbedding}


@functools.lru_cache(maxsize=None)
def _reporting(cls: type) -> type:
    """A subclass of `cls` whose `dtype` is the compute dtype it was given (same name, so it reads the same)."""
    return type(cls.__name__, (cls,), {"dtype": property(lambda self: self._compute_dtype), "__module__": cls.__module__,
                                       "__qualname__": cls.__qualname__})


def compute_in(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Make `module` compute in `dtype` over weights stored in any float dtype, casting on use (see above).

    Layers of exactly the classes above change class in place (same parameters, no copy); any other module
    that owns float parameters of another dtype is refused, since its weights would be used uncast.
    """
    for submodule in module.modules():
        cast_class = _CAST_CLASSES.get(type(submodule))
        if cast_class is not None:
            submodule.__class__ = cast_class
            if cast_class is CastEmbedding:
                submodule.compute_dtype = dtype
            continue
        if type(submodule) in _CAST_CLASSES.values():
            continue
        own = [name for name, p in submodule.named_parameters(recurse=False) if p.is_floating_point() and p.dtype != dtype]
        if own:
            raise TypeError(f"{type(submodule).__name__} keeps {own[0]} in a dtype it cannot compute in; "
                            "add its class to precision._CAST_CLASSES")
    module.__class__ = _reporting(type(module))
    module._compute_dtype = dtype
    return module


def weights_dtype(setting: str, device: torch.device) -> torch.dtype:
    """The dtype the engine loads a model in when it owns it (CLI, batch, library callers who ask).

    Half precision is stored, not autocast: autocast over fp32 weights keeps a cast copy of every frozen weight
    alive until the backward pass, so it costs more memory than fp32. Stored in bf16/fp16 the frozen weights
    take half the memory and need no casts; the trainables (LoRA, token vectors, optimiser state) stay in fp32
    either way, as in diffusers' training scripts under mixed precision.
    """
    return autocast_dtype(setting, device) or torch.float32


def autocast_dtype(setting: str, device: torch.device):
    """The autocast dtype for this setting on this device, or None for full precision.

    On CPU only an explicit bf16 casts: it is faster only where the CPU has bf16 matrix units (e.g. AMX),
    and auto keeps CPU runs in fp32 (bf16 would change a run's numbers on some CPUs and not on others).
    """
    if setting == "no":
        return None
    if device.type == "cuda":
        if setting == "fp16":
            return torch.float16
        if setting == "bf16" or torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16
    if setting == "fp16":
        raise InputError(f"fp16 mixed precision needs a CUDA GPU (the model is on {device}); use bf16 or no.")
    if setting != "bf16":
        if cpu_has_bf16_units():
            _suggest_bf16()
        return None
    if not cpu_has_bf16_units():
        _warn_slow_bf16()
    return torch.bfloat16


def cpu_has_bf16_units() -> bool:
    """Whether this CPU computes bf16 matrices in hardware (AVX512-BF16 or AMX), as oneDNN reports it."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


@functools.lru_cache(maxsize=1)
def _suggest_bf16() -> None:
    # benchmarks/results/train_speed.md, SD1.5 size on an AVX512-BF16 CPU: stored bf16 took 0.56x fp32's step time
    # at 0.58x its peak memory.
    log.info("this CPU computes bf16 in hardware: mixed precision bf16 would train about twice as fast in about "
             "0.6x the memory (auto keeps a CPU in fp32)")


@functools.lru_cache(maxsize=1)
def _warn_slow_bf16() -> None:
    # Measured on an AVX2-only CPU: a 512x512 bf16 matmul or a 320-channel conv took 70-110x its fp32 time.
    log.warning("bf16 on this CPU: it has no bf16 matrix units (AVX512-BF16 or AMX), so bf16 layers run many times "
                "slower than fp32 (70-110x measured on an AVX2-only CPU); use mixed precision no (or auto) here.")
