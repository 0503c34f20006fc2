"""Ball tracking: a synthetic video source and a seven-stage OpenCV pipeline that can be split.

The pipeline (registered as ``ball`` in :data:`registry`, so ``--tasks examples.vision.ball`` serves
both agents)::

    0 capture      frame number -> {"frame", "image" 480x640x3 BGR uint8}      (always on the device)
    1 resize       -> {"frame", "scale", "image" 240x320x3}
    2 blur_hsv     -> {"frame", "scale", "hsv" 240x320x3}
    3 mask         -> {"frame", "scale", "mask" 240x320 uint8 0/255}
    4 contours     -> {"frame", "scale", "contour" Nx2 int32}       (Done: nothing found)
    5 circle       -> {"frame", "scale", "center" [x, y], "radius"}  (Done: too small)
    6 annotate     -> {"frame", "found", "center", "radius"[, "thumbnail" JPEG bytes]}

Every intermediate value is a dict of numpy arrays and plain metadata carrying the frame number, so
the codec ships it as raw bytes with dtype and shape. Each stage validates its input and raises
:class:`StageInputError` (a ``ValueError``) naming the stage. Image fields may instead hold a
compressed record made by :func:`encode_intermediate` (JPEG for colour images, lossless PNG for
masks); the stages decode it themselves, so a server needs nothing but this module.
"""

from __future__ import annotations

import math
import struct
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import cv2
import numpy as np

from agent_common.registry import Done, TaskRegistry

FRAME_WIDTH = 640
FRAME_HEIGHT = 480
WORK_WIDTH = 320
WORK_HEIGHT = 240
BLUR_KERNEL = (11, 11)
#: HSV range of the ball (OpenCV hue is 0..179): a saturated green.
HSV_LOW = (45, 110, 60)
HSV_HIGH = (75, 255, 255)
MIN_CONTOUR_AREA = 12.0  # at working resolution
MIN_RADIUS = 4.0  # at full resolution
THUMB_SIZE = (80, 60)
MAX_IMAGE_PIXELS = 4096 * 4096
COMPRESSED_KEY = "image_codec"

Array = np.ndarray[Any, Any]
Frame = dict[str, Any]


class StageInputError(ValueError):
    """A stage received a value it cannot process (wrong type, missing key, shape or dtype)."""

    def __init__(self, stage: str, problem: str) -> None:
        super().__init__(f"stage {stage!r}: {problem}")
        self.stage = stage
        self.problem = problem


# Synthetic source -------------------------------------------------------------------------------


def _reflect(position: float, low: float, high: float) -> float:
    """Fold an unbounded coordinate into [low, high] as a ball bouncing between two walls."""
    span = high - low
    folded = (position - low) % (2.0 * span)
    return low + (folded if folded <= span else 2.0 * span - folded)


def _smooth_noise(rng: np.random.Generator, height: int, width: int) -> Array:
    """Perlin-like texture: blurred random fields at several scales, summed, in 0..1."""
    total = np.zeros((height, width), np.float32)
    for cells, weight in ((6, 0.5), (24, 0.3), (96, 0.2)):
        coarse = rng.random((max(2, height * cells // width), cells), dtype=np.float32)
        total += weight * cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    low, high = float(total.min()), float(total.max())
    return (total - low) / max(high - low, 1e-6)


class FrameSource(Protocol):
    """Where frames come from: ``capture(n)`` returns the frame dict of frame ``n``."""

    def capture(self, frame: int) -> Frame: ...

    def truth(self, frame: int) -> tuple[float, float] | None: ...


@dataclass(frozen=True)
class BallMotion:
    """A bouncing ball whose speed varies smoothly: position is a closed form of the frame number."""

    x0: float
    y0: float
    angle: float
    speed: float = 7.0  # pixels per frame, on average
    speed_swing: float = 0.6  # speed goes from speed*(1-swing) to speed*(1+swing)
    period: float = 90.0  # frames per speed cycle
    radius: int = 22

    def distance(self, frame: int) -> float:
        """Path length travelled by ``frame``: integral of speed * (1 + swing * sin(2 pi t / P))."""
        omega = 2.0 * math.pi / self.period
        return self.speed * (frame + self.speed_swing * (1.0 - math.cos(omega * frame)) / omega)

    def position(self, frame: int, width: int, height: int) -> tuple[float, float]:
        travelled = self.distance(frame)
        r = float(self.radius)
        x = _reflect(self.x0 + math.cos(self.angle) * travelled, r, width - 1 - r)
        y = _reflect(self.y0 + math.sin(self.angle) * travelled, r, height - 1 - r)
        return x, y


class BallVideo:
    """Seeded synthetic video: a green ball bouncing over a noisy, textured, cluttered background.

    Frames are a pure function of ``(seed, frame)``, so the device and a test can both render frame
    ``n`` without replaying the ones before. ``hidden`` lists half-open frame ranges in which the
    ball is out of view (ground truth ``None``).
    """

    def __init__(self, seed: int = 0, *, width: int = FRAME_WIDTH, height: int = FRAME_HEIGHT,
                 hidden: Sequence[tuple[int, int]] = ((190, 200),), noise: float = 8.0,
                 motion: BallMotion | None = None, colour: tuple[int, int, int] = (40, 190, 55)
                 ) -> None:
        if width < 64 or height < 64:
            raise ValueError("synthetic frames need at least 64x64 pixels")
        self.seed = seed
        self.width = width
        self.height = height
        self.hidden = tuple((int(a), int(b)) for a, b in hidden)
        self.colour = colour
        rng = np.random.default_rng(seed)
        self.motion = motion or BallMotion(
            x0=float(rng.uniform(60, width - 60)), y0=float(rng.uniform(60, height - 60)),
            angle=float(rng.uniform(0.3, 1.2)) + float(rng.integers(0, 4)) * math.pi / 2)
        self.background = self._background(rng)
        self._noise = self._noise_bank(rng, noise)

    def _background(self, rng: np.random.Generator) -> Array:
        h, w = self.height, self.width
        ramp_x = np.linspace(0.0, 1.0, w, dtype=np.float32)[None, :]
        ramp_y = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None]
        texture = _smooth_noise(rng, h, w)
        grey = 70.0 + 60.0 * ramp_x + 40.0 * ramp_y + 70.0 * texture
        tint = np.stack([grey * 1.05, grey * 0.97, grey * 1.0], axis=-1)  # low saturation
        image = np.clip(tint, 0, 255).astype(np.uint8)
        # Distractors in hues the mask must reject: orange, cyan, blue, red, magenta, pale green.
        distractors = [(20, 140, 240), (210, 200, 30), (200, 60, 40), (40, 40, 210),
                       (200, 50, 200), (150, 190, 150)]
        for index in range(10):
            colour = distractors[index % len(distractors)]
            cx, cy = int(rng.integers(20, w - 20)), int(rng.integers(20, h - 20))
            size = int(rng.integers(10, 40))
            if index % 2:
                cv2.rectangle(image, (cx - size, cy - size // 2), (cx + size, cy + size // 2),
                              colour, -1)
            else:
                cv2.circle(image, (cx, cy), size // 2 + 4, colour, -1, cv2.LINE_AA)
        return image

    def _noise_bank(self, rng: np.random.Generator, sigma: float, count: int = 8
                    ) -> list[tuple[Array, Array]]:
        """Sensor noise split into positive and negative uint8 parts for saturating adds."""
        bank = []
        for _ in range(count):
            noise = rng.normal(0.0, sigma, (self.height, self.width, 3)).astype(np.float32)
            bank.append((np.clip(noise, 0, 255).astype(np.uint8),
                         np.clip(-noise, 0, 255).astype(np.uint8)))
        return bank

    def visible(self, frame: int) -> bool:
        return not any(start <= frame < stop for start, stop in self.hidden)

    def truth(self, frame: int) -> tuple[float, float] | None:
        """The ball centre in frame ``frame`` (pixels, full resolution), or ``None`` if hidden."""
        if not self.visible(frame):
            return None
        return self.motion.position(frame, self.width, self.height)

    def render(self, frame: int) -> Array:
        if frame < 0:
            raise ValueError(f"frame number must be >= 0, got {frame}")
        image = self.background.copy()
        centre = self.truth(frame)
        if centre is not None:
            shift = 4  # sub-pixel drawing: coordinates in 1/16 px
            cx, cy = (round(c * (1 << shift)) for c in centre)
            radius = self.motion.radius << shift
            cv2.circle(image, (cx, cy), radius, self.colour, -1, cv2.LINE_AA, shift)
        plus, minus = self._noise[frame % len(self._noise)]
        cv2.add(image, plus, dst=image)
        cv2.subtract(image, minus, dst=image)
        return image

    def capture(self, frame: int) -> Frame:
        return {"frame": frame, "image": self.render(frame)}


class VideoCaptureSource:
    """Frames from a video file or camera index through ``cv2.VideoCapture`` (no ground truth).

    Frames are read in order whatever number is asked for; each is resized to 640x480.
    """

    def __init__(self, source: str | int) -> None:
        self.source = source
        self._capture = cv2.VideoCapture(source)
        self._lock = threading.Lock()
        if not self._capture.isOpened():
            raise OSError(f"cannot open video source {source!r}")

    def capture(self, frame: int) -> Frame:
        with self._lock:
            ok, image = self._capture.read()
        if not ok or image is None:
            raise EOFError(f"video source {self.source!r} has no frame {frame}")
        if image.ndim == 2:
            image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
        if image.shape[:2] != (FRAME_HEIGHT, FRAME_WIDTH):
            image = cv2.resize(image, (FRAME_WIDTH, FRAME_HEIGHT), interpolation=cv2.INTER_AREA)
        return {"frame": frame, "image": np.ascontiguousarray(image, dtype=np.uint8)}

    def truth(self, frame: int) -> tuple[float, float] | None:
        return None

    def close(self) -> None:
        self._capture.release()


# Compressed image fields ---------------------------------------------------------------------------


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's start-of-frame marker, without decoding it."""
    if data[:2] != b"\xff\xd8":
        return None
    index = 2
    while index + 4 <= len(data):
        if data[index] != 0xFF:
            return None
        marker = data[index + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            index += 2
            continue
        length = struct.unpack(">H", data[index + 2:index + 4])[0]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if index + 9 > len(data):
                return None
            height, width = struct.unpack(">HH", data[index + 5:index + 9])
            return width, height
        index += 2 + length
    return None


def _png_size(data: bytes) -> tuple[int, int] | None:
    if data[:8] != b"\x89PNG\r\n\x1a\n" or len(data) < 24 or data[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def encode_intermediate(value: Any, jpeg_quality: int | None) -> Any:
    """Compress the image fields of a stage value: colour images as JPEG, masks as lossless PNG.

    ``jpeg_quality=None`` returns ``value`` unchanged. Only uint8 images (HxWx3 or HxW) of a
    dict value are touched; metadata, contours and results pass through.
    """
    if jpeg_quality is None or not isinstance(value, dict):
        return value
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality must be 1..100, got {jpeg_quality}")
    out: dict[str, Any] = {}
    for key, item in value.items():
        if isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.size >= 1024:
            if item.ndim == 3 and item.shape[2] == 3:
                ok, data = cv2.imencode(".jpg", item, [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)])
                kind = "jpeg"
            elif item.ndim == 2:
                ok, data = cv2.imencode(".png", item, [cv2.IMWRITE_PNG_COMPRESSION, 1])
                kind = "png"
            else:
                out[key] = item
                continue
            if not ok:
                raise ValueError(f"cannot encode field {key!r} as {kind}")
            out[key] = {COMPRESSED_KEY: kind, "shape": list(item.shape), "data": data.tobytes()}
        else:
            out[key] = item
    return out


def _decode_image(record: Mapping[str, Any], stage: str, key: str) -> Array:
    kind = record.get(COMPRESSED_KEY)
    data = record.get("data")
    shape = record.get("shape")
    if kind not in ("jpeg", "png") or not isinstance(data, bytes) or not isinstance(shape, list) \
            or len(shape) not in (2, 3) or not all(isinstance(n, int) and n > 0 for n in shape):
        raise StageInputError(stage, f"{key!r} is not an array nor a valid compressed image")
    if math.prod(shape[:2]) > MAX_IMAGE_PIXELS:
        raise StageInputError(stage, f"{key!r} declares {shape}, over {MAX_IMAGE_PIXELS} pixels")
    size = _jpeg_size(data) if kind == "jpeg" else _png_size(data)
    if size != (shape[1], shape[0]):
        raise StageInputError(stage, f"{key!r}: {kind} header says {size}, record says {shape}")
    flags = cv2.IMREAD_COLOR if len(shape) == 3 else cv2.IMREAD_GRAYSCALE
    image = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if image is None or list(image.shape) != shape:
        raise StageInputError(stage, f"{key!r}: corrupt {kind} data")
    return np.asarray(image)


def decode_intermediate(value: Any) -> Any:
    """Inverse of :func:`encode_intermediate` (lossy for JPEG fields)."""
    if not isinstance(value, dict):
        return value
    return {key: _decode_image(item, "decode", key)
            if isinstance(item, dict) and COMPRESSED_KEY in item else item
            for key, item in value.items()}


# Stage input checks --------------------------------------------------------------------------------


def _mapping(value: Any, stage: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise StageInputError(stage, f"expects a dict from the previous stage, got "
                                     f"{type(value).__name__}")
    frame = value.get("frame")
    if not isinstance(frame, int) or isinstance(frame, bool) or frame < 0:
        raise StageInputError(stage, f"needs a non-negative integer 'frame', got {frame!r}")
    return value


def _scale(value: Mapping[str, Any], stage: str) -> float:
    scale = value.get("scale")
    if not isinstance(scale, int | float) or isinstance(scale, bool) or not 0 < scale <= 64:
        raise StageInputError(stage, f"needs a positive 'scale', got {scale!r}")
    return float(scale)


def _array(value: Mapping[str, Any], key: str, stage: str, *, channels: int | None,
           dtype: type[np.generic] = np.uint8, min_side: int = 8) -> Array:
    """Fetch ``value[key]`` as an image array (decoding a compressed record) and check it."""
    item = value.get(key)
    if isinstance(item, Mapping) and COMPRESSED_KEY in item:
        item = _decode_image(item, stage, key)
    if not isinstance(item, np.ndarray):
        raise StageInputError(stage, f"needs an array {key!r}, got {type(item).__name__}")
    expected = "HxW" if channels is None else f"HxWx{channels}"
    good_shape = (item.ndim == 2) if channels is None else (
        item.ndim == 3 and item.shape[2] == channels)
    if not good_shape or item.dtype != dtype or min(item.shape[:2]) < min_side:
        raise StageInputError(stage, f"{key!r} must be {np.dtype(dtype).name} {expected} with "
                                     f"sides >= {min_side}, got {item.dtype} {item.shape}")
    if item.shape[0] * item.shape[1] > MAX_IMAGE_PIXELS:
        raise StageInputError(stage, f"{key!r} has {item.shape}, over {MAX_IMAGE_PIXELS} pixels")
    return item


def _carry(value: Mapping[str, Any]) -> Frame:
    """Metadata every stage passes on: frame number, scale, and the thumbnail if one was asked."""
    out: Frame = {"frame": value["frame"]}
    for key in ("scale", "thumb", "want_thumb"):
        if key in value:
            out[key] = value[key]
    return out


def not_found(frame: int) -> dict[str, Any]:
    """The final result for a frame without a ball."""
    return {"frame": frame, "found": False, "center": None, "radius": None}


# The seven stages ----------------------------------------------------------------------------------

_default_source: FrameSource | None = None
_default_lock = threading.Lock()


def default_source() -> FrameSource:
    """The source stage 0 of the registered pipeline reads: a seed-0 :class:`BallVideo`."""
    global _default_source
    with _default_lock:
        if _default_source is None:
            _default_source = BallVideo(0)
        return _default_source


def capture(value: Any, source: FrameSource | None = None) -> Frame:
    """Stage 0: a frame number (or ``{"frame": n, "thumbnail": bool}``) -> the frame dict."""
    want_thumb = False
    if isinstance(value, Mapping):
        want_thumb = bool(value.get("thumbnail", False))
        value = value.get("frame")
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise StageInputError("capture", f"needs a non-negative frame number, got {value!r}")
    frame = (source or default_source()).capture(value)
    if want_thumb:
        frame["want_thumb"] = True
    return frame


def resize(value: Any) -> Frame:
    """Stage 1: downscale to 320x240 (area interpolation), plus an 80x60 thumbnail if asked."""
    data = _mapping(value, "resize")
    image = _array(data, "image", "resize", channels=3, min_side=16)
    scale = image.shape[1] / WORK_WIDTH
    out = _carry(data)
    out["scale"] = scale
    out["image"] = cv2.resize(image, (WORK_WIDTH, WORK_HEIGHT), interpolation=cv2.INTER_AREA)
    if out.pop("want_thumb", False):
        out["thumb"] = cv2.resize(out["image"], THUMB_SIZE, interpolation=cv2.INTER_AREA)
    return out


def blur_hsv(value: Any) -> Frame:
    """Stage 2: Gaussian blur, then BGR -> HSV."""
    data = _mapping(value, "blur_hsv")
    image = _array(data, "image", "blur_hsv", channels=3)
    _scale(data, "blur_hsv")
    out = _carry(data)
    out["hsv"] = cv2.cvtColor(cv2.GaussianBlur(image, BLUR_KERNEL, 0), cv2.COLOR_BGR2HSV)
    return out


_KERNEL = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3))


def mask(value: Any) -> Frame:
    """Stage 3: threshold the ball's colour range, then erode and dilate twice each."""
    data = _mapping(value, "mask")
    hsv = _array(data, "hsv", "mask", channels=3)
    _scale(data, "mask")
    binary = cv2.inRange(hsv, HSV_LOW, HSV_HIGH)
    binary = cv2.erode(binary, _KERNEL, iterations=2)
    out = _carry(data)
    out["mask"] = cv2.dilate(binary, _KERNEL, iterations=2)
    return out


def contours(value: Any) -> Frame | Done:
    """Stage 4: the largest external contour; ends the chain when there is none big enough."""
    data = _mapping(value, "contours")
    binary = _array(data, "mask", "contours", channels=None)
    _scale(data, "contours")
    found, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    largest = max(found, key=cv2.contourArea, default=None)
    if largest is None or cv2.contourArea(largest) < MIN_CONTOUR_AREA:
        return Done(not_found(data["frame"]))
    out = _carry(data)
    out["contour"] = np.ascontiguousarray(largest.reshape(-1, 2), dtype=np.int32)
    return out


def circle(value: Any) -> Frame | Done:
    """Stage 5: enclosing circle and centroid, mapped back to full-resolution pixels."""
    data = _mapping(value, "circle")
    scale = _scale(data, "circle")
    contour = data.get("contour")
    if not isinstance(contour, np.ndarray) or contour.dtype != np.int32 or contour.ndim != 2 \
            or contour.shape[1] != 2 or not 1 <= contour.shape[0] <= 100_000:
        shape = getattr(contour, "shape", None)
        raise StageInputError("circle", f"'contour' must be int32 Nx2 (1 <= N <= 100000), got "
                                        f"{getattr(contour, 'dtype', type(contour).__name__)} {shape}")
    (cx, cy), radius = cv2.minEnclosingCircle(contour)
    moments = cv2.moments(contour)
    if moments["m00"] > 0:
        cx, cy = moments["m10"] / moments["m00"], moments["m01"] / moments["m00"]
    # Area interpolation: working pixel i covers full pixels i*s .. (i+1)*s - 1.
    full_x, full_y = (cx + 0.5) * scale - 0.5, (cy + 0.5) * scale - 0.5
    full_radius = (radius + 0.5) * scale
    if full_radius < MIN_RADIUS:
        return Done(not_found(data["frame"]))
    out = _carry(data)
    out["center"] = [round(full_x, 3), round(full_y, 3)]
    out["radius"] = round(full_radius, 3)
    return out


def annotate(value: Any) -> dict[str, Any]:
    """Stage 6: the final result; draws the circle on the thumbnail (JPEG) if one travels along."""
    data = _mapping(value, "annotate")
    centre = data.get("center")
    radius = data.get("radius")
    if not isinstance(centre, list | tuple) or len(centre) != 2 or not all(
            isinstance(c, int | float) and math.isfinite(c) for c in centre):
        raise StageInputError("annotate", f"needs 'center' as [x, y], got {centre!r}")
    if not isinstance(radius, int | float) or not math.isfinite(radius) or radius < 0:
        raise StageInputError("annotate", f"needs a non-negative 'radius', got {radius!r}")
    result: dict[str, Any] = {"frame": data["frame"], "found": True,
                              "center": [float(centre[0]), float(centre[1])],
                              "radius": float(radius)}
    if "thumb" in data:
        thumb = _array(data, "thumb", "annotate", channels=3).copy()
        scale = _scale(data, "annotate") * WORK_WIDTH / thumb.shape[1]
        cv2.circle(thumb, (round(centre[0] / scale), round(centre[1] / scale)),
                   max(1, round(radius / scale)), (0, 0, 255), 1, cv2.LINE_AA)
        ok, jpeg = cv2.imencode(".jpg", thumb, [cv2.IMWRITE_JPEG_QUALITY, 70])
        if ok:
            result["thumbnail"] = jpeg.tobytes()
    return result


STAGES = (capture, resize, blur_hsv, mask, contours, circle, annotate)
STAGE_NAMES = tuple(stage.__name__ for stage in STAGES)

registry = TaskRegistry()
BALL = registry.pipeline("ball", STAGES, description="track a green ball: 7 OpenCV stages")


class SlowingServer:
    """The ``ball`` pipeline for a server that can slow down: its last stage first sleeps
    ``seconds`` (0 until set, at any time). Experiments and tests of the split controller use it."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.registry = TaskRegistry()
        self.registry.pipeline("ball", [*STAGES[:-1], self.annotate])

    def annotate(self, value: Any) -> Any:
        if self.seconds:
            time.sleep(self.seconds)
        return annotate(value)


def track(frame: int, source: FrameSource | None = None, *, thumbnail: bool = False
          ) -> dict[str, Any]:
    """Run the whole pipeline for one frame on this machine and unwrap ``Done``."""
    value: Any = capture({"frame": frame, "thumbnail": thumbnail}, source)
    result = BALL.run(value, 1)
    final = result.value if isinstance(result, Done) else result
    assert isinstance(final, dict)
    return final


def tracking_error(result: Mapping[str, Any], truth: tuple[float, float] | None) -> float | None:
    """Pixel distance between a result and the ground truth, ``None`` if either has no ball."""
    if truth is None or not result.get("found"):
        return None
    cx, cy = result["center"]
    return math.hypot(cx - truth[0], cy - truth[1])


def frames(source: FrameSource, count: int, start: int = 0) -> Iterator[Frame]:
    """``count`` consecutive frame dicts from ``source``."""
    for n in range(start, start + count):
        yield source.capture(n)


__all__ = [
    "BALL",
    "STAGES",
    "STAGE_NAMES",
    "BallMotion",
    "BallVideo",
    "FrameSource",
    "SlowingServer",
    "StageInputError",
    "VideoCaptureSource",
    "annotate",
    "blur_hsv",
    "capture",
    "circle",
    "contours",
    "decode_intermediate",
    "default_source",
    "encode_intermediate",
    "mask",
    "not_found",
    "registry",
    "resize",
    "track",
    "tracking_error",
]
