"""Offline text-to-speech: text -> 16 kHz mono float32 speech, with espeak-ng.

The espeak-ng library and its voice data come from the ``espeakng-loader`` wheel (PyPI), so nothing is installed on
the system and nothing is downloaded at run time. The library is driven through ctypes in synchronous retrieval
mode: ``espeak_Synth`` returns when the whole text is spoken, and the samples (int16 at 22050 Hz) arrive in a
callback on the calling thread. espeak-ng keeps one global synthesizer and is not re-entrant, so every call holds
one process-wide lock; synthesis is far faster than real time, so the lock is held briefly.

The speech is robotic (formant synthesis) but clear, in about 140 languages: good for a live avatar's typed
replies and for making example speech. Two calls with the same text are not bit-identical (espeak-ng adds random
voicing noise), though they have the same words and timing to within a few milliseconds.

    >>> from core import tts
    >>> speech = tts.synthesize("Hello, I am a talking head.", voice="en-us")  # float32 at SAMPLE_RATE

Command line, for example speech: ``python -m core.tts "Hello there." out.wav [--voice en-us] [--wpm 165]``,
and ``python -m core.tts --list-voices``.
"""
from __future__ import annotations

import ctypes
import difflib
import os
import threading
from dataclasses import dataclass
from math import gcd

import numpy as np
from scipy.signal import resample_poly

from .errors import DependencyError, InputError
from .options import SAMPLE_RATE

MAX_TEXT_CHARS = 2000  # about 2 minutes of speech; longer text is refused (send it sentence by sentence)
MIN_WORDS_PER_MINUTE, MAX_WORDS_PER_MINUTE = 80, 450  # espeak-ng's own rate limits (espeakRATE_MINIMUM/MAXIMUM)
ESPEAKNG_LOADER_PIN = "espeakng-loader==0.2.4"  # as in requirements.txt; named in the install hint

# Constants of the espeak-ng C API (speak_lib.h).
_AUDIO_OUTPUT_SYNCHRONOUS = 2  # retrieval mode, and espeak_Synth returns only when synthesis is complete
_INITIALIZE_DONT_EXIT = 0x8000  # report missing voice data by returning an error instead of calling exit()
_POS_CHARACTER = 1
_CHARS_UTF8 = 1  # plain UTF-8 text: no SSML tags, no [[phoneme]] escapes (text from users is spoken as written)
_PARAM_RATE = 1
_EE_OK = 0

# int SynthCallback(short *wav, int numsamples, espeak_EVENT *events); returns 0 to continue.
# The events are not used, so they stay an opaque pointer.
_SynthCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class _EspeakVoice(ctypes.Structure):
    """espeak_VOICE: one entry of espeak_ListVoices()."""

    _fields_ = [
        ("name", ctypes.c_char_p),  # e.g. "English (America)"
        ("languages", ctypes.c_void_p),  # (priority byte, language code, NUL) pairs, ended by an extra NUL
        ("identifier", ctypes.c_char_p),  # file under espeak-ng-data/lang, e.g. "gmw/en-US"
        ("gender", ctypes.c_ubyte),
        ("age", ctypes.c_ubyte),
        ("variant", ctypes.c_ubyte),
        ("xx1", ctypes.c_ubyte),
        ("score", ctypes.c_int),
        ("spare", ctypes.c_void_p),
    ]


@dataclass(frozen=True)
class _Voice:
    identifier: str  # what espeak_SetVoiceByName is given, e.g. "gmw/en-US"
    name: str  # e.g. "English (America)"
    priority: int  # lower = the better voice for this language code


class _Espeak:
    """The loaded library and its voice table. One per process (see ``_engine``); callers hold ``_LOCK``."""

    def __init__(self) -> None:
        try:
            import espeakng_loader
        except ImportError as exc:
            raise DependencyError(
                f"Text-to-speech needs the espeak-ng speech synthesizer. Install it: pip install {ESPEAKNG_LOADER_PIN}"
            ) from exc
        library_path = espeakng_loader.get_library_path()
        try:
            lib = ctypes.CDLL(library_path)
            data_path = espeakng_loader.get_data_path()
        except (OSError, RuntimeError) as exc:
            raise DependencyError(
                f"The espeak-ng speech synthesizer could not be loaded ({exc}). "
                f"Reinstall it: pip install --force-reinstall {ESPEAKNG_LOADER_PIN}"
            ) from exc
        _declare(lib)
        # The path argument is the folder that holds espeak-ng-data (the wheel's own copy: the library's built-in
        # default points at the machine the wheel was built on).
        self.source_rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, os.path.dirname(data_path).encode(),
                                                 _INITIALIZE_DONT_EXIT)
        if self.source_rate <= 0:
            raise DependencyError(
                f"The espeak-ng voice data at {data_path} could not be read. "
                f"Reinstall it: pip install --force-reinstall {ESPEAKNG_LOADER_PIN}"
            )
        self._lib = lib
        self._chunks: list[bytes] = []
        # ctypes must keep the callback object alive for as long as the library may call it: for the process.
        self._callback = _SynthCallback(self._collect)
        lib.espeak_SetSynthCallback(self._callback)
        self.voices = _list_voices(lib, data_path)
        self.variants = _list_variants(data_path)

    def _collect(self, samples, num_samples: int, _events) -> int:
        # NULL samples mark the end; a count of 0 can come mid-text and does not.
        if samples and num_samples > 0:
            self._chunks.append(ctypes.string_at(samples, 2 * num_samples))
        return 0  # continue

    def speak(self, text: str, voice_spec: str, words_per_minute: int) -> np.ndarray:
        """int16 samples at ``source_rate``. The caller holds ``_LOCK`` and has checked every argument."""
        lib = self._lib
        if lib.espeak_SetVoiceByName(voice_spec.encode()) != _EE_OK:
            raise RuntimeError(f"espeak-ng refused the voice {voice_spec!r} from its own voice list")
        # After the voice: a voice change resets the voice's parameters.
        lib.espeak_SetParameter(_PARAM_RATE, words_per_minute, 0)
        encoded = text.encode("utf-8") + b"\0"
        self._chunks = []
        try:
            status = lib.espeak_Synth(encoded, len(encoded), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
            if status != _EE_OK:
                raise RuntimeError(f"espeak_Synth failed with status {status}")
            lib.espeak_Synchronize()
            return np.frombuffer(b"".join(self._chunks), dtype=np.int16)
        finally:
            self._chunks = []


def _declare(lib: ctypes.CDLL) -> None:
    """The C signatures of the functions used (without them ctypes would pass every argument as int)."""
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_Initialize.restype = ctypes.c_int
    lib.espeak_SetSynthCallback.argtypes = [_SynthCallback]
    lib.espeak_SetSynthCallback.restype = None
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_SetVoiceByName.restype = ctypes.c_int
    lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.espeak_SetParameter.restype = ctypes.c_int
    lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                 ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
    lib.espeak_Synth.restype = ctypes.c_int
    lib.espeak_Synchronize.argtypes = []
    lib.espeak_Synchronize.restype = ctypes.c_int
    lib.espeak_ListVoices.argtypes = [ctypes.c_void_p]
    lib.espeak_ListVoices.restype = ctypes.POINTER(ctypes.POINTER(_EspeakVoice))


def _list_voices(lib: ctypes.CDLL, data_path: str) -> dict[str, _Voice]:
    """Language code (lower case, e.g. "en-us") -> the voice espeak-ng prefers for it.

    Voices whose pronunciation dictionary the wheel does not ship are left out: they speak silence.
    """
    best: dict[str, _Voice] = {}
    entries = lib.espeak_ListVoices(None)  # a NULL-terminated array of pointers
    for i in range(10_000):
        if not entries[i]:
            break
        entry = entries[i].contents
        identifier = entry.identifier.decode()
        if not os.path.isfile(os.path.join(data_path, f"{_dictionary_name(data_path, identifier)}_dict")):
            continue
        for priority, code in _languages(entry.languages):
            voice = _Voice(identifier, entry.name.decode(), priority)
            if code not in best or priority < best[code].priority:
                best[code] = voice
    return best


def _languages(field: int) -> list[tuple[int, str]]:
    """Decode espeak_VOICE.languages: repeated (priority byte, NUL-terminated code), ended by a lone NUL."""
    found, address = [], field
    while True:
        priority = ctypes.string_at(address, 1)[0]
        if priority == 0:
            return found
        code = ctypes.string_at(address + 1)  # up to the NUL
        found.append((priority, code.decode().lower()))
        address += 1 + len(code) + 1


def _dictionary_name(data_path: str, identifier: str) -> str:
    """The dictionary a voice file uses: its ``dictionary`` line, else its first language without the region."""
    first_language = ""
    with open(os.path.join(data_path, "lang", identifier), encoding="utf-8", errors="replace") as f:
        for line in f:
            words = line.split()
            if len(words) >= 2 and words[0] == "dictionary":
                return words[1]
            if len(words) >= 2 and words[0] == "language" and not first_language:
                first_language = words[1]
    return first_language.split("-")[0]


def _list_variants(data_path: str) -> dict[str, str]:
    """Voice variant (lower case) -> its file name under voices/!v: "f3", "m2", "klatt", "whisper", ..."""
    folder = os.path.join(data_path, "voices", "!v")
    return {name.lower(): name for name in sorted(os.listdir(folder)) if os.path.isfile(os.path.join(folder, name))}


_LOCK = threading.Lock()  # espeak-ng has one global synthesizer: loading and every synthesis hold this
_ENGINE: _Espeak | None = None


def _engine() -> _Espeak:
    """The process's espeak-ng, loaded on first use. Call with ``_LOCK`` held."""
    global _ENGINE
    if _ENGINE is None:
        _ENGINE = _Espeak()
    return _ENGINE


def available_voices() -> list[str]:
    """The language codes ``synthesize`` accepts as ``voice``, sorted: "af", ..., "en", "en-gb", "en-us", ...

    A code may be followed by "+variant" to change the speaker: see ``available_variants()``.
    """
    with _LOCK:
        return sorted(_engine().voices)


def available_variants() -> list[str]:
    """Speaker variants for ``voice="<code>+<variant>"``: "f1".."f5" (female), "m1".."m8" (male), "whisper", ..."""
    with _LOCK:
        return list(_engine().variants.values())


def synthesize(text: str, voice: str = "en", words_per_minute: int = 165) -> np.ndarray:
    """Speak ``text``: mono float32 in [-1, 1] at ``SAMPLE_RATE`` (16 kHz), the rate every engine takes.

    ``voice`` is a language code from ``available_voices()`` ("en", "en-us", "de", "fr", ...), optionally with a
    speaker variant: "en-us+f3". ``words_per_minute`` is 80..450. Text is spoken as written: no SSML, no phoneme
    codes. Thread-safe; calls from several threads take turns.

    Raises InputError for empty text, text longer than MAX_TEXT_CHARS, an unknown voice, a rate out of range, or
    text with nothing to pronounce; DependencyError if espeak-ng cannot be loaded.
    """
    text = _check_text(text)
    words_per_minute = _check_rate(words_per_minute)
    with _LOCK:
        engine = _engine()
        voice_spec = _resolve_voice(engine, voice)
        samples = engine.speak(text, voice_spec, words_per_minute)
        source_rate = engine.source_rate
    speech = _resample(samples.astype(np.float32) / 32768.0, source_rate, SAMPLE_RATE)
    if speech.size == 0 or float(np.max(np.abs(speech))) < 0.01:
        raise InputError(f"The text {_preview(text)} has nothing to pronounce in voice {voice!r}. "
                         "Send words, not only punctuation or symbols.")
    return speech


def _check_text(text: object) -> str:
    if not isinstance(text, str):
        raise InputError(f"The text to speak must be a string, not {type(text).__name__}.")
    # A NUL would end the C string early and silently drop the rest.
    text = text.replace("\0", " ").strip()
    if not text:
        raise InputError("The text to speak is empty. Send at least one word.")
    if len(text) > MAX_TEXT_CHARS:
        raise InputError(f"The text is {len(text)} characters long; the limit is {MAX_TEXT_CHARS} "
                         "(about 2 minutes of speech). Send it in parts, for example sentence by sentence.")
    return text


def _check_rate(words_per_minute: object) -> int:
    if isinstance(words_per_minute, bool) or not isinstance(words_per_minute, (int, float)) \
            or not MIN_WORDS_PER_MINUTE <= words_per_minute <= MAX_WORDS_PER_MINUTE:
        raise InputError(f"words_per_minute must be a number from {MIN_WORDS_PER_MINUTE} to {MAX_WORDS_PER_MINUTE} "
                         f"(165 is a calm speaking pace), not {words_per_minute!r}.")
    return int(round(words_per_minute))


def _resolve_voice(engine: _Espeak, voice: object) -> str:
    """The user's "code[+variant]" -> the argument for espeak_SetVoiceByName ("gmw/en-US+f3").

    Only names from espeak-ng's own lists pass: the library treats a voice name as a file path.
    """
    if not isinstance(voice, str):
        raise InputError(f"The voice must be a language code string such as 'en' or 'en-us', not {voice!r}.")
    code, _, variant = voice.strip().lower().partition("+")
    if code not in engine.voices:
        close = difflib.get_close_matches(code, engine.voices, n=5, cutoff=0.5)
        hint = f"Did you mean {', '.join(close)}? " if close else ""
        raise InputError(f"Unknown voice {voice!r}. {hint}Use a language code such as en, en-us, de, fr, es, it, "
                         f"pt, hi or cmn; all {len(engine.voices)} are listed by core.tts.available_voices() "
                         "(or: python -m core.tts --list-voices).")
    spec = engine.voices[code].identifier
    if variant:
        if variant not in engine.variants:
            close = difflib.get_close_matches(variant, engine.variants, n=5, cutoff=0.5)
            hint = f"Did you mean {', '.join(close)}? " if close else ""
            raise InputError(f"Unknown voice variant {variant!r} in {voice!r}. {hint}Variants include f1..f5 "
                             "(female), m1..m8 (male) and whisper; all are listed by core.tts.available_variants().")
        spec += "+" + engine.variants[variant]
    return spec


def _resample(samples: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    """Polyphase resampling (22050 -> 16000 Hz is up 320, down 441), with its anti-aliasing filter."""
    if source_rate == target_rate or samples.size == 0:
        return samples.astype(np.float32, copy=False)
    divisor = gcd(source_rate, target_rate)
    resampled = resample_poly(samples, target_rate // divisor, source_rate // divisor)
    return np.clip(resampled, -1.0, 1.0).astype(np.float32)


def _preview(text: str, length: int = 40) -> str:
    return repr(text if len(text) <= length else text[:length] + "...")


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    from .audio import write_wav
    from .errors import SadTalkerError

    parser = argparse.ArgumentParser(prog="python -m core.tts", description="Speak text into a 16 kHz mono WAV file.")
    parser.add_argument("text", nargs="?", help="what to say (quote it)")
    parser.add_argument("output", nargs="?", help="the .wav file to write")
    parser.add_argument("--voice", default="en", help="language code, optionally +variant (en-us+f3); default en")
    parser.add_argument("--wpm", type=int, default=165, help="speaking rate in words per minute, 80..450")
    parser.add_argument("--list-voices", action="store_true", help="print the voices and variants, then exit")
    args = parser.parse_args(argv)
    try:
        if args.list_voices:
            print("voices:", ", ".join(available_voices()))
            print("variants (append as +variant):", ", ".join(available_variants()))
            return 0
        if args.text is None or args.output is None:
            parser.error("give the text and the output .wav file (or --list-voices)")
        speech = synthesize(args.text, voice=args.voice, words_per_minute=args.wpm)
    except SadTalkerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    write_wav(args.output, speech)
    print(f"{args.output}: {speech.size / SAMPLE_RATE:.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
