"""SadTalker engine: a faithful PyTorch re-implementation of OpenTalker/SadTalker that loads the official weights.

This package never imports gradio, websockets or ``preview/``.
"""
from core.errors import CheckpointError, InputError, NoFaceError, SadTalkerError
from core.engine import Done, Event, Frame, MotionReady, Progress
from core.options import FPS, SAMPLE_RATE, Options

__all__ = ["CheckpointError", "InputError", "NoFaceError", "SadTalkerError", "Done", "Event", "Frame", "MotionReady",
           "Progress", "FPS", "SAMPLE_RATE", "Options"]
