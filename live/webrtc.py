"""WebRTC for every live stream (aiortc): watch it (WHEP) and speak into a session (WHIP), with standard signalling.

A WHEP peer gets a video track (VP8 or H.264, as the client offers) and an Opus audio track. Both tracks read the
stream's ``Timeline`` on the stream's clock, a fixed delay behind it: frame k and the sound of its 40 ms are
released when the clock reaches them, so the RTP timestamps of both tracks map onto the same moments (RTCP sender
reports pair them with wall-clock time) and the browser plays them in sync.

A WHIP peer sends one audio track into a live session: its sound, resampled to 16 kHz mono, is spoken as it arrives;
the end of the track ends the utterance.

Peers live on the asyncio loop of the HTTP server; everything here is called from there.
"""
from __future__ import annotations

import asyncio
import fractions
import logging
import secrets
import time

import numpy as np

from core.options import FPS, SAMPLE_RATE

from .stream import OUTPUT_DELAY_S, LiveStream

log = logging.getLogger(__name__)

AUDIO_FRAME = SAMPLE_RATE // 50  # 20 ms of sound per audio frame (Opus packetisation)
VIDEO_TIME_BASE = fractions.Fraction(1, 90000)
AUDIO_TIME_BASE = fractions.Fraction(1, SAMPLE_RATE)


class SdpError(ValueError):
    """The client's SDP offer cannot be used."""


def _tracks(stream: LiveStream):
    import av
    from aiortc import MediaStreamTrack
    from aiortc.mediastreams import MediaStreamError

    timeline, clock = stream.timeline(), stream.clock

    async def wait_until(t: float) -> None:
        delay = clock.monotonic(t + OUTPUT_DELAY_S) - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)

    class VideoTrack(MediaStreamTrack):
        kind = "video"

        def __init__(self):
            super().__init__()
            self.tick = None

        async def recv(self):
            if self.readyState != "live" or stream.ended.is_set():
                raise MediaStreamError
            if self.tick is None:
                self.tick = max(0, int((clock.now() - OUTPUT_DELAY_S) * FPS))
            t = self.tick / FPS
            await wait_until(t)
            if clock.now() - OUTPUT_DELAY_S - t > 0.5:  # fell behind (a busy CPU): skip to now, never burst
                self.tick = int((clock.now() - OUTPUT_DELAY_S) * FPS)
                t = self.tick / FPS
            frame = av.VideoFrame.from_ndarray(timeline.frame_at(t), format="rgb24")
            frame.pts, frame.time_base = int(round(t * 90000)), VIDEO_TIME_BASE
            self.tick += 1
            return frame

    class AudioTrack(MediaStreamTrack):
        kind = "audio"

        def __init__(self):
            super().__init__()
            self.sample = None

        async def recv(self):
            if self.readyState != "live" or stream.ended.is_set():
                raise MediaStreamError
            if self.sample is None:
                self.sample = max(0, int((clock.now() - OUTPUT_DELAY_S) * SAMPLE_RATE) // AUDIO_FRAME * AUDIO_FRAME)
            t = self.sample / SAMPLE_RATE
            await wait_until(t)
            if clock.now() - OUTPUT_DELAY_S - t > 0.5:
                self.sample = int((clock.now() - OUTPUT_DELAY_S) * SAMPLE_RATE) // AUDIO_FRAME * AUDIO_FRAME
                t = self.sample / SAMPLE_RATE
            pcm = timeline.sound_at(t, AUDIO_FRAME)
            frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = SAMPLE_RATE, self.sample, AUDIO_TIME_BASE
            self.sample += AUDIO_FRAME
            return frame

    return VideoTrack(), AudioTrack()


class WebRtcPeers:
    """The open WHEP/WHIP peer connections, by resource id (for DELETE)."""

    def __init__(self):
        self._peers: dict[str, object] = {}

    def __len__(self) -> int:
        return len(self._peers)

    async def watch(self, stream: LiveStream, offer_sdp: str) -> tuple[str, str]:
        """WHEP: answer a viewer's offer with the stream's video and audio. Returns (resource id, answer SDP)."""
        from aiortc import RTCPeerConnection, RTCSessionDescription

        pc = RTCPeerConnection()
        resource = secrets.token_urlsafe(16)
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=_checked(offer_sdp), type="offer"))
            for track in _tracks(stream):  # into the offer's (recvonly) transceivers of each kind
                pc.addTrack(track)
            await pc.setLocalDescription(await pc.createAnswer())
        except (ValueError, AttributeError, KeyError) as exc:
            await pc.close()
            raise SdpError(f"The SDP offer cannot be used ({exc.__class__.__name__}: {exc}).") from None
        self._add(resource, pc, stream)
        return resource, pc.localDescription.sdp

    async def speak(self, session, stream: LiveStream, offer_sdp: str) -> tuple[str, str]:
        """WHIP: take a client's audio track into a live session. Returns (resource id, answer SDP)."""
        import av
        from aiortc import RTCPeerConnection, RTCSessionDescription
        from aiortc.mediastreams import MediaStreamError

        pc = RTCPeerConnection()
        resource = secrets.token_urlsafe(16)
        resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)

        async def consume(track) -> None:
            pending: list[np.ndarray] = []
            try:
                while True:
                    frame = await track.recv()
                    for piece in resampler.resample(frame):
                        pending.append(piece.to_ndarray().reshape(-1))
                    if sum(p.size for p in pending) >= SAMPLE_RATE // 10:  # 100 ms at a time
                        session.speak(np.concatenate(pending).astype(np.float32) / 32768.0, final=False)
                        pending = []
            except MediaStreamError:
                pass
            finally:
                tail = np.concatenate(pending).astype(np.float32) / 32768.0 if pending else np.zeros(0, np.float32)
                if session.alive:
                    session.speak(tail, final=True)

        @pc.on("track")
        def on_track(track):
            if track.kind == "audio":
                asyncio.ensure_future(consume(track))

        try:
            offer = RTCSessionDescription(sdp=_checked(offer_sdp), type="offer")
            if "m=audio" not in offer.sdp:
                raise SdpError("The offer has no audio to speak: send a microphone (an audio m-line).")
            await pc.setRemoteDescription(offer)
            for transceiver in pc.getTransceivers():
                transceiver.direction = "recvonly"
            await pc.setLocalDescription(await pc.createAnswer())
        except SdpError:
            await pc.close()
            raise
        except (ValueError, AttributeError, KeyError) as exc:
            await pc.close()
            raise SdpError(f"The SDP offer cannot be used ({exc.__class__.__name__}: {exc}).") from None
        self._add(resource, pc, stream)
        return resource, pc.localDescription.sdp

    async def close(self, resource: str) -> bool:
        pc = self._peers.pop(resource, None)
        if pc is None:
            return False
        await pc.close()
        return True

    async def close_all(self) -> None:
        for resource in list(self._peers):
            await self.close(resource)

    def _add(self, resource: str, pc, stream: LiveStream) -> None:
        self._peers[resource] = pc

        @pc.on("connectionstatechange")
        async def on_state():
            if pc.connectionState in ("failed", "closed"):
                await self.close(resource)

        closer = _StreamEndCloser(self, resource)
        stream.attach(closer)


class _StreamEndCloser:
    """Attached to a stream: when the stream ends, its WebRTC peer is closed (on the peer's loop)."""

    def __init__(self, peers: WebRtcPeers, resource: str):
        self.peers, self.resource = peers, resource
        self.loop = asyncio.get_running_loop()

    def close(self) -> None:
        if not self.loop.is_closed():
            asyncio.run_coroutine_threadsafe(self.peers.close(self.resource), self.loop)


def _checked(sdp: str) -> str:
    if not isinstance(sdp, str) or not sdp.startswith("v=0") or "m=" not in sdp:
        raise SdpError("Send an SDP offer (Content-Type: application/sdp) starting with v=0 and with media lines.")
    return sdp
