"""Benchmarks that print figures. Run each as a module from the repository root: ``python -m bench.NAME``.

(Run as a file, ``python bench/NAME.py`` would put this folder first on the import path, where ``live.py`` and
``queue.py`` stand in for the ``live`` package and the standard library's ``queue``.)
"""
