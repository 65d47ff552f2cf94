"""The SadTalker engine end to end on synthetic weights written in the official file layout (no real checkpoints).

Clips are a few frames long (<= 0.3 s of audio at 256): the renderer costs seconds per frame on a CPU.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import imageio_ffmpeg
import numpy as np
import pytest

from support.paths import ROOT as PROJECT_ROOT
from core.audio import ffmpeg_exe, load_audio, write_wav
from core.errors import CheckpointError, InputError, NoFaceError
from core.engine import Done, Frame, MotionReady, Progress
from core.image import load_image
from sadtalker.keypoint_preview import KeypointPreview
from core.landmarks import LandmarkDetector
from core.options import Options
from sadtalker.pipeline import SadTalkerPipeline
from sadtalker.preprocess import crop_portrait
from sadtalker.synthetic import FILES_256, cached_official_layout as synthetic_checkpoint_dir
from sadtalker.synthetic import cached_synthetic_gfpgan

ROOT = str(PROJECT_ROOT)
PORTRAIT = os.path.join(ROOT, "examples", "portrait.png")
SPEECH = os.path.join(ROOT, "examples", "speech.wav")


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    """A checkpoint folder as a user would have it: the official 256 files and GFPGANv1.4.pth (synthetic)."""
    folder = tmp_path_factory.mktemp("checkpoints")
    cache = synthetic_checkpoint_dir(legacy=False)
    for name in FILES_256:
        os.symlink(os.path.join(cache, name), folder / name)
    os.symlink(cached_synthetic_gfpgan(), folder / "GFPGANv1.4.pth")
    return str(folder)


@pytest.fixture(scope="module")
def pipeline(checkpoint_dir):
    return SadTalkerPipeline.from_checkpoints(checkpoint_dir, detector=LandmarkDetector("dlib"))


def speech_clip(path, seconds: float) -> str:
    """The first ``seconds`` of the example speech (from its loud part) as a 16 kHz wav."""
    wav = load_audio(SPEECH)
    start = int(0.6 * 16000)
    write_wav(str(path), wav[start:start + int(round(seconds * 16000))])
    return str(path)


def probe(path: str) -> tuple[int, tuple[int, int], bool]:
    """(video frames, (width, height), has an audio stream) of an mp4, read by the bundled ffmpeg."""
    frames, _ = imageio_ffmpeg.count_frames_and_secs(path)
    reader = imageio_ffmpeg.read_frames(path)
    size = tuple(next(reader)["size"])
    reader.close()
    info = subprocess.run([ffmpeg_exe(), "-hide_banner", "-i", path], capture_output=True, text=True).stderr
    return frames, size, "Audio:" in info


def run(pipeline, image, audio, options):
    events = list(pipeline.generate(image, audio, options))
    kinds = [type(e) for e in events]
    assert kinds[-1] is Done
    assert kinds.count(MotionReady) == 1
    assert kinds.index(MotionReady) < kinds.index(Frame), "motion must be known before the first final frame"
    return events


@pytest.mark.parametrize("preprocess, still", [("crop", False), ("extcrop", False), ("resize", False),
                                               ("full", False), ("extfull", False), ("crop", True)])
def test_every_preprocess_mode_makes_a_video_with_sound(pipeline, tmp_path, preprocess, still):
    audio = speech_clip(tmp_path / "clip.wav", 0.08)  # 1280 samples -> int(1280 / 640) = 2 frames
    output = str(tmp_path / "out.mp4")
    events = run(pipeline, PORTRAIT, audio, Options(output=output, preprocess=preprocess, still=still, seed=3,
                                                    batch_size=2 if still else 1))
    stages = [e.stage for e in events if isinstance(e, Progress)]
    for stage in ("landmarks", "crop", "3dmm", "audio", "motion", "render"):
        assert stage in stages
    frames = [e for e in events if isinstance(e, Frame)]
    done = events[-1]
    assert [f.index for f in frames] == [0, 1] and done.num_frames == 2
    assert all(f.quality == "final" for f in frames)
    photo = load_image(PORTRAIT)
    height, width = frames[0].rgb.shape[:2]
    if preprocess in ("full", "extfull"):
        assert (height, width) == photo.shape[:2], "full modes paste the face back into the whole photo"
        x0, y0, x1, y1 = crop_portrait(photo, pipeline.detector.detect(photo).points, preprocess).paste_box
        outside = np.ones(photo.shape[:2], bool)
        outside[max(y0, 0):y1, max(x0, 0):x1] = False
        assert outside.sum() > 0.3 * outside.size
        assert np.array_equal(frames[0].rgb[outside], photo[outside]), "only the face box is replaced"
        assert not np.array_equal(frames[0].rgb, photo)
    else:
        assert width == 256 and 200 <= height <= 320
    assert done.video_path == output and done.engine == "sadtalker"
    count, size, has_audio = probe(output)
    assert count == 2 and has_audio
    assert size == (width + width % 2, height + height % 2)


def test_still_mode_keeps_the_source_head_pose(pipeline, tmp_path):
    audio = speech_clip(tmp_path / "clip.wav", 0.2)
    moving = next(e for e in pipeline.generate(PORTRAIT, audio, Options(seed=5)) if isinstance(e, MotionReady))
    still = next(e for e in pipeline.generate(PORTRAIT, audio, Options(seed=5, still=True))
                 if isinstance(e, MotionReady))
    assert moving.num_frames == still.num_frames == 5
    # Same audio and seed: only the pose differs, so the still preview moves less between first and last frame.
    def motion(preview):
        return np.abs(preview.render(0).astype(float) - preview.render(preview.num_frames - 1).astype(float)).mean()
    assert motion(still.preview) < motion(moving.preview)


def test_preview_follows_the_driving_keypoints(pipeline, tmp_path):
    audio = speech_clip(tmp_path / "clip.wav", 0.2)
    ready = next(e for e in pipeline.generate(PORTRAIT, audio, Options(seed=1)) if isinstance(e, MotionReady))
    assert isinstance(ready.preview, KeypointPreview) and ready.preview.num_frames == ready.num_frames == 5
    frame = ready.preview.render(2)
    assert frame.shape == (128, 128, 3) and frame.dtype == np.uint8

    # Synthetic weights put keypoints far outside the image, so drive the preview with keypoints spread over the
    # face as real ones are: 15 of the portrait's landmarks in the crop's [-1, 1] coordinates.
    photo = load_image(PORTRAIT)
    crop = crop_portrait(photo, pipeline.detector.detect(photo).points, "crop")
    points = crop.to_crop_coords(pipeline.detector.detect(photo).points)[::4][:15] / 255.0 * 2.0 - 1.0
    kp_source = np.concatenate([points, np.zeros((15, 1))], axis=1)
    driving = np.repeat(kp_source[None], 3, axis=0)
    driving[1, :, 0] += 0.15  # frame 1: the whole head 0.15 to the right (of the [-1, 1] range) ...
    driving[1, :, 1] += 0.10  # ... and 0.10 down
    driving[2, 48 // 4:, 1] += 0.08  # frame 2: only the lowest keypoints (mouth) move down
    preview = KeypointPreview(crop.image, kp_source, driving)
    still, moved, mouth = (preview.render(i) for i in range(3))
    dx, dy = image_shift(still, moved)
    assert 6 <= dx <= 11 and 3 <= dy <= 8, (dx, dy)  # 0.15 * 64 = 9.6 px and 0.10 * 64 = 6.4 px at 128
    change = np.abs(mouth.astype(float) - still.astype(float)).mean(axis=(1, 2))  # per row
    assert change[80:].mean() > 3 * change[:48].mean() and change[80:].mean() > 2, \
        "the lower face (around the moved keypoints) changes, the forehead much less"


def test_a_long_clip_previews_from_its_first_seconds_then_gets_the_whole_motion(pipeline, tmp_path):
    wav = load_audio(SPEECH)
    audio = str(tmp_path / "long.wav")
    write_wav(audio, np.tile(wav, 3)[:int(5.6 * 16000)])  # 140 frames: long enough for a head start
    events = pipeline.generate(PORTRAIT, audio, Options(seed=3))
    ready = next(e for e in events if isinstance(e, MotionReady))
    preview = ready.preview
    assert ready.num_frames == preview.num_frames == 140
    assert preview.known_frames == 46  # 65 frames of motion minus what pose smoothing and MappingNet look ahead at
    head = preview.motion.copy()
    assert np.array_equal(preview.render(139), preview.render(45))  # meanwhile later frames hold the last pose
    next(events)  # going on, the engine computes the whole clip's motion before it renders
    assert preview.known_frames == 140
    assert np.allclose(preview.motion[:46], head, atol=1e-4), np.abs(preview.motion[:46] - head).max()
    assert np.abs(preview.motion[46:] - head[-1]).max() > 1e-3  # the motion goes on after the head
    events.close()


def image_shift(a: np.ndarray, b: np.ndarray, reach: int = 16) -> tuple[int, int]:
    """Integer (dx, dy) that best maps ``a`` onto ``b`` (b[y, x] ~ a[y - dy, x - dx]) over the image centre."""
    a, b = a.astype(float).mean(2), b.astype(float).mean(2)
    c = slice(reach, -reach)
    scores = {(dx, dy): np.abs(np.roll(a, (dy, dx), axis=(0, 1))[c, c] - b[c, c]).mean()
              for dx in range(-reach, reach + 1) for dy in range(-reach, reach + 1)}
    return min(scores, key=scores.get)


def test_identical_keypoints_give_the_source_crop():
    rng = np.random.default_rng(0)
    source = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    kp = rng.uniform(-0.6, 0.6, (15, 3))
    preview = KeypointPreview(source, kp, kp[None].repeat(4, 0))
    import cv2

    assert np.array_equal(preview.render(3), cv2.resize(source, (128, 128), interpolation=cv2.INTER_AREA))


def test_enhancer_runs_on_a_synthetic_gfpgan(pipeline, tmp_path):
    audio = speech_clip(tmp_path / "clip.wav", 0.05)  # one frame
    events = run(pipeline, PORTRAIT, audio, Options(output=str(tmp_path / "out.mp4"), enhancer="gfpgan", seed=0))
    frames = [e for e in events if isinstance(e, Frame)]
    assert len(frames) == 1 and events[-1].warnings == ()
    assert frames[0].rgb.shape[1] == 512, "GFPGANer upscales the output 2x"
    count, size, has_audio = probe(str(tmp_path / "out.mp4"))
    assert count == 1 and has_audio and size[0] == 512


def test_missing_enhancer_weights_warn_and_continue(pipeline, tmp_path):
    audio = speech_clip(tmp_path / "clip.wav", 0.05)
    options = Options(output=str(tmp_path / "out.mp4"), enhancer="RestoreFormer")
    stream = pipeline.generate(PORTRAIT, audio, options)
    warning = next(e for e in stream if isinstance(e, Progress) and e.stage == "enhancer")
    assert "RestoreFormer" in warning.message and "continu" in warning.message.lower()
    events = list(stream)
    done = events[-1]
    assert isinstance(done, Done) and done.warnings == (warning.message,)
    assert os.path.isfile(done.video_path)
    assert [e for e in events if isinstance(e, Frame)][0].rgb.shape[1] == 256, "no enhancement, no upscale"


def test_bad_options_and_inputs_fail_before_any_work(pipeline, tmp_path):
    audio = speech_clip(tmp_path / "clip.wav", 0.1)
    with pytest.raises(InputError, match="pose style"):
        next(pipeline.generate(PORTRAIT, audio, Options(pose_style=46)))
    with pytest.raises(InputError, match="512"):
        next(pipeline.generate(PORTRAIT, audio, Options(size=512)))
    blank = np.full((300, 300, 3), 200, np.uint8)
    with pytest.raises(NoFaceError):
        list(pipeline.generate(blank, audio, Options()))


def test_cancelling_removes_the_partial_video(pipeline, tmp_path):
    audio = speech_clip(tmp_path / "clip.wav", 0.08)
    output = tmp_path / "out.mp4"
    stream = pipeline.generate(PORTRAIT, audio, Options(output=str(output)))
    for event in stream:
        if isinstance(event, Frame):
            break  # one of two frames is in the encoder
    stream.close()
    assert not output.exists()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".mp4")]


def test_missing_or_corrupt_checkpoints_give_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="SadTalker_V0.0.2_256.safetensors"):
        SadTalkerPipeline.from_checkpoints(str(tmp_path))
    cache = synthetic_checkpoint_dir(legacy=False)
    for name in FILES_256:
        os.symlink(os.path.join(cache, name), tmp_path / name)
    broken = tmp_path / "SadTalker_V0.0.2_256.safetensors"
    broken.unlink()
    with open(os.path.join(cache, "SadTalker_V0.0.2_256.safetensors"), "rb") as src, open(broken, "wb") as dst:
        shutil.copyfileobj(src, dst, length=1 << 20)
        dst.truncate(50_000_000)  # an interrupted download
    with pytest.raises(CheckpointError, match="SadTalker_V0.0.2_256.safetensors"):
        SadTalkerPipeline.from_checkpoints(str(tmp_path))


def test_headless_render_with_the_sadtalker_engine(checkpoint_dir, tmp_path):
    audio = speech_clip(tmp_path / "clip.wav", 0.05)  # one frame
    output = tmp_path / "cli.mp4"
    result = subprocess.run([sys.executable, "app.py", "render", "--image", PORTRAIT, "--audio", audio,
                             "--output", str(output), "--engine", "sadtalker", "--checkpoints", checkpoint_dir,
                             "--preprocess", "full", "--min-audio-seconds", "0.04"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    count, size, has_audio = probe(str(output))
    assert count == 1 and has_audio and size == (512, 512)
