"""The ball-tracking pipeline: accuracy, identical results at every split, input checks, Done."""

from __future__ import annotations

import statistics
from typing import Any

import numpy as np
import pytest

pytest.importorskip("cv2")

from agent_common.registry import Done, load_tasks, run_spec
from examples.vision.ball import (
    BALL,
    STAGE_NAMES,
    BallVideo,
    StageInputError,
    annotate,
    blur_hsv,
    capture,
    circle,
    contours,
    decode_intermediate,
    encode_intermediate,
    mask,
    resize,
    track,
    tracking_error,
)
from topics.codec import Codec
from topics.models import Result, Status, Task


@pytest.fixture(scope="module")
def video() -> BallVideo:
    return BallVideo(seed=3, hidden=((40, 45),))


def step(video: BallVideo, frame: int) -> float:
    """How far the ball moves from ``frame`` to the next (both must show it)."""
    here, there = video.truth(frame), video.truth(frame + 1)
    assert here is not None and there is not None
    return float(np.hypot(*np.subtract(there, here)))


def run_split(frame: int, k: int, video: BallVideo, codec: Codec, *,
              jpeg_quality: int | None = None) -> tuple[Any, int]:
    """Stages 0..k-1 here, the value through a CBOR Task and back, stages k..n-1 'remotely'."""
    value: Any = capture(frame, video)
    local = BALL.run(value, 1, k)
    if isinstance(local, Done) or k == len(BALL.stages):
        return (local.value if isinstance(local, Done) else local), 0
    shipped = encode_intermediate(local, jpeg_quality)
    wire = codec.encode(Task(id=f"f{frame}", task="ball", sender="cam", reply_to="r/cam",
                             created=0.0, payload=shipped, stage=k))
    task = codec.decode(wire, Task)
    assert task.stage == k
    remote = run_spec(BALL, task.payload, task.stage)
    back = codec.decode(codec.encode(Result(task_id=task.id, status=Status.OK, server="srv",
                                            payload=remote)), Result)
    return back.payload, len(wire)


def test_pipeline_is_registered_for_both_agents() -> None:
    tasks = load_tasks("examples.vision.ball")
    spec = tasks.get("ball")
    assert spec.pipeline and len(spec.stages) == 7
    assert spec.stage_names == STAGE_NAMES
    assert STAGE_NAMES[0] == "capture" and STAGE_NAMES[-1] == "annotate"
    assert spec.capability().stages == 7


def test_tracking_error_is_a_few_pixels(video: BallVideo) -> None:
    errors: list[float] = []
    visible = 0
    for n in range(100):
        truth = video.truth(n)
        result = track(n, video)
        assert result["frame"] == n
        if truth is None:
            assert not result["found"], f"frame {n}: ball reported while out of view"
            continue
        visible += 1
        error = tracking_error(result, truth)
        if error is not None:
            errors.append(error)
    assert visible == 95
    assert len(errors) / visible > 0.95
    assert statistics.mean(errors) < 3.0
    assert max(errors) < 6.0


def test_video_is_seeded_and_moves() -> None:
    a, b = BallVideo(seed=7), BallVideo(seed=7)
    assert np.array_equal(a.render(12), b.render(12))
    assert not np.array_equal(BallVideo(seed=8).render(12), a.render(12))
    frame = a.render(0)
    assert frame.shape == (480, 640, 3) and frame.dtype == np.uint8
    positions = [a.truth(n) for n in range(0, 60, 5)]
    assert len({(round(p[0]), round(p[1])) for p in positions if p}) == len(positions)
    speeds = [step(a, n) for n in range(0, 90)]
    assert max(speeds) > 1.5 * min(speeds), "speed should vary"
    for n in range(0, 400, 7):
        x, y = a.truth(n) or (None, None)
        if x is not None and y is not None:
            radius = a.motion.radius
            assert radius <= x <= 639 - radius and radius <= y <= 479 - radius


@pytest.mark.parametrize("frame", [0, 17, 41, 63])
def test_every_split_gives_the_same_result(video: BallVideo, frame: int) -> None:
    codec = Codec("cbor")
    results = {k: run_split(frame, k, video, codec)[0] for k in range(1, 8)}
    reference = results[7]
    assert reference["frame"] == frame
    for k, result in results.items():
        assert result == reference, f"split {k} differs"


def test_split_sizes_shrink_along_the_pipeline(video: BallVideo) -> None:
    codec = Codec("cbor")
    sizes = [run_split(5, k, video, codec)[1] for k in range(1, 7)]
    assert sizes[0] > 900_000  # a raw 640x480x3 frame
    assert sizes[0] > sizes[1] > sizes[3] > sizes[4]


def test_jpeg_intermediates_are_smaller_and_still_track(video: BallVideo) -> None:
    codec = Codec("cbor")
    truth = video.truth(9)
    for k in (1, 2, 3):
        _, raw_size = run_split(9, k, video, codec)
        jpeg_result, jpeg_size = run_split(9, k, video, codec, jpeg_quality=85)
        assert jpeg_size < raw_size / 5, f"split {k}: jpeg {jpeg_size} vs raw {raw_size}"
        error = tracking_error(jpeg_result, truth)
        assert error is not None and error < 3.0
    # masks travel as lossless PNG: identical result
    assert run_split(9, 4, video, codec, jpeg_quality=50)[0] == run_split(9, 4, video, codec)[0]


def test_encode_intermediate_round_trip(video: BallVideo) -> None:
    value = mask(blur_hsv(resize(capture(3, video))))
    packed = encode_intermediate(value, 90)
    assert isinstance(packed["mask"], dict) and packed["frame"] == 3
    assert np.array_equal(decode_intermediate(packed)["mask"], value["mask"])
    assert encode_intermediate(value, None) is value
    with pytest.raises(ValueError, match="jpeg_quality"):
        encode_intermediate(value, 0)


def test_ball_out_of_view_ends_the_chain_early(video: BallVideo) -> None:
    assert video.truth(42) is None
    value = BALL.run(capture(42, video), 1)
    assert isinstance(value, Done)
    assert value.value == {"frame": 42, "found": False, "center": None, "radius": None}
    # the chain stopped at 'contours': a later start on the same value is never reached
    partial = BALL.run(capture(42, video), 1, 5)
    assert isinstance(partial, Done)


def test_thumbnail_is_a_small_jpeg(video: BallVideo) -> None:
    result = track(4, video, thumbnail=True)
    assert result["found"]
    thumb = result["thumbnail"]
    assert isinstance(thumb, bytes) and thumb[:2] == b"\xff\xd8" and len(thumb) < 8000


BAD_INPUTS = [
    (resize, {"frame": 1, "image": np.zeros((480, 640), np.uint8)}, "resize", "HxWx3"),
    (resize, {"frame": 1, "image": np.zeros((480, 640, 3), np.float32)}, "resize", "float32"),
    (resize, {"image": np.zeros((480, 640, 3), np.uint8)}, "resize", "frame"),
    (resize, [1, 2, 3], "resize", "dict"),
    (blur_hsv, {"frame": 1, "scale": 2.0, "image": np.zeros((240, 320, 4), np.uint8)},
     "blur_hsv", "HxWx3"),
    (blur_hsv, {"frame": 1, "image": np.zeros((240, 320, 3), np.uint8)}, "blur_hsv", "scale"),
    (mask, {"frame": 1, "scale": 2.0, "hsv": np.zeros((240, 320, 3), np.int16)}, "mask", "int16"),
    (contours, {"frame": 1, "scale": 2.0, "mask": np.zeros((240, 320, 3), np.uint8)},
     "contours", "HxW"),
    (circle, {"frame": 1, "scale": 2.0, "contour": np.zeros((5, 3), np.int32)}, "circle", "Nx2"),
    (circle, {"frame": 1, "scale": 2.0, "contour": np.zeros((5, 2), np.float64)}, "circle", "int32"),
    (annotate, {"frame": 1, "center": "middle", "radius": 3.0}, "annotate", "center"),
    (annotate, {"frame": -1, "center": [1, 2], "radius": 3.0}, "annotate", "frame"),
    (capture, "seven", "capture", "frame number"),
    (capture, -3, "capture", "frame number"),
]


@pytest.mark.parametrize(("stage", "value", "name", "words"), BAD_INPUTS)
def test_bad_input_is_a_clear_error_naming_the_stage(stage: Any, value: Any, name: str,
                                                     words: str) -> None:
    with pytest.raises(StageInputError, match=words) as info:
        stage(value)
    assert info.value.stage == name
    assert f"stage {name!r}" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_corrupt_or_lying_compressed_image_is_rejected(video: BallVideo) -> None:
    value = resize(capture(2, video))
    packed = encode_intermediate(value, 80)
    record = packed["image"]
    lying = dict(packed, image=dict(record, shape=[480, 640, 3]))
    with pytest.raises(StageInputError, match="header"):
        blur_hsv(lying)
    broken = dict(packed, image=dict(record, data=b"\xff\xd8" + b"\x00" * 50))
    with pytest.raises(StageInputError, match="blur_hsv"):
        blur_hsv(broken)
    huge = dict(packed, image=dict(record, shape=[100_000, 100_000, 3]))
    with pytest.raises(StageInputError, match="pixels"):
        blur_hsv(huge)
    with pytest.raises(StageInputError, match="compressed image"):
        blur_hsv(dict(packed, image={"image_codec": "gif", "data": b"", "shape": [1, 1]}))


def test_camera_without_a_broker_runs_everything_locally_in_order() -> None:
    from examples.vision.camera import Camera, CameraOptions

    video = BallVideo(seed=5, hidden=((3, 5),))
    seen: list[int] = []
    camera = Camera(None, CameraOptions(frames=12, split=3), source=video)
    report = camera.run(lambda outcome: seen.append(outcome.frame))
    assert seen == list(range(12))
    assert report.where == {"local": 12} and report.local_share == 1.0
    assert report.found == report.visible == 10
    assert report.mean_error_px is not None and report.mean_error_px < 3.0
    assert [o.result for o in camera.outcomes] == [track(n, video) for n in range(12)]


@pytest.mark.parametrize(("options", "words"), [
    ({"frames": 0}, "frames"),
    ({"frames": 5, "split": 3, "target_fps": 10.0}, "not both"),
    ({"frames": 5, "target_fps": -1.0}, "target_fps"),
    ({"frames": 5, "slowdown": 0.5}, "slowdown"),
    ({"frames": 5, "jpeg_quality": 0}, "jpeg_quality"),
    ({"frames": 5, "slowdown": 2.0, "device_stage_s": (0.01,) * 7}, "not both"),
    ({"frames": 5, "device_stage_s": (0.01, -0.01, 0, 0, 0, 0, 0)}, "device_stage_s"),
    ({"frames": 5, "device_stage_s": (float("nan"),) * 7}, "device_stage_s"),
])
def test_camera_options_are_checked(options: dict[str, Any], words: str) -> None:
    from examples.vision.camera import CameraOptions

    with pytest.raises(ValueError, match=words):
        CameraOptions(**options)


def test_camera_rejects_a_split_outside_the_pipeline() -> None:
    from edge_agent.split import SplitError
    from examples.vision.camera import Camera, CameraOptions, main

    with pytest.raises(SplitError, match="outside the pipeline"):
        Camera(None, CameraOptions(frames=3, split=8))
    assert main(["--split", "0", "--frames", "2"]) == 2


def test_device_stage_times_need_one_time_per_stage() -> None:
    from examples.vision.camera import Camera, CameraOptions, main

    with pytest.raises(ValueError, match="one time per stage"):
        Camera(None, CameraOptions(frames=3, device_stage_s=(0.01, 0.02)))
    assert main(["--device-ms", "5,10", "--frames", "2"]) == 2
    with pytest.raises(SystemExit):
        main(["--device-ms", "5,fast", "--frames", "2"])


def test_device_stage_times_fix_each_local_stage_to_the_device_time() -> None:
    from examples.vision.camera import Camera, CameraOptions

    class FakeTime:
        """A clock that each stage advances by 1 ms of work; sleeps advance it as asked."""

        def __init__(self) -> None:
            self.now = 0.0
            self.slept: list[float] = []

        def clock(self) -> float:
            self.now += 0.0001
            return self.now

        def sleep(self, seconds: float) -> None:
            self.slept.append(seconds)
            self.now += seconds

    fake = FakeTime()
    times = (0.005, 0.010, 0.030, 0.015, 0.010, 0.008, 0.004)
    camera = Camera(None, CameraOptions(frames=1, device_stage_s=times), source=BallVideo(seed=2),
                    clock=fake.clock, sleep=fake.sleep)
    report = camera.run()
    assert report.frames == 1
    # Each stage slept what the device needed beyond the (fake) time it took here.
    assert len(fake.slept) == len(times)
    for slept, device in zip(fake.slept, times, strict=True):
        assert device - 0.001 < slept < device
    assert report.duration_s == pytest.approx(sum(times), rel=0.05)


def test_camera_reads_a_video_file_until_it_ends(tmp_path: Any) -> None:
    import cv2

    from examples.vision.ball import VideoCaptureSource
    from examples.vision.camera import Camera, CameraOptions

    video = BallVideo(seed=6)
    path = str(tmp_path / "ball.avi")
    writer = cv2.VideoWriter(path, cv2.VideoWriter.fourcc(*"MJPG"), 30.0, (640, 480))
    assert writer.isOpened()
    for n in range(8):
        writer.write(video.render(n))
    writer.release()
    source = VideoCaptureSource(path)
    try:
        camera = Camera(None, CameraOptions(frames=20), source=source)
        report = camera.run()
    finally:
        source.close()
    assert report.frames == 8  # the file ran out; what was read is reported
    assert report.visible == 0 and report.mean_error_px is None  # no ground truth
    for outcome in camera.outcomes:  # but the ball is found where the synthetic source drew it
        truth = video.truth(outcome.frame)
        assert truth is not None
        error = tracking_error(outcome.result, truth)
        assert error is not None
        assert error < 3.0
    with pytest.raises(OSError, match="cannot open"):
        VideoCaptureSource(str(tmp_path / "missing.avi"))
