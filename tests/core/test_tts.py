"""Offline text-to-speech with the espeak-ng that the espeakng-loader wheel ships: the speech is as long as the
words, audible, shaped like speech, follows the text and the settings, survives repeated and concurrent calls, and
bad requests get a message that says what to send instead."""
from __future__ import annotations

import sys
import threading
import wave

import numpy as np
import pytest

from core import tts
from core.errors import DependencyError, InputError
from core.options import SAMPLE_RATE

SENTENCE = "The quick brown fox jumps over the lazy dog near the river."  # 12 words
OTHER_SENTENCE = "Please remember to water all the plants in the garden tomorrow."


def seconds(speech: np.ndarray) -> float:
    return speech.size / SAMPLE_RATE


def envelope(speech: np.ndarray) -> np.ndarray:
    """Loudness per 10 ms: where the syllables and pauses are."""
    frames = speech.size // 160
    return np.sqrt(np.mean(speech[: frames * 160].reshape(frames, 160) ** 2, axis=1))


def envelope_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Correlation of two loudness envelopes over their common length (1 = same rhythm, ~0 = unrelated)."""
    x, y = envelope(a), envelope(b)
    n = min(x.size, y.size)
    x, y = x[:n] - x[:n].mean(), y[:n] - y[:n].mean()
    return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))


@pytest.fixture(scope="module")
def sentence_speech() -> np.ndarray:
    return tts.synthesize(SENTENCE)


def test_a_sentence_is_mono_float32_at_the_engines_rate_and_as_long_as_its_words(sentence_speech):
    assert sentence_speech.dtype == np.float32 and sentence_speech.ndim == 1
    assert 2.0 < seconds(sentence_speech) < 5.5  # 12 words at 165 words per minute is about 4.4 s of talk
    assert np.all(np.isfinite(sentence_speech)) and np.max(np.abs(sentence_speech)) <= 1.0


def test_the_speech_is_audible_and_has_its_energy_where_speech_does(sentence_speech):
    rms = float(np.sqrt(np.mean(sentence_speech ** 2)))
    assert rms > 0.03, f"speech RMS {rms:.4f}: (nearly) silent"
    power = np.abs(np.fft.rfft(sentence_speech)) ** 2
    hz = np.fft.rfftfreq(sentence_speech.size, 1 / SAMPLE_RATE)
    in_band = power[(hz >= 100) & (hz <= 4000)].sum() / power.sum()
    assert in_band > 0.85, f"only {in_band:.0%} of the energy is in 100-4000 Hz (white noise would have ~49%)"
    # Pauses between words: speech is not a steady tone or noise.
    loudness = envelope(sentence_speech)
    assert np.mean(loudness < 0.1 * loudness.max()) > 0.05


def test_the_same_text_gives_the_same_rhythm_and_other_text_a_different_one(sentence_speech):
    again = tts.synthesize(SENTENCE)
    other = tts.synthesize(OTHER_SENTENCE)
    assert abs(seconds(again) - seconds(sentence_speech)) < 0.05
    assert envelope_similarity(again, sentence_speech) > 0.8
    assert envelope_similarity(other, sentence_speech) < 0.5


def test_a_call_with_other_settings_does_not_leak_into_the_next(sentence_speech):
    german_and_fast = tts.synthesize(OTHER_SENTENCE, voice="de", words_per_minute=400)
    assert seconds(german_and_fast) < 0.6 * seconds(sentence_speech)
    after = tts.synthesize(SENTENCE)  # defaults again: English at 165 words per minute
    assert abs(seconds(after) - seconds(sentence_speech)) < 0.05
    assert envelope_similarity(after, sentence_speech) > 0.8


def test_the_rate_sets_the_pace():
    slow = tts.synthesize(SENTENCE, words_per_minute=100)
    fast = tts.synthesize(SENTENCE, words_per_minute=300)
    assert 2.0 < seconds(slow) / seconds(fast) < 3.5  # 3x the words per minute; pauses shrink less


def test_two_threads_speaking_at_once_each_get_their_own_speech(sentence_speech):
    alone = {SENTENCE: sentence_speech, OTHER_SENTENCE: tts.synthesize(OTHER_SENTENCE)}
    results: dict[str, list[np.ndarray]] = {SENTENCE: [], OTHER_SENTENCE: []}
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def speak(text: str) -> None:
        try:
            start.wait()
            for _ in range(5):
                results[text].append(tts.synthesize(text))
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=speak, args=(text,)) for text in results]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors, errors
    for text, speeches in results.items():
        assert len(speeches) == 5
        for speech in speeches:  # samples of the other thread's text mixed in would change the length and rhythm
            assert abs(seconds(speech) - seconds(alone[text])) < 0.05
            assert envelope_similarity(speech, alone[text]) > 0.8


def test_every_listed_voice_speaks_and_variants_change_the_speaker():
    voices = tts.available_voices()
    assert {"en", "en-us", "en-gb", "de", "fr", "es", "cmn"} <= set(voices)
    silent = []
    for voice in voices:
        try:
            tts.synthesize("hello", voice=voice)
        except InputError:
            silent.append(voice)
    assert not silent, f"listed but silent: {silent}"
    assert {"f1", "m1", "whisper"} <= set(tts.available_variants())
    plain, female = tts.synthesize("hello there", voice="en-us"), tts.synthesize("hello there", voice="EN-US+f3")
    assert median_pitch(female) > 1.5 * median_pitch(plain)  # measured: about 187 Hz against 92 Hz


def median_pitch(speech: np.ndarray) -> float:
    """The voice's fundamental in Hz: the autocorrelation peak (70-400 Hz) of each loud 40 ms frame, median."""
    frame = SAMPLE_RATE // 25
    frames = speech[: speech.size // frame * frame].reshape(-1, frame)
    loudness = np.sqrt(np.mean(frames ** 2, axis=1))
    shortest, longest = SAMPLE_RATE // 400, SAMPLE_RATE // 70  # lags of the highest and lowest pitch
    pitches = []
    for samples in frames[loudness > 0.3 * loudness.max()]:
        samples = samples - samples.mean()
        autocorrelation = np.correlate(samples, samples, "full")[frame - 1:]
        pitches.append(SAMPLE_RATE / (shortest + np.argmax(autocorrelation[shortest:longest])))
    return float(np.median(pitches))


@pytest.mark.parametrize("text, message", [
    ("", "empty"),
    ("   \n\t ", "empty"),
    ("\0", "empty"),
    ("word " * 401, f"limit is {tts.MAX_TEXT_CHARS}"),
    ("... ?? --", "nothing to pronounce"),  # not "!!!": espeak-ng names some symbols aloud
    (None, "must be a string"),
])
def test_unusable_text_is_refused_with_what_to_send(text, message):
    with pytest.raises(InputError, match=message):
        tts.synthesize(text)


def test_text_at_the_limit_is_spoken():
    assert seconds(tts.synthesize(("Hello there. " * 200)[: tts.MAX_TEXT_CHARS])) > 30


def test_an_unknown_voice_says_how_to_find_the_right_one():
    with pytest.raises(InputError) as error:
        tts.synthesize("hello", voice="english")
    message = str(error.value)
    assert "'english'" in message and "en-us" in message and "available_voices()" in message
    with pytest.raises(InputError, match="available_variants()"):
        tts.synthesize("hello", voice="en+f99")
    # espeak-ng treats a voice name as a file path: only names from its own lists get through.
    with pytest.raises(InputError, match="Unknown voice"):
        tts.synthesize("hello", voice="../../voices/!v/f1")


@pytest.mark.parametrize("rate", [79, 451, "fast", True, None])
def test_a_rate_out_of_range_is_refused(rate):
    with pytest.raises(InputError, match="80 to 450"):
        tts.synthesize("hello", words_per_minute=rate)


def test_without_the_espeakng_loader_wheel_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "espeakng_loader", None)  # makes `import espeakng_loader` fail
    with pytest.raises(DependencyError, match=r"pip install espeakng-loader==\d"):
        tts._Espeak()


def test_the_pinned_version_is_the_one_in_requirements():
    from support.paths import ROOT

    assert tts.ESPEAKNG_LOADER_PIN in (ROOT / "requirements.txt").read_text().split()


def test_the_command_line_writes_a_16_khz_wav(tmp_path, capsys):
    out = tmp_path / "hello.wav"
    assert tts.main(["Hello there.", str(out), "--voice", "en-us"]) == 0
    with wave.open(str(out)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (SAMPLE_RATE, 1, 2)
        assert 0.5 < w.getnframes() / SAMPLE_RATE < 2.0
    assert tts.main(["Hello.", str(tmp_path / "x.wav"), "--voice", "klingon"]) == 1
    assert "Unknown voice" in capsys.readouterr().err
