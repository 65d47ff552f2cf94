"""The lite engine end to end (real detector, real warping, real ffmpeg), on short synthetic audio."""
from __future__ import annotations

import math
import os
import re
import subprocess
import threading

import numpy as np
import psutil
import pytest
import skimage.data

from support.paths import ROOT as PROJECT_ROOT
from preview.idle import IdleAnimator
from preview.lite import LiteEngine
from preview.motion import motion_from_audio
from preview.warp import REST, CropRenderer, FaceWarper, Pose
from core.audio import ffmpeg_exe, load_audio, write_wav
from core.errors import InputError, NoFaceError
from core.engine import Done, Frame, MotionReady, Progress
from core.image import load_image
from core.landmarks import LandmarkDetector
from core.options import FPS, SAMPLE_RATE, Options

ROOT = str(PROJECT_ROOT)
PORTRAIT = os.path.join(ROOT, "examples", "portrait.png")
SPEECH = os.path.join(ROOT, "examples", "speech.wav")


def vowel(seconds: float, amplitude: float = 0.5, pitch_hz: float = 140.0) -> np.ndarray:
    """A sustained "ah": harmonics of a voice pitch shaped by the first two formants of /a/ (~750, ~1200 Hz)."""
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    signal = np.zeros_like(t)
    for k in range(1, 25):
        f = k * pitch_hz
        gain = np.exp(-((f - 750) / 250) ** 2) + 0.6 * np.exp(-((f - 1200) / 250) ** 2) + 0.05
        signal += gain / k ** 0.5 * np.sin(2 * np.pi * f * t)
    return (amplitude * signal / np.abs(signal).max()).astype(np.float32)


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * SAMPLE_RATE), dtype=np.float32)


@pytest.fixture(scope="module")
def detector() -> LandmarkDetector:
    return LandmarkDetector(backend="dlib")


@pytest.fixture(scope="module")
def engine(detector) -> LiteEngine:
    return LiteEngine(detector=detector)


@pytest.fixture(scope="module")
def portrait() -> np.ndarray:
    return load_image(PORTRAIT)


@pytest.fixture(scope="module")
def vowel_wav(tmp_path_factory) -> str:
    """0.6 s silence, 0.8 s loud vowel, 0.8 s silence."""
    path = str(tmp_path_factory.mktemp("audio") / "vowel.wav")
    write_wav(path, np.concatenate([silence(0.6), vowel(0.8), silence(0.8)]))
    return path


def inner_lip_gap(detector: LandmarkDetector, rgb: np.ndarray) -> float:
    points = detector.detect(rgb).points
    return float(np.mean([points[b, 1] - points[a, 1] for a, b in ((61, 67), (62, 66), (63, 65))]))


def ffmpeg_probe(path: str) -> tuple[float, str]:
    """(duration in s, the stream lines) as ffmpeg reports them."""
    result = subprocess.run([ffmpeg_exe(), "-hide_banner", "-i", path], capture_output=True, text=True)
    hours, minutes, seconds = re.search(r"Duration: (\d+):(\d+):([\d.]+)", result.stderr).groups()
    streams = "\n".join(line for line in result.stderr.splitlines() if "Stream #" in line)
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds), streams


# --- motion -----------------------------------------------------------------------------------------------------

def test_mouth_opens_on_a_loud_vowel_and_closes_in_silence():
    samples = np.concatenate([silence(0.6), vowel(0.8), silence(0.8)])
    frames = math.ceil(samples.size / SAMPLE_RATE * FPS)
    motion = motion_from_audio(samples, frames, seed=1)
    before, during, after = motion.jaw[:14], motion.jaw[18:34], motion.jaw[44:]
    assert np.all(before == 0.0)  # (frame 14's analysis window already hears the onset: lips lead the sound)
    assert during.min() > 0.1  # clearly open through the whole vowel
    assert np.all(after == 0.0)  # closed again within 0.3 s of the vowel's end
    assert np.all(np.diff(motion.jaw[13:22]) > -0.005)  # opens without chattering...
    assert np.ptp(motion.jaw[20:34]) < 0.02  # ...and holds steady on a steady vowel
    # silence: the head still moves, gently
    for axis in (motion.pitch, motion.yaw, motion.roll):
        assert np.abs(axis).max() < 12.0
    assert np.abs(motion.yaw[:15]).max() + np.abs(motion.pitch[:15]).max() > 0.05


def test_silence_keeps_the_mouth_closed_with_gentle_motion_only():
    motion = motion_from_audio(silence(4.0), 100, seed=3)
    assert np.all(motion.jaw == 0.0) and np.all(motion.lip_shape == 0.0) and np.all(motion.brow == 0.0)
    assert np.abs(motion.pitch).max() < 6.0 and np.abs(motion.yaw).max() < 8.0
    assert np.abs(motion.pitch).max() > 0.2  # not a frozen picture
    assert motion.blink.max() == pytest.approx(1.0)  # at least one blink within 4 s, fully closed on a frame


def test_motion_is_seeded():
    samples = load_audio(SPEECH)
    frames = math.ceil(samples.size / SAMPLE_RATE * FPS)
    a, b, c = (motion_from_audio(samples, frames, seed=s) for s in (5, 5, 6))
    assert np.array_equal(a.pitch, b.pitch) and np.array_equal(a.blink, b.blink)
    assert not np.array_equal(a.pitch, c.pitch)
    assert np.array_equal(a.jaw, c.jaw)  # the mouth follows the audio only


# --- rendering ----------------------------------------------------------------------------------------------------

def test_rest_pose_renders_the_photo_unchanged(detector, portrait):
    warper = FaceWarper(portrait, detector.detect(portrait).points)
    assert np.array_equal(warper.render(REST), portrait)


def test_open_jaw_is_measured_by_the_detector_and_stays_local(detector, portrait):
    face = detector.detect(portrait)
    warper = FaceWarper(portrait, face.points)
    frame = warper.render(Pose(jaw=0.25))
    assert inner_lip_gap(detector, frame) > inner_lip_gap(detector, portrait) + 4.0
    changed = np.abs(frame.astype(int) - portrait.astype(int)).sum(-1) > 0
    ys, xs = np.nonzero(changed)
    x0, y0, x1, y1 = face.box
    # only the lower face moved: nothing above the eyes, nothing far outside the face
    assert ys.min() > face.points[36:48, 1].min()
    assert xs.min() > x0 - 0.5 * (x1 - x0) and xs.max() < x1 + 0.5 * (x1 - x0)
    # and the open mouth is darker inside than the lips were
    mouth = face.points[60:68].mean(0).round().astype(int)
    assert frame[mouth[1] + 3, mouth[0]].mean() < portrait[mouth[1] + 3, mouth[0]].mean() - 40


def eye_aspect_ratio(points: np.ndarray, first: int) -> float:
    """Lid distance over eye width (the usual blink measure): ~0.3 open, ~0.1 closed."""
    e = points[first:first + 6]
    return float((np.linalg.norm(e[1] - e[5]) + np.linalg.norm(e[2] - e[4])) / (2 * np.linalg.norm(e[0] - e[3])))


def test_blink_closes_the_eyes(detector, portrait):
    face = detector.detect(portrait)
    warper = FaceWarper(portrait, face.points)
    closed = detector.detect(warper.render(Pose(blink=1.0))).points
    for first in (36, 42):
        assert eye_aspect_ratio(closed, first) < 0.6 * eye_aspect_ratio(face.points, first)


def test_frames_of_a_face_touching_the_image_border_do_not_tear(detector, portrait):
    face = detector.detect(portrait)
    x0, y0, x1, y1 = (int(v) for v in face.box)
    cut = np.ascontiguousarray(portrait[max(0, y0 - 60):, x0 + 10:])  # face cut by the left and top edges
    points = face.points - [x0 + 10, max(0, y0 - 60)]
    frame = FaceWarper(cut, points).render(Pose(jaw=0.2, pitch=5, yaw=-6, roll=4, blink=1.0))
    assert frame.shape == cut.shape
    # pixels on the image border stay put (the displacement fades to zero there)
    assert np.array_equal(frame[0], cut[0]) and np.array_equal(frame[:, 0], cut[:, 0])


# --- the engine -------------------------------------------------------------------------------------------------

def test_generate_yields_stages_motion_frames_and_done(engine, portrait, vowel_wav):
    events = list(engine.generate(PORTRAIT, vowel_wav, Options(seed=3)))
    expected_frames = math.ceil(load_audio(vowel_wav).size / SAMPLE_RATE * FPS)
    stages = [e.stage for e in events if isinstance(e, Progress)]
    for stage in ("landmarks", "audio", "motion", "render"):
        assert stage in stages
    kinds = [type(e).__name__ for e in events]
    assert kinds.count("MotionReady") == 1 and isinstance(events[-1], Done)
    first_frame = kinds.index("Frame")
    assert kinds.index("MotionReady") < first_frame
    assert stages.index("render") <= len([e for e in events[:first_frame] if isinstance(e, Progress)])
    frames = [e for e in events if isinstance(e, Frame)]
    assert abs(len(frames) - expected_frames) <= 1 and len(frames) == events[-1].num_frames
    assert [f.index for f in frames] == list(range(len(frames)))
    assert all(f.quality == "final" and f.time_s == pytest.approx(f.index / 25) for f in frames)
    assert all(f.rgb.shape == portrait.shape and f.rgb.dtype == np.uint8 for f in frames)
    done = events[-1]
    assert done.engine == "lite" and done.video_path is None
    assert done.duration_s == pytest.approx(len(frames) / 25)
    # render progress comes at least every few frames, ending at total
    render = [e for e in events if isinstance(e, Progress) and e.stage == "render"]
    assert render[-1].done == render[-1].total == len(frames)
    assert max(np.diff([e.done for e in render])) <= 5
    # the preview plays the same motion on the 128 px face crop
    ready = next(e for e in events if isinstance(e, MotionReady))
    assert ready.fps == 25 and ready.num_frames == len(frames) == ready.preview.num_frames
    tile = ready.preview.render(25)
    assert tile.shape == (128, 128, 3) and tile.dtype == np.uint8


def test_output_frames_open_the_mouth_on_the_vowel_only(engine, detector, vowel_wav):
    frames = {e.index: e.rgb for e in engine.generate(PORTRAIT, vowel_wav, Options(seed=3)) if isinstance(e, Frame)}
    silent_before = np.mean([inner_lip_gap(detector, frames[i]) for i in (3, 8, 13)])
    voiced = np.mean([inner_lip_gap(detector, frames[i]) for i in (20, 25, 30)])
    silent_after = np.mean([inner_lip_gap(detector, frames[i]) for i in (47, 50, 53)])
    assert voiced > silent_before + 3.0 and voiced > silent_after + 3.0
    assert abs(silent_after - silent_before) < 1.5


def test_preview_render_is_thread_safe_and_deterministic(engine, vowel_wav):
    ready = next(e for e in engine.generate(PORTRAIT, vowel_wav, Options(seed=3)) if isinstance(e, MotionReady))
    preview = ready.preview
    expected = [preview.render(i) for i in range(preview.num_frames)]
    results: dict[int, list[np.ndarray]] = {}

    def work(worker: int) -> None:
        order = list(range(preview.num_frames))[::(1 if worker % 2 else -1)]
        results[worker] = {i: preview.render(i) for i in order}

    threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for frames in results.values():
        assert all(np.array_equal(frames[i], expected[i]) for i in range(preview.num_frames))
    assert not np.array_equal(expected[0], expected[25])  # it moves


def test_mp4_has_video_and_audio_of_the_right_length(engine, vowel_wav, tmp_path):
    output = str(tmp_path / "out" / "talk.mp4")
    events = list(engine.generate(PORTRAIT, vowel_wav, Options(seed=1, output=output)))
    done = events[-1]
    assert done.video_path == output and os.path.getsize(output) > 10_000
    duration, streams = ffmpeg_probe(output)
    assert "Video: h264" in streams and "Audio: aac" in streams and "512x512" in streams
    assert abs(duration - done.num_frames / 25) <= 0.08


def test_stopping_early_leaves_no_file_and_no_ffmpeg(engine, vowel_wav, tmp_path):
    output = str(tmp_path / "stopped.mp4")
    events = engine.generate(PORTRAIT, vowel_wav, Options(seed=1, output=output))
    for event in events:
        if isinstance(event, Frame) and event.index == 3:
            break
    ffmpegs = [p for p in psutil.Process().children(recursive=True) if "ffmpeg" in p.name()]
    assert ffmpegs  # still encoding while the generator is suspended
    events.close()
    psutil.wait_procs(ffmpegs, timeout=5)
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in ffmpegs)
    assert not os.path.exists(output)


def test_same_seed_same_frames(engine, vowel_wav):
    def frame(seed, index=30):
        for event in engine.generate(PORTRAIT, vowel_wav, Options(seed=seed)):
            if isinstance(event, Frame) and event.index == index:
                return event.rgb

    assert np.array_equal(frame(11), frame(11))
    assert not np.array_equal(frame(11), frame(12))


def test_one_pixel_wide_image_is_a_clear_error(engine, vowel_wav, tmp_path):
    from PIL import Image

    path = str(tmp_path / "line.png")
    Image.fromarray(np.full((300, 1, 3), 200, dtype=np.uint8)).save(path)
    with pytest.raises(NoFaceError, match="80 pixels"):
        list(engine.generate(path, vowel_wav, Options(seed=0)))


def test_no_face_is_a_clear_error(engine, vowel_wav):
    with pytest.raises(NoFaceError, match="frontal"):
        list(engine.generate(np.ascontiguousarray(skimage.data.coffee()), vowel_wav, Options(seed=0)))


def test_huge_image_is_downscaled_and_animated(engine, portrait, tmp_path):
    from PIL import Image

    canvas = np.full((3000, 4000, 3), 235, dtype=np.uint8)
    canvas[500:2548, 1000:3048] = np.kron(portrait, np.ones((4, 4, 1), dtype=np.uint8))
    path = str(tmp_path / "huge.jpg")
    Image.fromarray(canvas).save(path, quality=90)
    wav = str(tmp_path / "short.wav")
    write_wav(wav, vowel(0.3))
    frames = [e for e in engine.generate(path, wav, Options(seed=0)) if isinstance(e, Frame)]
    assert len(frames) in (7, 8, 9)
    assert frames[0].rgb.shape == (1536, 2048, 3)  # load_image caps the long side at 2048
    assert not np.array_equal(frames[0].rgb, frames[-1].rgb)


def test_options_are_checked(engine, vowel_wav):
    with pytest.raises(InputError, match="pose style"):
        next(iter(engine.generate(PORTRAIT, vowel_wav, Options(pose_style=99))))


def test_missing_audio_is_a_clear_error(engine, tmp_path):
    with pytest.raises(InputError, match="not found"):
        list(engine.generate(PORTRAIT, str(tmp_path / "nothing.wav"), Options(seed=0)))


# --- idle animation -----------------------------------------------------------------------------------------------

def test_the_preview_renderer_made_for_the_idle_animation_is_the_clips_and_only_for_the_same_photo(detector,
                                                                                                   portrait):
    from preview.warp import prepared_crop_renderer

    points = detector.detect(portrait).points
    made_on_upload = IdleAnimator(portrait, detector=detector, seed=1)._renderer
    assert prepared_crop_renderer(portrait, points) is made_on_upload  # the click finds it set up
    assert prepared_crop_renderer(portrait.copy(), points.copy()) is made_on_upload  # same content, new arrays
    darker = (portrait // 2).astype(np.uint8)  # another photo with the same landmarks: its own renderer
    other = prepared_crop_renderer(darker, points)
    assert other is not made_on_upload
    assert other.render(REST).mean() < made_on_upload.render(REST).mean() - 20


def test_idle_starts_from_the_still_crop_in_the_preview_framing(engine, detector, portrait, tmp_path):
    idle = IdleAnimator(portrait, detector=detector, seed=4)
    first = idle.render(0.0)
    assert first.shape == (128, 128, 3) and first.dtype == np.uint8
    still = CropRenderer(portrait, detector.detect(portrait).points).render(REST)
    assert np.array_equal(first, still)
    # the audio preview of a silent clip starts on exactly the same picture: idle -> preview is seamless
    wav = str(tmp_path / "quiet.wav")
    write_wav(wav, silence(1.0))
    ready = next(e for e in engine.generate(PORTRAIT, wav, Options(seed=0)) if isinstance(e, MotionReady))
    assert np.array_equal(ready.preview.render(0), first)
    # and then it moves: nods and sways over the next seconds
    later = [idle.render(t) for t in (0.6, 1.2, 1.8)]
    assert all(np.abs(f.astype(int) - first.astype(int)).mean() > 0.5 for f in later)


def test_idle_at_another_size(detector, portrait):
    idle = IdleAnimator(portrait, detector=detector, size=96, seed=1)
    assert idle.render(1.0).shape == (96, 96, 3)
