"""Fast paths for the renderer's convolutions: same results within float32 rounding, fewer seconds per frame.

Not the paper's layers (those are in ``blocks.py`` and the network files) but how some of them are computed:
3x3 convolutions through NNPACK's Winograd kernels, 3-D convolutions as NNPACK depth slices, nearest up-sampling
followed by a 3x3 convolution folded into one smaller convolution per output phase, and caches of tensors derived
from weights. ``reference_computation()`` switches all of it off (side-by-side checks, speed comparisons).

Reduced precision is opt-in and per layer: within ``conv_precision(torch.bfloat16)`` (or float16 on a GPU) the
convolutions -- nearly all of the renderer's arithmetic -- take their inputs and weights rounded to that type (oneDNN
runs them on AMX / AVX-512 BF16 units, in channels-last layout, accumulating in float32) and hand back float32
activations -- except maps that only feed another convolution (the SPADE hidden maps and modulated activations,
``low_precision_out``), which stay in the reduced type rather than be widened and rounded again; everything whose
precision matters stays float32: normalisation statistics, softmax, the keypoint Gaussians, the sampling grids and
``grid_sample``, pooling, the residual sums.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import threading

import torch
import torch.nn.functional as F
from torch import nn


_FAST_PATHS: contextvars.ContextVar[bool] = contextvars.ContextVar("fast_paths", default=True)
_CONV_DTYPE: contextvars.ContextVar[torch.dtype | None] = contextvars.ContextVar("conv_dtype", default=None)
LOW_PRECISION_DTYPES = (torch.bfloat16, torch.float16)


@contextlib.contextmanager
def reference_computation():
    """Within this block (this thread / context) the networks compute as the reference code does: plain
    ``F.conv2d``, each SPADE on its own up-sampled label map. For side-by-side checks and speed comparisons."""
    token = _FAST_PATHS.set(False)
    try:
        yield
    finally:
        _FAST_PATHS.reset(token)


def fast_paths_enabled() -> bool:
    return _FAST_PATHS.get()


@contextlib.contextmanager
def conv_precision(dtype: torch.dtype | None):
    """Within this block (this thread / context) convolutions of float32 activations compute in ``dtype``
    (``torch.bfloat16`` / ``torch.float16``; None: as the activations). See the module docstring."""
    if dtype is not None and dtype not in LOW_PRECISION_DTYPES:
        raise ValueError(f"convolution precision must be one of {LOW_PRECISION_DTYPES} or None, got {dtype}")
    token = _CONV_DTYPE.set(dtype)
    try:
        yield
    finally:
        _CONV_DTYPE.reset(token)


def _low_precision(x: torch.Tensor) -> torch.dtype | None:
    """The reduced dtype this convolution of x runs in (in force, no autograd; x float32 or already that type)."""
    dtype = _CONV_DTYPE.get()
    if dtype is None or x.dtype not in (torch.float32, dtype) or torch.is_grad_enabled():
        return None
    return dtype


def low_precision_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The reduced type convolutions of x compute in here (None: x's own): for layers that prepare their input."""
    return _low_precision(x)


def _cached_on(weight: torch.Tensor, attribute: str, build, *args):
    """``build(weight, *args)``, kept on the weight tensor itself until it changes (parameters: their version
    counter; tensors derived from weights are replaced, not modified, when rebuilt)."""
    try:
        version = weight._version
    except RuntimeError:  # an inference-mode tensor (derived from weights): never modified in place
        version = -1
    key = (version, weight.dtype, weight.device, *args)
    cached = getattr(weight, attribute, None)
    if cached is not None and cached[0] == key:
        return cached[1]
    value = build(weight, *args)
    setattr(weight, attribute, (key, value))
    return value


def _to_low_precision(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    layout = torch.channels_last if weight.dim() == 4 else torch.channels_last_3d
    return weight.detach().to(dtype).contiguous(memory_format=layout)


def _low_precision_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight`` rounded to ``dtype`` in channels-last layout (cached on the weight)."""
    return _cached_on(weight, "_low_precision_copy", _to_low_precision, dtype)


def low_precision_layout(x: torch.Tensor) -> torch.Tensor:
    """x in channels-last layout where reduced precision is in force (else x): the convolutions then cast their
    inputs without transposing them, and the layers between them keep that layout."""
    if _low_precision(x) is None:
        return x
    return x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)


def convolve(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: int | tuple = 0,
             low_precision_out: bool = False) -> torch.Tensor:
    """``F.conv2d`` / ``F.conv3d`` (by the weight's rank, stride 1), in reduced precision where it is in force:
    x and the weight rounded to it, channels-last, the result back in float32, channels-last (see
    ``low_precision_layout``). ``low_precision_out``: the result is left in the reduced type (a caller that only
    feeds it to another convolution, or to arithmetic with float32 tensors that promotes it, saves two passes)."""
    conv = F.conv2d if weight.dim() == 4 else F.conv3d
    dtype = _low_precision(x)
    if dtype is None:
        return conv(x, weight, bias, padding=padding)
    layout = torch.channels_last if weight.dim() == 4 else torch.channels_last_3d
    low_bias = None if bias is None else bias.to(dtype)
    out = conv(x.to(dtype, memory_format=layout), _low_precision_weight(weight, dtype), low_bias, padding=padding)
    return out if low_precision_out else out.float()


@functools.lru_cache(maxsize=1)
def _nnpack_ready() -> bool:
    # NNPACK must be initialised through _nnpack_available() before its convolution can be called.
    try:
        return bool(torch._nnpack_available())
    except Exception:  # pragma: no cover - builds without NNPACK
        return False


# Winograd F(4x4, 3x3) (Lavin & Gray 2016, interpolation points 0, +-1, +-2, inf): a 6x6 input tile -> a 4x4 output
# tile with 36 instead of 144 multiplies per channel pair. Input transform B^T d B, kernel G g G^T, output A^T m A.
_WINOGRAD_BT = ((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0),
                (0, -2, -1, 2, 1, 0), (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1))
_WINOGRAD_G = ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6),
               (1 / 24, 1 / 12, 1 / 6), (1 / 24, -1 / 12, 1 / 6), (0, 0, 1))
_WINOGRAD_AT = ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1))
_WINOGRAD_ALL_ONES_POINT = 1 * 6 + 1  # flat index of point (1, 1): A^T e_1 = (1, 1, 1, 1)
# Bytes of the largest transformed array of a band (rows of tiles, times depth slices): a few MB stay in cache,
# where a whole 256x256 map would take hundreds of MB, and the matrix products stay wide enough for MKL.
WINOGRAD_BAND_BYTES = 8 << 20
# ... but at least this many tiles per band (if the map has them): with many channels (the 1536 merged SPADE hidden
# channels) 8 MB would be 2 rows of tiles, and products only 32 columns wide run at half MKL's speed.
WINOGRAD_MIN_BAND_TILES = 128
# Fewer output channels than this: the transforms would cost more than the products they save.
WINOGRAD_MIN_OUT_CHANNELS = 16
# 3x3x3 convolutions on maps down to one tile (4x4) beat oneDNN's direct 3-D convolution by 2-4x (measured, one
# thread: the hourglass's 512 -> 1024 channels at 16 x 4 x 4 took 125 ms, by Winograd 42 ms; 16 -> 16 at 8 x 8 too).
WINOGRAD_3D_MIN_SIZE = 4


@functools.lru_cache(maxsize=8)
def _winograd_transforms(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    bt = torch.tensor(_WINOGRAD_BT, dtype=torch.float64)
    at = torch.tensor(_WINOGRAD_AT, dtype=torch.float64)
    # on a flattened 6x6 tile (row-major): kron(B^T, B^T) . vec(d) = vec(B^T d B)
    return (torch.kron(bt, bt).float().to(device), torch.kron(at, at).float().to(device))  # (36, 36), (16, 36)


def winograd_weight(weight: torch.Tensor) -> torch.Tensor:
    """(C_out, C_in, 3, 3) -> (36, C_out, C_in), or (C_out, C_in, 3, 3, 3) -> (3, 36, C_out, C_in) (per depth tap):
    G g G^T of every 3x3 kernel, computed in float64."""
    g = torch.tensor(_WINOGRAD_G, dtype=torch.float64, device=weight.device)
    w = weight.detach().double()
    if w.dim() == 5:
        u = torch.einsum("ik,ocdkl,jl->dijoc", g, w, g)  # (3, 6, 6, C_out, C_in)
        return u.reshape(w.shape[2], 36, w.shape[0], w.shape[1]).to(weight.dtype).contiguous()
    u = torch.einsum("ik,ockl,jl->ijoc", g, w, g)  # (6, 6, C_out, C_in)
    return u.reshape(36, weight.shape[0], weight.shape[1]).to(weight.dtype).contiguous()


class _Workspace(threading.local):
    """Per-thread scratch memory for the Winograd bands, kept between calls: fresh buffers of this size would be
    new pages from the kernel on every band (zero-filled on first touch), which costs as much as the products."""

    def __init__(self):
        self.buffers: dict[tuple[str, torch.device], torch.Tensor] = {}

    def get(self, name: str, numel: int, device: torch.device) -> torch.Tensor:
        buffer = self.buffers.get((name, device))
        if buffer is None or buffer.numel() < numel:
            buffer = torch.empty(numel, dtype=torch.float32, device=device)
            self.buffers[(name, device)] = buffer
        return buffer[:numel]


_WORKSPACE = _Workspace()


def _padded_channels_last(x: torch.Tensor, th: int, tw: int) -> torch.Tensor:
    """x (D, H, W, C) -> (D, 4*th + 2, 4*tw + 2, C) in this thread's scratch memory: x with a zero ring of 1 pixel
    (more at the far edges up to whole tiles); copied as runs of C values, only the ring is zeroed."""
    d, h, w, c = x.shape
    padded = _WORKSPACE.get("padded", d * (4 * th + 2) * (4 * tw + 2) * c, x.device).view(d, 4 * th + 2, 4 * tw + 2, c)
    padded[:, 0].zero_()
    padded[:, h + 1:].zero_()
    padded[:, 1:h + 1, 0].zero_()
    padded[:, 1:h + 1, w + 1:].zero_()
    padded[:, 1:h + 1, 1:w + 1].copy_(x)
    return padded


def _winograd_volume(x: torch.Tensor, taps: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor,
                     negative_slope: float | None = None, channels_last: bool = False) -> None:
    """out (C_out, D, H, W) = the 3x3 'same' convolution of the volume x (C, D, H, W) with ``taps`` (k, 36, C_out, C)
    depth taps (k = 1: each depth slice on its own, k = 3: a 3x3x3 convolution zero-padded in depth), followed by
    ``leaky_relu(., negative_slope)`` unless None (0: ReLU), applied to each band while it is in cache.

    ``channels_last`` (k = 1 only): x is given as (D, H, W, C) with the channels innermost in memory (a channels-last
    map, or a channel slice of one): its tiles are gathered as runs of C values, where bringing it to the planar
    layout first was a transposing copy at ~0.5 GB/s (the 256x256 SPADE hidden maps).

    Band by band (rows of tiles, every depth slice): input tiles -> B^T d B (one matrix product), then per Winograd
    point the products summed over the input channels and depth taps (k accumulating matrix products on shifted
    depth windows of the transformed input), then A^T m A (one matrix product) straight into ``out``.
    """
    d, h, w, c = x.shape if channels_last else (x.shape[1], x.shape[2], x.shape[3], x.shape[0])
    k, _, c_out, _ = taps.shape
    assert k == 1 or not channels_last
    th, tw = -(-h // 4), -(-w // 4)
    kb, ka = _winograd_transforms(x.device)
    dp = d + k - 1
    if channels_last:
        padded = _padded_channels_last(x, th, tw)  # (D, 4*th + 2, 4*tw + 2, C)
    else:  # (C, D + k - 1, 4*th + 2, 4*tw + 2): zero ring of 1 pixel (more at the far edges up to whole tiles)
        padded = F.pad(x, (1, tw * 4 + 1 - w, 1, th * 4 + 1 - h, k // 2, k // 2))
    row_bytes = 36 * 4 * max(c * dp, c_out * d) * tw  # the largest transformed array, per row of tiles
    rows = max(1, min(th, max(WINOGRAD_BAND_BYTES // row_bytes, -(-WINOGRAD_MIN_BAND_TILES // tw))))
    most = rows * tw
    scratch_in = _WORKSPACE.get("in", max(36 * c * dp, 16 * c_out * d) * most, x.device)  # input tiles, then A^T m A
    scratch_v = _WORKSPACE.get("v", 36 * c * dp * most, x.device)
    scratch_m = _WORKSPACE.get("m", 36 * c_out * d * most, x.device)
    for r0 in range(0, th, rows):
        r1 = min(th, r0 + rows)
        tiles = (r1 - r0) * tw
        v = scratch_v[:36 * c * dp * tiles].view(36, c * dp * tiles)
        if channels_last:
            band = padded[:, 4 * r0:4 * r1 + 2]  # (D, 4*rows + 2, 4*tw + 2, C)
            tile_in = band.unfold(1, 6, 4).unfold(2, 6, 4)  # (D, rows, tw, C, 6, 6): overlapping input tiles
            # gathered point by point, runs of C values: (6, 6, D, rows, tw, C)
            d_tiles = scratch_in[:36 * c * d * tiles].view(6, 6, d, r1 - r0, tw, c)
            d_tiles.copy_(tile_in.permute(4, 5, 0, 1, 2, 3))
            torch.mm(kb, d_tiles.view(36, d * tiles * c), out=v)  # B^T d B of every tile, slice and channel
            operands = [v.view(36, d * tiles, c).transpose(1, 2)]  # (36, C, D*tiles): transposed matrices
        else:
            band = padded[:, :, 4 * r0:4 * r1 + 2]  # (C, Dp, 4*rows + 2, 4*tw + 2)
            tile_in = band.unfold(2, 6, 4).unfold(3, 6, 4)  # (C, Dp, rows, tw, 6, 6): overlapping input tiles
            # Tiles are copied whole (runs of 6 values in, 36 out) and transformed by a product with the transposed
            # tile matrix; the results come out as whole 4x4 tiles (see below): both copies stay local in memory.
            d_tiles = scratch_in[:36 * c * dp * tiles].view(c, dp, r1 - r0, tw, 6, 6)
            d_tiles.copy_(tile_in)
            torch.mm(kb, d_tiles.view(c * dp * tiles, 36).t(), out=v)  # B^T d B of every tile, channel and slice
            v = v.view(36, c, dp, tiles)
            # depth tap kd reads v[:, :, kd:kd + d], a strided matrix per point: no copy
            operands = [v[:, :, kd:kd + d].reshape(36, c, d * tiles) for kd in range(k)]
        m = scratch_m[:36 * c_out * d * tiles].view(36, c_out, d * tiles)
        torch.bmm(taps[0], operands[0], out=m)  # summed over C
        for kd in range(1, k):
            m.baddbmm_(taps[kd], operands[kd])
        if bias is not None:
            # A^T u u^T A with u the unit vector of interpolation point 1 (column (1, 1, 1, 1) of A^T) is all
            # ones: the bias added to that one Winograd point reaches all 16 outputs of the tile, and the
            # write-out below stays a plain copy (1/36 of a pass instead of a strided add over the output).
            m[_WINOGRAD_ALL_ONES_POINT].add_(bias.view(-1, 1))
        y = scratch_in[:16 * c_out * d * tiles].view(c_out * d * tiles, 16)
        torch.mm(m.view(36, c_out * d * tiles).t(), ka.t(), out=y)  # A^T m A, tile by tile
        _activate_(y, negative_slope)
        # Each output tile row (4 floats, 16 bytes) moves as one complex128 element: a copy with 4-float inner
        # loops ran at ~1 GB/s, as wide elements it runs at memory speed. Bits are moved, not converted.
        y = y.view(torch.complex128).view(c_out, d, r1 - r0, tw, 4).transpose(3, 4)  # (C_out, D, rows, 4, tw)
        out[:, :, 4 * r0:4 * r1].view(torch.complex128).view(c_out, d, r1 - r0, 4, tw).copy_(y)


def _activate_(x: torch.Tensor, negative_slope: float | None) -> torch.Tensor:
    """``leaky_relu(x, negative_slope)`` in place (0: ReLU; None: x unchanged)."""
    if negative_slope is None:
        return x
    return x.clamp_min_(0) if negative_slope == 0 else F.leaky_relu_(x, negative_slope)


def winograd_conv3x3(x: torch.Tensor, transformed_weight: torch.Tensor, bias: torch.Tensor | None,
                     negative_slope: float | None = None) -> torch.Tensor:
    """Stride-1 3x3 convolution with zero padding 1 by Winograd F(4x4, 3x3), in bands of rows: a few big matrix
    products per band.

    x (B, C, H, W); ``transformed_weight`` from ``winograd_weight``. Within ~1e-5 relative of the direct
    convolution per layer (measured: 6.5e-6 for 512 channels; NNPACK's F(6x6) 1.1e-5).
    """
    b, _, h, w = x.shape
    c_out = transformed_weight.shape[1]
    th, tw = -(-h // 4), -(-w // 4)
    out = x.new_empty(b, c_out, 4 * th, 4 * tw)
    # the batch as the depth of a volume convolved slice by slice
    if x.stride(1) == 1 and x.shape[1] > 1:  # channels innermost (channels-last, or a channel slice of it)
        _winograd_volume(x.permute(0, 2, 3, 1), transformed_weight.unsqueeze(0), bias, out.transpose(0, 1),
                         negative_slope, channels_last=True)
    else:
        _winograd_volume(x.transpose(0, 1), transformed_weight.unsqueeze(0), bias, out.transpose(0, 1),
                         negative_slope)
    return out if (4 * th, 4 * tw) == (h, w) else out[:, :, :h, :w].contiguous()


def winograd_conv3x3x3(x: torch.Tensor, transformed_weight: torch.Tensor, bias: torch.Tensor | None,
                       negative_slope: float | None = None) -> torch.Tensor:
    """Stride-1 3x3x3 convolution with zero padding 1, x (B, C, D, H, W): Winograd F(4x4, 3x3) over H and W, the
    three depth taps summed in the Winograd domain (``transformed_weight`` from ``winograd_weight``, 5-D kernel)."""
    b, _, d, h, w = x.shape
    c_out = transformed_weight.shape[2]
    th, tw = -(-h // 4), -(-w // 4)
    out = x.new_empty(b, c_out, d, 4 * th, 4 * tw)
    for n in range(b):
        _winograd_volume(x[n], transformed_weight, bias, out[n], negative_slope)
    return out if (4 * th, 4 * tw) == (h, w) else out[..., :h, :w].contiguous()


def conv2d_same(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                low_precision_out: bool = False, negative_slope: float | None = None) -> torch.Tensor:
    """Stride-1 convolution with 'same' zero padding (odd square kernel), then ``leaky_relu(., negative_slope)``
    unless None (0: ReLU; on the Winograd path applied while each band is in cache).

    On CPU in float32 (no autograd) 3x3 kernels with at least WINOGRAD_MIN_OUT_CHANNELS outputs go through our
    Winograd F(4x4, 3x3) (about 2x faster than the direct convolution and within ~1e-5 relative of it per layer);
    elsewhere plain ``F.conv2d``. ``low_precision_out``: see ``convolve``.
    """
    k = weight.shape[-1]
    if (k == 3 and weight.shape[0] >= WINOGRAD_MIN_OUT_CHANNELS and _winograd_applies(x, weight, 16)):
        return winograd_conv3x3(x, _cached_on(weight, "_winograd_copy", winograd_weight), bias, negative_slope)
    return _activate_(convolve(x, weight, bias, padding=k // 2, low_precision_out=low_precision_out), negative_slope)


def _winograd_applies(x: torch.Tensor, weight: torch.Tensor, min_size: int) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and x.shape[-1] >= min_size and x.shape[-2] >= min_size and not torch.is_grad_enabled()
            and _FAST_PATHS.get() and _low_precision(x) is None)


# 3-D convolutions other than 3x3x3 at least this wide (H and W) and with this many input channels go through
# NNPACK slice by slice (see conv3d_same); narrower ones are faster as one direct 3-D convolution.
NNPACK_3D_MIN_SIZE = 64
NNPACK_3D_MIN_CHANNELS = 64


def conv3d_same(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                stacked_weight: torch.Tensor | None = None, negative_slope: float | None = None) -> torch.Tensor:
    """Stride-1 3-D convolution with 'same' zero padding (odd cubic kernel), x (B, C, D, H, W), then
    ``leaky_relu(., negative_slope)`` unless None (0: ReLU).

    Fast paths (CPU float32, no autograd): 3x3x3 kernels on maps at least 4 wide through our Winograd
    (``winograd_conv3x3x3``). Larger kernels on wide slices through NNPACK: the k depth taps of the kernel are
    stacked into k * C_out output channels of one 2-D kernel, each input depth slice is convolved once by NNPACK
    (FFT for kernels larger than 3) and its k outputs are added to the output slices they belong to.
    ``stacked_weight``: the (k * C_out, C_in, k, k) re-arrangement of ``weight`` if the caller caches it.
    """
    k = weight.shape[-1]
    b, _, d, h, w = x.shape
    if k == 3 and _winograd_applies(x, weight, WINOGRAD_3D_MIN_SIZE):
        return winograd_conv3x3x3(x, _cached_on(weight, "_winograd_copy", winograd_weight), bias, negative_slope)
    if not (x.device.type == "cpu" and x.dtype == torch.float32 and h >= NNPACK_3D_MIN_SIZE
            and w >= NNPACK_3D_MIN_SIZE and x.shape[1] >= NNPACK_3D_MIN_CHANNELS and not torch.is_grad_enabled()
            and _FAST_PATHS.get() and _nnpack_ready() and _low_precision(x) is None):
        return _activate_(convolve(x, weight, bias, padding=k // 2), negative_slope)
    c_out, pad = weight.shape[0], k // 2
    if stacked_weight is None:
        stacked_weight = stack_depth_taps(weight)
    zeros = weight.new_zeros(stacked_weight.shape[0])
    if bias is None:
        out = x.new_zeros(b, c_out, d, h, w)
    else:
        out = bias.view(1, -1, 1, 1, 1).expand(b, c_out, d, h, w).clone()
    for n in range(b):
        for z in range(d):
            taps = torch._nnpack_spatial_convolution(x[n:n + 1, :, z].contiguous(), stacked_weight, zeros, [pad, pad])
            taps = taps.view(k, c_out, h, w)  # tap kd of input slice z lands in output slice z - kd + pad
            first, last = max(0, pad - (d - 1 - z)), min(k - 1, z + pad)
            for kd in range(first, last + 1):
                out[n, :, z - kd + pad] += taps[kd]
    return _activate_(out, negative_slope)


def stack_depth_taps(weight: torch.Tensor) -> torch.Tensor:
    """(C_out, C_in, k, k, k) -> (k * C_out, C_in, k, k): depth tap major, for conv3d_same."""
    c_out, c_in, k = weight.shape[:3]
    return weight.permute(2, 0, 1, 3, 4).reshape(k * c_out, c_in, k, k).contiguous()


class DerivedTensors:
    """Tensors computed from module weights (folded or re-arranged kernels), rebuilt when a source tensor changes.

    A source counts as changed when it is a different tensor or was modified in place (``_version``), e.g. by
    ``load_state_dict`` or ``.to()``. With autograd enabled nothing is cached (gradients must flow to the weights).
    """

    def __init__(self):
        self._entries: dict[str, tuple[tuple, object]] = {}

    def get(self, name: str, sources: tuple[torch.Tensor | None, ...], build):
        if torch.is_grad_enabled():
            return build()
        key = tuple(None if t is None else (t.data_ptr(), t._version, t.dtype, t.device, tuple(t.shape))
                    for t in sources)
        entry = self._entries.get(name)
        if entry is None or entry[0] != key:
            entry = (key, build())
            self._entries[name] = entry
        return entry[1]


class SameConv2d(nn.Conv2d):
    """nn.Conv2d (stride 1, 'same' padding) that takes the fast path of ``conv2d_same``; same state-dict keys."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, bias: bool = True):
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv2d_same(x, self.weight, self.bias)


class SameConv3d(nn.Conv3d):
    """nn.Conv3d (stride 1, 'same' padding) that takes the fast path of ``conv3d_same``; same state-dict keys."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, bias: bool = True):
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)
        self._derived = DerivedTensors()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stacked = (None if self.kernel_size[0] == 3  # 3x3x3: Winograd, not stacked taps
                   else self._derived.get("stacked", (self.weight,), lambda: stack_depth_taps(self.weight)))
        return conv3d_same(x, self.weight, self.bias, stacked)


class UpsampledConv3x3:
    """``conv3x3(nearest_upsample(x, scale), padding=1)`` computed on the low-resolution input.

    With nearest up-sampling by an integer ``scale``, output pixel s*i + p only sees low-resolution pixels i-1, i,
    i+1: per axis, phase p = 0 reads {i-1, i}, phase s-1 reads {i, i+1} and the phases between read only {i}. The
    3x3 taps landing on the same low-resolution pixel are summed into a smaller kernel per phase, and the phases
    sharing a footprint form one small convolution: the same result (up to rounding) with 2.25x (s=2) or 4x (s=4)
    fewer multiply-adds. Zero padding maps exactly: the padded ring of the up-sampled image is that of ``x``.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, scale: int):
        assert weight.shape[-2:] == (3, 3) and scale >= 2
        # per axis: phase -> (first low-res offset, taps summed into each low-res position)
        first, middle, last = (-1, ([0], [1, 2])), (0, ([0, 1, 2],)), (0, ([0, 1], [2]))
        self.phases = [first] + [middle] * (scale - 2) + [last]
        self.scale = scale
        self.out_channels = weight.shape[0]
        groups: dict[tuple[int, int, int, int], list[tuple[int, int]]] = {}
        for py, (oy, ty) in enumerate(self.phases):
            for px, (ox, tx) in enumerate(self.phases):
                groups.setdefault((oy, len(ty), ox, len(tx)), []).append((py, px))
        self.groups = []
        for footprint, members in groups.items():
            kernels = []
            for py, px in members:
                rows, cols = self.phases[py][1], self.phases[px][1]
                kernel = torch.stack([torch.stack([weight[:, :, r][:, :, :, c].sum(dim=(2, 3)) for c in cols], dim=-1)
                                      for r in rows], dim=-2)  # (C_out, C_in, len(rows), len(cols))
                kernels.append(kernel)
            group_bias = None if bias is None else bias.repeat(len(members))
            self.groups.append((footprint, members, torch.cat(kernels, dim=0), group_bias))

    def __call__(self, x: torch.Tensor, low_precision_out: bool = False) -> torch.Tensor:
        b, _, h, w = x.shape
        s, c_out = self.scale, self.out_channels
        # channels-last: oneDNN's fastest layout, and each phase then lands as runs of C values (see below)
        x_pad = F.pad(x, (1, 1, 1, 1)).contiguous(memory_format=torch.channels_last)
        # Phases are gathered whole (contiguous copies), then interleaved in one pass: writing each phase straight
        # into the interleaved image would sweep all of its memory once per phase.
        channels_last = None
        for (oy, ny, ox, nx), members, kernel, bias in self.groups:
            window = x_pad[:, :, 1 + oy:1 + oy + h + ny - 1, 1 + ox:1 + ox + w + nx - 1]
            result = convolve(window, kernel, bias, low_precision_out=low_precision_out)  # (B, members * C, H, W)
            if channels_last is None:
                channels_last = not result.is_contiguous() and result.is_contiguous(memory_format=torch.channels_last)
                # channels-last: (B, H, s, W, s, C) in memory, each phase a set of runs of C values
                # else: (B, C, s*s, H, W), each phase a set of runs of H*W values, then pixel_shuffle
                out = (result.new_empty(b, h, s, w, s, c_out) if channels_last
                       else result.new_empty(b, c_out, s * s, h, w))
            for m, (py, px) in enumerate(members):
                phase = result[:, m * c_out:(m + 1) * c_out]  # (B, C, H, W)
                if channels_last:
                    out[:, :, py, :, px] = phase.permute(0, 2, 3, 1)
                else:
                    out[:, :, py * s + px] = phase
        if channels_last:
            return out.view(b, h * s, w * s, c_out).permute(0, 3, 1, 2)  # (B, C, H*s, W*s), channels-last
        return F.pixel_shuffle(out.view(b, c_out * s * s, h, w), s)  # (B, C, H*s, W*s)
