"""Face restoration of rendered frames (GFPGAN v1.4 / RestoreFormer) and the optional RealESRGAN x2 background.

The official SadTalker runs ``GFPGANer(upscale=2)`` on every output frame: facexlib finds the face, warps it onto the
FFHQ 512 template, GFPGAN restores it, and it is warped back with a soft mask into the frame upscaled 2x (Lanczos,
or RealESRGAN x2 when the background enhancer is on). We keep that arithmetic but bring our own face geometry: the
five points (eye centres, nose tip, mouth corners) come from the 68 landmarks the pipeline already has, so no
detector runs per frame. The networks are loaded with spandrel (no facexlib, basicsr, gfpgan or realesrgan).

Deliberate differences from the official path: facexlib's face-parsing mask is replaced by its square
(eroded + blurred) mask, so no parsing network is needed; the background enhancer also runs on a CPU (the official
silently skips it there).

Loading: :func:`load_enhancer` raises :class:`EnhancerWeightsMissing` (a :class:`CheckpointError`) when a file is
absent and :class:`CheckpointError` when it is unreadable or the wrong model. :func:`try_load_enhancer` turns a
*missing* file into a warning string so generation can go on without enhancement.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from core.errors import CheckpointError

FACE_SIZE = 512  # GFPGAN / RestoreFormer work on 512x512 aligned faces
# FFHQ 512 positions of the five points (facexlib's template): left eye, right eye, nose tip, mouth left, mouth right
FACE_TEMPLATE = np.array([[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935],
                          [201.26117, 371.41043], [313.08905, 371.15118]], dtype=np.float64)
BORDER_RGB = (132, 133, 135)  # facexlib fills outside the frame with grey (135, 133, 132) in BGR
MIN_EYE_DISTANCE = 5.0  # GFPGANer skips faces whose eyes are closer than 5 px
UPSCALE = 2  # official GFPGANer(upscale=2): the enhanced video is twice the size of the rendered one
BACKGROUND_TILE = 400  # official RealESRGANer(tile=400, tile_pad=10, pre_pad=0)
BACKGROUND_TILE_PAD = 10


@dataclass(frozen=True)
class WeightsSpec:
    name: str  # option value
    file_name: str
    url: str
    architecture: str  # spandrel architecture id expected in the file


FACE_ENHANCERS: dict[str, WeightsSpec] = {
    "gfpgan": WeightsSpec("gfpgan", "GFPGANv1.4.pth",
                          "https://github.com/TencentARC/GFPGAN/releases/download/v1.3.0/GFPGANv1.4.pth", "GFPGAN"),
    "RestoreFormer": WeightsSpec("RestoreFormer", "RestoreFormer.pth",
                                 "https://github.com/TencentARC/GFPGAN/releases/download/v1.3.4/RestoreFormer.pth",
                                 "RestoreFormer"),
}
BACKGROUND_ENHANCERS: dict[str, WeightsSpec] = {
    "realesrgan": WeightsSpec("realesrgan", "RealESRGAN_x2plus.pth",
                              "https://github.com/xinntao/Real-ESRGAN/releases/download/v0.2.1/RealESRGAN_x2plus.pth",
                              "ESRGAN"),
}


class EnhancerWeightsMissing(CheckpointError):
    """An enhancer's weights file is not in the checkpoints folder (the message says how to get it)."""

    def __init__(self, spec: WeightsSpec, checkpoint_dir: str):
        self.spec = spec
        self.path = os.path.join(checkpoint_dir, spec.file_name)
        super().__init__(
            f"The {spec.name} enhancer needs {spec.file_name}, which is not in {checkpoint_dir!r}. "
            f"Download it into that folder: curl -L -o {_quote(self.path)} {spec.url}")


def _quote(path: str) -> str:
    return f"'{path}'" if any(c in path for c in " \t'\"$") else path


def find_weights(spec: WeightsSpec, checkpoint_dir: str) -> str | None:
    """The weights file in ``checkpoint_dir`` or in its ``gfpgan/weights/`` (where the official script puts it)."""
    for folder in (checkpoint_dir, os.path.join(checkpoint_dir, "gfpgan", "weights")):
        path = os.path.join(folder, spec.file_name)
        if os.path.isfile(path):
            return path
    return None


def _load_descriptor(spec: WeightsSpec, path: str, device: torch.device):
    """Load a weights file with spandrel and check it is the expected architecture, or raise CheckpointError."""
    import spandrel  # imported here: it registers ~40 architectures, only needed when an enhancer is used

    redownload = f"Delete it and download it again: curl -L -o {_quote(path)} {spec.url}"
    try:
        descriptor = spandrel.ModelLoader(device=device).load_from_file(path)
    except spandrel.UnsupportedModelError:
        raise CheckpointError(f"{path} is not a {spec.architecture} model that can be recognised. {redownload}") from None
    except Exception as exc:  # noqa: BLE001 - any failure to parse a downloaded file means the file is unusable
        # truncated zip, pickle garbage, an HTML error page, wrong tensor shapes...
        text = str(exc).strip()
        reason = f"{exc.__class__.__name__}: {text.splitlines()[0][:200]}" if text else exc.__class__.__name__
        raise CheckpointError(f"Could not load {path} ({reason}). The file is damaged or not {spec.file_name}. "
                              f"{redownload}") from None
    if descriptor.architecture.id != spec.architecture:
        raise CheckpointError(f"{path} holds a {descriptor.architecture.id} model, not {spec.architecture}. {redownload}")
    if spec.name == "realesrgan" and descriptor.scale != 2:
        raise CheckpointError(f"{path} is a x{descriptor.scale} ESRGAN model; the background enhancer needs "
                              f"RealESRGAN x2plus. {redownload}")
    return descriptor


def load_enhancer(name: str, checkpoint_dir: str, background: str | None = None, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32, upscale: int = UPSCALE,
                  randomize_noise: bool = True) -> "FaceEnhancer":
    """Load a face enhancer (``"gfpgan"`` or ``"RestoreFormer"``) and optionally the RealESRGAN x2 background.

    Raises :class:`EnhancerWeightsMissing` if a file is absent, :class:`CheckpointError` if it is unusable.
    ``dtype`` applies where the architecture supports it (GFPGAN/RestoreFormer: float32 or bfloat16); else float32.
    """
    if name not in FACE_ENHANCERS:
        raise ValueError(f"unknown enhancer {name!r}; expected one of {', '.join(FACE_ENHANCERS)}")
    if background is not None and background not in BACKGROUND_ENHANCERS:
        raise ValueError(f"unknown background enhancer {background!r}; expected one of {', '.join(BACKGROUND_ENHANCERS)}")
    device = torch.device(device)
    spec = FACE_ENHANCERS[name]
    path = find_weights(spec, checkpoint_dir)
    if path is None:
        raise EnhancerWeightsMissing(spec, checkpoint_dir)
    background_spec = BACKGROUND_ENHANCERS.get(background) if background is not None else None
    background_path = None
    if background_spec is not None:
        background_path = find_weights(background_spec, checkpoint_dir)
        if background_path is None:
            raise EnhancerWeightsMissing(background_spec, checkpoint_dir)
    descriptor = _load_descriptor(spec, path, device)
    background_model = None
    if background_spec is not None:
        background_model = BackgroundUpsampler(_load_descriptor(background_spec, background_path, device), dtype)
    return FaceEnhancer(descriptor, name=name, dtype=dtype, upscale=upscale, background=background_model,
                        randomize_noise=randomize_noise)


def try_load_enhancer(name: str | None, checkpoint_dir: str, background: str | None = None,
                      **kwargs) -> tuple["FaceEnhancer | None", list[str]]:
    """Like :func:`load_enhancer`, but missing weights become warnings and the result may be ``None``.

    Returns ``(enhancer or None, warnings)``. A missing face-enhancer file gives ``None`` (generate without
    enhancement); a missing background file gives a face enhancer without background enhancement. Damaged files
    still raise :class:`CheckpointError`: the user asked for enhancement and must learn the file is broken.
    """
    warnings: list[str] = []
    if name is None:
        if background is not None:
            warnings.append("The background enhancer only runs together with a face enhancer (as in SadTalker); "
                            "choose gfpgan or RestoreFormer to use it.")
        return None, warnings
    try:
        return load_enhancer(name, checkpoint_dir, background=background, **kwargs), warnings
    except EnhancerWeightsMissing as missing:  # the face file is checked first, so this is the face or the background
        if missing.spec.name == background:
            warnings.append(f"{missing} Continuing without background enhancement.")
            return load_enhancer(name, checkpoint_dir, background=None, **kwargs), warnings
        warnings.append(f"{missing} Continuing without face enhancement.")
        return None, warnings


def five_points(lm68: np.ndarray) -> np.ndarray:
    """Eye centres, nose tip and mouth corners (the points GFPGAN's aligner uses) from 68 landmarks: (5, 2)."""
    lm = np.asarray(lm68, dtype=np.float64)
    if lm.shape != (68, 2) or not np.all(np.isfinite(lm)):
        raise ValueError(f"expected (68, 2) finite landmarks, got {lm.shape}")
    return np.stack([lm[36:42].mean(axis=0), lm[42:48].mean(axis=0), lm[30], lm[48], lm[54]])


@dataclass(frozen=True)
class _Geometry:
    """Everything of one face placement that does not depend on the pixels (cached across frames)."""

    affine: np.ndarray  # (2, 3) frame -> aligned 512 face
    inverse: np.ndarray  # (2, 3) aligned face -> ``window`` of the upscaled frame
    window: tuple[int, int, int, int] | None  # (x0, y0, x1, y1) of the upscaled frame the face touches
    erosion: np.ndarray | None  # (h, w, 1) float32: warped square mask minus its black border
    soft: np.ndarray | None  # (h, w, 1) float32: eroded and blurred blending weight


def _face_geometry(lm68: np.ndarray, frame_shape: tuple[int, int], upscale: int) -> _Geometry:
    points = five_points(lm68)
    affine = cv2.estimateAffinePartial2D(points, FACE_TEMPLATE, method=cv2.LMEDS)[0]  # as facexlib
    if affine is None:  # degenerate points: plain least-squares similarity
        affine = _similarity(points, FACE_TEMPLATE)
    height, width = frame_shape
    h_up, w_up = int(height * upscale), int(width * upscale)
    inverse = cv2.invertAffineTransform(affine) * upscale
    if upscale > 1:
        inverse[:, 2] += 0.5 * upscale  # facexlib's offset for a more precise back alignment
    # facexlib's square mask: warp ones back, erode away the black border, erode again and blur by the face size
    inv_mask = cv2.warpAffine(np.ones((FACE_SIZE, FACE_SIZE), np.float32), inverse, (w_up, h_up))
    kernel = max(1, int(2 * upscale))
    erosion = cv2.erode(inv_mask, np.ones((kernel, kernel), np.uint8))
    edge = int(float(np.sum(erosion)) ** 0.5) // 20
    center = cv2.erode(erosion, np.ones((max(1, 2 * edge), max(1, 2 * edge)), np.uint8))
    soft = cv2.GaussianBlur(center, (2 * edge + 1, 2 * edge + 1), 0)
    ys, xs = np.nonzero(soft > 0)
    if len(xs) == 0:
        return _Geometry(affine, inverse, None, None, None)
    x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
    window_inverse = inverse.copy()
    window_inverse[:, 2] -= (x0, y0)
    return _Geometry(affine, window_inverse, (x0, y0, x1, y1),
                     np.ascontiguousarray(erosion[y0:y1, x0:x1, None]), np.ascontiguousarray(soft[y0:y1, x0:x1, None]))


def _similarity(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Least-squares rotation + uniform scale + translation mapping ``source`` points onto ``target``: (2, 3)."""
    rows = []
    for (x, y), (u, v) in zip(source, target):
        rows.append(([x, -y, 1, 0], u))
        rows.append(([y, x, 0, 1], v))
    a = np.array([r[0] for r in rows], dtype=np.float64)
    b = np.array([r[1] for r in rows], dtype=np.float64)
    (s_cos, s_sin, tx, ty), *_ = np.linalg.lstsq(a, b, rcond=None)
    return np.array([[s_cos, -s_sin, tx], [s_sin, s_cos, ty]], dtype=np.float64)


class BackgroundUpsampler:
    """RealESRGAN x2 on the whole frame, tiled as the official RealESRGANer (400 px tiles, 10 px overlap)."""

    def __init__(self, descriptor, dtype: torch.dtype = torch.float32):
        self.model = descriptor.model.eval()
        self.device = descriptor.device
        supported = (dtype == torch.float16 and descriptor.supports_half and self.device.type == "cuda") or \
                    (dtype == torch.bfloat16 and descriptor.supports_bfloat16)
        self.dtype = dtype if supported else torch.float32
        self.model.to(self.dtype)
        self.scale = descriptor.scale

    @torch.inference_mode()
    def __call__(self, rgb: np.ndarray, outscale: float) -> np.ndarray:
        height, width = rgb.shape[:2]
        image = torch.from_numpy(np.ascontiguousarray(rgb)).to(self.device).permute(2, 0, 1)[None]
        image = image.to(self.dtype) / 255.0
        # pad to an even size (RealESRGANer's mod pad for x2 models), bottom/right, reflected
        pad_h, pad_w = height % 2, width % 2
        if pad_h or pad_w:
            image = torch.nn.functional.pad(image, (0, pad_w, 0, pad_h), mode="reflect")
        output = self._tiled(image)[:, :, :height * self.scale, :width * self.scale]
        output = (output.float().clamp_(0, 1) * 255.0).round_().to(torch.uint8)[0].permute(1, 2, 0).cpu().numpy()
        if outscale != self.scale:
            output = cv2.resize(output, (int(width * outscale), int(height * outscale)), interpolation=cv2.INTER_LANCZOS4)
        return output

    def _tiled(self, image: torch.Tensor) -> torch.Tensor:
        _, channels, height, width = image.shape
        scale, tile, pad = self.scale, BACKGROUND_TILE, BACKGROUND_TILE_PAD
        output = image.new_zeros((1, channels, height * scale, width * scale))
        for y0 in range(0, height, tile):
            for x0 in range(0, width, tile):
                y1, x1 = min(y0 + tile, height), min(x0 + tile, width)
                py0, px0 = max(y0 - pad, 0), max(x0 - pad, 0)
                py1, px1 = min(y1 + pad, height), min(x1 + pad, width)
                result = self.model(image[:, :, py0:py1, px0:px1])  # (1, C, (py1-py0)*s, (px1-px0)*s)
                oy, ox = (y0 - py0) * scale, (x0 - px0) * scale
                output[:, :, y0 * scale:y1 * scale, x0 * scale:x1 * scale] = \
                    result[:, :, oy:oy + (y1 - y0) * scale, ox:ox + (x1 - x0) * scale]
        return output


class FaceEnhancer:
    """Restores the face of each frame; build with :func:`load_enhancer`, call :meth:`enhance` per frame.

    Output frames are ``upscale`` times the input size (official: 2). Thread-safe; the face placement of the
    last few landmark sets is cached, so a clip whose landmarks stay put pays for the masks once.
    """

    def __init__(self, descriptor, name: str, dtype: torch.dtype = torch.float32, upscale: int = UPSCALE,
                 background: BackgroundUpsampler | None = None, randomize_noise: bool = True):
        if not (isinstance(upscale, int) and 1 <= upscale <= 4):
            raise ValueError(f"upscale must be 1..4, got {upscale!r}")
        self.name = name
        self.architecture = descriptor.architecture.id
        self.model = descriptor.model.eval()
        self.device = descriptor.device
        self.dtype = dtype if dtype == torch.bfloat16 and descriptor.supports_bfloat16 else torch.float32
        self.model.to(self.dtype)
        self.upscale = upscale
        self.background = background
        # official GFPGAN draws fresh StyleGAN noise for every frame; False uses the noise stored in the weights
        self.randomize_noise = randomize_noise
        self._lock = threading.Lock()
        self._geometries: dict[bytes, _Geometry] = {}

    def output_shape(self, frame_shape: tuple[int, int]) -> tuple[int, int]:
        """(H, W) of the frames :meth:`enhance` returns for frames of (H, W)."""
        return (int(frame_shape[0] * self.upscale), int(frame_shape[1] * self.upscale))

    def enhance(self, frame_rgb: np.ndarray, lm68: np.ndarray) -> np.ndarray:
        """Restore the face of an RGB uint8 frame whose 68 landmarks (x, y pixels of this frame) are ``lm68``."""
        if not (isinstance(frame_rgb, np.ndarray) and frame_rgb.dtype == np.uint8 and frame_rgb.ndim == 3
                and frame_rgb.shape[2] == 3):
            raise ValueError(f"expected an RGB uint8 frame, got {getattr(frame_rgb, 'shape', None)}")
        frame = np.ascontiguousarray(frame_rgb)
        background = self._upscaled_background(frame)
        points = five_points(lm68)
        if np.hypot(*(points[1] - points[0])) < MIN_EYE_DISTANCE:
            return background  # GFPGANer ignores faces this small
        geometry = self._geometry(np.asarray(lm68, dtype=np.float64), frame.shape[:2])
        if geometry.window is None:
            return background
        face = cv2.warpAffine(frame, geometry.affine, (FACE_SIZE, FACE_SIZE), borderMode=cv2.BORDER_CONSTANT,
                              borderValue=BORDER_RGB)
        restored = self.restore_face(face)
        x0, y0, x1, y1 = geometry.window
        warped = cv2.warpAffine(restored, geometry.inverse, (x1 - x0, y1 - y0))
        region = background[y0:y1, x0:x1]
        # facexlib's blend, same float32 arithmetic, truncated to uint8
        blended = geometry.soft * (geometry.erosion * warped) + (1 - geometry.soft) * region
        background[y0:y1, x0:x1] = blended.astype(np.uint8)
        return background

    @torch.inference_mode()
    def restore_face(self, face_rgb: np.ndarray) -> np.ndarray:
        """Run the network on one aligned 512x512 RGB uint8 face; returns the restored face (uint8)."""
        x = torch.from_numpy(face_rgb).to(self.device).permute(2, 0, 1)[None].to(torch.float32)
        x = ((x / 255.0 - 0.5) / 0.5).to(self.dtype)  # GFPGAN and RestoreFormer work in [-1, 1]
        if self.architecture == "GFPGAN":
            y = self.model(x, return_rgb=False, randomize_noise=self.randomize_noise)[0]
        else:
            y = self.model(x)[0]
        y = (y.float().clamp_(-1, 1) + 1) / 2
        return (y * 255.0).round_().to(torch.uint8)[0].permute(1, 2, 0).cpu().numpy()

    def _upscaled_background(self, frame: np.ndarray) -> np.ndarray:
        height, width = frame.shape[:2]
        size = (int(width * self.upscale), int(height * self.upscale))
        if self.background is not None:
            upscaled = self.background(frame, outscale=self.upscale)
            # facexlib resizes the upsampler's result to the exact size (a no-op when it already matches)
            return upscaled if upscaled.shape[1::-1] == size else cv2.resize(upscaled, size,
                                                                              interpolation=cv2.INTER_LANCZOS4)
        if size == (width, height):
            return frame.copy()
        return cv2.resize(frame, size, interpolation=cv2.INTER_LANCZOS4)

    def _geometry(self, lm68: np.ndarray, frame_shape: tuple[int, int]) -> _Geometry:
        key = lm68.tobytes() + np.asarray(frame_shape, np.int64).tobytes()
        with self._lock:
            cached = self._geometries.get(key)
        if cached is not None:
            return cached
        geometry = _face_geometry(lm68, frame_shape, self.upscale)
        with self._lock:
            if len(self._geometries) >= 8:
                self._geometries.pop(next(iter(self._geometries)))
            self._geometries[key] = geometry
        return geometry
