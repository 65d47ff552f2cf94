"""What users upload: images in any mode and size, audio in any common format, and bad inputs that must get a
clear message. Runs through the Studio (the path the app takes) with the real lite engine; the audio is kept short
so each generation takes a second or two."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from support.bombs import write_png_bomb
from support.paths import ROOT
from live.studio import Studio
from core.audio import ffmpeg_exe, write_wav
from core.options import Options

EXAMPLE_IMAGE = ROOT / "examples" / "portrait.png"
EXAMPLE_AUDIO = ROOT / "examples" / "speech.wav"


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    return Studio(None, outputs_dir=str(tmp_path_factory.mktemp("outputs")),
                  checkpoint_dir=str(tmp_path_factory.mktemp("no-weights")), max_audio_s=30)


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    """The first 1.2 s of the example speech as 16-bit wav."""
    path = tmp_path_factory.mktemp("audio") / "speech.wav"
    ffmpeg("-i", str(EXAMPLE_AUDIO), "-t", "1.2", str(path))
    return path


def ffmpeg(*args: str) -> None:
    subprocess.run([ffmpeg_exe(), "-nostdin", "-y", "-v", "error", *args], check=True)


def generate(studio: Studio, image, audio, **options):
    job = studio.start(str(image), str(audio), Options(seed=0, **options))
    assert job.wait(120), "the job did not finish"
    return job.snapshot()


def video_seconds(path: str) -> float:
    out = subprocess.run([ffmpeg_exe(), "-i", path, "-map", "0:v:0", "-c", "copy", "-f", "null", "-"],
                         capture_output=True, text=True).stderr
    return int(out.rsplit("frame=", 1)[1].split()[0]) / 25


def portrait() -> Image.Image:
    return Image.open(EXAMPLE_IMAGE).convert("RGB")


def rgba_with_transparent_background() -> Image.Image:
    rgba = portrait().convert("RGBA")
    alpha = np.full(rgba.size[::-1], 255, np.uint8)
    alpha[:, :40] = 0  # a transparent strip on the left
    rgba.putalpha(Image.fromarray(alpha))
    return rgba


IMAGES = {
    "rgba.png": rgba_with_transparent_background,
    "grey.png": lambda: portrait().convert("L"),
    "cmyk.jpg": lambda: portrait().convert("CMYK"),
    "palette.gif": lambda: portrait().convert("P", palette=Image.Palette.ADAPTIVE),
    "huge.jpg": lambda: portrait().resize((4096, 4096), Image.Resampling.BICUBIC),
    "photo.webp": portrait,
}


@pytest.mark.parametrize("name", IMAGES)
def test_any_image_pillow_reads_becomes_a_video(studio, speech, tmp_path, name):
    path = tmp_path / name
    IMAGES[name]().save(path)
    snap = generate(studio, path, speech)
    assert snap.state == "done", snap.error
    assert abs(video_seconds(snap.video_path) - 1.2) <= 0.04 + 1e-9
    if name == "huge.jpg":
        assert snap.frame.rgb.shape[:2] == (512, 512)  # shown downscaled; the mp4 is at most 2048 px
        info = subprocess.run([ffmpeg_exe(), "-i", snap.video_path], capture_output=True, text=True).stderr
        assert "2048x2048" in info


AUDIO = {  # name -> ffmpeg output arguments
    "speech.mp3": ["-c:a", "libmp3lame", "-b:a", "64k"],
    "speech.m4a": ["-c:a", "aac", "-b:a", "64k"],
    "speech.ogg": ["-c:a", "libvorbis"],
    "speech.opus": ["-c:a", "libopus", "-b:a", "32k"],
    "speech.flac": ["-c:a", "flac"],
    "stereo_44k.wav": ["-ac", "2", "-ar", "44100"],
    "mono_8k.wav": ["-ac", "1", "-ar", "8000"],
}


@pytest.mark.parametrize("name", AUDIO)
def test_any_audio_ffmpeg_decodes_becomes_a_video_of_its_length(studio, speech, tmp_path, name):
    path = tmp_path / name
    ffmpeg("-i", str(speech), *AUDIO[name], str(path))
    snap = generate(studio, EXAMPLE_IMAGE, path)
    assert snap.state == "done", snap.error
    # lossy codecs pad a little; the video follows the decoded length to within a frame or two
    assert abs(video_seconds(snap.video_path) - 1.2) <= 0.09, name
    info = subprocess.run([ffmpeg_exe(), "-i", snap.video_path], capture_output=True, text=True).stderr
    assert "Audio: aac" in info


def no_face_image(path):
    y, x = np.mgrid[0:300, 0:400]
    Image.fromarray(np.stack([x % 256, y % 256, (x + y) % 256], -1).astype(np.uint8)).save(path)


def write_bytes(content: bytes):
    return lambda path: path.write_bytes(content)


BAD = {  # case -> (which input, how to make it, words the message must contain)
    "not an image": ("image", write_bytes(b"%PDF-1.4 not a picture"), ["Could not read the image", "jpg or png"]),
    "no face": ("image", no_face_image, ["face"]),
    "unreadable audio": ("audio", write_bytes(b"RIFF\x00\x00garbage" * 10), ["Could not read the audio", "wav"]),
    "empty file": ("audio", write_bytes(b""), ["Could not read the audio"]),
    "empty recording": ("audio", lambda path: write_wav(str(path), np.zeros(100, np.float32)), ["audio is empty"]),
    "half a second": ("audio", lambda path: write_wav(str(path), np.zeros(8000, np.float32)),
                      ["only 0.50 s long", "at least 1 s"]),
    "too long": ("audio", None, ["longer than the limit", "--max-audio-seconds"]),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_gets_a_message_that_says_what_to_do(tmp_path, speech, case):
    which, make, words = BAD[case]
    studio = Studio(None, outputs_dir=str(tmp_path / "outputs"), checkpoint_dir=str(tmp_path),
                    max_audio_s=30 if case != "too long" else 1.0)
    image, audio = EXAMPLE_IMAGE, speech
    if make is not None:
        bad = tmp_path / ("upload.png" if which == "image" else "upload.wav")
        make(bad)
        image, audio = (bad, audio) if which == "image" else (image, bad)
    snap = generate(studio, image, audio)
    assert snap.state == "error" and snap.user_error, snap
    for word in words:
        assert word.lower() in snap.error.lower(), snap.error
    assert not list((tmp_path / "outputs").glob("*/*")), "a failed job left files behind"


# What reading one image costs, in a fresh process: its peak memory (VmHWM, MB) before and after, the time, the outcome.
LOAD_ONE = r"""
import json, re, sys, time
from core.errors import InputError
from core.image import load_image
def peak_mb():
    return int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1)) / 1024
before, start = peak_mb(), time.perf_counter()
try:
    outcome = list(load_image(sys.argv[1]).shape)
except InputError as exc:
    outcome = str(exc)
print(json.dumps({"grew_mb": peak_mb() - before, "seconds": time.perf_counter() - start, "outcome": outcome}))
"""


def load_in_a_fresh_process(path) -> dict:
    done = subprocess.run([sys.executable, "-c", LOAD_ONE, str(path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize("bit_depth, colour_type", [(8, 2), (16, 0)], ids=["rgb", "16-bit grey"])
def test_a_decompression_bomb_is_refused_at_once_without_decoding_it(tmp_path, bit_depth, colour_type):
    bomb = tmp_path / "bomb.png"  # 20000x20000: 1.2 GB (RGB) or 0.8 GB (16-bit) decoded, ~1 MB on disk
    write_png_bomb(bomb, 20000, 20000, bit_depth=bit_depth, colour_type=colour_type)
    result = load_in_a_fresh_process(bomb)
    assert "400 megapixels" in result["outcome"] and "up to 40 megapixels" in result["outcome"], result
    assert result["grew_mb"] < 20 and result["seconds"] < 2.0, result


def test_a_bomb_just_over_the_limit_is_refused_and_one_under_it_is_read(tmp_path):
    over, under = tmp_path / "over.png", tmp_path / "under.png"
    write_png_bomb(over, 8000, 5001, colour_type=0)
    write_png_bomb(under, 8000, 5000, colour_type=0)
    assert "8000x5001 pixels" in load_in_a_fresh_process(over)["outcome"]
    read = load_in_a_fresh_process(under)
    assert read["outcome"] == [1280, 2048, 3], read
    assert read["grew_mb"] < 150, read  # 40 MP of grey: 40 MB decoded (bench/image_memory.py has the worst modes)


def test_a_huge_jpeg_is_decoded_reduced(tmp_path):
    photo = tmp_path / "panorama.jpg"  # 96 MP: over the limit, read at 1/4 of its size while decoding
    portrait().convert("L").resize((12000, 8000), Image.Resampling.NEAREST).save(photo, quality=80)
    result = load_in_a_fresh_process(photo)
    assert result["outcome"] == [1365, 2048, 3], result
    assert result["grew_mb"] < 100, result  # decoded at 3000x2000, not the 96 MP (288 MB as RGB) of the file
