"""Frozen layers over GGUF-quantised weights kept packed: :class:`PackedWeight`, :class:`PackedLinear` and
:class:`PackedEmbedding`.

The weight stays in memory as the file's blocks (``uint8 (N, K / block · type_size)``, :mod:`lora_fast.gguf.formats`)
and is dequantised when it is used: a linear layer dequantises its whole weight in forward, uses it and frees it, and
dequantises it again in backward for ``dx = g W`` (nothing of size ``N × K`` is kept between the two); an embedding
dequantises only the rows it looks up. So a model's resident weights are its packed bytes, and at any moment at most
one layer's float weight exists beside them.

Compute dtype: the weight is dequantised in fp32, exactly as ``gguf.dequantize`` does, then cast to the dtype the
layer computes in: ``x``'s, or the autocast dtype under ``torch.autocast`` (as ``nn.Linear`` casts its fp32 weight).
An embedding returns the dtype the module was moved to (fp32 unless ``.double()``, ``.to(dtype)``...), which a 0-element
float buffer ``dtype_marker`` records. The weights have no gradient: they are frozen by construction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lora_fast.gguf.formats import dequantize_rows, qtype_of

__all__ = ["PackedWeight", "PackedLinear", "PackedEmbedding", "packed_linear"]


class PackedWeight:
    """``W (N, K)`` of GGUF format ``qtype`` held as ``data``, its ``uint8 (N, K / block · type_size)`` blocks.

    ``dtype`` is the float dtype the weight stands for (what :meth:`dequantize` gives by default). Not a tensor:
    ``lora_linear`` and the layers here take it where a float ``weight`` would go.
    """

    __slots__ = ("data", "qtype", "shape", "dtype")

    def __init__(self, data: torch.Tensor, qtype: str, shape: tuple[int, int], dtype: torch.dtype = torch.float32):
        fmt = qtype_of(qtype)
        n, k = (int(s) for s in shape)
        if k % fmt.block:
            raise ValueError(f"a {qtype} weight's in_features must be a multiple of {fmt.block}, got {k}")
        want = (n, k // fmt.block * fmt.type_size)
        if not isinstance(data, torch.Tensor) or data.dtype != torch.uint8 or tuple(data.shape) != want:
            got = f"shape {tuple(data.shape)}, dtype {data.dtype}" if isinstance(data, torch.Tensor) else type(data)
            raise ValueError(f"packed {qtype} data of a ({n}, {k}) weight must be uint8 {want}, got {got}")
        if not dtype.is_floating_point:
            raise TypeError(f"a packed weight stands for a float weight; dtype {dtype} is not one")
        self.data, self.qtype, self.shape, self.dtype = data, qtype, torch.Size((n, k)), dtype

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def dim(self) -> int:
        return 2

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float weight ``(N, K)``, newly made (fp32 bit for bit ``gguf.dequantize``, then cast to ``dtype``)."""
        return dequantize_rows(self.data, self.qtype, dtype or self.dtype)

    def rows(self, index: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows ``index`` of the float weight, ``(len(index), K)``: only those rows are dequantised."""
        return dequantize_rows(self.data[index], self.qtype, dtype or self.dtype)

    def __repr__(self) -> str:
        return f"PackedWeight({self.qtype}, shape={tuple(self.shape)}, {self.nbytes:,} bytes, device={self.device})"


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


class _PackedLinearFunction(torch.autograd.Function):
    """``y = x Wᵀ + bias`` with W dequantised in forward and again in backward; saved: ``W``'s packed bytes only."""

    @staticmethod
    def forward(ctx, x, data, bias, qtype, shape, dtype):
        dt = _compute_dtype(x)
        weight = PackedWeight(data, qtype, shape, dtype)
        with torch.autocast(x.device.type, enabled=False):
            y = F.linear(x.to(dt), weight.dequantize(dt), None if bias is None else bias.to(dt))
        ctx.save_for_backward(data)
        ctx.meta = (qtype, shape, dtype, dt, x.dtype, None if bias is None else bias.dtype)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        (data,) = ctx.saved_tensors
        qtype, shape, dtype, dt, x_dtype, bias_dtype = ctx.meta
        dx = d_bias = None
        with torch.autocast(grad_y.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                dx = (grad_y.to(dt) @ PackedWeight(data, qtype, shape, dtype).dequantize(dt)).to(x_dtype)
            if ctx.needs_input_grad[2]:
                g2 = grad_y.reshape(-1, grad_y.shape[-1])
                d_bias = g2.sum(0, dtype=torch.promote_types(g2.dtype, torch.float32)).to(bias_dtype)
        return dx, None, d_bias, None, None, None


def packed_linear(x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, W, bias)`` for a packed ``W``: the same values as ``F.linear`` on the dequantised weight."""
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"x has {x.shape[-1]} features in its last dimension, the packed weight {tuple(weight.shape)} expects "
            f"{weight.shape[1]} (got x of shape {tuple(x.shape)})"
        )
    if x.device != weight.device:
        raise ValueError(f"x is on {x.device} but the packed weight is on {weight.device}")
    return _PackedLinearFunction.apply(x, weight.data, bias, weight.qtype, weight.shape, weight.dtype)


class _PackedModule(nn.Module):
    """What the two packed layers share: the packed bytes ``qweight`` (a buffer, or another layer's when tied) and
    the float dtype they stand for."""

    def _init_packed(self, weight: PackedWeight, source: nn.Module | None) -> None:
        if source is None:
            self.register_buffer("qweight", weight.data)
        # A tied layer reads its source's buffer at every use (kept out of the module tree, so it is saved and
        # moved once): .to(device) moves the one copy, and the two layers stay one weight.
        self.__dict__["_source"] = source
        self.qtype = weight.qtype
        self.register_buffer("dtype_marker", torch.empty(0, dtype=weight.dtype, device=weight.device), persistent=False)

    @property
    def tied_to(self) -> nn.Module | None:
        """The layer whose packed bytes this one reads (a tied LM head's embedding), or None."""
        return self._source

    def _packed(self, shape: tuple[int, int]) -> PackedWeight:
        data = (self._source if self._source is not None else self).qweight
        return PackedWeight(data, self.qtype, shape, self.dtype_marker.dtype)


class PackedLinear(_PackedModule):
    """A frozen ``nn.Linear`` whose weight ``(out_features, in_features)`` stays GGUF-packed (see the module
    docstring); ``bias``, if any, is an ordinary float parameter. ``weight`` is a :class:`PackedWeight`, so
    ``LoRALinear`` wraps this layer as it wraps ``nn.Linear``."""

    def __init__(self, weight: PackedWeight, bias: torch.Tensor | None = None, tied_to: nn.Module | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self._init_packed(weight, tied_to)
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"bias must be ({self.out_features},), got {tuple(bias.shape)}")
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @property
    def weight(self) -> PackedWeight:
        return self._packed((self.out_features, self.in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, self.weight, self.bias)

    def to_float(self) -> nn.Linear:
        """An ``nn.Linear`` holding the dequantised weight (and this layer's bias), frozen, on the same device."""
        w = self.weight.dequantize()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = nn.Parameter(w, requires_grad=False)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=self.bias.requires_grad)
        return linear

    def extra_repr(self) -> str:
        tied = ", tied" if self._source is not None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, qtype={self.qtype}{tied}"


class PackedEmbedding(_PackedModule):
    """A frozen ``nn.Embedding`` whose table ``(num_embeddings, embedding_dim)`` stays GGUF-packed: a lookup
    dequantises only the rows it returns, in the module's float dtype."""

    def __init__(self, weight: PackedWeight, padding_idx: int | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.shape
        self.padding_idx = padding_idx
        self._init_packed(weight, None)

    @property
    def weight(self) -> PackedWeight:
        return self._packed((self.num_embeddings, self.embedding_dim))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"an embedding takes integer ids (int32/int64), got {input_ids.dtype}")
        rows = self.weight.rows(input_ids.reshape(-1))
        return rows.reshape(*input_ids.shape, self.embedding_dim)

    def to_float(self) -> nn.Embedding:
        """An ``nn.Embedding`` holding the dequantised table, frozen, on the same device."""
        emb = nn.Embedding(self.num_embeddings, self.embedding_dim, padding_idx=self.padding_idx, device="meta")
        emb.weight = nn.Parameter(self.weight.dequantize(), requires_grad=False)
        return emb

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, qtype={self.qtype}"
