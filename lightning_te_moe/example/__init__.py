"""The main job: a tiny MoE language model trained on the Python standard library's source, byte by byte."""

from .data import StdlibBytesDataModule
from .model import TinyMoELanguageModel

__all__ = ["StdlibBytesDataModule", "TinyMoELanguageModel"]
