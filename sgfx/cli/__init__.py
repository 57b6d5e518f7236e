"""The ``sgfx`` command (:mod:`.main`) and what only it needs: model sources (:mod:`.sources`), image folders
(:mod:`.data`), accuracy with paired intervals (:mod:`.evaluation`) and the offline demo (:mod:`.demo`)."""

from .main import build_parser, main

__all__ = ["main", "build_parser"]
