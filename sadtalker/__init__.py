"""SadTalker engine: a faithful PyTorch re-implementation of OpenTalker/SadTalker that loads the official weights.

``pipeline.SadTalkerPipeline`` is the engine; ``checkpoints`` finds and loads the official files, ``weights``
checks and downloads them; ``models/`` holds the networks, one file per part of the paper. This package imports
``core`` only: never gradio, websockets, ``live`` or ``preview``.
"""
